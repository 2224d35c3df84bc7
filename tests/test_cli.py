"""The command lines as a user runs them: `apiana-lab inspect|synth` and `chatgpt-export-v2` end to end."""

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path("apiana_lab/data/sample_export.json").resolve()
BIN = Path(sys.executable).parent


def run(cmd, *args, timeout=600, **env):
    return subprocess.run(
        [str(BIN / cmd), *map(str, args)], capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )


def warning_lines(text: str) -> list[str]:
    """Lines of a log level WARNING (vLLM's, logging's) or a Python or torch warning."""
    return [line for line in text.splitlines() if re.search(r"\bWARNING\b|Warning:", line)]


def test_inspect_json_reports_totals_and_conversations():
    p = run("apiana-lab", "inspect", SAMPLE, "--json", "--chunk-size", "500")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # stdout is one JSON document, nothing else
    assert doc["format"] == "chatgpt"
    assert set(doc) == {"format", "totals", "skipped", "conversations"}
    rows = doc["conversations"]
    t = doc["totals"]
    assert t["conversations"] == len(rows) > 5
    assert t["chunks"] == sum(r["chunks"] for r in rows) and t["tokens"] == sum(r["tokens"] for r in rows)
    assert t["dialogue_messages"] == sum(r["dialogue_messages"] for r in rows)
    assert t["dialogue_by_role"]["user"] == sum(r["user_messages"] for r in rows)
    assert set(rows[0]) == {
        "id",
        "title",
        "dialogue_messages",
        "user_messages",
        "assistant_messages",
        "other_entries",
        "chunks",
        "tokens",
        "fallback_branch",
    }
    assert t["non_dialogue_by_type"]  # the sample has tool traffic, hidden messages, context
    assert any(r["fallback_branch"] for r in rows)
    assert t["first_date"] <= t["last_date"]


def test_inspect_text_and_bad_input(tmp_path):
    p = run("apiana-lab", "inspect", SAMPLE)
    assert p.returncode == 0 and "conversations:" in p.stdout and "chunks:" in p.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a", "mapping": {}}, {"id": ')
    p = run("apiana-lab", "inspect", bad)
    assert p.returncode == 2 and str(bad) in p.stderr and "byte" in p.stderr
    p = run("apiana-lab", "inspect", tmp_path / "missing.json")
    assert p.returncode == 2 and "missing.json" in p.stderr


