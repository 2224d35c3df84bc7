"""Turn one Claude.ai conversation object into a Conversation on the branch its owner last saw."""

from __future__ import annotations

import json
import logging
from typing import Any

from apiana_lab.errors import ConversationError
from apiana_lab.export.chatgpt import strip_citations, to_datetime
from apiana_lab.export.types import DIALOGUE, OTHER, THOUGHTS, TOOL_CALL, TOOL_OUTPUT, Conversation, Entry

logger = logging.getLogger(__name__)

ROOT_SENTINEL = "00000000-0000-4000-8000-000000000000"
_ROLES = {"human": "user", "assistant": "assistant"}


def _block_text(value: Any) -> str:
    """Text of a tool_result's content: a string, or a list of text/knowledge items."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        pieces = []
        for item in value:
            if isinstance(item, str):
                pieces.append(item)
            elif isinstance(item, dict):
                text = item.get("text") if isinstance(item.get("text"), str) else item.get("title")
                if isinstance(text, str) and text:
                    pieces.append(text)
        return "\n\n".join(pieces)
    return "" if value is None else json.dumps(value, ensure_ascii=False)


def _thinking_text(block: dict) -> str:
    text = block.get("thinking")
    if isinstance(text, str) and text:
        return text
    summaries = block.get("summaries")
    if isinstance(summaries, list):
        return "\n".join(s["summary"] for s in summaries if isinstance(s, dict) and isinstance(s.get("summary"), str))
    return ""


def message_entries(message: dict) -> list[Entry]:
    """The entries of one Claude message: one dialogue entry when it has text, others in block order.

    A reply that uses tools between paragraphs is still one message as its reader saw it, so its
    text runs join into one DIALOGUE entry and the tool and thinking blocks ride along as
    `inline` entries at the offsets where they happened.
    """
    sender = str(message.get("sender") or "unknown")
    role = _ROLES.get(sender, sender)
    time = to_datetime(message.get("created_at"))
    blocks = message.get("content")
    if not (isinstance(blocks, list) and blocks):
        # The message-level text can disagree with the blocks, so it is only the fallback.
        text = message.get("text")
        return [_text_entry(role, text if isinstance(text, str) else "", time)]

    # Events in block order: a str is a run of text, an Entry is anything else.
    events: list[str | Entry] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            if isinstance(block.get("text"), str):
                # Consecutive text blocks are one reply split around citations: no separator.
                if events and isinstance(events[-1], str):
                    events[-1] += block["text"]
                else:
                    events.append(block["text"])
        elif kind == "thinking":
            events.append(
                Entry(role=role, text=_thinking_text(block), kind=THOUGHTS, content_type="thinking", time=time)
            )
        elif kind == "tool_use":
            name = block.get("name") if isinstance(block.get("name"), str) else None
            events.append(
                Entry(
                    role=role,
                    text=_block_text(block.get("input")),
                    kind=TOOL_CALL,
                    content_type="tool_use",
                    time=time,
                    recipient=name,
                )
            )
        elif kind == "tool_result":
            flags = frozenset({"error"}) if block.get("is_error") else frozenset()
            events.append(
                Entry(
                    role="tool",
                    text=_block_text(block.get("content")),
                    kind=TOOL_OUTPUT,
                    content_type="tool_result",
                    time=time,
                    flags=flags,
                )
            )
        else:
            logger.debug("ignoring Claude content block of type %r", kind)
    runs = [e if isinstance(e, Entry) else strip_citations(e).strip() for e in events]

    if role not in _ROLES.values() or not any(isinstance(r, str) and r for r in runs):
        # No dialogue here: every block stays its own typed entry, in order.
        entries = [r if isinstance(r, Entry) else _text_entry(role, r, time) for r in runs if isinstance(r, Entry) or r]
        return entries or [_text_entry(role, "", time)]

    text, inline = "", []
    for run in runs:
        if isinstance(run, Entry):
            inline.append((len(text), run))
        elif run:
            text = f"{text}\n\n{run}" if text else run
    return [Entry(role=role, text=text, kind=DIALOGUE, time=time, inline=tuple(inline))]


def _text_entry(role: str, text: str, time) -> Entry:
    text = strip_citations(text).strip()
    if role in ("user", "assistant") and text:
        return Entry(role=role, text=text, kind=DIALOGUE, time=time)
    return Entry(role=role, text=text, kind=OTHER, time=time, flags=frozenset() if text else frozenset({"empty"}))


def _branch(messages: list[dict], leaf_uuid: Any, conv_id: str | None, index: int) -> tuple[list[dict], bool]:
    """Messages from the root to the current leaf, and whether the leaf had to be guessed."""
    if not any(m.get("parent_message_uuid") for m in messages):
        return messages, False
    by_uuid = {m["uuid"]: m for m in messages if isinstance(m.get("uuid"), str)}
    fallback = leaf_uuid is not None and leaf_uuid not in by_uuid
    leaf = by_uuid[leaf_uuid] if leaf_uuid in by_uuid else messages[-1]
    path = [leaf]
    seen = {id(leaf)}
    parent = leaf.get("parent_message_uuid")
    while parent and parent != ROOT_SENTINEL and parent in by_uuid:
        node = by_uuid[parent]
        if id(node) in seen:
            raise ConversationError(
                "cycle", f"parent links loop back to message {parent!r}", conversation_id=conv_id, index=index
            )
        seen.add(id(node))
        path.append(node)
        parent = node.get("parent_message_uuid")
    path.reverse()
    return path, fallback


def conversation_id(obj: dict) -> str | None:
    """The id Claude.ai gave a conversation, or None when it has none."""
    raw_id = obj.get("uuid") or obj.get("id")
    return str(raw_id) if raw_id else None


def parse_conversation(obj: Any, index: int, source_format: str = "claude") -> Conversation:
    """One Claude.ai conversation object as a Conversation; raises ConversationError when malformed."""
    if not isinstance(obj, dict):
        raise ConversationError(
            "not_an_object", f"expected a conversation object, found {type(obj).__name__}", index=index
        )
    conv_id = conversation_id(obj)
    messages = obj.get("chat_messages")
    # An empty list is a chat opened and never used: listed with no dialogue. A missing key is not a
    # conversation Claude.ai writes.
    if messages is None:
        raise ConversationError(
            "no_chat_messages", "the conversation has no `chat_messages` list", conversation_id=conv_id, index=index
        )
    if not isinstance(messages, list):
        raise ConversationError(
            "bad_type",
            f"`chat_messages` is a {type(messages).__name__}, expected a list",
            conversation_id=conv_id,
            index=index,
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConversationError(
                "bad_type",
                f"message #{i} is a {type(message).__name__}, expected an object",
                conversation_id=conv_id,
                index=index,
            )
        parent = message.get("parent_message_uuid")
        if parent is not None and not isinstance(parent, str):
            raise ConversationError(
                "bad_type", f"message #{i} has a {type(parent).__name__} parent", conversation_id=conv_id, index=index
            )

    branch, fallback = _branch(messages, obj.get("current_leaf_message_uuid"), conv_id, index)
    return Conversation(
        id=conv_id or f"index-{index}",
        title=str(obj.get("name") or ""),
        source_format=source_format,
        entries=[entry for message in branch for entry in message_entries(message)],
        create_time=to_datetime(obj.get("created_at")),
        update_time=to_datetime(obj.get("updated_at")),
        fallback_branch=fallback,
        index=index,
    )
