"""Transformers: one prompt at a time against micro-batches under several token budgets.

    python -m apiana_lab.bench.transformers_batching [--chunks 32] [--budgets 4096,default,0] [--quick]

Workloads as in `apiana_lab.bench.summarize`: (a) real-length chunks (1,000-1,400 prompt
tokens) with up to 128 new tokens at their natural lengths, (b) short prompts with 256 new
tokens forced. For each, one model in one process runs the prompts one at a time (the
sequential baseline), then `complete_batch` over all of them under each budget
(`max_batch_tokens`; 0 means unbounded, one batch). Wall and process CPU seconds are both
kept: on a shared machine the CPU seconds say more about the work, the wall seconds about
what a user waits. Writes results/bench-transformers/batching.json and .md
(batching-quick.* with --quick).
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

logger = logging.getLogger("apiana_lab.bench.transformers_batching")

TARGETS = {"a": 0.95, "b": 3.0}  # default budget against sequential, output tokens/s (issue #8)


def run_config(provider, prompts: list, options, budget: int | None) -> tuple[dict, list[str]]:
    """One configuration over all prompts (budget None: one prompt at a time): its figures and texts."""
    from apiana_lab.providers.transformers_backend import micro_batches

    with clock(provider) as timed:
        cpu = time.process_time()
        if budget is None:
            results = [provider.complete(p, options) for p in prompts]
            shapes = [1] * len(prompts)
        else:
            provider.max_batch_tokens = budget or 10**12
            results = provider.complete_batch(prompts, options)
            lengths = sorted((r.prompt_tokens for r in results), reverse=True)
            shapes = [len(g) for g in micro_batches(lengths, options.max_tokens, provider.max_batch_tokens)]
        cpu = time.process_time() - cpu
    wall = timed.wall_s
    tokens = sum(r.completion_tokens for r in results)
    return {
        "budget": "sequential" if budget is None else ("unbounded" if budget == 0 else budget),
        "wall_s": wall,
        "cpu_s": cpu,
        "completion_tokens": tokens,
        "completion_tokens_per_s": tokens / wall,
        "completion_tokens_per_cpu_s": tokens / cpu,
        "micro_batches": len(shapes),
        "rows": f"{max(shapes)}-{min(shapes)}" if len(set(shapes)) > 1 else str(shapes[0]),
        "load_1m": timed.load_1m,
    }, [r.text for r in results]


def sweep_budgets(provider, name: str, prompts: list, options, budgets: list[int], rows: list, checkpoint) -> None:
    """Sequential first, then every budget, on the same prompts; ratios against sequential."""
    base: dict = {}

    def point(budget):
        row, texts = run_config(provider, prompts, options, budget)
        if budget is None:
            base.update(row=row, texts=texts)
            return {
                **row,
                "workload": name,
                "x_sequential_wall": 1.0,
                "x_sequential_cpu": 1.0,
                "same_texts": len(prompts),
            }
        first = base["row"]
        return {
            **row,
            "workload": name,
            "x_sequential_wall": row["completion_tokens_per_s"] / first["completion_tokens_per_s"],
            "x_sequential_cpu": row["completion_tokens_per_cpu_s"] / first["completion_tokens_per_cpu_s"],
            "same_texts": sum(a == b for a, b in zip(texts, base["texts"])),
        }

    points = [(str(b), lambda b=b: point(b)) for b in [None, *budgets]]
    sweep(points, rows=rows, on_row=lambda row: (_log(row), checkpoint()))


def _log(row: dict) -> None:
    print(
        f"  [{row['workload']}] {str(row['budget']):>10}  {row['wall_s']:7.1f} s wall {row['cpu_s']:7.1f} s cpu  "
        f"{row['completion_tokens']:5d} tokens  "
        f"x{row['x_sequential_wall']:.2f} wall x{row['x_sequential_cpu']:.2f} cpu  "
        f"{row['micro_batches']} batches of {row['rows']}",
        file=sys.stderr,
        flush=True,
    )


def render_markdown(results: dict) -> str:
    """The sweep as a short markdown report."""
    s = results["settings"]
    columns = [
        ("budget", "max_batch_tokens"),
        ("micro_batches", "micro-batches"),
        ("rows", "rows"),
        ("wall_s", "wall s"),
        ("cpu_s", "cpu s"),
        ("completion_tokens", "new tokens"),
        ("completion_tokens_per_s", "tok/s"),
        ("x_sequential_wall", "× seq (wall)"),
        ("x_sequential_cpu", "× seq (cpu)"),
        ("same_texts", "same text as seq"),
        ("load_1m", "load 1m"),
    ]
    parts = [
        f"# Transformers micro-batching, {results['machine']['cores']} cores ({results['machine']['cpu']})\n",
        f"{results['model']} on {results['device']} ({results['dtype']}, {results['torch_threads']} torch threads); "
        f"default budget here: "
        f"{results['default_max_batch_tokens']:,} padded tokens (rows × (longest prompt + max_tokens)). "
        "Ratios are output tokens/s against one prompt at a time, measured in this one run.\n",
    ]
    if not results["complete"]:
        parts.append("**Partial results: the run has not finished (or was cut short).**\n")
    for key, title in (
        ("a", f"(a) real-length chunks, max_tokens {s['max_tokens_a']}, natural lengths"),
        ("b", f"(b) short prompts, {s['max_tokens_b']} new tokens forced"),
    ):
        parts.append(
            f"## {title}\n\n" + markdown_table([r for r in results["rows"] if r["workload"] == key], columns) + "\n"
        )
    parts.append(
        "## Targets (default budget)\n\n"
        + "\n".join(
            f"- {k}: × {v['measured']:.2f} wall (target ≥ {v['target_min']}) {'met' if v['met'] else 'NOT met'}"
            for k, v in results.get("targets", {}).items()
        )
        + "\n"
    )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=32, help="prompts per workload (one complete_batch call)")
    parser.add_argument(
        "--budgets",
        default="4096,8192,default,16384,0",
        help="comma-separated max_batch_tokens to compare; 'default' is the device's, 0 is unbounded",
    )
    parser.add_argument("--max-tokens-a", type=int, default=128)
    parser.add_argument("--max-tokens-b", type=int, default=256)
    parser.add_argument("--workloads", default="a,b")
    parser.add_argument("--model", default=None, help="local model folder (default: the bundled SmolLM2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load-format", default="auto", help="'dummy': random weights of the model's shape")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice). On a busy shared machine use 1: threads that "
        "wait on each other at every op's barrier slow every forward pass down",
    )
    parser.add_argument("--quick", action="store_true", help="3 prompts, 8 new tokens: checks the script works")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from apiana_lab.providers import GenerationOptions
    from apiana_lab.summarize import SummarizerTransform

    if args.threads:
        torch.set_num_threads(args.threads)

    n = 3 if args.quick else args.chunks
    max_a, max_b = (8, 8) if args.quick else (args.max_tokens_a, args.max_tokens_b)
    with loaded(
        "transformers", args.model, dtype=args.dtype, device=args.device, load_format=args.load_format
    ) as provider:
        default = provider.max_batch_tokens
        budgets = [default if b.strip() == "default" else int(b) for b in args.budgets.split(",")]
        stem = ("batching-quick" if args.quick else "batching") + (
            "" if args.workloads == "a,b" else "-" + args.workloads.replace(",", "")
        )
        results = {
            "benchmark": "transformers_batching",
            "complete": False,
            "machine": machine(),
            "model": provider.model,
            "device": provider.devices[0],
            "dtype": str(provider.dtype),
            "default_max_batch_tokens": default,
            "torch_threads": torch.get_num_threads(),
            "settings": {"chunks": n, "max_tokens_a": max_a, "max_tokens_b": max_b, "budgets": budgets},
            "rows": [],
        }

        def checkpoint():
            write_result("bench-transformers", stem, results, render_markdown(results))

        real, short = workload_chunks(n)
        long_prompts = SummarizerTransform(provider)
        short_prompts = SummarizerTransform(provider, system_prompt=SHORT_SYSTEM, user_template=SHORT_TEMPLATE)
        workloads = {
            "a": ([long_prompts.prompt(c) for c in real], GenerationOptions(max_tokens=max_a)),
            "b": ([short_prompts.prompt(c) for c in short], GenerationOptions(max_tokens=max_b, ignore_eos=True)),
        }
        for name in args.workloads.split(","):
            prompts, options = workloads[name]
            print(f"({name}) {len(prompts)} prompts, max_tokens {options.max_tokens}", file=sys.stderr, flush=True)
            sweep_budgets(provider, name, prompts, options, budgets, results["rows"], checkpoint)
    results["targets"] = {
        f"{r['workload']}: default budget": {
            "target_min": TARGETS[r["workload"]],
            "measured": r["x_sequential_wall"],
            "met": r["x_sequential_wall"] >= TARGETS[r["workload"]],
        }
        for r in results["rows"]
        if r["budget"] == default
    }
    results["complete"] = True
    checkpoint()
    markdown = render_markdown(results)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
