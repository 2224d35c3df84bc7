"""Hugging Face transformers: left-padded micro-batches within a token budget, one replica per visible GPU."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from apiana_lab.collate import Collator
from apiana_lab.errors import ConfigError, MissingDependencyError, ProviderError, ProviderOutOfMemoryError
from apiana_lab.models import hub_error_hint, resolve_model
from apiana_lab.providers.base import Completion, EngineOption, GenerationOptions, LLMProvider, Prompt
from apiana_lab.providers.tokens import check_fits, encode_chat

logger = logging.getLogger(__name__)

# The CPU budget: a micro-batch's KV cache at its end (rows x (longest prompt + max_tokens))
# may hold as many bytes as the model's weights. Decoding on a CPU is bound by memory traffic:
# each step reads the weights once for the whole batch, so rows are cheap until their KV cache
# rivals the weights; past that, and with long padded prompts, batching stops paying (batches
# of 32 long prompts ran at 0.55x one at a time). Measured on a quiet machine
# (results/bench-ceiling/ceiling-transformers.md): with SmolLM2-135M in float32 this budget is
# 11,676 tokens, which runs 1,340-token prompts with 128 new tokens seven at a time (88 s for 8
# prompts, against 122 s at four at a time with half the budget) and 400-token prompts with 256
# new a whole batch of 16 at a time (3.40x faster than one at a time, against 2.63x with half
# the budget, which split each batch in two). The budget scales with dtype like the
# weights do.
CPU_KV_PER_WEIGHT = 1.0
# On a GPU the budget is about memory: this share of the free memory left after loading goes
# to the KV cache and activations of one micro-batch.
GPU_MEMORY_SHARE = 0.5


class TransformersProvider(LLMProvider):
    """Local generation with transformers' `generate`.

    Args:
        model: local HF folder or hub id (default: the bundled SmolLM2).
        device: "auto" (every visible CUDA GPU, else CPU), "cpu", "cuda" or "cuda:N".
        dtype: "auto" (bfloat16 on GPU, float32 on CPU) or a torch dtype name.
        load_in_8bit: 8-bit weights through bitsandbytes (CUDA only).
        load_format: "auto", or "dummy" for random weights of the model's real shape.
        max_batch_tokens: most padded tokens in one `generate` call, counted as rows x
            (longest prompt + max_tokens); a prompt over it still runs, alone. Default: from
            the device (`default_max_batch_tokens`).
    """

    name = "transformers"
    supports_batch = True
    engine_options = (
        EngineOption("dtype", str, "auto, bfloat16, float16 or float32"),
        EngineOption("device", str, "auto, cpu, cuda or cuda:N"),
        EngineOption("load_in_8bit", bool, "8-bit weights (CUDA, bitsandbytes)"),
        EngineOption(
            "max_batch_tokens", int, "most padded tokens per micro-batch, rows x (longest prompt + max new tokens)"
        ),
    )
    loads_weights = True
    requires = ("torch", "transformers")
    extra = "transformers"
    dtypes = ("auto", "float32", "bfloat16", "float16")

    def __init__(
        self,
        model: str | None = None,
        options: GenerationOptions | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        load_in_8bit: bool = False,
        load_format: str = "auto",
        max_batch_tokens: int | None = None,
    ):
        try:
            import torch  # noqa: F401
            import transformers
        except ImportError as e:
            raise MissingDependencyError(e.name or "transformers", self.extra) from e
        path = resolve_model(model)
        super().__init__(path, options)
        devices = _devices(device)
        if load_in_8bit and not devices[0].startswith("cuda"):
            raise ConfigError("load_in_8bit needs a CUDA GPU (bitsandbytes); on CPU leave it off.")
        if load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be 'auto' or 'dummy', not {load_format!r}")
        if max_batch_tokens is not None and (not isinstance(max_batch_tokens, int) or max_batch_tokens < 1):
            raise ConfigError(f"max_batch_tokens must be a positive integer, not {max_batch_tokens!r}")
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
        self.max_batch_tokens = max_batch_tokens or min(default_max_batch_tokens(m) for m in self.models)
        logger.info(
            "transformers: %s on %s (%s), up to %d padded tokens per batch",
            path,
            ", ".join(devices),
            self.dtype,
            self.max_batch_tokens,
        )

    def _load(self, path: str, device: str, load_in_8bit: bool, load_format: str):
        import transformers

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
        if device == "cpu":
            _keep_kv_heads_grouped(model)
        return model.eval()

    @property
    def replicas(self) -> int:
        return len(self.models)

    def rows_at_once(self, batch_size: int, workers: int, prompt_tokens: int, max_tokens: int) -> int:
        # The first micro-batch a batch of such prompts is cut into; a replica runs one at a time.
        rows = len(micro_batches([prompt_tokens] * batch_size, max_tokens, self.max_batch_tokens)[0])
        return rows * min(workers, self.replicas)

    @property
    def max_context(self) -> int | None:
        return self._context

    def _encode(self, prompt: Prompt) -> list[int]:
        return encode_chat(self.tokenizer, prompt)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self._encode(prompt))

    def complete(self, prompt: Prompt, options: GenerationOptions | None = None) -> Completion:
        return self.complete_batch([prompt], options)[0]

    def complete_batch(
        self, prompts: Sequence[Prompt], options: GenerationOptions | None = None, replica: int | None = None
    ) -> list[Completion]:
        """Generate for many prompts; split across replicas, or all on `replica` when given."""
        options = options or self.options
        encoded = [self._encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            check_fits(ids, options.max_tokens, self._context, f"prompt {i}")
        # Longest first, so padding is small within a batch and an OOM shows up at once.
        collator = Collator.by(encoded, len)
        ordered = collator.ordered(encoded)
        positions = list(range(len(ordered)))
        if replica is not None:
            shares = [(replica % len(self.models), positions)]
        else:
            shares = [(r, positions[r :: len(self.models)]) for r in range(len(self.models))]
            shares = [(r, share) for r, share in shares if share]
        results: dict[int, Completion] = {}
        if len(shares) == 1:
            r, share = shares[0]
            results.update(self._generate_share(r, share, ordered, options))
        else:
            with ThreadPoolExecutor(len(shares)) as pool:
                futures = [pool.submit(self._generate_share, r, share, ordered, options) for r, share in shares]
                for fut in futures:
                    results.update(fut.result())
        return collator.restore([results[p] for p in positions])

    def _generate_share(
        self, replica: int, share: list[int], ordered: list[list[int]], options: GenerationOptions
    ) -> dict[int, Completion]:
        """One replica's prompts (positions in `ordered`, longest first), in micro-batches within the token budget."""
        results = {}
        for group in micro_batches([len(ordered[p]) for p in share], options.max_tokens, self.max_batch_tokens):
            chosen = [share[j] for j in group]
            results.update(zip(chosen, self._generate(replica, [ordered[p] for p in chosen], options)))
        return results

    def _generate(self, replica: int, batch: list[list[int]], options: GenerationOptions) -> list[Completion]:
        import torch

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
        if options.repetition_penalty != 1.0:
            kwargs.update(repetition_penalty=options.repetition_penalty)
        if options.stop:
            kwargs.update(stop_strings=list(options.stop), tokenizer=self.tokenizer)
        if options.ignore_eos:
            kwargs.update(min_new_tokens=options.max_tokens)
        try:
            with self._locks[replica], torch.inference_mode():
                out = model.generate(**padded, **kwargs)
        except Exception as e:
            error = provider_error(e, len(batch))
            if error is None:
                raise
            raise error from e
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

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


