"""The memory monitor, for real: this process's memory, NVML's absence on this GPU-less machine, the timeline."""

import json
import os
import subprocess
import sys
import threading
import time
import types

import pytest

from apiana_lab.chunking import Chunk
from apiana_lab.monitor import MemoryMonitor
from apiana_lab.progress import Progress
from apiana_lab.providers.fake import FakeProvider
from apiana_lab.summarize import ParallelSummarizerTransform


def snapshot(done, total=10, tokens=0, elapsed=0.0, **kw):
    return Progress(
        done=done,
        total=total,
        prompt_tokens=tokens * 5,
        completion_tokens=tokens,
        elapsed=elapsed,
        batch_size=kw.pop("batch_size", 4),
        **kw,
    )


def test_cpu_rss_series_rises_when_the_process_allocates():
    with MemoryMonitor(interval=0.05) as monitor:
        time.sleep(0.3)
        before = monitor.to_pandas()["rss_mb"].median()
        block = bytearray(400 * 10**6)
        block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # touch every page: zero pages are not resident
        time.sleep(0.4)
        during = monitor.to_pandas()["rss_mb"].max()
        del block
        time.sleep(0.2)
    samples = monitor.to_pandas()
    assert monitor.sources["cpu"] == "ok"
    assert during - before > 350, (before, during)
    assert samples["rss_mb"].iloc[-1] < during - 300  # freed memory shows too
    assert samples["t_s"].is_monotonic_increasing and len(samples) >= 10
    assert (samples["system_available_mb"] > 0).all() and (samples["sample_ms"] > 0).all()


def test_child_processes_count_in_the_process_tree_memory():
    """vLLM's engine core is a child process: its memory must show in rss_mb."""
    code = "b = bytearray(300 * 10**6); b[::4096] = b'\\x01' * len(range(0, len(b), 4096)); import time; time.sleep(30)"
    monitor = MemoryMonitor(interval=0.05)
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        with monitor:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.2)
                samples = monitor.to_pandas()
                if samples["rss_children_mb"].max() > 250:
                    break
    finally:
        child.kill()
        child.wait()
    assert samples["rss_children_mb"].max() > 250
    assert (samples["rss_mb"] >= samples["rss_children_mb"]).all()


def test_without_a_gpu_the_nvml_source_reports_itself_absent():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("a GPU is visible here; this test is for machines without one")
    with MemoryMonitor(interval=0.05) as monitor:
        time.sleep(0.15)
    samples = monitor.to_pandas()
    assert monitor.sources["gpu"].startswith("no GPU visible")
    assert not [c for c in samples.columns if c.startswith("gpu")]  # absent, not zeros
    assert samples.attrs["sources"]["gpu"] == monitor.sources["gpu"]


