"""One prepared GPU check: transformers on CUDA through the real provider and transform, measured against the card.

    PYTHONPATH=. python -m apiana_lab.bench.gpu            # on a machine with one CUDA GPU (make bench-gpu)
    python -m apiana_lab.bench.gpu --tiny --out DIR        # the same code on a CPU, a tiny model, seconds
    python -m apiana_lab.bench.gpu --vendor-wheel bitsandbytes-*.whl   # trim a wheel into .whl/gpu-check/

It needs only torch, transformers (with tokenizers) and the tree: no weights, no network, no
vLLM. Models are built from configs with random bfloat16 weights, where they run: the bundled
SmolLM2-135M's shape and Mistral-7B-Instruct-v0.2's published shape (apiana_lab/data/gpu_check/),
with the bundled model's tokenizer, also carried there. Steps, one after another, each with a
time cap, all within `--budget-s` (8 minutes):

1. each shape through TransformersProvider and ParallelSummarizerTransform on real-length
   chunks, at the default batch size and under `batch_size="auto"`;
2. a forced CUDA out-of-memory error: a micro-batch budget set too high under a memory cap,
   so the transform halves the batch and grows it back;
3. the memory monitor's NVML and torch.cuda series, which must be non-zero and agree;
4. `load_in_8bit` through bitsandbytes, when it is importable (carried in .whl/gpu-check/).

Every forward pass is timed (CUDA synchronized) and its shape recorded, which gives prefill
FLOP/s against the card's bf16 peak and decode bytes/s against its memory bandwidth. Writes
results/bench-gpu/gpu-<device>-<date>.json and .md, and prints a one-screen summary.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger("apiana_lab.bench.gpu")

DATA = Path(__file__).resolve().parents[1] / "data" / "gpu_check"
TOKENIZER_DIR = DATA / "smollm2"  # the bundled SmolLM2's tokenizer, chat template and config, without weights
SHAPES = {
    "tiny": DATA / "tiny.json",
    "smollm2-135m": TOKENIZER_DIR / "config.json",
    "mistral-7b": DATA / "mistral-7b-instruct-v0.2.json",
}
# Where --vendor-wheel puts pure-Python packages and native libraries this machine lacks
# (bitsandbytes); .whl/ is ignored by git, so it travels only when a device run carries it.
VENDOR = Path(__file__).resolve().parents[2] / ".whl" / "gpu-check"

BUDGET_S = 480.0  # the whole check, on a GPU
CAPS_S = {"transformers": 120.0, "auto": 90.0, "oom": 90.0, "monitor": 15.0, "8bit": 90.0}
MIN_START_S = 10.0  # a step is not started with less left than this (or than its cap, when smaller)
OOM_START_BATCH = 32
OOM_ROWS_THAT_FIT = 4  # the memory cap leaves room for about this many rows (x 1.5, see oom_memory_cap)
OOM_GROW_AFTER = 2
OOM_MAX_TOKENS = 16
# NVML sees the CUDA context and the libraries' workspaces on top of what torch's allocator holds.
MONITOR_TOLERANCE_MB = 1500.0
MONITOR_TOLERANCE_SHARE = 0.05
MONITOR_AGREE_SHARE = 0.9  # of samples within tolerance; the two sources are read a moment apart

REQUIRED = {"torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers"}
OPTIONAL = {  # module -> (distribution, what is lost without it)
    "pynvml": ("nvidia-ml-py", "the monitor has no NVML series"),
    "psutil": ("psutil", "the monitor has no process-memory series"),
    "pandas": ("pandas", "no monitor step (its series are read as a DataFrame)"),
    "accelerate": ("accelerate", "no 8-bit step (device_map needs it)"),
    "bitsandbytes": ("bitsandbytes", "no 8-bit step (carry it: --vendor-wheel, see the README)"),
}


# ---- the card's limits ----------------------------------------------------------------------


@dataclass(frozen=True)
class GpuPeak:
    """A card's published limits: dense bf16 tensor-core FLOP/s and memory bandwidth."""

    name: str
    bf16_tflops: float
    bandwidth_gbs: float


# NVIDIA's datasheets: dense bf16 (half the "with sparsity" figure), memory bandwidth. Most specific first.
GPU_PEAKS: list[tuple[str, GpuPeak]] = [
    (r"h200.*nvl", GpuPeak("H200 NVL", 835.0, 4800.0)),
    (r"h200", GpuPeak("H200 SXM", 989.0, 4800.0)),
    (r"h100.*nvl", GpuPeak("H100 NVL", 835.0, 3900.0)),
    (r"h100.*pcie", GpuPeak("H100 PCIe", 756.0, 2000.0)),
    (r"h100", GpuPeak("H100 SXM", 989.0, 3350.0)),
    (r"a100.*(80gb.*pcie|pcie.*80gb)", GpuPeak("A100 80GB PCIe", 312.0, 1935.0)),
    (r"a100.*80gb", GpuPeak("A100 80GB SXM", 312.0, 2039.0)),
    (r"a100", GpuPeak("A100 40GB", 312.0, 1555.0)),
    (r"l40s", GpuPeak("L40S", 362.0, 864.0)),
    (r"\bl40\b", GpuPeak("L40", 181.0, 864.0)),
    (r"\bl4\b", GpuPeak("L4", 121.0, 300.0)),
    (r"\ba10g?\b", GpuPeak("A10 (A10G: the A10's datasheet)", 62.5, 600.0)),
]


