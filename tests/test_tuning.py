"""`--batch-size auto`: the tuner on known throughput curves (fake provider, a virtual clock), its events in
run.json, the flag, and one short run on the real transformers backend."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
from helpers import make_chunks

from apiana_lab.cli import export_v2_main
from apiana_lab.pipeline import RunConfig, run_export
from apiana_lab.providers.fake import FakeProvider
from apiana_lab.summarize import ParallelSummarizerTransform
from apiana_lab.tuning import AUTO_MAX_SIZE, BatchTuner

SAMPLE = Path("apiana_lab/data/sample_export.json").resolve()
TOKENS = 8  # what the fake answers to a prompt of 7 words or more under max_length >= 8


class Curve(FakeProvider):
    """A batch of n takes 1 + (n / peak)^2 seconds of a virtual clock: output tokens/s = 8n / (1 + (n/peak)^2),
    which rises to its peak at n = `peak` and falls beyond it (each neighbour step 20% lower)."""

    def __init__(self, peak: int = 16, noise: float = 0.0, tight_from: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.now = 0.0
        self.peak = peak
        self.noise = random.Random(0) if noise else None
        self.spread = noise
        self.tight_from = tight_from
        self.last = 0

    def complete_batch(self, prompts, options=None):
        self.last = len(prompts)
        n = len(prompts)
        seconds = 1 + (n / self.peak) ** 2
        if self.noise is not None:
            seconds *= 1 + self.noise.uniform(-self.spread, self.spread)
        self.now += seconds
        return super().complete_batch(prompts, options)

    def engine_metrics(self):
        if self.tight_from is None:
            return {}
        return {"kv_cache_usage_perc": 0.99 if self.last >= self.tight_from else 0.5}

    @staticmethod
    def rate(n: int, peak: int = 16) -> float:
        return TOKENS * n / (1 + (n / peak) ** 2)


def tuned(provider: Curve, n: int, **kwargs) -> tuple[ParallelSummarizerTransform, list[int]]:
    """Run n equal chunks under auto, one worker, timed by the provider's virtual clock; the batch sizes sent."""
    t = ParallelSummarizerTransform(
        provider, max_workers=1, batch_size="auto", max_length=16, clock=lambda: provider.now, **kwargs
    )
    records = t.transform(make_chunks(n, words=(10, 10)))
    assert all(r.error is None for r in records) or provider.oom_above is not None
    return t, [len(h["prompts"]) for h in provider.history]


def path(t) -> list[tuple[int, int]]:
    return [(c["from"], c["to"]) for c in t.stats.batch_size_changes]


