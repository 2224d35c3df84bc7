"""The whole job from the command line: several exports, duplicates, grown conversations, output
checks, engine options, and memory that stays flat as the export grows."""

from __future__ import annotations

import json
import sqlite3
import tracemalloc

import pytest

from apiana_lab.cli import export_v2_main
from apiana_lab.pipeline import RunConfig, run_export
from apiana_lab.providers.fake import FakeProvider

WORDS = "garden river morning coffee letter train window music walk kitchen friend book winter plan".split()


def conversation(cid, messages, update_time, title=None, words=30):
    """A linear ChatGPT conversation whose message m always has the same text, whatever the length."""
    mapping = {"root": {"id": "root", "message": None, "parent": None, "children": []}}
    parent = "root"
    for m in range(messages):
        node = f"{cid}-n{m}"
        text = f"Message {cid}-{m}: " + " ".join(WORDS[(m * 7 + k) % len(WORDS)] for k in range(words))
        mapping[node] = {
            "id": node,
            "parent": parent,
            "children": [],
            "message": {
                "id": node,
                "author": {"role": "user" if m % 2 == 0 else "assistant"},
                "create_time": 1700000000 + m,
                "content": {"content_type": "text", "parts": [text]},
                "status": "finished_successfully",
                "metadata": {},
                "recipient": "all",
            },
        }
        mapping[parent]["children"].append(node)
        parent = node
    return {
        "id": cid,
        "title": title or f"Chat {cid}",
        "create_time": 1700000000,
        "update_time": update_time,
        "mapping": mapping,
        "current_node": parent,
    }


def write(path, conversations):
    path.write_text(json.dumps(conversations), encoding="utf-8")
    return path


def cli(inputs, out, *extra):
    args = [a for p in inputs for a in ("-i", str(p))]
    return export_v2_main([*args, "-o", str(out), "--backend", "fake", "--chunk-size", "64", "--no-progress", *extra])


def run_json(out):
    return json.loads((out / "run.json").read_text())


def jsonl_ids(out):
    return [json.loads(line)["chunk_id"] for line in (out / "summaries.jsonl").read_text().splitlines()]


def summaries_by_run(out):
    with sqlite3.connect(out / "apiana.sqlite") as db:
        return dict(db.execute("SELECT run_id, COUNT(*) FROM summaries GROUP BY run_id").fetchall())


def stored_texts(out, cid):
    with sqlite3.connect(out / "apiana.sqlite") as db:
        return [t for (t,) in db.execute("SELECT text FROM chunks WHERE conversation_id = ? ORDER BY idx", (cid,))]


@pytest.fixture(autouse=True)
def _cli_env(cli_env):
    """Every test here runs the CLI."""


def test_the_same_conversation_twice_in_one_file_is_summarized_once(tmp_path, capsys):
    export = write(
        tmp_path / "conversations.json",
        [conversation("a", 6, 100), conversation("b", 6, 100), conversation("a", 6, 100)],
    )
    out = tmp_path / "out"
    assert cli([export], out) == 0
    assert "1 duplicate conversations dropped" in capsys.readouterr().out
    run = run_json(out)
    ids = jsonl_ids(out)
    assert run["duplicates"] == 1 and run["conversations_read"] == 2
    assert len(ids) == len(set(ids)) == run["chunks_total"] == run["summaries_computed"] == 12  # one chunk per message


def test_two_overlapping_exports_the_newer_version_wins_in_either_order(tmp_path):
    old = write(tmp_path / "old.json", [conversation("a", 4, 100, title="old title"), conversation("b", 4, 100)])
    new = write(tmp_path / "new.json", [conversation("a", 6, 200, title="new title"), conversation("c", 4, 200)])
    for order in ([old, new], [new, old]):
        out = tmp_path / f"out-{order[0].stem}"
        assert cli(order, out) == 0
        run = run_json(out)
        assert run["inputs"] == [str(p) for p in order] and run["duplicates"] == 1
        assert run["conversations_read"] == 3 and run["chunks_total"] == 6 + 4 + 4
        assert len(stored_texts(out, "a")) == 6  # the six-message version, not the four
        ids = jsonl_ids(out)
        assert len(ids) == len(set(ids)) == 14
        with sqlite3.connect(out / "apiana.sqlite") as db:
            assert db.execute("SELECT title FROM conversations WHERE id = 'a'").fetchone()[0] == "new title"


