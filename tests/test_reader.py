"""Tests for the export reader: every input layout, branch rules, entry kinds, errors, streaming."""

from __future__ import annotations

import io
import json
import logging
import time
import tracemalloc
import zipfile
from datetime import UTC, datetime

import pytest

from apiana_lab.errors import ExportError
from apiana_lab.export import (
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
    ChatGPTExportReader,
    ReadReport,
    detect_format,
    read_export,
)
from apiana_lab.export.jsonstream import open_json

SENTINEL = "00000000-0000-4000-8000-000000000000"


# ---------------------------------------------------------------- fixtures built in code


def msg(
    role="user",
    *parts,
    content_type="text",
    content=None,
    recipient="all",
    channel=None,
    hidden=False,
    create_time=None,
    metadata=None,
    status="finished_successfully",
    name=None,
):
    """A ChatGPT message dict; `content` replaces the default {content_type, parts}."""
    meta = dict(metadata or {})
    if hidden:
        meta["is_visually_hidden_from_conversation"] = True
    message = {
        "id": f"m-{role}-{id(parts)}",
        "author": {"role": role, "name": name, "metadata": {}},
        "create_time": create_time,
        "update_time": None,
        "content": content if content is not None else {"content_type": content_type, "parts": list(parts)},
        "status": status,
        "end_turn": None,
        "weight": 1.0,
        "metadata": meta,
        "recipient": recipient,
    }
    if channel is not None:
        message["channel"] = channel
    return message


def tree(nodes, *, current_node=None, conv_id="conv-1", title="Title", children=True, **extra):
    """A ChatGPT conversation from (node_id, parent_id, message) triples, in mapping order."""
    mapping = {}
    for node_id, parent, message in nodes:
        mapping[node_id] = {"id": node_id, "message": message, "parent": parent}
        if children:
            mapping[node_id]["children"] = [n for n, p, _ in nodes if p == node_id]
    conv = {
        "title": title,
        "create_time": 1700000000.5,
        "update_time": 1700000100.0,
        "mapping": mapping,
        "moderation_results": [],
        "current_node": current_node if current_node is not None else nodes[-1][0],
        "conversation_id": conv_id,
        "id": conv_id,
        "status": "finished",
    }
    conv.update(extra)
    return conv


def chain(*messages, conv_id="conv-1", **kw):
    """A linear conversation: a client-created-root node, then one node per message."""
    nodes = [("client-created-root", None, None)]
    for i, message in enumerate(messages):
        nodes.append((f"n{i}", nodes[-1][0], message))
    return tree(nodes, conv_id=conv_id, **kw)


def hello(conv_id="conv-1", **kw):
    return chain(msg("user", "Hello?"), msg("assistant", "Hi!"), conv_id=conv_id, **kw)


def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def read_all(path):
    report = ReadReport(path=str(path))
    return list(read_export(path, report=report)), report


def only(path):
    conversations, _ = read_all(path)
    assert len(conversations) == 1
    return conversations[0]


def entry_of(tmp_path, message):
    """The one entry a single message becomes."""
    conv = only(write_json(tmp_path / "conversations.json", [chain(message)]))
    assert len(conv.entries) == 1
    return conv.entries[0]


def claude_conv(messages, **extra):
    conv = {
        "uuid": "claude-1",
        "name": "Claude chat",
        "created_at": "2024-05-01T10:00:00.000000Z",
        "updated_at": "2024-05-01T10:05:00Z",
        "account": {"uuid": "acc"},
        "chat_messages": messages,
    }
    conv.update(extra)
    return conv


def cmsg(uuid, sender, blocks=None, *, text="", parent=SENTINEL):
    message = {
        "uuid": uuid,
        "sender": sender,
        "text": text,
        "created_at": "2024-05-01T10:00:01Z",
        "updated_at": "2024-05-01T10:00:01Z",
        "attachments": [],
        "files": [],
        "content": [{"type": "text", "text": b} if isinstance(b, str) else b for b in (blocks or [])],
    }
    if parent is not None:
        message["parent_message_uuid"] = parent
    return message


def texts(conv, kind=None):
    return [e.text for e in conv.entries if kind is None or e.kind == kind]


# ---------------------------------------------------------------- input layouts


def test_reads_conversations_json(tmp_path):
    path = write_json(tmp_path / "conversations.json", [hello("a"), hello("b", title=None)])
    conversations, report = read_all(path)
    assert [c.id for c in conversations] == ["a", "b"]
    first = conversations[0]
    assert first.title == "Title" and conversations[1].title == ""
    assert first.source_format == "chatgpt" and first.index == 0 and conversations[1].index == 1
    assert first.create_time == datetime.fromtimestamp(1700000000.5, tz=UTC)
    assert [(e.role, e.text, e.kind) for e in first.entries] == [
        ("user", "Hello?", DIALOGUE),
        ("assistant", "Hi!", DIALOGUE),
    ]
    assert not first.fallback_branch
    assert report.format == "chatgpt" and report.conversations == 2 and report.skipped == []
    assert detect_format(path) == "chatgpt"


def test_export_zip_as_downloaded_with_subfolder(tmp_path):
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__MACOSX/export/._conversations.json", b"\x00\x05junk")
        zf.writestr("export/chat.html", "<html></html>")
        zf.writestr("export/user.json", json.dumps({"id": "user-1"}))
        zf.writestr("export/file-abc.png", b"\x89PNG\r\n")
        zf.writestr("export/conversations.json", json.dumps([hello("z1"), hello("z2")]))
    assert [c.id for c in read_export(archive)] == ["z1", "z2"]
    assert detect_format(archive) == "chatgpt"


