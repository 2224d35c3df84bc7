"""The SQLite store: idempotent, keyed, readable by pandas."""

from datetime import UTC, datetime

import pytest

from apiana_lab.chunking import Chunk
from apiana_lab.export.types import Conversation
from apiana_lab.store import SQLiteStore, SummaryKey, SummaryRecord

KEY = SummaryKey("model-a", "p1", "o1")


def chunks(n):
    return [
        Chunk(
            id=f"k{i}",
            conversation_id="c1",
            title="T",
            date=None,
            index=i,
            first_message=i,
            last_message=i,
            token_count=10,
            text=f"text {i}",
        )
        for i in range(n)
    ]


def test_chunks_and_conversations_are_never_stored_twice(tmp_path):
    with SQLiteStore(tmp_path / "a.sqlite") as store:
        conv = Conversation(id="c1", title="T", source_format="chatgpt", create_time=datetime(2024, 1, 1, tzinfo=UTC))
        for _ in range(3):
            store.add_conversations([conv])
            store.add_chunks(chunks(5))
        assert store.count("chunks") == 5 and store.count("conversations") == 1


def test_summaries_are_keyed_and_never_replaced(tmp_path):
    with SQLiteStore(tmp_path / "a.sqlite") as store:
        store.put_summaries(KEY, [SummaryRecord("k1", "first")], "fake", None)
        store.put_summaries(KEY, [SummaryRecord("k1", "second")], "fake", None)
        other = SummaryKey("model-b", "p1", "o1")
        assert store.done_chunk_ids(KEY) == {"k1"} and store.done_chunk_ids(other) == set()
        assert store.summaries_for(KEY, ["k1"])["k1"]["summary"] == "first"
        assert store.has_summaries_under_other_keys(other)
        assert store.count("summaries") == 1


def test_failures_are_recorded_then_cleared_by_success(tmp_path):
    with SQLiteStore(tmp_path / "a.sqlite") as store:
        store.put_summaries(KEY, [SummaryRecord("k2", error="boom", reason="transient")], "fake", 1)
        assert store.count("failures") == 1 and store.done_chunk_ids(KEY) == set()
        store.put_summaries(KEY, [SummaryRecord("k2", "ok")], "fake", 2)
        assert store.count("failures") == 0 and store.done_chunk_ids(KEY) == {"k2"}
        assert store.clear_summaries(KEY) == 1 and store.count("summaries") == 0


def test_survives_reopen_and_exports_to_pandas_and_parquet(tmp_path):
    path = tmp_path / "a.sqlite"
    with SQLiteStore(path) as store:
        run = store.start_run({"backend": "fake"})
        store.add_chunks(chunks(3))
        store.put_summaries(KEY, [SummaryRecord(f"k{i}", f"s{i}", 5, 7, "stop") for i in range(3)], "fake", run)
        store.finish_run(run, {"chunks_per_s": 1.0})
    with SQLiteStore(path) as store:
        df = store.to_pandas("summaries")
        assert sorted(df["summary"]) == ["s0", "s1", "s2"] and set(df["run_id"]) == {run}
        paths = store.to_parquet(tmp_path / "pq")
        import pandas as pd

        assert len(pd.read_parquet(tmp_path / "pq" / "chunks.parquet")) == 3
        assert {p.name for p in paths} >= {"summaries.parquet", "runs.parquet"}
        with pytest.raises(ValueError):
            store.to_pandas("sqlite_master; DROP TABLE runs")


def test_a_store_from_before_quality_profiles_opens_and_is_profiled(tmp_path):
    """The schema of the previous release: no quality column. Opening adds it; profile_missing fills it."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE chunks (id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL, idx INTEGER NOT NULL,"
        " first_message INTEGER, last_message INTEGER, token_count INTEGER, continued INTEGER, text TEXT NOT NULL,"
        " starts TEXT);"
        "CREATE TABLE summaries (chunk_id TEXT NOT NULL, model TEXT NOT NULL, prompt_hash TEXT NOT NULL,"
        " options_hash TEXT NOT NULL, summary TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER,"
        " finish_reason TEXT, backend TEXT, run_id INTEGER, created_at REAL, worker TEXT,"
        " PRIMARY KEY (chunk_id, model, prompt_hash, options_hash));"
        "INSERT INTO chunks VALUES ('k0', 'c1', 0, 0, 1, 40, 0, 'User: my garden is full of weeds again', '0');"
        "INSERT INTO summaries VALUES ('k0', 'm', 'p', 'o', 'User: my garden is full of weeds again', 9, 9, 'stop',"
        " 'fake', 1, 1.0, 'h');"
    )
    db.commit()
    db.close()
    with SQLiteStore(path) as store:
        (row,) = store.kept_versions(["k0"])
        assert row["quality"] is None  # not profiled yet
        assert store.profile_missing() == 1 and store.profile_missing() == 0
        (row,) = store.kept_versions(["k0"])
        assert "echo" in row["quality"]["flags"] and row["quality"]["coverage"] == 1.0


def test_the_kept_version_has_the_fewest_flags_ties_going_to_the_newer(tmp_path, monkeypatch):
    """Three versions of one chunk: a loop, then a clean one, then another clean one made later."""
    import time

    clock = iter([100.0, 200.0, 300.0, 400.0])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    loop, clean = {"flags": ["loop", "truncated"]}, {"flags": []}
    with SQLiteStore(tmp_path / "a.sqlite") as store:
        store.add_chunks(chunks(2))
        store.put_summaries(
            SummaryKey("m", "p", "greedy"),
            [SummaryRecord("k0", "loop", quality=loop), SummaryRecord("k1", "only", quality=loop)],
            "fake",
            1,
        )
        store.put_summaries(
            SummaryKey("m", "p", "seed-1"), [SummaryRecord("k0", "clean, older", quality=clean)], "fake", 2
        )
        store.put_summaries(
            SummaryKey("m", "p", "seed-2"), [SummaryRecord("k0", "clean, newer", quality=clean)], "fake", 3
        )
        first, second = store.kept_versions(["k0", "k1"])
        assert (first["summary"], first["versions"], first["kept"]) == (
            "clean, newer",
            3,
            "newest of those with the fewest flags",
        )
        assert (second["summary"], second["versions"], second["kept"]) == ("only", 1, "only version")
        frame = store.to_pandas("summaries")
        assert dict(zip(frame["chunk_id"], frame["summary"])) == {"k0": "clean, newer", "k1": "only"}
        assert len(store.to_pandas("summaries", versions="all")) == 4
