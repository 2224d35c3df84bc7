"""Sequential vs parallel summarization, side by side in one process, on the bundled model.

    python -m apiana_lab.bench.summarize [--chunks 32] [--quick]

Configurations: sequential transformers (the baseline), parallel transformers, parallel vLLM,
and the orchestration alone over a zero-latency fake provider. Workloads: (a) real-length
chunks of a synthetic export with their natural summary lengths, (b) short prompts with a
forced number of new tokens. Also measures vLLM's prefill rate against this CPU's matmul
rate. Writes results/bench-summarize/summarize.json and .md (summarize-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import sys
import time

from apiana_lab.experiments.engine import loaded
from apiana_lab.experiments.measure import SHORT_SYSTEM, SHORT_TEMPLATE, sweep, workload_chunks
from apiana_lab.experiments.record import machine, markdown_table, write_result

logger = logging.getLogger("apiana_lab.bench.summarize")

TARGETS = {
    ("a", "vllm parallel"): 3.0,
    ("b", "vllm parallel"): 8.0,
    ("b", "transformers parallel"): 3.0,
}
TARGET_ORCHESTRATION_CHUNKS_PER_S = 5000.0


def matmul_rate(n: int, dtype_name: str, seconds: float = 1.0) -> float:
    """GFLOP/s of an n x n @ n x n torch matmul in this process, repeated for about `seconds`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm-up: first call picks kernels and allocates
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def shaped_matmul_rate(m: int, k: int, n: int, dtype_name: str, seconds: float = 1.0) -> float:
    """GFLOP/s of an (m x k) @ (k x n) matmul: the shape of a prefill projection, not a square."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.matmul(a, b)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def cpu_limits(n: int) -> dict:
    """Measured matmul rates of this CPU, in GFLOP/s."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        f"fp32_{n}x{n}": round(matmul_rate(n, "float32"), 1),
        f"bf16_{n}x{n}": round(matmul_rate(n, "bfloat16"), 1),
        # SmolLM2's MLP up-projection over a 4096-token batch: hidden 576 -> 1536.
        "bf16_4096x576x1536": round(shaped_matmul_rate(4096, 576, 1536, "bfloat16"), 1),
    }


def echo(row: dict) -> None:
    """One measured configuration, on stderr as it goes."""
    print(
        f"  [{row['workload']}] {row['config']:<28} {row['wall_s']:8.1f} s  {row['completion_tokens']:6d} new tokens  "
        f"{row['completion_tokens_per_s']:7.1f} tok/s  {row['failed']} failed",
        file=sys.stderr,
        flush=True,
    )


def transforms(provider, n: int, max_tokens: int, prompts: dict, engine: str) -> list[tuple[str, object]]:
    """The configurations to compare on one engine, with the same prompts and max_tokens."""
    from apiana_lab.summarize import ParallelSummarizerTransform, SummarizerTransform

    if engine == "transformers":
        return [
            ("transformers sequential", SummarizerTransform(provider, max_length=max_tokens, **prompts)),
            (
                "transformers parallel",
                ParallelSummarizerTransform(
                    provider, max_workers=1, batch_size=min(n, 32), max_length=max_tokens, **prompts
                ),
            ),
        ]
    return [
        (
            "vllm parallel",
            ParallelSummarizerTransform(provider, max_workers=1, batch_size=n, max_length=max_tokens, **prompts),
        )
    ]


def engine_facts(provider, engine: str) -> dict:
    """What decides the figures of this engine: dtype, and the model's size (transformers) or context (vLLM)."""
    if engine == "transformers":
        model = provider.models[0]
        cfg = model.config
        return {
            "dtype": str(provider.dtype),
            "n_params": sum(p.numel() for p in model.parameters()),
            "embedding_params": model.get_input_embeddings().weight.numel(),
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
        }
    return {
        "dtype": str(provider.llm.llm_engine.model_config.dtype),
        "max_model_len": provider.max_context,
        "VLLM_CPU_KVCACHE_SPACE_GiB": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
    }


