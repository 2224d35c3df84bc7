"""Several exports at once: merging by id, newest version wins, inputs checked up front, stable chunk ids."""

from __future__ import annotations

import json
import logging
import zipfile

import pytest

from apiana_lab.errors import ExportError
from apiana_lab.export import ChatGPTExportReader, ReadReport, read_export

VOCAB = (
    "garden river morning coffee letter train window music walk kitchen friend book "
    "winter project code tired happy plan budget doctor sleep travel idea question"
).split()


def conv(conv_id, *texts, updated=1700000100.0, title="T"):
    """A linear ChatGPT conversation (no `children`, as in shards) of alternating user/assistant texts."""
    mapping = {"root": {"id": "root", "message": None, "parent": None}}
    parent = "root"
    for i, text in enumerate(texts):
        node = f"{conv_id}-{i}"
        message = {
            "id": node,
            "author": {"role": "user" if i % 2 == 0 else "assistant"},
            "content": {"content_type": "text", "parts": [text]},
            "recipient": "all",
            "metadata": {},
        }
        mapping[node] = {"id": node, "message": message, "parent": parent}
        parent = node
    result = {
        "title": title,
        "create_time": 1700000000.0,
        "update_time": updated,
        "mapping": mapping,
        "current_node": parent,
    }
    if conv_id is not None:
        result["id"] = conv_id
    return result


def claude(uuid, *texts, updated="2024-05-01T10:05:00Z"):
    messages = [
        {
            "uuid": f"{uuid}-{i}",
            "sender": "human" if i % 2 == 0 else "assistant",
            "text": "",
            "content": [{"type": "text", "text": t}],
            "created_at": "2024-05-01T10:00:00Z",
        }
        for i, t in enumerate(texts)
    ]
    return {
        "uuid": uuid,
        "name": "Claude chat",
        "created_at": "2024-05-01T10:00:00Z",
        "updated_at": updated,
        "chat_messages": messages,
    }


def write(path, conversations):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(conversations), encoding="utf-8")
    return path


def zipped(path, conversations):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("export/conversations.json", json.dumps(conversations))
        zf.writestr("export/user.json", "{}")
    return path


def read(paths):
    report = ReadReport()
    return list(read_export(paths, report=report)), report


def words(conversation):
    return [e.text for e in conversation.dialogue]


# ---------------------------------------------------------------- duplicates in one input


def test_same_conversation_twice_in_one_file(tmp_path):
    path = write(
        tmp_path / "conversations.json",
        [
            conv("a", "hello", updated=1700000001.0),
            conv("b", "other"),
            conv("a", "hello", "and a reply", updated=1700000002.0),
        ],
    )
    conversations, report = read(path)
    # Kept versions come in input order, at their own position.
    assert [(c.id, c.index) for c in conversations] == [("b", 1), ("a", 2)]
    assert words(conversations[1]) == ["hello", "and a reply"]
    assert report.conversations == 2 and report.duplicates == 1 and report.skipped == []
    assert report.duplicate_detail == [
        {"id": "a", "input": str(path), "index": 0, "kept_input": str(path), "kept_index": 2}
    ]
    assert report.inputs == [str(path)] and report.path == str(path) and report.format == "chatgpt"


def test_within_one_input_the_newest_wins_wherever_it_is_and_ties_go_to_the_later(tmp_path):
    path = write(
        tmp_path / "c.json",
        [conv("a", "newest", updated=3.0), conv("a", "older", updated=2.0), conv("a", "untimed", updated=None)],
    )
    conversations, report = read(path)
    assert [words(c) for c in conversations] == [["newest"]] and report.duplicates == 2
    assert {d["index"] for d in report.duplicate_detail} == {1, 2}
    assert {(d["kept_index"], d["kept_input"]) for d in report.duplicate_detail} == {(0, str(path))}
    write(path, [conv("a", "first", updated=None), conv("a", "second", updated=None)])
    assert [words(c) for c in read(path)[0]] == [["second"]]
    write(path, [conv("a", "first", updated=5.0), conv("a", "second", updated=5.0)])
    assert [words(c) for c in read(path)[0]] == [["second"]]


def test_sharded_export_repeating_a_conversation_across_shards(tmp_path):
    folder = tmp_path / "shards"
    write(folder / "conversations-000.json", [conv("a", "v1", updated=1.0), conv("b", "b")])
    write(folder / "conversations-001.json", [conv("a", "v2", updated=2.0)])
    conversations, report = read(folder)
    assert [(c.id, words(c), c.index) for c in conversations] == [("b", ["b"], 1), ("a", ["v2"], 2)]
    assert report.duplicates == 1 and report.format == "chatgpt-sharded"


