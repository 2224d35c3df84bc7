"""The live run: a job in a worker thread while the cell redraws its progress and memory figure until it stops."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from apiana_lab.monitor import NOTEBOOKS_EXTRA, MemoryMonitor
from apiana_lab.notebook.environment import in_kernel
from apiana_lab.notebook.plots import figure_png, plot_monitor
from apiana_lab.notebook.widgets import WidgetProgress, auto_progress
from apiana_lab.progress import ProgressCallback, fan_out

logger = logging.getLogger(__name__)

Job = Callable[[ProgressCallback, threading.Event], object]


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
            _say(
                progress, "interrupted: waiting for the job to store what it finished (interrupt again to stop waiting)"
            )
            _wait(stopped, figure, progress, redraw_every)
        except KeyboardInterrupt:
            _say(progress, "stopped waiting: the job may still be running and writing its results")
    _finish(
        outcome,
        interrupted,
        monitor=monitor,
        stop_monitor=started_here,
        progress=progress,
        figure=figure,
        title=title,
        results_dir=results_dir,
    )
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
        steps.append(lambda: _save(monitor, results_dir))
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


def _save(monitor: MemoryMonitor, folder) -> None:
    """The monitor's series and summary, and its figure as memory.png (left out, with a warning, without matplotlib)."""
    try:
        figure = plot_monitor(monitor)
    except ImportError:
        logger.warning("matplotlib is not installed: no memory.png (%s)", NOTEBOOKS_EXTRA)
        figure = None
    monitor.save(folder, figure=figure)


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


def run_export_live(
    config, *, interval: float = 0.5, results_dir=None, redraw_every: float = 1.0, title: str = ""
) -> dict:
    """`run_export` with the progress widget and the live memory figure; returns run.json's figures.

    The engine loads first, in this cell's own thread, with the monitor already sampling, so
    its loading shows on the timeline; the bar says "loading" meanwhile. vLLM is started with
    stats on, so the KV-cache panel has data. With `results_dir`, memory.parquet, memory.png
    and memory.json are saved there. The engine is closed at the end, whatever happened.
    """
    from apiana_lab.pipeline import run_export
    from apiana_lab.providers.registry import check_options, get_provider, provider_class

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

    def job(progress, cancel):
        return run_export(config, provider=provider, progress=progress, cancel=cancel)

    try:
        result = run_live(
            job, monitor=monitor, progress=progress, results_dir=results_dir, redraw_every=redraw_every, title=title
        )
        # run_export was handed a loaded engine, so its own load_seconds is ~0; the load happened here.
        return {**result, "load_seconds": round(load_seconds, 3)}
    finally:
        monitor.stop()
        provider.close()
