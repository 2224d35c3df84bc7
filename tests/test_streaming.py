"""The transform's streaming path on the fake's simulated engine: no barrier, order, window, retries, faults."""

from __future__ import annotations

import random
import re

import pytest
from helpers import expected_summary, make_chunks

from apiana_lab.chunking import ChunkRef
from apiana_lab.errors import FatalProviderError, TransientProviderError
from apiana_lab.providers.fake import FakeProvider
from apiana_lab.summarize import ParallelSummarizerTransform


def streamer(provider, **kw):
    kw.setdefault("sleep", lambda s: None)
    return ParallelSummarizerTransform(provider, **kw)


def index_of(text):
    return int(re.search(r"chunk-(\d+) ", text).group(1))


def test_streaming_is_chosen_when_the_provider_has_it_and_the_window_defaults_to_the_backend():
    provider = FakeProvider(stream=True, window=24)
    t = streamer(provider)
    assert t.streaming and t.batch_size == 24  # no flag: the backend's own window
    records = t.transform(make_chunks(40))
    assert t.stats.mode == "stream" and all(r.error is None for r in records)
    assert provider.max_in_flight == 24  # the window was kept full, never more
    assert streamer(provider, batch_size=5).batch_size == 5
    assert not streamer(provider, stream=False).streaming  # today's batch path stays reachable for A/B runs


def test_results_come_in_completion_order_from_run_and_input_order_from_transform():
    chunks = make_chunks(30, seed=4, tags={0: "SLOW " + "word " * 80})
    # The longest chunk goes first and needs 12 engine steps; every other one needs 1.
    provider = FakeProvider(stream=True, steps=lambda text: 12 if "SLOW" in text else 1)
    t = streamer(provider, batch_size=4)
    order = [c.id for c, _ in t.run(chunks)]
    sent = [index_of(h["prompts"][0]) for h in provider.history]
    assert sorted(order) == sorted(c.id for c in chunks)  # each exactly once
    assert sent[:4] == sorted(range(30), key=lambda i: -chunks[i].token_count)[:4] and sent[0] == 0  # longest first
    # No barrier: while the slow one runs, the other three slots keep turning over.
    assert order[-1] == "id-0000"  # sent first, back last: the other 29 went through the free slots meanwhile
    assert order[:3] == [chunks[i].id for i in sent[1:4]]
    records = t.transform(chunks)
    assert [r.chunk_id for r in records] == [c.id for c in chunks]
    assert [r.summary for r in records] == [expected_summary(t, c) for c in chunks]


def test_progress_moves_chunk_by_chunk():
    seen = []
    t = streamer(FakeProvider(stream=True), batch_size=4)
    t.transform(make_chunks(12))
    list(t.run(make_chunks(12), progress=seen.append))
    assert seen[0].event == "start" and seen[0].done == 0
    assert [p.done for p in seen[1:-1]] == list(range(1, 13))  # one snapshot per finished chunk
    assert seen[-1].finished and seen[-1].error == "" and seen[-1].done == 12
    assert t.stats.first_result_seconds is not None and t.stats.first_result_seconds <= t.stats.seconds


def test_a_failed_request_is_retried_alone_with_backoff():
    tries: dict[str, int] = {}

    def flaky(text):  # chunks 3 and 7 fail on their first try only
        if re.search(r"chunk-[37] ", text):
            tries[text] = tries.get(text, 0) + 1
            return "transient" if tries[text] == 1 else None
        return None

    delays = []
    provider = FakeProvider(stream=True, fail=flaky)
    t = ParallelSummarizerTransform(provider, batch_size=4, sleep=delays.append, max_retries=2)
    records = t.transform(make_chunks(10))
    assert all(r.error is None for r in records)
    assert [records[3].attempts, records[7].attempts] == [2, 2] and records[0].attempts == 1
    assert t.stats.retries == 2
    sent = [index_of(h["prompts"][0]) for h in provider.history]
    assert sorted(sent) == sorted(list(range(10)) + [3, 7])  # only the failed ones went twice


