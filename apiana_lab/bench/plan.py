"""`apiana-lab plan`'s projection against the real run it projects.

    python -m apiana_lab.bench.plan [--size-mb 2] [--sample 16] [--backend vllm]

Writes a synthetic export of `--size-mb`, projects it with `plan_export` from a stratified
sample of `--sample` chunks, then runs the whole export with `run_export` (what
`chatgpt-export-v2` runs, default settings) on the same loaded engine, and compares the
projected summarizing time (prefill + decode) with the run's `summarize_seconds`, and the
projected total with its wall time less model loading. Target: within ±25%.
Writes results/bench-plan/plan.json and .md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from apiana_lab.experiments.record import machine, markdown_table, write_result

TARGET_ERROR = 0.25


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=2.0)
    parser.add_argument("--sample", type=int, default=16)
    parser.add_argument("--backend", default="vllm")
    parser.add_argument("--chunk-size", type=int, default=3500)
    parser.add_argument("--max-length", type=int, default=300)
    args = parser.parse_args(argv)

    from apiana_lab.experiments.plan import format_plan, plan_export
    from apiana_lab.export.synth import write_synthetic_export
    from apiana_lab.pipeline import RunConfig, run_export
    from apiana_lab.providers import get_provider

    with tempfile.TemporaryDirectory(prefix="apiana-bench-plan-") as folder:
        export = Path(folder) / "conversations.json"
        write_synthetic_export(export, size_mb=args.size_mb, seed=3)
        start = time.perf_counter()
        provider = get_provider(args.backend)
        load_seconds = time.perf_counter() - start
        try:
            plan = plan_export(
                str(export),
                args.backend,
                sample=args.sample,
                chunk_size=args.chunk_size,
                max_length=args.max_length,
                provider=provider,
            )
            print(format_plan(plan), flush=True)
            start = time.perf_counter()
            run = run_export(
                RunConfig(
                    input=str(export),
                    output=str(Path(folder) / "out"),
                    backend=args.backend,
                    chunk_size=args.chunk_size,
                    max_length=args.max_length,
                ),
                provider=provider,
            )
            wall = time.perf_counter() - start
        finally:
            provider.close()

    p = plan["projection"]
    projected_summarize = p["prefill_seconds"] + p["decode_seconds"]
    projected_total = p["read_and_chunk_seconds"] + projected_summarize  # the engine was loaded once, outside both
    rows = [
        {
            "what": "summarizing (prefill + decode)",
            "projected_s": projected_summarize,
            "low_s": p["low_seconds"] - p["load_seconds"] - p["read_and_chunk_seconds"],
            "high_s": p["high_seconds"] - p["load_seconds"] - p["read_and_chunk_seconds"],
            "actual_s": run["summarize_seconds"],
        },
        {
            "what": "whole run (read, chunk, summarize, write)",
            "projected_s": projected_total,
            "low_s": p["low_seconds"] - p["load_seconds"],
            "high_s": p["high_seconds"] - p["load_seconds"],
            "actual_s": wall,
        },
    ]
    for row in rows:
        row["error"] = row["projected_s"] / row["actual_s"] - 1
        row["within_range"] = row["low_s"] <= row["actual_s"] <= row["high_s"]
    results = {
        "machine": machine(),
        "settings": vars(args),
        "engine_load_seconds": round(load_seconds, 1),
        "plan": plan,
        "run": {
            k: run.get(k)
            for k in (
                "chunks_total",
                "summaries_computed",
                "failed",
                "summarize_seconds",
                "completion_tokens",
                "prompt_tokens",
                "completion_tokens_per_s",
            )
        },
        "rows": rows,
        "target": {
            "max_abs_error": TARGET_ERROR,
            "measured": round(rows[0]["error"], 3),
            "met": abs(rows[0]["error"]) <= TARGET_ERROR,
        },
    }
    columns = [
        ("what", "what"),
        ("projected_s", "projected s"),
        ("low_s", "low s"),
        ("high_s", "high s"),
        ("actual_s", "actual s"),
        ("error", "error"),
        ("within_range", "in range"),
    ]
    markdown = "\n".join(
        [
            f"# plan against the real run: {args.size_mb:g} MB export, {args.sample}-chunk sample, {args.backend}",
            "",
            f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, {results['machine']['when']}.",
            f"Export: {plan['export']['chunks']} chunks, {plan['export']['prompt_tokens']:,} prompt tokens. "
            f"Run: {results['run']['summaries_computed']} summaries, "
            f"{results['run']['completion_tokens']:,} new tokens.",
            "",
            markdown_table(rows, columns),
            "",
            f"Target: |error| ≤ {TARGET_ERROR:.0%} on summarizing: {results['target']['measured']:+.1%}, "
            f"{'met' if results['target']['met'] else 'NOT met'}.",
            "",
            "```",
            format_plan(plan),
            "```",
        ]
    )
    write_result("bench-plan", "plan", results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
