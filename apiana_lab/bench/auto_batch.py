"""`--batch-size auto` against a sweep of fixed batch sizes, on the same chunks, in one run.

    python -m apiana_lab.bench.auto_batch [--long-sizes 2,4,8,16] [--short-sizes 4,8,16,32]
                                          [--in-flight 8,16,32,64] [--workloads long,short,openai] [--quick]

Three workloads, each on one loaded engine, every configuration over the same chunks with the
same forced output length (ignore_eos), so each row does the same work:
  long:   transformers, real-length chunks (1,000-1,400 tokens), 64 new tokens: prefill-bound on a CPU;
  short:  transformers, short chunks (200-300 tokens), 128 new tokens: decode-heavy;
  openai: the openai backend against a real vLLM server (VLLMServer, as the server tests start it),
          128 short chunks, 64 new tokens; its size is the requests in flight. The server is fast
          enough here for a run long enough that auto measures and moves.
Fixed sizes run largest first with auto in the middle of the order, which bounds how much a
drifting machine can favour either. Nothing is swept before auto runs: it starts where the
transform starts it and tunes itself from what it measures. Each workload reports the best fixed
size, the current default (transformers: 16 per batch; openai: 32 in flight), auto, and auto's
ratios to both. Writes results/bench-auto/auto.json and .md (auto-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from apiana_lab.experiments.engine import loaded
from apiana_lab.experiments.measure import sweep, workload_chunks
from apiana_lab.experiments.record import machine, markdown_table, write_result

from .summarize import echo

logger = logging.getLogger("apiana_lab.bench.auto_batch")

TARGET_OF_BEST = 0.95  # auto against the best fixed size, output tokens/s
# A default this close to the best fixed size leaves nothing for auto to beat: the rows differ by noise.
SAME = 0.05


def configurations(provider, sizes: list[int], max_tokens: int, in_flight: bool) -> list[tuple]:
    """(label, transform, fields): each fixed size, largest first, and auto in the middle; the default included."""
    from apiana_lab.summarize import ParallelSummarizerTransform

    default = provider.default_window
    fixed = sorted(set(sizes) | {default}, reverse=True)
    rows = []
    for size in fixed:
        setting = {"max_workers": size} if in_flight else {"batch_size": size}
        transform = ParallelSummarizerTransform(provider, **setting, max_length=max_tokens, ignore_eos=True)
        label = f"{size} in flight" if in_flight else f"batch {size}"
        fields = {"setting": size, "default": size == default}
        rows.append((label + (" (default)" if size == default else ""), transform, fields))
    auto = ParallelSummarizerTransform(provider, batch_size="auto", max_length=max_tokens, ignore_eos=True)
    rows.insert(len(rows) // 2, ("auto", auto, {"setting": "auto", "default": False}))
    return rows


def run_workload(name: str, provider, chunks: list, sizes: list[int], max_tokens: int, results: dict) -> None:
    """Sweep the fixed sizes and auto on one engine; the rows go into `results` as they come."""
    in_flight = not provider.supports_batch
    configs = configurations(provider, sizes, max_tokens, in_flight)
    rows = results["rows"]

    def add(row: dict) -> None:
        echo(row)
        save(results)

    first = len(rows)
    sweep(configs, chunks, workload=name, rows=rows, on_row=add)
    for (_, transform, fields), row in zip(configs, rows[first:]):
        if fields["setting"] == "auto":
            stats = transform.stats
            row["auto_start"] = transform.batch_size
            row["auto_final"] = stats.batch_size_final
            row["auto_changes"] = list(stats.batch_size_changes)
            row["auto_path"] = " → ".join(
                [str(transform.batch_size)] + [str(c["to"]) for c in stats.batch_size_changes]
            )
    save(results)


def summarize(results: dict) -> None:
    """Per workload: the best fixed size, the default, auto, and auto's ratios to both."""
    verdicts = {}
    for workload in dict.fromkeys(r["workload"] for r in results["rows"]):
        rows = [r for r in results["rows"] if r["workload"] == workload and not r["failed"]]
        fixed = [r for r in rows if r["setting"] != "auto"]
        auto = next((r for r in rows if r["setting"] == "auto"), None)
        default = next((r for r in fixed if r["default"]), None)
        if not fixed or auto is None or default is None:
            continue
        best = max(fixed, key=lambda r: r["completion_tokens_per_s"])
        rate = auto["completion_tokens_per_s"]
        of_best = rate / best["completion_tokens_per_s"]
        of_default = rate / default["completion_tokens_per_s"]
        verdicts[workload] = {
            "best_fixed": best["setting"],
            "best_tokens_per_s": best["completion_tokens_per_s"],
            "default": default["setting"],
            "default_tokens_per_s": default["completion_tokens_per_s"],
            "auto_tokens_per_s": rate,
            "auto_path": auto.get("auto_path"),
            "auto_of_best": of_best,
            "auto_of_default": of_default,
            # Auto that never moved ran the default's batches: its ratio to the default is the machine's drift.
            "auto_moved": bool(auto.get("auto_changes")),
            "default_of_best": default["completion_tokens_per_s"] / best["completion_tokens_per_s"],
            "met_best": of_best >= TARGET_OF_BEST,
            # Only asked where the default is not the best (by more than noise).
            "beats_default": None
            if default["completion_tokens_per_s"] >= (1 - SAME) * best["completion_tokens_per_s"]
            else of_default > 1,
        }
    results["verdicts"] = verdicts


