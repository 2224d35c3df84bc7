"""Memory and engine figures over time, sampled in a thread, with the run's events on the same timeline.

    with MemoryMonitor(provider) as monitor:
        transform.run(chunks, progress=fan_out(bar, monitor.progress))
    monitor.to_pandas()
    monitor.save("results/run", figure=plot_monitor(monitor))  # the figure from apiana_lab.notebook

Sources, each either read or recorded as absent with the reason (never as zeros):
- `cpu`: resident memory of this process plus its children (vLLM's engine core is a child),
  and the system's available memory (psutil);
- `gpu`: per device used/total memory and utilization, and the memory of this process tree
  (NVML through `nvidia-ml-py`, imported as `pynvml`);
- `torch.cuda`: allocated, reserved and peak memory of this process (the transformers
  backend), read only when torch is already imported: importing it just to learn that it is
  absent would cost seconds;
- `engine`: `provider.engine_metrics()`, e.g. vLLM's KV-cache use, running and waiting
  requests and preemptions (start the vLLM provider with `stats=True`).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

from .progress import Progress

logger = logging.getLogger(__name__)

MB = 1e6  # decimal megabytes, as bench.common.peak_rss_mb reports them
NOTEBOOKS_EXTRA = "pip install 'apiana-lab[notebooks]'"

# engine_metrics() name -> (column, scale). vLLM's "perc" gauge is a fraction (1.0 = full).
ENGINE_COLUMNS = {
    "kv_cache_usage_perc": ("kv_cache_pct", 100.0),
    "num_requests_running": ("requests_running", 1.0),
    "num_requests_waiting": ("requests_waiting", 1.0),
    "num_preemptions": ("preemptions", 1.0),
}

# Output tokens are counted when a chunk finishes, and one engine step can finish many chunks
# at once, each of which was generating since it entered the engine. A rate over the interval
# between two such snapshots (a millisecond) measures how many finished together, not how fast
# tokens come: 2x10^7 tokens/s on a CPU. So rates are taken over a trailing window at least this
# long and at least one in-flight window of finished chunks wide (see `progress_frame`).
RATE_WINDOW_S = 2.0


class MemoryMonitor:
    """Samples memory and engine figures every `interval` seconds in a thread; also a progress callback.

    Args:
        provider: read through `provider.engine_metrics()` (None: no engine source).
        interval: seconds between samples.
        gpu: read NVML; False records the GPU source as switched off.
        pid: the process whose tree is measured (default: this one).
    """

    def __init__(self, provider=None, *, interval: float = 0.5, gpu: bool = True, pid: int | None = None):
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        self.provider = provider
        self.interval = float(interval)
        self.pid = pid or os.getpid()
        self._want_gpu = gpu
        # The sampler thread and the progress callback only append to these; readers copy them.
        self._samples: list[dict] = []
        self._snapshots: list[tuple[float, Progress]] = []
        self._events: list[dict] = []
        self._sources: dict[str, _Source] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0: float | None = None
        self._closed = False

    # -- running -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the sampler thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MemoryMonitor:
        """Probe the sources and start sampling; the clock (`t_s`) starts here on the first start."""
        if self.running:
            return self
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if not self._sources or self._closed:
            self._closed = False
            self._sources = {
                "cpu": _CpuSource(self.pid),
                "gpu": _NvmlSource() if self._want_gpu else _Source.off("gpu", "switched off (gpu=False)"),
                "torch.cuda": _TorchCudaSource(),
                "engine": _EngineSource(self.provider),
            }
            for source in self._sources.values():
                if source.reason:
                    logger.info("memory monitor: %s absent: %s", source.name, source.reason)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="memory-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last sample and stop the thread (idempotent)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def close(self) -> None:
        """Stop sampling and release NVML; a later start() probes the sources again."""
        self.stop()
        for source in self._sources.values():
            source.close()
        self._closed = True

    def __enter__(self) -> MemoryMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        # Only stop: the same monitor may watch the next run too (a sweep), on one timeline.
        self.stop()

    def _now(self) -> float:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        return time.perf_counter() - self._t0

    def _loop(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval):
                break
        self._sample()  # the state at the end of the run, however short it was

    def _sample(self) -> None:
        start, cpu_start = time.perf_counter(), time.thread_time()
        row = {"t_s": start - self._t0}
        cpu = self._sources["cpu"]
        pids = {self.pid}
        for source in self._sources.values():
            try:
                values = source.read(pids)
            except Exception as e:  # a source failing mid-run must not stop the others
                if not source.failed:
                    logger.warning(
                        "memory monitor: reading %s failed, recording it as missing from now on: %s", source.name, e
                    )
                source.failed = f"read failed: {e}"
                continue
            if source is cpu:
                pids = cpu.pids
            row.update(values)
        # The sampler's own cost: wall time (includes waiting for the GIL on a busy machine) and CPU time.
        row["sample_ms"] = (time.perf_counter() - start) * 1e3
        row["sample_cpu_ms"] = (time.thread_time() - cpu_start) * 1e3
        self._samples.append(row)

    # -- the run's side ------------------------------------------------------------------
    def progress(self, p: Progress) -> None:
        """A ProgressCallback: records counters for tokens/s and puts `event`s on the timeline."""
        t = self._now()
        self._snapshots.append((t, p))
        if p.event:
            self._events.append({"t_s": t, "event": p.event})
        if p.finished:
            self._events.append({"t_s": t, "event": f"stopped: {p.error}" if p.error else "finished"})

    def attach(self, provider) -> None:
        """Read engine figures from `provider` from now on: for a monitor started before the engine loaded."""
        self.provider = provider
        if self._sources:
            self._sources["engine"] = _EngineSource(provider)

    def mark(self, text: str) -> None:
        """Put an event of your own on the timeline (a phase, a parameter change)."""
        self._events.append({"t_s": self._now(), "event": str(text)})

    # -- reading -------------------------------------------------------------------------
    @property
    def sources(self) -> dict[str, str]:
        """Each source's state: "ok", or why it is absent ("no GPU visible (...)")."""
        return {name: s.state() for name, s in self._sources.items()}

    @property
    def events(self) -> list[dict]:
        """The timeline's marks, oldest first: {"t_s", "event"}."""
        return sorted(list(self._events), key=lambda e: e["t_s"])

    def to_pandas(self):
        """The samples, one row per tick: `t_s`, memory in MB, engine figures, and the run's progress.

        Columns of absent sources are left out (see `sources`). `done` is the chunks finished
        at that time; `output_tokens_per_s` is the trailing-window rate of the next progress
        snapshot (see `progress_frame`; NaN outside a run).
        """
        import pandas as pd

        samples = pd.DataFrame(list(self._samples))
        if samples.empty:
            samples = pd.DataFrame({"t_s": pd.Series(dtype=float)})
        samples = samples.sort_values("t_s", kind="stable").reset_index(drop=True)
        progress = self.progress_frame()
        if not progress.empty:
            progress = progress.sort_values("t_s", kind="stable")
            samples = pd.merge_asof(samples, progress[["t_s", "done", "total"]], on="t_s", direction="backward")
            samples = pd.merge_asof(samples, progress[["t_s", "output_tokens_per_s"]], on="t_s", direction="forward")
        samples.attrs["sources"] = self.sources
        return samples

    def progress_frame(self, window_s: float = RATE_WINDOW_S):
        """The progress snapshots received, with output and input tokens/s over a trailing window.

        Each rate is taken back to the latest earlier snapshot of the same run that lies at least
        `window_s` seconds and at least one in-flight window of finished chunks (`batch_size`,
        at most `total`) behind it, or to the run's start when none does. So a rate never rests on
        the millisecond between two chunks that one engine step finished together.
        """
        import pandas as pd

        rows, previous, points = [], None, _RunPoints()
        for t, p in list(self._snapshots):
            # A new run (a sweep feeds several through one monitor) restarts the counters.
            new_run = previous is None or p.event == "start" or p.elapsed < previous.elapsed or p.done < previous.done
            if new_run:
                points = _RunPoints()
            start = points.window_start(p, window_s)
            span = 0.0 if new_run else p.elapsed - start.elapsed
            if p.finished and previous is not None and p.completion_tokens == previous.completion_tokens:
                span = 0.0  # the closing snapshot adds no work: no rate, rather than a drop
            rate = (p.completion_tokens - start.completion_tokens) / span if span > 0 else math.nan
            in_rate = (p.prompt_tokens - start.prompt_tokens) / span if span > 0 else math.nan
            rows.append(
                {
                    "t_s": t,
                    "done": p.done,
                    "total": p.total,
                    "failed": p.failed,
                    "reused": p.reused,
                    "prompt_tokens": p.prompt_tokens,
                    "completion_tokens": p.completion_tokens,
                    "elapsed_s": p.elapsed,
                    "batch_size": p.batch_size,
                    "retries": p.retries,
                    "output_tokens_per_s": rate,
                    "input_tokens_per_s": in_rate,
                    "event": p.event,
                    "finished": p.finished,
                    "error": p.error,
                }
            )
            points.add(_Point(p.elapsed, p.done - p.reused, p.prompt_tokens, p.completion_tokens))
            previous = p
        columns = ["t_s", "done", "total", "output_tokens_per_s", "input_tokens_per_s"]
        return pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns, dtype=float)

    def peaks(self) -> dict[str, float]:
        """The highest value of each memory column (MB) and of KV-cache use (%), for comparison tables."""
        samples = self.to_pandas()
        skip = ("system_available_mb", "rss_children_mb")
        keep = [
            c
            for c in samples.columns
            if (c.endswith("_mb") and c not in skip and not c.endswith("_total_mb")) or c == "kv_cache_pct"
        ]
        return {c: float(samples[c].max()) for c in keep if samples[c].notna().any()}

    def save(self, folder, *, figure=None) -> dict[str, Path]:
        """Write memory.parquet (memory.csv without pyarrow), memory.json (sources, events, peaks), memory.png.

        Args:
            figure: written as memory.png when given, e.g. `apiana_lab.notebook.plot_monitor(monitor)`.
                The monitor draws nothing itself: the plots depend on it, not it on them.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        samples = self.to_pandas()
        written: dict[str, Path] = {}
        try:
            samples.to_parquet(folder / "memory.parquet", index=False)
            written["series"] = folder / "memory.parquet"
        except ImportError:
            logger.warning(
                "pyarrow is not installed: writing memory.csv instead of memory.parquet (%s)", NOTEBOOKS_EXTRA
            )
            samples.to_csv(folder / "memory.csv", index=False)
            written["series"] = folder / "memory.csv"
        summary = {
            "interval_s": self.interval,
            "samples": len(samples),
            "sources": self.sources,
            "peaks": self.peaks(),
            "events": self.events,
            "mean_sample_ms": float(samples["sample_ms"].mean()) if "sample_ms" in samples else None,
            "mean_sample_cpu_ms": float(samples["sample_cpu_ms"].mean()) if "sample_cpu_ms" in samples else None,
        }
        (folder / "memory.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        written["summary"] = folder / "memory.json"
        if figure is not None:
            figure.savefig(folder / "memory.png", dpi=100)
            written["figure"] = folder / "memory.png"
        return written


class _Point(NamedTuple):
    """Where a run stood at one snapshot: the counters a windowed rate is taken between."""

    elapsed: float
    computed: int  # chunks finished in this run, reused ones left out (they cost nothing)
    prompt_tokens: int
    completion_tokens: int


class _RunPoints:
    """A run's points in order, its start first; both `elapsed` and `computed` only grow within a run."""

    def __init__(self):
        self.points = [_Point(0.0, 0, 0, 0)]  # every run starts from nothing at elapsed 0
        self.elapsed, self.computed = [0.0], [0]

    def add(self, point: _Point) -> None:
        self.points.append(point)
        self.elapsed.append(point.elapsed)
        self.computed.append(point.computed)

    def window_start(self, p: Progress, window_s: float) -> _Point:
        """The latest point at least `window_s` s and one in-flight window of chunks behind `p`, else the start."""
        in_flight = max(1, min(p.batch_size, p.total - p.reused))
        # Both lists are sorted, so the points far enough back on each count are a prefix of each.
        far = min(
            bisect.bisect_right(self.elapsed, p.elapsed - window_s),
            bisect.bisect_right(self.computed, p.done - p.reused - in_flight),
        )
        return self.points[max(far - 1, 0)]


