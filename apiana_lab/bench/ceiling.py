"""Our pipeline against the engine's own ceiling, and batched transformers against one at a time.

    python -m apiana_lab.bench.ceiling [--chunks-a 64] [--chunks-b 96] [--transformers-chunks 32] [--workloads a,b]
                                       [--skip-vllm] [--quick]

Two workloads from a synthetic export:
  (a) real-length chunks (1000-1400 tokens), summaries at their natural length (up to 128 new tokens):
      prefill-bound on a CPU;
  (b) short chunks (200-300 tokens), up to 256 new tokens at their natural length: decode-heavy,
      the shape of a GPU run.

vLLM, one engine for every configuration, in this order on each workload:
  - ceiling: `vllm.LLM.chat` with every prompt at once, nothing of ours around it;
  - pipeline defaults: `ParallelSummarizerTransform(provider)`, what `chatgpt-export-v2` runs;
  - `--batch-size 16`: the same streaming path with a window of 16;
  - batch path: `stream=False`, batches of 16 from 2 workers (what ran before streaming).
The engine is loaded with vLLM's benchmark options and its caches are reset before each one.
Also the time to the first finished summary.

Transformers: sequential (`--sequential`) against the default parallel transform on the first
`--transformers-chunks` chunks of each workload.

Writes results/bench-ceiling/ceiling.json and .md (ceiling-quick.* with --quick, ceiling-transformers.*
with --skip-vllm, so a transformers-only run leaves the vLLM figures in place).
"""

from __future__ import annotations

import argparse
import logging
import sys

from apiana_lab.experiments.engine import loaded
from apiana_lab.experiments.measure import clock, sweep, workload_chunks
from apiana_lab.experiments.record import machine, markdown_table, write_result

logger = logging.getLogger("apiana_lab.bench.ceiling")

TARGET_CEILING = 0.95  # default settings against the engine's ceiling, output tokens/s
TARGET_TRANSFORMERS = {"a": 0.95, "b": 3.0}  # parallel against sequential, wall time


def workloads(n_a: int, n_b: int, chosen=("a", "b")) -> dict:
    """name -> (chunks, max new tokens), for the chosen workloads only."""
    loads = {}
    if "a" in chosen:
        loads["a"] = (workload_chunks(n_a)[0], 128)
    if "b" in chosen:
        loads["b"] = (workload_chunks(n_b, short_tokens=(200, 300))[1], 256)
    return loads


def ceiling(provider, transform, chunks: list, workload: str) -> dict:
    """`LLM.chat` with every prompt at once: the engine alone, with our prompts and sampling."""
    params = provider._sampling_params(transform.options)
    conversations = [transform.prompt(c) for c in chunks]
    with clock(provider) as timed:
        outputs = provider.llm.chat(conversations, params, use_tqdm=False)
    completion = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    return {
        "workload": workload,
        "config": "ceiling: LLM.chat(all)",
        "chunks": len(chunks),
        "failed": 0,
        "wall_s": timed.wall_s,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "completion_tokens_per_s": completion / timed.wall_s,
        "first_result_s": timed.wall_s,  # everything comes back together
        "load_1m": timed.load_1m,
    }


def echo(row: dict) -> dict:
    print(
        f"  [{row['workload']}] {row['config']:<34} {row['wall_s']:8.1f} s  {row['completion_tokens']:6d} new tokens  "
        f"{row['completion_tokens_per_s']:7.1f} tok/s  first {row['first_result_s'] or 0:6.1f} s  "
        f"{row['failed']} failed",
        file=sys.stderr,
        flush=True,
    )
    return row


def run_vllm(loads: dict, rows: list, facts: dict, checkpoint) -> None:
    """The ceiling, then the pipeline's configurations, on one vLLM engine for each workload."""
    from apiana_lab.summarize import ParallelSummarizerTransform

    timing: dict = {}
    with loaded("vllm", facts=timing) as provider:
        facts["vllm_load_s"] = round(timing["load_s"], 1)
        facts["vllm_default_window"] = provider.default_window
        facts["VLLM_CPU_NUM_OF_RESERVED_CPU"] = provider.reserved_cpus  # None on a GPU
        for workload, (chunks, max_tokens) in loads.items():
            default = ParallelSummarizerTransform(provider, max_length=max_tokens)
            configs = [
                ("ceiling", lambda d=default, c=chunks, w=workload: ceiling(provider, d, c, w)),
                ("pipeline defaults", default),
                (
                    "pipeline --batch-size 16",
                    ParallelSummarizerTransform(provider, batch_size=16, max_length=max_tokens),
                ),
                (
                    "batch path (16 x 2 workers)",
                    ParallelSummarizerTransform(
                        provider, batch_size=16, max_workers=2, stream=False, max_length=max_tokens
                    ),
                ),
            ]
            engine = [(label, run, {} if label == "ceiling" else {"engine": "vllm"}) for label, run in configs]
            sweep(engine, chunks, workload=workload, rows=rows, on_row=lambda row: (echo(row), checkpoint()))


