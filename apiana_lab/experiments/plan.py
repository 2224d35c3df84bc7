"""How long will my export take? Count the whole export, time the backend on a sample, simulate the run.

Every chunk's prompt length is counted exactly. The run is simulated the way it keeps requests
going at once, as the backend declares it (`Shape`): continuous (a streaming engine, or single
calls in parallel: a finished request's place goes to the next at once) or static (native
batches of `batch_size`, longest prompts first, cut into the groups the backend runs at once;
a group pads its prompts to its longest and steps until its longest summary ends). The cost of
a run is p x prompt tokens (padded, in groups) + a x engine steps + b x row cost: prefill, what
the rows of a step share (reading the weights) and what each row adds (static: per row-step;
continuous: per token of context a row-step reads, see `Schedule.features`).

The three are fitted to four timed passes: prefill alone (one new token) and the real
generation over the sample at the run's settings, then a second pair at another concurrency.
Where the run keeps many more requests going at once than the sample can (a streaming engine's
window), that pair runs that many distinct chunks with a few new tokens each: on hardware bound
by reading the weights, a sample's 8-16 rows cost the same as 4, and only a pass at the run's
width shows what 128 rows cost. Otherwise it runs the sample at half its concurrency. The fit's
residual is the timing noise. Each summary's length is drawn from sample chunks of about the
same prompt length. The projection is anchored on the sample's generation pass (its seconds x
simulated run / simulated pass), so a backend the model fits loosely is still scaled from what
it did at the run's settings.

The range is a bootstrap (seeded, so the same measurements give the same range): the sample's
chunks resampled (summary lengths), the passes' seconds perturbed by the timing noise, the fit
and the simulation done again; its 2.5th to 97.5th percentiles, and the point is their median.
What it cannot carry: a machine busier or quieter at run time than at plan time. The plan
records the load average so that shows.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from apiana_lab.providers.registry import check_options, get_provider
from apiana_lab.summarize import ParallelSummarizerTransform

from .measure import measure, sample_chunks
from .profile import profile_export

logger = logging.getLogger(__name__)

TARGET_MB, TARGET_SECONDS = 200, 3600  # the project's headline: a 200 MB export in under an hour
MIN_SAMPLE = 8  # fewer sampled chunks than this and the range is rough, and says so
ROUGH_SPREAD = 0.5  # so is a range wider than this share of its point estimate
REPLICATES = 200
PERCENTILES = (2.5, 97.5)
BUSY_LOAD = 1.0  # a 1-minute load above this share of the cores: the sample's rates are a busy machine's
# A noise estimate from one degree of freedom can come out near zero by luck; timings on a
# shared machine are never that steady, so the bootstrap perturbs the passes by at least this.
MIN_NOISE = 0.02
# Where the run has more than WIDE_RATIO times the sample's requests going at once, two passes
# run that many distinct chunks (up to WIDE_MAX), generating WIDE_TOKENS each: enough steps to
# time a step at that width, few enough that the plan stays a fraction of the run.
WIDE_RATIO, WIDE_MAX, WIDE_TOKENS = 1.5, 512, 32


@dataclass(frozen=True)
class Shape:
    """How a run keeps requests going at once: what the projection simulates.

    Args:
        static: native batches (a group pads its prompts and steps until its longest summary
            ends); otherwise continuous (a finished request's place goes to the next at once).
        slots: continuous: requests at once.
        batch_size: static: rows per batch cut from the run, longest prompts first.
        rows: static: the rows of a group the backend runs at once, from (rows left in the
            batch, the longest prompt's tokens, max new tokens); None: the whole batch.
        parallel: static: groups running at the same time (replicas).
    """

    static: bool
    slots: int = 1
    batch_size: int = 1
    rows: Callable[[int, int, int], int] | None = None
    parallel: int = 1

    def at_once(self, n: int) -> str:
        """How a run of n requests keeps them going at once, as the plan prints it."""
        if not self.static:
            return f"{min(n, self.slots)} in flight"
        batches = f"batches of {min(n, self.batch_size)}"
        return batches + (f", {self.parallel} at a time" if self.parallel > 1 else "")


@dataclass
class Pass:
    """One timed run over sampled chunks: its settings, seconds, and each chunk's prompt and new tokens."""

    label: str
    shape: Shape
    max_tokens: int
    seconds: float
    prompts: list[int]
    lengths: list[int]
    load_1m: str = ""


class Schedule:
    """One run's order and groups over known prompt lengths, and its cost features for any summary lengths."""

    def __init__(self, prompts: Sequence[int], shape: Shape, max_tokens: int):
        import numpy as np

        self.shape = shape
        # The run's order: longest prompt first, ties in input order (the Collator's).
        self.order = np.argsort(-np.asarray(prompts, dtype=float), kind="stable")
        ordered = np.asarray(prompts, dtype=float)[self.order]
        n = len(ordered)
        if shape.static:
            starts, padded = [], 0.0
            for first in range(0, n, shape.batch_size):
                end, i = min(n, first + shape.batch_size), first
                while i < end:
                    rows = end - i if shape.rows is None else shape.rows(end - i, int(ordered[i]), max_tokens)
                    rows = max(1, min(end - i, rows))
                    starts.append(i)
                    padded += rows * ordered[i]  # left padding to the group's longest prompt
                    i += rows
            self.starts = np.asarray(starts, dtype=int)
            self.sizes = np.diff(np.append(self.starts, n))
            self.prefill = padded / shape.parallel
        else:
            self.prefill = float(ordered.sum())
        self.ordered = ordered
        self.n = n

    @property
    def rows_at_once(self) -> int:
        """The most requests this run has going at once."""
        if self.shape.static:
            return int(self.sizes.max(initial=0)) * self.shape.parallel
        return min(self.n, self.shape.slots)

    def features(self, lengths) -> tuple[float, float, float]:
        """(prompt tokens, engine steps, row cost) for these summary lengths, given in input order.

        The row cost is what each row adds to a step. Static batches: row-steps, padded rows included
        (a row's own compute). Continuous: context tokens read per row-step after the first token,
        each row's prompt plus what it has generated so far, summed over its steps: a paged engine's
        decode step costs per row what its attention reads (vLLM on this CPU: 0.87 ms per row-step at
        ~440 tokens of context and 2.12 ms at ~1,080, 2.0 µs per token both times, with nothing left
        over for a fixed part). So a run whose rows hold longer contexts than the sample's passes
        (a wide pass of 32 new tokens against summaries of 300) costs more per row-step, as it does.
        """
        import numpy as np

        return self.features_ordered(np.asarray(lengths, dtype=float)[self.order])

    def features_ordered(self, lengths) -> tuple[float, float, float]:
        """The same, for lengths given in the run's order (longest prompt first)."""
        import numpy as np

        if not len(lengths):
            return 0.0, 0.0, 0.0
        if self.shape.static:
            longest = np.maximum.reduceat(lengths, self.starts)
            parallel = self.shape.parallel
            return self.prefill, float(longest.sum()) / parallel, float((longest * self.sizes).sum()) / parallel
        decoded = np.maximum(lengths - 1, 0)  # the first new token comes with the prefill
        context = float((decoded * self.ordered + decoded * (decoded + 1) / 2).sum())
        return self.prefill, float(_makespan(lengths, self.shape.slots)), context


def _makespan(lengths, slots: int) -> float:
    """Engine steps to finish these requests, in this order, with `slots` of them in flight at once."""
    if slots >= len(lengths):
        return float(max(lengths))
    free = [float(x) for x in lengths[:slots]]
    heapq.heapify(free)
    for length in lengths[slots:]:
        heapq.heapreplace(free, free[0] + float(length))
    return max(free)


def fit(features: Sequence[tuple[float, float, float]], seconds: Sequence[float]):
    """Non-negative (p, a, b) with the least squared relative error over the passes, and that error's spread."""
    import numpy as np

    x = np.asarray(features, dtype=float) / np.asarray(seconds, dtype=float)[:, None]
    y = np.ones(len(seconds))
    best = None
    for cols in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)):
        coef = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
        if (coef < 0).any():
            continue
        theta = np.zeros(3)
        theta[list(cols)] = coef
        sse = float(((x @ theta - y) ** 2).sum())
        if best is None or sse < best[1] - 1e-12:
            best = (theta, sse)
    theta, sse = best
    return theta, math.sqrt(sse / max(1, len(seconds) - 3))