def test_zip_with_conversations_at_top_level(tmp_path):
    archive = tmp_path / "download"  # no .zip suffix: detected by content
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("conversations.json", json.dumps([hello("top")]))
    assert [c.id for c in read_export(archive)] == ["top"]


def test_folder_with_conversations_json_directly_or_in_subfolder(tmp_path):
    write_json(tmp_path / "conversations.json", [hello("flat")])
    assert [c.id for c in read_export(tmp_path)] == ["flat"]
    outer = tmp_path / "outer"
    (outer / "unzipped").mkdir(parents=True)
    write_json(outer / "unzipped" / "conversations.json", [hello("nested")])
    assert [c.id for c in read_export(outer)] == ["nested"]


def _shards(folder, *, manifest=None, children=False):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        write_json(folder / f"conversations-{i:03d}.json", [hello(f"s{i}-{j}", children=children) for j in range(2)])
    if manifest is not None:
        write_json(folder / "export_manifest.json", manifest)
    return folder


@pytest.mark.parametrize(
    "manifest",
    [
        ["conversations-002.json", "conversations-000.json", "conversations-001.json"],
        {
            "version": 1,
            "files": [
                {"name": "conversations-002.json"},
                {"name": "conversations-000.json"},
                {"name": "conversations-001.json"},
                {"name": "user.json"},
            ],
        },
        {
            "shards": [
                {"path": "./conversations-002.json", "count": 2},
                {"path": "conversations-000.json"},
                {"file": "conversations-001.json"},
            ]
        },
    ],
)
def test_sharded_folder_follows_manifest_order(tmp_path, manifest):
    folder = _shards(tmp_path / "export", manifest=manifest)
    conversations, report = read_all(folder)
    assert [c.id for c in conversations] == ["s2-0", "s2-1", "s0-0", "s0-1", "s1-0", "s1-1"]
    assert [c.index for c in conversations] == list(range(6))
    assert report.format == "chatgpt-sharded" and {c.source_format for c in conversations} == {"chatgpt-sharded"}
    assert texts(conversations[0]) == ["Hello?", "Hi!"]
    assert detect_format(folder) == "chatgpt-sharded"


def test_sharded_folder_without_file_list_globs_shards_in_order(tmp_path):
    folder = _shards(tmp_path, manifest={"export_version": "2026-01", "conversation_count": 6})
    for i in range(3, 11):
        write_json(folder / f"conversations-{i:03d}.json", [hello(f"s{i}-0")])
    ids = [c.id for c in read_export(folder)]
    assert ids[:6] == ["s0-0", "s0-1", "s1-0", "s1-1", "s2-0", "s2-1"]
    assert ids[6:] == [f"s{i}-0" for i in range(3, 11)]
    (folder / "export_manifest.json").unlink()
    assert [c.id for c in read_export(folder)] == ids


def test_sharded_nodes_without_children_rebuild_the_tree(tmp_path):
    # Two branches, no `children`, current_node missing: the newest leaf must be found from parents.
    conv = tree(
        [
            ("root", None, None),
            ("q", "root", msg("user", "question", create_time=1)),
            ("old", "q", msg("assistant", "old answer", create_time=2)),
            ("new", "q", msg("assistant", "new answer", create_time=3)),
        ],
        children=False,
    )
    del conv["current_node"]
    folder = tmp_path / "export"
    folder.mkdir()
    write_json(folder / "conversations-000.json", [conv])
    result = only(folder)
    assert texts(result) == ["question", "new answer"] and result.fallback_branch


def test_sharded_zip(tmp_path):
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(
            "chatgpt-export/export_manifest.json",
            json.dumps({"files": ["conversations-001.json", "conversations-000.json"]}),
        )
        zf.writestr("chatgpt-export/conversations-000.json", json.dumps([hello("a", children=False)]))
        zf.writestr("chatgpt-export/conversations-001.json", json.dumps([hello("b", children=False)]))
    conversations, report = read_all(archive)
    assert [c.id for c in conversations] == ["b", "a"] and report.format == "chatgpt-sharded"


def test_single_shard_file(tmp_path):
    path = write_json(tmp_path / "conversations-007.json", [hello("one", children=False)])
    conversations, report = read_all(path)
    assert [c.id for c in conversations] == ["one"] and report.format == "chatgpt-sharded"
    assert detect_format(path) == "chatgpt-sharded"


def test_manifest_listing_a_missing_shard_is_an_export_error(tmp_path):
    folder = _shards(tmp_path, manifest=["conversations-000.json", "conversations-009.json"])
    with pytest.raises(ExportError, match="conversations-009.json.*missing"):
        read_export(folder)


def test_claude_export_list(tmp_path):
    convs = [
        claude_conv([cmsg("m1", "human", ["Hi Claude"]), cmsg("m2", "assistant", ["Hello!"], parent="m1")]),
        claude_conv([cmsg("x1", "human", ["Second"])], uuid="claude-2", name=None),
    ]
    path = write_json(tmp_path / "conversations.json", convs)
    conversations, report = read_all(path)
    assert report.format == "claude" and detect_format(path) == "claude"
    first, second = conversations
    assert first.id == "claude-1" and first.title == "Claude chat" and first.source_format == "claude"
    assert first.create_time == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert [(e.role, e.text, e.kind) for e in first.entries] == [
        ("user", "Hi Claude", DIALOGUE),
        ("assistant", "Hello!", DIALOGUE),
    ]
    assert second.id == "claude-2" and second.title == ""


