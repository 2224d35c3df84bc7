"""The parallel summarizer on the fake provider: batching, ordering, OOM, retries, isolation, the pipeline, the CLI."""

from __future__ import annotations

import json
import random
import re
import threading
import time

import pytest
from helpers import expected_summary, make_chunks

from apiana_lab.cli import export_v2_main
from apiana_lab.pipeline import RunConfig, run_export
from apiana_lab.providers import fake
from apiana_lab.providers.fake import FakeProvider
from apiana_lab.store import SQLiteStore
from apiana_lab.summarize import ParallelSummarizerTransform


def summarizer(provider, **kw):
    kw.setdefault("sleep", lambda s: None)  # no real sleeping between retries
    return ParallelSummarizerTransform(provider, **kw)


def chunk_of(text, chunks):
    """The chunk whose prompt this is (the fake's history keeps the rendered user prompt)."""
    tag = re.search(r"chunk-\d+ ", text).group(0)
    return next(c for c in chunks if c.text.startswith(tag))


def ok_calls(provider):
    return [h for h in provider.history if h["error"] is None]


# ---- batching and concurrency --------------------------------------------------------------


def test_native_batching_gets_batches_of_batch_size_through_complete_batch():
    chunks = make_chunks(20)
    provider = FakeProvider(batch=True)
    t = summarizer(provider, batch_size=8, max_workers=2)
    results = list(t(chunks))  # __call__ must be the parallel run, not the sequential baseline's
    assert sorted(len(h["prompts"]) for h in provider.history) == [4, 8, 8]
    assert sorted(r.chunk_id for _, r in results) == [c.id for c in chunks]
    assert all(r.error is None for _, r in results)


def test_without_native_batching_max_workers_calls_really_overlap():
    chunks = make_chunks(8)
    provider = FakeProvider(batch=False, latency=0.2)
    t = summarizer(provider, batch_size=16, max_workers=4)
    start = time.perf_counter()
    records = t.transform(chunks)
    wall = time.perf_counter() - start
    calls = provider.history
    assert len(calls) == 8 and all(len(h["prompts"]) == 1 for h in calls)
    overlap = max(sum(1 for o in calls if o["start"] <= h["start"] < o["end"]) for h in calls)
    assert overlap == 4  # four at once, never more
    assert len({h["thread"] for h in calls}) == 4
    serial = sum(h["end"] - h["start"] for h in calls)
    assert serial >= 1.6 and wall < serial / 2
    assert all(r.error is None for r in records)


def test_longest_prompts_go_first_and_transform_returns_input_order():
    chunks = make_chunks(30, seed=1)
    provider = FakeProvider(batch=True)
    t = summarizer(provider, batch_size=4, max_workers=1)
    records = t.transform(chunks)
    longest = sorted(chunks, key=lambda c: -provider.count_tokens(t.prompt(c)))[:4]
    first = {chunk_of(p, chunks).id for p in provider.history[0]["prompts"]}
    assert first == {c.id for c in longest}
    # Completion order followed the sort, so input order is transform()'s doing.
    assert [r.chunk_id for r in records] == [c.id for c in chunks]
    assert [r.summary for r in records] == [expected_summary(t, c) for c in chunks]


def test_run_streams_each_batch_as_it_completes():
    release = threading.Event()
    calls = []

    def gate(_seconds):  # the first call returns at once; later ones wait for the test
        calls.append(1)
        if len(calls) > 1:
            assert release.wait(10)

    provider = FakeProvider(batch=True, latency=1, sleep=gate)
    t = summarizer(provider, batch_size=2, max_workers=1)
    stream = t.run(make_chunks(10))
    try:
        first = [next(stream), next(stream)]
        assert sum(h["end"] is not None for h in provider.history) == 1  # the rest are still running
    finally:
        release.set()
    rest = list(stream)
    assert len(first) + len(rest) == 10 and len(provider.history) == 5