def test_a_conversation_that_grew_computes_only_its_new_chunks(tmp_path):
    out = tmp_path / "out"
    assert cli([write(tmp_path / "before.json", [conversation("a", 8, 100), conversation("b", 4, 100)])], out) == 0
    first = run_json(out)
    assert first["summaries_computed"] == 12
    assert cli([write(tmp_path / "after.json", [conversation("a", 11, 300), conversation("b", 4, 100)])], out) == 0
    second = run_json(out)
    assert (second["summaries_reused"], second["summaries_computed"]) == (12, 3)  # only the three new messages
    assert summaries_by_run(out) == {1: 12, 2: 3}  # nothing recomputed, nothing stored twice
    ids = jsonl_ids(out)
    assert len(ids) == len(set(ids)) == 15


def test_output_that_is_a_file_or_cannot_be_created_exits_2_before_any_work(tmp_path, capsys):
    export = write(tmp_path / "conversations.json", [conversation("a", 4, 100)])
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    assert cli([export], taken) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(taken) in err and "is a file" in err
    assert taken.read_text() == "keep me"
    below = taken / "out"
    assert cli([export], below) == 2
    err = capsys.readouterr().err
    assert "Cannot create the output folder" in err and str(below) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conversations.json", "taken.txt"]


def test_an_output_folder_with_another_runs_store_is_reused_and_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli([write(tmp_path / "one.json", [conversation("a", 4, 100)])], out) == 0
    capsys.readouterr()
    assert cli([write(tmp_path / "two.json", [conversation("b", 4, 100)])], out) == 0
    first_line = capsys.readouterr().err.splitlines()[0]
    assert first_line.startswith(f"{out} already holds 4 summaries")
    assert run_json(out)["summaries_in_store_at_start"] == 4 and jsonl_ids(out) and len(jsonl_ids(out)) == 4


def test_engine_options_are_checked_against_the_backend_and_recorded(tmp_path, capsys):
    export = write(tmp_path / "conversations.json", [conversation("a", 4, 100)])
    out = tmp_path / "out"
    assert cli([export], out, "--tensor-parallel-size", "2") == 2
    assert "does not take the option 'tensor_parallel_size'" in capsys.readouterr().err
    assert cli([export], out, "--engine-arg", "latenc=0") == 2
    assert "Did you mean 'latency'?" in capsys.readouterr().err
    assert cli([export], out, "--engine-arg", "noequals") == 2
    assert not out.exists()
    assert cli([export], out, "--engine-arg", "latency=0.001", "--engine-arg", "window=3") == 0
    run = run_json(out)
    assert run["engine_options"] == {"latency": 0.001, "window": 3}  # JSON values: numbers stay numbers
    assert run["batch_size"] == 3  # the backend's window is the default batch size


def test_memory_stays_flat_as_the_export_grows(tmp_path):
    """The run holds chunk ids and counts, never their texts: per extra chunk it keeps a few hundred bytes."""

    class Forgetful(FakeProvider):  # the fake's call history would hold every prompt: not ours to count
        def _call(self, *args, **kwargs):
            try:
                return super()._call(*args, **kwargs)
            finally:
                self.history.clear()

    def peak(n):
        export = write(tmp_path / f"e{n}.json", [conversation(f"c{i}", 12, 100, words=220) for i in range(n)])
        config = RunConfig(input=str(export), output=str(tmp_path / f"out{n}"), backend="fake", chunk_size=1024)
        tracemalloc.start()
        try:
            result = run_export(config, provider=Forgetful(batch=True))
            return tracemalloc.get_traced_memory()[1], result
        finally:
            tracemalloc.stop()

    peak(2)  # warm: imports and the tokenizer are not what is measured
    # Both exports are larger than the reader's 1 MiB window, so the reader's share is the same.
    small, a = peak(100)
    large, b = peak(300)
    chunks = b["chunks_total"] - a["chunks_total"]
    with sqlite3.connect(tmp_path / "out300" / "apiana.sqlite") as db:
        text_bytes = db.execute("SELECT AVG(LENGTH(text)) FROM chunks").fetchone()[0]
    assert chunks > 100 and text_bytes > 3000
    per_chunk = (large - small) / chunks
    assert per_chunk < text_bytes / 5, (small, large, per_chunk, text_bytes)