def render_markdown(results: dict) -> str:
    """The figures as a short markdown report."""
    s, m = results["settings"], results["machine"]
    columns = [
        ("workload", "workload"),
        ("config", "configuration"),
        ("chunks", "chunks"),
        ("wall_s", "wall s"),
        ("completion_tokens", "output tokens"),
        ("completion_tokens_per_s", "output tok/s"),
        ("auto_path", "auto's sizes"),
        ("failed", "failed"),
        ("load_1m", "load 1m"),
    ]
    parts = [
        f"# `--batch-size auto` against fixed batch sizes, {m['cores']} cores ({m['cpu']})\n",
        f"Bundled SmolLM2-135M-Instruct. Workloads: {'; '.join(s['workloads'])}. Every configuration of a workload "
        "runs the same chunks on one loaded engine with the output length forced (ignore_eos), fixed sizes "
        "largest first and auto in the middle of the order; nothing is swept before auto runs.\n",
    ]
    if not results["complete"]:
        parts.append("**Partial results: the run has not finished (or was cut short).**\n")
    parts.append(markdown_table(results["rows"], columns) + "\n")
    verdicts = results.get("verdicts", {})
    if verdicts:
        table = [{"workload": w, **v} for w, v in verdicts.items()]
        parts.append(
            markdown_table(
                table,
                [
                    ("workload", "workload"),
                    ("best_fixed", "best fixed"),
                    ("best_tokens_per_s", "tok/s"),
                    ("default", "default"),
                    ("default_tokens_per_s", "tok/s"),
                    ("auto_path", "auto's sizes"),
                    ("auto_tokens_per_s", "auto tok/s"),
                    ("auto_of_best", "auto / best"),
                    ("auto_of_default", "auto / default"),
                ],
            )
            + "\n"
        )
        for w, v in verdicts.items():
            beats = (
                f"the default is the best fixed size here, or within {SAME:.0%} of it"
                if v["beats_default"] is None
                else f"auto {'beats' if v['beats_default'] else 'does NOT beat'} the default"
            )
            drift = (
                ""
                if v["auto_moved"]
                else " Auto never changed size (too few chunks to finish a measurement): it ran the default's "
                "batches, so its ratio to the default is the machine's drift between the two rows."
            )
            parts.append(
                f"- {w}: auto at {v['auto_of_best']:.2f}× the best fixed size ({v['best_fixed']}): target ≥ "
                f"{TARGET_OF_BEST} {'met' if v['met_best'] else 'NOT met'}; {beats} ({v['auto_of_default']:.2f}×)."
                + drift
            )
    for r in results["rows"]:
        if r["failed"]:
            parts.append(f"\n{r['workload']} {r['config']}: {r['failed']} chunks failed; left out of the verdicts.")
    return "\n".join(parts)