def test_workers_wait_for_a_slow_caller_instead_of_piling_results_up():
    """Each finished result holds its chunk's text: a caller slower than the backend must not let them all gather."""
    chunks = make_chunks(600)
    provider = FakeProvider(batch=True)  # answers at once, far faster than the caller below
    t = summarizer(provider, batch_size=8, max_workers=2)
    lag = taken = 0
    for taken, _ in enumerate(t.run(chunks), 1):
        time.sleep(0.001)  # a caller that profiles and stores each summary
        lag = max(lag, sum(len(h["prompts"]) for h in provider.history) - taken)
    assert taken == 600 and sum(len(h["prompts"]) for h in provider.history) == 600
    # A window of 64 waiting results, plus the batch each worker may have running: never the whole run.
    assert lag <= 64 + 2 * 8, lag


# ---- out of memory -------------------------------------------------------------------------


def test_oom_halves_the_batch_retries_the_same_chunks_and_grows_back_step_by_step():
    chunks = make_chunks(100, seed=2)
    provider = FakeProvider(batch=True)
    provider.enqueue_failure("oom", times=2)
    t = summarizer(provider, batch_size=16, max_workers=1, grow_after=2)
    records = t.transform(chunks)
    h = provider.history
    assert [len(c["prompts"]) for c in h] == [16, 8, 4, 4, 8, 8, 16, 16, 16, 16, 12]
    assert h[1]["prompts"] == h[0]["prompts"][:8]  # the same chunks, retried smaller
    assert h[2]["prompts"] + h[3]["prompts"] == h[1]["prompts"]
    changes = [(c["from"], c["to"]) for c in t.stats.batch_size_changes]
    assert changes == [(16, 8), (8, 4), (4, 8), (8, 16)]
    assert t.stats.batch_size_changes[0]["reason"] == "out of memory at batch size 16"
    assert "grow back" in t.stats.batch_size_changes[2]["reason"]
    assert all(r.error is None for r in records)
    done = [p for c in ok_calls(provider) for p in c["prompts"]]
    assert len(done) == len(set(done)) == 100


def test_chunk_that_ooms_alone_fails_as_oom_and_the_rest_go_on():
    chunks = make_chunks(20, seed=3, tags={5: "POISON " + "word " * 100})  # longest, so in the first batch
    provider = FakeProvider(batch=True, fail=lambda text: "oom" if "POISON" in text else None)
    t = summarizer(provider, batch_size=8, max_workers=1)
    records = t.transform(chunks)
    assert records[5].reason == "oom" and "out of memory even at batch size 1" in records[5].error
    assert all(r.error is None for i, r in enumerate(records) if i != 5)
    assert t.stats.failures_by_reason == {"oom": 1} and t.stats.computed == 19
    assert [(c["from"], c["to"]) for c in t.stats.batch_size_changes[:3]] == [(8, 4), (4, 2), (2, 1)]


# ---- transient and permanent errors --------------------------------------------------------


def test_transient_errors_retry_with_growing_jittered_backoff():
    delays = []
    provider = FakeProvider(batch=True)
    provider.enqueue_failure("transient", times=3)
    t = ParallelSummarizerTransform(
        provider, batch_size=4, max_workers=1, max_retries=3, base_delay=1.0, sleep=delays.append
    )
    records = t.transform(make_chunks(4))
    assert all(r.error is None and r.attempts == 4 for r in records)
    assert len(delays) == 3 and t.stats.retries == 3
    for k, d in enumerate(delays):  # retry k+1 waits between half and all of base * 2**k
        assert 2**k / 2 <= d <= 2**k
    assert delays[0] < delays[1] < delays[2]


