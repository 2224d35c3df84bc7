"""Conversations into token-sized chunks, each a ready-to-summarize piece of dialogue."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .errors import ConfigError
from .export import types as t
from .export.types import Conversation, Entry

logger = logging.getLogger(__name__)

# Tool traffic is useful context for a reflection but can be huge (a whole web page, a
# pasted CSV): it goes in by default, cut to this many characters.
DEFAULT_INCLUDE = frozenset({t.DIALOGUE, t.CODE, t.EXECUTION_OUTPUT, t.TOOL_CALL, t.TOOL_OUTPUT, t.BROWSING})
DEFAULT_NON_DIALOGUE_CHARS = 500
MESSAGE_SEPARATOR = "\n\n"

# The label each non-dialogue entry kind gets in chunk text ("Code: ..."), instead of a speaker's role.
SPEAKER_LABELS = {
    t.CODE: "Code",
    t.EXECUTION_OUTPUT: "Code output",
    t.TOOL_CALL: "Tool call",
    t.TOOL_OUTPUT: "Tool output",
    t.BROWSING: "Browsing",
    t.THOUGHTS: "Thoughts",
    t.REASONING: "Reasoning",
    t.CONTEXT: "Custom instructions",
    t.HIDDEN: "Hidden",
    t.SYSTEM: "System",
    t.OTHER: "Other",
}


# The smallest chunk per method. A token chunk also holds its conversation's label and a few tokens
# of framing (see `Chunker._split`), so fewer than 64 tokens would leave little or no room for text.
MIN_CHUNK_SIZE = {"tokens": 64, "messages": 1}


def check_chunk_size(value, method: str = "tokens") -> int:
    """`value` if it is a chunk size `method` can cut to; else a ConfigError saying the smallest allowed.

    The one check of chunk_size: the options, the command line and the notebooks' parameters call it.
    """
    least = MIN_CHUNK_SIZE.get(method, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(
            f"chunk_size must be a whole number of at least {least} {method} for chunk method {method!r}, not {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class ChunkingOptions:
    """How conversations are cut; part of every chunk id."""

    method: str = "tokens"  # "tokens": chunk_size counts tokens; "messages": it counts messages
    chunk_size: int = 3500
    overlap: int = 0  # messages repeated at the start of the next chunk
    include: frozenset[str] = DEFAULT_INCLUDE
    non_dialogue_chars: int = DEFAULT_NON_DIALOGUE_CHARS

    def __post_init__(self):
        if self.method not in ("tokens", "messages"):
            raise ConfigError(f"chunk_method must be 'tokens' or 'messages', not {self.method!r}")
        check_chunk_size(self.chunk_size, self.method)
        if self.overlap < 0:
            raise ConfigError("overlap must be >= 0")
        unknown = set(self.include) - set(t.ENTRY_KINDS)
        if unknown:
            raise ConfigError(f"unknown entry kinds {sorted(unknown)}; known: {', '.join(t.ENTRY_KINDS)}")

    def key(self) -> str:
        return (
            f"{self.method}:{self.chunk_size}:{self.overlap}:{','.join(sorted(self.include))}:{self.non_dialogue_chars}"
        )


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of one conversation, rendered as the text a model will read."""

    id: str
    conversation_id: str
    title: str
    date: datetime | None
    index: int  # position among this conversation's chunks
    first_message: int  # range of rendered messages, inclusive, in conversation order
    last_message: int
    token_count: int
    text: str
    continued: bool = False  # a piece of one over-long message split at token boundaries
    # Where each rendered message starts in `text`: the text is kept once, its messages are views.
    starts: tuple[int, ...] = field(default=(0,), repr=False)

    @property
    def messages(self) -> tuple[str, ...]:
        """The rendered messages this chunk joins, in order."""
        ends = [s - len(MESSAGE_SEPARATOR) for s in self.starts[1:]] + [len(self.text)]
        return tuple(self.text[a:b] for a, b in zip(self.starts, ends))


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """What a run holds of a chunk while it waits to be summarized; the text stays in the store."""

    id: str
    token_count: int


def load_tokenizer(model_dir: str | Path | None = None):
    """The fast tokenizer of the model that will summarize (default: the bundled SmolLM2)."""
    from tokenizers import Tokenizer

    if model_dir is None:
        from .models import default_model_dir

        model_dir = default_model_dir()
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: the model folder needs a fast tokenizer (tokenizer.json) to count tokens."
        )
    return Tokenizer.from_file(str(path))


def render_entry(entry: Entry, options: ChunkingOptions) -> str | None:
    """One message as the model reads it, or None when the options leave it out."""
    if entry.kind not in options.include:
        return None
    if entry.kind == t.DIALOGUE:
        speaker = "User" if entry.role == "user" else "Assistant"
        return _render_with_inline(entry, speaker, options) if entry.inline else f"{speaker}: {entry.text}"
    text = entry.text
    if len(text) > options.non_dialogue_chars:
        text = (
            text[: options.non_dialogue_chars]
            + f" [... {len(entry.text) - options.non_dialogue_chars} more characters]"
        )
    label = SPEAKER_LABELS.get(entry.kind, entry.kind)
    if entry.recipient and entry.recipient != "all":
        label += f" ({entry.recipient})"
    return f"{label}: {text}"


