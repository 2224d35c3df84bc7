"""`--redo FLAGS`: only chunks whose kept summary carries a flag run again; both versions stay, the better is kept."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from apiana_lab.pipeline import RunConfig, run_export
from apiana_lab.store import SQLiteStore

SAMPLE = str(Path("apiana_lab/data/sample_export.json").resolve())
BIN = Path(sys.executable).parent


def export_v2(*args):
    return subprocess.run(
        [str(BIN / "chatgpt-export-v2"), "-i", SAMPLE, "--backend", "fake", "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def rows(out):
    return [json.loads(line) for line in (out / "summaries.jsonl").read_text().splitlines()]


def test_redo_runs_only_the_flagged_chunks_and_keeps_the_better_version(tmp_path):
    out = tmp_path / "out"
    # The fake answers at most 8 words: capped at 6 tokens most summaries stop mid-sentence.
    first = export_v2("-o", out, "--max-length", 6)
    assert first.returncode == 0, first.stderr
    before = {r["chunk_id"]: r["quality"]["flags"] for r in rows(out)}
    truncated = {cid for cid, flags in before.items() if "truncated" in flags}
    assert 0 < len(truncated) < len(before)

    redo = export_v2("-o", out, "--max-length", 300, "--redo", "truncated")
    assert redo.returncode == 0, redo.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["redo"] == {"flags": ["truncated"], "picked": len(truncated)}
    assert run["summaries_computed"] == len(truncated) and run["summaries_reused"] == len(before) - len(truncated)
    after = {r["chunk_id"]: r for r in rows(out)}
    assert set(after) == set(before)  # every chunk once, in the same run list
    for cid, r in after.items():
        if cid in truncated:  # the redone version has no flag, so it is kept over the truncated one
            assert (r["versions"], r["kept"], r["quality"]["flags"]) == (2, "fewest flags", [])
        else:
            assert r["versions"] == 1 and r["quality"]["flags"] == before[cid]
    assert run["quality"]["flags"]["truncated"]["count"] == 0
    with SQLiteStore(out / "apiana.sqlite") as store:
        assert store.count("summaries") == len(before) + len(truncated)  # both versions stay

    again = export_v2("-o", out, "--max-length", 300, "--redo", "flagged")
    assert again.returncode == 0 and "0 summarized" in again.stdout  # nothing is flagged any more


def test_redo_with_the_same_options_says_to_change_one(tmp_path):
    out = tmp_path / "out"
    assert export_v2("-o", out, "--max-length", 6).returncode == 0
    same = export_v2("-o", out, "--max-length", 6, "--redo", "truncated")
    assert same.returncode == 0 and "0 summarized" in same.stdout
    assert "already have a summary made with these options; change one" in same.stderr


def test_an_unknown_flag_is_a_clear_error_before_anything_runs(tmp_path):
    done = export_v2("-o", tmp_path / "out", "--redo", "loop,typo")
    assert done.returncode != 0
    assert "unknown: typo" in done.stderr and "not_first_person" in done.stderr
    assert not (tmp_path / "out" / "apiana.sqlite").exists()


@pytest.mark.transformers
@pytest.mark.slow
def test_redo_on_real_transformers_keeps_per_chunk_the_version_with_the_fewest_flags(tmp_path):
    """The bundled model, greedy, then a redo of what it flagged with sampling and a repetition penalty."""
    from apiana_lab.providers.registry import get_provider

    out = tmp_path / "out"
    config = dict(input=SAMPLE, output=str(out), backend="transformers", limit=4, max_length=48, chunk_size=600)
    with get_provider("transformers", dtype="float32") as provider:
        first = run_export(RunConfig(**config), provider=provider)
        flagged = {r["chunk_id"] for r in rows(out) if r["quality"]["flags"]}
        assert first["quality"]["flagged"] == len(flagged) > 0  # the bundled model at 48 tokens: mostly cut short
        second = run_export(
            RunConfig(**config, redo=["flagged"], temperature=0.7, seed=1, repetition_penalty=1.3), provider=provider
        )
    assert second["summaries_computed"] == len(flagged) and second["redo"]["picked"] == len(flagged)
    with SQLiteStore(out / "apiana.sqlite") as store:
        every = store.to_pandas("summaries", versions="all")
    fewest = {
        cid: min(len(json.loads(q)["flags"]) for q in group["quality"]) for cid, group in every.groupby("chunk_id")
    }
    for r in rows(out):
        assert r["versions"] == (2 if r["chunk_id"] in flagged else 1)
        assert len(r["quality"]["flags"]) == fewest[r["chunk_id"]]


def test_review_counts_each_flag_and_shows_the_worst_beside_their_chunks(tmp_path):
    out = tmp_path / "out"
    assert export_v2("-o", out, "--max-length", 6).returncode == 0
    run = json.loads((out / "run.json").read_text())
    review = subprocess.run(
        [str(BIN / "apiana-lab"), "review", str(out), "--flag", "truncated", "--worst", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert review.returncode == 0, review.stderr
    doc = json.loads(review.stdout)  # stdout is the one JSON document
    assert doc["quality"]["flags"] == run["quality"]["flags"] and doc["quality"]["count"] == 12
    assert len(doc["examples"]) == 3 and all("truncated" in e["flags"] for e in doc["examples"])
    chunks = {json.loads(line)["chunk_id"] for line in (out / "summaries.jsonl").read_text().splitlines()}
    assert all(e["chunk_id"] in chunks and e["chunk"].startswith("User:") for e in doc["examples"])
    text = subprocess.run([str(BIN / "apiana-lab"), "review", str(out)], capture_output=True, text=True, timeout=120)
    truncated = run["quality"]["flags"]["truncated"]["count"]
    assert text.returncode == 0 and f"{run['quality']['flagged']} flagged" in text.stdout
    assert any(
        line.split() == ["truncated", str(truncated), f"{truncated / 12:.0%}"] for line in text.stdout.splitlines()
    )
    wrong = subprocess.run(
        [str(BIN / "apiana-lab"), "review", str(out), "--flag", "loops"], capture_output=True, text=True
    )
    assert wrong.returncode == 2 and "unknown flag 'loops'" in wrong.stderr


def test_the_progress_line_counts_the_flagged_summaries_as_they_come(tmp_path):
    from apiana_lab.notebook import describe

    seen = []
    result = run_export(
        RunConfig(input=SAMPLE, output=str(tmp_path / "out"), backend="fake", max_length=6), progress=seen.append
    )
    last = [p for p in seen if p.total][-1]
    assert last.flagged == result["quality"]["flagged"] > 0
    assert f"{result['quality']['flagged_share']:.0%} flagged" in describe(last)
    assert [p.flagged for p in seen] == sorted(p.flagged for p in seen)  # counted as summaries arrive, never undone