def test_backoff_is_jittered_within_bounds_and_capped():
    t = ParallelSummarizerTransform(FakeProvider(), base_delay=0.5, max_delay=4.0, rng=random.Random(7))
    for attempt in range(1, 7):
        cap = min(4.0, 0.5 * 2 ** (attempt - 1))
        samples = [t.backoff(attempt) for _ in range(50)]
        assert all(cap / 2 <= s <= cap for s in samples)
        assert max(samples) - min(samples) > cap / 10  # jittered, not a fixed delay


def test_transient_failure_gives_up_after_max_retries_for_that_batch_only():
    delays = []
    chunks = make_chunks(6, words=(10, 10), tags={0: "FLAKY extra words"})  # longest: first batch
    provider = FakeProvider(batch=True, fail=lambda text: "transient" if "FLAKY" in text else None)
    t = ParallelSummarizerTransform(provider, batch_size=3, max_workers=1, max_retries=2, sleep=delays.append)
    records = t.transform(chunks)
    failed = [r for r in records if r.error]
    assert [r.chunk_id for r in failed] == ["id-0000", "id-0001", "id-0002"]  # the whole batch, after 1 + 2 tries
    assert all(r.reason == "transient" and "gave up after 2 retries" in r.error for r in failed)
    assert all(r.error is None for r in records[3:])
    assert sum("FLAKY" in p for h in provider.history for p in h["prompts"]) == 3
    assert len(delays) == 2 and t.stats.retries == 2


def test_permanent_failure_is_isolated_and_not_retried():
    delays = []
    chunks = make_chunks(4, tags={2: "BAD"})
    provider = FakeProvider(batch=True, fail=lambda text: "permanent" if "BAD" in text else None)
    t = ParallelSummarizerTransform(provider, batch_size=4, max_workers=1, sleep=delays.append)
    records = t.transform(chunks)
    h = provider.history
    assert len(h[0]["prompts"]) == 4 and h[0]["error"] == "permanent"
    assert [len(c["prompts"]) for c in h[1:]] == [1, 1, 1, 1]  # each chunk alone, once
    assert sum("BAD" in c["prompts"][0] for c in h[1:]) == 1
    assert records[2].reason == "permanent" and records[2].attempts == 1
    assert all(r.error is None for i, r in enumerate(records) if i != 2)
    assert delays == [] and t.stats.retries == 0


def test_too_long_prompt_fails_without_calling_the_provider():
    class SmallContextFake(FakeProvider):
        max_context = 300

    chunks = make_chunks(6, words=(10, 20), tags={3: "LONG " + "word " * 400})
    provider = SmallContextFake(batch=True)
    t = summarizer(provider, batch_size=4, max_length=50)
    records = t.transform(chunks)
    assert records[3].reason == "too_long" and "--chunk-size" in records[3].error
    assert not any("LONG" in p for h in provider.history for p in h["prompts"])
    assert all(r.error is None for i, r in enumerate(records) if i != 3)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_failure_patterns_lose_and_duplicate_nothing(seed):
    rng = random.Random(seed)
    n = 300
    fates = {i: rng.choices(["ok", "permanent", "oom", "flaky"], weights=[80, 5, 5, 10])[0] for i in range(n)}
    chunks = make_chunks(n, seed=seed, tags={i: f.upper() + "-FATE" for i, f in fates.items() if f != "ok"})
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def fail(text):
        if "PERMANENT-FATE" in text:
            return "permanent"
        if "OOM-FATE" in text:
            return "oom"
        if "FLAKY-FATE" in text:  # fails the first call that reaches it, then works
            with lock:
                seen[text] = seen.get(text, 0) + 1
                return "transient" if seen[text] == 1 else None
        return None

    provider = FakeProvider(batch=True, oom_above=5, fail=fail)
    t = summarizer(provider, batch_size=8, max_workers=3, grow_after=2, max_retries=10)
    pairs = list(t.run(chunks))
    assert sorted(c.id for c, _ in pairs) == [c.id for c in chunks]  # each exactly once
    assert all(c.id == r.chunk_id for c, r in pairs)
    by_id = {r.chunk_id: r for _, r in pairs}
    for i, c in enumerate(chunks):
        r = by_id[c.id]
        if fates[i] in ("ok", "flaky"):
            assert r.error is None and r.summary == expected_summary(t, c)
        else:
            assert r.reason == fates[i]
    assert t.stats.computed + t.stats.failed == n
    assert t.stats.batch_size_changes  # oom_above=5 under batch_size=8 forces shrinking
    assert all(len(h["prompts"]) <= 5 for h in ok_calls(provider))


