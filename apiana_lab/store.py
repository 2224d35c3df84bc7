"""Where results live: an embedded SQLite file, no server, safe to kill at any moment."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from .chunking import Chunk
from .export.types import Conversation

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    finished_at REAL,
    params TEXT NOT NULL,
    figures TEXT
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT,
    create_time TEXT,
    update_time TEXT,
    source_format TEXT,
    fallback_branch INTEGER,
    messages INTEGER
);
CREATE TABLE IF NOT EXISTS chunks (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    first_message INTEGER,
    last_message INTEGER,
    token_count INTEGER,
    continued INTEGER,
    text TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS summaries (
    chunk_id TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    options_hash TEXT NOT NULL,
    summary TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT,
    backend TEXT,
    run_id INTEGER,
    created_at REAL,
    PRIMARY KEY (chunk_id, model, prompt_hash, options_hash)
);
CREATE TABLE IF NOT EXISTS failures (
    chunk_id TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    options_hash TEXT NOT NULL,
    reason TEXT NOT NULL,
    error TEXT,
    attempts INTEGER,
    run_id INTEGER,
    created_at REAL,
    PRIMARY KEY (chunk_id, model, prompt_hash, options_hash)
);
"""


@dataclass(frozen=True, slots=True)
class SummaryKey:
    """What makes a stored summary reusable: same model, same prompt, same generation options."""

    model: str
    prompt_hash: str
    options_hash: str


@dataclass(slots=True)
class SummaryRecord:
    """One finished (or failed) summary, ready to store."""

    chunk_id: str
    summary: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    error: str | None = None  # set when the chunk failed for good
    reason: str | None = None  # short slug for the failure: oom, permanent, transient, too_long
    attempts: int = 1


class Store(Protocol):
    """The small interface a results store offers; SQLite today, a graph database later."""

    def start_run(self, params: dict) -> int: ...
    def finish_run(self, run_id: int, figures: dict) -> None: ...
    def add_conversations(self, conversations: Iterable[Conversation]) -> None: ...
    def add_chunks(self, chunks: Iterable[Chunk]) -> None: ...
    def done_chunk_ids(self, key: SummaryKey) -> set[str]: ...
    def put_summaries(self, key: SummaryKey, records: Iterable[SummaryRecord], backend: str, run_id: int | None) -> None: ...
    def close(self) -> None: ...


