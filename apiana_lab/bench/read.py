"""How fast, and in how much memory, a large export is read, chunked and stored, against plain json.load.

    python -m apiana_lab.bench.read [--size-mb 200] [--format chatgpt] [--keep] [--profile]

Each phase runs in its own subprocess, so its peak RSS is its own and not the high-water
mark of an earlier phase. Writes results/bench-read/read-<size>mb.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apiana_lab.experiments.record import machine, markdown_table, peak_rss_mb, results_root, write_result

PHASES = ("json_load", "read", "read_chunk", "read_chunk_store")
LABELS = {
    "json_load": "json.load (whole file)",
    "read": "read_export",
    "read_chunk": "read + chunk",
    "read_chunk_store": "read + chunk + store",
}
# Side runs that explain the main ones: (phase, label, extra environment).
EXTRAS = [
    # Most of json.load's time here is the cyclic GC walking millions of new objects, not parsing.
    ("json_load_nogc", "json.load, gc disabled", {}),
    # The CLI turns tokenizer threads off (TOKENIZERS_PARALLELISM=false): what would they buy?
    ("read_chunk", "read + chunk, tokenizer threads on", {"TOKENIZERS_PARALLELISM": "true"}),
]
TARGET_SECONDS_PER_200MB = 60.0
TARGET_PEAK_RSS_MB = 1000.0


def run_phase(phase: str, path: Path, workdir: Path) -> dict:
    """Do one phase in this process and measure it; called in a fresh subprocess per phase."""
    chunker = None
    if phase.startswith("read_chunk"):
        from apiana_lab.chunking import Chunker

        chunker = Chunker()  # default options: tokens, 3500, the bundled SmolLM2 tokenizer
    store = None
    if phase.startswith("read_chunk_store"):
        from apiana_lab.store import SQLiteStore

        store = SQLiteStore(workdir / "bench.sqlite")
    rss_before = peak_rss_mb()

    figures = {"conversations": 0, "messages": 0, "chunks": None, "tokens": None}
    if chunker is not None:
        figures.update(chunks=0, tokens=0)
    start = time.perf_counter()
    if phase.startswith("json_load"):
        if phase == "json_load_nogc":
            import gc

            gc.disable()
        with open(path, "rb") as f:
            data = json.load(f)
        figures["conversations"] = len(data)
        figures["messages"] = None  # json.load sees tree nodes, not the branch messages the reader keeps
    else:
        from apiana_lab.export.reader import read_export

        if store is not None:
            # The pipeline's own first step, exactly as a run does it.
            from apiana_lab.export.types import ReadReport
            from apiana_lab.pipeline import Ingest

            report = ReadReport()
            refs = Ingest(store, chunker, report=report)(str(path))
            figures.update(
                conversations=report.conversations,
                messages=None,
                chunks=len(refs),
                tokens=sum(r.token_count for r in refs),
            )
            store.close()
            figures["sqlite_mb"] = round(sum(p.stat().st_size for p in workdir.glob("bench.sqlite*")) / 1e6, 1)
        else:
            for conversation in read_export(path):
                figures["conversations"] += 1
                figures["messages"] += len(conversation.entries)
                if chunker is None:
                    continue
                new = chunker.chunk(conversation)
                figures["chunks"] += len(new)
                figures["tokens"] += sum(c.token_count for c in new)
    seconds = time.perf_counter() - start
    return {"phase": phase, "seconds": seconds, "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb(), **figures}


def profile_phase(phase: str, path: Path, workdir: Path, out: Path) -> None:
    """Run one phase under cProfile and write the top functions by cumulative and own time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(run_phase, phase, path, workdir)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("cumulative").print_stats(25)
    stats.sort_stats("tottime").print_stats(25)
    out.write_text(text.getvalue(), encoding="utf-8")


