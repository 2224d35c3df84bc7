"""Offline vLLM against the same model behind a vLLM OpenAI server, through the openai backend.

    python -m apiana_lab.bench.server [--chunks 64] [--concurrency 1,8,32,64] [--max-tokens 128] [--quick]

Both engines run in this one run, on the same real-length chunks, with the same forced output
length (ignore_eos) and with prefix caching off, since the same prompts run several times.
Offline is measured before and after the server runs and the server rows are compared with the
mean of the two, which bounds the drift of a shared machine. The default is 64 chunks, not 32:
64 requests in flight need at least 64 prompts. Writes results/bench-server/server.json and .md
(server-quick.* with --quick).

The server is started with `apiana_lab.providers.vllm_server.VLLMServer`, as the server tests start it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from apiana_lab.experiments.engine import loaded
from apiana_lab.experiments.measure import sweep
from apiana_lab.experiments.record import machine, markdown_table, write_result
from apiana_lab.providers.vllm_server import VLLMServer

from .summarize import echo

logger = logging.getLogger("apiana_lab.bench.server")

TARGET_RATIO = 0.9  # best server concurrency against offline vLLM, output tokens/s


def measure_offline(provider, chunks: list, max_tokens: int, label: str) -> dict:
    """Offline vLLM through the pipeline's transform, every chunk in flight at once (its window is the chunk count)."""
    from apiana_lab.summarize import ParallelSummarizerTransform

    transform = ParallelSummarizerTransform(
        provider, max_workers=1, batch_size=len(chunks), max_length=max_tokens, ignore_eos=True
    )
    row = sweep([(label, transform)], chunks, workload="a", on_row=echo)[0]
    row["in_flight"] = len(chunks)
    return row


def measure_server(provider, chunks: list, max_tokens: int, concurrency: int) -> dict:
    """The openai backend with `concurrency` requests in flight, the server's own queue sampled meanwhile."""
    from apiana_lab.monitor import MemoryMonitor
    from apiana_lab.summarize import ParallelSummarizerTransform

    transform = ParallelSummarizerTransform(provider, max_workers=concurrency, max_length=max_tokens, ignore_eos=True)
    # The monitor's engine source reads the server's /metrics: how many requests it really ran at once.
    with MemoryMonitor(provider, interval=0.2, gpu=False) as watch:
        row = sweep([(f"server, {concurrency} in flight", transform)], chunks, workload="a", on_row=echo)[0]
    samples = watch.to_pandas()
    row["in_flight"] = min(concurrency, len(chunks))
    for column, key in (("requests_running", "server_running_max"), ("requests_waiting", "server_waiting_max")):
        row[key] = float(samples[column].max()) if column in samples and samples[column].notna().any() else None
    return row


def add_ratios(results: dict) -> None:
    """Each server row against the mean of the offline rows; the target on the best one."""
    rows = results["rows"]
    # A row with failed chunks measured less work, not a slower engine: it is shown but never compared.
    offline = [r["completion_tokens_per_s"] for r in rows if r["config"].startswith("offline") and not r["failed"]]
    server = [r for r in rows if r["config"].startswith("server") and not r["failed"]]
    if not offline:
        return
    base = sum(offline) / len(offline)
    results["offline_completion_tokens_per_s"] = base
    for r in rows:
        r["ratio_to_offline"] = None if r["failed"] else r["completion_tokens_per_s"] / base
    if server:
        best = max(server, key=lambda r: r["completion_tokens_per_s"])
        results["target"] = {
            "best_config": best["config"],
            "target_min": TARGET_RATIO,
            "measured": round(best["ratio_to_offline"], 3),
            "met": best["ratio_to_offline"] >= TARGET_RATIO,
        }


