"""Benchmark scripts (`python -m apiana_lab.bench.<name>`): each declares a workload and configurations for the lab."""
