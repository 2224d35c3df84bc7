"""The synthetic export generator: deterministic, sized, well-formed, and as varied as real exports."""

from __future__ import annotations

import collections
import json
from importlib import resources
from pathlib import Path

import pytest

from apiana_lab.export.synth import (
    CLAUDE_ROOT,
    MB,
    SAMPLE_PATH,
    SAMPLE_SEED,
    SAMPLE_SIZE_MB,
    vocabulary,
    write_sample_export,
    write_synthetic_export,
)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


def _out(tmp_path: Path, fmt: str, name: str = "export") -> Path:
    return tmp_path / (name if fmt == "chatgpt-sharded" else f"{name}.json")


def _load_chatgpt(path: Path) -> list[dict]:
    if path.is_dir():
        manifest = json.loads((path / "export_manifest.json").read_text())
        return [c for name in manifest["files"] for c in json.loads((path / name).read_text(encoding="utf-8"))]
    return json.loads(path.read_text(encoding="utf-8"))


def _branch(conv: dict) -> list[dict]:
    """Messages from the root to current_node; the newest leaf when current_node is missing."""
    mapping = conv["mapping"]
    current = conv["current_node"]
    if current not in mapping:
        parents = {n["parent"] for n in mapping.values()}
        leaves = [k for k in mapping if k not in parents]
        current = max(leaves, key=lambda k: (mapping[k]["message"] or {}).get("create_time") or 0)
    path, node = [], mapping[current]
    while node is not None:
        if node["message"]:
            path.append(node["message"])
        node = mapping.get(node["parent"]) if node["parent"] else None
    return path[::-1]


def _has_exchange(messages: list[dict]) -> bool:
    def says(m: dict, role: str) -> bool:
        c = m["content"]
        return (
            m["author"]["role"] == role
            and m["recipient"] == "all"
            and c["content_type"] in ("text", "multimodal_text")
            and not m["metadata"].get("is_visually_hidden_from_conversation")
            and any(isinstance(p, str) and p.strip() for p in c["parts"])
        )

    return any(says(m, "user") for m in messages) and any(says(m, "assistant") for m in messages)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[list[dict], object, int]:
    """A 5 MB ChatGPT export: (conversations, stats, file size)."""
    path = tmp_path_factory.mktemp("synth") / "conversations.json"
    stats = write_synthetic_export(path, size_mb=5, seed=3)
    return json.loads(path.read_text(encoding="utf-8")), stats, path.stat().st_size


@pytest.mark.parametrize("fmt", ["chatgpt", "chatgpt-sharded", "claude"])
def test_same_seed_gives_identical_bytes(tmp_path, fmt):
    a, b = _out(tmp_path, fmt, "a"), _out(tmp_path, fmt, "b")
    write_synthetic_export(a, size_mb=0.4, format=fmt, seed=5)
    write_synthetic_export(b, size_mb=0.4, format=fmt, seed=5)
    if fmt == "chatgpt-sharded":
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for p in a.iterdir():
            assert p.read_bytes() == (b / p.name).read_bytes()
    else:
        assert a.read_bytes() == b.read_bytes()


def test_word_lists_are_read_from_the_data_files(tmp_path):
    folder = resources.files("apiana_lab").joinpath("data").joinpath("synth")
    on_disk = {}
    for f in folder.iterdir():
        if f.name.endswith(".json"):
            on_disk.update(json.loads(f.read_text(encoding="utf-8")))
    words = vocabulary()
    assert words == on_disk and vocabulary() is words  # every data file, read once
    assert len(words["topics"]) >= 20 and {"ja", "ru", "zh"} <= {x["language"] for x in words["languages"]}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_synthetic_export(a, size_mb=0.2, seed=12, demo=True)
    write_synthetic_export(b, size_mb=0.2, seed=12, demo=True)
    assert a.read_bytes() == b.read_bytes()
    # What the export says comes from the data files, not from lists hidden in the code.
    convs = json.loads(a.read_text(encoding="utf-8"))
    titles = {t for x in words["topics"] + words["languages"] for t in x["titles"]} | set(words["titles_misc"])
    used = {c["title"] for c in convs}
    assert used <= titles and len(used) >= 5
    assert {c["default_model_slug"] for c in convs} <= {m for era in words["models_by_era"] for m in era}
    messages = [n["message"] for c in convs for n in c["mapping"].values() if n["message"]]
    code = {m["content"]["text"] for m in messages if m["recipient"] == "python"}
    assert code and code <= {run["code"] for run in words["python_runs"]}

    claude = tmp_path / "claude.json"
    write_synthetic_export(claude, size_mb=0.2, format="claude", seed=12)
    names = {c["name"] for c in json.loads(claude.read_text(encoding="utf-8"))}
    assert names - {""} and names <= titles | {""}


