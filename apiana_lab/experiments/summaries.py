"""A finished run's summaries as a table a notebook can filter by conversation and date."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from apiana_lab.errors import ConfigError

COLUMNS = [
    "date",
    "title",
    "chunk",
    "summary",
    "flags",
    "completion_tokens",
    "finish_reason",
    "prompt_tokens",
    "conversation_id",
    "chunk_id",
]


def load_summaries(output_dir: str | Path):
    """The run's summaries (summaries.jsonl, in export order).

    Each row has its conversation's date and the chunk's place in that conversation.
    """
    import pandas as pd

    folder = Path(output_dir)
    jsonl, db = folder / "summaries.jsonl", folder / "apiana.sqlite"
    if not jsonl.is_file() or not db.is_file():
        raise ConfigError(
            f"{folder} holds no finished run (needs summaries.jsonl and apiana.sqlite); run the export first."
        )
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    frame = pd.DataFrame(rows).reindex(
        columns=[
            "chunk_id",
            "conversation_id",
            "title",
            "summary",
            "prompt_tokens",
            "completion_tokens",
            "finish_reason",
            "quality",
        ]
    )
    # The quality flags, as a reader scans them ("" for none); a run from before profiles has none recorded.
    frame["flags"] = [", ".join(q["flags"]) if isinstance(q, dict) else "" for q in frame.pop("quality")]
    # Read-only: a run may still be writing to the store from another process.
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        places = pd.read_sql_query(
            "SELECT k.id AS chunk_id, k.idx AS chunk, c.create_time AS date FROM chunks k "
            "LEFT JOIN conversations c ON c.id = k.conversation_id",
            con,
        )
    frame = frame.merge(places, on="chunk_id", how="left")
    frame["date"] = pd.to_datetime(frame["date"], utc=True, errors="coerce", format="ISO8601")
    return frame[COLUMNS]


def filter_summaries(frame, conversation: str | None = None, start: str | None = None, end: str | None = None):
    """Rows of one conversation (its id, or words of its title, any case) between two dates (YYYY-MM-DD, inclusive)."""
    import pandas as pd

    keep = pd.Series(True, index=frame.index)
    if conversation:
        wanted = conversation.casefold()
        keep &= (frame["conversation_id"] == conversation) | frame["title"].fillna("").str.casefold().str.contains(
            wanted, regex=False
        )
    if start:
        keep &= frame["date"] >= pd.Timestamp(start, tz="UTC")
    if end:
        # Inclusive of the whole end day.
        keep &= frame["date"] < pd.Timestamp(end, tz="UTC") + pd.Timedelta(days=1)
    return frame[keep].reset_index(drop=True)