def test_torch_cuda_is_read_only_when_torch_is_already_imported():
    # In a fresh interpreter: the monitor must not import torch (seconds) just to find it absent.
    code = (
        "import sys, time\n"
        "from apiana_lab.monitor import MemoryMonitor\n"
        "with MemoryMonitor(interval=0.05) as m: time.sleep(0.1)\n"
        "print('torch' in sys.modules, m.sources['torch.cuda'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    imported, reason = out.strip().split(" ", 1)
    assert imported == "False" and reason.startswith("torch not imported")

    import torch

    with MemoryMonitor(interval=0.05) as monitor:
        time.sleep(0.1)
    if torch.cuda.is_available():
        assert monitor.sources["torch.cuda"] == "ok" and "torch_allocated_mb" in monitor.to_pandas()
    else:
        assert monitor.sources["torch.cuda"] == "no CUDA device visible to torch"
        assert not [c for c in monitor.to_pandas().columns if c.startswith("torch")]


def test_importing_the_monitor_and_the_notebook_module_stays_cheap():
    code = (
        "import sys, apiana_lab.monitor, apiana_lab.notebook\n"
        "print(sorted(m for m in ('torch', 'matplotlib', 'ipywidgets', 'IPython', 'pandas', 'pynvml', 'vllm')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]"


def test_events_and_output_tokens_per_s_land_on_the_timeline():
    monitor = MemoryMonitor(interval=0.02)

    def run(first_elapsed):
        # Snapshots come from worker threads in a real run.
        monitor.progress(snapshot(0, event="start", elapsed=0.0))
        for i in range(1, 5):
            time.sleep(0.03)
            monitor.progress(snapshot(2 * i, tokens=100 * i, elapsed=first_elapsed * i))
        monitor.progress(
            snapshot(
                8,
                tokens=400,
                elapsed=first_elapsed * 4,
                batch_size=2,
                event="batch size 4 -> 2 (out of memory at batch size 4)",
            )
        )
        monitor.progress(snapshot(10, tokens=500, elapsed=first_elapsed * 5, batch_size=2, finished=True))

    with monitor:
        worker = threading.Thread(target=run, args=(0.5,))
        worker.start()
        worker.join()
        monitor.mark("second run")
        worker = threading.Thread(target=run, args=(0.25,))
        worker.start()
        worker.join()
        time.sleep(0.05)
    events = [e["event"] for e in monitor.events]
    assert events == [
        "start",
        "batch size 4 -> 2 (out of memory at batch size 4)",
        "finished",
        "second run",
        "start",
        "batch size 4 -> 2 (out of memory at batch size 4)",
        "finished",
    ]
    times = [e["t_s"] for e in monitor.events]
    assert times == sorted(times) and times[0] > 0
    rates = monitor.progress_frame()
    first, second = rates.iloc[:7], rates.iloc[7:]
    # 100 new tokens per 0.5 s, then per 0.25 s; each run restarts the counters (no negative rate).
    assert first["output_tokens_per_s"].isna().iloc[0] and second["output_tokens_per_s"].isna().iloc[0]
    assert first["output_tokens_per_s"].iloc[1:5].tolist() == pytest.approx([200.0] * 4)
    assert second["output_tokens_per_s"].iloc[1:5].tolist() == pytest.approx([400.0] * 4)
    assert rates["input_tokens_per_s"].iloc[1] == pytest.approx(1000.0)
    samples = monitor.to_pandas()
    inside = samples[(samples["t_s"] > times[0]) & (samples["t_s"] < times[1])]
    assert inside["output_tokens_per_s"].dropna().eq(200.0).all() and inside["done"].max() <= 8


def _rates_of(snapshots):
    monitor = MemoryMonitor()
    for p in snapshots:
        monitor.progress(p)
    return monitor.progress_frame()


@pytest.mark.parametrize("in_flight", [64, 4])
def test_throughput_never_rests_on_chunks_one_step_finished_together(in_flight):
    """vLLM finishes many chunks in one step: their snapshots land within a millisecond of each other.

    Dividing by that millisecond drew 2x10^7 tokens/s and flattened the whole panel; the series
    must stay near the run's overall rate, whether the burst is the whole in-flight window (64) or
    a small window finishing together every second (4).
    """
    snaps, done, tokens = [snapshot(0, total=64, event="start", batch_size=in_flight)], 0, 0
    t = 0.0
    while done < 64:
        t += 1.0 if in_flight == 4 else 6.0  # a step's worth of decoding, then the chunks it finished
        for k in range(min(in_flight, 64 - done)):
            done, tokens = done + 1, tokens + 30
            snaps.append(snapshot(done, total=64, tokens=tokens, elapsed=t + k * 1e-5, batch_size=in_flight))
    snaps.append(snapshot(done, total=64, tokens=tokens, elapsed=t + 0.01, batch_size=in_flight, finished=True))
    rates = _rates_of(snaps)["output_tokens_per_s"]
    overall = tokens / (t + 0.01)
    # The old per-snapshot rate on the same data: 30 tokens over 10 microseconds.
    per_step = max(
        (b.completion_tokens - a.completion_tokens) / (b.elapsed - a.elapsed)
        for a, b in zip(snaps[1:], snaps[2:])
        if b.elapsed > a.elapsed
    )
    assert per_step > 1e6
    assert rates.notna().sum() >= 60 and 0 < rates.max() <= 2 * overall, (rates.max(), overall)


def test_throughput_window_still_follows_a_real_slowdown():
    """One chunk at a time, 100 tokens/s for 20 s then 25 tokens/s: the window is short enough to show it."""
    snaps, t, tokens = [snapshot(0, total=40, event="start", batch_size=1)], 0.0, 0
    for i in range(1, 41):
        t += 1.0 if i <= 20 else 4.0
        tokens += 100
        snaps.append(snapshot(i, total=40, tokens=tokens, elapsed=t, batch_size=1))
    rates = _rates_of(snaps)["output_tokens_per_s"]
    assert rates.iloc[1:21].tolist() == pytest.approx([100.0] * 20)
    assert rates.iloc[-10:].tolist() == pytest.approx([25.0] * 10)


def test_a_real_transform_feeds_the_monitor_its_batch_size_changes():
    chunks = [
        Chunk(
            id=f"k{i}",
            conversation_id="c",
            title="T",
            date=None,
            index=i,
            first_message=i,
            last_message=i,
            token_count=5,
            text=f"chunk {i} " + "word " * (i % 5),
        )
        for i in range(24)
    ]
    provider = FakeProvider(latency=0.01, oom_above=4)
    transform = ParallelSummarizerTransform(provider, max_workers=1, batch_size=8, grow_after=100, sleep=lambda s: None)
    with MemoryMonitor(provider, interval=0.02) as monitor:
        records = [r for _, r in transform.run(chunks, progress=monitor.progress)]
    rates = monitor.progress_frame()
    assert len(records) == 24 and rates["done"].iloc[-1] == 24
    assert {8, 4} <= set(rates["batch_size"])
    assert rates["output_tokens_per_s"].dropna().gt(0).any()
    assert monitor.sources["engine"].startswith("FakeProvider reports no engine metrics")


def test_one_monitor_watches_several_runs_on_one_timeline():
    monitor = MemoryMonitor(interval=0.02)
    with monitor:
        time.sleep(0.1)
    first = len(monitor.to_pandas())
    time.sleep(0.2)  # between runs: no samples
    with monitor:
        time.sleep(0.1)
    monitor.close()
    samples = monitor.to_pandas()
    assert first >= 2 and len(samples) >= first + 2 and not monitor.running
    gap = samples["t_s"].diff().max()
    assert samples["t_s"].is_monotonic_increasing and gap >= 0.2  # one clock across both runs


def test_absent_engine_source_says_why():
    with MemoryMonitor(interval=0.05) as monitor:
        pass
    assert monitor.sources["engine"] == "no provider given to the monitor"
    assert "kv_cache_pct" not in monitor.to_pandas()


def test_save_writes_the_series_the_figure_and_the_events(tmp_path, monkeypatch):
    import pandas as pd

    from apiana_lab.notebook import plot_monitor

    with MemoryMonitor(interval=0.02) as monitor:
        monitor.progress(snapshot(0, event="start"))
        time.sleep(0.1)
        monitor.progress(snapshot(10, tokens=50, elapsed=0.1, finished=True, error="cancelled"))
    written = monitor.save(tmp_path / "run", figure=plot_monitor(monitor))
    assert written["series"].name == "memory.parquet"
    saved = pd.read_parquet(written["series"])
    assert saved["rss_mb"].tolist() == monitor.to_pandas()["rss_mb"].tolist()
    assert written["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(written["summary"].read_text())
    assert [e["event"] for e in summary["events"]] == ["start", "stopped: cancelled"]
    assert summary["sources"] == monitor.sources and summary["peaks"]["rss_mb"] > 0

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    written = monitor.save(tmp_path / "csv")
    assert written["series"].name == "memory.csv" and not (tmp_path / "csv" / "memory.parquet").exists()
    assert "figure" not in written and not (tmp_path / "csv" / "memory.png").exists()  # no figure given
    assert pd.read_csv(written["series"])["rss_mb"].tolist() == pytest.approx(saved["rss_mb"].tolist())


def test_a_bad_interval_is_refused():
    with pytest.raises(ValueError, match="interval"):
        MemoryMonitor(interval=0)


class _StandInNVML(types.ModuleType):
    """Just enough of pynvml's surface to drive the monitor's NVML reading without a GPU.

    This checks our arithmetic (v2 fallback, per-process sums over the tree, duplicates,
    unknown values), not NVML itself: the real library is untested here for want of a GPU.
    """

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    nvmlMemory_v2 = 0x02000028

    def __init__(self, processes, utilization_fails=(), old_driver=()):
        super().__init__("pynvml")
        self.processes = processes  # device -> [(pid, bytes or None)]
        self.utilization_fails = utilization_fails
        self.old_driver = old_driver
        self.shutdown = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{handle}"

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        if version and handle in self.old_driver:
            raise self.NVMLError("Function Not Found")
        used = (3 if version else 4) * 10**9  # v2 leaves out the driver's reservation
        return types.SimpleNamespace(used=used + handle * 10**9, total=80 * 10**9)

    def nvmlDeviceGetUtilizationRates(self, handle):
        if handle in self.utilization_fails:
            raise self.NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=50 + handle)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in self.processes.get(handle, [])]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return self.nvmlDeviceGetComputeRunningProcesses(handle)  # the same process may be in both lists


def test_nvml_figures_are_summed_over_this_process_tree(monkeypatch):
    from apiana_lab.monitor import _NvmlSource

    me, child, stranger = os.getpid(), 4_000_001, 1
    nvml = _StandInNVML(
        {0: [(me, 2 * 10**9), (stranger, 7 * 10**9)], 1: [(child, 5 * 10**9)]}, utilization_fails=(1,), old_driver=(1,)
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    source = _NvmlSource()
    row = source.read({me, child})
    assert source.state() == "ok"
    assert row["gpu0_used_mb"] == 3000 and row["gpu1_used_mb"] == 5000  # v2 on device 0, v1 fallback on device 1
    assert row["gpu0_total_mb"] == 80000 and row["gpu0_util_pct"] == 50 and row["gpu1_util_pct"] != row["gpu1_util_pct"]
    assert row["gpu_process_mb"] == 7000  # ours and our child's, each counted once though listed twice
    source.close()
    assert nvml.shutdown

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1")
    assert [c for c in _NvmlSource().read({me}) if c.endswith("_used_mb")] == ["gpu1_used_mb"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _NvmlSource().reason.startswith("no GPU visible: NVML lists no device (CUDA_VISIBLE_DEVICES=''")


def test_nvml_process_memory_is_unknown_not_zero_when_it_cannot_be_attributed(monkeypatch):
    from apiana_lab.monitor import _NvmlSource

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", _StandInNVML({0: [(os.getpid(), None)]}))
    source = _NvmlSource()
    row = source.read({os.getpid()})
    assert row["gpu_process_mb"] != row["gpu_process_mb"] and "not reported" in source.state()

    # A container sees host PIDs in NVML's lists: none of them exist here.
    monkeypatch.setitem(sys.modules, "pynvml", _StandInNVML({0: [(4_000_003, 10**9)]}))
    source = _NvmlSource()
    row = source.read({os.getpid()})
    assert row["gpu_process_mb"] != row["gpu_process_mb"] and "another PID namespace" in source.state()

    monkeypatch.setitem(sys.modules, "pynvml", _StandInNVML({}))
    assert _NvmlSource().read({os.getpid()})["gpu_process_mb"] == 0.0  # nothing on the GPU yet: a true zero


def test_torch_being_imported_in_another_thread_is_not_read_yet(monkeypatch):
    """A backend importing torch while the monitor samples: the half-made module is skipped, not read."""
    import importlib.machinery
    import types

    from apiana_lab.monitor import _TorchCudaSource

    half = types.ModuleType("torch")  # what sys.modules holds mid-import: no `cuda` yet
    half.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    half.__spec__._initializing = True
    monkeypatch.setitem(sys.modules, "torch", half)
    source = _TorchCudaSource()
    assert source.retry and source.reason.startswith("torch not imported")  # looks again at the next tick
    half.__spec__._initializing = False
    half.cuda = types.SimpleNamespace(is_available=lambda: False)
    source.probe()
    assert not source.retry and source.reason == "no CUDA device visible to torch"