def test_claude_single_conversation_object(tmp_path):
    conv = claude_conv(
        [cmsg("m1", "human", ["Hi"]), cmsg("m2", "assistant", ["Bye"], parent="m1")], current_leaf_message_uuid="m2"
    )
    path = write_json(tmp_path / "one.json", conv)
    assert detect_format(path) == "claude"
    assert texts(only(path)) == ["Hi", "Bye"]


def test_single_chatgpt_conversation_object(tmp_path):
    path = write_json(tmp_path / "conversation.json", hello("solo"))
    assert detect_format(path) == "chatgpt"
    conv = only(path)
    assert conv.id == "solo" and texts(conv) == ["Hello?", "Hi!"]


def test_top_level_object_wrapping_a_conversations_list(tmp_path):
    path = write_json(tmp_path / "conversations.json", {"conversations": [hello("w1"), hello("w2")]})
    assert [c.id for c in read_export(path)] == ["w1", "w2"]


def test_export_reader_class_fills_its_report(tmp_path):
    path = write_json(tmp_path / "conversations.json", [hello("a"), 42])
    reader = ChatGPTExportReader(path)
    assert [c.id for c in reader] == ["a"]
    assert reader.report.conversations == 1 and reader.report.skipped_by_reason == {"not_an_object": 1}
    assert reader.report.path == str(path)
    assert len(list(reader)) == 1 and reader.report.conversations == 1  # a second pass starts a fresh report


def test_empty_list_yields_nothing(tmp_path, caplog):
    path = tmp_path / "conversations.json"
    path.write_text("[ ]\n")
    conversations, report = read_all(path)
    assert conversations == [] and report.conversations == 0 and report.format == "chatgpt"


# ---------------------------------------------------------------- branch rules


def _branchy(current_node, **kw):
    """root -> q -> a1 (older leaf) / a2 -> q2 -> a3 (newest leaf); root is NOT the first key."""
    return tree(
        [
            ("a1", "q", msg("assistant", "first answer", create_time=20)),
            ("q", "client-created-root", msg("user", "question", create_time=10)),
            ("client-created-root", None, None),
            ("a2", "q", msg("assistant", "regenerated answer", create_time=30)),
            ("q2", "a2", msg("user", "follow-up", create_time=40)),
            ("a3", "q2", msg("assistant", "final answer", create_time=50)),
        ],
        current_node=current_node,
        **kw,
    )


def test_branch_to_current_node_leaf(tmp_path):
    conv = only(write_json(tmp_path / "c.json", [_branchy("a3")]))
    assert texts(conv) == ["question", "regenerated answer", "follow-up", "final answer"]
    assert not conv.fallback_branch


def test_branch_to_an_older_leaf(tmp_path):
    conv = only(write_json(tmp_path / "c.json", [_branchy("a1")]))
    assert texts(conv) == ["question", "first answer"] and not conv.fallback_branch


def test_branch_to_a_non_leaf_current_node(tmp_path):
    conv = only(write_json(tmp_path / "c.json", [_branchy("a2")]))
    assert texts(conv) == ["question", "regenerated answer"]


@pytest.mark.parametrize("current", [None, "no-such-node"])
def test_missing_current_node_falls_back_to_newest_leaf(tmp_path, current):
    data = _branchy(current)
    if current is None:
        del data["current_node"]
    conv = only(write_json(tmp_path / "c.json", [data]))
    assert texts(conv) == ["question", "regenerated answer", "follow-up", "final answer"]
    assert conv.fallback_branch


def test_fallback_counts_null_times_as_oldest_and_breaks_ties_by_mapping_order(tmp_path):
    nodes = [
        ("root", None, None),
        ("q", "root", msg("user", "q", create_time=None)),
        ("x", "q", msg("assistant", "timed", create_time=5)),
        ("y", "q", msg("assistant", "untimed", create_time=None)),
    ]
    conv = only(write_json(tmp_path / "c.json", [tree(nodes, current_node="gone")]))
    assert texts(conv) == ["q", "timed"]
    tie = nodes[:2] + [
        ("x", "q", msg("assistant", "first", create_time=5)),
        ("y", "q", msg("assistant", "second", create_time=5)),
    ]
    conv = only(write_json(tmp_path / "c.json", [tree(tie, current_node="gone")]))
    assert texts(conv) == ["q", "second"]


def test_orphan_parent_is_treated_as_the_root(tmp_path):
    conv = tree([("q", "deleted-node", msg("user", "still here")), ("a", "q", msg("assistant", "yes"))])
    assert texts(only(write_json(tmp_path / "c.json", [conv]))) == ["still here", "yes"]


# ---------------------------------------------------------------- entry kinds


def test_dialogue_contract(tmp_path):
    conv = only(
        write_json(
            tmp_path / "c.json",
            [
                chain(
                    msg("system", "", hidden=True),
                    msg("user", "Question", create_time=1700000001),
                    msg("assistant", "Answer", channel="final"),
                    msg("assistant", "", "  "),
                )
            ],
        )
    )
    assert [e.kind for e in conv.entries] == [HIDDEN, DIALOGUE, DIALOGUE, OTHER]
    assert [e.text for e in conv.dialogue] == ["Question", "Answer"]
    assert conv.entries[1].time == datetime.fromtimestamp(1700000001, tz=UTC)
    assert conv.entries[2].channel == "final"
    assert "empty" in conv.entries[3].flags
    assert all(e.is_dialogue == (e.kind == DIALOGUE) for e in conv.entries)


