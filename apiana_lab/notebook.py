"""Jupyter faces of a run: the progress widget, the live memory figure and the runner that shows both.

One cell runs a job and shows everything:

    monitor = MemoryMonitor(provider)
    report = run_live(lambda progress, cancel: run_export(config, provider=provider, progress=progress, cancel=cancel),
                      monitor=monitor, results_dir=run_dir)

ipywidgets, matplotlib and IPython are imported only when something here is used; the core
never imports this module.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import sys
import threading
import time
from typing import Callable

from .engine_log import EngineLog
from .errors import MissingDependencyError
from .monitor import NOTEBOOKS_EXTRA, RATE_WINDOW_S, MemoryMonitor
from .progress import Progress, ProgressCallback, TerminalProgress, fan_out

logger = logging.getLogger(__name__)

Job = Callable[[ProgressCallback, threading.Event], object]


def in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (tqdm.autonotebook's test), without importing IPython."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


def describe(p: Progress) -> str:
    """One line of figures for a snapshot: done/total, reused, failed, tokens/s, ETA, batch size, retries."""
    parts = [f"{p.done}/{p.total} chunks"]
    if p.reused:
        parts.append(f"{p.reused} reused")
    parts.append(f"{p.failed} failed")
    parts.append(f"{p.flagged_share:.0%} flagged")
    parts.append(f"{p.prompt_tokens_per_s:,.0f} in tok/s")
    parts.append(f"{p.completion_tokens_per_s:,.1f} out tok/s")
    if p.finished:
        parts.append(f"{_duration(p.elapsed)} elapsed")
    else:
        parts.append(f"ETA {_duration(p.eta)}")
    parts.append(f"batch {p.batch_size}")
    parts.append(f"retries {p.retries}")
    return " · ".join(parts)


def summary_line(p: Progress, desc: str = "summarizing") -> str:
    """The plain-text outcome of a finished run, for saved notebooks where widgets cannot render."""
    if p.error:
        outcome = f"stopped early: {p.error}"
    elif p.failed:
        outcome = f"finished with {p.failed} failed chunk(s); rerun to retry them"
    else:
        outcome = "finished"
    return f"{desc}: {outcome} ({describe(p)})"


class WidgetProgress:
    """An ipywidgets bar and a line of figures, fed `Progress` snapshots from any thread.

    Snapshots set widget traits directly (thread-safe in ipykernel), at most one update per
    `min_interval` seconds; the first snapshot, those carrying an `event` and the finished one
    are always applied. At the end the bar's style says the outcome: `success` when the run
    ended with no failure, `warning` when it ended with failed chunks (a rerun retries them),
    `danger` when it stopped early (`error` set). A plain-text summary line is displayed too,
    so a saved notebook shows the outcome where widget state cannot render; it is displayed at
    once when the last snapshot comes from the main thread, otherwise by `flush()` or `close()`
    on the main thread (`run_live` does this).
    """

    def __init__(self, desc: str = "summarizing", *, min_interval: float = 0.1, display: bool = True):
        try:
            import ipywidgets
        except ImportError as e:
            raise MissingDependencyError("ipywidgets", "notebooks") from e
        self.desc = desc
        self.min_interval = min_interval
        self.bar = ipywidgets.IntProgress(value=0, min=0, max=1, description=desc, bar_style="info",
                                          style={"description_width": "initial"})
        self.label = ipywidgets.Label(value="waiting for the first snapshot")
        self.box = ipywidgets.HBox([self.bar, self.label], layout=ipywidgets.Layout(flex_flow="row wrap"))
        self.summary: str | None = None  # the final line, once the run has ended
        self.last: Progress | None = None  # the newest snapshot received
        self._display = display
        self._lock = threading.Lock()
        self._applied_at = -math.inf
        self._pending: Progress | None = None
        self._final: Progress | None = None
        self._summary_shown = False
        if display:
            from IPython.display import display as show

            show(self.box)

    def __call__(self, p: Progress) -> None:
        with self._lock:
            if self._final is not None:
                return  # a straggler from a worker must not undo the final state
            self.last = p
            now = time.monotonic()
            if p.finished or p.event or now - self._applied_at >= self.min_interval:
                self._apply(p, now)
            else:
                self._pending = p
        if p.finished and threading.current_thread() is threading.main_thread():
            self._show_summary()

    def _apply(self, p: Progress, now: float) -> None:
        self._pending = None
        self._applied_at = now
        total = max(p.total, 1)
        # Set max before value: ipywidgets clamps value to the current max.
        self.bar.max = total
        self.bar.value = min(p.done, total) if p.total else (total if p.finished else 0)
        if p.finished:
            self._final = p
            self.summary = summary_line(p, self.desc)
            self.bar.bar_style = "danger" if p.error else "warning" if p.failed else "success"
            self.label.value = self.summary
        else:
            self.label.value = describe(p)

    def finish(self, error: str = "", *, override: bool = False) -> None:
        """End the bar from the newest snapshot, for a job that stopped without sending a finished one.

        An error overrides a finished state that had none: a job can fail after its transform
        ended well (writing the results, say), and the bar must not stay green then. With
        `override`, it replaces the job's own reason too (■ was pressed: that is why it stopped).
        """
        with self._lock:
            if self._final is not None and (not error or (self._final.error and not override)):
                return
            self._final, self._summary_shown = None, False
            last = self.last or Progress(0, 0, 0, 0, 0, 0, 0.0, 0, 0)
            self._apply(dataclasses.replace(last, finished=True, error=error, event=""), time.monotonic())

    def flush(self) -> None:
        """Apply a snapshot held back by the rate limit; on the main thread, show the summary line if due."""
        with self._lock:
            if self._pending is not None and self._final is None:
                self._apply(self._pending, time.monotonic())
        if threading.current_thread() is threading.main_thread():
            self._show_summary()

    def close(self) -> None:
        """Flush, and leave the summary line in the output (call it on the main thread)."""
        self.flush()

    def _show_summary(self) -> None:
        if self.summary is None or self._summary_shown:
            return
        self._summary_shown = True
        if self._display:
            from IPython.display import display as show

            show({"text/plain": self.summary}, raw=True)


def auto_progress(desc: str = "summarizing") -> ProgressCallback:
    """The widget inside a Jupyter kernel, the tqdm bar in a terminal (or without ipywidgets)."""
    if in_kernel():
        try:
            return WidgetProgress(desc)
        except MissingDependencyError:
            logger.warning("ipywidgets is not installed, so progress is shown as text: %s", NOTEBOOKS_EXTRA)
    return TerminalProgress(desc)


# -- the live figure ----------------------------------------------------------------------
_MEMORY_LINES = [  # (column, label, style)
    ("rss_mb", "CPU: RSS of this process + children", "-"),
    ("gpu_process_mb", "GPU: this process + children", "-"),
    ("torch_allocated_mb", "torch.cuda allocated", "-"),
    ("torch_reserved_mb", "torch.cuda reserved", "--"),
]
_SOURCE_TITLES = {"cpu": "CPU", "gpu": "GPU (NVML)", "torch.cuda": "torch.cuda", "engine": "engine metrics"}


def plot_monitor(monitor: MemoryMonitor, title: str = ""):
    """A matplotlib Figure of a monitor's series: memory per source, KV-cache use, output tokens/s, events.

    Built on its own Agg canvas, outside pyplot, so it is never shown twice and is safe to
    draw while other threads run.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    samples, rates, events, sources = monitor.to_pandas(), monitor.progress_frame(), monitor.events, monitor.sources
    fig = Figure(figsize=(10, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_mem, ax_kv, ax_tok = fig.subplots(3, 1, sharex=True)
    fig.suptitle(title or "Memory, KV cache and throughput during the run")

    # Memory: every source that reads, in one unit so lines compare.
    lines = [(c, label, style) for c, label, style in _MEMORY_LINES if c in samples]
    for c in sorted(samples.columns):
        if c.startswith("gpu") and c.endswith("_used_mb"):
            lines.append((c, f"GPU {c[3:-8]}: used, all processes", "-"))
        elif c.startswith("gpu") and c.endswith("_total_mb"):
            lines.append((c, f"GPU {c[3:-9]}: total", ":"))
    peak = max((samples[c].max() for c, _, _ in lines if samples[c].notna().any()), default=0.0)
    unit, scale = ("GB", 1e3) if peak >= 2000 else ("MB", 1.0)
    for c, label, style in lines:
        ax_mem.plot(samples["t_s"], samples[c] / scale, style, label=label)
    ax_mem.set_ylabel(f"memory ({unit})")
    title_mem = "Memory per source"
    if "system_available_mb" in samples and samples["system_available_mb"].notna().any():
        # Drawn as a line it would flatten everything else; its low point is the headroom that matters.
        title_mem += f" (system memory available, lowest: {samples['system_available_mb'].min() / 1e3:.1f} GB)"
    absent = [f"{_SOURCE_TITLES.get(n, n)}: {why.split(' (')[0]}" for n, why in sources.items() if n != "engine" and not why.startswith("ok")]
    if absent:
        title_mem += "\nabsent: " + "; ".join(absent)
    ax_mem.set_title(title_mem, loc="left", fontsize="small")
    if lines:
        ax_mem.legend(loc="best", fontsize="x-small")
    ax_mem.set_ylim(0, peak / scale * 1.12 if peak > 0 else 1.0)  # headroom, so a flat line is not hidden by the frame

    # Engine: KV-cache use and the scheduler's queue.
    ax_kv.set_ylabel("KV cache used (%)")
    ax_kv.set_title("Engine", loc="left", fontsize="small")
    if "kv_cache_pct" in samples:
        ax_kv.plot(samples["t_s"], samples["kv_cache_pct"], color="tab:purple", label="KV cache used")
        ax_kv.set_ylim(0, max(5.0, float(samples["kv_cache_pct"].max()) * 1.15))
        queue = [c for c in ("requests_running", "requests_waiting") if c in samples]
        if queue:
            twin = ax_kv.twinx()
            for c, color in zip(queue, ("tab:green", "tab:orange")):
                twin.step(samples["t_s"], samples[c], where="post", color=color, lw=0.9, label=c.replace("_", " "))
            twin.set_ylabel("requests")
            twin.legend(loc="upper right", fontsize="x-small")
        ax_kv.legend(loc="upper left", fontsize="x-small")
    else:
        ax_kv.set_ylim(0, 100)
        ax_kv.text(0.5, 0.5, f"no engine metrics: {sources.get('engine', 'monitor not started')}",
                   transform=ax_kv.transAxes, ha="center", va="center", fontsize="small", color="dimgray")

    # Throughput: at each snapshot, the rate over the trailing window that ends there (progress_frame
    # says why a window and not one step), drawn back over the step before it.
    ax_tok.set_ylabel("output tokens/s")
    ax_tok.set_xlabel("time since the monitor started (s)")
    ax_tok.set_title(f"Throughput (over trailing windows of at least {RATE_WINDOW_S:g} s and one in-flight batch)",
                     loc="left", fontsize="small")
    if not rates.empty and rates["output_tokens_per_s"].notna().any():
        ax_tok.step(rates["t_s"], rates["output_tokens_per_s"], where="pre", color="tab:blue", label="output tokens/s")
        ax_tok.set_ylim(0, float(rates["output_tokens_per_s"].max()) * 1.15 or 1.0)
    else:
        ax_tok.text(0.5, 0.5, "no progress snapshots with new tokens yet", transform=ax_tok.transAxes,
                    ha="center", va="center", fontsize="small", color="dimgray")

    # Events: a marker on every panel, the label once at the top. Events within 2% of the time
    # span of each other share one label ("end · finished"), which would otherwise overprint.
    label_at = blended_transform_factory(ax_mem.transData, ax_mem.transAxes)
    span = max([e["t_s"] for e in events] + [float(samples["t_s"].max()) if not samples.empty else 0.0, 1.0])
    labels: list[list] = []  # [t, [names]]
    for e in events:
        for ax in (ax_mem, ax_kv, ax_tok):
            ax.axvline(e["t_s"], color="gray", ls="--", lw=0.8)
        if labels and e["t_s"] - labels[-1][0] < 0.02 * span:
            labels[-1][1].append(e["event"])
        else:
            labels.append([e["t_s"], [e["event"]]])
    for t, names in labels[:20]:  # beyond that the labels only overlap; the full list is in memory.json
        text = " · ".join(dict.fromkeys(names))
        text = text if len(text) <= 40 else text[:39] + "…"
        ax_mem.text(t, 0.98, " " + text, transform=label_at, rotation=90, va="top", ha="right",
                    fontsize="x-small", color="dimgray")
    return fig


def figure_png(fig, dpi: int = 90) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class LiveFigure:
    """A monitor's figure, displayed once and redrawn in place by `update()` (call it from the main thread)."""

    def __init__(self, monitor: MemoryMonitor, title: str = ""):
        from IPython.display import Image, display

        self.monitor = monitor
        self.title = title
        self._image = Image
        # The fastprogress way: one display with an id, then updates to it; the executed
        # notebook keeps whatever the last update drew.
        self.handle = display(self._render(), display_id=True)

    def _render(self):
        return self._image(data=figure_png(plot_monitor(self.monitor, self.title)), format="png")

    def update(self) -> None:
        """Redraw from the monitor's series so far."""
        self.handle.update(self._render())


# -- the runner ---------------------------------------------------------------------------
def run_live(
    job: Job,
    *,
    monitor: MemoryMonitor | None = None,
    progress: ProgressCallback | None = None,
    redraw_every: float = 1.0,
    results_dir=None,
    title: str = "",
):
    """Run `job(progress, cancel)` in a worker thread while this cell shows its progress and memory.

    The cell blocks until the job ends (papermill keeps only output produced while a cell
    runs), redrawing the live figure every `redraw_every` seconds on the main thread (less
    often when a frame takes long to draw, so drawing stays under about 20% of the time),
    and draws the final frame there. With `results_dir`, the monitor's series and figure are
    saved into it. Returns what the job returns; re-raises its exception after the final
    frame. On a kernel interrupt, sets `cancel`, waits for the job to stop (it keeps what
    it finished), then re-raises; a second interrupt stops waiting.

    Args:
        job: called as job(progress_callback, cancel_event), e.g. a lambda around run_export.
        monitor: started here if not running (and then stopped here); default: CPU and GPU only.
        progress: default: `auto_progress()`.
    """
    progress = progress if progress is not None else auto_progress()
    monitor = monitor if monitor is not None else MemoryMonitor()
    started_here = not monitor.running
    cancel = threading.Event()
    # The worker says it has stopped through an Event, never through Thread.join/is_alive: on
    # CPython before 3.13 a KeyboardInterrupt landing inside join() releases the thread's state
    # lock, and is_alive() is False from then on while the job still runs (threading's
    # bpo-45274 handling). Waiting on that is how an interrupted cell once ended mid-job.
    stopped = threading.Event()
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["result"] = job(fan_out(progress, monitor.progress), cancel)
        except BaseException as e:  # handed to the main thread, which re-raises it
            outcome["error"] = e
        finally:
            stopped.set()

    worker = threading.Thread(target=work, name="run-live-job", daemon=True)
    interrupted: KeyboardInterrupt | None = None
    figure: LiveFigure | None = None
    try:
        if started_here:
            monitor.start()
        worker.start()
        # After the start: the first render takes a while and the job need not wait for it.
        figure = LiveFigure(monitor, title) if in_kernel() else None
        _wait(stopped, figure, progress, redraw_every)
    except KeyboardInterrupt as e:
        interrupted = e
    if interrupted is not None and worker.ident is not None and not stopped.is_set():
        cancel.set()
        try:
            monitor.mark("interrupted: stopping")
            _say(progress, "interrupted: waiting for the job to store what it finished (interrupt again to stop waiting)")
            _wait(stopped, figure, progress, redraw_every)
        except KeyboardInterrupt:
            _say(progress, "stopped waiting: the job may still be running and writing its results")
    _finish(outcome, interrupted, monitor=monitor, stop_monitor=started_here, progress=progress, figure=figure,
            title=title, results_dir=results_dir)
    if interrupted is not None:
        raise interrupted
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def _finish(outcome: dict, interrupted, *, monitor, stop_monitor, progress, figure, title, results_dir) -> None:
    """The final frame, the saved series and the bar's end state, each done even if ■ is pressed meanwhile.

    An interrupt here (the job has already stopped) is kept and re-raised by the caller, and
    turns the bar red: the cell ends as interrupted, with nothing left half-drawn.
    """
    caught: list[KeyboardInterrupt] = [interrupted] if interrupted is not None else []

    def bar() -> None:
        error = outcome.get("error") or (caught[0] if caught else None)
        if isinstance(progress, WidgetProgress):
            progress.finish(_error_text(error) if error else "", override=isinstance(error, KeyboardInterrupt))
        if hasattr(progress, "close"):
            progress.close()

    steps = []
    if "error" in outcome:
        steps.append(lambda: monitor.mark(f"job failed: {type(outcome['error']).__name__}"))
    if stop_monitor:
        steps.append(monitor.stop)
    if figure is not None:
        steps.append(figure.update)  # the final frame, drawn on the main thread
    elif in_kernel():  # interrupted before the first frame
        steps.append(lambda: LiveFigure(monitor, title))
    if results_dir is not None:
        steps.append(lambda: monitor.save(results_dir))
    steps.append(bar)  # last, so an interrupt during the steps above still turns it red
    for step in steps:
        for _ in range(3):  # a step cut short by ■ runs again; each is safe to repeat
            try:
                step()
                break
            except KeyboardInterrupt as e:
                caught.append(e)
    if caught and interrupted is None:
        raise caught[0]


def _say(progress, text: str) -> None:
    """Tell the person at the cell: on the widget's label, and in the log."""
    logger.warning(text[0].upper() + text[1:])
    if isinstance(progress, WidgetProgress):
        progress.label.value = text


def _wait(stopped: threading.Event, figure: LiveFigure | None, progress, redraw_every: float) -> None:
    next_draw = time.monotonic() + redraw_every
    while not stopped.is_set():
        stopped.wait(max(0.05, next_draw - time.monotonic()))
        if hasattr(progress, "flush"):
            progress.flush()
        if figure is None or stopped.is_set() or time.monotonic() < next_draw:
            continue
        began = time.monotonic()
        figure.update()
        # A frame holds the GIL and a core the job may need (0.2-0.8 s on a busy 2-core CPU):
        # drawing stays under about a fifth of the time, whatever redraw_every asks.
        next_draw = time.monotonic() + max(redraw_every, 4 * (time.monotonic() - began))


def _error_text(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"{type(error).__name__}: {error}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


# -- the five notebooks' pieces -------------------------------------------------------------
_engine_log: EngineLog | None = None  # this kernel's, from the last quiet_libraries() call


def quiet_libraries(log_path=None) -> EngineLog:
    """Keep engines' start-up chatter out of executed notebooks: it goes to a log file; errors still show.

    Call it before the engines are imported: they read these settings once, at import. It
    overrides what the kernel inherited (`apiana-lab -v` asks for vLLM's INFO lines in a terminal,
    not in a notebook that a reviewer reads). In a kernel, what this process and the engines'
    child processes print (vLLM's log, no Triton, NUMA binding, deprecations, loading bars) goes
    to `log_path`, by default a temporary file until `EngineLog.move` puts it in the run's
    folder; error lines and tracebacks still reach the cell. Returns that EngineLog (left off
    outside a kernel, where fds 1 and 2 are the user's terminal).
    """
    import os
    import tempfile

    global _engine_log
    if _engine_log is not None:
        _engine_log.stop()  # the cell ran again: one log at a time; an engine already running keeps the old one
    log = EngineLog(log_path or os.path.join(tempfile.gettempdir(), f"apiana-engine-{os.getpid()}.log"), errors_to=sys.stderr)
    if in_kernel():
        log.start()
    _engine_log = log
    # vLLM's own lines go to fd 2, which is the log while it is on, rather than into the cell's stream.
    os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.__stderr__"
    os.environ["VLLM_LOGGING_LEVEL"] = "INFO" if log.active else "ERROR"
    if log.active and not logging.getLogger("vllm").handlers:
        # vLLM warns while it is imported, before it sets up its own logging (no Triton here):
        # logging's last resort would print that straight into the cell.
        early = logging.getLogger("vllm")
        early.addHandler(logging.StreamHandler(sys.__stderr__))
        early.propagate = False
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    # transformers' "Loading weights" bar would become a widget of its own in every cell that loads a model.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return log


def show(fig) -> None:
    """Display a figure built here (on its own canvas) as a PNG in the cell's output."""
    from IPython.display import Image, display

    display(Image(data=figure_png(fig), format="png"))


def run_export_live(config, *, interval: float = 0.5, results_dir=None, redraw_every: float = 1.0, title: str = "") -> dict:
    """`run_export` with the progress widget and the live memory figure; returns run.json's figures.

    The engine loads first, in this cell's own thread, with the monitor already sampling, so
    its loading shows on the timeline; the bar says "loading" meanwhile. vLLM is started with
    stats on, so the KV-cache panel has data. With `results_dir`, memory.parquet, memory.png
    and memory.json are saved there. The engine is closed at the end, whatever happened.
    """
    from .pipeline import run_export
    from .providers.registry import check_options, get_provider, provider_class

    options = dict(config.engine_options)
    if "stats" in provider_class(config.backend).engine_option_names():
        options.setdefault("stats", True)
    check_options(config.backend, options)
    progress = auto_progress()
    if isinstance(progress, WidgetProgress):
        progress.label.value = f"loading the {config.backend} engine"
    monitor = MemoryMonitor(interval=interval).start()
    monitor.mark(f"{config.backend}: loading")
    start = time.perf_counter()
    try:
        provider = get_provider(config.backend, model=config.model, **options)
    except BaseException as e:
        monitor.stop()
        if isinstance(progress, WidgetProgress):
            progress.finish(_error_text(e))
            progress.close()
        raise
    load_seconds = time.perf_counter() - start
    monitor.attach(provider)
    try:
        result = run_live(lambda progress, cancel: run_export(config, provider=provider, progress=progress, cancel=cancel),
                          monitor=monitor, progress=progress, results_dir=results_dir, redraw_every=redraw_every, title=title)
        # run_export was handed a loaded engine, so its own load_seconds is ~0; the load happened here.
        return {**result, "load_seconds": round(load_seconds, 3)}
    finally:
        monitor.stop()
        provider.close()


def summary_browser(frame):
    """A conversation picker and a date range over a summaries table; the matching rows show below them."""
    try:
        import ipywidgets as w
    except ImportError as e:
        raise MissingDependencyError("ipywidgets", "notebooks") from e
    from IPython.display import display

    from .experiments.summaries import filter_summaries

    titles = frame.drop_duplicates("conversation_id")
    choices = [("all conversations", "")] + [(f"{t or '(untitled)'} [{c[:8]}]", c) for t, c in zip(titles["title"], titles["conversation_id"])]
    pick = w.Dropdown(options=choices, description="conversation", style={"description_width": "initial"})
    start = w.DatePicker(description="from")
    end = w.DatePicker(description="to")
    # Plain traits, not an Output widget: capturing into an Output while papermill executes the
    # cell (clear_output, display) could leave the cell "running" forever under load.
    count = w.Label()
    table = w.HTML()

    def refresh(_=None) -> None:
        shown = filter_summaries(frame, pick.value or None, start.value and start.value.isoformat(),
                                 end.value and end.value.isoformat())
        count.value = f"{len(shown)} of {len(frame)} summaries"
        table.value = shown.to_html(index=False, max_rows=200) if len(shown) < len(frame) else ""

    for control in (pick, start, end):
        control.observe(refresh, "value")
    refresh()
    box = w.VBox([w.HBox([pick, start, end]), count, table])
    display(box)
    return box


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize="small", color="dimgray")


def plot_per_month(months):
    """Bars of conversations and of dialogue messages per month (a table from ExportProfile.per_month)."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(2, 1, (10, 5.5))
    (ax_conv,), (ax_msg,) = axes
    fig.suptitle("Conversations and messages per month (by the conversation's creation date)")
    for ax, column, label, color in ((ax_conv, "conversations", "conversations", "tab:blue"),
                                     (ax_msg, "messages", "dialogue messages", "tab:orange")):
        ax.set_ylabel(label)
        ax.set_xlabel("month (YYYY-MM, UTC)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if months.empty:
            _no_data(ax, "no conversations")
            continue
        x = range(len(months))
        ax.bar(x, months[column], color=color)
        step = max(1, len(months) // 40)  # past ~40 labels they overlap; label every step-th month
        ax.set_xticks(list(x)[::step], months["month"][::step], rotation=90 if len(months) > 12 else 0, fontsize="small")
    return fig


def plot_token_distribution(profile):
    """Histograms of tokens per conversation and per chunk, with the chunk size marked."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(1, 2, (11, 4))
    (ax_conv, ax_chunk) = axes[0]
    fig.suptitle(f"Token counts at chunk size {profile.chunk_size} (the summarizing model's tokenizer)")
    per_conversation = [row["tokens"] for row in profile.conversations if row["tokens"] > 0]
    for ax, values, what in ((ax_conv, per_conversation, "conversation"), (ax_chunk, profile.chunk_tokens, "chunk")):
        ax.set_xlabel(f"tokens per {what}")
        ax.set_ylabel(f"{what}s")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if not values:
            _no_data(ax, f"no {what}s with dialogue")
            continue
        low, high = min(values), max(values)
        if what == "chunk":  # from 0 to the chunk size, so how full the chunks are shows at a glance
            ax.hist(values, bins=np.linspace(0, max(high, profile.chunk_size), 36), color="tab:blue")
        elif high / max(low, 1) > 50:  # real exports span 10 to 100,000 tokens a conversation: log bins keep both ends
            ax.hist(values, bins=np.geomspace(max(low, 1), high, 30), color="tab:blue")
            ax.set_xscale("log")
        else:
            ax.hist(values, bins=min(30, max(5, len(values))), color="tab:blue")
    ax_conv.set_title(f"{len(per_conversation)} conversations with dialogue", loc="left", fontsize="small")
    ax_chunk.axvline(profile.chunk_size, color="tab:red", ls="--", lw=1, label=f"chunk size {profile.chunk_size}")
    ax_chunk.legend(fontsize="x-small")
    ax_chunk.set_title(f"{len(profile.chunk_tokens)} chunks", loc="left", fontsize="small")
    return fig


def plot_comparison(table):
    """Bars per backend: output and prompt tokens/s, load and run seconds, peak memory (a comparison_table)."""
    import numpy as np

    fig, axes = _figure(2, 2, (11, 7))
    fig.suptitle("Backends on the same chunks")
    names = list(table["backend"])
    x = np.arange(len(names))
    failed = table["error"].notna() if "error" in table else [False] * len(names)
    panels = [
        (axes[0][0], [("completion_tokens_per_s", "output")], "output tokens/s",
         "Generation speed (above each bar: share of summaries flagged)"),
        (axes[0][1], [("prompt_tokens_per_s", "prompt")], "prompt tokens/s", "Prompt processing speed"),
        (axes[1][0], [("load_s", "load"), ("wall_s", "run")], "seconds", "Load time and run time"),
        (axes[1][1], [(c, c.removeprefix("peak_").removesuffix("_mb")) for c in table.columns
                      if c.startswith("peak_") and c.endswith("_mb")], "peak memory (MB)", "Peak memory per source"),
    ]
    for ax, series, unit, title in panels:
        ax.set_title(title, loc="left", fontsize="small")
        ax.set_ylabel(unit)
        ax.set_xticks(x, names)
        if not series:
            _no_data(ax, "not measured")
            continue
        width = 0.8 / len(series)
        for k, (column, label) in enumerate(series):
            values = table[column].astype(float).fillna(0.0) if column in table else np.zeros(len(names))
            bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=label)
            ax.bar_label(bars, fmt=lambda v: f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}", fontsize="x-small")
        if len(series) > 1:
            ax.legend(fontsize="x-small")
        if series[0][0] == "completion_tokens_per_s" and "flagged_share" in table:
            # A faster backend that writes worse memories must show beside its speed.
            for i, share in enumerate(table["flagged_share"]):
                if share == share and share is not None:  # not NaN: the backend ran
                    ax.annotate(f"{share:.0%} flagged", (x[i], 0), xytext=(0, 2), textcoords="offset points",
                                ha="center", va="bottom", fontsize="x-small", color="tab:red")
        for i, bad in enumerate(failed):
            if bad:
                ax.text(x[i], 0, "failed", ha="center", va="bottom", color="tab:red", fontsize="small")
    return fig


def plot_sweep(sweep: dict):
    """Throughput and peak memory against batch size, failed or out-of-memory points marked, the recommendation drawn."""
    fig, axes = _figure(2, 1, (9, 7))
    (ax_tok,), (ax_mem,) = axes
    rows = sorted(sweep["rows"], key=lambda r: r["batch_size"])
    key = sweep["memory_key"]
    fig.suptitle("Batch-size sweep: same chunks, one loaded engine")
    ok = [r for r in rows if "error" not in r]
    bad = [r for r in rows if "error" in r or r.get("oom") or r.get("failed")]
    for ax, column, unit, scale in ((ax_tok, "completion_tokens_per_s", "output tokens/s", 1.0),
                                    (ax_mem, key, "peak memory (GB)", 1e3)):
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        points = [(r["batch_size"], r.get(column, 0.0) / scale) for r in ok]
        if points:
            ax.plot(*zip(*points), "o-", color="tab:blue", label=unit.split(" (")[0])
        if bad:
            ax.plot([r["batch_size"] for r in bad], [(r.get(column) or 0.0) / scale for r in bad], "x", color="tab:red",
                    markersize=12, mew=2.5, label="out of memory or failed")
        if sweep["recommended_batch_size"] is not None:
            ax.axvline(sweep["recommended_batch_size"], color="tab:green", ls="--", lw=1,
                       label=f"recommended: {sweep['recommended_batch_size']}")
        ax.set_xticks([r["batch_size"] for r in rows], [str(r["batch_size"]) for r in rows])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="x-small", loc="best")
    ax_tok.set_title("Throughput (beside each point: share of summaries flagged)", loc="left", fontsize="small")
    for r in ok:
        if r.get("flagged_share") is not None:
            ax_tok.annotate(f"{r['flagged_share']:.0%}", (r["batch_size"], r.get("completion_tokens_per_s", 0.0)),
                            xytext=(4, 4), textcoords="offset points", fontsize="x-small", color="tab:red")
    limit = sweep["memory_limit_mb"]
    source = key.removeprefix("peak_").removesuffix("_mb")
    title = "Peak memory: " + ("CPU RSS of this process + children" if source == "rss" else
                               f"GPU {source.removeprefix('gpu').removesuffix('_used')}, used by all processes" if source.startswith("gpu") else source)
    ax_mem.set_ylim(0, max([(r.get(key) or 0.0) / 1e3 for r in rows], default=0.0) * 1.15 or 1.0)
    if limit:
        budget = limit * (1 - sweep["headroom"]) / 1e3
        peak = max([(r.get(key) or 0.0) / 1e3 for r in rows], default=0.0)
        if budget <= 3 * max(peak, 1e-9):
            ax_mem.axhline(budget, color="tab:orange", ls=":", label=f"budget {budget:,.1f} GB")
            ax_mem.legend(fontsize="x-small", loc="best")
        else:  # drawn to scale it would flatten the curve
            title += f"; budget {budget:,.1f} GB, far above"
    ax_mem.set_title(title, loc="left", fontsize="small")
    ax_mem.set_xlabel("batch size (log scale)")
    return fig


