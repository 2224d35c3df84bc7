"""What watching costs: the memory monitor on a vLLM run, and vLLM's own stats, each side by side in one process.

    python -m apiana_lab.bench.monitor [--chunks 32] [--max-tokens 128] [--repeats 3] [--interval 0.5] [--quick]
    python -m apiana_lab.bench.monitor --stats-cost [...]

The monitor: one engine with stats on (so only the monitor differs) and prefix caching off
(the same prompts run many times), the same chunks run with and without a MemoryMonitor
sampling every `--interval` seconds, in alternating order (off/on, then on/off, ...) to
average out a busy machine's drift. Reports the throughput ratio per pair and overall, and
the sampler's own time per sample. Target: under 2% of throughput.

--stats-cost: vLLM with stats off against stats on, fresh engines one after another in the
same alternating order (stats are an engine setting).

Writes results/bench-monitor/monitor.json and .md (stats.*; *-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys

from apiana_lab.experiments.engine import loaded
from apiana_lab.experiments.measure import measure, workload_chunks
from apiana_lab.experiments.record import machine, markdown_table, write_result

logger = logging.getLogger("apiana_lab.bench.monitor")
TARGET_MAX_COST = 0.02  # the monitor may cost at most 2% of throughput


def make_transform(provider, n: int, max_tokens: int):
    """The whole list in one batch, a fixed output length: identical work in every run."""
    from apiana_lab.summarize import ParallelSummarizerTransform

    transform = ParallelSummarizerTransform(provider, max_workers=1, batch_size=n, max_length=max_tokens)
    transform.options = transform.options.replace(ignore_eos=True)
    return transform


def timed_run(transform, chunks: list, monitor=None) -> dict:
    """One run of the transform over the chunks (the lab's `measure`), with a monitor sampling around it or not."""
    if monitor is not None:
        with monitor:
            row, _ = measure(transform, chunks, monitor=monitor)
    else:
        row, _ = measure(transform, chunks)
    if row["failed"]:
        raise RuntimeError(
            f"{row['failed']} of {row['chunks']} chunks failed ({row['failures_by_reason']}: "
            f"{row.get('first_failure')}); the comparison needs identical work"
        )
    out = {key: row[key] for key in ("wall_s", "completion_tokens", "completion_tokens_per_s", "load_1m")}
    if monitor is not None:
        samples = monitor.to_pandas()
        out["samples"] = len(samples)
        out["mean_sample_ms"] = float(samples["sample_ms"].mean())
        out["mean_sample_cpu_ms"] = float(samples["sample_cpu_ms"].mean())
        out["kv_cache_pct_peak"] = float(samples["kv_cache_pct"].max()) if "kv_cache_pct" in samples else None
    return out


def pairs(repeats: int, a: str, b: str) -> list[tuple[str, str]]:
    """(a, b), (b, a), (a, b), ...: whichever runs second in a pair alternates."""
    return [(a, b) if r % 2 == 0 else (b, a) for r in range(repeats)]


def summarize_pairs(rows: list[dict], base: str, other: str) -> dict:
    """Per-pair throughput ratios other/base, their mean and spread, and the cost (1 - mean ratio)."""
    ratios = []
    for r in sorted({row["pair"] for row in rows}):
        by = {row["config"]: row for row in rows if row["pair"] == r}
        ratios.append(by[other]["completion_tokens_per_s"] / by[base]["completion_tokens_per_s"])
    mean = statistics.fmean(ratios)
    return {
        "ratios": [round(x, 4) for x in ratios],
        "mean_ratio": round(mean, 4),
        "min_ratio": round(min(ratios), 4),
        "max_ratio": round(max(ratios), 4),
        "cost": round(1 - mean, 4),
    }


def monitor_cost(model, chunks: list, max_tokens: int, repeats: int, interval: float, rows: list, checkpoint) -> dict:
    """The same chunks with and without the monitor, on one engine with stats on."""
    from apiana_lab.monitor import MemoryMonitor

    facts: dict = {}
    with loaded("vllm", model, stats=True, facts=facts) as provider:
        transform = make_transform(provider, len(chunks), max_tokens)
        timed_run(transform, chunks)  # warm-up: first-run allocations are not throughput
        for r, order in enumerate(pairs(repeats, "without monitor", "with monitor")):
            for config in order:
                monitor = MemoryMonitor(provider, interval=interval) if config == "with monitor" else None
                row = {"pair": r, "config": config, **timed_run(transform, chunks, monitor)}
                rows.append(row)
                print(
                    f"  pair {r} {config:<16} {row['wall_s']:7.2f} s {row['completion_tokens_per_s']:8.1f} tok/s",
                    file=sys.stderr,
                    flush=True,
                )
                checkpoint()
    return {"load_s": round(facts["load_s"], 1)}


def stats_cost(model, chunks: list, max_tokens: int, repeats: int, rows: list, checkpoint) -> dict:
    """Fresh engines with stats off and on, alternating, each measured after a warm-up run."""
    loads = []
    for r, order in enumerate(pairs(repeats, "stats off", "stats on")):
        for config in order:
            facts: dict = {}
            with loaded("vllm", model, stats=config == "stats on", facts=facts) as provider:
                loads.append(facts["load_s"])
                transform = make_transform(provider, len(chunks), max_tokens)
                timed_run(transform, chunks)  # warm-up
                row = {"pair": r, "config": config, **timed_run(transform, chunks)}
            rows.append(row)
            print(
                f"  pair {r} {config:<10} {row['wall_s']:7.2f} s {row['completion_tokens_per_s']:8.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )
            checkpoint()
    return {"load_s": [round(x, 1) for x in loads]}


def render_markdown(results: dict) -> str:
    """The figures as a short markdown report."""
    s, m = results["settings"], results["machine"]
    columns = [
        ("pair", "pair"),
        ("config", "configuration"),
        ("wall_s", "wall s"),
        ("completion_tokens", "new tokens"),
        ("completion_tokens_per_s", "new tok/s"),
        ("mean_sample_ms", "ms per sample (wall)"),
        ("mean_sample_cpu_ms", "ms per sample (CPU)"),
        ("load_1m", "load 1m"),
    ]
    what = (
        "vLLM stats off vs on (fresh engines)"
        if s["stats_cost"]
        else f"the memory monitor (every {s['interval_s']} s) vs none"
    )
    parts = [
        f"# Cost of watching: {what}\n",
        f"{m['cores']} cores ({m['cpu']}); bundled SmolLM2-135M-Instruct in vLLM, prefix caching off; "
        f"{s['chunks']} chunks of {s['chunk_tokens'][0]}-{s['chunk_tokens'][1]} tokens, {s['max_tokens']} new tokens "
        f"forced, all in one batch; {s['repeats']} pairs in alternating order.\n",
    ]
    if not results["complete"]:
        parts.append("**Partial results: the run has not finished (or was cut short).**\n")
    parts.append(markdown_table(results["rows"], columns) + "\n")
    summary = results.get("summary")
    if summary:
        parts.append(
            f"Throughput ratio per pair: {summary['ratios']}; mean {summary['mean_ratio']} "
            f"(range {summary['min_ratio']}-{summary['max_ratio']}), so a cost of {summary['cost']:.1%}.\n"
        )
        if not s["stats_cost"]:
            verdict = "met" if summary["cost"] < TARGET_MAX_COST else "NOT met"
            parts.append(
                f"Target: cost under {TARGET_MAX_COST:.0%}: {verdict}. The sampler's own time: "
                f"{summary['mean_sample_cpu_ms']:.2f} ms of CPU ({summary['mean_sample_ms']:.1f} ms wall) per "
                f"sample every {s['interval_s']} s, {summary['sampler_cpu_share']:.2%} of one core.\n"
            )
    return "\n".join(parts)


def save(results: dict, stem: str) -> str:
    """Work out the ratios from the pairs measured so far and write both files."""
    base, other = (
        ("stats off", "stats on") if results["settings"]["stats_cost"] else ("without monitor", "with monitor")
    )
    complete_pairs = [
        r for r in {row["pair"] for row in results["rows"]} if sum(row["pair"] == r for row in results["rows"]) == 2
    ]
    rows = [row for row in results["rows"] if row["pair"] in complete_pairs]
    if rows:
        results["summary"] = summarize_pairs(rows, base, other)
        if not results["settings"]["stats_cost"]:
            watched = [row for row in rows if row["config"] == other]
            cpu_ms = statistics.fmean(row["mean_sample_cpu_ms"] for row in watched)
            results["summary"]["mean_sample_ms"] = round(statistics.fmean(row["mean_sample_ms"] for row in watched), 3)
            results["summary"]["mean_sample_cpu_ms"] = round(cpu_ms, 3)
            # CPU time, not wall: on a busy machine the wall time mostly waits for a core or the GIL.
            results["summary"]["sampler_cpu_share"] = round(cpu_ms / 1e3 / results["settings"]["interval_s"], 5)
            results["summary"]["target_max_cost"] = TARGET_MAX_COST
            results["summary"]["met"] = results["summary"]["cost"] < TARGET_MAX_COST
    markdown = render_markdown(results)
    write_result("bench-monitor", stem, results, markdown)
    return markdown


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=32, help="chunks per run, all in one batch")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per chunk (forced)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs, in alternating order")
    parser.add_argument("--interval", type=float, default=0.5, help="the monitor's sampling interval, seconds")
    parser.add_argument(
        "--stats-cost", action="store_true", help="measure vLLM's stats (fresh engines) instead of the monitor"
    )
    parser.add_argument("--model", default=None, help="a local HF folder (default: the bundled model)")
    parser.add_argument("--quick", action="store_true", help="4 chunks, 16 new tokens, 1 pair: checks the script works")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    n, max_tokens, repeats = (4, 16, 1) if args.quick else (args.chunks, args.max_tokens, args.repeats)
    # Real-length chunks (about 1,000-1,400 tokens), as a summarization run sends them.
    chunks, _ = workload_chunks(n)
    stem = ("stats" if args.stats_cost else "monitor") + ("-quick" if args.quick else "")
    results = {
        "benchmark": "monitor",
        "complete": False,
        "machine": machine(),
        "settings": {
            "chunks": n,
            "max_tokens": max_tokens,
            "repeats": repeats,
            "interval_s": args.interval,
            "stats_cost": args.stats_cost,
            "quick": args.quick,
            "model": args.model or "bundled",
            "chunk_tokens": [min(c.token_count for c in chunks), max(c.token_count for c in chunks)],
        },
        "rows": [],
    }
    checkpoint = lambda: save(results, stem)  # noqa: E731  a run cut short still leaves its figures
    if args.stats_cost:
        results["engine"] = stats_cost(args.model, chunks, max_tokens, repeats, results["rows"], checkpoint)
    else:
        results["engine"] = monitor_cost(
            args.model, chunks, max_tokens, repeats, args.interval, results["rows"], checkpoint
        )
    results["complete"] = True
    markdown = save(results, stem)
    print(markdown)
    print(f"wrote results/bench-monitor/{stem}.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    # vLLM starts its engine in a spawned process, which re-imports this module: keep the work behind the guard.
    main()