def test_multimodal_dict_parts_become_placeholders(tmp_path):
    image = {"content_type": "image_asset_pointer", "asset_pointer": "file-service://file-1", "width": 10}
    audio = {"content_type": "audio_asset_pointer", "asset_pointer": "sediment://file-2"}
    other = {"content_type": "file_attachment", "name": "x.pdf"}
    entry = entry_of(tmp_path, msg("user", image, "What is this?", content_type="multimodal_text"))
    assert entry.kind == DIALOGUE and entry.text == "[image]\nWhat is this?" and "attachment" in entry.flags
    entry = entry_of(tmp_path, msg("user", image, content_type="multimodal_text"))
    assert entry.kind == OTHER and entry.text == "[image]"
    entry = entry_of(tmp_path, msg("user", audio, other, "", content_type="multimodal_text"))
    assert entry.kind == OTHER and entry.text == "[audio]\n[attachment]"


def test_voice_transcription_counts_as_text(tmp_path):
    parts = [
        {"content_type": "audio_transcription", "text": "spoken words", "direction": "in"},
        {"content_type": "audio_asset_pointer", "asset_pointer": "sediment://a"},
    ]
    entry = entry_of(tmp_path, msg("user", *parts, content_type="multimodal_text"))
    assert entry.kind == DIALOGUE and entry.text == "spoken words\n[audio]"


def test_citation_markers_are_stripped(tmp_path):
    text = (
        "Paris is the capital \ue200cite\ue202turn0search1\ue202turn0news3\ue201. "
        'It has \ue200entity\ue202["city","Lyon","France"]\ue201 too 【12:0†source】.'
    )
    entry = entry_of(tmp_path, msg("assistant", text))
    assert entry.text == "Paris is the capital. It has Lyon too." and entry.kind == DIALOGUE


def test_message_of_citations_only_is_not_dialogue(tmp_path):
    entry = entry_of(tmp_path, msg("assistant", "\ue200cite\ue202turn0search0\ue201"))
    assert entry.kind == OTHER and entry.text == ""


@pytest.mark.parametrize(
    "message, kind, text",
    [
        (
            msg(
                "assistant",
                content={"content_type": "code", "language": "python", "text": "print(1)"},
                recipient="python",
            ),
            CODE,
            "print(1)",
        ),
        (
            msg("tool", content={"content_type": "execution_output", "text": "1\n"}, name="python"),
            EXECUTION_OUTPUT,
            "1\n",
        ),
        (
            msg("tool", content={"content_type": "tether_browsing_display", "result": "L0: page", "summary": None}),
            BROWSING,
            "L0: page",
        ),
        (
            msg("tool", content={"content_type": "tether_quote", "url": "https://e.x", "title": "Ex", "text": "quote"}),
            BROWSING,
            "Ex (https://e.x)\n\nquote",
        ),
        (
            msg(
                "assistant",
                content={
                    "content_type": "thoughts",
                    "thoughts": [{"summary": "Plan", "content": "think hard"}, {"summary": "Check", "content": ""}],
                    "source_analysis_msg_id": "x",
                },
            ),
            THOUGHTS,
            "Plan\n\nthink hard\n\nCheck",
        ),
        (
            msg("assistant", content={"content_type": "reasoning_recap", "content": "Thought for 5 seconds"}),
            REASONING,
            "Thought for 5 seconds",
        ),
        (
            msg("tool", content={"content_type": "system_error", "name": "ChatGPTError", "text": "boom"}),
            SYSTEM,
            "ChatGPTError\n\nboom",
        ),
        (msg("system", "You are ChatGPT."), SYSTEM, "You are ChatGPT."),
        (msg("assistant", "search('x')", recipient="browser"), TOOL_CALL, "search('x')"),
        (
            msg("assistant", '{"updates": []}', recipient="canmore.update_textdoc", channel="commentary"),
            TOOL_CALL,
            '{"updates": []}',
        ),
        (msg("tool", "results here", name="web.run"), TOOL_OUTPUT, "results here"),
        (msg("tool", "memory updated", name="bio", recipient="assistant"), TOOL_OUTPUT, "memory updated"),
        (msg("assistant", "Let me look that up.", channel="commentary"), OTHER, "Let me look that up."),
        (msg("assistant", content={"content_type": "super_widget", "widget": {}}), OTHER, ""),
        (msg("user", "secret", hidden=True), HIDDEN, "secret"),
    ],
)
def test_entry_kinds(tmp_path, message, kind, text):
    entry = entry_of(tmp_path, message)
    assert (entry.kind, entry.text) == (kind, text)


def test_entry_fields_for_tool_traffic_and_commentary(tmp_path):
    conv = only(
        write_json(
            tmp_path / "c.json",
            [
                chain(
                    msg("user", "weather?"),
                    msg("assistant", "Checking.", channel="commentary"),
                    msg("assistant", '{"q": "weather"}', recipient="web.run", channel="analysis"),
                    msg("tool", "sunny", name="web.run"),
                    msg("assistant", "It is sunny.", channel="final"),
                )
            ],
        )
    )
    kinds = [(e.kind, e.role, e.recipient, e.channel) for e in conv.entries]
    assert kinds == [
        (DIALOGUE, "user", "all", None),
        (OTHER, "assistant", "all", "commentary"),
        (TOOL_CALL, "assistant", "web.run", "analysis"),
        (TOOL_OUTPUT, "tool", "all", None),
        (DIALOGUE, "assistant", "all", "final"),
    ]
    assert "commentary" in conv.entries[1].flags
    assert [e.text for e in conv.dialogue] == ["weather?", "It is sunny."]