def run_transformers(loads: dict, n: int, rows: list, facts: dict, checkpoint) -> None:
    """Sequential against the default parallel transform, on the first `n` chunks of each workload."""
    from apiana_lab.summarize import ParallelSummarizerTransform, SummarizerTransform

    with loaded("transformers") as provider:
        facts["transformers_max_batch_tokens"] = provider.max_batch_tokens
        facts["transformers_default_window"] = provider.default_window
        for workload, (chunks, max_tokens) in loads.items():
            configs = [
                (
                    "transformers sequential",
                    SummarizerTransform(provider, max_length=max_tokens),
                    {"engine": "transformers"},
                ),
                (
                    "transformers parallel (defaults)",
                    ParallelSummarizerTransform(provider, max_length=max_tokens),
                    {"engine": "transformers"},
                ),
            ]
            sweep(configs, chunks[:n], workload=workload, rows=rows, on_row=lambda row: (echo(row), checkpoint()))


def ratios(rows: list[dict]) -> dict:
    """Each vLLM configuration against the ceiling, parallel transformers against sequential."""
    out = {}
    for workload in ("a", "b"):
        top = next((r for r in rows if r["workload"] == workload and r["config"].startswith("ceiling")), None)
        for row in rows:
            if row["workload"] != workload or top is None or row is top or row.get("engine") != "vllm":
                continue
            row["vs_ceiling"] = row["completion_tokens_per_s"] / top["completion_tokens_per_s"]
            out[f"{workload}: {row['config']} / ceiling"] = round(row["vs_ceiling"], 3)
        stream = next((r for r in rows if r["workload"] == workload and r["config"] == "pipeline defaults"), None)
        batch = next((r for r in rows if r["workload"] == workload and r["config"].startswith("batch path")), None)
        if stream and batch and stream["first_result_s"] and batch["first_result_s"]:
            out[f"{workload}: first summary, batch path / streaming"] = round(
                batch["first_result_s"] / stream["first_result_s"], 2
            )
        seq = next((r for r in rows if r["workload"] == workload and r["config"] == "transformers sequential"), None)
        par = next(
            (r for r in rows if r["workload"] == workload and r["config"].startswith("transformers parallel")), None
        )
        if seq and par:
            par["speedup_wall"] = seq["wall_s"] / par["wall_s"]
            out[f"{workload}: transformers parallel / sequential (wall)"] = round(par["speedup_wall"], 2)
    return out


def targets(found: dict) -> dict:
    met = {}
    for workload in ("a", "b"):
        key = f"{workload}: pipeline defaults / ceiling"
        if key in found:
            met[key] = {"target_min": TARGET_CEILING, "measured": found[key], "met": found[key] >= TARGET_CEILING}
        key = f"{workload}: transformers parallel / sequential (wall)"
        if key in found:
            goal = TARGET_TRANSFORMERS[workload]
            met[key] = {"target_min": goal, "measured": found[key], "met": found[key] >= goal}
    return met


def render(results: dict) -> str:
    columns = [
        ("workload", "workload"),
        ("config", "configuration"),
        ("chunks", "chunks"),
        ("wall_s", "wall s"),
        ("completion_tokens", "new tokens"),
        ("completion_tokens_per_s", "new tok/s"),
        ("vs_ceiling", "× ceiling"),
        ("speedup_wall", "× sequential"),
        ("first_result_s", "first summary s"),
        ("failed", "failed"),
        ("load_1m", "load"),
    ]
    lines = [
        f"# Ceiling benchmark{' (quick)' if results['quick'] else ''}",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, {results['machine']['when']}.",
        f"Engine facts: {results['facts']}",
        "",
        markdown_table(results["rows"], columns),
        "",
        "## Ratios",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in results["ratios"].items()]
    lines += ["", "## Targets", ""]
    lines += [
        f"- {k}: {v['measured']} (target ≥ {v['target_min']}) {'met' if v['met'] else 'NOT met'}"
        for k, v in results["targets"].items()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks-a", type=int, default=64)
    parser.add_argument("--chunks-b", type=int, default=96)
    parser.add_argument(
        "--transformers-chunks", type=int, default=32, help="chunks per workload for transformers (0: skip)"
    )
    parser.add_argument("--skip-vllm", action="store_true", help="transformers only (writes ceiling-transformers.*)")
    parser.add_argument("--workloads", default="a,b", help="which workloads to run, comma-separated")
    parser.add_argument("--quick", action="store_true", help="8 and 12 chunks, 4 for transformers: a smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.chunks_a, args.chunks_b, args.transformers_chunks = 8, 12, 4
    stem = "ceiling-quick" if args.quick else "ceiling-transformers" if args.skip_vllm else "ceiling"
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not chosen or set(chosen) - {"a", "b"}:
        parser.error(f"--workloads takes a and/or b, comma-separated; got {args.workloads!r}")
    results = {"quick": args.quick, "machine": machine(), "facts": {}, "rows": [], "ratios": {}, "targets": {}}

    def checkpoint():
        results["ratios"] = ratios(results["rows"])
        results["targets"] = targets(results["ratios"])
        write_result("bench-ceiling", stem, results, render(results))

    loads = workloads(args.chunks_a, args.chunks_b, chosen)
    results["facts"]["workloads"] = {
        k: {
            "chunks": len(c),
            "prompt_tokens_per_chunk": round(sum(x.token_count for x in c) / len(c)),
            "max_new_tokens": m,
        }
        for k, (c, m) in loads.items()
    }
    if not args.skip_vllm:
        run_vllm(loads, results["rows"], results["facts"], checkpoint)
    if args.transformers_chunks:
        run_transformers(loads, args.transformers_chunks, results["rows"], results["facts"], checkpoint)
    checkpoint()
    print(render(results))
    return results


if __name__ == "__main__":
    main()
