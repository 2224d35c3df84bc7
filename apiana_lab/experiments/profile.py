"""An export's shape without summarizing anything: what `apiana-lab inspect` and the explore notebook show."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

from apiana_lab.chunking import ConversationChunkerComponent
from apiana_lab.export.reader import read_export
from apiana_lab.export.types import ReadReport

# Per-conversation fields `apiana-lab inspect --json` prints (a stable contract).
INSPECT_FIELDS = (
    "id",
    "title",
    "dialogue_messages",
    "user_messages",
    "assistant_messages",
    "other_entries",
    "chunks",
    "tokens",
    "fallback_branch",
)


@dataclass
class ExportProfile:
    """Conversations, messages, chunks and tokens of one export (or several merged), plus what was skipped."""

    inputs: list[str]
    format: str
    chunk_size: int
    conversations: list[dict] = field(default_factory=list)  # one row per conversation
    chunk_tokens: list[int] = field(default_factory=list)  # every chunk's token count, in export order
    chunk_positions: list[tuple[int, int]] = field(default_factory=list)  # (conversation, chunk) of each
    totals: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0  # reading and chunking

    def to_pandas(self):
        """One row per conversation, with its creation time as a datetime and its month."""
        import pandas as pd

        df = pd.DataFrame(self.conversations)
        if not df.empty:
            df["created"] = pd.to_datetime(df["created"], utc=True)
            df["month"] = df["created"].dt.strftime("%Y-%m")
        return df

    def per_month(self):
        """Conversations, dialogue messages and tokens per month of creation ("unknown" when undated)."""
        df = self.to_pandas()
        if df.empty:
            return df.reindex(columns=["month", "conversations", "messages", "user_messages", "tokens", "chunks"])
        import pandas as pd

        df["month"] = df["month"].fillna("unknown")
        out = df.groupby("month", sort=True).agg(
            conversations=("id", "size"),
            messages=("dialogue_messages", "sum"),
            user_messages=("user_messages", "sum"),
            tokens=("tokens", "sum"),
            chunks=("chunks", "sum"),
        )
        dated = [m for m in out.index if m != "unknown"]
        if dated:
            # Months with nothing in them are rows of zeros, so a gap in the history shows as a gap.
            every = pd.period_range(min(dated), max(dated), freq="M").strftime("%Y-%m")
            out = out.reindex(list(every) + (["unknown"] if "unknown" in out.index else []), fill_value=0)
        return out.rename_axis("month").reset_index()

    def chunk_stats(self) -> dict:
        """Chunks and tokens at this chunk size: counts, the spread of chunk lengths, how many are full."""
        import statistics

        tokens = sorted(self.chunk_tokens)
        per_conversation = [row["chunks"] for row in self.conversations]
        return {
            "chunk_size": self.chunk_size,
            "chunks": len(tokens),
            "tokens": sum(tokens),
            "mean_chunk_tokens": round(statistics.fmean(tokens), 1) if tokens else 0.0,
            "median_chunk_tokens": statistics.median(tokens) if tokens else 0,
            "p90_chunk_tokens": tokens[int(0.9 * (len(tokens) - 1))] if tokens else 0,
            "max_chunk_tokens": tokens[-1] if tokens else 0,
            # A chunk within 5% of the limit was cut there: the conversation went on in the next one.
            "full_chunks": sum(t >= 0.95 * self.chunk_size for t in tokens),
            "conversations_in_several_chunks": sum(n > 1 for n in per_conversation),
            "most_chunks_in_one_conversation": max(per_conversation, default=0),
        }

    def longest(self, n: int = 10):
        """The n conversations with the most tokens: title, date, messages, chunks, tokens."""
        df = self.to_pandas()
        columns = ["title", "created", "dialogue_messages", "other_entries", "chunks", "tokens", "id"]
        if df.empty:
            return df.reindex(columns=columns)
        return df.nlargest(n, "tokens")[columns].reset_index(drop=True)

    def skipped_table(self):
        """What the reader skipped: one row per conversation with its input, position, id, reason and detail."""
        import pandas as pd

        return pd.DataFrame(self.skipped, columns=["input", "index", "id", "reason", "detail"])

    def inspect_json(self) -> dict:
        """The document `apiana-lab inspect --json` prints."""
        rows = [{k: row[k] for k in INSPECT_FIELDS} for row in self.conversations]
        return {"format": self.format, "totals": self.totals, "skipped": self.skipped, "conversations": rows}


def profile_export(paths, chunk_size: int = 3500, tokenizer=None) -> ExportProfile:
    """Read and chunk a whole export (nothing is stored or summarized) and count what is there."""
    inputs = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
    report = ReadReport()
    chunker = ConversationChunkerComponent(chunk_size=chunk_size, tokenizer=tokenizer)
    profile = ExportProfile(inputs=inputs, format="", chunk_size=chunk_size)
    roles: Counter = Counter()
    kinds: Counter = Counter()
    no_dialogue = fallback = 0
    first = last = None
    start = time.perf_counter()
    for k, conv in enumerate(read_export(inputs, report=report)):
        dialogue = conv.dialogue
        user = sum(1 for e in dialogue if e.role == "user")
        roles.update(e.role for e in dialogue)
        other = conv.non_dialogue
        kinds.update(e.kind for e in other)
        chunks = chunker.chunk(conv)
        for j, c in enumerate(chunks):
            profile.chunk_tokens.append(c.token_count)
            profile.chunk_positions.append((k, j))
        no_dialogue += not dialogue
        fallback += conv.fallback_branch
        if conv.create_time is not None:
            first = conv.create_time if first is None or conv.create_time < first else first
            last = conv.create_time if last is None or conv.create_time > last else last
        profile.conversations.append(
            {
                "id": conv.id,
                "title": conv.title,
                "dialogue_messages": len(dialogue),
                "user_messages": user,
                "assistant_messages": len(dialogue) - user,
                "other_entries": len(other),
                "chunks": len(chunks),
                "tokens": sum(c.token_count for c in chunks),
                "fallback_branch": conv.fallback_branch,
                "created": conv.create_time.isoformat() if conv.create_time else None,
            }
        )
    profile.seconds = time.perf_counter() - start
    profile.format = report.format
    profile.skipped = report.skipped
    profile.bytes = sum(_size(p) for p in inputs)
    profile.totals = {
        "conversations": report.conversations,
        "skipped": len(report.skipped),
        "skipped_by_reason": report.skipped_by_reason,
        "duplicates": report.duplicates,
        "inputs": [{"path": p, "format": f} for p, f in zip(report.inputs, report.formats)],
        "without_dialogue": no_dialogue,
        "fallback_branch": fallback,
        "dialogue_messages": sum(roles.values()),
        "dialogue_by_role": dict(roles),
        "non_dialogue_by_type": dict(sorted(kinds.items())),
        "chunks": len(profile.chunk_tokens),
        "tokens": sum(profile.chunk_tokens),
        "chunk_size": chunk_size,
        "first_date": first.isoformat() if first else None,
        "last_date": last.isoformat() if last else None,
    }
    return profile


def _size(path: str) -> int:
    """Bytes of an export file, or of every file in an export folder."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)
