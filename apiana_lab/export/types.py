"""Plain data handed from the export readers to the chunker."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

# Entry kinds. Only DIALOGUE entries are the user/assistant conversation proper;
# every other kind stays on the branch, typed, so prompts can choose to include it.
DIALOGUE = "dialogue"
TOOL_CALL = "tool_call"  # a message whose recipient is not "all" (python, browser, web.run, canmore.*, bio, ...)
TOOL_OUTPUT = "tool_output"  # author.role == "tool" / Claude tool_result
CODE = "code"  # content_type code
EXECUTION_OUTPUT = "execution_output"
BROWSING = "browsing"  # tether_browsing_display, tether_quote
THOUGHTS = "thoughts"  # thoughts, Claude thinking blocks
REASONING = "reasoning"  # reasoning_recap
CONTEXT = "context"  # custom instructions (user_editable_context, user_context_message_data)
HIDDEN = "hidden"  # visually hidden messages (hidden system messages)
SYSTEM = "system"  # visible system messages, system_error
OTHER = "other"

ENTRY_KINDS = (
    DIALOGUE,
    TOOL_CALL,
    TOOL_OUTPUT,
    CODE,
    EXECUTION_OUTPUT,
    BROWSING,
    THOUGHTS,
    REASONING,
    CONTEXT,
    HIDDEN,
    SYSTEM,
    OTHER,
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One message on the chosen branch."""

    role: str  # user, assistant, system, tool
    text: str
    kind: str  # one of ENTRY_KINDS
    content_type: str = "text"
    time: datetime | None = None
    recipient: str | None = None
    channel: str | None = None
    flags: frozenset[str] = frozenset()
    # Non-dialogue entries that happened inside this message (a Claude reply that searched the
    # web between two paragraphs), each with the offset in `text` where it happened, so a
    # prompt can keep the order of events while the message still counts once.
    inline: tuple[tuple[int, Entry], ...] = ()

    @property
    def is_dialogue(self) -> bool:
        """Whether this is user/assistant text, the part every later step relies on."""
        return self.kind == DIALOGUE


@dataclass(slots=True)
class Conversation:
    """One conversation, reduced to the branch its owner last saw."""

    id: str
    title: str
    source_format: str  # chatgpt, chatgpt-sharded, claude
    entries: list[Entry] = field(default_factory=list)
    create_time: datetime | None = None
    update_time: datetime | None = None
    fallback_branch: bool = False
    index: int = 0  # position in its input, for messages about it
    source: str = ""  # the input it was read from (a zip member is shown as archive.zip!member)

    @property
    def dialogue(self) -> list[Entry]:
        """User and assistant messages only: the contract every later step relies on."""
        return [e for e in self.entries if e.kind == DIALOGUE]

    @property
    def non_dialogue(self) -> list[Entry]:
        """Every other entry in order, including those inline in a dialogue message."""
        found = []
        for entry in self.entries:
            if entry.kind != DIALOGUE:
                found.append(entry)
            found.extend(inner for _, inner in entry.inline)
        return found


DUPLICATE_DETAIL_LIMIT = 100


@dataclass(slots=True)
class ReadReport:
    """What a read saw: inputs, formats, skips and duplicates are known before the first conversation."""

    path: str = ""  # the input, or the inputs joined by ", "
    format: str = ""  # the format of every input, or "mixed"
    conversations: int = 0  # yielded so far; complete once the iterator is exhausted
    skipped: list[dict] = field(default_factory=list)  # {"input", "index", "id", "reason", "detail"}
    inputs: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)  # one per input
    duplicates: int = 0  # older versions of a conversation id, dropped
    # The first DUPLICATE_DETAIL_LIMIT of them: {"id", "input", "index", "kept_input", "kept_index"}.
    duplicate_detail: list[dict] = field(default_factory=list)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        """How many conversations were skipped, per reason."""
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s["reason"]] = counts.get(s["reason"], 0) + 1
        return counts