# ---------------------------------------------------------------- several inputs


@pytest.fixture
def overlapping(tmp_path):
    """An older export as downloaded (zip) and a newer one unpacked (folder): `a` grew in between."""
    old = zipped(tmp_path / "2024.zip", [conv("a", "question", updated=1700000000.0), conv("b", "only old")])
    write(
        tmp_path / "2025" / "conversations.json",
        [conv("a", "question", "answer", updated=1800000000.0), conv("c", "only new")],
    )
    return old, tmp_path / "2025"


def test_two_overlapping_exports_newest_version_wins_in_any_order(overlapping):
    old, new = overlapping
    conversations, report = read([old, new])
    assert [c.id for c in conversations] == ["b", "a", "c"]
    assert words(conversations[1]) == ["question", "answer"] and conversations[1].source == str(new)
    assert report.duplicates == 1 and report.conversations == 3
    assert report.duplicate_detail == [
        {"id": "a", "input": str(old), "index": 0, "kept_input": str(new), "kept_index": 0}
    ]
    assert report.inputs == [str(old), str(new)] and report.path == f"{old}, {new}"
    assert report.formats == ["chatgpt", "chatgpt"] and report.format == "chatgpt"

    conversations, report = read([new, old])
    assert [c.id for c in conversations] == ["a", "c", "b"]
    assert words(conversations[0]) == ["question", "answer"] and report.duplicates == 1
    assert report.duplicate_detail[0]["input"] == str(old)


def test_tie_goes_to_the_later_input(tmp_path):
    for updated in (1700000000.0, None):
        first = write(tmp_path / "first.json", [conv("a", "from first", updated=updated)])
        second = write(tmp_path / "second.json", [conv("a", "from second", updated=updated)])
        assert [words(c) for c in read([first, second])[0]] == [["from second"]]
        assert [words(c) for c in read([second, first])[0]] == [["from first"]]
    # A time beats no time, whatever the order.
    timed = write(tmp_path / "timed.json", [conv("a", "timed", updated=1.0)])
    untimed = write(tmp_path / "untimed.json", [conv("a", "untimed", updated=None)])
    assert [words(c) for c in read([timed, untimed])[0]] == [["timed"]]


def test_chatgpt_zip_shards_and_claude_json_mixed(tmp_path):
    archive = zipped(tmp_path / "chatgpt.zip", [conv("g1", "from the zip")])
    shards = tmp_path / "sharded"
    write(shards / "conversations-000.json", [conv("s1", "from a shard")])
    write(shards / "export_manifest.json", {"files": ["conversations-000.json"]})
    claude_json = write(
        tmp_path / "claude" / "conversations.json", [claude("c1", "Hi Claude", "Hello"), claude("c2", "Again")]
    )
    conversations, report = read([archive, shards, claude_json])
    assert [(c.id, c.source_format, c.source) for c in conversations] == [
        ("g1", "chatgpt", str(archive)),
        ("s1", "chatgpt-sharded", str(shards)),
        ("c1", "claude", str(claude_json)),
        ("c2", "claude", str(claude_json)),
    ]
    assert words(conversations[2]) == ["Hi Claude", "Hello"]
    assert report.formats == ["chatgpt", "chatgpt-sharded", "claude"] and report.format == "mixed"
    assert report.conversations == 4 and report.duplicates == 0


def test_conversations_without_an_id_are_never_merged(tmp_path):
    first = write(tmp_path / "a.json", [conv(None, "one"), conv(None, "two")])
    second = write(tmp_path / "b.json", [conv(None, "three")])
    conversations, report = read([first, second])
    # The first input keeps the ids it has when read alone; later inputs say which they are.
    assert [c.id for c in conversations] == ["index-0", "index-1", "index-1-0"]
    assert report.duplicates == 0


def test_export_reader_class_takes_several_paths(overlapping):
    old, new = overlapping
    reader = ChatGPTExportReader([old, new])
    assert [c.id for c in reader] == ["b", "a", "c"]
    assert reader.report.duplicates == 1 and reader.report.inputs == [str(old), str(new)]
    assert [c.id for c in reader] == ["b", "a", "c"] and reader.report.duplicates == 1  # a fresh report per pass
    assert [c.id for c in ChatGPTExportReader(path for path in (new,))] == ["a", "c"]