def test_different_seeds_differ(tmp_path):
    write_synthetic_export(tmp_path / "a.json", size_mb=0.3, seed=1)
    write_synthetic_export(tmp_path / "b.json", size_mb=0.3, seed=2)
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize(
    "fmt,size_mb", [("chatgpt", 1), ("chatgpt", 5), ("claude", 1), ("chatgpt-sharded", 1), ("chatgpt", 0.05)]
)
def test_size_is_within_five_percent(tmp_path, fmt, size_mb):
    path = _out(tmp_path, fmt)
    stats = write_synthetic_export(path, size_mb=size_mb, format=fmt, seed=9)
    assert stats.bytes == _size(path)
    assert abs(stats.bytes - size_mb * MB) <= 0.05 * size_mb * MB


def test_chatgpt_top_level_shape(tmp_path):
    path = tmp_path / "c.json"
    stats = write_synthetic_export(path, size_mb=0.5, seed=4)
    convs = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(convs, list) and len(convs) == stats.conversations
    assert stats.messages == sum(1 for c in convs for n in c["mapping"].values() if n["message"])
    for conv in convs:
        assert {"title", "create_time", "update_time", "mapping", "current_node", "id"} <= conv.keys()
        roots = [k for k, n in conv["mapping"].items() if n["parent"] is None]
        assert len(roots) == 1
        for node_id, node in conv["mapping"].items():
            assert node["id"] == node_id
            assert set(node) == {"id", "message", "parent", "children"}
            for child in node["children"]:
                assert conv["mapping"][child]["parent"] == node_id


def test_claude_shape(tmp_path):
    path = tmp_path / "claude.json"
    stats = write_synthetic_export(path, size_mb=2, format="claude", seed=4)
    convs = json.loads(path.read_text(encoding="utf-8"))
    assert len(convs) == stats.conversations
    counts = collections.Counter()
    for conv in convs:
        assert {"uuid", "name", "created_at", "updated_at", "chat_messages"} <= conv.keys()
        uuids = {m["uuid"] for m in conv["chat_messages"]}
        parents = collections.Counter(m["parent_message_uuid"] for m in conv["chat_messages"])
        counts["branch"] += any(n > 1 for n in parents.values())
        counts["empty"] += not conv["chat_messages"]
        for m in conv["chat_messages"]:
            assert m["sender"] in ("human", "assistant")
            assert m["parent_message_uuid"] == CLAUDE_ROOT or m["parent_message_uuid"] in uuids
            counts["root"] += m["parent_message_uuid"] == CLAUDE_ROOT
            for block in m["content"]:
                counts[block["type"]] += 1
                assert {"text": "text", "thinking": "thinking", "tool_use": "input", "tool_result": "content"}[
                    block["type"]
                ] in block
            block_text = "\n\n".join(b["text"] for b in m["content"] if b["type"] == "text")
            counts["text_disagrees"] += m["text"] != block_text
    assert counts["empty"] == stats.no_dialogue
    for key in ("branch", "root", "text", "thinking", "tool_use", "tool_result", "text_disagrees"):
        assert counts[key] > 0, key


def test_sharded_layout(tmp_path):
    folder = tmp_path / "sharded"
    stats = write_synthetic_export(folder, size_mb=1, format="chatgpt-sharded", seed=2)
    manifest = json.loads((folder / "export_manifest.json").read_text())
    shards = sorted(p.name for p in folder.glob("conversations-*.json"))
    assert manifest["format"] == "chatgpt-sharded" and manifest["version"] == 1
    assert manifest["files"] == shards and len(shards) >= 2
    assert shards[0] == "conversations-000.json"
    total = 0
    for name in shards:
        convs = json.loads((folder / name).read_text(encoding="utf-8"))
        assert isinstance(convs, list) and convs
        total += len(convs)
        for conv in convs:
            for node in conv["mapping"].values():
                assert set(node) == {"id", "message", "parent"}
    assert manifest["conversation_count"] == total == stats.conversations


