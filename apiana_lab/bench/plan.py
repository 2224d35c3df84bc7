"""`apiana-lab plan`'s projection against the real run it projects, on three export shapes and each backend.

    python -m apiana_lab.bench.plan [--backends vllm,transformers] [--exports short,long,sample]
        [--sample 8] [--chunk-size 1000] [--max-length 300]

Three exports: many short conversations and a few very long ones (synthetic, `conversation_kb`),
and the bundled sample. For each backend the engine is loaded once; for each export
`plan_export` projects it from a stratified sample of `--sample` chunks, then `run_export`
(what `chatgpt-export-v2` runs, default settings) runs the whole export on the same engine.
Both sides leave the engine's loading out (it is loaded once, before either, and reported on
its own): the projection's read + prefill + decode against the run's wall time (read, chunk,
summarize, write). Each row records the 1-minute load average at plan and run time: the
machine is shared, and a run that sees a different load than its plan moves by that much.
Target: every real run inside the printed range, every point estimate within ±15%.
Writes results/bench-plan/plan.json and .md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from apiana_lab.experiments.record import machine, markdown_table, write_result

TARGET_ERROR = 0.15
# name: (what it is, write_synthetic_export arguments, or None for the bundled sample). At scale s a
# backend gets s times the bytes; the long conversations grow with it, so there stay a few of them.
EXPORTS = {
    "short": ("many short conversations", {"size_mb": 0.2, "demo": True, "conversation_kb": (1.5, 3.5)}),
    "long": ("a few very long conversations", {"size_mb": 0.25, "demo": True, "conversation_kb": (110, 130)}),
    "sample": ("the bundled sample (apiana_lab/data/sample_export.json)", None),
}
SCALED_CONVERSATIONS = {"long"}


def _spec(name: str, scale: float) -> dict | None:
    spec = EXPORTS[name][1]
    if spec is None:
        return None
    kb = spec["conversation_kb"]
    if name in SCALED_CONVERSATIONS:
        kb = (kb[0] * scale, kb[1] * scale)
    return {**spec, "size_mb": spec["size_mb"] * scale, "conversation_kb": kb}


def _shown(row: dict) -> dict:
    """A row as the table shows it: the error signed in percent, inside as yes or no."""
    return {**row, "error": f"{row['error']:+.1%}", "inside": "yes" if row["inside"] else "**no**"}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="vllm,transformers")
    parser.add_argument("--exports", default=",".join(EXPORTS))
    parser.add_argument("--sample", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=300)
    parser.add_argument("--seed", type=int, default=3, help="the synthetic exports' seed")
    parser.add_argument(
        "--scale",
        default="vllm=8",
        help="BACKEND=FACTOR,...: synthetic exports that many times larger for a faster backend, so each real "
        "run takes minutes (vLLM runs the bundled model about 8x faster than transformers on this CPU)",
    )
    args = parser.parse_args(argv)
    scales = {k: float(v) for k, v in (item.split("=") for item in args.scale.split(",") if item)}
    names = [n for n in args.exports.split(",") if n]
    unknown = sorted(set(names) - set(EXPORTS))
    if unknown:
        parser.error(f"unknown export(s) {', '.join(unknown)}; choose from {', '.join(EXPORTS)}")

    from apiana_lab.experiments.plan import format_plan, plan_export
    from apiana_lab.export.synth import SAMPLE_PATH, write_synthetic_export
    from apiana_lab.pipeline import RunConfig, run_export
    from apiana_lab.providers import get_provider

    rows, plans = [], {}
    with tempfile.TemporaryDirectory(prefix="apiana-bench-plan-") as folder:
        for backend in [b for b in args.backends.split(",") if b]:
            paths = {}
            for name in names:
                spec = _spec(name, scales.get(backend, 1.0))
                if spec is None:
                    paths[name] = str(SAMPLE_PATH)
                else:
                    paths[name] = str(Path(folder) / f"{name}-{backend}.json")
                    write_synthetic_export(paths[name], seed=args.seed, **spec)
            start = time.perf_counter()
            provider = get_provider(backend)
            load_seconds = time.perf_counter() - start
            try:
                for name in names:
                    plan = plan_export(
                        paths[name],
                        backend,
                        sample=args.sample,
                        chunk_size=args.chunk_size,
                        max_length=args.max_length,
                        batch_size="auto",  # what `apiana-lab plan` and the run default to
                        provider=provider,
                    )
                    print(f"## {name} on {backend}\n{format_plan(plan)}", flush=True)
                    load_before = _load()
                    start = time.perf_counter()
                    run = run_export(
                        RunConfig(
                            input=paths[name],
                            output=str(Path(folder) / f"out-{backend}-{name}"),
                            backend=backend,
                            chunk_size=args.chunk_size,
                            max_length=args.max_length,
                        ),
                        provider=provider,
                    )
                    wall = time.perf_counter() - start
                    p, m = plan["projection"], plan["machine"]
                    row = {
                        "export": name,
                        "backend": backend,
                        "megabytes": plan["export"]["megabytes"],
                        "conversations": plan["export"]["conversations"],
                        "chunks": plan["export"]["chunks"],
                        "sampled": plan["sample"]["chunks"],
                        "projected_s": p["seconds"] - p["load_seconds"],
                        "low_s": p["low_seconds"] - p["load_seconds"],
                        "high_s": p["high_seconds"] - p["load_seconds"],
                        "actual_s": round(wall, 1),
                        "plan_load": f"{m['load_1m_at_start']:.1f}→{m['load_1m_at_end']:.1f}",
                        "run_load": f"{load_before:.1f}→{_load():.1f}",
                        "rough": p["rough"],
                        "engine_load_s": round(load_seconds, 1),
                        "summaries": run["summaries_computed"],
                        "completion_tokens": run["completion_tokens"],
                        "projected_completion_tokens": p["completion_tokens"],
                        "summarize_s": run["summarize_seconds"],
                    }
                    row["error"] = row["projected_s"] / row["actual_s"] - 1
                    row["inside"] = row["low_s"] <= row["actual_s"] <= row["high_s"]
                    row["met"] = row["inside"] and abs(row["error"]) <= TARGET_ERROR
                    rows.append(row)
                    plans[f"{name}/{backend}"] = plan
                    print(
                        f"-> real {wall:.1f} s, projected {row['projected_s']:.1f} s "
                        f"({row['error']:+.1%}), range {row['low_s']:.1f}-{row['high_s']:.1f}",
                        flush=True,
                    )
            finally:
                provider.close()

    met = all(r["met"] for r in rows)
    results = {
        "machine": machine(),
        "settings": vars(args),
        "exports": {n: EXPORTS[n][0] for n in names},
        "rows": rows,
        "plans": plans,
        "target": {"max_abs_error": TARGET_ERROR, "inside_range": "every row", "met": met},
    }
    columns = [
        ("export", "export"),
        ("backend", "backend"),
        ("conversations", "conversations"),
        ("chunks", "chunks"),
        ("projected_s", "projected s"),
        ("low_s", "low s"),
        ("high_s", "high s"),
        ("actual_s", "real s"),
        ("error", "error"),
        ("inside", "inside range"),
        ("plan_load", "load at plan"),
        ("run_load", "load at run"),
    ]
    mc = results["machine"]
    markdown = "\n".join(
        [
            f"# plan against the real run: {len(names)} exports x {args.backends}, {args.sample}-chunk samples",
            "",
            f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['when']}. Chunk size {args.chunk_size}, "
            f"max length {args.max_length}. Seconds leave the engine's loading out on both sides.",
            "Exports: " + "; ".join(f"{n}: {EXPORTS[n][0]}" for n in names) + ".",
            "",
            markdown_table([_shown(r) for r in rows], columns),
            "",
            f"Target: every real run inside the range and within ±{TARGET_ERROR:.0%} of the point: "
            f"{'met' if met else 'NOT met'} ({sum(r['met'] for r in rows)} of {len(rows)} rows).",
        ]
        + [f"\n## {key}\n\n```\n{format_plan(plan)}\n```" for key, plan in plans.items()]
    )
    write_result("bench-plan", "plan", results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