def gpu_peak(device_name: str) -> GpuPeak | None:
    """The published limits of the card `torch.cuda.get_device_name()` names; None for a card not in the table."""
    name = device_name.lower()
    return next((peak for pattern, peak in GPU_PEAKS if re.search(pattern, name)), None)


# ---- what a forward pass costs --------------------------------------------------------------


class Forward(NamedTuple):
    """One timed forward pass: a prefill (many positions per row) or a decode step (one)."""

    rows: int
    positions: int  # new positions per row, padding included: the GPU computes those too
    context: int  # positions per row in the KV cache after this pass (what attention reads)
    head_positions: int  # positions per row that go through the output head (1 in generate)
    seconds: float


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP and byte counts need to know about a loaded model."""

    params: int
    layer_params: int  # weights every position multiplies through: all but the embedding and the output head
    head_params: int  # vocabulary x hidden size
    weight_bytes: int  # read once per decode step: every weight but the input embedding (it is gathered, not read)
    kv_bytes_per_token: int  # keys and values of one position, over all layers


def model_shape(model, kv_itemsize: int) -> ModelShape:
    """Count a loaded model's weights (a tied output head once) and its KV-cache bytes per token."""
    params = list(model.parameters())  # each tied tensor once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is embedding or head.data_ptr() == embedding.data_ptr()
    total = sum(p.numel() for p in params)
    all_bytes = sum(p.numel() * p.element_size() for p in params)
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelShape(
        params=total,
        layer_params=total - embedding.numel() - (0 if tied else head.numel()),
        head_params=head.numel(),
        weight_bytes=all_bytes - (0 if tied else embedding.numel() * embedding.element_size()),
        kv_bytes_per_token=2 * cfg.num_hidden_layers * kv_heads * head_dim * kv_itemsize,
    )


def prefill_flops(shape: ModelShape, calls: list[Forward]) -> float:
    """2 x layer weights x padded prompt tokens, plus 2 x the head's weights per position it runs on.

    Attention's own products (QK^T and AV) are left out: a few per cent at these lengths, so
    the rate is a slight underestimate.
    """
    return float(
        sum(
            2 * shape.layer_params * c.rows * c.positions + 2 * shape.head_params * c.rows * c.head_positions
            for c in calls
            if c.positions > 1
        )
    )


def decode_bytes(shape: ModelShape, calls: list[Forward]) -> float:
    """Per decode step: every weight read once for the batch, plus each row's KV cache read by attention."""
    return float(
        sum(shape.weight_bytes + shape.kv_bytes_per_token * c.rows * c.context for c in calls if c.positions == 1)
    )


def throughput(shape: ModelShape, calls: list[Forward], peak: GpuPeak | None) -> dict:
    """Prefill FLOP/s and decode bytes/s of these forward passes, and their shares of the card's limits."""
    prefill = [c for c in calls if c.positions > 1]
    decode = [c for c in calls if c.positions == 1]
    prefill_s = sum(c.seconds for c in prefill)
    decode_s = sum(c.seconds for c in decode)
    flop_rate = prefill_flops(shape, prefill) / prefill_s if prefill_s > 0 else None
    byte_rate = decode_bytes(shape, decode) / decode_s if decode_s > 0 else None
    return {
        "prefill_forwards": len(prefill),
        "prefill_rows_max": max((c.rows for c in prefill), default=0),
        "prefill_tokens": sum(c.rows * c.positions for c in prefill),
        "prefill_s": prefill_s,
        "prefill_flop_per_s": flop_rate,
        "prefill_share_of_peak": flop_rate / (peak.bf16_tflops * 1e12) if peak and flop_rate else None,
        "decode_steps": len(decode),
        "decode_tokens": sum(c.rows for c in decode),
        "decode_s": decode_s,
        "decode_tokens_per_s": sum(c.rows for c in decode) / decode_s if decode_s > 0 else None,
        "decode_bytes_per_s": byte_rate,
        "decode_share_of_bandwidth": byte_rate / (peak.bandwidth_gbs * 1e9) if peak and byte_rate else None,
    }


