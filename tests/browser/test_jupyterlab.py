"""What a person sees in JupyterLab: a live run, a saved result notebook, and a failed A/B check.

Real JupyterLab, real headless Chromium, the real transformers backend on the bundled model.
Screenshots go to results/browser/.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from apiana_lab.experiments.results import trust

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.browser

SAMPLE = REPO / "apiana_lab" / "data" / "sample_export.json"

# What the page shows, read in one evaluation: the progress bars, their labels, the images in
# output areas (the live figure is the one PNG output), the cells' prompts and any error text.
STATE_JS = """
() => {
  const bars = [...document.querySelectorAll('.jp-OutputArea .widget-hprogress')].map(w => {
    const bar = w.querySelector('.progress-bar');
    const box = w.closest('.widget-hbox') || w.parentElement;
    // The status label next to the bar (the bar's own description is a .widget-label inside it).
    const label = box ? box.querySelector(':scope > .widget-label') : null;
    return {width: bar ? parseFloat(bar.style.width || '0') : null,
            classes: bar ? bar.className : '',
            label: label ? label.textContent : ''};
  });
  const images = [...document.querySelectorAll('.jp-OutputArea img')].map(i => ({
      src: i.getAttribute('src') || '', width: i.naturalWidth, height: i.naturalHeight}));
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim());
  const stderr = '[data-mime-type="application/vnd.jupyter.stderr"]';
  const errors = [...document.querySelectorAll(`.jp-OutputArea-output${stderr}, .jp-RenderedText${stderr}`)]
      .map(e => e.textContent);
  const broken = document.body.innerText.includes('Error displaying widget');
  return {bars, images, prompts, errors, broken, text: document.body.innerText};
}
"""


def with_parameters(source: Path, target: Path, **values) -> Path:
    """A copy of a notebook whose parameters cell ends with these assignments (as papermill injects them)."""
    nb = nbformat.read(source, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# set by the browser test\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
    for c in nb.cells:  # a clean notebook: no outputs from elsewhere
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    return target


def open_notebook(page, lab, path: str) -> None:
    page.goto(lab.open_url(path))
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    # The kernel is started when the notebook opens; wait until it says Idle.
    page.wait_for_selector(".jp-StatusBar-Widget >> text=/\\|\\s*Idle/", timeout=120_000)


def run_all(page) -> None:
    page.click("text=Run", timeout=10_000)  # the main menu's Run
    page.click('li[data-command="runmenu:run-all"]', timeout=10_000)


def show_cell(page, text: str) -> None:
    """Scroll the code cell holding `text` into view, as a person watching would (Run All scrolls to the last cell)."""
    page.locator(".jp-CodeCell", has_text=text).first.scroll_into_view_if_needed()


def state(page) -> dict:
    return page.evaluate(STATE_JS)


def finished(s: dict) -> bool:
    """Every code cell has run (a number in its prompt), or one failed and the rest never will."""
    prompts = s["prompts"]
    return bool(prompts) and not any("*" in p for p in prompts) and all(any(ch.isdigit() for ch in p) for p in prompts)


def wait_until(page, condition, timeout: float, every: float = 0.25, seen: list | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = state(page)
        if seen is not None:
            seen.append({**s, "t": time.monotonic(), "text": ""})
        if condition(s):
            return s
        if time.monotonic() > deadline:
            page.screenshot(path=str(REPO / "results" / "browser" / "timed-out.png"))
            raise AssertionError(
                f"timed out after {timeout:.0f} s; prompts {s['prompts']}, bars {s['bars']}, errors {s['errors'][-1:]}"
            )
        page.wait_for_timeout(every * 1000)


def image_hash(image: dict) -> str:
    return hashlib.sha1(image["src"].encode()).hexdigest()


def test_live_run_shows_a_moving_bar_and_a_redrawn_memory_figure(lab, page, screenshots, tmp_path):
    path = with_parameters(
        REPO / "notebooks" / "summarize_export.ipynb",
        lab.root / "live" / "summarize_export.ipynb",
        input_paths=[str(SAMPLE)],
        output_dir=str(tmp_path / "out"),
        backend="transformers",
        chunk_size=400,
        limit=3,
        max_length=48,
        batch_size=1,
        max_workers=1,
        fresh=True,
        monitor_interval=0.2,
        results_root=str(tmp_path / "results"),
    )
    open_notebook(page, lab, str(path.relative_to(lab.root)))
    run_all(page)
    seen: list[dict] = []

    def watching(s: dict) -> bool:
        show_cell(page, "run_export_live(")
        return bool(s["bars"])

    wait_until(page, watching, timeout=120, seen=seen)
    page.wait_for_timeout(300)
    page.screenshot(path=str(screenshots / "live-start.png"))
    mid_taken = False

    def done(s: dict) -> bool:
        nonlocal mid_taken
        show_cell(page, "run_export_live(")
        bar = s["bars"][0] if s["bars"] else None
        if bar and not mid_taken and 0 < (bar["width"] or 0) < 100:
            page.screenshot(path=str(screenshots / "live-mid.png"))
            mid_taken = True
        return finished(s)

    end = wait_until(page, done, timeout=300, seen=seen)
    page.wait_for_timeout(500)
    show_cell(page, "run_export_live(")
    page.wait_for_timeout(300)
    end = state(page)
    figure = page.locator(".jp-OutputArea img").first
    page.screenshot(path=str(screenshots / "live-end.png"))
    figure.screenshot(path=str(screenshots / "live-figure.png"))

    assert not end["errors"], end["errors"]
    widths = [s["bars"][0]["width"] for s in seen if s["bars"]]
    labels = [s["bars"][0]["label"] for s in seen if s["bars"]]
    # Intermediate states: the bar was seen part way, or its label counted chunks before the end.
    assert any(0 < w < 100 for w in widths) or any(f"{k}/3" in lab_ for lab_ in labels for k in (1, 2)), (
        widths,
        labels,
    )
    bar = end["bars"][0]
    assert bar["width"] == 100 and "progress-bar-success" in bar["classes"], bar
    assert "3/3" in bar["label"], bar["label"]
    # The live figure: a PNG in the output, redrawn in place at least twice while the run went.
    frames = {image_hash(s["images"][0]) for s in seen if s["images"]}
    assert len(frames) >= 3, f"the figure was drawn {len(frames)} times"
    assert end["images"][0]["width"] > 400


def executed_summarize_notebook(tmp_path: Path) -> Path:
    """The newest executed summarize_export notebook in results/; one is executed if none is there."""
    found = sorted((REPO / "results" / "summarize_export").glob("*/summarize_export.ipynb"))
    if found:
        return found[-1]
    subprocess.run(
        [
            str(Path(sys.executable).parent / "apiana-lab"),
            "notebook",
            "summarize_export",
            "--root",
            str(tmp_path / "results"),
            "-p",
            "backend",
            '"transformers"',
            "-p",
            "limit",
            "2",
            "-p",
            "max_length",
            "24",
            "-p",
            "output_dir",
            json.dumps(str(tmp_path / "out")),
        ],
        check=True,
    )
    return next((tmp_path / "results" / "summarize_export").glob("*/summarize_export.ipynb"))


def test_a_saved_result_notebook_shows_its_finished_bar_and_figure(lab, page, screenshots, tmp_path):
    source = executed_summarize_notebook(tmp_path)
    saved = nbformat.read(source, as_version=4)
    assert saved.metadata.get("widgets"), f"{source} keeps no widget state"
    target = lab.root / "review" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    trust([target])  # what `make lab` does for results/: JupyterLab renders saved widgets of trusted notebooks only
    open_notebook(page, lab, str(target.relative_to(lab.root)))
    # JupyterLab renders a cell's outputs when it comes into view: go to the run's cell, as a reader would.
    show_cell(page, "run_export_live(")
    s = wait_until(page, lambda s: s["bars"] and s["images"], timeout=60)
    page.wait_for_timeout(1000)
    s = state(page)
    assert not s["broken"], "a saved widget shows 'Error displaying widget'"
    bar = s["bars"][0]
    assert bar["width"] == 100 and "progress-bar-success" in bar["classes"], bar
    assert all(not p or "*" not in p for p in s["prompts"]), "opening a result notebook must not run it"
    figure = page.locator(".jp-OutputArea img").first
    figure.scroll_into_view_if_needed()
    assert figure.is_visible() and s["images"][0]["width"] > 400
    page.screenshot(path=str(screenshots / "review.png"))

    # The dark theme: the status line and the figure must stay readable.
    page.click("text=Settings")
    page.hover("text=Theme")
    page.click("text=JupyterLab Dark")
    page.wait_for_function("document.body.dataset.jpThemeLight === 'false'", timeout=20_000)
    page.wait_for_timeout(500)
    colours = page.evaluate("""() => {
      const label = document.querySelector('.jp-OutputArea .widget-hbox > .widget-label');
      const rgb = c => c.match(/\\d+(\\.\\d+)?/g).slice(0, 3).map(Number);
      return {text: rgb(getComputedStyle(label).color),
              background: rgb(getComputedStyle(document.querySelector('.jp-Notebook')).backgroundColor)};
    }""")
    page.screenshot(path=str(screenshots / "review-dark.png"))
    luminance = lambda c: (0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]) / 255
    assert luminance(colours["text"]) - luminance(colours["background"]) > 0.4, colours


def test_a_failing_ab_check_shows_no_go_and_its_error(lab, page, screenshots, tmp_path):
    path = with_parameters(
        REPO / "notebooks" / "ab_migration_check.ipynb",
        lab.root / "ab" / "ab_migration_check.ipynb",
        input_paths=[str(SAMPLE)],
        backend="transformers",
        chunks=3,
        chunk_size=300,
        max_length=32,
        new_max_length=6,
        results_root=str(tmp_path / "results"),
    )
    open_notebook(page, lab, str(path.relative_to(lab.root)))
    run_all(page)
    wait_until(
        page,
        lambda s: any("NoGoError" in e or "NO-GO" in e for e in s["errors"]) or "NO-GO" in s["text"] and finished(s),
        timeout=300,
    )
    page.wait_for_timeout(500)
    s = state(page)
    error = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").last
    error.scroll_into_view_if_needed()
    page.screenshot(path=str(screenshots / "ab-no-go.png"))
    assert "NO-GO" in s["text"]
    assert error.is_visible() and "NO-GO" in error.inner_text()
    assert "compression" in error.inner_text()  # the failed check is named: summaries cut to a fifth of their length
