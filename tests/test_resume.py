"""Checkpoint and resume: commit cadence, SIGKILL mid-run then rerun, --fresh, and a changed key."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from apiana_lab.store import ChatFragmentWriter, SQLiteStore, SummaryKey, SummaryRecord

TOTAL = 144  # chunks in the `dialogue_export` fixture at --chunk-size 64

# The real `chatgpt-export-v2` entry point; `--backend fake` builds this slower fake.
DRIVER = """\
import sys
from apiana_lab.providers import fake

class SlowFake(fake.FakeProvider):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, latency=float(sys.argv[1]), **kwargs)

fake.FakeProvider = SlowFake  # the registry looks the class up by name when the CLI asks
from apiana_lab.cli import export_v2_main
sys.exit(export_v2_main(sys.argv[2:]))
"""


def cli_command(driver, export, out, *extra, latency=0.0):
    args = [
        "-i",
        str(export),
        "-o",
        str(out),
        "--backend",
        "fake",
        "--chunk-size",
        "64",
        "--batch-size",
        "2",
        "--max-workers",
        "2",
        "--no-progress",
        *extra,
    ]
    return [sys.executable, str(driver), str(latency), *args]


def run_cli(command):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def query(db, sql):
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def summaries_by_run(out):
    return dict(query(out / "apiana.sqlite", "SELECT run_id, COUNT(*) FROM summaries GROUP BY run_id"))


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "drive_cli.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture(scope="module")
def finished_run(driver, dialogue_export, tmp_path_factory):
    """An output folder holding one complete run; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    done = run_cli(cli_command(driver, dialogue_export, out))
    assert done.returncode == 0, done.stderr
    return out


def test_writer_commits_every_few_dozen_summaries_or_few_seconds(tmp_path):
    now = [100.0]
    store = SQLiteStore(tmp_path / "s.sqlite")
    key = SummaryKey("m", "p", "o")
    writer = ChatFragmentWriter(store, key, clock=lambda: now[0])  # the cadence the pipeline uses

    def committed():  # what another process would see
        return query(
            tmp_path / "s.sqlite", "SELECT (SELECT COUNT(*) FROM summaries) + (SELECT COUNT(*) FROM failures)"
        )[0][0]

    for i in range(31):
        writer.write(SummaryRecord(f"c{i}", "s"))
    assert committed() == 0
    writer.write(SummaryRecord("c31", error="boom", reason="permanent"))
    assert committed() == 32  # a few dozen gathered
    now[0] += 1.9
    writer.write(SummaryRecord("c32", "s"))
    assert committed() == 32
    now[0] += 0.1
    writer.write(SummaryRecord("c33", "s"))
    assert committed() == 34  # two seconds since the last commit
    writer.write(SummaryRecord("c34", "s"))
    writer.close()
    assert committed() == 35 and writer.written == 35
    store.close()


def test_sigkill_mid_run_then_rerun_resumes_without_recomputing(driver, dialogue_export, tmp_path):
    out = tmp_path / "out"
    db = out / "apiana.sqlite"
    # 72 calls of 50 ms on 2 workers: about 2 s of summarizing, committed every 32 summaries.
    command = cli_command(driver, dialogue_export, out, latency=0.05)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seen, deadline = 0, time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                seen = query(db, "SELECT COUNT(*) FROM summaries")[0][0] if db.exists() else 0
            except sqlite3.OperationalError:  # schema not created yet
                seen = 0
            if 0 < seen < TOTAL:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and not 0 < seen < TOTAL:
            proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-way"

    before = query(db, "SELECT COUNT(*) FROM summaries")[0][0]
    assert 0 < before < TOTAL
    assert query(db, "SELECT finished_at FROM runs") == [(None,)]
    assert not (out / "run.json").exists()

    rerun = run_cli(command[:2] + ["0"] + command[3:])  # the same command line, without the delay
    assert rerun.returncode == 0, rerun.stderr
    run = json.loads((out / "run.json").read_text())
    assert (run["chunks_total"], run["failed"]) == (TOTAL, 0)
    assert run["summaries_reused"] == before
    assert run["summaries_computed"] == TOTAL - before
    # Every chunk summarized exactly once; the killed run's summaries kept, not redone.
    assert query(db, "SELECT COUNT(*), COUNT(DISTINCT chunk_id) FROM summaries") == [(TOTAL, TOTAL)]
    assert query(db, "SELECT COUNT(*) FROM chunks WHERE id NOT IN (SELECT chunk_id FROM summaries)") == [(0,)]
    assert summaries_by_run(out) == {1: before, 2: TOTAL - before}
    assert len((out / "summaries.jsonl").read_text().splitlines()) == TOTAL


def test_fresh_recomputes_everything(driver, dialogue_export, finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    done = run_cli(cli_command(driver, dialogue_export, out, "--fresh"))
    assert done.returncode == 0, done.stderr
    run = json.loads((out / "run.json").read_text())
    assert (run["summaries_reused"], run["summaries_computed"]) == (0, TOTAL)
    assert f"--fresh: ignoring {TOTAL} earlier summaries" in done.stderr
    assert summaries_by_run(out) == {2: TOTAL}


@pytest.mark.parametrize("change", [["--max-length", "100"], ["--model", "another-fake-model"]])
def test_changed_model_or_options_reuse_nothing_and_warn(change, driver, dialogue_export, finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    done = run_cli(cli_command(driver, dialogue_export, out, *change))
    assert done.returncode == 0, done.stderr
    run = json.loads((out / "run.json").read_text())
    assert (run["summaries_reused"], run["summaries_computed"]) == (0, TOTAL)
    assert "WARNING" in done.stderr and "none are reused" in done.stderr
    assert summaries_by_run(out) == {1: TOTAL, 2: TOTAL}  # the earlier results stay, under their own key
    # and the unchanged command still finds its own summaries
    again = run_cli(cli_command(driver, dialogue_export, out))
    assert again.returncode == 0 and "none are reused" not in again.stderr
    assert json.loads((out / "run.json").read_text())["summaries_reused"] == TOTAL