# ---------------------------------------------------------------- malformed and duplicate together


def test_malformed_and_duplicate_conversations_are_each_counted_once(tmp_path, caplog):
    first = write(
        tmp_path / "first.json",
        [
            conv("a", "a, good", updated=1.0),
            17,
            conv("x", "x, newer", updated=5.0),
            {"id": "bad", "mapping": []},
        ],
    )
    second = write(
        tmp_path / "second.json",
        [
            {"id": "a", "update_time": 9.0, "mapping": "broken"},  # newer but malformed: must not win
            conv("x", "x, older", updated=4.0),
            {"id": "bad", "mapping": []},
            17,
        ],
    )
    with caplog.at_level(logging.WARNING, logger="apiana_lab.export"):
        conversations, report = read([first, second])
    assert [(c.id, words(c)) for c in conversations] == [("a", ["a, good"]), ("x", ["x, newer"])]
    assert report.conversations == 2 and report.duplicates == 1
    assert report.duplicate_detail == [
        {"id": "x", "input": str(second), "index": 1, "kept_input": str(first), "kept_index": 2}
    ]
    # Each malformed conversation is skipped, logged and counted once, and never wins as a newer version.
    assert [(s["input"], s["index"], s["id"], s["reason"]) for s in report.skipped] == [
        (str(first), 1, None, "not_an_object"),
        (str(first), 3, "bad", "bad_type"),
        (str(second), 0, "a", "bad_type"),
        (str(second), 2, "bad", "bad_type"),
        (str(second), 3, None, "not_an_object"),
    ]
    skipped_logs = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped_logs) == 5 and str(second) in skipped_logs[-1].getMessage()


def test_report_is_complete_before_the_first_conversation(tmp_path):
    first = write(tmp_path / "first.json", [conv("a", "old", updated=1.0), 17])
    second = write(tmp_path / "second.json", [conv("a", "new", updated=2.0)])
    report = ReadReport()
    it = read_export([first, second], report=report)
    assert report.inputs == [str(first), str(second)] and report.formats == []  # nothing read yet
    next(it)
    assert report.duplicates == 1 and len(report.skipped) == 1 and report.formats == ["chatgpt", "chatgpt"]
    assert report.conversations == 1
    it.close()


# ---------------------------------------------------------------- inputs checked before anything is read


def test_every_path_is_checked_at_once_and_the_error_names_it(tmp_path):
    good = write(tmp_path / "good.json", [conv("a", "hi")])
    with pytest.raises(ExportError, match="no such file or folder") as e:
        read_export([good, tmp_path / "missing.zip"])
    assert e.value.path == str(tmp_path / "missing.zip")
    (tmp_path / "photos").mkdir()
    with pytest.raises(ExportError, match="no conversations.json") as e:
        read_export([tmp_path / "photos", good])
    assert e.value.path == str(tmp_path / "photos")
    with pytest.raises(ExportError, match="no input given"):
        read_export([])


def test_a_broken_later_input_stops_the_read_before_any_conversation(tmp_path):
    good = write(tmp_path / "good.json", [conv("a", "hi"), conv("b", "there")])
    text = json.dumps([conv("c", "cut")])
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    seen = []
    with pytest.raises(ExportError, match="ends early") as e:
        for c in read_export([good, cut]):
            seen.append(c.id)
    assert seen == [] and e.value.path == str(cut)


def test_each_input_is_read_once_even_with_duplicates_and_skips(tmp_path, monkeypatch):
    from apiana_lab.export import reader

    first = write(tmp_path / "first.json", [conv("a", "old", updated=1.0), 17, conv("b", "b")])
    shards = tmp_path / "shards"
    write(shards / "conversations-000.json", [conv("a", "new", updated=2.0)])
    write(shards / "conversations-001.json", [conv("a", "newer", updated=3.0), conv("c", "c")])
    opened = []
    real = reader.open_json

    def counting(stream, name, **kw):
        opened.append(name)
        return real(stream, name, **kw)

    monkeypatch.setattr(reader, "open_json", counting)
    conversations, report = read([first, shards])
    assert [(c.id, words(c)) for c in conversations] == [("b", ["b"]), ("a", ["newer"]), ("c", ["c"])]
    assert report.duplicates == 2 and len(report.skipped) == 1
    assert opened == [str(first), str(shards / "conversations-000.json"), str(shards / "conversations-001.json")]