def test_every_feature_of_real_exports_is_present(big):
    convs, stats, _ = big
    seen = collections.Counter()
    for conv in convs:
        mapping = conv["mapping"]
        root = next(k for k, n in mapping.items() if n["parent"] is None)
        seen["root:client-created-root"] += root == "client-created-root"
        seen["root:uuid"] += root != "client-created-root"
        seen["root_not_first"] += next(iter(mapping)) != root
        seen["no_conversation_id"] += "conversation_id" not in conv
        seen["null_time"] += conv["create_time"] is None or conv["update_time"] is None
        seen["over_1mb"] += len(json.dumps(conv, ensure_ascii=False).encode()) > MB
        current = conv["current_node"]
        if current not in mapping:
            seen["current_missing"] += 1
        elif mapping[current]["children"]:
            seen["current_non_leaf"] += 1
        else:
            leaves = [k for k, n in mapping.items() if not n["children"]]
            newest = max(leaves, key=lambda k: (mapping[k]["message"] or {}).get("create_time") or 0)
            seen["current_older_leaf"] += newest != current
        seen["branched"] += any(len(n["children"]) > 1 for n in mapping.values())
        for node in mapping.values():
            m = node["message"]
            if m is None:
                continue
            c, md = m["content"], m["metadata"]
            assert {
                "id",
                "author",
                "create_time",
                "update_time",
                "content",
                "end_turn",
                "weight",
                "metadata",
                "recipient",
            } <= m.keys()
            assert {"role", "name", "metadata"} <= m["author"].keys()
            seen["ct:" + c["content_type"]] += 1
            seen["role:" + m["author"]["role"]] += 1
            if m["recipient"] != "all":
                seen["recipient:" + m["recipient"]] += 1
            if m.get("channel"):
                seen["channel:" + m["channel"]] += 1
            seen["no_status"] += "status" not in m
            seen["in_progress"] += m.get("status") == "in_progress"
            seen["model_slug"] += "model_slug" in md
            if md.get("is_visually_hidden_from_conversation") and c.get("parts") == [""]:
                seen["hidden_empty"] += 1
            seen["user_context_message_data"] += "user_context_message_data" in md
            for p in c.get("parts", []):
                if isinstance(p, dict) and p["asset_pointer"].startswith("file-service://file-"):
                    seen["image_pointer"] += 1
            if c["content_type"] in ("code", "execution_output"):
                assert isinstance(c["text"], str) and "parts" not in c
            elif c["content_type"] == "tether_browsing_display":
                assert c["result"]
            elif c["content_type"] == "tether_quote":
                assert c["url"] and c["title"] and c["text"]
            elif c["content_type"] == "system_error":
                assert c["name"] and c["text"]
            elif c["content_type"] == "thoughts":
                assert all(t["summary"] and t["content"] for t in c["thoughts"])
            elif c["content_type"] == "reasoning_recap":
                assert c["content"]
            elif c["content_type"] == "user_editable_context":
                assert c["user_profile"] and c["user_instructions"]
            text = "".join(p for p in c.get("parts", []) if isinstance(p, str))
            seen["cite:pua"] += "\ue200cite\ue202turn0search" in text
            seen["cite:source"] += "†source】" in text
            seen["emoji"] += any(ord(ch) >= 0x1F300 for ch in text)
            seen["cjk"] += any("\u3040" <= ch <= "\u9fff" for ch in text)
            seen["cyrillic"] += any("\u0400" <= ch <= "\u04ff" for ch in text)
            seen["over_25k_chars"] += len(text) > 25_000
    expected = [
        "root:client-created-root",
        "root:uuid",
        "root_not_first",
        "no_conversation_id",
        "null_time",
        "over_1mb",
        "current_missing",
        "current_non_leaf",
        "current_older_leaf",
        "branched",
        "ct:text",
        "ct:multimodal_text",
        "ct:code",
        "ct:execution_output",
        "ct:tether_browsing_display",
        "ct:tether_quote",
        "ct:system_error",
        "ct:thoughts",
        "ct:reasoning_recap",
        "ct:user_editable_context",
        "role:user",
        "role:assistant",
        "role:system",
        "role:tool",
        "recipient:python",
        "recipient:browser",
        "recipient:web.run",
        "recipient:bio",
        "channel:commentary",
        "channel:final",
        "no_status",
        "in_progress",
        "model_slug",
        "hidden_empty",
        "user_context_message_data",
        "image_pointer",
        "cite:pua",
        "cite:source",
        "emoji",
        "cjk",
        "cyrillic",
        "over_25k_chars",
    ]
    missing = [k for k in expected if not seen[k]]
    assert not missing, f"missing features: {missing}"
    assert any(k.startswith("recipient:canmore.") for k in seen)
    assert stats.no_dialogue > 0  # conversations deliberately left without a user/assistant exchange