def test_auto_climbs_to_the_peak_and_stays_there():
    t, sizes = tuned(Curve(window=2), 600)
    assert t.batch_size == 2  # it started at the backend's window
    assert path(t) == [(2, 4), (4, 8), (8, 16), (16, 32), (32, 16)]
    assert t.stats.batch_size_final == 16 and t.stats.batch_size_mode == "auto"
    # Each change carries the throughput measured at the size it left: the known curve.
    assert [c["tokens_per_s"] for c in t.stats.batch_size_changes] == pytest.approx(
        [Curve.rate(n) for n in (2, 4, 8, 16, 32)], rel=1e-3
    )
    # After the step back it holds: every later batch is 16 (the last one is what was left over).
    last = t.stats.batch_size_changes[-1]["at_done"]
    after = sizes[len(sizes) - (600 - last) // 16 - 1 :]
    assert set(after[:-1]) == {16} and len(after) > 20


def test_auto_comes_down_to_the_peak_from_above():
    t, _ = tuned(Curve(window=64), 3000)
    assert path(t) == [(64, 128), (128, 32), (32, 16), (16, 8), (8, 16)]
    assert t.stats.batch_size_final == 16
    assert "holding 16" in t.stats.batch_size_changes[-1]["reason"]


def test_noisy_steady_work_settles_near_the_peak_within_the_bound():
    t, sizes = tuned(Curve(window=2, noise=0.03), 3000)
    changes = t.stats.batch_size_changes
    assert t.stats.batch_size_final in (8, 16, 32)  # the peak, give or take one step
    assert len(changes) <= BatchTuner(2, hi=AUTO_MAX_SIZE).max_changes == 10
    # Settled early and never moved again: no oscillation over the 2,500 chunks after.
    assert changes[-1]["at_done"] < 500
    assert len(set(sizes[-100:-1])) == 1


def test_out_of_memory_is_a_floor_auto_never_climbs_back_to():
    provider = Curve(window=2, oom_above=12)
    t, sizes = tuned(provider, 600)
    reasons = [c["reason"] for c in t.stats.batch_size_changes]
    assert path(t) == [(2, 4), (4, 8), (8, 16), (16, 8)]
    assert reasons[-1] == "out of memory at batch size 16" and "tokens_per_s" not in t.stats.batch_size_changes[-1]
    assert not any("grow back" in r for r in reasons)  # auto replaces the grow-back
    first_oom = next(i for i, h in enumerate(provider.history) if h["error"] == "oom")
    assert max(sizes[first_oom + 1 :]) == 8 and t.stats.computed == 600


def test_tight_memory_steps_back_and_holds():
    t, _ = tuned(Curve(window=2, tight_from=8), 600)
    assert path(t) == [(2, 4), (4, 8), (8, 4)]
    assert t.stats.batch_size_changes[-1]["reason"] == "auto: memory tight at 8"
    assert t.stats.batch_size_final == 4


def test_a_window_skips_the_warm_up_batch_and_restarts_after_a_stale_one():
    tuner = BatchTuner(4, window=2)
    assert tuner.observe(0, 4, 32, now=1.0) is None  # warm-up: shared the engine with what came before
    assert tuner.observe(0, 4, 32, now=2.0) is None  # 4 of the 8 rows a window needs
    step = tuner.observe(0, 4, 32, now=3.0)  # 64 tokens over 2 s after the warm-up
    assert step.size == 8 and step.tokens_per_s == pytest.approx(32.0) and tuner.epoch == 1
    assert tuner.observe(0, 4, 1000, now=3.5) is None  # a batch of the old size: not measured, restarts
    assert tuner.observe(1, 8, 64, now=4.0) is None  # warm-up of the new size
    assert tuner.observe(1, 8, 64, now=5.0) is None
    step = tuner.observe(1, 8, 64, now=6.0)  # 128 tokens over 2 s: 64/s, double
    assert step.size == 16 and step.tokens_per_s == pytest.approx(64.0)


def test_integer_batch_size_is_fixed_as_before():
    provider = FakeProvider()
    t = ParallelSummarizerTransform(provider, max_workers=1, batch_size=4, max_length=16)
    t.transform(make_chunks(40))
    assert [len(h["prompts"]) for h in provider.history] == [4] * 10
    assert t.stats.batch_size_changes == [] and t.stats.batch_size_mode == "fixed"
    assert t.stats.figures()["batch_size_final"] is None


def test_a_streaming_backend_keeps_its_window_under_auto():
    provider = FakeProvider(stream=True, window=24)
    t = ParallelSummarizerTransform(provider, batch_size="auto", max_length=16)
    assert t.streaming and not t.auto and t.batch_size == 24
    t.transform(make_chunks(30))
    assert t.stats.batch_size_mode == "fixed" and provider.max_in_flight == 24


def test_without_batching_auto_tunes_the_requests_in_flight():
    provider = FakeProvider(batch=False, window=2, latency=0.02)  # tokens/s grows with every request in flight
    t = ParallelSummarizerTransform(provider, batch_size="auto", max_workers=8, max_length=16)
    snapshots = []
    t.transform(make_chunks(120, words=(10, 10)))
    assert path(t) == [(2, 4), (4, 8)] and t.stats.batch_size_final == 8  # up to --max-workers, its ceiling
    rates = [c["tokens_per_s"] for c in t.stats.batch_size_changes]
    assert rates[1] > 1.5 * rates[0]
    calls = sorted((h["start"], h["end"]) for h in provider.history)
    most = max(sum(a <= s < b for a, b in calls) for s, _ in calls)
    assert 5 <= most <= 8  # never more requests at once than auto allowed
    t = ParallelSummarizerTransform(provider, batch_size="auto", max_workers=8, max_length=16)
    for _ in t.run(make_chunks(60, words=(10, 10)), progress=snapshots.append):
        pass
    events = [p.event for p in snapshots if p.event.startswith("in flight")]
    assert events and events[0].startswith("in flight 2 -> 4 (auto: ") and {2, 4} <= {p.batch_size for p in snapshots}
    assert threading.active_count() < 20  # its threads are gone


def test_run_json_records_auto_and_each_change_with_its_throughput(dialogue_export, tmp_path):
    config = RunConfig(input=str(dialogue_export), output=str(tmp_path / "out"), backend="fake", chunk_size=64)
    assert config.batch_size == "auto"  # the default
    run_export(config, provider=FakeProvider(window=2, latency=0.02))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (run["batch_size_mode"], run["batch_size"], run["summaries_computed"]) == ("auto", 2, 144)
    changes = run["batch_size_changes"]
    assert changes and changes[0]["from"] == 2 and changes[0]["to"] == 4
    assert all(c["reason"].startswith("auto: ") and c["tokens_per_s"] > 0 for c in changes)
    assert run["batch_size_final"] == changes[-1]["to"]


def test_run_json_for_a_backend_without_batching_tunes_requests_in_flight(dialogue_export, tmp_path):
    config = RunConfig(input=str(dialogue_export), output=str(tmp_path / "out"), backend="fake", chunk_size=64)
    run_export(config, provider=FakeProvider(batch=False, window=4))  # as the openai backend: single requests
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (run["mode"], run["batch_size_mode"], run["batch_size"]) == ("concurrent", "auto", 4)
    assert run["max_workers"] == AUTO_MAX_SIZE and 1 <= run["batch_size_final"] <= AUTO_MAX_SIZE


def cli(inp, out, *extra):
    return export_v2_main(["-i", str(inp), "-o", str(out), "--no-progress", *extra])


def test_cli_batch_size_is_auto_by_default_and_an_integer_stays_fixed(dialogue_export, tmp_path, cli_env, capsys):
    fake = ("--backend", "fake", "--chunk-size", "64")
    for name, extra in (("default", ()), ("auto", ("--batch-size", "auto")), ("four", ("--batch-size", "4"))):
        assert cli(dialogue_export, tmp_path / name, *fake, *extra) == 0
    out = capsys.readouterr().out
    runs = {name: json.loads((tmp_path / name / "run.json").read_text()) for name in ("default", "auto", "four")}
    assert runs["default"]["batch_size_mode"] == runs["auto"]["batch_size_mode"] == "auto"
    assert runs["default"]["batch_size"] == 16 and "parallel, batch 16 (auto" in out
    assert (runs["four"]["batch_size_mode"], runs["four"]["batch_size"], runs["four"]["batch_size_changes"]) == (
        "fixed",
        4,
        [],
    )
    assert "parallel, batch 4, 2 workers" in out
    with pytest.raises(SystemExit) as exit_:
        cli(dialogue_export, tmp_path / "bad", *fake, "--batch-size", "many")
    assert exit_.value.code == 2 and "'auto' or a whole number" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_transformers_runs_under_auto_by_default(tmp_path, cli_env):
    out = tmp_path / "out"
    args = ("--backend", "transformers", "--limit", "4", "--max-length", "16", "--chunk-size", "200")
    assert cli(SAMPLE, out, *args) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["batch_size_mode"], run["summaries_computed"], run["failed"]) == ("auto", 4, 0)
    # It starts where the fixed default is (16 per batch): four chunks are one batch, too few to tune.
    assert (run["batch_size"], run["batches"], run["batch_size_changes"], run["batch_size_final"]) == (16, 1, [], 16)
    rows = [json.loads(line) for line in (out / "summaries.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["summary"] and r["completion_tokens"] > 0 for r in rows)


def test_the_live_figure_draws_autos_batch_sizes_beside_the_throughput():
    from apiana_lab.monitor import MemoryMonitor
    from apiana_lab.notebook import plot_monitor

    provider = FakeProvider(window=2, latency=0.01)
    t = ParallelSummarizerTransform(provider, max_workers=1, batch_size="auto", max_length=16)
    with MemoryMonitor(provider, interval=0.05) as monitor:
        for _ in t.run(make_chunks(60, words=(10, 10)), progress=monitor.progress):
            pass
    assert t.stats.batch_size_changes
    figure = plot_monitor(monitor)
    (sizes,) = [ax for ax in figure.axes if ax.get_ylabel() == "batch size"]
    drawn = sizes.get_lines()[0].get_ydata()
    assert list(drawn) == monitor.progress_frame()["batch_size"].tolist()
    assert {c["to"] for c in t.stats.batch_size_changes} <= set(drawn)
    assert any(e["event"].startswith("batch size 2 -> 4 (auto: ") for e in monitor.events)