def test_an_input_rewritten_once_the_read_has_begun_changes_nothing(tmp_path):
    # Still downloading or unzipping when the run started: what comes out is each file as it was read.
    first = write(tmp_path / "first.json", [conv("a", "hi"), conv("b", "there")])
    second = write(tmp_path / "second.json", [conv("c", "you"), conv("a", "hi again", updated=1800000000.0)])
    report = ReadReport()
    it = read_export([first, second], report=report)
    yielded = [next(it)]
    write(second, [conv("x", "rewritten"), {"id": "y", "mapping": 3}])
    yielded += list(it)
    assert [(c.id, words(c)) for c in yielded] == [("b", ["there"]), ("c", ["you"]), ("a", ["hi again"])]
    assert report.conversations == 3 and report.duplicates == 1 and report.skipped == []


def test_no_room_for_the_temporary_copy_is_an_export_error_naming_the_folder(tmp_path, monkeypatch):
    import tempfile

    path = write(tmp_path / "c.json", [conv("a", "hi")])
    missing = tmp_path / "no-such-tmp"
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    with pytest.raises(ExportError, match="set TMPDIR to a folder with room") as e:
        list(read_export(path))
    assert e.value.path == str(missing)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert [c.id for c in read_export(path)] == ["a"] and list(tmp_path.glob("apiana-read-*")) == []


# ---------------------------------------------------------------- a conversation that grew keeps its chunk ids


def _dialogue(n, seed=0):
    import random

    rng = random.Random(seed)
    return [f"Message {i}: " + " ".join(rng.choice(VOCAB) for _ in range(25)) for i in range(n)]


@pytest.mark.parametrize("method, size, overlap", [("tokens", 200, 0), ("tokens", 200, 1), ("messages", 3, 0)])
def test_a_conversation_that_grew_keeps_the_ids_of_its_unchanged_chunks(tmp_path, tokenizer, method, size, overlap):
    from apiana_lab.chunking import Chunker, ChunkingOptions

    texts = _dialogue(20)
    old = write(tmp_path / "old.json", [conv("a", *texts[:13], updated=1.0)])
    new = write(tmp_path / "new.json", [conv("a", *texts, updated=2.0)])
    chunker = Chunker(ChunkingOptions(method=method, chunk_size=size, overlap=overlap), tokenizer)
    before = [c.id for c in chunker.chunk(read(old)[0][0])]
    grown, report = read([old, new])
    chunks = chunker.chunk(grown[0])
    after = [c.id for c in chunks]
    assert report.duplicates == 1 and len(grown[0].dialogue) == 20
    assert len(before) >= 3 and len(after) > len(before)
    # Every chunk but the last old one is unchanged, so a rerun reuses its summary.
    assert after[: len(before) - 1] == before[:-1]
    # Only chunks that hold an appended message (#13 on) are new: those are all a rerun computes.
    assert all(c.last_message >= 13 for c in chunks if c.id not in before)


def test_editing_a_message_in_the_middle_renews_its_chunk_and_any_whose_boundaries_moved(tmp_path, tokenizer):
    from apiana_lab.chunking import Chunker, ChunkingOptions

    texts = _dialogue(20)
    chunker = Chunker(ChunkingOptions(chunk_size=200), tokenizer)

    def chunks(messages, name):
        return chunker.chunk(read(write(tmp_path / name, [conv("a", *messages)]))[0][0])

    def bounds(cs):
        return [(c.first_message, c.last_message) for c in cs]

    before = chunks(texts, "before.json")
    holding = next(i for i, c in enumerate(before) if c.first_message <= 9 <= c.last_message)
    assert 1 <= holding < len(before) - 1

    # A small edit that still fits its chunk: only that chunk is new.
    small = chunks(texts[:9] + [texts[9] + " and the river"] + texts[10:], "small.json")
    assert bounds(small) == bounds(before)
    assert [c.id == b.id for c, b in zip(small, before)] == [i != holding for i in range(len(before))]

    # An edit long enough to push a message into the next chunk moves every later boundary:
    # the chunks before it keep their ids, the rest are new.
    large = chunks(texts[:9] + [texts[9] + " garden" * 60] + texts[10:], "large.json")
    assert bounds(large)[:holding] == bounds(before)[:holding] and bounds(large) != bounds(before)
    assert [c.id for c in large[:holding]] == [c.id for c in before[:holding]]
    assert not {c.id for c in large[holding:]} & {c.id for c in before}
