"""The lab: what the notebooks and the benchmark scripts (apiana_lab.bench) call, one implementation each, tested here.

profile  an export's shape: conversations, messages, tokens and chunks (`apiana-lab inspect`)
plan     how long a whole export will take, measured on a sample (`apiana-lab plan`)
engine   load a backend for a measurement, warm it up, reset its caches, watch it, free it (`loaded`)
measure  time one configuration over chunks and report its figures (`measure`), and many in turn (`sweep`)
compare  backends side by side, and one backend across batch sizes
ab       the A/B migration check: sequential against parallel, per chunk, with a GO/NO-GO verdict
checks   the notebooks' parameter checks
record   the machine, the results root, and the JSON-plus-markdown writer every benchmark uses
results  results/<notebook>/<run-id>/ folders and the index of every run (`apiana-lab results`)
"""