def test_retry_after_is_honoured_and_gives_up_after_max_retries():
    waits = []
    provider = FakeProvider(stream=True, fail=lambda text: "transient" if "chunk-2 " in text else None)
    t = ParallelSummarizerTransform(provider, batch_size=4, max_retries=2, base_delay=0.001, sleep=waits.append)
    original = provider.stream

    def with_retry_after(requests, options=None, *, window=None):
        for key, result in original(requests, options, window=window):
            if isinstance(result, TransientProviderError):
                result = TransientProviderError("429 too many requests", retry_after=0.05)
            yield key, result

    provider.stream = with_retry_after
    records = t.transform(make_chunks(5))
    assert records[2].reason == "transient" and "gave up after 2 retries" in records[2].error
    assert records[2].attempts == 3 and all(r.error is None for i, r in enumerate(records) if i != 2)
    assert t.backoff(1, TransientProviderError("x", retry_after=7.5)) == 7.5  # at least what the server asked


def test_permanent_errors_fail_that_chunk_alone_and_too_long_keeps_its_reason():
    provider = FakeProvider(stream=True, fail=lambda text: "permanent" if "chunk-4 " in text else None)
    records = streamer(provider, batch_size=3).transform(make_chunks(9))
    assert records[4].reason == "permanent" and records[4].attempts == 1
    assert sum(r.error is not None for r in records) == 1


def test_an_engine_failure_requeues_everything_in_flight_and_the_run_completes():
    died = []

    def engine_dies_once(text):
        if "chunk-5 " in text and not died:
            died.append(1)
            return "engine"
        return None

    provider = FakeProvider(stream=True, fail=engine_dies_once)
    t = streamer(provider, batch_size=6)
    pairs = list(t.run(make_chunks(20, seed=2)))
    assert sorted(c.id for c, _ in pairs) == [f"id-{i:04d}" for i in range(20)]  # nothing lost or doubled
    assert all(r.error is None for _, r in pairs)
    assert t.stats.retries >= 1 and len(provider.history) > 20  # the requests in flight went again


def test_a_fatal_error_stops_the_run_and_says_so_on_the_last_snapshot():
    seen = []
    provider = FakeProvider(stream=True, fail=lambda text: "fatal" if "chunk-3 " in text else None)
    t = streamer(provider, batch_size=2)
    done = []
    with pytest.raises(FatalProviderError):
        for chunk, _ in t.run(make_chunks(40), progress=seen.append):
            done.append(chunk.id)
    assert len(done) < 40
    assert seen[-1].finished and "FatalProviderError" in seen[-1].error


def test_references_are_loaded_a_window_at_a_time():
    chunks = make_chunks(150, seed=5)
    by_id = {c.id: c for c in chunks}
    calls = []

    def load(ids):
        calls.append(len(ids))
        return [by_id[i] for i in ids]

    refs = [ChunkRef(c.id, c.token_count) for c in chunks]
    for provider in (FakeProvider(stream=True), FakeProvider(batch=True)):
        calls.clear()
        t = streamer(provider, batch_size=8)
        records = t.transform(refs, load=load)
        assert [r.summary for r in records] == [expected_summary(t, c) for c in chunks]
        assert max(calls) <= 64 and sum(calls) == 150  # never the whole list at once, each text once


@pytest.mark.parametrize("seed", [21, 22])
def test_random_failures_while_streaming_lose_and_duplicate_nothing(seed):
    rng = random.Random(seed)
    n = 200
    fates = {i: rng.choices(["ok", "permanent", "flaky"], weights=[85, 5, 10])[0] for i in range(n)}
    chunks = make_chunks(n, seed=seed, tags={i: f.upper() + "-FATE" for i, f in fates.items() if f != "ok"})
    tried: set[str] = set()

    def fail(text):
        if "PERMANENT-FATE" in text:
            return "permanent"
        if "FLAKY-FATE" in text and text not in tried:
            tried.add(text)
            return "transient"
        return None

    t = streamer(
        FakeProvider(stream=True, fail=fail, steps=lambda text: 1 + len(text) % 7), batch_size=16, max_retries=3
    )
    pairs = list(t.run(chunks))
    assert sorted(c.id for c, _ in pairs) == [c.id for c in chunks]
    for i, c in enumerate(chunks):
        r = next(r for k, r in pairs if k.id == c.id)
        assert (r.error is None) == (fates[i] != "permanent")
    assert t.stats.computed + t.stats.failed == n
