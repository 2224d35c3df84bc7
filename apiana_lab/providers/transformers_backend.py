"""Hugging Face transformers: left-padded native batches, one replica per visible GPU."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

try:
    import torch
    import transformers
except ImportError as e:  # the registry turns this into the install command
    raise ImportError(f"{e.name} is needed for the transformers backend", name=e.name) from e

from ..errors import ConfigError, MissingDependencyError, PermanentProviderError, ProviderOutOfMemoryError
from ..models import hub_error_hint, resolve_model
from .base import Completion, GenerationOptions, LLMProvider, Prompt, as_messages

logger = logging.getLogger(__name__)


class TransformersProvider(LLMProvider):
    """Local generation with transformers' `generate`.

    Args:
        model: local HF folder or hub id (default: the bundled SmolLM2).
        device: "auto" (every visible CUDA GPU, else CPU), "cpu", "cuda" or "cuda:N".
        dtype: "auto" (bfloat16 on GPU, float32 on CPU) or a torch dtype name.
        load_in_8bit: 8-bit weights through bitsandbytes (CUDA only).
        load_format: "auto", or "dummy" for random weights of the model's real shape.
    """

    name = "transformers"
    supports_batch = True

    def __init__(
        self,
        model: str | None = None,
        options: GenerationOptions | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        load_in_8bit: bool = False,
        load_format: str = "auto",
    ):
        path = resolve_model(model)
        super().__init__(path, options)
        devices = _devices(device)
        if load_in_8bit and not devices[0].startswith("cuda"):
            raise ConfigError("load_in_8bit needs a CUDA GPU (bitsandbytes); on CPU leave it off.")
        if load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be 'auto' or 'dummy', not {load_format!r}")
        self.dtype = _dtype(dtype, devices[0])
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except OSError as e:
            raise ConfigError(hub_error_hint(path)) from e
        # Left padding keeps every prompt's last token adjacent to its first generated token.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.models = [self._load(path, d, load_in_8bit, load_format) for d in devices]
        self.devices = devices
        self._locks = [threading.Lock() for _ in devices]
        self._context = int(getattr(self.models[0].config, "max_position_embeddings", 0) or 0) or None
        logger.info("transformers: %s on %s (%s)", path, ", ".join(devices), self.dtype)

    def _load(self, path: str, device: str, load_in_8bit: bool, load_format: str):
        kwargs = {"dtype": self.dtype}
        if load_in_8bit:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as e:
                raise MissingDependencyError("bitsandbytes", "transformers") from e
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
            kwargs["device_map"] = {"": device}
        try:
            if load_format == "dummy":
                config = transformers.AutoConfig.from_pretrained(path)
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=self.dtype)
            else:
                model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as e:
            raise ConfigError(hub_error_hint(path)) from e
        if not load_in_8bit:
            model = model.to(device)
        return model.eval()

    @property
    def replicas(self) -> int:
        return len(self.models)

    @property
    def max_context(self) -> int | None:
        return self._context

    def _encode(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self._encode(prompt))

    def complete(self, prompt: Prompt, options: GenerationOptions | None = None) -> Completion:
        return self.complete_batch([prompt], options)[0]

    def complete_batch(self, prompts: Sequence[Prompt], options: GenerationOptions | None = None, replica: int | None = None) -> list[Completion]:
        """Generate for many prompts; split across replicas, or all on `replica` when given."""
        options = options or self.options
        encoded = [self._encode(p) for p in prompts]
        if self._context:
            for i, ids in enumerate(encoded):
                if len(ids) + options.max_tokens > self._context:
                    raise PermanentProviderError(
                        f"prompt {i} has {len(ids)} tokens; with max_tokens={options.max_tokens} it exceeds the "
                        f"model's context of {self._context}. Use a smaller --chunk-size or --max-length."
                    )
        # Longest first, so padding is small within a batch and an OOM shows up at once.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        if replica is not None:
            shares = [(replica % len(self.models), order)]
        else:
            shares = [(r, order[r :: len(self.models)]) for r in range(len(self.models))]
            shares = [(r, idx) for r, idx in shares if idx]
        results: dict[int, Completion] = {}
        if len(shares) == 1:
            r, idx = shares[0]
            results.update(zip(idx, self._generate(r, [encoded[i] for i in idx], options)))
        else:
            with ThreadPoolExecutor(len(shares)) as pool:
                futures = {pool.submit(self._generate, r, [encoded[i] for i in idx], options): idx for r, idx in shares}
                for fut, idx in futures.items():
                    results.update(zip(idx, fut.result()))
        return [results[i] for i in range(len(encoded))]

    def _generate(self, replica: int, batch: list[list[int]], options: GenerationOptions) -> list[Completion]:
        model = self.models[replica]
        padded = self.tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt").to(model.device)
        kwargs = dict(
            max_new_tokens=options.max_tokens,
            do_sample=options.temperature > 0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if options.temperature > 0:
            kwargs.update(temperature=options.temperature, top_p=options.top_p)
            if options.seed is not None:
                torch.manual_seed(options.seed)
        else:
            # Greedy: clear sampling defaults a model's generation_config may carry.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if options.stop:
            kwargs.update(stop_strings=list(options.stop), tokenizer=self.tokenizer)
        if options.ignore_eos:
            kwargs.update(min_new_tokens=options.max_tokens)
        try:
            with self._locks[replica], torch.inference_mode():
                out = model.generate(**padded, **kwargs)
        except torch.OutOfMemoryError as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise ProviderOutOfMemoryError(str(e).splitlines()[0], batch_size=len(batch)) from e
        new = out[:, padded["input_ids"].shape[1] :].tolist()
        return [self._finish(ids, len(prompt), options) for ids, prompt in zip(new, batch)]

    def _finish(self, ids: list[int], prompt_tokens: int, options: GenerationOptions) -> Completion:
        eos = self.tokenizer.eos_token_id
        finish = "length"
        if eos in ids and not options.ignore_eos:
            ids = ids[: ids.index(eos) + 1]
            finish = "stop"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in options.stop:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        if finish == "length" and len(ids) < options.max_tokens:
            finish = "stop"  # a stop string ended generation early
        return Completion(text.strip(), prompt_tokens, len(ids), finish)

    def close(self) -> None:
        self.models = []
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


LocalTransformersLLM = TransformersProvider


def _devices(device: str) -> list[str]:
    if device == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA GPU is visible; use device='cpu' or 'auto'.")
    return [device]


def _dtype(name: str, device: str):
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"Unknown dtype {name!r}; use auto, float32, bfloat16 or float16.")
    return value