class _Source:
    """One place figures come from; `reason` is why it is absent (None when it reads)."""

    name = "source"
    retry = False  # probe again at every tick while absent (torch may be imported later)

    def __init__(self):
        self.reason: str | None = None
        self.failed: str | None = None

    @classmethod
    def off(cls, name: str, reason: str) -> _Source:
        source = cls()
        source.name, source.reason = name, reason
        return source

    def state(self) -> str:
        return self.reason or self.failed or "ok"

    def read(self, pids: set[int]) -> dict:
        if self.reason and self.retry:
            self.probe()
        if self.reason or self.failed:
            return {}
        return self.values(pids)

    def probe(self) -> None:
        """Set `reason` when the source cannot be read."""

    def values(self, pids: set[int]) -> dict:
        return {}

    def close(self) -> None:
        """Release what probing acquired."""


class _CpuSource(_Source):
    name = "cpu"
    # Finding children scans every process in /proc (ms per call); the tree rarely changes
    # during a run, so it is looked up again only this often, or when a child exits.
    tree_every = 5.0

    def __init__(self, pid: int):
        super().__init__()
        self.pids = {pid}
        self.children: list = []
        self.tree_at = -math.inf
        try:
            import psutil
        except ImportError:
            self.reason = f"psutil not installed ({NOTEBOOKS_EXTRA})"
            return
        self.psutil = psutil
        self.process = psutil.Process(pid)

    def values(self, pids: set[int]) -> dict:
        psutil = self.psutil
        now = time.monotonic()
        if now - self.tree_at >= self.tree_every:
            self.children, self.tree_at = self.process.children(recursive=True), now
        own, children, alive = self.process.memory_info().rss, 0, []
        for child in self.children:
            try:
                children += child.memory_info().rss
                alive.append(child)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                self.tree_at = -math.inf  # a child exited: look the tree up again next time
        self.children = alive
        self.pids = {self.process.pid, *(c.pid for c in alive)}  # the GPU source reads the same tree
        return {
            "rss_mb": (own + children) / MB,
            "rss_children_mb": children / MB,
            "system_available_mb": psutil.virtual_memory().available / MB,
        }