# ---- the pipeline and the command line -----------------------------------------------------


def test_run_export_writes_run_json_with_the_figures(dialogue_export, tmp_path):
    config = RunConfig(
        input=str(dialogue_export),
        output=str(tmp_path / "out"),
        backend="fake",
        chunk_size=64,
        batch_size=8,
        max_workers=2,
    )
    result = run_export(config, provider=FakeProvider(batch=True, oom_above=4))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run == json.loads(json.dumps(result, default=str))
    assert run["chunks_total"] == 144
    assert (run["summaries_computed"], run["summaries_reused"], run["failed"]) == (144, 0, 0)
    assert run["batch_size_changes"][0]["from"] == 8 and run["batch_size_changes"][0]["to"] == 4
    lat = run["batch_latency_s"]
    assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"]
    assert run["provider_seconds"] > 0 and run["orchestration_seconds"] >= 0 and run["chunks_per_s"] > 0
    lines = (tmp_path / "out" / "summaries.jsonl").read_text().splitlines()
    assert len(lines) == 144
    with SQLiteStore(tmp_path / "out" / "apiana.sqlite") as store:
        assert store.count("summaries") == 144 and store.count("failures") == 0


def cli(inp, out, *extra):
    return export_v2_main(
        ["-i", str(inp), "-o", str(out), "--backend", "fake", "--chunk-size", "64", "--no-progress", *extra]
    )


def test_cli_exits_0_on_success(dialogue_export, tmp_path, cli_env, capsys):
    assert cli(dialogue_export, tmp_path / "out") == 0
    assert "144 summarized, 0 reused, 0 failed" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "run.json").read_text())["summaries_computed"] == 144


def test_cli_exits_1_when_chunks_fail_and_a_rerun_retries_only_those(dialogue_export, tmp_path, cli_env, capsys):
    class FailingFake(FakeProvider):  # what `--backend fake` builds, failing every 6th message for good
        def __init__(self, *args, **kwargs):
            super().__init__(
                *args, fail=lambda text: "permanent" if re.search(r"Message \d+-5:", text) else None, **kwargs
            )

    cli_env.setattr(fake, "FakeProvider", FailingFake)
    out = tmp_path / "out"
    assert cli(dialogue_export, out) == 1
    assert "12 chunks failed; rerun the same command" in capsys.readouterr().err
    with SQLiteStore(out / "apiana.sqlite") as store:
        assert store.count("summaries") == 132 and store.count("failures") == 12
    cli_env.setattr(fake, "FakeProvider", FakeProvider)
    assert cli(dialogue_export, out) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["summaries_reused"], run["summaries_computed"], run["failed"]) == (132, 12, 0)
    with SQLiteStore(out / "apiana.sqlite") as store:
        assert store.count("summaries") == 144 and store.count("failures") == 0


@pytest.mark.parametrize("case", ["missing", "invalid_json", "bad_option"])
def test_cli_exits_2_on_bad_input_and_writes_nothing(case, dialogue_export, tmp_path, cli_env, capsys):
    inp, extra = dialogue_export, []
    if case == "missing":
        inp = tmp_path / "nope.json"
    elif case == "invalid_json":
        inp = tmp_path / "bad.json"
        inp.write_text('[{"title": "x", "mapping": ')
    else:
        extra = ["--batch-size", "0"]
    out = tmp_path / "out"
    assert cli(inp, out, *extra) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not out.exists()