def plot_similarity(rows: list[dict], thresholds=None):
    """The A/B check per chunk: a histogram of similarity and one of the new/old length ratio, thresholds marked."""
    fig, axes = _figure(1, 2, (11, 4))
    ax_sim, ax_len = axes[0]
    compared = [r for r in rows if "similarity" in r]
    fig.suptitle(f"Old against new, per chunk ({len(compared)} compared)")
    ax_sim.set_xlabel("similarity (rapidfuzz ratio, 1 = identical)")
    ax_sim.set_ylabel("chunks")
    ax_len.set_xlabel("completion tokens, new / old")
    ax_len.set_ylabel("chunks")
    if not compared:
        _no_data(ax_sim, "no chunk summarized on both sides")
        _no_data(ax_len, "no chunk summarized on both sides")
        return fig
    ax_sim.hist([r["similarity"] for r in compared], bins=[i / 20 for i in range(21)], color="tab:blue")
    ax_sim.set_xlim(0, 1.02)
    ratios = [r["length_ratio"] for r in compared if r.get("length_ratio") is not None]
    if ratios:
        ax_len.hist(ratios, bins=20, color="tab:purple")
    if thresholds is not None:
        ax_sim.axvline(thresholds.min_similarity_median, color="tab:orange", ls="--", lw=1,
                       label=f"median must reach {thresholds.min_similarity_median}")
        ax_sim.axvline(thresholds.min_similarity_p10, color="tab:red", ls=":", lw=1,
                       label=f"p10 must reach {thresholds.min_similarity_p10}")
        ax_sim.legend(fontsize="x-small", loc="upper left")
        lo, hi = thresholds.length_ratio_range
        ax_len.axvspan(lo, hi, color="tab:green", alpha=0.15, label=f"median allowed in [{lo}, {hi}]")
        ax_len.legend(fontsize="x-small")
    ax_sim.set_title("Similarity", loc="left", fontsize="small")
    ax_len.set_title("Length ratio", loc="left", fontsize="small")
    return fig


