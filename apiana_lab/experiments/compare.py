"""Backends side by side on the same chunks, and one backend across batch sizes."""

from __future__ import annotations

import logging

from apiana_lab.errors import ApianaError
from apiana_lab.experiments.engine import backend_options, loaded
from apiana_lab.experiments.measure import measure, sweep
from apiana_lab.providers.registry import provider_class
from apiana_lab.summarize import ParallelSummarizerTransform

__all__ = [
    "backend_options",
    "compare_backends",
    "comparison_table",
    "describe_sweep",
    "sweep_batch_sizes",
    "sweep_table",
    "sweep_turn",
]

logger = logging.getLogger(__name__)


def compare_backends(
    chunks,
    backends: list[str],
    *,
    model: str | None = None,
    max_length: int = 128,
    batch_size: int | None = None,
    dtype: str | None = None,
    engine_options: dict | None = None,
    monitor: bool = True,
    interval: float = 0.5,
) -> dict:
    """Load each backend in turn, run the same chunks through it, free it; one row per backend.

    Returns {"rows": [...], "monitors": {backend: MemoryMonitor}} (monitors only with `monitor`).
    `engine_options` maps a backend name to extra constructor arguments (e.g. openai's base_url).
    A backend that fails to load or run is a row with its error, not a crash.
    """
    rows, monitors = [], {}
    for backend in backends:
        extra = dict((engine_options or {}).get(backend) or {})
        row = {"backend": backend, "model": model, "dtype": dtype}
        mon = None
        try:
            if monitor:
                from apiana_lab.monitor import MemoryMonitor

                mon = MemoryMonitor(interval=interval)
            with loaded(
                backend, model, dtype=extra.pop("dtype", dtype), stats=monitor, monitor=mon, facts=row, **extra
            ) as provider:
                transform = ParallelSummarizerTransform(provider, batch_size=batch_size, max_length=max_length)
                figures, _ = measure(transform, chunks, config=backend, monitor=mon)
                row.update(figures)
                row["model"] = provider.model
        except (ApianaError, RuntimeError, ValueError, OSError) as e:
            logger.warning("%s failed: %s", backend, e)
            row["error"] = f"{type(e).__name__}: {e}"
        finally:
            if mon is not None:
                mon.stop()
                monitors[backend] = mon
                if "error" not in row:
                    row.update({f"peak_{k}": v for k, v in mon.peaks().items()})
        rows.append(row)
    return {"rows": rows, "monitors": monitors}


def sweep_batch_sizes(
    chunks,
    backend: str,
    batch_sizes: list[int],
    *,
    model: str | None = None,
    max_length: int = 128,
    dtype: str | None = None,
    engine_options: dict | None = None,
    headroom: float = 0.2,
    memory_limit_mb: float | None = None,
    interval: float = 0.5,
) -> dict:
    """Throughput and peak memory at each batch size on one loaded backend, and the batch size to use.

    An out-of-memory point is a data point (marked), not a crash. The recommendation is the best
    throughput whose peak memory stays under (1 - headroom) of the limit: the GPU's memory when
    one is visible, else this machine's RAM (or `memory_limit_mb`).
    """
    from apiana_lab.monitor import MemoryMonitor

    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be a non-empty list of positive integers, not {batch_sizes!r}")
    extra = dict(engine_options or {})
    if "max_batch_tokens" in provider_class(backend).engine_option_names():
        # The point is to see what batch size does; a token budget would cap it, so lift it.
        extra.setdefault("max_batch_tokens", 10**9)
    with MemoryMonitor(interval=interval) as mon:
        with loaded(backend, model, dtype=extra.pop("dtype", dtype), stats=True, monitor=mon, **extra) as provider:
            points = [
                (
                    f"batch {b}",
                    ParallelSummarizerTransform(provider, batch_size=b, max_workers=1, max_length=max_length),
                    {"batch_size": b},
                )
                for b in sorted(int(x) for x in batch_sizes)
            ]
            # A failed point is a point: out of memory at one batch size says where the limit is.
            rows = sweep(points, chunks, monitor=mon, tolerate=(ApianaError, RuntimeError, MemoryError))
        limit = memory_limit_mb or _memory_limit_mb(mon)
    for row in rows:
        row["oom"] = (
            "memory" in row["error"].lower()
            if "error" in row
            else row["batch_size_changes"] > 0 or "oom" in row["failures_by_reason"]
        )
    budget = limit * (1 - headroom) if limit else None
    # On a GPU the card's memory is what runs out; on a CPU this process tree's resident memory.
    gpu_keys = sorted({k for r in rows for k in r if k.startswith("peak_gpu") and k.endswith("_used_mb")})
    memory_key = gpu_keys[0] if gpu_keys else "peak_rss_mb"
    fits = [
        r
        for r in rows
        if "error" not in r
        and not r.get("oom")
        and r["failed"] == 0
        and (budget is None or r.get(memory_key, 0) <= budget)
    ]
    best = max(fits, key=lambda r: r["completion_tokens_per_s"], default=None)
    return {
        "rows": rows,
        "monitor": mon,
        "memory_key": memory_key,
        "memory_limit_mb": limit,
        "headroom": headroom,
        "recommended_batch_size": best["batch_size"] if best else None,
        "recommended_tokens_per_s": best["completion_tokens_per_s"] if best else None,
    }


