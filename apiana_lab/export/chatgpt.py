"""Turn one ChatGPT conversation object into a Conversation on the branch its owner last saw."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from apiana_lab.errors import ConversationError
from apiana_lab.export.types import (
    BROWSING,
    CODE,
    CONTEXT,
    DIALOGUE,
    EXECUTION_OUTPUT,
    HIDDEN,
    OTHER,
    REASONING,
    SYSTEM,
    THOUGHTS,
    TOOL_CALL,
    TOOL_OUTPUT,
    Conversation,
    Entry,
)

logger = logging.getLogger(__name__)

DIALOGUE_CONTENT_TYPES = frozenset({"text", "multimodal_text"})
DIALOGUE_CHANNELS = frozenset({None, "final"})

# \ue200 opens a citation run, \ue202 separates its fields, \ue201 closes it;
# \ue203/\ue204 bracket the cited span, whose words we keep.
_CITATION_RUN = re.compile(r"[ \t]*\ue200([^\ue200\ue201]*)\ue201")
_CITATION_LEFTOVER = re.compile(r"[\ue200-\ue206]")
_SOURCE_MARKER = re.compile(r"[ \t]*【[^【】\n]*†[^【】\n]*】")


def to_datetime(value: Any) -> datetime | None:
    """An epoch number or ISO 8601 string as an aware UTC datetime; None when absent or unreadable."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=UTC)
        if isinstance(value, str) and value.strip():
            try:
                return datetime.fromtimestamp(float(value), tz=UTC)
            except ValueError:
                pass
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        logger.debug("unreadable timestamp %r", value)
    return None


def _citation_replacement(match: re.Match) -> str:
    fields = match.group(1).split("\ue202")
    # An entity run renders as its name in the UI, so keep the name; citations render as links only.
    if fields[0] == "entity" and len(fields) > 1:
        try:
            data = json.loads(fields[1])
        except ValueError:
            return ""
        if isinstance(data, list) and len(data) > 1 and isinstance(data[1], str):
            return " " + data[1] if match.group(0)[:1] in (" ", "\t") else data[1]
    return ""


def strip_citations(text: str) -> str:
    """Remove citation markup: private-use runs like \\ue200cite\\ue202turn0search1\\ue201 and 【0†source】."""
    if "\ue200" in text or "\ue203" in text:
        text = _CITATION_RUN.sub(_citation_replacement, text)
        text = _CITATION_LEFTOVER.sub("", text)
    if "【" in text:
        text = _SOURCE_MARKER.sub("", text)
    return text


def _part_placeholder(part: dict) -> str:
    kind = str(part.get("content_type") or "")
    if "image" in kind:
        return "[image]"
    if "audio" in kind:
        return "[audio]"
    return "[attachment]"


def _parts_text(parts: Any) -> tuple[str, str]:
    """(words, display) from `parts`: words are the real text; display adds [image]-style placeholders."""
    if not isinstance(parts, list):
        return "", ""
    words: list[str] = []
    display: list[str] = []
    for part in parts:
        if isinstance(part, str):
            if part:
                words.append(part)
                display.append(part)
        elif isinstance(part, dict):
            # Voice chats carry what was said as a transcription part: that is real text.
            text = part.get("text")
            if part.get("content_type") in ("audio_transcription", "text") and isinstance(text, str):
                if text:
                    words.append(text)
                    display.append(text)
            else:
                display.append(_part_placeholder(part))
    return "\n".join(words), "\n".join(display)