def render_markdown(results: dict) -> str:
    """The figures as a short markdown report."""
    s = results["settings"]
    columns = [
        ("config", "configuration"),
        ("chunks", "chunks"),
        ("failed", "failed"),
        ("in_flight", "in flight"),
        ("wall_s", "wall s"),
        ("completion_tokens", "output tokens"),
        ("completion_tokens_per_s", "output tok/s"),
        ("ratio_to_offline", "× offline"),
        ("server_running_max", "server running (max)"),
        ("load_1m", "load 1m"),
    ]
    parts = [
        f"# Offline vLLM vs the same model behind a vLLM server, "
        f"{results['machine']['cores']} cores ({results['machine']['cpu']})\n",
        f"Bundled SmolLM2-135M-Instruct, dtype {s.get('offline_dtype', s['dtype'])}, {s['chunks']} real-length chunks "
        f"({s['chunk_tokens'][0]}-{s['chunk_tokens'][1]} tokens), {s['max_tokens']} new tokens forced (ignore_eos), "
        "prefix caching off on both. "
        "Offline: ParallelSummarizerTransform over VLLMProvider, every chunk in flight at once, "
        "measured before and after the server; × offline is against their mean. Server: the openai backend, "
        "N worker threads each with one request in flight.\n",
    ]
    if not results["complete"]:
        parts.append("**Partial results: the run has not finished (or was cut short).**\n")
    parts.append(markdown_table(results["rows"], columns) + "\n")
    for r in results["rows"]:
        if r["failed"]:
            parts.append(
                f"{r['config']}: {r['failed']} chunks failed, so it is left out of the ratios; "
                f"first error: {r.get('first_failure', '')[:300]}\n"
            )
    t = results.get("target")
    if t:
        parts.append(
            f"Target: best server concurrency ≥ {t['target_min']}× offline; measured {t['measured']}× "
            f"({t['best_config']}): {'met' if t['met'] else 'NOT met'}.\n"
        )
    return "\n".join(parts)


def save(results: dict, stem: str) -> str:
    """Ratios from what is measured so far, written to results/bench-server/."""
    add_ratios(results)
    markdown = render_markdown(results)
    write_result("bench-server", stem, results, markdown)
    return markdown


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--chunks", type=int, default=64, help="real-length chunks (64 so that 64 requests can be in flight)"
    )
    parser.add_argument("--concurrency", default="1,8,32,64", help="requests in flight to try, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per chunk, forced with ignore_eos")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="both engines' dtype (auto: as VLLMProvider resolves it; the server gets the same)",
    )
    parser.add_argument("--model", default=None, help="a local model folder (default: the bundled SmolLM2)")
    parser.add_argument(
        "--quick", action="store_true", help="4 chunks, 16 new tokens, 1 and 4 in flight: checks the script works"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # `timeout` and schedulers stop a run with SIGTERM: unwind, so both engines are shut down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from apiana_lab.experiments.measure import workload_chunks
    from apiana_lab.models import resolve_model

    n, max_tokens = (4, 16) if args.quick else (args.chunks, args.max_tokens)
    levels = [1, 4] if args.quick else [int(c) for c in args.concurrency.split(",")]
    model = resolve_model(args.model)
    stem = "server-quick" if args.quick else "server"
    chunks, _ = workload_chunks(n)
    results = {
        "benchmark": "server",
        "complete": False,
        "machine": machine(),
        "rows": [],
        "settings": {
            "chunks": n,
            "max_tokens": max_tokens,
            "concurrency": levels,
            "dtype": args.dtype,
            "model": model,
            "chunk_tokens": [min(c.token_count for c in chunks), max(c.token_count for c in chunks)],
            "prefix_caching": False,
            "forced_length": True,
        },
    }

    # Both engines stay up together (2 GiB of KV cache each), so offline can run again after the
    # server rows: an idle engine waits on its queue and takes no CPU from the other.
    print("offline vLLM: loading", file=sys.stderr, flush=True)
    server = None
    # Prefix caching off on both sides, named here because the server's flags must match it.
    with loaded("vllm", model, dtype=args.dtype, max_model_len=4096, enable_prefix_caching=False) as offline:
        try:
            dtype = str(offline.llm.llm_engine.model_config.dtype).removeprefix("torch.")
            results["settings"]["offline_dtype"] = dtype
            # The server gets the dtype the offline engine resolved: "auto" means float32 to VLLMProvider on a CPU
            # without native bfloat16, but bfloat16 to a bare server, which would then run many times slower.
            server = VLLMServer(
                model, ["--max-model-len", "4096", "--enforce-eager", "--dtype", dtype, "--no-enable-prefix-caching"]
            )
            print(f"vLLM server: starting ({server.log_path})", file=sys.stderr, flush=True)
            server.start()
            with loaded("openai", base_url=server.base_url) as remote:
                results["rows"].append(measure_offline(offline, chunks, max_tokens, "offline vLLM (before)"))
                save(results, stem)
                for level in levels:
                    results["rows"].append(measure_server(remote, chunks, max_tokens, level))
                    save(results, stem)
                results["rows"].append(measure_offline(offline, chunks, max_tokens, "offline vLLM (after)"))
        finally:
            if server is not None:
                server.stop()
    results["server_log"] = str(server.log_path)
    results["complete"] = True
    markdown = save(results, stem)
    print(markdown)
    print(f"wrote results/bench-server/{stem}.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    # vLLM starts its engine in a spawned process, which re-imports this module: keep the work behind the guard.
    main()