def plot_quality(frame):
    """A run's quality at a glance (a review.quality_frame): compression, coverage against density, repetition.

    Flagged summaries are drawn in red, the others in blue, in every panel.
    """
    import numpy as np

    fig, axes = _figure(1, 3, (13, 4))
    ax_comp, ax_cd, ax_rep = axes[0]
    q = frame.attrs.get("quality", {})
    fig.suptitle(f"Quality of {len(frame)} summaries: {q.get('flagged', 0)} flagged ({q.get('flagged_share', 0.0):.0%}), "
                 "flagged ones in red")
    ax_comp.set_xlabel("compression (summary / chunk tokens)")
    ax_comp.set_ylabel("summaries")
    ax_cd.set_xlabel("coverage (share copied from the chunk)")
    ax_cd.set_ylabel("density (mean copied fragment, tokens)")
    ax_rep.set_xlabel("repeated n-grams (share seen before in it)")
    ax_rep.set_ylabel("summaries")
    if frame.empty:
        for ax in (ax_comp, ax_cd, ax_rep):
            _no_data(ax, "no summaries")
        return fig
    flagged = frame["flagged"].to_numpy(bool)
    groups = [(~flagged, "tab:blue", "not flagged"), (flagged, "tab:red", "flagged")]
    for ax, column, upper in ((ax_comp, "compression", None), (ax_rep, "repeated_ngrams", 1.0)):
        values = frame[column].to_numpy(float)
        bins = np.linspace(0, upper if upper is not None else max(values.max(), 1e-3) * 1.05, 21)
        ax.hist([values[m] for m, _, _ in groups], bins=bins, stacked=True, color=[c for _, c, _ in groups],
                label=[label for _, _, label in groups])
        ax.legend(fontsize="x-small")
    for mask, color, label in groups:
        ax_cd.scatter(frame["coverage"][mask], frame["density"][mask], color=color, s=18, label=label)
    ax_cd.set_xlim(0, 1.02)
    ax_cd.legend(fontsize="x-small")
    ax_comp.set_title("Length", loc="left", fontsize="small")
    ax_cd.set_title("Extractiveness (Grusky et al., 2018)", loc="left", fontsize="small")
    ax_rep.set_title("Repetition", loc="left", fontsize="small")
    return fig


