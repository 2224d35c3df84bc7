"""The scheduler's error contract: provider errors by type alone; any other exception is a bug that stops the run.

A bug stops the run at once, keeps every summary that finished before it, and surfaces with its
traceback: as the exception itself in process, as a traceback and exit 1 from the command line.
The fake provider stands in for a backend, since what is tested is the orchestration.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from helpers import make_chunks

from apiana_lab import summarize
from apiana_lab.errors import PermanentProviderError, ProviderError
from apiana_lab.pipeline import RunConfig, run_export
from apiana_lab.providers.fake import FakeProvider
from apiana_lab.summarize import ParallelSummarizerTransform, SummarizerTransform

TOTAL = 144  # chunks in the `dialogue_export` fixture at --chunk-size 64


def raising(error: BaseException, tag: str):
    """A `fail` hook for the fake that raises `error` itself (not a provider error) for prompts carrying `tag`."""

    def fail(text):
        if tag in text:
            raise error
        return None

    return fail


def transform(path: str, provider: FakeProvider):
    if path == "sequential":
        return SummarizerTransform(provider)
    return ParallelSummarizerTransform(
        provider, batch_size=4, max_workers=1 if path == "batch" else 3, sleep=lambda s: None
    )


PATHS = {
    "batch": dict(batch=True),
    "concurrent": dict(batch=False),
    "stream": dict(stream=True),
    "sequential": dict(batch=False),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("error_type", [ValueError, TypeError, RuntimeError, KeyError, MemoryError])
def test_an_exception_that_is_not_a_provider_error_stops_the_run_unretried(path, error_type):
    """ValueError and TypeError once failed the chunk for good, anything else was retried; now each one stops."""
    error = error_type("a bug in the backend")
    chunks = make_chunks(40, seed=7, tags={20: "BUG"})
    provider = FakeProvider(**PATHS[path], fail=raising(error, "BUG"))
    snapshots, done = [], []
    with pytest.raises(type(error)) as raised:
        for _, record in transform(path, provider).run(chunks, progress=snapshots.append):
            done.append(record)
    assert raised.value is error  # the same object, with its traceback, not a wrapped or reworded one
    assert raised.value.__traceback__ is not None
    assert len(done) < 40 and all(r.error is None for r in done)  # nothing became a failed chunk
    assert sum("BUG" in p for h in provider.history for p in h["prompts"]) == 1  # never retried
    assert snapshots[-1].finished and snapshots[-1].error.startswith(type(error).__name__)


@pytest.mark.parametrize("path", ["batch", "concurrent"])
def test_provider_errors_are_classified_by_type_and_the_run_goes_on(path):
    class TooLong(PermanentProviderError):  # a backend's own subclass is still a permanent error
        pass

    def fail(text):
        if "TOOLONG" in text:
            raise TooLong("prompt too long", reason="too_long")
        if "PLAIN" in text:
            raise ProviderError("a provider error that does not say it is transient")
        return None

    chunks = make_chunks(12, seed=8, tags={3: "TOOLONG", 7: "PLAIN"})
    provider = FakeProvider(**PATHS[path], fail=fail)
    records = transform(path, provider).transform(chunks)
    assert (records[3].reason, records[7].reason) == ("too_long", "permanent")
    assert all(r.error is None for i, r in enumerate(records) if i not in (3, 7))
    assert sum("PLAIN" in p for h in provider.history for p in h["prompts"] if len(h["prompts"]) == 1) == 1


def buggy_succeed(monkeypatch, after: int):
    """Make the scheduler's own bookkeeping raise once `after` summaries have finished."""
    original = summarize._State.succeed
    calls = []

    def succeed(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError("a bug in the scheduler")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(summarize._State, "succeed", succeed)


def test_a_bug_in_the_scheduler_stops_the_run_keeps_what_finished_and_a_rerun_resumes(
    dialogue_export, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    config = RunConfig(
        input=str(dialogue_export), output=str(out), backend="fake", chunk_size=64, batch_size=4, max_workers=1
    )
    buggy_succeed(monkeypatch, after=9)  # two whole batches of 4, and the first chunk of the third
    provider = FakeProvider(batch=True)
    with pytest.raises(RuntimeError, match="a bug in the scheduler"):
        run_export(config, provider=provider)
    assert len(provider.history) == 3  # stopped at once: no batch after the one that hit the bug
    db = out / "apiana.sqlite"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM summaries").fetchone()[0] == 9  # every finished one kept
        assert conn.execute("SELECT COUNT(*) FROM failures").fetchone()[0] == 0  # the bug failed no chunk
        assert conn.execute("SELECT finished_at FROM runs").fetchall() == [(None,)]
    assert not (out / "run.json").exists()

    monkeypatch.undo()
    run = run_export(config, provider=FakeProvider(batch=True))
    assert (run["summaries_reused"], run["summaries_computed"], run["failed"]) == (9, TOTAL - 9, 0)
    with sqlite3.connect(db) as conn:
        by_run = conn.execute("SELECT run_id, COUNT(*) FROM summaries GROUP BY run_id").fetchall()
    assert by_run == [(1, 9), (2, TOTAL - 9)]  # nothing that finished before the bug was done again


def test_what_another_worker_finishes_after_the_bug_is_still_handed_on():
    """The bug reaches the caller before a result that finished just after it; that result is not lost."""
    chunks = make_chunks(3, words=(10, 10), tags={0: "FIRST x x x x", 1: "BUG x x"})  # sent in this order
    first_taken, bug_thread = threading.Event(), []

    def fail(text):
        if "BUG" in text:  # waits until the caller has the first result, then raises
            bug_thread.append(threading.current_thread())
            assert first_taken.wait(10)
            raise RuntimeError("a bug in the backend")
        if "chunk-2 " in text:  # finishes once the bug has been raised and its worker is gone
            assert first_taken.wait(10)
            bug_thread[0].join(10)
        return None

    provider = FakeProvider(batch=False, fail=fail)
    t = ParallelSummarizerTransform(provider, max_workers=2, sleep=lambda s: None)
    results = t.run(chunks)
    assert next(results)[1].chunk_id == "id-0000"
    first_taken.set()
    deadline = time.monotonic() + 10
    while t.stats.computed < 2 and time.monotonic() < deadline:  # chunk 2 finished (its record is queued with it)
        time.sleep(0.01)
    rest = []
    with pytest.raises(RuntimeError, match="a bug in the backend"):
        for _, record in results:
            rest.append(record.chunk_id)
    assert rest == ["id-0002"]


# The real `chatgpt-export-v2` entry point, with a bug put into the scheduler after `argv[1]` summaries.
DRIVER = """\
import sys
from apiana_lab import summarize

after, calls, original = int(sys.argv[1]), [], summarize._State.succeed

def succeed(self, *args, **kwargs):
    calls.append(1)
    if after >= 0 and len(calls) > after:
        raise RuntimeError("a bug in the scheduler")
    return original(self, *args, **kwargs)

summarize._State.succeed = succeed
from apiana_lab.cli import export_v2_main
sys.exit(export_v2_main(sys.argv[2:]))
"""


def run_cli(export, out, bug_after: int):
    args = [
        "-i",
        str(export),
        "-o",
        str(out),
        "--backend",
        "fake",
        "--chunk-size",
        "64",
        "--batch-size",
        "4",
        "--max-workers",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-c", DRIVER, str(bug_after), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_shows_the_traceback_exits_1_and_says_what_was_kept(dialogue_export, tmp_path):
    out = tmp_path / "out"
    done = run_cli(dialogue_export, out, bug_after=13)  # three whole batches of 4, then one
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert "RuntimeError: a bug in the scheduler" in done.stderr and "in succeed" in done.stderr
    with sqlite3.connect(out / "apiana.sqlite") as conn:
        kept = conn.execute("SELECT COUNT(*) FROM summaries").fetchone()[0]
    assert kept == 13
    assert f"Every summary finished before it is kept: 13 in {out / 'apiana.sqlite'}" in done.stderr
    assert "Rerun the same command to resume" in done.stderr
    assert done.stdout == ""  # no result summary for a run that did not finish

    again = run_cli(dialogue_export, out, bug_after=-1)  # the same command, the bug fixed
    assert again.returncode == 0, again.stderr
    run = json.loads((out / "run.json").read_text())
    assert (run["summaries_reused"], run["summaries_computed"], run["failed"]) == (13, TOTAL - 13, 0)
