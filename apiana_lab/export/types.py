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
    DIALOGUE, TOOL_CALL, TOOL_OUTPUT, CODE, EXECUTION_OUTPUT, BROWSING,
    THOUGHTS, REASONING, CONTEXT, HIDDEN, SYSTEM, OTHER,
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

    @property
    def is_dialogue(self) -> bool:
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
    index: int = 0  # position in the export, for messages about it

    @property
    def dialogue(self) -> list[Entry]:
        """User and assistant messages only: the contract every later step relies on."""
        return [e for e in self.entries if e.kind == DIALOGUE]


@dataclass(slots=True)
class ReadReport:
    """What a read saw: filled in while iterating, complete once the iterator is exhausted."""

    path: str = ""
    format: str = ""
    conversations: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"index", "id", "reason", "detail"}

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s["reason"]] = counts.get(s["reason"], 0) + 1
        return counts
