"""Peak memory of the whole job against export size: `chatgpt-export-v2 --backend fake` on 200 MB and 1 GB.

Each size runs the real command line in its own process; its peak resident memory comes from
the kernel (`wait4`'s rusage), so nothing in the measured process measures itself. The fake
backend answers instantly, so what is measured is reading, chunking, storing, the checkpoint,
the to-do list and writing summaries: everything that could grow with the export.

    python -m apiana_lab.bench.memory                 # 200 MB and 1 GB (wall times: results/bench-memory/memory.md)
    python -m apiana_lab.bench.memory --sizes 5 20    # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apiana_lab.experiments.record import machine, markdown_table, write_result

TARGET_PEAK_MB_AT_1GB = 1000.0
TARGET_GROWTH = 1.3  # peak at the largest size / peak at the smallest


def run_size(size_mb: float, workdir: Path) -> dict:
    """Write a synthetic export of `size_mb`, run the CLI on it, and measure the run's peak RSS and wall time."""
    from apiana_lab.export.synth import write_synthetic_export

    export = workdir / f"export-{size_mb:g}mb.json"
    out = workdir / f"out-{size_mb:g}mb"
    shutil.rmtree(out, ignore_errors=True)
    synth = write_synthetic_export(export, size_mb=size_mb, seed=0)
    command = [
        str(Path(sys.executable).parent / "chatgpt-export-v2"),
        "-i",
        str(export),
        "-o",
        str(out),
        "--backend",
        "fake",
        "--no-progress",
        # The fake backend logs every prompt it gets, for tests; that log is not the pipeline's memory.
        "--engine-arg",
        "history=false",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    log = workdir / f"log-{size_mb:g}mb.txt"
    start = time.perf_counter()
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own peak RSS, from the kernel
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log.read_text()[-2000:]}")
    run = json.loads((out / "run.json").read_text())
    row = {
        "size_mb": size_mb,
        "export_bytes": export.stat().st_size,
        "conversations": synth.conversations,
        "chunks": run["chunks_total"],
        "wall_s": round(wall, 1),
        "summarize_s": run["summarize_seconds"],
        "store_mb": round((out / "apiana.sqlite").stat().st_size / 1e6, 1),
        "peak_rss_mb": round(usage.ru_maxrss * 1024 / 1e6, 1),  # KiB on Linux
    }
    shutil.rmtree(out, ignore_errors=True)
    export.unlink()
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[200, 1000], help="export sizes in MB (smallest first)"
    )
    parser.add_argument("--workdir", default=None, help="where the exports and stores go (default: a temporary folder)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="apiana-bench-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": "memory", "machine": machine(), "rows": []}
    try:
        for size in sorted(args.sizes):
            print(f"{size:g} MB ...", file=sys.stderr, flush=True)
            results["rows"].append(run_size(size, workdir))
            print(f"  {results['rows'][-1]}", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = results["rows"]
    smallest, largest = rows[0], rows[-1]
    growth = largest["peak_rss_mb"] / smallest["peak_rss_mb"]
    results["growth"] = round(growth, 3)
    results["targets"] = {
        f"peak RSS at {largest['size_mb']:g} MB <= {TARGET_PEAK_MB_AT_1GB:g} MB": largest["peak_rss_mb"]
        <= TARGET_PEAK_MB_AT_1GB,
        f"peak at {largest['size_mb']:g} MB / peak at {smallest['size_mb']:g} MB <= {TARGET_GROWTH}": growth
        <= TARGET_GROWTH,
    }
    columns = [
        ("size_mb", "export MB"),
        ("conversations", "conversations"),
        ("chunks", "chunks"),
        ("wall_s", "wall s"),
        ("peak_rss_mb", "peak RSS MB"),
        ("store_mb", "apiana.sqlite MB"),
    ]
    markdown = (
        f"# Peak memory of `chatgpt-export-v2 --backend fake` against export size\n\n"
        f"{results['machine']['cores']} cores ({results['machine']['cpu']}); each size in a fresh process, "
        f"peak RSS from the kernel (wait4).\n\n{markdown_table(rows, columns)}\n\n"
        f"Peak at {largest['size_mb']:g} MB / peak at {smallest['size_mb']:g} MB: **{growth:.2f}**\n\n"
        + "\n".join(f"- {k}: {'met' if v else 'NOT met'}" for k, v in results["targets"].items())
        + "\n"
    )
    stem = "memory" if sorted(args.sizes) == [200, 1000] else "memory-" + "-".join(f"{s:g}" for s in sorted(args.sizes))
    write_result("bench-memory", stem, results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