def _memory_limit_mb(mon) -> float | None:
    """The GPU's total memory when the monitor saw one, else this machine's RAM."""
    frame = mon.to_pandas()
    totals = [c for c in frame.columns if c.startswith("gpu") and c.endswith("_total_mb")]
    if totals:
        return float(frame[totals[0]].max())
    try:
        import psutil

        return psutil.virtual_memory().total / 1e6
    except ImportError:
        return None


def comparison_table(rows: list[dict]):
    """One row per backend with the figures the comparison notebook shows, as a pandas DataFrame."""
    import pandas as pd

    columns = [
        "backend",
        "model",
        "dtype",
        "load_s",
        "wall_s",
        "prompt_tokens_per_s",
        "completion_tokens_per_s",
        "chunks_per_s",
        "flagged_share",
        "latency_p50_s",
        "latency_p90_s",
        "chunks",
        "failed",
        "error",
    ]
    peaks = sorted({k for r in rows for k in r if k.startswith("peak_")})
    table = pd.DataFrame(rows).reindex(columns=columns[:-1] + peaks + columns[-1:])
    table["model"] = table["model"].map(lambda m: str(m).rstrip("/").rsplit("/", 1)[-1] if isinstance(m, str) else m)
    return table


def sweep_table(sweep: dict):
    """One row per batch size: throughput, wall time, peak memory, and whether it ran out of memory or failed."""
    import pandas as pd

    kv = ["peak_kv_cache_pct"] if any("peak_kv_cache_pct" in r for r in sweep["rows"]) else []
    columns = [
        "batch_size",
        "completion_tokens_per_s",
        "flagged_share",
        "prompt_tokens_per_s",
        "chunks_per_s",
        "wall_s",
        "latency_p50_s",
        sweep["memory_key"],
        *kv,
        "oom",
        "failed",
        "batch_size_changes",
        "error",
    ]
    table = pd.DataFrame(sweep["rows"]).reindex(columns=list(dict.fromkeys(columns)))
    table["recommended"] = table["batch_size"] == sweep["recommended_batch_size"]
    return table


def sweep_turn(rows: list[dict]) -> dict:
    """Where throughput peaks across batch sizes, and how much the largest batch size loses against that peak."""
    ok = sorted(
        (r for r in rows if "error" not in r and not r.get("oom") and not r.get("failed")),
        key=lambda r: r["batch_size"],
    )
    if not ok:
        return {"peak_batch_size": None, "turns": False, "largest_vs_peak": None}
    peak = max(ok, key=lambda r: r["completion_tokens_per_s"])
    largest = ok[-1]
    return {
        "peak_batch_size": peak["batch_size"],
        "peak_tokens_per_s": peak["completion_tokens_per_s"],
        # The curve turns when a batch size beyond the peak was measured and came out slower.
        "turns": largest["batch_size"] > peak["batch_size"],
        "largest_batch_size": largest["batch_size"],
        "largest_vs_peak": largest["completion_tokens_per_s"] / peak["completion_tokens_per_s"]
        if peak["completion_tokens_per_s"]
        else None,
    }


def describe_sweep(sweep: dict) -> str:
    """The sweep's outcome in words: the recommended batch size, where the curve turns, which points failed."""
    turn = sweep_turn(sweep["rows"])
    limit = sweep["memory_limit_mb"]
    budget = (
        f"{(1 - sweep['headroom']) * limit / 1e3:,.1f} GB ({1 - sweep['headroom']:.0%} of {limit / 1e3:,.1f} GB)"
        if limit
        else "no known limit"
    )
    if sweep["recommended_batch_size"] is None:
        first = f"No batch size ran cleanly within {budget}: nothing to recommend."
    else:
        first = (
            f"Recommended batch size: {sweep['recommended_batch_size']} "
            f"({sweep['recommended_tokens_per_s']:.1f} output tokens/s, the best that stayed within {budget})."
        )
    if turn["peak_batch_size"] is None:
        return first
    if turn["turns"]:
        second = (
            f"Throughput peaks at batch size {turn['peak_batch_size']} and falls beyond it: batch size "
            f"{turn['largest_batch_size']} reaches {turn['largest_vs_peak']:.0%} of the peak."
        )
    else:
        second = (
            f"Throughput still rises at the largest batch size that ran cleanly ({turn['peak_batch_size']}): "
            "no turn within this range."
        )
    bad = [r["batch_size"] for r in sweep["rows"] if "error" in r or r.get("oom") or r.get("failed")]
    third = f" Out of memory or failed at batch size {', '.join(map(str, bad))} (marked)." if bad else ""
    shares = [
        (r["batch_size"], r["flagged_share"])
        for r in sorted(sweep["rows"], key=lambda r: r["batch_size"])
        if r.get("flagged_share") is not None
    ]
    fourth = (
        (
            " Summaries flagged by the quality profile, per batch size: "
            + ", ".join(f"{b}: {share:.0%}" for b, share in shares)
            + "."
        )
        if shares
        else ""
    )
    return f"{first} {second}{third}{fourth}"