def test_custom_instructions_as_user_editable_context(tmp_path):
    content = {
        "content_type": "user_editable_context",
        "user_profile": "I am a chemist.",
        "user_instructions": "Be brief.",
    }
    entry = entry_of(tmp_path, msg("user", content=content, hidden=True))
    assert entry.kind == CONTEXT and entry.text == "I am a chemist.\n\nBe brief." and "hidden" in entry.flags


def test_custom_instructions_in_metadata(tmp_path):
    data = {"about_user_message": "I live in Oslo.", "about_model_message": "Use metric units."}
    entry = entry_of(tmp_path, msg("user", "", hidden=True, metadata={"user_context_message_data": data}))
    assert entry.kind == CONTEXT and entry.text == "I live in Oslo.\n\nUse metric units."


def test_null_message_nodes_are_skipped_and_null_timestamps_are_none(tmp_path):
    conv = chain(msg("user", "hi"), None, msg("assistant", "yo"))
    conv["create_time"] = None
    conv["update_time"] = None
    result = only(write_json(tmp_path / "c.json", [conv]))
    assert texts(result) == ["hi", "yo"] and result.create_time is None and result.update_time is None
    assert result.entries[0].time is None


def test_old_export_fields_status_and_ids(tmp_path):
    old = chain(msg("user", "old"))
    for key in ("conversation_id", "status", "id"):
        del old[key]
    legacy = chain(msg("user", "legacy"), conv_id=None)
    del legacy["id"]
    legacy["conversation_id"] = "cid-only"
    running = chain(msg("user", "q"), msg("assistant", "partial", status="in_progress"), status="in_progress")
    convs = list(read_export(write_json(tmp_path / "c.json", [old, legacy, running])))
    assert [c.id for c in convs] == ["index-0", "cid-only", "conv-1"]
    assert convs[2].entries[1].kind == DIALOGUE and "in_progress" in convs[2].entries[1].flags


def test_non_ascii_emoji_and_huge_messages(tmp_path):
    big = "日本語のテキスト 🎉🚀 Ünïcödé " * 1400  # ~28k characters
    conv = only(write_json(tmp_path / "c.json", [chain(msg("user", big), msg("assistant", "👍"), title="Ça va? 😀")]))
    assert len(conv.entries[0].text) > 25_000 and conv.entries[0].text == big.strip()
    assert conv.title == "Ça va? 😀" and conv.entries[1].text == "👍"


# ---------------------------------------------------------------- Claude specifics

CATS_BLOCKS = [
    {"type": "thinking", "thinking": "Let me think.", "summaries": []},
    {"type": "text", "text": "Searching "},
    {"type": "text", "text": "now."},
    {"type": "tool_use", "name": "web_search", "input": {"query": "cats"}},
    {
        "type": "tool_result",
        "name": "web_search",
        "content": [{"type": "text", "text": "Cats are great."}],
        "is_error": False,
    },
    {"type": "text", "text": "  "},
    {"type": "tool_use", "name": "web_fetch", "input": {"url": "https://cats.example"}},
    {"type": "tool_result", "name": "web_fetch", "content": "404", "is_error": True},
    {"type": "text", "text": "Cats are great."},
    {"type": "token_budget"},
]


def test_claude_message_with_tool_blocks_is_one_dialogue_message(tmp_path):
    conv = claude_conv(
        [
            cmsg("u", "human", ["Tell me about cats"]),
            cmsg("a", "assistant", CATS_BLOCKS, text="disagreeing text", parent="u"),
        ]
    )
    result = only(write_json(tmp_path / "c.json", [conv]))
    assert [(e.kind, e.role, e.text) for e in result.entries] == [
        (DIALOGUE, "user", "Tell me about cats"),
        (DIALOGUE, "assistant", "Searching now.\n\nCats are great."),
    ]
    assert [e.text for e in result.dialogue] == ["Tell me about cats", "Searching now.\n\nCats are great."]
    reply = result.entries[1]
    # Blocks stay in order, at the offset in the text where they happened: the whitespace-only
    # run between the two tool pairs is no paragraph.
    assert [(offset, e.kind, e.role, e.text) for offset, e in reply.inline] == [
        (0, THOUGHTS, "assistant", "Let me think."),
        (14, TOOL_CALL, "assistant", '{"query": "cats"}'),
        (14, TOOL_OUTPUT, "tool", "Cats are great."),
        (14, TOOL_CALL, "assistant", '{"url": "https://cats.example"}'),
        (14, TOOL_OUTPUT, "tool", "404"),
    ]
    assert reply.text[:14] == "Searching now."
    assert reply.inline[1][1].recipient == "web_search" and "error" in reply.inline[4][1].flags
    assert reply.time == reply.inline[0][1].time == datetime(2024, 5, 1, 10, 0, 1, tzinfo=UTC)
    assert [e.kind for e in result.non_dialogue] == [THOUGHTS, TOOL_CALL, TOOL_OUTPUT, TOOL_CALL, TOOL_OUTPUT]