def _render_with_inline(entry: Entry, speaker: str, options: ChunkingOptions) -> str:
    """A message with tool use between its paragraphs, in the order things happened."""
    pieces, start = [], 0
    for offset, inner in entry.inline:
        rendered = render_entry(inner, options)
        if rendered is None:
            continue  # left out, so the text on both sides stays one piece
        before = entry.text[start:offset].strip()
        if before:
            pieces.append(f"{speaker}: {before}")
        pieces.append(rendered)
        start = offset
    rest = entry.text[start:].strip()
    if rest:
        # Named again after a tool block, so the reader cannot take the text for tool output.
        pieces.append(f"{speaker}: {rest}")
    return "\n\n".join(pieces)


class Chunker:
    """Cuts conversations into chunks; holds the tokenizer so it loads once."""

    def __init__(self, options: ChunkingOptions | None = None, tokenizer=None):
        self.options = options or ChunkingOptions()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self._key = self.options.key()

    def chunk(self, conversation: Conversation) -> list[Chunk]:
        """All chunks of one conversation; [] when it has no dialogue."""
        if not conversation.dialogue:
            return []
        rendered = [r for r in (render_entry(e, self.options) for e in conversation.entries) if r is not None]
        # Only the counts are needed here; skipping the character offsets saves a quarter of the
        # tokenizer's time, and the rare message that must be split is encoded again with them.
        encodings = self.tokenizer.encode_batch_fast(rendered, add_special_tokens=False)
        # The "\n\n" joining messages costs up to two tokens (it can split around emoji or
        # trailing spaces); counting two keeps every chunk within its size when re-encoded.
        counts = [len(enc) + 2 for enc in encodings]  # len() counts tokens without building the ids list
        groups = self._group(counts)
        chunks: list[Chunk] = []
        for first, last, split in groups:
            if split is None:
                texts = rendered[first : last + 1]
                self._emit(chunks, conversation, first, last, texts, sum(counts[first : last + 1]), False)
            else:
                for piece, n in self._split(rendered[first]):
                    self._emit(chunks, conversation, first, first, [piece], n, True)
        return chunks

    def chunk_all(self, conversations: Iterable[Conversation]) -> Iterator[Chunk]:
        """Chunks of many conversations, in order."""
        for conversation in conversations:
            yield from self.chunk(conversation)

    def _group(self, counts: list[int]) -> list[tuple[int, int, object]]:
        """Consecutive message ranges; a third field marks one message to split."""
        size, overlap = self.options.chunk_size, self.options.overlap
        by_tokens = self.options.method == "tokens"
        groups: list[tuple[int, int, object]] = []
        start, total, i = 0, 0, 0
        while i < len(counts):
            cost = counts[i] if by_tokens else 1
            if by_tokens and counts[i] > size:
                if i > start:
                    groups.append((start, i - 1, None))
                groups.append((i, i, "split"))
                start, total, i = i + 1, 0, i + 1
                continue
            if total + cost > size and i > start:
                groups.append((start, i - 1, None))
                # Overlap repeats context but never re-enters an over-long message or the whole chunk.
                back = min(overlap, i - 1 - start)
                start = i - back
                total = sum(counts[start:i]) if by_tokens else i - start
                if by_tokens and total + cost > size:
                    start, total = i, 0
                continue
            total += cost
            i += 1
        if start < len(counts):
            groups.append((start, len(counts) - 1, None))
        return groups

    def _split(self, text: str) -> Iterator[tuple[str, int]]:
        label = "(continued) "
        # Margin: cutting between two tokens can re-encode as one more token at each edge.
        step = self.options.chunk_size - len(self.tokenizer.encode(label, add_special_tokens=False).ids) - 4
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        for k in range(0, len(offsets), step):
            lo = offsets[k][0]
            hi = offsets[min(k + step, len(offsets)) - 1][1]
            piece = (label if k else "") + text[lo:hi]
            yield piece, len(self.tokenizer.encode(piece, add_special_tokens=False))

    def _emit(self, chunks, conversation, first, last, texts, tokens, continued):
        text = MESSAGE_SEPARATOR.join(texts)
        starts, at = [], 0
        for piece in texts:
            starts.append(at)
            at += len(piece) + len(MESSAGE_SEPARATOR)
        digest = hashlib.sha256(f"{conversation.id}\x00{self._key}\x00{text}".encode()).hexdigest()[:24]
        chunks.append(
            Chunk(
                id=digest,
                conversation_id=conversation.id,
                title=conversation.title,
                date=conversation.create_time,
                index=len(chunks),
                first_message=first,
                last_message=last,
                token_count=tokens,
                text=text,
                continued=continued,
                starts=tuple(starts),
            )
        )


class ConversationChunkerComponent(Chunker):
    """The design's name for the chunker step: `chunk_method`, `chunk_size`, `overlap`."""

    def __init__(
        self, chunk_method: str = "tokens", chunk_size: int = 3500, overlap: int = 0, tokenizer=None, **options
    ):
        super().__init__(
            ChunkingOptions(method=chunk_method, chunk_size=chunk_size, overlap=overlap, **options), tokenizer
        )