def save(results: dict) -> str:
    """Verdicts from what is measured so far, written to results/bench-auto/."""
    summarize(results)
    markdown = render_markdown(results)
    write_result("bench-auto", results["stem"], results, markdown)
    return markdown


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="long,short,openai", help="which to run, comma-separated")
    parser.add_argument("--long-sizes", default="2,4,8,16", help="fixed batch sizes for the long workload")
    parser.add_argument("--short-sizes", default="4,8,16,32", help="fixed batch sizes for the short workload")
    parser.add_argument("--in-flight", default="8,16,32,64", help="fixed requests in flight for openai")
    parser.add_argument("--long-chunks", type=int, default=12)
    parser.add_argument("--short-chunks", type=int, default=24)
    parser.add_argument("--openai-chunks", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="a few chunks and tokens: checks the script works")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the server is stopped
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from apiana_lab.models import resolve_model
    from apiana_lab.providers.vllm_server import VLLMServer

    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    sizes = {
        "long": [int(x) for x in args.long_sizes.split(",")],
        "short": [int(x) for x in args.short_sizes.split(",")],
        "openai": [int(x) for x in args.in_flight.split(",")],
    }
    n = {"long": args.long_chunks, "short": args.short_chunks, "openai": args.openai_chunks}
    tokens = {"long": 64, "short": 128, "openai": 64}
    if args.quick:
        n, tokens = dict.fromkeys(n, 4), dict.fromkeys(tokens, 8)
        sizes = dict.fromkeys(sizes, [2])
    model = resolve_model(None)
    long_chunks = workload_chunks(n["long"])[0] if "long" in chosen else []
    short_chunks = workload_chunks(max(n["short"], n["openai"]), short_tokens=(200, 300))[1]
    results = {
        "benchmark": "auto_batch",
        "stem": "auto-quick" if args.quick else "auto",
        "complete": False,
        "machine": machine(),
        "rows": [],
        "settings": {
            "model": model,
            "chunks": n,
            "max_tokens": tokens,
            "sizes": sizes,
            "workloads": [
                f"{w}: {n[w]} chunks, {tokens[w]} new tokens, fixed {', '.join(map(str, sizes[w]))}" for w in chosen
            ],
            "forced_length": True,
        },
    }
    for name in [w for w in ("long", "short") if w in chosen]:
        chunks = long_chunks if name == "long" else short_chunks[: n["short"]]
        print(f"{name}: transformers, {len(chunks)} chunks", file=sys.stderr, flush=True)
        with loaded("transformers", model) as provider:
            run_workload(name, provider, chunks, sizes[name], tokens[name], results)
    if "openai" in chosen:
        from apiana_lab.providers.vllm_backend import cpu_has_native_bf16

        # "auto" is bfloat16 to a bare server, emulated (and many times slower) on a CPU without it.
        dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
        server = VLLMServer(
            model, ["--max-model-len", "4096", "--enforce-eager", "--dtype", dtype, "--no-enable-prefix-caching"]
        )
        print(f"openai: vLLM server starting ({server.log_path})", file=sys.stderr, flush=True)
        try:
            server.start()
            with loaded("openai", base_url=server.base_url) as provider:
                run_workload(
                    "openai", provider, short_chunks[: n["openai"]], sizes["openai"], tokens["openai"], results
                )
        finally:
            server.stop()
        results["server_log"] = str(server.log_path)
    results["complete"] = True
    markdown = save(results)
    print(markdown)
    print(f"wrote results/bench-auto/{results['stem']}.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