class ForwardClock:
    """Times every forward pass of a model (synchronizing CUDA around it) and records its shape."""

    def __init__(self, model, synchronize: Callable[[], None]):
        self.model = model
        self.synchronize = synchronize
        self.calls: list[Forward] = []
        self._local = threading.local()
        self._handles: list = []

    def __enter__(self) -> ForwardClock:
        self._handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            self._local.shape = None
            return
        rows, positions = int(ids.shape[0]), int(ids.shape[1])
        mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
        if mask is not None and mask.dim() == 2:
            context = int(mask.shape[1])
        else:
            context = positions + (int(cache.get_seq_length()) if cache is not None else 0)
        keep = kwargs.get("logits_to_keep")
        head = positions if not keep or not isinstance(keep, int) else min(keep, positions)
        self.synchronize()
        self._local.shape = (rows, positions, context, head, time.perf_counter())

    def _after(self, module, args, kwargs, output) -> None:
        shape = getattr(self._local, "shape", None)
        if shape is None:
            return
        self.synchronize()
        rows, positions, context, head, start = shape
        self.calls.append(Forward(rows, positions, context, head, time.perf_counter() - start))


# ---- the out-of-memory drill and the monitor's agreement ------------------------------------


def oom_memory_cap(
    total_bytes: int, held_bytes: int, row_bytes: float, rows_that_fit: int = OOM_ROWS_THAT_FIT
) -> float:
    """The share of the card's memory that leaves room for about 1.5 x `rows_that_fit` rows beyond what is held.

    `row_bytes` is the provider's own estimate of one row: (prompt + new tokens) x (KV cache +
    activations per token). Real use runs above the estimate, so a batch of 2 x rows_that_fit
    does not fit and one of rows_that_fit (or half of it, when the estimate is off by 3x) does.
    """
    if total_bytes <= 0:
        raise ValueError(f"total_bytes must be positive, not {total_bytes!r}")
    return min(1.0, (held_bytes + 1.5 * rows_that_fit * row_bytes) / total_bytes)


def activation_bytes_per_token(config, itemsize: int) -> int:
    """A token's transient activations in a layer (hidden states, attention output, MLP), as the provider counts."""
    cfg = config.get_text_config()
    return (4 * cfg.hidden_size + 2 * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)) * itemsize


def compare_memory(
    frame,
    tolerance_mb: float = MONITOR_TOLERANCE_MB,
    tolerance_share: float = MONITOR_TOLERANCE_SHARE,
    agree_share: float = MONITOR_AGREE_SHARE,
) -> dict:
    """NVML against torch.cuda, sample by sample, in the monitor's frame.

    NVML's figure (this process's memory, else the devices' used memory) must be non-zero,
    torch's reserved memory too, and NVML must lie at most `tolerance_mb` + `tolerance_share`
    x torch's above it (the CUDA context) and at most 64 MB below it, in `agree_share` of the
    samples where both were read.
    """
    used = [c for c in frame.columns if re.fullmatch(r"gpu\d+_used_mb", c)]
    if "gpu_process_mb" in frame.columns and frame["gpu_process_mb"].notna().any():
        nvml_column, nvml = "gpu_process_mb", frame["gpu_process_mb"]
    elif used:
        nvml_column, nvml = "+".join(used), frame[used].sum(axis=1, min_count=1)
    else:
        return {"ok": False, "reason": "no NVML series in the monitor's samples"}
    if "torch_reserved_mb" not in frame.columns:
        return {"ok": False, "reason": "no torch.cuda series in the monitor's samples"}
    both = nvml.notna() & frame["torch_reserved_mb"].notna()
    nvml, torch_mb = nvml[both], frame["torch_reserved_mb"][both]
    diff = nvml - torch_mb
    within = (diff >= -64.0) & (diff <= tolerance_mb + tolerance_share * torch_mb)
    share = float(within.mean()) if len(diff) else 0.0
    figures = {
        "nvml_column": nvml_column,
        "samples": int(both.sum()),
        "nvml_peak_mb": float(nvml.max()) if len(nvml) else 0.0,
        "torch_reserved_peak_mb": float(torch_mb.max()) if len(torch_mb) else 0.0,
        "torch_allocated_peak_mb": float(frame["torch_allocated_mb"].max()) if "torch_allocated_mb" in frame else 0.0,
        "nvml_minus_torch_median_mb": float(diff.median()) if len(diff) else None,
        "nvml_minus_torch_max_mb": float(diff.abs().max()) if len(diff) else None,
        "share_within_tolerance": share,
        "tolerance": f"-64 MB to +{tolerance_mb:,.0f} MB + {tolerance_share:.0%} of torch's, "
        f"in {agree_share:.0%} of samples",
    }
    nonzero = figures["nvml_peak_mb"] > 0 and figures["torch_reserved_peak_mb"] > 0
    figures["ok"] = bool(nonzero and figures["samples"] >= 3 and share >= agree_share)
    if not figures["ok"]:
        figures["reason"] = (
            "a series is zero"
            if not nonzero
            else "fewer than 3 samples with both"
            if figures["samples"] < 3
            else f"only {share:.0%} of samples agree"
        )
    return figures


# ---- what this machine has ------------------------------------------------------------------