def run_engine(engine: str, workloads: dict, n: int, rows: list, facts: dict, checkpoint=lambda: None) -> None:
    """Load one engine, run every configuration of it on both workloads, then free it.

    `checkpoint` is called after each measurement, so a run cut short still leaves its figures.
    """
    timing: dict = {}
    with loaded(engine, facts=timing) as provider:
        facts["load_s"] = round(timing["load_s"], 1)
        facts.update(engine_facts(provider, engine))
        for name, (chunks, max_tokens, prompts, force) in workloads.items():
            configs = transforms(provider, n, max_tokens, prompts, engine)
            for _, transform in configs:
                if force:
                    transform.options = transform.options.replace(ignore_eos=True)
            sweep(configs, chunks, workload=name, rows=rows, on_row=lambda row: (echo(row), checkpoint()))
        if engine == "vllm":
            # Prefill alone: the same (a) prompts with one new token.
            chunks, _, prompts, _ = workloads["a"]
            _, transform = transforms(provider, n, 1, prompts, engine)[0]
            sweep(
                [("vllm prefill (max_tokens=1)", transform)],
                chunks,
                workload="a",
                rows=rows,
                on_row=lambda row: (echo(row), checkpoint()),
            )


def orchestration(n: int, short_chunks: list, batch_size: int, max_workers: int) -> dict:
    """ParallelSummarizerTransform over FakeProvider(latency=0): the cost of the orchestration itself."""
    from apiana_lab.providers.fake import FakeProvider
    from apiana_lab.summarize import ParallelSummarizerTransform

    chunks = [
        dataclasses.replace(short_chunks[i % len(short_chunks)], id=f"orchestration-{i}", index=i) for i in range(n)
    ]
    transform = ParallelSummarizerTransform(
        FakeProvider(latency=0), max_workers=max_workers, batch_size=batch_size, max_length=128
    )
    gc.collect()
    start = time.perf_counter()
    done = sum(1 for _, record in transform.run(chunks) if record.error is None)
    wall = time.perf_counter() - start
    figures = transform.stats.figures()
    return {
        "chunks": n,
        "done": done,
        "batch_size": batch_size,
        "max_workers": max_workers,
        "wall_s": round(wall, 3),
        "chunks_per_s": round(n / wall, 1),
        "provider_seconds": figures["provider_seconds"],
        "orchestration_seconds": figures["orchestration_seconds"],
    }


def add_ratios(rows: list[dict]) -> dict:
    """Speed-up of each configuration over sequential transformers on the same chunks, and the targets."""
    targets = {}
    for workload in ("a", "b"):
        base = next((r for r in rows if r["workload"] == workload and r["config"] == "transformers sequential"), None)
        for row in rows:
            if row["workload"] != workload or base is None:
                continue
            row["speedup_wall"] = base["wall_s"] / row["wall_s"]
            row["speedup_completion_tokens_per_s"] = row["completion_tokens_per_s"] / base["completion_tokens_per_s"]
            target = TARGETS.get((workload, row["config"]))
            if target is not None:
                row["target_speedup"] = target
                targets[f"{workload}: {row['config']}"] = {
                    "target_min": target,
                    "measured": round(row["speedup_wall"], 2),
                    "met": row["speedup_wall"] >= target,
                }
    return targets