def in_subprocess(
    phase: str, path: Path, workdir: Path, profile_to: Path | None = None, env: dict | None = None
) -> dict:
    """Run one phase in a fresh interpreter and return its figures."""
    cmd = [
        sys.executable,
        "-m",
        "apiana_lab.bench.read",
        "--phase",
        phase,
        "--path",
        str(path),
        "--workdir",
        str(workdir),
    ]
    if profile_to is not None:
        cmd += ["--profile-to", str(profile_to)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"phase {phase} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    if profile_to is not None:
        return {}
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_seconds"] = time.perf_counter() - started  # with interpreter start and imports
    return figures


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=200.0)
    parser.add_argument("--format", default="chatgpt", choices=("chatgpt", "chatgpt-sharded", "claude"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the generated export and SQLite file")
    parser.add_argument("--profile", action="store_true", help="also profile read + chunk (cProfile)")
    # Internal: run one phase in this process (the parent starts one subprocess per phase).
    parser.add_argument("--phase", choices=PHASES + tuple(e[0] for e in EXTRAS), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:
        if args.profile_to:
            profile_phase(args.phase, args.path, args.workdir, args.profile_to)
        else:
            print(json.dumps(run_phase(args.phase, args.path, args.workdir)))
        return None

    from apiana_lab.export.synth import write_synthetic_export

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the CLI runs
    facts = machine()
    size_label = f"{args.size_mb:g}"
    workdir = Path(tempfile.mkdtemp(prefix="bench-read-"))
    try:
        export = workdir / ("export" if args.format == "chatgpt-sharded" else "conversations.json")
        synth = write_synthetic_export(export, size_mb=args.size_mb, format=args.format, seed=args.seed)
        size_bytes = synth.bytes
        print(
            f"synthetic {args.format} export: {size_bytes / 1e6:.1f} MB, {synth.conversations:,} conversations, "
            f"{synth.seconds:.1f} s to write ({export})",
            file=sys.stderr,
        )

        rows = []
        runs = [(phase, LABELS[phase], {}) for phase in PHASES] + EXTRAS
        for phase, label, env in runs:
            if phase.startswith("json_load") and args.format == "chatgpt-sharded":
                continue  # several files: no single json.load to compare with
            figures = in_subprocess(phase, export, workdir, env=env)
            figures["label"] = label
            figures["env"] = env
            figures["mb_per_s"] = size_bytes / 1e6 / figures["seconds"]
            figures["tokens_per_s"] = figures["tokens"] / figures["seconds"] if figures["tokens"] else None
            rows.append(figures)
            print(f"  {label:<36} {figures['seconds']:7.2f} s  {figures['peak_rss_mb']:7.0f} MB", file=sys.stderr)
            (workdir / "bench.sqlite").unlink(missing_ok=True)

        base = rows[0] if rows[0]["phase"] == "json_load" else None
        for row in rows:
            row["time_vs_json_load"] = row["seconds"] / base["seconds"] if base else None
            row["rss_vs_json_load"] = row["peak_rss_mb"] / base["peak_rss_mb"] if base else None

        # The targets are stated for 200 MB; scale the time target linearly for other sizes.
        target_s = TARGET_SECONDS_PER_200MB * size_bytes / 200e6
        final = next(r for r in rows if r["phase"] == "read_chunk_store")
        targets = {
            "read_chunk_store_seconds": {
                "target_max": round(target_s, 1),
                "measured": round(final["seconds"], 2),
                "met": final["seconds"] <= target_s,
            },
            "read_chunk_store_peak_rss_mb": {
                "target_max": TARGET_PEAK_RSS_MB,
                "measured": round(final["peak_rss_mb"], 1),
                "met": final["peak_rss_mb"] <= TARGET_PEAK_RSS_MB,
            },
        }
        if args.profile:
            profile_path = results_root() / "bench-read" / f"profile-read-chunk-{size_label}mb.txt"
            profile_path.parent.mkdir(parents=True, exist_ok=True)
            in_subprocess("read_chunk", export, workdir, profile_to=profile_path)
            print(f"profile of read + chunk: {profile_path}", file=sys.stderr)

        results = {
            "benchmark": "read",
            "export": {
                "format": args.format,
                "size_mb": round(size_bytes / 1e6, 2),
                "seed": args.seed,
                "conversations_written": synth.conversations,
                "messages_written": synth.messages,
            },
            "chunking": {
                "method": "tokens",
                "chunk_size": 3500,
                "tokenizer": "bundled SmolLM2 (tokenizers)",
                "TOKENIZERS_PARALLELISM": os.environ["TOKENIZERS_PARALLELISM"],
            },
            "machine": facts,
            "phases": rows,
            "targets": targets,
        }
        columns = [
            ("label", "phase"),
            ("seconds", "wall s"),
            ("mb_per_s", "MB/s"),
            ("peak_rss_mb", "peak RSS MB"),
            ("conversations", "conversations"),
            ("chunks", "chunks"),
            ("tokens", "tokens"),
            ("tokens_per_s", "tokens/s"),
            ("time_vs_json_load", "time / json.load"),
            ("rss_vs_json_load", "RSS / json.load"),
        ]
        table = markdown_table(rows, columns)
        met = ", ".join(
            f"{k}: {v['measured']} (target <= {v['target_max']}, {'met' if v['met'] else 'NOT met'})"
            for k, v in targets.items()
        )
        markdown = (
            f"# Reading a {size_bytes / 1e6:.0f} MB synthetic {args.format} export\n\n"
            f"{results['machine']['cores']} cores, {results['machine']['cpu']}; each phase in its own process; "
            f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']} unless the row says otherwise.\n\n"
            f"{table}\n\nTargets: {met}.\n"
        )
        write_result("bench-read", f"read-{size_label}mb", results, markdown)
        print(markdown)
        return results
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