def _draw_lengths(rng, targets, prompts, lengths, width: int):
    """A summary length for each target prompt length: one of the sample chunks nearest in prompt length."""
    import numpy as np

    order = np.argsort(prompts, kind="stable")
    known, values = prompts[order], lengths[order]
    at = np.searchsorted(known, targets)
    picked = np.clip(at + rng.integers(-width, width, size=len(targets)), 0, len(known) - 1)
    return values[picked]


def simulate(
    export_prompts: Sequence[int],
    passes: Sequence[Pass],
    run_shape: Shape,
    max_tokens: int,
    *,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> dict:
    """The whole run's summarizing seconds from the timed passes: point, range, parts, the fit and its noise.

    The first pass with the run's `max_tokens` (the sample, at the run's settings) anchors the
    projection and gives the summary lengths.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    schedules = [Schedule(p.prompts, p.shape, p.max_tokens) for p in passes]
    features = [sch.features(p.lengths) for sch, p in zip(schedules, passes, strict=True)]
    seconds = np.asarray([p.seconds for p in passes], dtype=float)
    theta, noise = fit(features, seconds)
    anchor = next((i for i, p in enumerate(passes) if p.max_tokens == max_tokens), 0)
    sample_prompts = np.asarray(passes[anchor].prompts, dtype=float)
    lengths = np.asarray(passes[anchor].lengths, dtype=float)
    n = len(sample_prompts)
    run = Schedule(export_prompts, run_shape, max_tokens)
    targets = np.asarray(export_prompts, dtype=float)[run.order]
    width = max(1, n // 8)
    sigma = max(noise, MIN_NOISE)
    rows = []
    for _ in range(replicates):
        pick = rng.integers(0, n, size=n)
        drawn = _draw_lengths(rng, targets, sample_prompts[pick], lengths[pick], width)
        timed = seconds * np.exp(sigma * rng.standard_normal(len(seconds)))
        th, _ = fit(features, timed)
        modelled = float(np.dot(th, features[anchor]))
        scale = timed[anchor] / modelled if modelled > 0 else 1.0
        f = run.features_ordered(drawn)
        rows.append((scale * th[0] * f[0], scale * (th[1] * f[1] + th[2] * f[2]), drawn.sum()))
    rows = np.asarray(rows)
    totals = rows[:, 0] + rows[:, 1]
    mid = float(np.median(totals))
    k = int(np.argmin(np.abs(totals - mid)))  # the replicate at the median, for its parts
    low, high = (float(v) for v in np.percentile(totals, PERCENTILES))
    sample_full = features[anchor]
    decode_s = float(theta[1] * sample_full[1] + theta[2] * sample_full[2])
    row_cost = "row_step_s" if run_shape.static else "context_token_s"
    return {
        "seconds": mid,
        "low_seconds": low,
        "high_seconds": high,
        "prefill_seconds": float(rows[k, 0]),
        "decode_seconds": float(rows[k, 1]),
        "completion_tokens": float(np.median(rows[:, 2])),
        "fit": {
            "prefill_s_per_token": float(theta[0]),
            "step_s": float(theta[1]),
            row_cost: float(theta[2]),  # per row-step (static) or per context token per row-step
            "timing_noise": noise,
        },
        "prefill_tokens_per_s": 1 / theta[0] if theta[0] > 0 else None,
        "decode_tokens_per_s": float(lengths.sum()) / decode_s if decode_s > 0 else None,
        "rows_at_once": {"sample": schedules[anchor].rows_at_once, "run": run.rows_at_once},
        "passes": [
            {
                "label": p.label,
                "chunks": len(p.prompts),
                "at_once": p.shape.at_once(len(p.prompts)),
                "max_tokens": p.max_tokens,
                "completion_tokens": int(sum(p.lengths)),
                "seconds": round(p.seconds, 2),
                "modelled_seconds": round(float(np.dot(theta, f)), 2),
                "prompt_tokens": round(f[0]),
                "steps": round(f[1]),
                ("row_steps" if p.shape.static else "context_tokens"): round(f[2]),
                "load_1m": p.load_1m,
            }
            for p, f in zip(passes, features, strict=True)
        ],
        "replicates": replicates,
        "seed": seed,
        "percentiles": list(PERCENTILES),
    }


def run_shape(t: ParallelSummarizerTransform, prompt_tokens: int) -> Shape:
    """How this transform's run keeps requests going at once, for prompts of about this length."""
    provider, max_tokens = t.provider, t.options.max_tokens
    if t.streaming:
        return Shape(static=False, slots=max(1, provider.rows_at_once(t.batch_size, 1, prompt_tokens, max_tokens)))
    if provider.supports_batch:
        one = max(1, provider.rows_at_once(t.batch_size, 1, prompt_tokens, max_tokens))
        parallel = max(1, provider.rows_at_once(t.batch_size, t.max_workers, prompt_tokens, max_tokens) // one)
        return Shape(
            static=True,
            batch_size=t.batch_size,
            rows=lambda rows, longest, new: provider.rows_at_once(rows, 1, longest, new),
            parallel=parallel,
        )
    # Under auto, single calls start at `auto_start` in flight and the tuner moves them from there.
    return Shape(static=False, slots=t.auto_start if t.auto else t.max_workers)


def plan_export(
    paths,
    backend: str = "vllm",
    model: str | None = None,
    *,
    sample: int = 16,
    chunk_size: int = 3500,
    max_length: int = 300,
    batch_size: int | None = None,
    max_workers: int | None = None,
    engine_options: dict | None = None,
    provider=None,
    profile=None,
    monitor=None,
    seed: int = 0,
) -> dict:
    """Count the export, time `sample` of its chunks on the backend in four passes, and project the run with a range."""
    load_at_start = _load()
    engine_options = dict(engine_options or {})
    profile = profile if profile is not None else profile_export(paths, chunk_size)
    if not profile.chunk_tokens:
        raise ValueError(f"{', '.join(profile.inputs)} has no dialogue to summarize: nothing to plan.")
    chunks = sample_chunks(profile.inputs, sample, chunk_size, profile=profile)
    owned = provider is None
    load_seconds = 0.0
    if owned:
        check_options(backend, engine_options)
        start = time.perf_counter()
        provider = get_provider(backend, model=model, **engine_options)
        load_seconds = time.perf_counter() - start
    try:
        from apiana_lab.providers.base import GenerationOptions

        provider.complete("Say hello.", GenerationOptions(max_tokens=4))  # lazy start-up is not throughput

        def transform(length: int, half: bool = False) -> ParallelSummarizerTransform:
            t = ParallelSummarizerTransform(provider, max_workers=max_workers, batch_size=batch_size, max_length=length)
            if not half:
                return t
            if t.streaming or provider.supports_batch:
                size = max(1, math.ceil(min(t.batch_size, len(chunks)) / 2))
                return ParallelSummarizerTransform(
                    provider, max_workers=max_workers, batch_size=size, max_length=length
                )
            size = max(1, math.ceil(min(t.max_workers, len(chunks)) / 2))
            return ParallelSummarizerTransform(provider, max_workers=size, batch_size=batch_size, max_length=length)

        def timed(label: str, t, picked, prompts) -> Pass:
            row, records = measure(t, picked, config=f"plan {label}", monitor=monitor)
            figures[label] = row
            lengths = [r.completion_tokens for r in records]
            shape = run_shape(t, round(statistics.fmean(prompts)))
            return Pass(label, shape, t.options.max_tokens, row["wall_s"], prompts, lengths, row["load_1m"])

        real = transform(max_length)
        prompts = [provider.count_tokens(real.prompt(c)) or c.token_count for c in chunks]
        overhead = round(statistics.median(p - c.token_count for p, c in zip(prompts, chunks, strict=True)))
        export_prompts = [n + overhead for n in profile.chunk_tokens]
        shape = run_shape(real, round(statistics.fmean(export_prompts)))
        figures: dict = {}
        passes = [timed("prefill", transform(1), chunks, prompts), timed("generate", real, chunks, prompts)]
        # The second point on the cost of rows at once: where the run has many more going at once
        # than the sample, measured there (a sample's rows are cheap where the hardware is bound by
        # reading the weights, and the run's may not be); otherwise at half the sample's.
        wide = min(Schedule(export_prompts, shape, max_length).rows_at_once, WIDE_MAX)
        if wide > WIDE_RATIO * Schedule(prompts, shape, max_length).rows_at_once:
            more = sample_chunks(profile.inputs, wide, chunk_size, profile=profile)
            more_prompts = [c.token_count + overhead for c in more]
            passes += [
                timed(f"prefill, {len(more)} chunks", transform(1), more, more_prompts),
                timed(f"generate, {len(more)} chunks", transform(min(max_length, WIDE_TOKENS)), more, more_prompts),
            ]
        else:
            passes += [
                timed("prefill, half as many at once", transform(1, half=True), chunks, prompts),
                timed("generate, half as many at once", transform(max_length, half=True), chunks, prompts),
            ]
    finally:
        if owned:
            provider.close()
    simulated = simulate(export_prompts, passes, shape, max_length, seed=seed)
    return project(
        profile,
        chunks,
        figures["generate"],
        simulated,
        shape=shape,
        overhead=overhead,
        load_seconds=load_seconds,
        load_1m=(load_at_start, _load()),
        backend=backend,
        model=getattr(provider, "model", model),
        settings={
            "sample": len(chunks),
            "chunk_size": chunk_size,
            "max_length": max_length,
            "batch_size": batch_size,
            "max_workers": max_workers,
            "engine_options": engine_options,
            "seed": seed,
        },
        auto_start=real.auto_start if real.auto else None,
    )


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def project(
    profile,
    chunks,
    full: dict,
    simulated: dict,
    *,
    shape: Shape,
    overhead: int = 0,
    load_seconds: float = 0.0,
    load_1m: tuple[float | None, float | None] = (None, None),
    backend: str = "",
    model: str | None = None,
    settings: dict | None = None,
    auto_start: int | None = None,
) -> dict:
    """The plan: the export's counts, the sample's figures, the simulated run with its range, notes."""
    n_all, n_sample = len(profile.chunk_tokens), len(chunks)
    prompt_all = sum(profile.chunk_tokens) + overhead * n_all
    ingest_s = profile.seconds * 1.1  # reading and chunking as measured, plus writing chunks to the store
    fixed = load_seconds + ingest_s
    seconds = fixed + simulated["seconds"]
    low, high = fixed + simulated["low_seconds"], fixed + simulated["high_seconds"]
    mb = profile.bytes / 1e6
    scale = TARGET_MB / mb if mb else 0.0
    at_target = load_seconds + scale * (ingest_s + simulated["seconds"])
    lengths = [n for n in (full.get("completion_tokens_min_max") or [])]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    notes = []
    if n_sample < MIN_SAMPLE:
        notes.append(
            f"rough range: only {n_sample} chunks sampled (fewer than {MIN_SAMPLE}); "
            f"plan with --sample 16 or more for a range that means something"
        )
    spread = (high - low) / seconds if seconds > 0 else 0.0
    if spread > ROUGH_SPREAD:
        notes.append(
            f"rough range: it spans {spread:.0%} of the estimate (timing noise ±{simulated['fit']['timing_noise']:.0%} "
            f"between passes); plan again with a larger --sample on a quiet machine"
        )
    if load_1m[0] is not None and load_1m[0] > BUSY_LOAD * cores:
        notes.append(
            f"busy machine: load {load_1m[0]:.1f} on {cores} cores when the plan started; the rates are a busy "
            f"machine's, and a run on a quieter one will be faster than this range"
        )
    if auto_start is not None:
        notes.append(
            f"batch size auto: projected at the size it starts from ({auto_start}); the run's tuner moves from "
            f"there only where it measures more output tokens/s"
        )
    return {
        "backend": backend,
        "model": model,
        "export": {
            "inputs": profile.inputs,
            "megabytes": round(mb, 2),
            "conversations": profile.totals["conversations"],
            "chunks": n_all,
            "chunk_tokens": sum(profile.chunk_tokens),
            "prompt_tokens": prompt_all,
            "read_and_chunk_seconds": round(profile.seconds, 2),
        },
        "sample": {
            "chunks": n_sample,
            "chunk_tokens": [c.token_count for c in chunks],
            "wall_s": round(full["wall_s"], 2),
            "prompt_tokens": full["prompt_tokens"],
            "completion_tokens": full["completion_tokens"],
            "completion_tokens_min_max": lengths,
            "mean_completion_tokens": round(full["completion_tokens"] / max(1, n_sample), 1),
            "prefill_tokens_per_s": _round(simulated["prefill_tokens_per_s"]),
            "decode_tokens_per_s": _round(simulated["decode_tokens_per_s"]),
            "failed": full["failed"],
            "passes": simulated["passes"],
            "rows_at_once": simulated["rows_at_once"],
            "fit": simulated["fit"],
            "peaks": {k: v for k, v in full.items() if k.startswith("peak_")},
        },
        "projection": {
            "seconds": round(seconds, 1),
            "low_seconds": round(low, 1),
            "high_seconds": round(high, 1),
            "range": f"{PERCENTILES[0]:g}th to {PERCENTILES[1]:g}th percentile of {simulated['replicates']} "
            f"bootstrap replicates (seed {simulated['seed']})",
            "rough": n_sample < MIN_SAMPLE or spread > ROUGH_SPREAD,
            "notes": notes,
            "load_seconds": round(load_seconds, 1),
            "read_and_chunk_seconds": round(ingest_s, 1),
            "prefill_seconds": round(simulated["prefill_seconds"], 1),
            "decode_seconds": round(simulated["decode_seconds"], 1),
            "completion_tokens": round(simulated["completion_tokens"]),
            "at_once": shape.at_once(n_all),
            # Memory does not grow with the export (the run holds ids, not texts): the sample's peak is the run's.
            "peak_memory": {k: v for k, v in full.items() if k.startswith("peak_")},
        },
        "machine": {"cores": cores, "load_1m_at_start": load_1m[0], "load_1m_at_end": load_1m[1]},
        "target": {
            "megabytes": TARGET_MB,
            "seconds": TARGET_SECONDS,
            "projected_seconds": round(at_target, 1),
            "met": at_target <= TARGET_SECONDS,
        },
        "settings": settings or {},
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def project_rate(profile, output_tokens_per_s: float, summary_tokens: int) -> dict:
    """A projection from a rate already known (run.json's completion_tokens_per_s), without running anything.

    Every chunk is taken to write `summary_tokens` new tokens at `output_tokens_per_s`. A rate
    from a whole run already includes its prefill, so it holds for prompts of similar length;
    for a range and a split into prefill and decode, measure a sample (`plan_export`).
    """
    if not output_tokens_per_s > 0 or summary_tokens < 1:
        raise ValueError(
            f"need a positive rate and summary length, not {output_tokens_per_s!r} tok/s and {summary_tokens!r} tokens"
        )
    n_all = len(profile.chunk_tokens)
    ingest_s = profile.seconds * 1.1
    generate_s = n_all * summary_tokens / output_tokens_per_s
    mb = profile.bytes / 1e6
    at_target = (TARGET_MB / mb if mb else 0.0) * (ingest_s + generate_s)
    return {
        "backend": None,
        "model": None,
        "export": {
            "inputs": profile.inputs,
            "megabytes": round(mb, 2),
            "conversations": profile.totals["conversations"],
            "chunks": n_all,
            "chunk_tokens": sum(profile.chunk_tokens),
            "prompt_tokens": sum(profile.chunk_tokens),
            "read_and_chunk_seconds": round(profile.seconds, 2),
        },
        "sample": None,
        "rate": {"output_tokens_per_s": output_tokens_per_s, "summary_tokens": summary_tokens},
        "projection": {
            "seconds": round(ingest_s + generate_s, 1),
            "read_and_chunk_seconds": round(ingest_s, 1),
            "generate_seconds": round(generate_s, 1),
            "completion_tokens": n_all * summary_tokens,
            "peak_memory": {},
        },
        "target": {
            "megabytes": TARGET_MB,
            "seconds": TARGET_SECONDS,
            "projected_seconds": round(at_target, 1),
            "met": at_target <= TARGET_SECONDS,
        },
        "settings": {"chunk_size": profile.chunk_size},
    }


def format_plan(plan: dict) -> str:
    """The plan as the short table `apiana-lab plan` prints."""
    e, s, p, t = plan["export"], plan["sample"], plan["projection"], plan["target"]
    lines = [
        f"export:      {e['megabytes']} MB, {e['conversations']} conversations, {e['chunks']} chunks, "
        f"{e['prompt_tokens']:,} prompt tokens (read and chunked in {e['read_and_chunk_seconds']} s)",
    ]
    if s is None:  # from a given rate (project_rate)
        r = plan["rate"]
        lines += [
            f"rate:        {r['output_tokens_per_s']:,} output tok/s given, {r['summary_tokens']} tokens per summary",
            f"projection:  {_duration(p['seconds'])}: read {p['read_and_chunk_seconds']} s "
            f"+ generate {p['generate_seconds']} s",
        ]
    else:
        m = plan["machine"]
        timed = ", ".join(f"{x['label']} {x['seconds']} s ({x['at_once']})" for x in s["passes"])
        lines += [
            f"sample:      {s['chunks']} chunks ({min(s['chunk_tokens'])}-{max(s['chunk_tokens'])} tokens) on "
            f"{plan['backend']}: prefill {_rate(s['prefill_tokens_per_s'])}, decode {_rate(s['decode_tokens_per_s'])}, "
            f"{s['mean_completion_tokens']} tokens per summary "
            f"({'-'.join(map(str, s['completion_tokens_min_max']))})",
            f"passes:      {timed}; timing noise ±{s['fit']['timing_noise']:.1%}",
            f"projection:  {_duration(p['seconds'])} "
            f"(95% range {_duration(p['low_seconds'])} to {_duration(p['high_seconds'])}): "
            f"load {p['load_seconds']} s + read {p['read_and_chunk_seconds']} s + prefill {p['prefill_seconds']} s "
            f"+ decode {p['decode_seconds']} s, {p['at_once']}",
            f"machine:     load {_load_text(m['load_1m_at_start'])} when the plan started, "
            f"{_load_text(m['load_1m_at_end'])} when it ended ({m['cores']} cores); the range assumes the run "
            f"sees the same",
        ]
        lines += [f"note:        {note}" for note in p["notes"]]
    peaks = p["peak_memory"]
    if peaks:
        lines.append(
            "memory:      "
            + ", ".join(f"{k.removeprefix('peak_')} {v:,.0f}" for k, v in peaks.items())
            + " (flat in export size: the sample's peak is the run's)"
        )
    verdict = "met" if t["met"] else "NOT met"
    lines.append(
        f"target:      a {t['megabytes']} MB export like this one: {_duration(t['projected_seconds'])} "
        f"(target under {_duration(t['seconds'])}: {verdict} on this hardware)"
    )
    return "\n".join(lines)


def _rate(tokens_per_s: float | None) -> str:
    return "n/a" if tokens_per_s is None else f"{tokens_per_s:,} tok/s"


def _load_text(load: float | None) -> str:
    return "n/a" if load is None else f"{load:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