LocalTransformersLLM = TransformersProvider


def provider_error(e: BaseException, batch_size: int) -> ProviderError | None:
    """transformers' or torch's failure as the project's error; None for one not known (a bug to see).

    Out of memory (torch's OutOfMemoryError, CUDA's included) frees the cached GPU memory so
    the caller's retry with a smaller batch has it.
    """
    if isinstance(e, ProviderError):
        return e
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return ProviderOutOfMemoryError((str(e).splitlines() or ["out of memory"])[0], batch_size=batch_size)
    return None


_GROUPED_SDPA = "apiana_grouped_sdpa"


def _keep_kv_heads_grouped(model) -> None:
    """On CPU, let SDPA read a grouped-query model's KV cache as it is, padding mask or not.

    transformers' SDPA path copies every layer's keys and values out to one head per query
    head (`repeat_kv`) whenever an attention mask is present, which a padded batch always
    brings: at every decode step, the whole KV cache of the batch is copied (three times over
    for SmolLM2). That copy was 58% of decode CPU time in a padded batch of four 1,300-token
    prompts. torch's CPU kernel takes the mask and the grouped heads together
    (`enable_gqa`) with the same result, so use it there. On CUDA that combination falls back
    to the slow math kernel, so GPUs keep transformers' own path.
    """
    cfg = model.config.get_text_config()
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    if (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) == cfg.num_attention_heads:
        return
    try:
        import transformers
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        transformers.AttentionInterface.register(_GROUPED_SDPA, _grouped_sdpa)
        transformers.AttentionMaskInterface.register(_GROUPED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        model.set_attn_implementation(_GROUPED_SDPA)
    except (AttributeError, ImportError, KeyError, ValueError) as e:  # an older transformers: keep its SDPA path
        logger.debug("grouped SDPA not available (%s); using transformers' sdpa", e)


def _grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention for decoder models, with grouped heads passed to torch as they are."""
    import torch

    if kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers does: a causal prefill without a mask lets the kernel skip the masked half.
    causal = query.shape[2] > 1 and attention_mask is None and causal
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal,
        enable_gqa=getattr(module, "num_key_value_groups", 1) > 1,
    )
    return out.transpose(1, 2).contiguous(), None


def micro_batches(lengths: Sequence[int], max_new_tokens: int, max_batch_tokens: int) -> list[list[int]]:
    """Split prompts sorted longest first into runs of positions whose padded size fits the budget.

    A run's size is rows x (its first, longest prompt + max_new_tokens): what its KV cache
    holds once generation ends. A prompt over the budget on its own still gets a run.
    """
    groups: list[list[int]] = []
    for i in range(len(lengths)):
        if groups and (len(groups[-1]) + 1) * (lengths[groups[-1][0]] + max_new_tokens) <= max_batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def default_max_batch_tokens(model) -> int:
    """The padded-token budget per micro-batch for this loaded model on its device.

    CPU: `CPU_KV_PER_WEIGHT` x the weights' bytes, in KV-cache tokens (decode is bound by
    memory traffic). GPU: `GPU_MEMORY_SHARE` of the free memory, per token of KV cache plus
    activations.
    """
    per_token = _kv_bytes_per_token(model)
    if model.device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(model.device)
        # A token's transient activations in a layer: hidden states, attention output, MLP.
        cfg = model.config.get_text_config()
        activation = (
            4 * cfg.hidden_size + 2 * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
        ) * model.dtype.itemsize
        return max(1, int(GPU_MEMORY_SHARE * free / (per_token + activation)))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(1, int(CPU_KV_PER_WEIGHT * weights / per_token))


def _kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one token adds to the cache, over all layers."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


def _devices(device: str) -> list[str]:
    import torch

    if device == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA GPU is visible; use device='cpu' or 'auto'.")
    return [device]


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"Unknown dtype {name!r}; use auto, float32, bfloat16 or float16.")
    return value
