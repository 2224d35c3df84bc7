"""How large the in-flight window of `VLLMProvider.stream` must be to keep vLLM at its ceiling.

    python -m apiana_lab.bench.vllm_window [--slots 8] [--chunks 64] [--max-tokens 128] [--quick]

One engine with `max_num_seqs` shrunk to `--slots`, so that a window of a few times the slots
is cheap to measure on a CPU (the default, 256 slots, would need thousands of prompts). Short
prompts with natural summary lengths: sequences finish at different steps, and each finished
slot must be refilled. The ceiling is `vllm.LLM.generate` with every prompt at once (through
`complete_batch`); each window runs `stream` over the same prompts. With vLLM's benchmark options
prefix caching is off, so no run reuses another's prefill. Writes results/bench-vllm-window/window.json and .md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from apiana_lab.experiments.engine import loaded
from apiana_lab.experiments.measure import SHORT_SYSTEM, SHORT_TEMPLATE, clock, sweep, workload_chunks
from apiana_lab.experiments.record import machine, markdown_table, write_result

logger = logging.getLogger("apiana_lab.bench.vllm_window")

MULTIPLES = (0.5, 1, 2, 4)  # windows, in engine slots


def run(provider, prompts: list, options, window: int | None) -> dict:
    """The ceiling (window None: every prompt at once) or one stream with this window."""
    with clock(provider) as timed:
        if window is None:
            results = provider.complete_batch(prompts, options)
            first = time.perf_counter() - timed.start  # a batch returns everything at once
        else:
            results, first = [], None
            for _, completion in provider.stream(((str(i), p) for i, p in enumerate(prompts)), options, window=window):
                first = first if first is not None else time.perf_counter() - timed.start
                results.append(completion)
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]}")
    tokens = sum(r.completion_tokens for r in results)
    return {
        "config": "ceiling: generate(all)" if window is None else f"stream, window {window}",
        "window": window,
        "wall_s": timed.wall_s,
        "first_result_s": first,
        "completion_tokens": tokens,
        "completion_tokens_per_s": tokens / timed.wall_s,
        "load_1m": timed.load_1m,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=8, help="the engine's max_num_seqs for this measurement")
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="passes over all configurations, interleaved")
    parser.add_argument("--quick", action="store_true", help="2 slots, 6 prompts, 8 new tokens, one pass")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from apiana_lab.providers import GenerationOptions
    from apiana_lab.summarize import SummarizerTransform

    slots, n, max_tokens, repeats = (
        (2, 6, 8, 1) if args.quick else (args.slots, args.chunks, args.max_tokens, args.repeats)
    )
    windows = [None] + sorted({max(1, int(m * slots)) for m in MULTIPLES})
    _, short = workload_chunks(n)
    stem = "window-quick" if args.quick else "window"
    with loaded("vllm", max_model_len=2048, max_num_seqs=slots) as provider:
        results = {
            "benchmark": "vllm_window",
            "complete": False,
            "machine": machine(),
            "settings": {
                "slots": slots,
                "chunks": n,
                "max_tokens": max_tokens,
                "repeats": repeats,
                "dtype": str(provider.llm.llm_engine.model_config.dtype),
            },
            "rows": [],
        }
        short_prompts = SummarizerTransform(provider, system_prompt=SHORT_SYSTEM, user_template=SHORT_TEMPLATE)
        prompts = [short_prompts.prompt(c) for c in short]
        options = GenerationOptions(max_tokens=max_tokens)

        def echo(row: dict) -> None:
            print(
                f"  pass {row['pass']} {row['config']:<24} {row['wall_s']:6.1f} s  "
                f"{row['completion_tokens_per_s']:6.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )
            write_result("bench-vllm-window", stem, results, render_markdown(results))

        points = [
            (f"window {w}", lambda w=w: run(provider, prompts, options, w), {"pass": r + 1})
            for r in range(repeats)
            for w in windows
        ]
        sweep(points, rows=results["rows"], on_row=echo)
    results["summary"] = summarize(results["rows"], slots)
    results["complete"] = True
    markdown = render_markdown(results)
    write_result("bench-vllm-window", stem, results, markdown)
    print(markdown)
    return results


def summarize(rows: list[dict], slots: int) -> list[dict]:
    """Per configuration: best tokens/s over the passes, against the best ceiling pass."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["config"] not in best or row["completion_tokens_per_s"] > best[row["config"]]["completion_tokens_per_s"]:
            best[row["config"]] = row
    ceiling = max(r["completion_tokens_per_s"] for r in rows if r["window"] is None)
    return [
        {
            "config": c,
            "window_in_slots": "" if r["window"] is None else r["window"] / slots,
            "best_tokens_per_s": r["completion_tokens_per_s"],
            "x_ceiling": r["completion_tokens_per_s"] / ceiling,
            "first_result_s": r["first_result_s"],
        }
        for c, r in best.items()
    ]


def render_markdown(results: dict) -> str:
    """The window sweep as a short markdown report."""
    s = results["settings"]
    parts = [
        f"# vLLM stream window, {results['machine']['cores']} cores ({results['machine']['cpu']})\n",
        f"Engine with max_num_seqs={s['slots']} ({s['dtype']}), {s['chunks']} short prompts, up to {s['max_tokens']} "
        "new tokens at natural lengths, prefix caching off. Ratios are measured in this one run.\n",
    ]
    if not results["complete"]:
        parts.append("**Partial results: the run has not finished (or was cut short).**\n")
    if results.get("summary"):
        parts.append(
            "## Best pass per configuration\n\n"
            + markdown_table(
                results["summary"],
                [
                    ("config", "configuration"),
                    ("window_in_slots", "window / slots"),
                    ("best_tokens_per_s", "output tok/s"),
                    ("x_ceiling", "× ceiling"),
                    ("first_result_s", "first result s"),
                ],
            )
            + "\n"
        )
    parts.append(
        "## Every pass\n\n"
        + markdown_table(
            results["rows"],
            [
                ("pass", "pass"),
                ("config", "configuration"),
                ("wall_s", "wall s"),
                ("completion_tokens", "new tokens"),
                ("completion_tokens_per_s", "output tok/s"),
                ("first_result_s", "first result s"),
                ("load_1m", "load 1m"),
            ],
        )
        + "\n"
    )
    return "\n".join(parts)


if __name__ == "__main__":
    # vLLM starts its engine in a spawned process, which re-imports this module: keep the work behind the guard.
    main()
