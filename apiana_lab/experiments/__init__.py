"""Experiments behind the notebooks and the benchmark scripts: one implementation each, tested here.

profile  an export's shape: conversations, messages, tokens and chunks (`apiana-lab inspect`)
plan     how long a whole export will take, measured on a sample (`apiana-lab plan`)
measure  run one configuration over chunks and report its figures (benchmarks, comparison, sweep)
ab       the A/B migration check: sequential against parallel, per chunk, with a GO/NO-GO verdict
results  results/<notebook>/<run-id>/ folders and the index of every run (`apiana-lab results`)
"""