def test_synth_then_inspect_the_result(tmp_path):
    out = tmp_path / "synth.json"
    p = run("apiana-lab", "synth", "--size-mb", "2", "-o", out, "--seed", "3")
    assert p.returncode == 0, p.stderr
    assert 1.9e6 < out.stat().st_size < 2.1e6
    doc = json.loads(run("apiana-lab", "inspect", out, "--json").stdout)
    assert doc["totals"]["conversations"] > 20 and doc["totals"]["chunks"] > 0


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_export_v2_end_to_end_on_the_sample(backend, tmp_path):
    out = tmp_path / backend
    p = run(
        "chatgpt-export-v2",
        "-i",
        SAMPLE,
        "-o",
        out,
        "--backend",
        backend,
        "--limit",
        "3",
        "--max-length",
        "32",
        "--chunk-size",
        "600",
        "--batch-size",
        "4",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    # The engines' start-up warnings (no Triton, NUMA binding, deprecations) stay out of the
    # terminal and its progress bar; they are in the log the run names.
    assert not warning_lines(p.stdout + p.stderr), warning_lines(p.stdout + p.stderr)
    if backend == "vllm":
        log = out / "engine.log"
        assert f"engine log (the engines' own output): {log}" in p.stdout.splitlines()
        assert "(EngineCore pid=" in log.read_text()  # the engine's child process wrote there
    assert "3 summarized" in p.stdout and "summaries.jsonl" in p.stdout
    run_json = json.loads((out / "run.json").read_text())
    for field in (
        "backend",
        "model",
        "batch_size",
        "max_workers",
        "chunk_size",
        "max_length",
        "limit",
        "conversations_read",
        "conversations_skipped",
        "chunks_total",
        "summaries_computed",
        "summaries_reused",
        "failed",
        "prompt_tokens",
        "completion_tokens",
        "wall_seconds",
        "load_seconds",
        "completion_tokens_per_s",
        "chunks_per_s",
    ):
        assert field in run_json, field
    assert run_json["backend"] == backend and run_json["summaries_computed"] == 3 and run_json["failed"] == 0
    assert run_json["load_seconds"] > 0 and run_json["wall_seconds"] > run_json["load_seconds"]
    rows = [json.loads(line) for line in (out / "summaries.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert set(r) == {
            "chunk_id",
            "conversation_id",
            "title",
            "summary",
            "prompt_tokens",
            "completion_tokens",
            "finish_reason",
            "backend",
            "model",
            "prompt_hash",
            "options_hash",
            "run_id",
            "quality",
            "versions",
            "kept",
        }
        assert r["summary"].strip() and 0 < r["completion_tokens"] <= 32 and r["backend"] == backend
        assert (r["versions"], r["kept"]) == (1, "only version") and r["quality"]["tokens"] > 0
    flagged = sum(bool(r["quality"]["flags"]) for r in rows)  # run.json's quality section counts the same summaries
    assert (run_json["quality"]["count"], run_json["quality"]["flagged"]) == (3, flagged)
    assert f"quality: {flagged} of 3 summaries flagged" in p.stdout
    assert run_json["model"] and all(r["model"] == run_json["model"] for r in rows)  # the folder actually loaded
    db = sqlite3.connect(out / "apiana.sqlite")
    assert db.execute("SELECT COUNT(*) FROM summaries").fetchone()[0] == 3
    assert db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 3


@pytest.mark.vllm
@pytest.mark.slow
def test_plan_json_on_vllm_is_one_json_document_and_the_engine_log_holds_the_rest():
    p = run(
        "apiana-lab",
        "plan",
        SAMPLE,
        "--json",
        "--backend",
        "vllm",
        "--sample",
        "1",
        "--max-length",
        "4",
        "--chunk-size",
        "600",
        "--max-model-len",
        "1024",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    plan = json.loads(p.stdout)  # all of stdout, as `| jq .projection` reads it
    assert plan["backend"] == "vllm" and plan["sample"]["chunks"] == 1 and plan["projection"]["seconds"] > 0
    assert not warning_lines(p.stderr), warning_lines(p.stderr)
    note = [line for line in p.stderr.splitlines() if line.startswith("engine log (the engines' own output): ")]
    assert len(note) == 1
    log = Path(note[0].partition(": ")[2])
    try:
        text = log.read_text()
        assert (
            "(MainProcess pid=" in text and "(EngineCore pid=" in text
        )  # vLLM's log, from this process and its engine's
    finally:
        log.unlink()


@pytest.mark.parametrize("switch", [("--sequential",), ()])
def test_ab_switch_runs_the_sequential_summarizer_on_the_same_chunks(switch, tmp_path):
    env = {} if switch else {"APIANA_PARALLEL": "0"}
    seq, par = tmp_path / "seq", tmp_path / "par"
    p = run("chatgpt-export-v2", "-i", SAMPLE, "-o", seq, "--backend", "fake", "--no-progress", *switch, **env)
    assert p.returncode == 0, p.stderr
    assert "[fake, sequential]" in p.stdout
    q = run("chatgpt-export-v2", "-i", SAMPLE, "-o", par, "--backend", "fake", "--no-progress")
    assert q.returncode == 0 and "parallel, batch 16" in q.stdout
    a, b = (json.loads((d / "run.json").read_text()) for d in (seq, par))
    assert (a["sequential"], a["parallel"], b["parallel"]) == (True, False, True)
    rows = lambda d: [json.loads(line) for line in (d / "summaries.jsonl").read_text().splitlines()]
    assert [(r["chunk_id"], r["summary"]) for r in rows(seq)] == [(r["chunk_id"], r["summary"]) for r in rows(par)]