def test_claude_tool_blocks_render_in_the_order_they_happened(tmp_path, tokenizer):
    from apiana_lab.chunking import Chunker, ChunkingOptions

    conv = claude_conv(
        [
            cmsg("u", "human", ["Tell me about cats"]),
            cmsg("a", "assistant", CATS_BLOCKS, parent="u"),
            cmsg("u2", "human", ["Thanks"], parent="a"),
        ]
    )
    result = only(write_json(tmp_path / "c.json", [conv]))
    chunks = Chunker(ChunkingOptions(chunk_size=3500), tokenizer).chunk(result)
    assert len(chunks) == 1
    # One rendered message per Claude message; inside it, the events in block order (thoughts left out).
    assert chunks[0].messages == (
        "User: Tell me about cats",
        "Assistant: Searching now.\n\n"
        'Tool call (web_search): {"query": "cats"}\n\nTool output: Cats are great.\n\n'
        'Tool call (web_fetch): {"url": "https://cats.example"}\n\nTool output: 404\n\n'
        "Assistant: Cats are great.",
        "User: Thanks",
    )
    assert (chunks[0].first_message, chunks[0].last_message) == (0, 2)
    # With tool traffic left out the message reads as its text alone; with thoughts in, they come first.
    plain = Chunker(ChunkingOptions(include=frozenset({DIALOGUE})), tokenizer).chunk(result)[0]
    assert plain.messages[1] == "Assistant: Searching now.\n\nCats are great."
    thoughtful = Chunker(ChunkingOptions(include=frozenset({DIALOGUE, THOUGHTS})), tokenizer).chunk(result)[0]
    assert thoughtful.messages[1] == "Thoughts: Let me think.\n\nAssistant: Searching now.\n\nCats are great."


def test_claude_message_of_tool_blocks_only_keeps_them_as_entries(tmp_path):
    blocks = [
        {"type": "text", "text": ""},
        {"type": "tool_use", "name": "repl", "input": {"code": "1+1"}},
        {"type": "tool_result", "name": "repl", "content": [{"type": "text", "text": "2"}]},
    ]
    conv = claude_conv([cmsg("u", "human", ["add"]), cmsg("a", "assistant", blocks, parent="u")])
    result = only(write_json(tmp_path / "c.json", [conv]))
    assert [(e.kind, e.text) for e in result.entries] == [
        (DIALOGUE, "add"),
        (TOOL_CALL, '{"code": "1+1"}'),
        (TOOL_OUTPUT, "2"),
    ]
    assert len(result.dialogue) == 1 and all(not e.inline for e in result.entries)


def test_claude_empty_chat_messages_is_listed_without_dialogue(tmp_path, tokenizer):
    from apiana_lab.chunking import Chunker

    convs = [
        claude_conv([], uuid="never-used"),
        claude_conv([cmsg("m", "human", ["hi"])], uuid="used"),
        claude_conv(None, uuid="broken"),
        claude_conv({"m": 1}, uuid="wrong-type"),
    ]
    conversations, report = read_all(write_json(tmp_path / "conversations.json", convs))
    assert [(c.id, len(c.entries), len(c.dialogue)) for c in conversations] == [("never-used", 0, 0), ("used", 1, 1)]
    assert Chunker(tokenizer=tokenizer).chunk(conversations[0]) == []
    assert report.conversations == 2
    assert report.skipped_by_reason == {"no_chat_messages": 1, "bad_type": 1}


def test_claude_message_text_only_without_blocks(tmp_path):
    conv = claude_conv([cmsg("u", "human", text="from the text field"), cmsg("a", "assistant", text="", parent="u")])
    result = only(write_json(tmp_path / "c.json", [conv]))
    assert [(e.kind, e.text) for e in result.entries] == [(DIALOGUE, "from the text field"), (OTHER, "")]


def test_claude_branch_from_current_leaf_and_sentinel_root(tmp_path):
    messages = [
        cmsg("u1", "human", ["Q"]),
        cmsg("a1", "assistant", ["old answer"], parent="u1"),
        cmsg("a2", "assistant", ["new answer"], parent="u1"),
        cmsg("u2", "human", ["next on old branch"], parent="a1"),
    ]
    chosen = only(write_json(tmp_path / "c.json", [claude_conv(messages, current_leaf_message_uuid="a2")]))
    assert texts(chosen) == ["Q", "new answer"] and not chosen.fallback_branch
    last = only(write_json(tmp_path / "c.json", [claude_conv(messages)]))
    assert texts(last) == ["Q", "old answer", "next on old branch"]
    lost = only(write_json(tmp_path / "c.json", [claude_conv(messages, current_leaf_message_uuid="gone")]))
    assert texts(lost) == texts(last) and lost.fallback_branch


def test_claude_without_parent_links_uses_list_order(tmp_path):
    messages = [
        cmsg("u1", "human", ["one"], parent=None),
        cmsg("a1", "assistant", ["two"], parent=None),
        cmsg("u2", "human", ["three"], parent=None),
    ]
    assert texts(only(write_json(tmp_path / "c.json", [claude_conv(messages)]))) == ["one", "two", "three"]


def test_claude_cycle_is_skipped(tmp_path):
    messages = [cmsg("a", "human", ["x"], parent="b"), cmsg("b", "assistant", ["y"], parent="a")]
    conversations, report = read_all(write_json(tmp_path / "c.json", [claude_conv(messages)]))
    assert conversations == [] and report.skipped_by_reason == {"cycle": 1}


# ---------------------------------------------------------------- malformed conversations