def test_calibrated_to_real_exports(big):
    convs, _, file_bytes = big
    text = 0
    for conv in convs:
        for node in conv["mapping"].values():
            c = (node["message"] or {}).get("content", {})
            for v in [p for p in c.get("parts", []) if isinstance(p, str)] + [
                c.get(k) for k in ("text", "result", "user_profile", "user_instructions")
            ]:
                text += len(v.encode()) if isinstance(v, str) else 0
    assert 0.25 <= text / file_bytes <= 0.45  # real exports: about 35%
    sizes = sorted(len(json.dumps(c, ensure_ascii=False).encode()) for c in convs)
    assert 6_000 <= sizes[len(sizes) // 2] <= 170_000  # typical conversation: 6-170 KB
    assert sum(6_000 <= s <= 170_000 for s in sizes) >= 0.7 * len(sizes)


def test_current_branch_always_has_a_dialogue_exchange_except_deliberate_ones(big):
    convs, stats, _ = big
    without = [c for c in convs if not _has_exchange(_branch(c))]
    assert len(without) == stats.no_dialogue
    assert 0 < stats.no_dialogue <= 0.05 * len(convs)  # about 1%, deliberately


def test_committed_sample_regenerates_identically(tmp_path):
    assert SAMPLE_PATH.exists(), "run apiana_lab.export.synth.write_sample_export() to create it"
    fresh = tmp_path / "sample.json"
    stats = write_sample_export(fresh)
    assert fresh.read_bytes() == SAMPLE_PATH.read_bytes()
    assert stats.bytes < 200_000 and abs(stats.bytes - SAMPLE_SIZE_MB * MB) < 0.05 * SAMPLE_SIZE_MB * MB
    assert 8 <= stats.conversations <= 15
    assert SAMPLE_SEED == 7


def test_sample_shows_the_main_features():
    convs = json.loads(SAMPLE_PATH.read_text(encoding="utf-8"))
    messages = [n["message"] for c in convs for n in c["mapping"].values() if n["message"]]
    types = {m["content"]["content_type"] for m in messages}
    assert {"multimodal_text", "code", "execution_output", "thoughts", "tether_browsing_display"} <= types
    assert any(m["author"]["role"] == "tool" for m in messages)
    assert any(m["metadata"].get("is_visually_hidden_from_conversation") for m in messages)
    assert any(len(n["children"]) > 1 for c in convs for n in c["mapping"].values())
    assert any(ord(ch) > 127 for m in messages for p in m["content"].get("parts", []) if isinstance(p, str) for ch in p)
    assert all(_has_exchange(_branch(c)) for c in convs)
    # Short dialogue, so a tiny model can summarize it on CPU.
    longest = max(len(p) for m in messages for p in m["content"].get("parts", []) if isinstance(p, str))
    assert longest < 3_000


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        write_synthetic_export(tmp_path / "x.json", size_mb=1, format="bard")
    with pytest.raises(ValueError, match="size_mb"):
        write_synthetic_export(tmp_path / "x.json", size_mb=0)
    with pytest.raises(ValueError, match="conversation_kb"):
        write_synthetic_export(tmp_path / "x.json", size_mb=1, conversation_kb=(5, 2))


def test_conversation_size_makes_many_short_or_a_few_long_conversations(tmp_path):
    """`conversation_kb` sets each conversation's size; the last one still fills the budget."""
    short = write_synthetic_export(tmp_path / "short.json", size_mb=0.2, demo=True, conversation_kb=(1.5, 3.5))
    long = write_synthetic_export(tmp_path / "long.json", size_mb=0.25, demo=True, conversation_kb=(110, 130))
    default = write_synthetic_export(tmp_path / "default.json", size_mb=0.2, demo=True)
    assert short.conversations > 1.4 * default.conversations and long.conversations <= 3
    sizes = [len(json.dumps(c, ensure_ascii=False).encode()) for c in json.loads((tmp_path / "long.json").read_text())]
    assert min(sizes[:-1]) > 100_000


@pytest.mark.parametrize("fmt", ["chatgpt", "chatgpt-sharded", "claude"])
def test_reader_reads_every_format_with_only_deliberate_gaps(tmp_path, fmt):
    from apiana_lab.export import reader
    from apiana_lab.export.types import ReadReport

    path = _out(tmp_path, fmt)
    stats = write_synthetic_export(path, size_mb=2, format=fmt, seed=21)
    report = ReadReport()
    convs = list(reader.read_export(path, report=report))
    # Deliberately empty conversations may be skipped or read without dialogue; nothing else may go missing.
    assert len(convs) + len(report.skipped) == stats.conversations
    assert len(report.skipped) + sum(not c.dialogue for c in convs) == stats.no_dialogue
    assert set(report.skipped_by_reason) <= {"no_messages"}