def prefill_figures(rows: list[dict], facts: dict, limits: dict) -> dict:
    """Prefill FLOP/s of vLLM on the (a) prompts, against the measured matmul rates."""
    row = next((r for r in rows if r["config"].startswith("vllm prefill")), None)
    if row is None or "n_params" not in facts or not limits:
        return {}
    n_params, tokens, seconds = facts["n_params"], row["prompt_tokens"], row["wall_s"]
    non_embedding = n_params - facts["embedding_params"]
    # Attention scores and weighted sums: 2 * T^2 * hidden per layer with the causal half; T per prompt.
    per_prompt = tokens / max(1, row["chunks"])
    attention = 2 * facts["layers"] * facts["hidden"] * per_prompt**2 * row["chunks"]
    simple = 2 * n_params * tokens / seconds / 1e9
    matmul_work = (2 * non_embedding * tokens + attention) / seconds / 1e9
    best_bf16 = max(v for k, v in limits.items() if k.startswith("bf16"))
    return {
        "prompt_tokens": tokens,
        "seconds": round(seconds, 2),
        "prompt_tokens_per_s": round(tokens / seconds, 1),
        "n_params": n_params,
        "gflops_2_n_params_T": round(simple, 1),
        "gflops_non_embedding_plus_attention": round(matmul_work, 1),
        "best_bf16_matmul_gflops": best_bf16,
        "fraction_of_bf16_matmul_2NT": round(simple / best_bf16, 3),
        "fraction_of_bf16_matmul_strict": round(matmul_work / best_bf16, 3),
    }


def render_markdown(results: dict) -> str:
    """The figures as a short markdown report."""
    s, engines = results["settings"], results["engines"]
    columns = [
        ("config", "configuration"),
        ("chunks", "chunks"),
        ("wall_s", "wall s"),
        ("prompt_tokens", "prompt tokens"),
        ("completion_tokens", "completion tokens"),
        ("completion_tokens_per_s", "completion tok/s"),
        ("chunks_per_s", "chunks/s"),
        ("speedup_wall", "× sequential (wall)"),
        ("target_speedup", "target ×"),
        ("load_1m", "load 1m"),
    ]
    parts = [
        f"# Summarization throughput, {results['machine']['cores']} cores ({results['machine']['cpu']})\n",
        f"Bundled SmolLM2-135M-Instruct; transformers {engines['transformers'].get('dtype')}, "
        f"vLLM {engines['vllm'].get('dtype')}. Ratios are measured in this one run.\n",
    ]
    if not results["complete"]:
        parts.append("**Partial results: the run has not finished (or was cut short).**\n")
    for key, title in (
        ("a", f"(a) real-length chunks, max_tokens {s['max_tokens_a']}, natural lengths"),
        ("b", f"(b) short prompts, {s['max_tokens_b']} new tokens forced ({s['forced_length']})"),
    ):
        parts.append(
            f"## {title}\n\n" + markdown_table([r for r in results["rows"] if r["workload"] == key], columns) + "\n"
        )
    p, lim = results.get("prefill"), results.get("cpu_matmul_gflops")
    if p:
        parts.append(
            f"## Prefill against the CPU's limit\n\nvLLM prefill of the (a) prompts: {p['prompt_tokens']:,} tokens in "
            f"{p['seconds']} s = {p['prompt_tokens_per_s']:,} tokens/s, {p['gflops_2_n_params_T']} GFLOP/s by 2·N·T "
            f"({p['gflops_non_embedding_plus_attention']} GFLOP/s counting non-embedding weights plus attention).\n"
            f"Matmul rates measured in this run (GFLOP/s): {lim}.\n"
            f"Prefill reaches {p['fraction_of_bf16_matmul_2NT']:.0%} (2·N·T) / "
            f"{p['fraction_of_bf16_matmul_strict']:.0%} "
            f"(strict) of the best bf16 matmul rate.\n"
        )
    if results.get("orchestration"):
        parts.append(
            "## Orchestration alone (FakeProvider, latency 0)\n\n"
            + "\n".join(
                f"- {r['chunks']:,} chunks, batch {r['batch_size']}, {r['max_workers']} workers: "
                f"{r['chunks_per_s']:,} chunks/s "
                f"({r['wall_s']} s; provider {r['provider_seconds']} s)"
                for r in results["orchestration"]
            )
            + "\n"
        )
    parts.append(
        "## Targets\n\n"
        + "\n".join(
            f"- {k}: {v['measured']} (target ≥ {v['target_min']}) {'met' if v['met'] else 'NOT met'}"
            for k, v in results["targets"].items()
        )
        + "\n"
    )
    return "\n".join(parts)