def test_bad_conversations_are_skipped_and_counted(tmp_path, caplog):
    cycle = tree([("a", "b", msg("user", "x")), ("b", "a", msg("assistant", "y"))], conv_id="cyclic", current_node="a")
    leafless = tree(
        [("a", "b", msg("user", "x")), ("b", "a", msg("assistant", "y"))], conv_id="leafless", current_node="zzz"
    )
    data = [
        hello("good-1"),
        17,
        {"id": "no-map", "title": "x"},
        {"id": "list-map", "mapping": []},
        cycle,
        leafless,
        {"id": "bad-node", "mapping": {"n": "not a node"}, "current_node": "n"},
        {"id": "bad-parent", "mapping": {"n": {"parent": 5, "message": None}}, "current_node": "n"},
        {"id": "empty", "mapping": {}},  # opened and never used: listed, not skipped
        chain(None, conv_id="only-root"),
        chain(msg("system", "", hidden=True), msg("system", "You are ChatGPT."), conv_id="system-only"),
        {"mapping": {"n": {"parent": None, "message": {"author": "weird", "content": ["x"], "metadata": 3}}}},
        hello("good-2"),
    ]
    with caplog.at_level(logging.WARNING, logger="apiana_lab.export"):
        conversations, report = read_all(write_json(tmp_path / "conversations.json", data))
    assert [c.id for c in conversations] == ["good-1", "empty", "only-root", "system-only", "index-11", "good-2"]
    assert [c.index for c in conversations] == [0, 8, 9, 10, 11, 12]
    assert [(len(c.entries), len(c.dialogue)) for c in conversations[1:4]] == [(0, 0), (0, 0), (2, 0)]
    assert not conversations[1].fallback_branch
    assert report.conversations == 6
    assert report.skipped_by_reason == {"not_an_object": 1, "no_mapping": 1, "bad_type": 3, "cycle": 2}
    assert report.skipped[0] == {
        "input": str(tmp_path / "conversations.json"),
        "index": 1,
        "id": None,
        "reason": "not_an_object",
        "detail": "expected a conversation object, found int",
    }
    assert {s["id"] for s in report.skipped if s["reason"] == "cycle"} == {"cyclic", "leafless"}
    assert "'no-map'" in caplog.text and "#1" in caplog.text and "cycle" in caplog.text


# ---------------------------------------------------------------- files that cannot be read


def test_nonexistent_path(tmp_path):
    with pytest.raises(ExportError, match="no such file or folder; expected a ChatGPT or Claude export") as e:
        read_export(tmp_path / "missing.zip")
    assert e.value.path == str(tmp_path / "missing.zip")


def test_folder_or_zip_without_conversations(tmp_path):
    (tmp_path / "user.json").write_text("{}")
    with pytest.raises(ExportError, match="no conversations.json"):
        read_export(tmp_path)
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("photos/cat.jpg", b"\xff\xd8")
    with pytest.raises(ExportError, match="no conversations.json"):
        detect_format(archive)


def test_damaged_zip(tmp_path):
    archive = tmp_path / "export.zip"
    archive.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ExportError, match="not a readable zip"):
        read_export(archive)


def test_unreadable_file(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    path = write_json(tmp_path / "conversations.json", [hello()])
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: answer as the kernel answers any other user for a mode-0 file
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode, **kw: False if Path(p) == path else real_access(p, mode, **kw)
        )
    try:
        with pytest.raises(ExportError, match="permission denied: make the file readable") as e:
            read_export(path)
        assert e.value.path == str(path)
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("content, found", [("42", "int"), ('"text"', "str"), ("null", "null")])
def test_unrecognised_top_level(tmp_path, content, found):
    path = tmp_path / "conversations.json"
    path.write_text(content)
    with pytest.raises(ExportError, match=f"top level is a JSON {found}, not a list of conversations"):
        list(read_export(path))


def test_unrecognised_top_level_object(tmp_path):
    path = write_json(tmp_path / "conversations.json", {"user": "me", "email": "x"})
    with pytest.raises(ExportError, match=r"not a conversation \(keys: user, email\)"):
        list(read_export(path))


def _error_for(path):
    with pytest.raises(ExportError) as e:
        list(read_export(path))
    return e.value


def test_bad_json_reports_byte_offset_after_non_ascii(tmp_path):
    good = json.dumps([hello("é-😀-日本")], ensure_ascii=False)
    text = good[:-1] + ', {"id": "x", "title": "ñ", "mapping": tru}]'
    path = tmp_path / "conversations.json"
    path.write_text(text, encoding="utf-8")
    error = _error_for(path)
    expected = len(text[: text.index("tru}")].encode("utf-8"))
    assert error.offset == expected and f"at byte {expected}" in str(error)
    assert error.path == str(path) and "Expecting value" in str(error)


def test_garbage_between_elements_in_a_multi_block_file(tmp_path):
    # Over 4 MiB of non-ASCII conversations, then garbage: the offset must survive block boundaries.
    conv = chain(msg("user", "日本語 ✓ 😀 " * 300), msg("assistant", "ok"))
    body = ", ".join(json.dumps(dict(conv, id=f"c{i}"), ensure_ascii=False) for i in range(800))
    text = "[" + body + " @@garbage@@ , " + json.dumps(hello("after")) + "]"
    path = tmp_path / "conversations.json"
    path.write_text(text, encoding="utf-8")
    assert path.stat().st_size > 4 * 1024 * 1024
    seen = []
    with pytest.raises(ExportError) as e:
        for c in read_export(path):
            seen.append(c.id)
    assert seen == []  # the whole file is read before any conversation is handed on
    assert e.value.offset == len(text[: text.index("@@garbage")].encode("utf-8"))


def test_error_inside_zip_names_the_member(tmp_path):
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("export/conversations.json", '[{"id": "a", "mapping": {}} {"id": "b"}]')
    error = _error_for(archive)
    assert error.path == f"{archive}!export/conversations.json" and error.offset == 28