def check_environment() -> dict:
    """Each package this check uses: its version, or None when it is missing."""
    found = {}
    for module, dist in {**REQUIRED, **{m: d for m, (d, _) in OPTIONAL.items()}}.items():
        if importlib.util.find_spec(module) is None:
            found[module] = None
            continue
        try:
            found[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[module] = "present"
    return found


def vendor_wheel(wheel: Path, folder: Path, cuda_major: int) -> list[str]:
    """Unpack a wheel into `folder`, keeping of its native libraries only the CPU one and those for CUDA `cuda_major`.

    bitsandbytes' wheel holds a library per CUDA, ROCm and XPU version (130 MB unpacked); the
    ones one machine loads are a few MB, small enough to travel with the tree.
    """
    keep = re.compile(rf"_(cpu|cuda{cuda_major}\d)\.so$")
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.endswith(".so") and not keep.search(name):
                continue
            archive.extract(name, folder)
            written.append(name)
    return written


# ---- models and chunks ----------------------------------------------------------------------


def model_folder(shape: str, folder: Path) -> dict:
    """A model folder without weights: the shape's config, sized to the carried tokenizer, and the tokenizer's files.

    The tokenizer is SmolLM2's (49,152 tokens), so a shape with another vocabulary is resized to
    it (Mistral-7B's 32,000: +140M parameters, +1.9%); the returned dict says what changed.
    """
    from tokenizers import Tokenizer

    config = json.loads(SHAPES[shape].read_text(encoding="utf-8"))
    ids = json.loads((TOKENIZER_DIR / "config.json").read_text(encoding="utf-8"))  # the tokenizer's own model
    vocab = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json")).get_vocab_size()
    changed = {"vocab_size": [config["vocab_size"], vocab]} if config["vocab_size"] != vocab else {}
    config.update(vocab_size=vocab, **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    folder.mkdir(parents=True, exist_ok=True)
    for path in TOKENIZER_DIR.iterdir():
        if path.name != "config.json":
            shutil.copy(path, folder / path.name)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return changed


def load_provider(folder: Path, device: str, **kwargs):
    """The transformers provider on random bfloat16 weights of the folder's shape, made on `device`."""
    import torch

    # Imported from its module: with PYTHONPATH and no install, the registry's entry points are absent.
    from apiana_lab.providers.transformers_backend import TransformersProvider

    # Initialised where they run: a 7B shape's random weights made on the CPU and copied over take minutes.
    with torch.device(device):
        return TransformersProvider(str(folder), device=device, dtype="bfloat16", load_format="dummy", **kwargs)


def real_length_chunks(n: int, tokens: tuple[int, int] = (1000, 1400), seed: int = 1) -> list:
    """n chunks of 1,000-1,400 tokens, one per conversation of a synthetic export: the benchmarks' workload (a).

    The committed sample comes from the same generator, but its 12 chunks are 324-624 tokens.
    """
    from apiana_lab.chunking import Chunker, ChunkingOptions, load_tokenizer
    from apiana_lab.export.reader import read_export
    from apiana_lab.export.synth import write_synthetic_export

    chunker = Chunker(ChunkingOptions(chunk_size=tokens[1]), load_tokenizer(TOKENIZER_DIR))
    chunks = []
    with tempfile.TemporaryDirectory(prefix="apiana-gpu-check-") as tmp:
        path = Path(tmp) / "conversations.json"
        write_synthetic_export(path, size_mb=max(1.0, n / 15), seed=seed)
        for conversation in read_export(path):
            chunks += [
                c for c in chunker.chunk(conversation) if tokens[0] <= c.token_count <= tokens[1] and not c.continued
            ][:1]
            if len(chunks) >= n:
                return chunks
    raise RuntimeError(f"the synthetic export gave {len(chunks)} chunks of {tokens[0]}-{tokens[1]} tokens; need {n}")


# ---- the steps ------------------------------------------------------------------------------


class Check:
    """What the steps share: the device, the chunks, the clock, the monitor and the results so far."""

    def __init__(self, args, device: str, peak: GpuPeak | None, chunks: list, results: dict, save: Callable[[], None]):
        self.args = args
        self.device = device
        self.cuda = device.startswith("cuda")
        self.peak = peak
        self.chunks = chunks
        self.results = results
        self.save = save
        self.started = time.monotonic()
        self.monitor = None

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def synchronize(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def step(self, name: str, cap_s: float, fn: Callable[[float], dict]) -> dict:
        """Run one step within its cap and what is left of the budget; record it whatever happens."""
        left = self.left()
        if left < min(cap_s, MIN_START_S):
            row = {
                "step": name,
                "status": "cut",
                "detail": f"not started: {max(left, 0):.0f} s left of the {self.args.budget_s:.0f} s budget",
                "seconds": 0.0,
            }
        else:
            start = time.monotonic()
            if self.monitor is not None:
                self.monitor.mark(f"{name} start")
            try:
                row = {"step": name, **fn(start + min(cap_s, left))}
            except Exception as e:  # one failed step must not hide the others' figures
                logger.error("step %s failed:\n%s", name, traceback.format_exc())
                first = str(e).splitlines()[0] if str(e) else ""
                row = {"step": name, "status": "failed", "detail": f"{type(e).__name__}: {first}"}
            row["seconds"] = time.monotonic() - start
            if row["seconds"] > cap_s:
                row["detail"] = f"{row.get('detail', '')}; over its {cap_s:.0f} s cap".lstrip("; ")
        row["cap_s"] = cap_s
        self.results["steps"].append(row)
        self.save()
        print(f"  {summary_line(row)}", file=sys.stderr, flush=True)
        return row

    def run(self, transform, chunks: list, deadline: float) -> dict:
        """Run a transform over the chunks with every forward pass timed; stop after a chunk once past `deadline`."""
        provider = transform.provider
        shape = model_shape(provider.models[0], provider.dtype.itemsize)
        progress = self.monitor.progress if self.monitor is not None else None
        done, start = 0, time.perf_counter()
        with ForwardClock(provider.models[0], self.synchronize) as clock:
            results = transform.run(chunks, progress)
            try:
                for _ in results:
                    done += 1
                    if time.monotonic() > deadline and done < len(chunks):
                        break
            finally:
                results.close()
        wall = time.perf_counter() - start
        stats = transform.stats
        figures = {
            "chunks": len(chunks),
            "done": done,
            "failed": stats.failed,
            "failures_by_reason": dict(stats.failures_by_reason),
            "batch_size": transform.batch_size,
            "max_workers": transform.max_workers,
            "max_batch_tokens": provider.max_batch_tokens,
            "max_tokens": transform.options.max_tokens,
            "wall_s": wall,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "completion_tokens_per_s": stats.completion_tokens / wall if wall > 0 else 0.0,
            "batches": len(stats.latencies),
            "batch_size_changes": list(stats.batch_size_changes),
            "model": asdict(shape),
            **throughput(shape, clock.calls, self.peak),
        }
        if done < len(chunks):
            status, detail = "cut", f"cut at its cap after {done}/{len(chunks)} chunks"
        elif stats.failed:
            status, detail = "failed", f"{stats.failed} chunks failed: {figures['failures_by_reason']}"
        else:
            n = figures["batches"]
            status, detail = "ok", f"{done} chunks, batch size {transform.batch_size}, {n} batch{'es' * (n != 1)}"
        return {"status": status, "detail": detail, "figures": figures}


def transformers_steps(check: Check, shape: str, folder: Path):
    """One shape at the default batch size and under batch_size="auto"; the provider stays loaded for the drill."""
    from apiana_lab.errors import ConfigError
    from apiana_lab.providers import GenerationOptions
    from apiana_lab.summarize import ParallelSummarizerTransform

    args, holder = check.args, {}

    def default(deadline: float) -> dict:
        start = time.perf_counter()
        holder["changed"] = model_folder(shape, folder)
        provider = holder["provider"] = load_provider(folder, check.device)
        load_s = time.perf_counter() - start
        provider.complete("Say hello.", GenerationOptions(max_tokens=2))  # warm-up: kernel choice is not throughput
        row = check.run(
            ParallelSummarizerTransform(provider, max_length=args.max_tokens, ignore_eos=True), check.chunks, deadline
        )
        row["figures"].update(load_s=load_s, config_changes=holder["changed"])
        return row

    def auto(deadline: float) -> dict:
        provider = holder.get("provider")
        if provider is None:
            return {"status": "skipped", "detail": "the model did not load"}
        try:
            transform = ParallelSummarizerTransform(
                provider, batch_size="auto", max_length=args.max_tokens, ignore_eos=True
            )
        except (ConfigError, TypeError, ValueError) as e:
            return {
                "status": "not available",
                "figures": {"error": f"{type(e).__name__}: {e}"},
                "detail": "auto: not available in this build",
            }
        return check.run(transform, check.chunks, deadline)

    check.step(f"{shape} default batch", CAPS_S["transformers"], default)
    check.step(f"{shape} batch auto", CAPS_S["auto"], auto)
    return holder.get("provider")


def oom_step(check: Check, provider, shape: str) -> None:
    """A batch that cannot fit: the budget set too high under a memory cap; the transform halves it and grows back."""

    def drill(deadline: float) -> dict:
        import torch

        from apiana_lab.summarize import ParallelSummarizerTransform

        if provider is None:
            return {"status": "skipped", "detail": "the model did not load"}
        transform = ParallelSummarizerTransform(
            provider,
            max_workers=1,
            batch_size=OOM_START_BATCH,
            grow_after=OOM_GROW_AFTER,
            max_length=OOM_MAX_TOKENS,
            ignore_eos=True,
        )
        chunks = (check.chunks * math.ceil((OOM_START_BATCH + 8) / len(check.chunks)))[: OOM_START_BATCH + 8]
        longest = max(provider.count_tokens(transform.prompt(c)) for c in chunks)
        model = provider.models[0]
        per_token = model_shape(model, provider.dtype.itemsize).kv_bytes_per_token + activation_bytes_per_token(
            model.config, provider.dtype.itemsize
        )
        row_bytes = (longest + OOM_MAX_TOKENS) * per_token
        if not check.cuda:
            plan = oom_memory_cap(80 * 2**30, sum(p.numel() * p.element_size() for p in model.parameters()), row_bytes)
            return {
                "status": "skipped",
                "detail": "skipped: no CUDA",
                "figures": {"row_bytes": row_bytes, "memory_cap_on_an_80gb_card": plan},
            }
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(check.device).total_memory
        held = torch.cuda.memory_reserved(check.device)
        cap = oom_memory_cap(total, held, row_bytes)
        budget = provider.max_batch_tokens
        provider.max_batch_tokens = 10**9  # too high: the provider no longer cuts the batch into micro-batches
        torch.cuda.set_per_process_memory_fraction(cap, check.device)
        try:
            row = check.run(transform, chunks, deadline)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, check.device)
            provider.max_batch_tokens = budget
            torch.cuda.empty_cache()
        changes = row["figures"]["batch_size_changes"]
        halved = [c for c in changes if str(c["reason"]).startswith("out of memory")]
        grew = [c for c in changes if str(c["reason"]).startswith("grow")]
        path = "→".join(str(size) for size in [OOM_START_BATCH] + [c["to"] for c in changes])
        path = f"batch {path}: {len(halved)} halved on OOM, {len(grew)} grown back"
        row["figures"].update(
            memory_cap_share=cap,
            memory_cap_gb=cap * total / 1e9,
            held_gb=held / 1e9,
            row_bytes_estimate=row_bytes,
            halvings=len(halved),
            grow_backs=len(grew),
        )
        if row["status"] == "ok" and not (halved and grew):
            row["status"] = "failed"
            row["detail"] = f"expected at least one halving and one grow-back; saw: {path}"
        else:
            row["detail"] = f"{path}; {row['detail']}"
        return row

    check.step(f"oom drill ({shape})", CAPS_S["oom"], drill)


def monitor_step(check: Check) -> None:
    """The monitor's series over the steps before: NVML against torch.cuda on a GPU, the process's memory anywhere."""

    def compare(deadline: float) -> dict:
        monitor = check.monitor
        if monitor is None:
            return {"status": "skipped", "detail": "pandas is missing: the monitor's series cannot be read"}
        monitor.stop()
        frame = monitor.to_pandas()
        figures = {"sources": monitor.sources, "samples": len(frame), "peaks": monitor.peaks()}
        if not check.cuda:
            rss = float(frame["rss_mb"].max()) if "rss_mb" in frame else 0.0
            figures["rss_peak_mb"] = rss
            detail = f"skipped: no CUDA; {len(frame)} samples, process memory peak {rss:,.0f} MB"
            return {"status": "skipped", "detail": detail, "figures": figures}
        agreement = compare_memory(frame)
        figures["agreement"] = agreement
        if not agreement["ok"]:
            return {"status": "failed", "detail": agreement["reason"], "figures": figures}
        detail = (
            f"{agreement['samples']} samples; NVML − torch reserved: median "
            f"{agreement['nvml_minus_torch_median_mb']:,.0f} MB, "
            f"{agreement['share_within_tolerance']:.0%} within tolerance"
        )
        return {"status": "ok", "detail": detail, "figures": figures}

    check.step("monitor (NVML vs torch.cuda)", CAPS_S["monitor"], compare)


def int8_step(check: Check, shape: str, environment: dict) -> None:
    """load_in_8bit through bitsandbytes on random weights saved to disk (from_pretrained quantizes as it loads)."""

    def int8(deadline: float) -> dict:
        import torch

        from apiana_lab.providers.transformers_backend import TransformersProvider
        from apiana_lab.summarize import ParallelSummarizerTransform

        if not check.cuda:
            return {"status": "skipped", "detail": "skipped: no CUDA (8-bit kernels need one)"}
        missing = [m for m in ("bitsandbytes", "accelerate") if environment.get(m) is None]
        if missing:
            return {
                "status": "not available",
                "detail": f"not available: {', '.join(missing)} not installed; {OPTIONAL[missing[0]][1]}",
            }
        with tempfile.TemporaryDirectory(prefix="apiana-gpu-8bit-") as tmp:
            folder = Path(tmp)
            model_folder(shape, folder)
            source = load_provider(folder, check.device)
            source.models[0].save_pretrained(folder)
            source.close()
            provider = TransformersProvider(str(folder), device=check.device, load_in_8bit=True)
        try:
            return check.run(
                ParallelSummarizerTransform(provider, max_length=check.args.max_tokens, ignore_eos=True),
                check.chunks,
                deadline,
            )
        finally:
            provider.close()
            torch.cuda.empty_cache()

    check.step(f"load_in_8bit ({shape})", CAPS_S["8bit"], int8)


# ---- the report -----------------------------------------------------------------------------


def _rate(value, unit: float, digits: int = 1) -> str:
    return "" if value is None else f"{value / unit:,.{digits}f}"


def _share(value) -> str:
    return "" if value is None else f"{value:.0%}"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def summary_line(row: dict) -> str:
    """One step as one line of the summary."""
    f = row.get("figures", {})
    cells = [
        f"{row['step']:<30.30}",
        f"{row['status']:<13}",
        f"{row.get('seconds', 0.0):6.1f}",
        f"{_rate(f.get('completion_tokens_per_s'), 1):>9}",
        f"{_rate(f.get('prefill_flop_per_s'), 1e12):>8}",
        f"{_share(f.get('prefill_share_of_peak')):>5}",
        f"{_rate(f.get('decode_bytes_per_s'), 1e9):>8}",
        f"{_share(f.get('decode_share_of_bandwidth')):>5}",
        _cut(row.get("detail", ""), 60),
    ]
    return " ".join(cells)


SUMMARY_HEADER = " ".join(
    [
        f"{'step':<30}",
        f"{'status':<13}",
        f"{'s':>6}",
        f"{'out tok/s':>9}",
        f"{'TFLOP/s':>8}",
        f"{'%peak':>5}",
        f"{'GB/s':>8}",
        f"{'%bw':>5}",
        "detail",
    ]
)


def render_summary(results: dict) -> str:
    """The one-screen summary: the card and its limits, one line per step, the totals."""
    peak = results["peak"]
    limits = (
        f"{peak['name']}: {peak['bf16_tflops']:,.0f} TFLOP/s bf16 dense, {peak['bandwidth_gbs']:,.0f} GB/s"
        if peak
        else "tiny config: no peak figures"
        if results["tiny"]
        else "peak unknown: not in the table"
    )
    env = results["environment"]
    missing = [m for m in OPTIONAL if env.get(m) is None]
    lines = [
        f"GPU check on {results['device_name']} ({limits})",
        f"torch {env.get('torch')}, transformers {env.get('transformers')}; "
        f"missing: {', '.join(missing) if missing else 'nothing'}",
        SUMMARY_HEADER,
    ]
    lines += [summary_line(row) for row in results["steps"]]
    ok = sum(r["status"] == "ok" for r in results["steps"])
    lines.append(
        f"{ok}/{len(results['steps'])} steps ok in {results['seconds']:.0f} s of {results['budget_s']:.0f} s; "
        f"TFLOP/s: prefill, GB/s: decode; results in {results.get('json', '?')}"
    )
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    """The check as a markdown report: the summary table, the formulas, each step's figures."""
    from apiana_lab.experiments.record import markdown_table

    peak = results["peak"]
    rows = []
    for row in results["steps"]:
        f = row.get("figures", {})
        rows.append(
            {
                "step": row["step"],
                "status": row["status"],
                "seconds": round(row.get("seconds", 0.0), 1),
                "tok_s": f.get("completion_tokens_per_s"),
                "tflops": None if f.get("prefill_flop_per_s") is None else f["prefill_flop_per_s"] / 1e12,
                "peak": _share(f.get("prefill_share_of_peak")),
                "gbs": None if f.get("decode_bytes_per_s") is None else f["decode_bytes_per_s"] / 1e9,
                "bw": _share(f.get("decode_share_of_bandwidth")),
                "detail": row.get("detail", ""),
            }
        )
    columns = [
        ("step", "step"),
        ("status", "status"),
        ("seconds", "s"),
        ("tok_s", "output tok/s"),
        ("tflops", "prefill TFLOP/s"),
        ("peak", "% of bf16 peak"),
        ("gbs", "decode GB/s"),
        ("bw", "% of bandwidth"),
        ("detail", "detail"),
    ]
    limits = (
        f"{peak['name']} datasheet: {peak['bf16_tflops']:,.0f} TFLOP/s dense bf16, {peak['bandwidth_gbs']:,.0f} GB/s"
        if peak
        else "peak unknown: this card is not in the table (apiana_lab/bench/gpu.py, GPU_PEAKS)"
    )
    parts = [
        f"# GPU check: {results['device_name']}\n",
        f"{results['when']}; {limits}. torch {results['environment'].get('torch')}, transformers "
        f"{results['environment'].get('transformers')}; "
        f"{results['seconds']:.0f} s of a {results['budget_s']:.0f} s budget"
        f"{' (tiny config on CPU: checks the script, not the card)' if results['tiny'] else ''}.\n",
        markdown_table(rows, columns) + "\n",
        "## How the figures are counted\n",
        "Random bfloat16 weights of each shape, built from its config on the device; the bundled SmolLM2's "
        "tokenizer (49,152 tokens), so Mistral-7B's vocabulary is resized from 32,000 to it (+1.9% parameters). "
        f"{results['settings']['chunks']} real-length chunks (1,000-1,400 tokens, from the synthetic export "
        f"generator), {results['settings']['max_tokens']} new tokens forced (`ignore_eos`).\n",
        "- Every forward pass of the model is timed, CUDA synchronized before and after. A pass over many "
        "positions is prefill, over one a decode step.",
        "- prefill FLOP/s = (2 × layer weights × padded prompt tokens + 2 × output-head weights × rows) / prefill "
        "seconds. Layer weights are all but the embedding and the output head; attention's own products are left "
        "out (a few per cent), so this underestimates slightly.",
        "- decode bytes/s = Σ over steps (weight bytes + KV bytes per token × rows × context) / decode seconds: "
        "each step reads every weight once for the whole batch, and attention reads each row's cache.",
        "- output tok/s is end to end: new tokens / wall seconds of the transform's run, tokenizing and "
        "orchestration included.",
        "- The out-of-memory drill caps this process's CUDA memory (`set_per_process_memory_fraction`) at what it "
        "holds plus room for about six rows by the provider's own estimate, and sets `max_batch_tokens` too high "
        "for that, so a batch of 32 cannot fit: the transform must halve it, then grow it back.\n",
        "## Steps\n",
    ]
    for row in results["steps"]:
        parts.append(f"### {row['step']}: {row['status']}\n\n{row.get('detail', '')}\n")
        if row.get("figures"):
            parts.append("```json\n" + json.dumps(row["figures"], indent=1, default=str) + "\n```\n")
    return "\n".join(parts)


def write(results: dict, folder: Path, stem: str) -> tuple[Path, Path]:
    """Write <stem>.json and <stem>.md into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    results["json"] = str(json_path)
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(results).rstrip() + "\n", encoding="utf-8")
    return json_path, md_path


# ---- the check ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--tiny", action="store_true", help="a tiny config on the CPU: checks the script in seconds")
    add("--out", type=Path, help="where the JSON and markdown go (default: results/bench-gpu/; --tiny: a new temp dir)")
    add("--chunks", type=int, help="real-length chunks per run (default 64; --tiny: 6)")
    add("--max-tokens", type=int, help="new tokens per chunk, forced (default 64; --tiny: 4)")
    add("--budget-s", type=float, default=BUDGET_S, help="seconds for the whole check; steps past it are cut")
    add("--vendor", type=Path, default=VENDOR, help="folder of carried packages, put first on sys.path")
    add(
        "--vendor-wheel",
        type=Path,
        help="unpack this wheel (bitsandbytes) into --vendor, keeping --cuda-major's native libraries, and exit",
    )
    add("--cuda-major", type=int, default=13, help="with --vendor-wheel: the CUDA major version torch was built for")
    args = parser.parse_args(argv)
    if args.vendor_wheel is not None:
        names = vendor_wheel(args.vendor_wheel, args.vendor, args.cuda_major)
        print(f"{len(names)} files of {args.vendor_wheel.name} in {args.vendor}")
        return 0
    # Before torch and transformers: transformers decides at import whether bitsandbytes is there.
    if args.vendor.is_dir():
        sys.path.insert(0, str(args.vendor))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.chunks = args.chunks or (6 if args.tiny else 64)
    args.max_tokens = args.max_tokens or (4 if args.tiny else 64)

    environment = check_environment()
    missing = [m for m in REQUIRED if environment[m] is None]
    for module, (dist, cost) in OPTIONAL.items():
        if environment[module] is None:
            print(f"missing {dist}: {cost}", file=sys.stderr)
    if missing:
        print(f"cannot run: {', '.join(missing)} not installed (needs torch and transformers)", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("no CUDA GPU visible: run with --tiny to check the script on a CPU", file=sys.stderr)
        return 2
    device = "cuda:0" if cuda else "cpu"
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU"
    peak = gpu_peak(device_name) if cuda else None
    from apiana_lab.experiments.record import machine, results_root

    if args.out is None:
        args.out = results_root().absolute() / "bench-gpu" if cuda else Path(tempfile.mkdtemp(prefix="apiana-gpu-"))
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    stem = f"gpu-{slug}-{time.strftime('%Y-%m-%d')}"
    shapes = ["smollm2-135m", "mistral-7b"] if cuda else ["tiny"]
    results = {
        "benchmark": "gpu",
        "tiny": args.tiny,
        "complete": False,
        "device_name": device_name,
        "peak": asdict(peak) if peak else None,
        "environment": environment,
        "machine": machine(),
        "cuda": torch.version.cuda,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": args.budget_s,
        "settings": {"chunks": args.chunks, "max_tokens": args.max_tokens, "shapes": shapes},
        "steps": [],
        "seconds": 0.0,
    }
    start = time.monotonic()

    def save() -> None:
        results["seconds"] = time.monotonic() - start
        write(results, args.out, stem)

    check = Check(args, device, peak, real_length_chunks(args.chunks), results, save)
    if environment["pandas"] is not None:
        from apiana_lab.monitor import MemoryMonitor

        check.monitor = MemoryMonitor(interval=0.5 if cuda else 0.1, gpu=cuda).start()
    print(SUMMARY_HEADER, file=sys.stderr, flush=True)
    provider = None
    try:
        with tempfile.TemporaryDirectory(prefix="apiana-gpu-models-") as tmp:
            for shape in shapes:
                if provider is not None:
                    provider.close()
                provider = transformers_steps(check, shape, Path(tmp) / shape)
            oom_step(check, provider, shapes[-1])
            if provider is not None:
                provider.close()
                provider = None
            monitor_step(check)
            int8_step(check, shapes[0], environment)
    finally:
        if provider is not None:
            provider.close()
        if check.monitor is not None:
            check.monitor.close()
    results["complete"] = True
    save()
    print(render_summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
