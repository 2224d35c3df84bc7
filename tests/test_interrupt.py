"""Pressing ■ while `run_live` runs a job: wherever it lands, the cell ends only after the job has stopped.

A real SIGINT is sent to this process, as ipykernel's interrupt does to a kernel, at each moment a
person can press it: before the first frame is drawn, during a redraw, mid-run (at seeded random
times, to catch races), and during the final flush. The job is an honest little loop; the figure
is a stand-in that only says when it is drawn, since here the orchestration is what is tested
(the real kernel and figure are in test_widgets.py and test_notebooks.py).
"""

import os
import random
import signal
import threading
import time

import pytest

from apiana_lab import notebook
from apiana_lab.monitor import MemoryMonitor
from apiana_lab.notebook import live

pytest.importorskip("ipywidgets")

REPEATS = 8


def press_stop() -> None:
    os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(autouse=True)
def python_sigint(monkeypatch):
    """SIGINT raises KeyboardInterrupt in the main thread, as in a kernel; the figure is a stand-in."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(live, "in_kernel", lambda: True)
    yield
    signal.signal(signal.SIGINT, previous)


class Job:
    """Works until cancelled (or for `steps` steps), then stores what it finished; logs every stage."""

    def __init__(self, steps: int | None = None):
        self.steps = steps
        self.log: list[str] = []

    def __call__(self, progress, cancel):
        while not cancel.wait(0.005):
            self.log.append("working")
            if self.steps is not None and len(self.log) >= self.steps:
                break
        if cancel.is_set():
            self.log.append("saw cancel")
        time.sleep(0.3)  # committing what is finished, as run_export does (longer than the final frame)
        self.log.append("flushed")
        return "done"

    @property
    def stopped(self) -> bool:
        return bool(self.log) and self.log[-1] == "flushed"


def figure_that(press_when):
    """A LiveFigure stand-in that presses ■ when press_when(frame) is true (frame 0: the first one)."""

    class Figure:
        frames = 0

        def __init__(self, monitor, title):
            self._draw()

        def update(self):
            self._draw()

        def _draw(self):
            frame = Figure.frames
            Figure.frames += 1
            if press_when(frame):
                press_stop()
                time.sleep(0.5)  # the interrupt lands here, mid-draw

    return Figure


def run_and_interrupt(job, monkeypatch, figure, tmp_path, log=None):
    monkeypatch.setattr(live, "LiveFigure", figure)
    log = job.log if log is None else log
    progress = notebook.WidgetProgress(display=False)
    seen_at_interrupt = None
    with pytest.raises(KeyboardInterrupt):
        try:
            notebook.run_live(
                job, monitor=MemoryMonitor(interval=0.02), progress=progress, redraw_every=0.02, results_dir=tmp_path
            )
        except KeyboardInterrupt:
            seen_at_interrupt = list(log)
            raise
    return progress, seen_at_interrupt


def assert_stopped_cleanly(job, progress, seen, tmp_path, cancelled=True):
    assert seen and seen[-1] == "flushed", f"the cell ended while the job ran: {seen[-3:]}"
    assert ("saw cancel" in seen) == cancelled
    assert not [t for t in threading.enumerate() if t.name == "run-live-job" and t.is_alive()]
    assert progress.bar.bar_style == "danger" and "interrupted" in progress.summary
    assert (tmp_path / "memory.json").stat().st_size > 0


def test_interrupt_before_the_first_frame(monkeypatch, tmp_path):
    for _ in range(REPEATS):
        job = Job()
        progress, seen = run_and_interrupt(job, monkeypatch, figure_that(lambda frame: frame == 0), tmp_path)
        assert_stopped_cleanly(job, progress, seen, tmp_path)


def test_interrupt_during_a_redraw(monkeypatch, tmp_path):
    rng = random.Random(17)
    for _ in range(REPEATS):
        job = Job()
        at = rng.randint(1, 5)
        progress, seen = run_and_interrupt(job, monkeypatch, figure_that(lambda frame, at=at: frame == at), tmp_path)
        assert_stopped_cleanly(job, progress, seen, tmp_path)


def test_interrupt_mid_run_at_random_moments(monkeypatch, tmp_path):
    """The timer's SIGINT mostly lands while the cell waits for the job: the race that once ended cells early."""
    rng = random.Random(20261206)
    for _ in range(2 * REPEATS):
        job = Job()
        timer = threading.Timer(rng.uniform(0.0, 0.25), press_stop)
        try:
            timer.start()
            progress, seen = run_and_interrupt(job, monkeypatch, figure_that(lambda frame: False), tmp_path)
        finally:
            timer.join()  # a late SIGINT must never outlive the test
        assert_stopped_cleanly(job, progress, seen, tmp_path)


def test_interrupt_from_the_jobs_own_thread(monkeypatch, tmp_path):
    """As a kernel delivers ■: the signal comes from elsewhere while the main thread waits."""
    rng = random.Random(5)
    for _ in range(REPEATS):
        job = Job()
        press_at = rng.randint(1, 20)
        inner = job.__call__

        def pressing(progress, cancel, job=job, press_at=press_at, inner=inner):
            def watch():
                while len(job.log) < press_at:
                    time.sleep(0.001)
                press_stop()

            threading.Thread(target=watch, daemon=True).start()
            return inner(progress, cancel)

        progress, seen = run_and_interrupt(pressing, monkeypatch, figure_that(lambda frame: False), tmp_path, job.log)
        assert_stopped_cleanly(job, progress, seen, tmp_path)


def test_interrupt_during_the_final_flush(monkeypatch, tmp_path):
    """The job ended on its own; ■ lands while the final frame is drawn: nothing is left half-done."""
    for _ in range(REPEATS):
        job = Job(steps=10)
        progress, seen = run_and_interrupt(job, monkeypatch, figure_that(lambda frame, job=job: job.stopped), tmp_path)
        assert_stopped_cleanly(job, progress, seen, tmp_path, cancelled=False)


def test_a_second_interrupt_stops_waiting_and_says_so(monkeypatch, tmp_path, caplog):
    job = Job()
    release = threading.Event()
    inner = job.__call__

    def slow_to_stop(progress, cancel):
        result = inner(progress, cancel)
        release.wait(10)  # stuck storing its results
        return result

    monkeypatch.setattr(live, "LiveFigure", figure_that(lambda frame: frame in (1, 2)))
    progress = notebook.WidgetProgress(display=False)
    try:
        with pytest.raises(KeyboardInterrupt):
            notebook.run_live(slow_to_stop, monitor=MemoryMonitor(interval=0.02), progress=progress, redraw_every=0.02)
        assert "Stopped waiting: the job may still be running" in caplog.text
        assert progress.bar.bar_style == "danger"
    finally:
        release.set()
