"""Benchmark scripts: `python -m apiana_lab.bench.read` and `python -m apiana_lab.bench.summarize`."""
