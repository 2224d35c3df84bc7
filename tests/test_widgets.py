"""The progress widget and the live runner in a real Jupyter kernel (nbclient), as papermill runs notebooks."""

import time

import pytest

from apiana_lab.progress import Progress

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipywidgets")

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def execute(cells: list[str], folder, timeout=120):
    """Run the cells in a fresh kernel with widget state stored, as papermill does; errors stay in the outputs."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        store_widget_state=True,
        resources={"metadata": {"path": str(folder)}},
    )
    client.execute()
    return nb


def widget_of(nb, cell):
    """(bar state, label state) of the progress widget displayed by a cell."""
    states = nb.metadata.widgets[WIDGET_STATE]["state"]
    views = [o["data"][WIDGET_VIEW]["model_id"] for o in nb.cells[cell].outputs if WIDGET_VIEW in o.get("data", {})]
    assert len(views) == 1, nb.cells[cell].outputs
    children = [c.removeprefix("IPY_MODEL_") for c in states[views[0]]["state"]["children"]]
    by_name = {states[c]["model_name"]: states[c]["state"] for c in children}
    return by_name["IntProgressModel"], by_name["LabelModel"]


def texts(nb, cell):
    """Plain text a cell left: streams and text/plain displays (not the widgets' own fallbacks)."""
    out = []
    for o in nb.cells[cell].outputs:
        if o["output_type"] == "stream":
            out.append(o["text"])
        elif (
            o["output_type"] in ("display_data", "execute_result")
            and WIDGET_VIEW not in o["data"]
            and "text/plain" in o["data"]
        ):
            out.append(o["data"]["text/plain"])
    return "\n".join(out)


SETUP = """
import threading
from apiana_lab.progress import Progress
from apiana_lab.notebook import WidgetProgress, auto_progress

def feed(widget, n, failed=0):
    # Snapshots arrive from worker threads in a real run.
    def work():
        for i in range(1, n + 1):
            widget(Progress(done=i, total=n, failed=min(failed, i), reused=2, prompt_tokens=150 * i,
                            completion_tokens=30 * i, elapsed=0.5 * i, batch_size=8, retries=1))
    t = threading.Thread(target=work)
    t.start()
    t.join()
"""


@pytest.fixture(scope="module")
def widget_notebook(tmp_path_factory):
    cells = [
        SETUP,
        # 1: a run that ends well; the finished snapshot comes from the main thread
        "w = WidgetProgress('demo run')\nfeed(w, 20)\n"
        "w(Progress(done=20, total=20, reused=2, prompt_tokens=3000, completion_tokens=600, elapsed=10.0, "
        "batch_size=8, retries=1, finished=True))",
        # 2: failed chunks
        "w2 = WidgetProgress('with failures')\nfeed(w2, 10, failed=3)\n"
        "w2(Progress(done=10, total=10, failed=3, reused=2, prompt_tokens=1500, completion_tokens=300, elapsed=5.0, "
        "batch_size=4, retries=1, finished=True))",
        # 3: stopped early, the last snapshot from a worker: the line waits for close() on the main thread
        "w3 = WidgetProgress('stopped')\nfeed(w3, 4)\n"
        "t = threading.Thread(target=w3, args=(Progress(done=4, total=10, prompt_tokens=600, completion_tokens=120, "
        "elapsed=2.0, batch_size=8, finished=True, error='cancelled'),))\n"
        "t.start(); t.join()\nprint('before close:', w3.summary is not None)\nw3.close()",
        # 4: inside a kernel auto_progress picks the widget
        "p = auto_progress('auto')\nprint(type(p).__name__)",
    ]
    return execute(cells, tmp_path_factory.mktemp("widget-nb"))


def test_widget_state_after_progress_updates_and_success(widget_notebook):
    bar, label = widget_of(widget_notebook, 1)
    assert (bar["value"], bar["max"], bar["bar_style"], bar["description"]) == (20, 20, "success", "demo run")
    assert "20/20 chunks" in label["value"] and "2 reused" in label["value"] and "0 failed" in label["value"]
    assert "60.0 out tok/s" in label["value"] and "300 in tok/s" in label["value"] and "batch 8" in label["value"]
    assert "retries 1" in label["value"]
    line = texts(widget_notebook, 1)
    assert line.startswith("demo run: finished (20/20 chunks") and line.count("\n") == 0


def test_widget_shows_failures_and_early_stops(widget_notebook):
    bar, label = widget_of(widget_notebook, 2)
    assert (bar["value"], bar["bar_style"]) == (10, "warning") and "3 failed" in label["value"]
    assert "finished with 3 failed chunk(s); rerun to retry them" in texts(widget_notebook, 2)

    bar, label = widget_of(widget_notebook, 3)
    assert (bar["value"], bar["max"], bar["bar_style"]) == (4, 10, "danger")
    out = texts(widget_notebook, 3)
    assert "before close: True" in out and "stopped: stopped early: cancelled (4/10 chunks" in out
    assert out.index("before close") < out.index("stopped early")  # shown by close(), not from the worker


def test_auto_progress_picks_the_widget_inside_a_kernel(widget_notebook):
    assert texts(widget_notebook, 4).strip() == "WidgetProgress"


def test_auto_progress_is_the_terminal_bar_outside_a_kernel():
    from apiana_lab.notebook import auto_progress, in_kernel
    from apiana_lab.progress import TerminalProgress

    assert not in_kernel()
    assert isinstance(auto_progress(), TerminalProgress)


def test_auto_progress_without_ipywidgets_falls_back_to_text_with_a_hint(monkeypatch, caplog):
    import sys

    import apiana_lab.notebook as notebook
    from apiana_lab.notebook import widgets
    from apiana_lab.progress import TerminalProgress

    monkeypatch.setattr(widgets, "in_kernel", lambda: True)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as if it were not installed
    with caplog.at_level("WARNING", logger="apiana_lab.notebook"):
        bar = notebook.auto_progress()
    assert isinstance(bar, TerminalProgress)
    assert "pip install 'apiana-lab[notebooks]'" in caplog.text and len(caplog.records) == 1


def test_widget_updates_are_throttled_but_first_event_and_last_always_apply():
    from apiana_lab.notebook import WidgetProgress

    w = WidgetProgress(min_interval=10.0, display=False)  # outside a kernel: real widgets, no front end
    values = []
    w.bar.observe(lambda change: values.append(change["new"]), "value")
    for i in range(1, 500):
        w(Progress(done=i, total=1000, elapsed=1.0, batch_size=8))
    w(Progress(done=600, total=1000, elapsed=1.0, batch_size=4, event="batch size 8 -> 4"))
    w(Progress(done=700, total=1000, elapsed=1.0, batch_size=4))
    assert values == [1, 600]  # the first, then the one with an event; the rest held back
    w.flush()
    assert values[-1] == 700 and w.bar.value == 700
    w(Progress(done=1000, total=1000, elapsed=2.0, batch_size=4, finished=True))
    w(Progress(done=999, total=1000, elapsed=2.0, batch_size=4))  # a straggler from another worker
    assert w.bar.value == 1000 and w.bar.bar_style == "success" and w.summary.startswith("summarizing: finished")


LIVE_SETUP = """
import json, os, signal, threading, time
from apiana_lab.chunking import Chunk
from apiana_lab.monitor import MemoryMonitor
from apiana_lab.notebook import run_live
from apiana_lab.providers.fake import FakeProvider
from apiana_lab.summarize import ParallelSummarizerTransform

chunks = [Chunk(id=f"k{i}", conversation_id="c", title="T", date=None, index=i, first_message=i, last_message=i,
                token_count=5, text=f"chunk {i}") for i in range(30)]

def summarize(progress, cancel):
    transform = ParallelSummarizerTransform(FakeProvider(latency=0.05), max_workers=1, batch_size=3)
    done = 0
    for _ in transform.run(chunks, progress=progress):
        done += 1
        if cancel.is_set():
            break
    return done
"""


@pytest.fixture(scope="module")
def live_notebook(tmp_path_factory):
    folder = tmp_path_factory.mktemp("live-nb")
    cells = [
        LIVE_SETUP,
        # 1: a job that runs to the end; results saved
        "done = run_live(summarize, monitor=MemoryMonitor(interval=0.1), redraw_every=0.2, results_dir='run1')\n"
        "print('returned', done)",
        # 2: a job that raises after some progress
        "def broken(progress, cancel):\n"
        "    summarize(progress, cancel)\n"
        "    raise RuntimeError('engine died')\n"
        "run_live(broken, monitor=MemoryMonitor(interval=0.1), redraw_every=0.2, results_dir='run2')",
        # 3: a kernel interrupt mid-run: cancel is set, the job stores what it finished, then the interrupt surfaces
        "log = []\n"
        "def endless(progress, cancel):\n"
        "    while not cancel.wait(0.05):\n"
        "        log.append('working')\n"
        "        if len(log) == 5:  # well into the run: the user presses interrupt\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.5)  # flushing what is finished\n"
        "    log.append('flushed')\n"
        "    return 'stopped cleanly'\n"
        "try:\n"
        "    run_live(endless, monitor=MemoryMonitor(interval=0.1), redraw_every=0.2)\n"
        "except KeyboardInterrupt:\n"
        "    log.append('interrupt surfaced')\n"
        "    raise",
        # 4: what the interrupted job did, in order
        "print(log.count('working'), log[-2:])",
    ]
    start = time.monotonic()
    nb = execute(cells, folder)
    nb.metadata["test_wall_s"] = time.monotonic() - start
    return nb, folder


def pngs(nb, cell):
    return [o for o in nb.cells[cell].outputs if "image/png" in o.get("data", {})]


def test_run_live_keeps_the_final_figure_and_saves_results(live_notebook):
    nb, folder = live_notebook
    assert "returned 30" in texts(nb, 1)
    figures = pngs(nb, 1)
    assert len(figures) == 1  # redrawn in place, never appended
    bar, label = widget_of(nb, 1)
    assert (bar["value"], bar["max"], bar["bar_style"]) == (30, 30, "success") and "30/30 chunks" in label["value"]
    assert "summarizing: finished (30/30 chunks" in texts(nb, 1)
    for name in ("memory.parquet", "memory.png", "memory.json"):
        assert (folder / "run1" / name).stat().st_size > 0
    import pandas as pd

    series = pd.read_parquet(folder / "run1" / "memory.parquet")
    assert series["rss_mb"].gt(0).all() and series["output_tokens_per_s"].gt(0).any()
    assert series["done"].max() == 30


def test_run_live_survives_a_job_that_raises(live_notebook):
    nb, folder = live_notebook
    errors = [o for o in nb.cells[2].outputs if o["output_type"] == "error"]
    assert len(errors) == 1 and errors[0]["ename"] == "RuntimeError" and "engine died" in errors[0]["evalue"]
    assert len(pngs(nb, 2)) == 1  # the final frame was drawn before the error surfaced
    bar, _ = widget_of(nb, 2)
    assert bar["bar_style"] == "danger" and bar["value"] == 30
    assert "stopped early: RuntimeError: engine died" in texts(nb, 2)
    events = [e["event"] for e in __import__("json").loads((folder / "run2" / "memory.json").read_text())["events"]]
    assert events[-1] == "job failed: RuntimeError"


def test_run_live_on_interrupt_cancels_waits_for_the_job_then_reraises(live_notebook):
    nb, _ = live_notebook
    errors = [o for o in nb.cells[3].outputs if o["output_type"] == "error"]
    assert len(errors) == 1 and errors[0]["ename"] == "KeyboardInterrupt"
    # The job ran, saw cancel, finished flushing, and only then did the interrupt reach the cell.
    assert texts(nb, 4).strip() == "5 ['flushed', 'interrupt surfaced']"
    assert len(pngs(nb, 3)) == 1
    bar, _ = widget_of(nb, 3)
    assert bar["bar_style"] == "danger"
