"""Run one configuration over chunks and report its figures: what every benchmark and notebook comparison uses."""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from apiana_lab.chunking import Chunk, Chunker, ChunkingOptions, load_tokenizer
from apiana_lab.quality import profile, summarize_profiles

logger = logging.getLogger(__name__)

# Workload (b) uses a short prompt pair so prompts stay ~50-100 tokens; it keeps all three placeholders.
SHORT_SYSTEM = "You summarize conversations."
SHORT_TEMPLATE = 'Summarize "{title}" ({conversation_date}):\n{formatted_messages}'


def workload_chunks(
    n: int, seed: int = 1, long_tokens: tuple[int, int] = (1000, 1400), short_tokens: tuple[int, int] = (30, 64)
) -> tuple[list[Chunk], list[Chunk]]:
    """(a) n real-length chunks and (b) n short chunks, one of each per conversation of a synthetic export."""
    from apiana_lab.export.reader import read_export
    from apiana_lab.export.synth import write_synthetic_export

    tokenizer = load_tokenizer()
    long_chunker = Chunker(ChunkingOptions(chunk_size=long_tokens[1]), tokenizer)
    short_chunker = Chunker(ChunkingOptions(chunk_size=short_tokens[1]), tokenizer)
    real, short = [], []
    with tempfile.TemporaryDirectory(prefix="apiana-workload-") as folder:
        path = Path(folder) / "conversations.json"
        write_synthetic_export(path, size_mb=max(4.0, n / 4), seed=seed)
        for conversation in read_export(path):
            # One chunk of each kind per conversation, so the prompts differ in topic as well as text.
            if len(real) < n:
                real += [
                    c
                    for c in long_chunker.chunk(conversation)
                    if long_tokens[0] <= c.token_count <= long_tokens[1] and not c.continued
                ][:1]
            if len(short) < n:
                short += [
                    c
                    for c in short_chunker.chunk(conversation)
                    if short_tokens[0] <= c.token_count <= short_tokens[1] and not c.continued
                ][:1]
            if len(real) >= n and len(short) >= n:
                break
    if len(real) < n or len(short) < n:
        raise RuntimeError(f"the synthetic export gave only {len(real)} long and {len(short)} short chunks; need {n}")
    return real, short


def sample_chunks(paths, n: int, chunk_size: int = 3500, tokenizer=None, profile=None) -> list[Chunk]:
    """n chunks of a real export spread over its length distribution: short, median and long alike.

    Chunks are ranked by token count and taken at evenly spaced quantiles, so a small sample
    still covers the extremes. Reads the export twice: once to count (or use `profile`), once
    to keep just the chosen chunks.
    """
    from apiana_lab.export.reader import read_export

    from .profile import profile_export

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    profile = profile if profile is not None else profile_export(paths, chunk_size, tokenizer)
    ranked = sorted(range(len(profile.chunk_tokens)), key=lambda i: profile.chunk_tokens[i])
    if not ranked:
        return []
    n = min(n, len(ranked))
    picked = sorted({ranked[int((k + 0.5) * len(ranked) / n)] for k in range(n)})
    wanted: dict[int, set[int]] = {}
    for i in picked:
        conv, j = profile.chunk_positions[i]
        wanted.setdefault(conv, set()).add(j)
    chunker = Chunker(ChunkingOptions(chunk_size=chunk_size), tokenizer)
    out = []
    for k, conversation in enumerate(read_export(profile.inputs)):
        if k in wanted:
            out += [c for j, c in enumerate(chunker.chunk(conversation)) if j in wanted[k]]
        if k >= max(wanted):
            break
    return out


class Clock:
    """One timed run: its start (perf_counter), wall seconds and this machine's 1-minute load before and after
    (the last two filled when the block ends)."""

    def __init__(self):
        self.load_before_after = [os.getloadavg()[0]] * 2
        self.wall_s = 0.0
        self.start = time.perf_counter()

    @property
    def load_1m(self) -> str:
        """The load as a table shows it, e.g. "1.9→2.3"."""
        return "{:.1f}→{:.1f}".format(*self.load_before_after)


@contextmanager
def clock(provider=None):
    """Time a block after resetting the provider's caches and collecting garbage: what every measurement does first.

    Each configuration runs on the same prompts: cached prefixes would flatter whichever runs second.
    """
    if provider is not None:
        provider.reset_caches()
    gc.collect()
    timed = Clock()
    try:
        yield timed
    finally:
        timed.wall_s = time.perf_counter() - timed.start
        timed.load_before_after[1] = os.getloadavg()[0]


