"""The progress widget: an ipywidgets bar and a line of figures, or the terminal bar outside a kernel."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time

from apiana_lab.errors import MissingDependencyError
from apiana_lab.monitor import NOTEBOOKS_EXTRA
from apiana_lab.notebook.environment import in_kernel
from apiana_lab.progress import Progress, ProgressCallback, TerminalProgress

logger = logging.getLogger(__name__)


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
        self.bar = ipywidgets.IntProgress(
            value=0, min=0, max=1, description=desc, bar_style="info", style={"description_width": "initial"}
        )
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
            last = self.last or Progress(
                done=0,
                total=0,
                failed=0,
                reused=0,
                prompt_tokens=0,
                completion_tokens=0,
                elapsed=0.0,
                batch_size=0,
                retries=0,
            )
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