def flagged_browser(frame):
    """A flag picker over a review.quality_frame; the flagged summaries show beside their chunks below it."""
    try:
        import ipywidgets as w
    except ImportError as e:
        raise MissingDependencyError("ipywidgets", "notebooks") from e
    import html

    from IPython.display import display

    from .quality import FLAGS

    pick = w.Dropdown(options=[("any flag", "")] + [(f, f) for f in FLAGS], description="flag",
                      style={"description_width": "initial"})
    count = w.Label()
    table = w.HTML()

    def refresh(_=None) -> None:
        flag = pick.value
        shown = frame[frame["flagged"]] if not flag else frame[frame["flags"].str.split(", ").apply(lambda f: flag in f)]
        count.value = f"{len(shown)} of {len(frame)} summaries flagged" + (f" {flag}" if flag else "")
        rows = "".join(f"<tr><td>{html.escape(r.title or '')}<br><b>{html.escape(r.flags)}</b></td>"
                       f"<td style='text-align:left'>{html.escape(r.summary)}</td>"
                       f"<td style='text-align:left'>{html.escape(r.chunk)}</td></tr>" for r in shown.head(100).itertuples())
        table.value = ("<table><tr><th>conversation, flags</th><th>summary</th><th>chunk (excerpt)</th></tr>"
                       f"{rows}</table>") if rows else ""

    pick.observe(refresh, "value")
    refresh()
    box = w.VBox([pick, count, table])
    display(box)
    return box
