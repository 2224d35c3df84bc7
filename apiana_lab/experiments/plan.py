"""How long will my export take? Count the whole export, measure the backend on a sample, project.

The projection splits a run into its two phases, each measured on the sample:
- prefill: the sample's prompts with one new token give prompt tokens per second; the
  whole export's prompt tokens are counted exactly, so this part is tight;
- decode: the sample's real run minus its prefill gives completion tokens per second; the
  whole export's completion tokens are the sample's mean per chunk times the chunk count.
The range widens the decode part by the sample's uncertainty (two standard errors of the mean
summary length) and, for the low end, by what more concurrent requests would buy: the real
run keeps up to `window` requests in flight, the sample only as many as it has chunks.
"""

from __future__ import annotations

import logging
import math
import statistics
import time

from apiana_lab.providers.registry import check_options, get_provider
from apiana_lab.summarize import ParallelSummarizerTransform

from .measure import measure, sample_chunks
from .profile import profile_export

logger = logging.getLogger(__name__)

TARGET_MB, TARGET_SECONDS = 200, 3600  # the project's headline: a 200 MB export in under an hour


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
) -> dict:
    """Count the export, time `sample` of its chunks on the backend, and project the whole run with a range."""
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

        def transform(length: int) -> ParallelSummarizerTransform:
            return ParallelSummarizerTransform(
                provider, max_workers=max_workers, batch_size=batch_size, max_length=length
            )

        real = transform(max_length)
        full, records = measure(real, chunks, config="sample", monitor=monitor)
        prefill, _ = measure(transform(1), chunks, config="sample prefill", monitor=monitor)
        overhead = (provider.count_tokens(real.prompt(chunks[0])) or chunks[0].token_count) - chunks[0].token_count
        window = _in_flight(real, round(statistics.fmean(profile.chunk_tokens)) + overhead)
    finally:
        if owned:
            provider.close()
    return project(
        profile,
        chunks,
        full,
        prefill,
        records,
        window=window,
        overhead=overhead,
        load_seconds=load_seconds,
        backend=backend,
        model=getattr(provider, "model", model),
        settings={
            "sample": len(chunks),
            "chunk_size": chunk_size,
            "max_length": max_length,
            "batch_size": batch_size,
            "max_workers": max_workers,
            "engine_options": engine_options,
        },
    )


def _in_flight(t: ParallelSummarizerTransform, prompt_tokens: int) -> int:
    """How many requests the real run keeps going at once, for prompts of about this length."""
    if t.streaming:
        return t.batch_size
    if t.provider.supports_batch:
        return t.provider.rows_at_once(t.batch_size, t.max_workers, prompt_tokens, t.options.max_tokens)
    return t.max_workers


def project(
    profile,
    chunks,
    full: dict,
    prefill: dict,
    records,
    *,
    window: int,
    overhead: int = 0,
    load_seconds: float = 0.0,
    backend: str = "",
    model: str | None = None,
    settings: dict | None = None,
) -> dict:
    """The projection from a sample's two measured runs (see the module docstring)."""
    n_all, n_sample = len(profile.chunk_tokens), len(chunks)
    prompt_all = sum(profile.chunk_tokens) + overhead * n_all
    prefill_rate = prefill["prompt_tokens"] / prefill["wall_s"]
    decode_seconds = max(full["wall_s"] - full["prompt_tokens"] / prefill_rate, 0.05 * full["wall_s"])
    decode_rate = max(full["completion_tokens"], 1) / decode_seconds
    lengths = [r.completion_tokens for r in records if r.error is None] or [0]
    mean = statistics.fmean(lengths)
    spread = 2 * (statistics.stdev(lengths) if len(lengths) > 1 else mean) / math.sqrt(len(lengths))
    completion_all = mean * n_all
    prefill_s = prompt_all / prefill_rate
    ingest_s = profile.seconds * 1.1  # reading and chunking as measured, plus writing chunks to the store
    # More requests in flight than the sample could have: decode gets cheaper per token, up to that ratio.
    concurrency_gain = max(1.0, min(window, n_all) / max(1, min(window, n_sample)))
    # The point estimate takes that gain (decode on these engines is bound by reading the weights
    # once per step, whatever the rows); the high end assumes none.
    decode_s = completion_all / decode_rate / concurrency_gain
    seconds = load_seconds + ingest_s + prefill_s + decode_s
    low = load_seconds + ingest_s + prefill_s + (mean - spread) * n_all / decode_rate / concurrency_gain
    high = load_seconds + ingest_s + prefill_s + (mean + spread) * n_all / decode_rate
    mb = profile.bytes / 1e6
    scale = TARGET_MB / mb if mb else 0.0
    at_target = load_seconds + scale * (ingest_s + prefill_s + decode_s)
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
            "mean_completion_tokens": round(mean, 1),
            "prefill_tokens_per_s": round(prefill_rate, 1),
            "decode_tokens_per_s": round(decode_rate, 1),
            "failed": full["failed"],
            "peaks": {k: v for k, v in full.items() if k.startswith("peak_")},
        },
        "projection": {
            "seconds": round(seconds, 1),
            "low_seconds": round(low, 1),
            "high_seconds": round(high, 1),
            "load_seconds": round(load_seconds, 1),
            "read_and_chunk_seconds": round(ingest_s, 1),
            "prefill_seconds": round(prefill_s, 1),
            "decode_seconds": round(decode_s, 1),
            "decode_concurrency_gain": round(concurrency_gain, 2),
            "completion_tokens": round(completion_all),
            "window": window,
            # Memory does not grow with the export (the run holds ids, not texts): the sample's peak is the run's.
            "peak_memory": {k: v for k, v in full.items() if k.startswith("peak_")},
        },
        "target": {
            "megabytes": TARGET_MB,
            "seconds": TARGET_SECONDS,
            "projected_seconds": round(at_target, 1),
            "met": at_target <= TARGET_SECONDS,
        },
        "settings": settings or {},
    }


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
        lines += [
            f"sample:      {s['chunks']} chunks ({min(s['chunk_tokens'])}-{max(s['chunk_tokens'])} tokens) on "
            f"{plan['backend']}: {s['wall_s']} s; prefill {s['prefill_tokens_per_s']:,} tok/s, "
            f"decode {s['decode_tokens_per_s']:,} tok/s, {s['mean_completion_tokens']} tokens per summary",
            f"projection:  {_duration(p['seconds'])} "
            f"(range {_duration(p['low_seconds'])} to {_duration(p['high_seconds'])}): "
            f"load {p['load_seconds']} s + read {p['read_and_chunk_seconds']} s + prefill {p['prefill_seconds']} s "
            f"+ decode {p['decode_seconds']} s",
        ]
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


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
