"""`apiana-lab plan`'s arithmetic: the simulated run, the fit, the bootstrap range and when it says it is rough."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from apiana_lab.experiments.measure import sample_chunks
from apiana_lab.experiments.plan import (
    MIN_SAMPLE,
    Pass,
    Schedule,
    Shape,
    format_plan,
    plan_export,
    project,
    simulate,
)
from apiana_lab.experiments.profile import profile_export
from apiana_lab.providers.fake import FakeProvider

THETA = (0.002, 0.03, 0.00001)  # seconds per prompt token, per engine step, per context token per row-step
FULL, HALF = Shape(static=False, slots=8), Shape(static=False, slots=4)


def model_seconds(prompts, lengths, shape, max_tokens, theta=THETA) -> float:
    return float(np.dot(theta, Schedule(prompts, shape, max_tokens).features(lengths)))


def four_passes(prompts, lengths, factors=(1.0, 1.0, 1.0, 1.0), max_tokens=100) -> list[Pass]:
    """The four passes plan_export times, with the seconds the model gives times `factors` (the noise)."""
    ones = [1] * len(prompts)
    shapes = ((FULL, 1, ones), (FULL, max_tokens, lengths), (HALF, 1, ones), (HALF, max_tokens, lengths))
    return [
        Pass(f"pass {k}", shape, m, model_seconds(prompts, ls, shape, m) * f, list(prompts), list(ls))
        for k, ((shape, m, ls), f) in enumerate(zip(shapes, factors, strict=True))
    ]


@pytest.fixture
def sample():
    prompts = [120, 180, 240, 300, 360, 420, 480, 540]
    return prompts, [40, 50, 55, 60, 62, 70, 75, 80]


def relative_spread(result: dict) -> float:
    return (result["high_seconds"] - result["low_seconds"]) / result["seconds"]


def test_schedules_count_steps_as_the_run_takes_them():
    # Continuous: 10 requests of 20 steps, 4 in flight: three rounds (4, 4, 2), so 60 steps. Each row reads its
    # context on every step after the first token: prompt + 1, ..., prompt + 19.
    prompts = list(range(100, 200, 10))
    context = sum(19 * p + sum(range(1, 20)) for p in prompts)
    assert Schedule(prompts, Shape(static=False, slots=4), 20).features([20] * 10) == (sum(prompts), 60, context)
    # A prefill pass (one new token) reads no context after its prefill.
    assert Schedule(prompts, Shape(static=False, slots=4), 1).features([1] * 10)[2] == 0
    # Static: batches of 4, longest prompt first; a group pads to its longest prompt and steps until its
    # longest summary ends. Prompts 8..1 (x10) with these summary lengths, in input order.
    prompts = [10, 20, 30, 40, 50, 60, 70, 80]
    lengths = [5, 5, 5, 90, 30, 10, 20, 40]
    p, steps, row_steps = Schedule(prompts, Shape(static=True, batch_size=4), 100).features(lengths)
    assert (p, steps, row_steps) == (4 * 80 + 4 * 40, 40 + 90, 4 * 40 + 4 * 90)
    # A backend that runs two rows of a batch at once cuts each batch in two groups.
    two = Shape(static=True, batch_size=4, rows=lambda rows, longest, new: 2)
    assert Schedule(prompts, two, 100).features(lengths) == (2 * (80 + 60 + 40 + 20), 40 + 30 + 90 + 5, 2 * 165)


def test_the_fit_recovers_the_costs_and_the_projection_is_the_model_run(sample):
    prompts, lengths = sample
    lengths = [60] * len(prompts)  # one summary length: nothing for the bootstrap to draw differently
    export = [p for p in prompts for _ in range(6)]
    run = Shape(static=False, slots=32)
    result = simulate(export, four_passes(prompts, lengths), run, 100, seed=0)
    assert [result["fit"][k] for k in ("prefill_s_per_token", "step_s", "context_token_s")] == pytest.approx(THETA)
    assert result["fit"]["timing_noise"] == pytest.approx(0, abs=1e-9)
    # 48 chunks of 60 new tokens, 32 in flight: 120 steps; the run costs what the model says it does.
    expected = model_seconds(export, [60] * 48, run, 100)
    assert result["seconds"] == pytest.approx(expected, rel=0.01)
    assert result["prefill_seconds"] + result["decode_seconds"] == pytest.approx(expected, rel=0.02)
    # More rows at once than the sample had: decode per token is cheaper than the sample's (a is shared).
    sample_rate = result["decode_tokens_per_s"]
    run_rate = 48 * 60 / (result["seconds"] - THETA[0] * sum(export))
    assert run_rate > 1.3 * sample_rate


def test_the_bootstrap_is_deterministic_with_a_seed(sample):
    prompts, lengths = sample
    passes = four_passes(prompts, lengths, (1.05, 0.97, 0.98, 1.04))
    export = prompts * 5
    a = simulate(export, passes, FULL, 100, seed=3)
    b = simulate(export, passes, FULL, 100, seed=3)
    c = simulate(export, passes, FULL, 100, seed=4)
    assert a == b
    assert (c["low_seconds"], c["high_seconds"]) != (a["low_seconds"], a["high_seconds"])


def test_the_range_widens_with_noisier_timings_and_with_more_varied_summaries(sample):
    prompts, lengths = sample
    export = prompts * 5
    steady = simulate(export, four_passes(prompts, lengths, (1.01, 0.99, 1.0, 1.0)), FULL, 100)
    noisy = simulate(export, four_passes(prompts, lengths, (1.2, 0.85, 0.9, 1.15)), FULL, 100)
    assert noisy["fit"]["timing_noise"] > 5 * steady["fit"]["timing_noise"]
    assert relative_spread(noisy) > 2 * relative_spread(steady)
    assert steady["low_seconds"] < steady["seconds"] < steady["high_seconds"]
    # Same mean summary length, spread from 5 to 115 tokens instead of 55 to 65.
    even = [55, 65] * 4
    varied = [5, 115, 10, 110, 20, 100, 30, 90]
    narrow = simulate(export, four_passes(prompts, even), FULL, 100)
    wide = simulate(export, four_passes(prompts, varied), FULL, 100)
    assert relative_spread(wide) > 1.5 * relative_spread(narrow)


def test_a_small_sample_or_a_wide_range_says_the_range_is_rough(dialogue_export):
    profile = profile_export(dialogue_export, chunk_size=64)
    for n in (MIN_SAMPLE - 3, 12):
        chunks = sample_chunks(dialogue_export, n, chunk_size=64, profile=profile)
        prompts = [c.token_count for c in chunks]
        lengths = [8] * n
        passes = four_passes(prompts, lengths, (1.01, 0.99, 1.0, 1.0), max_tokens=16)
        simulated = simulate(profile.chunk_tokens, passes, FULL, 16)
        full = {"wall_s": passes[1].seconds, "prompt_tokens": sum(prompts), "completion_tokens": 8 * n, "failed": 0}
        quiet = project(profile, chunks, full | {"completion_tokens_min_max": [8, 8]}, simulated, shape=FULL)
        assert quiet["projection"]["rough"] is (n < MIN_SAMPLE)
        text = format_plan(quiet)
        assert (f"note:        rough range: only {n} chunks sampled" in text) is (n < MIN_SAMPLE)
        assert "busy machine" not in text and "machine:     load n/a" in text
    load = 4.0 * len(os.sched_getaffinity(0))  # twice the cores' worth of work waiting, on any machine
    busy = project(
        profile, chunks, full | {"completion_tokens_min_max": [8, 8]}, simulated, shape=FULL, load_1m=(load, 1)
    )
    assert f"note:        busy machine: load {load:.1f} on" in format_plan(busy)
    assert busy["machine"]["load_1m_at_start"] == load and busy["projection"]["rough"] is False


def test_plan_on_the_fake_times_four_passes_and_flags_a_small_sample(dialogue_export):
    """Orchestration only: the fake's latency is per call, which no engine's is, so its range is wide."""
    provider = FakeProvider(batch=False, latency=0.05)
    plan = plan_export(
        dialogue_export, "fake", sample=4, chunk_size=64, max_length=16, max_workers=4, provider=provider
    )
    passes = plan["sample"]["passes"]
    assert [p["max_tokens"] for p in passes] == [1, 16, 1, 16]
    assert [p["at_once"] for p in passes] == ["4 in flight", "4 in flight", "2 in flight", "2 in flight"]
    # Twice the rounds at half the concurrency: the fake's per-call latency shows in the measured seconds.
    assert passes[2]["seconds"] > 1.5 * passes[0]["seconds"]
    p = plan["projection"]
    assert p["low_seconds"] <= p["seconds"] <= p["high_seconds"] and p["rough"] is True
    assert any(n.startswith("rough range: only 4 chunks sampled") for n in p["notes"])
    assert json.loads(json.dumps(plan))["sample"]["fit"]["timing_noise"] >= 0


def test_a_run_wider_than_the_sample_is_timed_at_its_width(dialogue_export):
    """A streaming fake with 16 in flight against a sample of 4: the second pair runs 16 distinct chunks."""
    provider = FakeProvider(stream=True, window=16)
    plan = plan_export(dialogue_export, "fake", sample=4, chunk_size=64, max_length=16, provider=provider)
    passes = plan["sample"]["passes"]
    assert [(p["chunks"], p["max_tokens"], p["at_once"]) for p in passes] == [
        (4, 1, "4 in flight"),
        (4, 16, "4 in flight"),
        (16, 1, "16 in flight"),
        (16, 16, "16 in flight"),
    ]
    assert plan["sample"]["rows_at_once"] == {"sample": 4, "run": 16}
    assert plan["projection"]["at_once"] == "16 in flight"


@pytest.mark.parametrize("batch", [False, True])
def test_under_auto_the_plan_projects_where_the_tuner_starts_and_says_so(dialogue_export, batch):
    """Auto's single calls may reach 256 in flight, but the run starts at the provider's window and the
    projection must too (not at the ceiling); a batching backend starts at its default rows per batch."""
    provider = FakeProvider(batch=batch, window=6)
    plan = plan_export(
        dialogue_export, "fake", sample=4, chunk_size=64, max_length=16, batch_size="auto", provider=provider
    )
    at_once = plan["projection"]["at_once"]
    assert at_once == ("batches of 6, 2 at a time" if batch else "6 in flight"), at_once
    assert "batch size auto: projected at the size it starts from (6)" in format_plan(plan)
    fixed = plan_export(
        dialogue_export, "fake", sample=4, chunk_size=64, max_length=16, batch_size=3, provider=provider
    )
    assert not any(n.startswith("batch size auto") for n in fixed["projection"]["notes"])
