"""The SQLite store: idempotent, keyed, readable by pandas."""

from datetime import datetime, timezone

import pytest

from apiana_lab.chunking import Chunk
from apiana_lab.export.types import Conversation
from apiana_lab.store import SQLiteStore, SummaryKey, SummaryRecord

KEY = SummaryKey("model-a", "p1", "o1")


def chunks(n):
    return [Chunk(id=f"k{i}", conversation_id="c1", title="T", date=None, index=i, first_message=i, last_message=i, token_count=10, text=f"text {i}") for i in range(n)]


def test_chunks_and_conversations_are_never_stored_twice(tmp_path):
    with SQLiteStore(tmp_path / "a.sqlite") as store:
        conv = Conversation(id="c1", title="T", source_format="chatgpt", create_time=datetime(2024, 1, 1, tzinfo=timezone.utc))
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
