"""Where results live: an embedded SQLite file, no server, safe to kill at any moment."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

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
    text TEXT NOT NULL,
    starts TEXT
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
    worker TEXT,
    quality TEXT,
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
    worker: str | None = None  # who made it: the Ray node id, or the host name in a local run
    quality: dict | None = None  # its quality profile (apiana_lab.quality), as a dict
    tokens_estimated: bool = False  # the backend did not count tokens (an invoke-only plugin): estimates


class Store(Protocol):
    """The small interface a results store offers; SQLite today, a graph database later."""

    def start_run(self, params: dict) -> int: ...
    def finish_run(self, run_id: int, figures: dict) -> None: ...
    def add_conversations(self, conversations: Iterable[Conversation]) -> None: ...
    def add_chunks(self, chunks: Iterable[Chunk]) -> None: ...
    def done_chunk_ids(self, key: SummaryKey) -> set[str]: ...
    def load_chunks(self, ids: Sequence[str]) -> list[Chunk]: ...
    def put_summaries(
        self, key: SummaryKey, records: Iterable[SummaryRecord], backend: str, run_id: int | None
    ) -> None: ...
    def kept_versions(self, chunk_ids: Sequence[str]) -> Iterator[dict]: ...
    def profile_missing(self) -> int: ...
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
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(chunks)")}
        if "starts" not in columns:  # a store from before message starts were kept
            with self.db:
                self.db.execute("ALTER TABLE chunks ADD COLUMN starts TEXT")
        for column in ("worker", "quality"):  # a store from before Ray runs, or before quality profiles
            if column not in {row[1] for row in self.db.execute("PRAGMA table_info(summaries)")}:
                with self.db:
                    self.db.execute(f"ALTER TABLE summaries ADD COLUMN {column} TEXT")
        # Summarizer workers load chunk texts while the main thread writes: each thread reads
        # through a connection of its own (WAL lets readers run beside the writer).
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    @staticmethod
    def peek(path: str | Path) -> int:
        """How many summaries an existing store holds (0 when there is none); opens it read-only, creates nothing."""
        path = Path(path)
        if not path.is_file():
            return 0
        try:
            with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
                return db.execute("SELECT COUNT(*) FROM summaries").fetchone()[0]
        except sqlite3.Error:
            return 0

    def start_run(self, params: dict) -> int:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO runs (started_at, params) VALUES (?, ?)", (time.time(), json.dumps(params, default=str))
            )
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, figures: dict) -> None:
        with self.db:
            self.db.execute(
                "UPDATE runs SET finished_at = ?, figures = ? WHERE id = ?",
                (time.time(), json.dumps(figures, default=str), run_id),
            )

    def add_conversations(self, conversations: Iterable[Conversation]) -> None:
        rows = [
            (
                c.id,
                c.title,
                _iso(c.create_time),
                _iso(c.update_time),
                c.source_format,
                int(c.fallback_branch),
                len(c.entries),
            )
            for c in conversations
        ]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def add_chunks(self, chunks: Iterable[Chunk]) -> None:
        rows = [
            (
                c.id,
                c.conversation_id,
                c.index,
                c.first_message,
                c.last_message,
                c.token_count,
                int(c.continued),
                c.text,
                ",".join(map(str, c.starts)),
            )
            for c in chunks
        ]
        with self.db:
            # A chunk id is a content hash: seeing it again means the same chunk, never a second copy.
            self.db.executemany(
                "INSERT OR IGNORE INTO chunks (id, conversation_id, idx, first_message, last_message, token_count, "
                "continued, text, starts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def done_chunk_ids(self, key: SummaryKey) -> set[str]:
        cur = self.db.execute(
            "SELECT chunk_id FROM summaries WHERE model = ? AND prompt_hash = ? AND options_hash = ?",
            (key.model, key.prompt_hash, key.options_hash),
        )
        return {row[0] for row in cur}

    def load_chunks(self, ids: Sequence[str]) -> list[Chunk]:
        """The stored chunks with these ids, in the order asked, with their conversation's title and date."""
        db = self._reader()
        found: dict[str, Chunk] = {}
        for i in range(0, len(ids), 500):
            part = list(ids[i : i + 500])
            cur = db.execute(
                "SELECT k.id, k.conversation_id, c.title, c.create_time, k.idx, k.first_message, k.last_message, "
                "k.token_count, k.continued, k.text, k.starts "
                "FROM chunks k LEFT JOIN conversations c ON c.id = k.conversation_id "
                f"WHERE k.id IN ({','.join('?' * len(part))})",
                part,
            )
            for cid, conv, title, created, idx, first, last, tokens, continued, text, starts in cur:
                found[cid] = Chunk(
                    id=cid,
                    conversation_id=conv,
                    title=title or "",
                    date=datetime.fromisoformat(created) if created else None,
                    index=idx,
                    first_message=first,
                    last_message=last,
                    token_count=tokens,
                    text=text,
                    continued=bool(continued),
                    starts=tuple(map(int, starts.split(","))) if starts else (0,),
                )
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"{len(missing)} chunks are not in {self.path} (first: {missing[0]})")
        return [found[i] for i in ids]

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._readers, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, check_same_thread=False)
            self._readers.db = db
            with self._readers_lock:
                self._reader_conns.append(db)
        return db

    def iter_summaries(self, key: SummaryKey, chunk_ids: Sequence[str], window: int = 500) -> Iterator[dict]:
        """Summaries of these chunks under this key, in the order given, a window at a time (skips missing ones)."""
        for i in range(0, len(chunk_ids), window):
            part = list(chunk_ids[i : i + window])
            cur = self.db.execute(
                "SELECT s.chunk_id, k.conversation_id, c.title, s.summary, s.prompt_tokens, s.completion_tokens, "
                "s.finish_reason "
                "FROM summaries s JOIN chunks k ON k.id = s.chunk_id "
                "LEFT JOIN conversations c ON c.id = k.conversation_id "
                "WHERE s.model = ? AND s.prompt_hash = ? AND s.options_hash = ? "
                f"AND s.chunk_id IN ({','.join('?' * len(part))})",
                (key.model, key.prompt_hash, key.options_hash, *part),
            )
            rows = {r[0]: r for r in cur}
            for cid in part:
                r = rows.get(cid)
                if r is not None:
                    yield {
                        "chunk_id": r[0],
                        "conversation_id": r[1],
                        "title": r[2] or "",
                        "summary": r[3],
                        "prompt_tokens": r[4],
                        "completion_tokens": r[5],
                        "finish_reason": r[6],
                    }

    def summaries_for(self, key: SummaryKey, chunk_ids: Iterable[str]) -> dict[str, dict]:
        """Stored summaries of these chunks under this key, by chunk id."""
        wanted = list(chunk_ids)
        found: dict[str, dict] = {}
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            cur = self.db.execute(
                "SELECT chunk_id, summary, prompt_tokens, completion_tokens, finish_reason FROM summaries "
                "WHERE model = ? AND prompt_hash = ? AND options_hash = ? "
                f"AND chunk_id IN ({','.join('?' * len(part))})",
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

    def put_summaries(
        self, key: SummaryKey, records: Iterable[SummaryRecord], backend: str, run_id: int | None
    ) -> None:
        now = time.time()
        ok, failed = [], []
        for r in records:
            if r.error is None:
                quality = json.dumps(r.quality) if r.quality is not None else None
                ok.append(
                    (
                        r.chunk_id,
                        key.model,
                        key.prompt_hash,
                        key.options_hash,
                        r.summary,
                        r.prompt_tokens,
                        r.completion_tokens,
                        r.finish_reason,
                        backend,
                        run_id,
                        now,
                        r.worker,
                        quality,
                    )
                )
            else:
                failed.append(
                    (
                        r.chunk_id,
                        key.model,
                        key.prompt_hash,
                        key.options_hash,
                        r.reason or "error",
                        r.error,
                        r.attempts,
                        run_id,
                        now,
                    )
                )
        with self.db:
            # OR IGNORE: a summary, once stored, is never replaced or stored twice.
            self.db.executemany(
                "INSERT OR IGNORE INTO summaries (chunk_id, model, prompt_hash, options_hash, summary, prompt_tokens, "
                "completion_tokens, finish_reason, backend, run_id, created_at, worker, quality) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ok,
            )
            self.db.executemany(
                "DELETE FROM failures WHERE chunk_id = ? AND model = ? AND prompt_hash = ? AND options_hash = ?",
                [row[:4] for row in ok],
            )
            self.db.executemany("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", failed)

    def profile_missing(self, window: int = 256) -> int:
        """Profile every stored summary that has no quality profile yet (a store from before them); returns how many.

        A window of summaries (with their chunks' texts) at a time, each window committed: a whole
        store's texts never sit in memory at once.
        """
        from .quality import profile

        count, last = 0, None
        while True:
            rows = self.db.execute(
                "SELECT s.rowid, s.summary, k.text, s.finish_reason "
                "FROM summaries s JOIN chunks k ON k.id = s.chunk_id "
                "WHERE s.quality IS NULL AND (? IS NULL OR s.rowid > ?) ORDER BY s.rowid LIMIT ?",
                (last, last, window),
            ).fetchall()
            if not rows:
                return count
            updates = [
                (json.dumps(profile(summary, text, finish).to_dict()), rowid) for rowid, summary, text, finish in rows
            ]
            with self.db:
                self.db.executemany("UPDATE summaries SET quality = ? WHERE rowid = ?", updates)
            count += len(updates)
            last = rows[-1][0]

    def kept_versions(self, chunk_ids: Sequence[str], window: int = 500) -> Iterator[dict]:
        """Per chunk, in the order given, the summary version kept: the fewest quality flags, ties to the newer.

        A chunk can hold several versions (another model, prompt or options, as `--redo` makes);
        each row says which was kept and how many there are. Chunks without a summary are skipped.
        """
        for i in range(0, len(chunk_ids), window):
            part = list(chunk_ids[i : i + window])
            cur = self.db.execute(
                "SELECT s.chunk_id, k.conversation_id, c.title, s.summary, s.prompt_tokens, s.completion_tokens, "
                "s.finish_reason, s.backend, s.model, s.prompt_hash, s.options_hash, s.run_id, s.created_at, s.quality "
                "FROM summaries s JOIN chunks k ON k.id = s.chunk_id "
                "LEFT JOIN conversations c ON c.id = k.conversation_id "
                f"WHERE s.chunk_id IN ({','.join('?' * len(part))})",
                part,
            )
            versions: dict[str, list[dict]] = {}
            for r in cur:
                quality = json.loads(r[13]) if r[13] else None
                versions.setdefault(r[0], []).append(
                    {
                        "chunk_id": r[0],
                        "conversation_id": r[1],
                        "title": r[2] or "",
                        "summary": r[3],
                        "prompt_tokens": r[4],
                        "completion_tokens": r[5],
                        "finish_reason": r[6],
                        "backend": r[7],
                        "model": r[8],
                        "prompt_hash": r[9],
                        "options_hash": r[10],
                        "run_id": r[11],
                        "created_at": r[12],
                        "quality": quality,
                    }
                )
            for cid in part:
                found = versions.get(cid)
                if found:
                    yield _kept(found)

    def clear_summaries(self, key: SummaryKey) -> int:
        """Forget results under this key (for --fresh); returns how many were dropped."""
        with self.db:
            args = (key.model, key.prompt_hash, key.options_hash)
            n = self.db.execute(
                "DELETE FROM summaries WHERE model = ? AND prompt_hash = ? AND options_hash = ?", args
            ).rowcount
            self.db.execute("DELETE FROM failures WHERE model = ? AND prompt_hash = ? AND options_hash = ?", args)
        return n

    def count(self, table: str) -> int:
        if table not in ("runs", "conversations", "chunks", "summaries", "failures"):
            raise ValueError(f"unknown table {table!r}")
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def to_pandas(self, table: str = "summaries", versions: str = "kept"):
        """One table as a pandas DataFrame, for notebooks.

        For summaries, `versions="kept"` gives one row per chunk, the version `kept_versions`
        keeps, with `versions` (how many the chunk has) and `kept` (why this one); "all" gives
        every stored version.
        """
        import pandas as pd

        self.count(table)  # validates the name
        if table != "summaries" or versions == "all":
            return pd.read_sql_query(f"SELECT * FROM {table}", self.db)
        if versions != "kept":
            raise ValueError(f"versions must be 'kept' or 'all', not {versions!r}")
        ids = [row[0] for row in self.db.execute("SELECT DISTINCT chunk_id FROM summaries ORDER BY chunk_id")]
        rows = list(self.kept_versions(ids))
        columns = [
            "chunk_id",
            "conversation_id",
            "title",
            "summary",
            "prompt_tokens",
            "completion_tokens",
            "finish_reason",
            "backend",
            "model",
            "prompt_hash",
            "options_hash",
            "run_id",
            "created_at",
            "quality",
            "versions",
            "kept",
        ]
        return pd.DataFrame(rows, columns=columns)

    def to_parquet(self, folder: str | Path) -> list[Path]:
        """Every table as `folder/<table>.parquet`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for table in ("runs", "conversations", "chunks", "summaries", "failures"):
            path = folder / f"{table}.parquet"
            self.to_pandas(table, versions="all").to_parquet(path, index=False)
            paths.append(path)
        return paths

    def close(self) -> None:
        with self._readers_lock:
            for db in self._reader_conns:
                db.close()
            self._reader_conns.clear()
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def _kept(versions: list[dict]) -> dict:
    """The version to keep of one chunk's summaries: the fewest flags, ties to the newer; says which and why."""

    def flags(v: dict) -> int:
        return len(v["quality"]["flags"]) if v["quality"] else 0

    best = min(versions, key=lambda v: (flags(v), -(v["created_at"] or 0.0)))
    if len(versions) == 1:
        why = "only version"
    elif sum(flags(v) == flags(best) for v in versions) > 1:
        why = "newest of those with the fewest flags"
    else:
        why = "fewest flags"
    return {**best, "versions": len(versions), "kept": why}


class ChatFragmentWriter:
    """Writes summaries to a store as they arrive, committing every few seconds or few dozen."""

    def __init__(
        self,
        store: Store,
        key: SummaryKey,
        *,
        backend: str = "",
        run_id: int | None = None,
        worker: str | None = None,
        commit_every: int = 32,
        commit_seconds: float = 2.0,
        clock=time.monotonic,
    ):
        self.store = store
        self.key = key
        self.backend = backend
        self.run_id = run_id
        self.worker = worker  # stamped on records that do not say who made them
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self.clock = clock
        self._pending: list[SummaryRecord] = []
        self._last_commit = clock()
        self.written = 0

    def write(self, record: SummaryRecord) -> None:
        """Queue one record; commits when enough have gathered or enough time has passed."""
        if record.worker is None and self.worker is not None:
            record.worker = self.worker
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