def save(results: dict, stem: str) -> str:
    """Work out ratios, targets and prefill figures from what is measured so far, and write both files."""
    results["targets"] = add_ratios(results["rows"])
    if results.get("orchestration"):
        best = max(o["chunks_per_s"] for o in results["orchestration"])
        results["targets"]["orchestration chunks/s"] = {
            "target_min": TARGET_ORCHESTRATION_CHUNKS_PER_S,
            "measured": best,
            "met": best >= TARGET_ORCHESTRATION_CHUNKS_PER_S,
        }
    results["prefill"] = prefill_figures(
        results["rows"], results["engines"]["transformers"], results.get("cpu_matmul_gflops")
    )
    markdown = render_markdown(results)
    write_result("bench-summarize", stem, results, markdown)
    return markdown


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=32, help="chunks per workload (at least 32 for the full run)")
    parser.add_argument("--quick", action="store_true", help="4 chunks, 16 new tokens: checks the script works")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    n = 4 if args.quick else max(32, args.chunks)
    max_a, max_b = (16, 16) if args.quick else (128, 256)
    orchestration_chunks = 2000 if args.quick else 20000
    matmul_n = 1024 if args.quick else 2048

    stem = "summarize-quick" if args.quick else "summarize"
    results = {
        "benchmark": "summarize",
        "complete": False,
        "machine": machine(),
        "settings": {
            "chunks": n,
            "max_tokens_a": max_a,
            "max_tokens_b": max_b,
            "quick": args.quick,
            "forced_length": "GenerationOptions(ignore_eos=True): vLLM SamplingParams.ignore_eos, "
            "transformers min_new_tokens",
        },
        "engines": {"transformers": {}, "vllm": {}},
        "rows": [],
    }
    print(f"measuring matmul rates ({matmul_n}x{matmul_n})", file=sys.stderr, flush=True)
    limits_before = cpu_limits(matmul_n)
    results["cpu_matmul_gflops"] = limits_before

    real, short = workload_chunks(n)
    workloads = {
        "a": (real, max_a, {}, False),  # the project's own prompts, stopping at EOS as in a real run
        "b": (short, max_b, {"system_prompt": SHORT_SYSTEM, "user_template": SHORT_TEMPLATE}, True),
    }
    results["settings"]["chunk_token_counts"] = {
        "a": [min(c.token_count for c in real), max(c.token_count for c in real)],
        "b": [min(c.token_count for c in short), max(c.token_count for c in short)],
    }

    print("orchestration alone", file=sys.stderr, flush=True)
    results["orchestration"] = [
        orchestration(orchestration_chunks, short, batch_size=16, max_workers=2),  # the class defaults
        orchestration(orchestration_chunks, short, batch_size=256, max_workers=1),
    ]
    for engine in ("transformers", "vllm"):
        print(f"{engine}: loading", file=sys.stderr, flush=True)
        run_engine(
            engine, workloads, n, results["rows"], results["engines"][engine], checkpoint=lambda: save(results, stem)
        )

    limits_after = cpu_limits(matmul_n)
    # The machine is shared: take the better of two measurements as the CPU's rate.
    results["cpu_matmul_gflops"] = {k: max(v, limits_after[k]) for k, v in limits_before.items()}
    results["cpu_matmul_gflops_runs"] = [limits_before, limits_after]
    results["complete"] = True
    markdown = save(results, stem)
    print(markdown)
    print(f"wrote results/bench-summarize/{stem}.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    # vLLM starts its engine in a spawned process, which re-imports this module: keep the work behind the guard.
    main()