def measure(transform, chunks: list[Chunk], *, config: str = "", workload: str = "", monitor=None) -> tuple[dict, list]:
    """Run one transform over the chunks: its figures (wall time, tokens/s, latency, failures) and its records.

    Records come back in input order. With a MemoryMonitor, its peaks during this run are
    added to the figures; the monitor's series keep the whole timeline.
    """
    progress = monitor.progress if monitor is not None else None
    if monitor is not None:
        monitor.mark(f"{config or 'run'} start")
    with clock(transform.provider) as timed:
        by_id = {record.chunk_id: record for _, record in transform.run(chunks, progress)}
    records = [by_id[c.id] for c in chunks]
    wall = timed.wall_s
    stats = transform.stats
    figures = stats.figures()
    done = [r for r in records if r.error is None]
    lengths = [r.completion_tokens for r in done]
    texts = {c.id: c.text for c in chunks}
    quality = summarize_profiles(profile(r.summary, texts[r.chunk_id], r.finish_reason) for r in done)
    row = {
        "workload": workload,
        "config": config,
        "backend": transform.provider.name,
        "mode": stats.mode,
        "chunks": len(chunks),
        "failed": len(records) - len(done),
        "failures_by_reason": dict(stats.failures_by_reason),
        "wall_s": wall,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "completion_tokens_per_s": stats.completion_tokens / wall,
        "prompt_tokens_per_s": stats.prompt_tokens / wall,
        "chunks_per_s": len(done) / wall,
        "first_result_s": stats.first_result_seconds,
        "latency_p50_s": figures["batch_latency_s"].get("p50"),
        "latency_p90_s": figures["batch_latency_s"].get("p90"),
        "latency_per": figures["latency_per"],
        "completion_tokens_min_max": [min(lengths, default=0), max(lengths, default=0)],
        "hit_max_tokens": sum(r.finish_reason == "length" for r in done),
        "batch_size": getattr(transform, "batch_size", 1),
        "max_workers": getattr(transform, "max_workers", 1),
        "max_tokens": transform.options.max_tokens,
        "batch_size_changes": len(stats.batch_size_changes),
        "preemptions": stats.preemptions,
        "sample_summary": done[0].summary[:300] if done else None,
        # A faster setting that writes worse memories must show: the quality flags beside the speed.
        "flagged_share": quality["flagged_share"] if done else None,
        "flagged_by_flag": {name: f["count"] for name, f in quality["flags"].items() if f["count"]},
        # The machine is shared: a load above the core count means these seconds include waiting for a core.
        "loadavg_1m_before_after": timed.load_before_after,
        "load_1m": timed.load_1m,
    }
    failures = [r.error for r in records if r.error is not None]
    if failures:
        row["first_failure"] = failures[0][:500]
    if monitor is not None:
        monitor.mark(f"{config or 'run'} end")
        row.update({f"peak_{k}": v for k, v in monitor.peaks().items()})
    logger.info(
        "[%s] %s: %.1f s, %d new tokens, %.1f tok/s, %d failed",
        workload,
        config,
        wall,
        row["completion_tokens"],
        row["completion_tokens_per_s"],
        row["failed"],
    )
    return row, records


def sweep(
    configurations,
    chunks: list[Chunk] | None = None,
    *,
    workload: str = "",
    monitor=None,
    rows: list | None = None,
    on_row=None,
    tolerate: tuple[type[BaseException], ...] = (),
) -> list[dict]:
    """Measure each configuration in turn, on the same chunks: one row each, in order.

    Args:
        configurations: (label, run) or (label, run, fields) tuples. `run` is a transform, measured
            over `chunks` with `measure` (label as its config), or a function of no arguments that
            measures something else and returns its row. `fields` go into the row first.
        rows: a list to append to, so a run cut short keeps what it measured.
        on_row: called with each row as it is added (to echo it, or to write the results so far).
        tolerate: exceptions that make a point of the sweep (a row with its error, e.g. out of
            memory) rather than end it.
    """
    rows = [] if rows is None else rows
    for label, run, *fields in configurations:
        row = dict(fields[0]) if fields else {}
        try:
            if hasattr(run, "run"):
                row.update(measure(run, chunks, config=label, workload=workload, monitor=monitor)[0])
            else:
                row.update(run())
        except tolerate as e:
            logger.warning("%s failed: %s", label, e)
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