class _NvmlSource(_Source):
    name = "gpu"

    def __init__(self):
        super().__init__()
        self.devices: list[tuple[int, object, object]] = []  # (NVML index, handle, memory-info version)
        self.note = ""
        try:
            import pynvml
        except ImportError:
            self.reason = f"no GPU readings: nvidia-ml-py not installed ({NOTEBOOKS_EXTRA})"
            return
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            self.reason = "no GPU visible (no NVIDIA driver: the NVML library was not found)"
            return
        except pynvml.NVMLError as e:
            self.reason = f"no GPU visible (NVML could not start: {e})"
            return
        visible = _cuda_visible_devices()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            if visible is not None and str(i) not in visible and _uuid(pynvml, handle) not in visible:
                continue
            self.devices.append((i, handle, self._memory_version(handle)))
        if not self.devices:
            pynvml.nvmlShutdown()
            where = f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})" if visible is not None else ""
            self.reason = f"no GPU visible: NVML lists no device{where}"

    def _memory_version(self, handle):
        # The v2 call reports "used" without the driver's reserved memory; older drivers lack it.
        try:
            self.nvml.nvmlDeviceGetMemoryInfo(handle, version=self.nvml.nvmlMemory_v2)
            return self.nvml.nvmlMemory_v2
        except (self.nvml.NVMLError, AttributeError):
            return None

    def state(self) -> str:
        state = super().state()
        return f"{state} ({self.note})" if state == "ok" and self.note else state

    def values(self, pids: set[int]) -> dict:
        nvml, row = self.nvml, {}
        process_bytes, unknown = 0, False
        listed: set[int] = set()  # every PID NVML reports, ours or not
        counted: set[tuple[int, int]] = set()  # (device, pid): a process in both lists counts once per device
        for i, handle, version in self.devices:
            memory = (
                nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
                if version
                else nvml.nvmlDeviceGetMemoryInfo(handle)
            )
            row[f"gpu{i}_used_mb"] = memory.used / MB
            row[f"gpu{i}_total_mb"] = memory.total / MB
            try:
                row[f"gpu{i}_util_pct"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:  # not supported on MIG slices and some boards
                row[f"gpu{i}_util_pct"] = math.nan
            for lister in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    processes = lister(handle)
                except nvml.NVMLError:
                    continue
                for p in processes:
                    listed.add(p.pid)
                    if p.pid not in pids or (i, p.pid) in counted:
                        continue
                    counted.add((i, p.pid))
                    if p.usedGpuMemory is None:
                        unknown = True
                    else:
                        process_bytes += p.usedGpuMemory
        if unknown:
            self.note = "per-process memory not reported by the driver"
            row["gpu_process_mb"] = math.nan
        elif listed and not counted and not any(_pid_exists(pid) for pid in listed):
            # In a container NVML reports host PIDs, which never match ours: unknown, not zero.
            self.note = "per-process memory unknown: NVML reports PIDs of another PID namespace"
            row["gpu_process_mb"] = math.nan
        else:
            row["gpu_process_mb"] = process_bytes / MB
        return row

    def close(self) -> None:
        if self.devices:
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError:
                pass
            self.devices = []


class _TorchCudaSource(_Source):
    name = "torch.cuda"
    retry = True

    def __init__(self):
        super().__init__()
        self.probe()

    def probe(self) -> None:
        torch = sys.modules.get("torch")
        # A backend may be importing torch in another thread right now: a module still initializing
        # counts as not imported yet, and the next tick looks again.
        if (
            torch is None
            or getattr(getattr(torch, "__spec__", None), "_initializing", False)
            or not hasattr(torch, "cuda")
        ):
            self.reason = "torch not imported in this process (vLLM's memory is in its engine process: see gpu)"
            return
        self.retry = False  # once torch is in, the answer no longer changes
        if not torch.cuda.is_available():
            self.reason = "no CUDA device visible to torch"
            return
        self.torch, self.reason = torch, None

    def values(self, pids: set[int]) -> dict:
        cuda = self.torch.cuda
        if not cuda.is_initialized():  # nothing allocated yet; reading must not create a context
            return {"torch_allocated_mb": 0.0, "torch_reserved_mb": 0.0, "torch_peak_mb": 0.0}
        devices = range(cuda.device_count())
        return {
            "torch_allocated_mb": sum(cuda.memory_allocated(d) for d in devices) / MB,
            "torch_reserved_mb": sum(cuda.memory_reserved(d) for d in devices) / MB,
            "torch_peak_mb": sum(cuda.max_memory_allocated(d) for d in devices) / MB,
        }


class _EngineSource(_Source):
    name = "engine"
    retry = True  # the provider may start reporting later (an engine started after the monitor)

    def __init__(self, provider):
        super().__init__()
        self.provider = provider
        self.first: dict | None = None
        self.probe()

    def probe(self) -> None:
        if self.provider is None:
            self.reason, self.retry = "no provider given to the monitor", False
            return
        metrics = self.provider.engine_metrics()
        if not metrics:
            self.reason = f"{type(self.provider).__name__} reports no engine metrics (vLLM: start it with stats=True)"
            return
        self.reason, self.first = None, metrics

    def values(self, pids: set[int]) -> dict:
        metrics, self.first = (self.first if self.first is not None else self.provider.engine_metrics()), None
        row = {}
        for key, value in metrics.items():
            column, scale = ENGINE_COLUMNS.get(key, (f"engine_{key}", 1.0))
            row[column] = float(value) * scale
        return row


def _cuda_visible_devices() -> set[str] | None:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}


def _uuid(nvml, handle) -> str:
    try:
        uuid = nvml.nvmlDeviceGetUUID(handle)
        return uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    except nvml.NVMLError:
        return ""


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