def _str(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _join(*pieces: Any) -> str:
    return "\n\n".join(s for s in (_str(p).strip() for p in pieces) if s)


def _context_text(content: dict, metadata: dict) -> str:
    data = metadata.get("user_context_message_data")
    if isinstance(data, dict):
        return _join(data.get("about_user_message"), data.get("about_model_message"))
    return _join(content.get("user_profile"), content.get("user_instructions"), content.get("model_set_context"))


def _thoughts_text(content: dict) -> str:
    thoughts = content.get("thoughts")
    if not isinstance(thoughts, list):
        return _str(content.get("content") or content.get("text"))
    return "\n\n".join(
        _join(t.get("summary"), t.get("content")) if isinstance(t, dict) else _str(t) for t in thoughts
    ).strip()


def _generic_text(content: dict) -> str:
    if "parts" in content:
        return _parts_text(content.get("parts"))[1]
    for key in ("text", "result", "content"):
        if isinstance(content.get(key), str):
            return content[key]
    return ""


def message_entry(message: dict) -> Entry:
    """Classify one ChatGPT message and pull out its text."""
    author = message.get("author") if isinstance(message.get("author"), dict) else {}
    content = message.get("content") if isinstance(message.get("content"), dict) else {}
    metadata = message.get("metadata") if isinstance(message.get("metadata"), dict) else {}
    role = str(author.get("role") or "unknown")
    content_type = str(content.get("content_type") or "text")
    recipient = message.get("recipient")
    recipient = recipient if isinstance(recipient, str) else None
    channel = message.get("channel")
    channel = channel if isinstance(channel, str) else None
    hidden = bool(metadata.get("is_visually_hidden_from_conversation"))
    flags = set()
    if hidden:
        flags.add("hidden")
    if message.get("status") == "in_progress":
        flags.add("in_progress")
    if channel and channel != "final":
        flags.add(channel)

    # Precedence: what the content is beats who sent it, so a hidden custom-instructions
    # message is CONTEXT and python's execution_output is EXECUTION_OUTPUT, not a bare tool output.
    if content_type in ("user_editable_context", "model_editable_context") or isinstance(
        metadata.get("user_context_message_data"), dict
    ):
        kind, text = CONTEXT, _context_text(content, metadata)
        if not text:
            text = _parts_text(content.get("parts"))[1]
    elif content_type == "code":
        kind, text = CODE, _str(content.get("text"))
    elif content_type == "execution_output":
        kind, text = EXECUTION_OUTPUT, _str(content.get("text"))
    elif content_type == "tether_browsing_display":
        kind, text = BROWSING, _join(content.get("summary"), content.get("result"))
    elif content_type == "tether_quote":
        title, url = _str(content.get("title")), _str(content.get("url"))
        kind, text = BROWSING, _join(f"{title} ({url})" if url else title, content.get("text"))
    elif content_type == "thoughts":
        kind, text = THOUGHTS, _thoughts_text(content)
    elif content_type == "reasoning_recap":
        kind, text = REASONING, _str(content.get("content"))
    elif content_type == "system_error":
        kind, text = SYSTEM, _join(content.get("name"), content.get("text"))
    else:
        words, text = _parts_text(content.get("parts")) if "parts" in content else ("", _generic_text(content))
        text = strip_citations(text).strip()
        words = strip_citations(words).strip() if words else ""
        if "parts" in content and text != words:
            flags.add("attachment")
        if role == "tool":
            kind = TOOL_OUTPUT
        elif recipient not in (None, "all"):
            kind = TOOL_CALL
        elif hidden:
            kind = HIDDEN
        elif role == "system":
            kind = SYSTEM
        elif (
            role in ("user", "assistant")
            and content_type in DIALOGUE_CONTENT_TYPES
            and channel in DIALOGUE_CHANNELS
            and words
        ):
            kind = DIALOGUE
        else:
            kind = OTHER
            if not words:
                flags.add("empty")
    return Entry(
        role=role,
        text=text,
        kind=kind,
        content_type=content_type,
        time=to_datetime(message.get("create_time")),
        recipient=recipient,
        channel=channel,
        flags=frozenset(flags),
    )


def _branch(mapping: dict, start: str, conv_id: str | None, index: int) -> list[str]:
    """Node ids from the root down to `start`, following parent links."""
    path = []
    seen = set()
    node_id: Any = start
    while node_id is not None and node_id in mapping:
        if node_id in seen:
            raise ConversationError(
                "cycle", f"parent links loop back to node {node_id!r}", conversation_id=conv_id, index=index
            )
        seen.add(node_id)
        path.append(node_id)
        node_id = mapping[node_id].get("parent")
    if node_id is not None:
        logger.debug(
            "conversation %s: parent %r is missing from mapping; treating %r as the root",
            conv_id or index,
            node_id,
            path[-1],
        )
    path.reverse()
    return path


def _newest_leaf(mapping: dict) -> str | None:
    """The leaf with the greatest message create_time (nulls oldest, ties go to the later node)."""
    # Parent links, not `children` lists, decide leafhood: they are what the branch walk
    # follows, and sharded exports have no `children` at all.
    parents = {node.get("parent") for node in mapping.values()}
    best, best_time = None, None
    for node_id, node in mapping.items():
        if node_id in parents:
            continue
        message = node.get("message")
        created = message.get("create_time") if isinstance(message, dict) else None
        timed = isinstance(created, (int, float)) and not isinstance(created, bool)
        created = float(created) if timed else float("-inf")
        if best is None or created >= best_time:
            best, best_time = node_id, created
    return best


def conversation_id(obj: dict) -> str | None:
    """The id ChatGPT gave a conversation (`id`, or `conversation_id` in older exports), or None."""
    raw_id = obj.get("id") or obj.get("conversation_id")
    return str(raw_id) if raw_id else None


def parse_conversation(obj: Any, index: int, source_format: str = "chatgpt") -> Conversation:
    """One ChatGPT conversation object as a Conversation; raises ConversationError when malformed."""
    if not isinstance(obj, dict):
        raise ConversationError(
            "not_an_object", f"expected a conversation object, found {type(obj).__name__}", index=index
        )
    conv_id = conversation_id(obj)
    mapping = obj.get("mapping")
    if mapping is None:
        raise ConversationError(
            "no_mapping", "the conversation has no `mapping` of messages", conversation_id=conv_id, index=index
        )
    if not isinstance(mapping, dict):
        raise ConversationError(
            "bad_type",
            f"`mapping` is a {type(mapping).__name__}, expected an object",
            conversation_id=conv_id,
            index=index,
        )
    for node_id, node in mapping.items():
        if not isinstance(node, dict):
            raise ConversationError(
                "bad_type",
                f"node {node_id!r} is a {type(node).__name__}, expected an object",
                conversation_id=conv_id,
                index=index,
            )
        parent = node.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise ConversationError(
                "bad_type",
                f"node {node_id!r} has a {type(parent).__name__} parent",
                conversation_id=conv_id,
                index=index,
            )
        message = node.get("message")
        if message is not None and not isinstance(message, dict):
            raise ConversationError(
                "bad_type",
                f"node {node_id!r} has a {type(message).__name__} message",
                conversation_id=conv_id,
                index=index,
            )

    # An empty mapping, or a branch of hidden or system messages only, is a chat that was opened
    # and never used: it is listed with no dialogue, not skipped.
    current = obj.get("current_node")
    fallback = bool(mapping) and not (isinstance(current, str) and current in mapping)
    if fallback:
        current = _newest_leaf(mapping)
        if current is None:
            raise ConversationError("cycle", "no leaf to start the branch from", conversation_id=conv_id, index=index)
        logger.debug("conversation %s: current_node missing, using the newest leaf %r", conv_id or index, current)

    entries = [
        message_entry(mapping[node_id]["message"])
        for node_id in (_branch(mapping, current, conv_id, index) if mapping else ())
        if mapping[node_id].get("message") is not None
    ]
    return Conversation(
        id=conv_id or f"index-{index}",
        title=_str(obj.get("title")),
        source_format=source_format,
        entries=entries,
        create_time=to_datetime(obj.get("create_time")),
        update_time=to_datetime(obj.get("update_time")),
        fallback_branch=fallback,
        index=index,
    )