class SQLiteStore:
    """`OUT/apiana.sqlite`: runs, conversations, chunks, summaries and failures."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: the writer is used from the thread that drains results.
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        # WAL keeps committed summaries safe through SIGKILL and lets notebooks read during a run.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def start_run(self, params: dict) -> int:
        with self.db:
            cur = self.db.execute("INSERT INTO runs (started_at, params) VALUES (?, ?)", (time.time(), json.dumps(params, default=str)))
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, figures: dict) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET finished_at = ?, figures = ? WHERE id = ?", (time.time(), json.dumps(figures, default=str), run_id))

    def add_conversations(self, conversations: Iterable[Conversation]) -> None:
        rows = [
            (c.id, c.title, _iso(c.create_time), _iso(c.update_time), c.source_format, int(c.fallback_branch), len(c.entries))
            for c in conversations
        ]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def add_chunks(self, chunks: Iterable[Chunk]) -> None:
        rows = [(c.id, c.conversation_id, c.index, c.first_message, c.last_message, c.token_count, int(c.continued), c.text) for c in chunks]
        with self.db:
            # A chunk id is a content hash: seeing it again means the same chunk, never a second copy.
            self.db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def done_chunk_ids(self, key: SummaryKey) -> set[str]:
        cur = self.db.execute(
            "SELECT chunk_id FROM summaries WHERE model = ? AND prompt_hash = ? AND options_hash = ?",
            (key.model, key.prompt_hash, key.options_hash),
        )
        return {row[0] for row in cur}

    def summaries_for(self, key: SummaryKey, chunk_ids: Iterable[str]) -> dict[str, dict]:
        """Stored summaries of these chunks under this key, by chunk id."""
        wanted = list(chunk_ids)
        found: dict[str, dict] = {}
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            cur = self.db.execute(
                f"SELECT chunk_id, summary, prompt_tokens, completion_tokens, finish_reason FROM summaries "
                f"WHERE model = ? AND prompt_hash = ? AND options_hash = ? AND chunk_id IN ({','.join('?' * len(part))})",
                (key.model, key.prompt_hash, key.options_hash, *part),
            )
            for cid, summary, pt, ct, fr in cur:
                found[cid] = {"summary": summary, "prompt_tokens": pt, "completion_tokens": ct, "finish_reason": fr}
        return found

    def has_summaries_under_other_keys(self, key: SummaryKey) -> bool:
        """True when earlier results exist but were made with another model, prompt or options."""
        cur = self.db.execute(
            "SELECT 1 FROM summaries WHERE NOT (model = ? AND prompt_hash = ? AND options_hash = ?) LIMIT 1",
            (key.model, key.prompt_hash, key.options_hash),
        )
        return cur.fetchone() is not None

    def put_summaries(self, key: SummaryKey, records: Iterable[SummaryRecord], backend: str, run_id: int | None) -> None:
        now = time.time()
        ok, failed = [], []
        for r in records:
            if r.error is None:
                ok.append((r.chunk_id, key.model, key.prompt_hash, key.options_hash, r.summary, r.prompt_tokens, r.completion_tokens, r.finish_reason, backend, run_id, now))
            else:
                failed.append((r.chunk_id, key.model, key.prompt_hash, key.options_hash, r.reason or "error", r.error, r.attempts, run_id, now))
        with self.db:
            # OR IGNORE: a summary, once stored, is never replaced or stored twice.
            self.db.executemany("INSERT OR IGNORE INTO summaries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", ok)
            self.db.executemany(
                "DELETE FROM failures WHERE chunk_id = ? AND model = ? AND prompt_hash = ? AND options_hash = ?",
                [row[:4] for row in ok],
            )
            self.db.executemany("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", failed)

    def clear_summaries(self, key: SummaryKey) -> int:
        """Forget results under this key (for --fresh); returns how many were dropped."""
        with self.db:
            args = (key.model, key.prompt_hash, key.options_hash)
            n = self.db.execute("DELETE FROM summaries WHERE model = ? AND prompt_hash = ? AND options_hash = ?", args).rowcount
            self.db.execute("DELETE FROM failures WHERE model = ? AND prompt_hash = ? AND options_hash = ?", args)
        return n

    def count(self, table: str) -> int:
        if table not in ("runs", "conversations", "chunks", "summaries", "failures"):
            raise ValueError(f"unknown table {table!r}")
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def to_pandas(self, table: str = "summaries"):
        """One table as a pandas DataFrame, for notebooks."""
        import pandas as pd

        self.count(table)  # validates the name
        return pd.read_sql_query(f"SELECT * FROM {table}", self.db)

    def to_parquet(self, folder: str | Path) -> list[Path]:
        """Every table as `folder/<table>.parquet`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for table in ("runs", "conversations", "chunks", "summaries", "failures"):
            path = folder / f"{table}.parquet"
            self.to_pandas(table).to_parquet(path, index=False)
            paths.append(path)
        return paths

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


class ChatFragmentWriter:
    """Writes summaries to a store as they arrive, committing every few seconds or few dozen."""

    def __init__(
        self,
        store: Store,
        key: SummaryKey,
        *,
        backend: str = "",
        run_id: int | None = None,
        commit_every: int = 32,
        commit_seconds: float = 2.0,
        clock=time.monotonic,
    ):
        self.store = store
        self.key = key
        self.backend = backend
        self.run_id = run_id
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self.clock = clock
        self._pending: list[SummaryRecord] = []
        self._last_commit = clock()
        self.written = 0

    def write(self, record: SummaryRecord) -> None:
        """Queue one record; commits when enough have gathered or enough time has passed."""
        self._pending.append(record)
        if len(self._pending) >= self.commit_every or self.clock() - self._last_commit >= self.commit_seconds:
            self.flush()

    def flush(self) -> None:
        """Commit everything queued."""
        if self._pending:
            self.store.put_summaries(self.key, self._pending, self.backend, self.run_id)
            self.written += len(self._pending)
            self._pending = []
        self._last_commit = self.clock()

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