def test_truncated_file(tmp_path):
    text = json.dumps([hello("a"), hello("b")])
    path = tmp_path / "conversations.json"
    for cut in (len(text) - 1, len(text) // 2, text.index('"Hi!') + 2):
        path.write_text(text[:cut])
        error = _error_for(path)
        assert "the file ends early: the download was probably cut off" in str(error), (cut, str(error))
        assert ("the list of conversations is not closed" in str(error)) == (cut == len(text) - 1)


def test_truncated_file_stops_the_read_before_any_conversation(tmp_path):
    text = json.dumps([hello("a"), hello("b")])
    path = tmp_path / "conversations.json"
    path.write_text(text[: text.index('"b"') + 20])
    ids = []
    with pytest.raises(ExportError, match="ends early"):
        for c in read_export(path):
            ids.append(c.id)
    assert ids == []


@pytest.mark.parametrize(
    "content, says",
    [
        (b"hello world", "the file is not valid JSON"),
        (b"<html><body>Export</body></html>", "the file is not valid JSON"),
        (b"", "the file is empty"),
    ],
)
def test_non_json_file(tmp_path, content, says):
    path = tmp_path / "conversations.json"
    path.write_bytes(content)
    error = _error_for(path)
    assert error.offset == 0 and says in str(error)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "conversations.json"
    path.write_bytes(b'[{"title": "caf\xe9"}]')
    error = _error_for(path)
    assert error.offset == 15 and "not UTF-8" in str(error)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "conversations.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([hello("bom")]).encode())
    assert [c.id for c in read_export(path)] == ["bom"]
    path.write_bytes(b"\xef\xbb\xbf[1, x]")
    assert _error_for(path).offset == 7


# ---------------------------------------------------------------- the streaming decoder itself

VALUES = [
    {"a": [1, 2.5, -3e2, True, None], "s": 'é😀\\"\u2028日本'},
    12345678901234567890,
    "tail",
    [],
    {},
    {"long": "x" * 5000},
    -0.5,
    False,
]


@pytest.mark.parametrize("block_size", [1, 2, 3, 7, 64, 4096])
def test_stream_matches_json_loads_at_any_block_size(block_size):
    raw = (" \n[ " + " ,\n ".join(json.dumps(v, ensure_ascii=False) for v in VALUES) + " ]\n").encode()
    kind, values = open_json(io.BytesIO(raw), "mem", block_size=block_size)
    assert kind == "list" and list(values) == VALUES


@pytest.mark.parametrize("block_size", [1, 5, 4096])
def test_stream_error_offsets_at_any_block_size(block_size):
    text = '[{"k": "日本😀"}, {"k": 1,, "x": 2}]'
    with pytest.raises(ExportError) as e:
        list(open_json(io.BytesIO(text.encode()), "mem", block_size=block_size)[1])
    assert e.value.offset == len(text[: text.index(",,") + 1].encode())


@pytest.mark.parametrize("block_size", [1, 2, 4096])
def test_stream_bom_at_any_block_size(block_size):
    raw = b"\xef\xbb\xbf" + '["é", 1]'.encode()
    assert list(open_json(io.BytesIO(raw), "mem", block_size=block_size)[1]) == ["é", 1]
    with pytest.raises(ExportError) as e:
        list(open_json(io.BytesIO(b"\xef\xbb\xbf" + '["é" 1]'.encode()), "mem", block_size=block_size)[1])
    assert e.value.offset == 9


def test_stream_top_level_number_split_across_blocks():
    kind, values = open_json(io.BytesIO(b"123456"), "mem", block_size=2)
    assert kind == "value" and list(values) == [123456]


def test_real_error_found_without_reading_the_whole_file():
    class CountingStream(io.BytesIO):
        read_bytes = 0

        def read(self, n=-1):
            data = super().read(n)
            CountingStream.read_bytes += len(data)
            return data

    body = '[{"a": 1 "b": 2}, ' + ", ".join(['{"pad": "' + "p" * 1000 + '"}'] * 1000) + "]"
    stream = CountingStream(body.encode())
    with pytest.raises(ExportError) as e:
        list(open_json(stream, "mem", block_size=4096)[1])
    assert e.value.offset == 9 and CountingStream.read_bytes <= 3 * 4096


def test_element_larger_than_many_blocks():
    big = {"text": "😀" * 200_000}
    raw = json.dumps([big, {"n": 1}], ensure_ascii=False).encode()
    assert list(open_json(io.BytesIO(raw), "mem", block_size=1024)[1]) == [big, {"n": 1}]


def test_stream_works_on_zip_member_files(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("c.json", json.dumps(VALUES, ensure_ascii=False))
    with zipfile.ZipFile(archive) as zf, zf.open("c.json") as f:
        assert list(open_json(f, "a.zip!c.json", block_size=100)[1]) == VALUES


# ---------------------------------------------------------------- memory stays flat


def test_streaming_memory_stays_flat(tmp_path):
    # ~40 MB of realistic conversations; json.load would need several hundred MB for this.
    conv = chain(*(msg("user" if i % 2 == 0 else "assistant", ("Some text, ünïcode and 😀. " * 200)) for i in range(8)))
    template = json.dumps(conv, ensure_ascii=False)
    path = tmp_path / "conversations.json"
    count = 0
    with path.open("w", encoding="utf-8") as f:
        f.write("[")
        while f.tell() < 40 * 1024 * 1024:
            f.write(("," if count else "") + template.replace('"conv-1"', f'"conv-{count}"'))
            count += 1
        f.write("]")
    size = path.stat().st_size

    tracemalloc.start()
    start = time.perf_counter()
    try:
        read = sum(1 for _ in read_export(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert read == count
    assert peak < 30 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"
    assert elapsed < 30
