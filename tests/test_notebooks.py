"""The five notebooks, executed by papermill as `make notebooks` runs them, with tiny parameters.

Each test asserts on what a run wrote into its results folder: metrics.json, the tables, the
figures and the executed notebook's outputs. The comparison notebook runs real transformers and
real vLLM; elsewhere the fake backend stands in, because there the notebook's flow is the point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

papermill = pytest.importorskip("papermill")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipywidgets")

from helpers import write_mixed_export  # noqa: E402

from apiana_lab.experiments.results import NOTEBOOKS, execute, kernel_manager_class, notebooks_dir  # noqa: E402
from apiana_lab.store import SQLiteStore  # noqa: E402

SAMPLE = str(Path("apiana_lab/data/sample_export.json").resolve())
BIN = Path(sys.executable).parent
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One results folder for every run in this module, as results/ is for `make notebooks`."""
    return tmp_path_factory.mktemp("results")


def run(name: str, root: Path, **parameters):
    """Execute a notebook into root; return its folder, the executed notebook and metrics.json."""
    executed = execute(name, parameters, root, timeout=900)
    folder = executed.parent
    return folder, nbformat.read(executed, as_version=4), json.loads((folder / "metrics.json").read_text())


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def text_of(cell) -> str:
    """What a cell printed or displayed as plain text (streams, results, displays, errors)."""
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            out.append(o["text"])
        elif o["output_type"] == "error":
            out.append(f"{o['ename']}: {o['evalue']}")
        elif WIDGET_VIEW not in o.get("data", {}):
            out.append(o.get("data", {}).get("text/plain", ""))
    return "\n".join(out)


def cell_calling(nb, text: str):
    (cell,) = [c for c in code_cells(nb) if text in c.source]
    return cell


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in code_cells(nb) for o in c.get("outputs", []))


def widget_states(nb, model: str) -> list[dict]:
    states = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    return [s["state"] for s in states.values() if s["model_name"] == model]


# -- the source notebooks ---------------------------------------------------------------------
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_source_notebook_is_clean_with_one_parameters_cell_then_its_checks(name):
    path = notebooks_dir() / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert (
        f"apiana-lab notebook {name}" in first.source
        and "make notebooks" in first.source
        and "make lab" in first.source
    )
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [1]
    for c in code_cells(nb):
        assert c.outputs == [] and c.execution_count is None, f"{name}: stored output in {c.source[:60]!r}"
    params = {p["name"]: p for p in papermill.inspect_notebook(str(path)).values()}
    assert params["run_id"]["default"] == '""' and params["results_root"]["default"] == '""'
    assert all(p["help"] for p in params.values() if p["name"] != "length_ratio_high"), "a parameter without a comment"
    checks_cell = nb.cells[2].source
    assert f"checks.{name}(" in checks_cell and "quiet_libraries()" in checks_cell
    assert 'engine_log.move(run.folder / "engine.log")' in checks_cell  # engine output beside the results, not in cells
    for p in params:  # every parameter reaches the checks, or the run folder
        if p not in ("run_id", "results_root"):
            assert f"{p}={p}" in checks_cell, f"{name}: {p} is not checked"


# -- explore_export -----------------------------------------------------------------------------
def test_explore_export_with_a_given_rate_and_with_a_measured_sample(root, tmp_path):
    mixed = write_mixed_export(tmp_path / "conversations.json")
    folder, nb, metrics = run(
        "explore_export",
        root,
        input_paths=[str(mixed)],
        chunk_size=64,
        longest=3,
        rate_tokens_per_s=0.0,
        backend="fake",
        sample=3,
        max_length=8,
        engine_options={"latency": 0.01},
    )
    assert metrics["key"]["conversations"] == 12 and metrics["key"]["chunks"] == 144
    assert metrics["parameters"]["measure"] and metrics["figures"]["plan"]["sample"]["chunks"] == 3
    assert "sample:      3 chunks" in text_of(cell_calling(nb, "format_plan(plan)"))
    for name in ("per_month.csv", "longest.csv", "skipped.csv", "conversations.csv", "per_month.png", "tokens.png"):
        assert (folder / name).stat().st_size > 0, name
    import pandas as pd

    skipped = pd.read_csv(folder / "skipped.csv")
    assert list(skipped["reason"]) == ["not_an_object", "no_mapping"]
    assert "2 conversation(s) skipped" in text_of(cell_calling(nb, "skipped_table()"))
    assert len(pd.read_csv(folder / "longest.csv")) == 3
    assert list(pd.read_csv(folder / "per_month.csv")["conversations"]) == [11, 0, 0, 1]
    assert images(nb) == 2

    folder, nb, metrics = run("explore_export", root, rate_tokens_per_s=68.0, summary_tokens=300)
    plan = metrics["figures"]["plan"]
    assert plan["rate"] == {"output_tokens_per_s": 68.0, "summary_tokens": 300}
    assert plan["projection"]["generate_seconds"] == round(12 * 300 / 68.0, 1)  # the sample's 12 chunks
    assert "rate:        68.0 output tok/s given" in text_of(cell_calling(nb, "format_plan(plan)"))


def test_a_wrong_parameter_fails_in_the_checks_cell_saying_what_is_allowed(root):
    with pytest.raises(papermill.PapermillExecutionError) as raised:
        run("explore_export", root, backend="vlm")
    assert raised.value.ename == "ParameterError"
    from apiana_lab.providers.registry import backend_names

    assert "unknown backend (did you mean 'vllm'?)" in raised.value.evalue
    assert "Allowed: one of " + ", ".join(backend_names()) in raised.value.evalue
    assert "checks.explore_export(" in raised.value.source  # the checks cell, before anything runs


# -- summarize_export: interrupted, then resumed --------------------------------------------------
def test_interrupting_the_kernel_keeps_every_finished_summary_and_a_rerun_reuses_them(root, dialogue_export, tmp_path):
    """A real SIGINT reaches the kernel mid-run (as the ■ button sends it); the store keeps what finished."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    out = tmp_path / "out"
    params = dict(
        input_paths=[str(dialogue_export)],
        output_dir=str(out),
        backend="fake",
        chunk_size=64,
        max_length=8,
        batch_size=2,
        max_workers=1,
        limit=60,
        engine_options={"latency": 0.5},
        monitor_interval=0.2,
        results_root=str(root),
        run_id="interrupted",
    )
    nb = parameterize_notebook(load_notebook_node(str(notebooks_dir() / "summarize_export.ipynb")), params)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        store_widget_state=True,
        kernel_manager_class=kernel_manager_class(),
        resources={"metadata": {"path": str(notebooks_dir())}},
    )
    failure: list[BaseException] = []

    def execute_all() -> None:
        try:
            client.execute()
        except BaseException as e:  # the interrupted cell's error ends the run, as in papermill,
            failure.append(e)
            client.set_widgets_metadata()  # which then still saves the widgets' state

    worker = threading.Thread(target=execute_all)
    worker.start()
    db = out / "apiana.sqlite"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and worker.is_alive() and (not db.exists() or SQLiteStore.peek(db) < 4):
        time.sleep(0.2)
    assert not failure, failure
    seen = SQLiteStore.peek(db)
    assert 4 <= seen < 60, "the run ended (or never started) before it could be interrupted"
    # SIGINT straight to the kernel process, as the server's interrupt does for a local kernel. (Going
    # through the kernel manager from this thread, while nbclient's event loop runs it in the worker
    # thread, could block forever on a loaded machine.)
    os.kill(client.km.provisioner.pid, signal.SIGINT)
    worker.join(300)
    assert not worker.is_alive()

    assert failure and "KeyboardInterrupt" in str(failure[0])
    run_cell = cell_calling(nb, "run_export_live(")
    assert any(o["output_type"] == "error" and o["ename"] == "KeyboardInterrupt" for o in run_cell.outputs)
    assert "summarizing: stopped early: interrupted" in text_of(run_cell)
    (bar,) = widget_states(nb, "IntProgressModel")
    assert bar["bar_style"] == "danger" and seen <= bar["value"] < 60
    kept = SQLiteStore.peek(db)
    assert seen <= kept < 60  # nothing finished was lost; the run stopped early
    assert json.loads((out / "run.json").read_text())["cancelled"] is True
    with SQLiteStore(db) as store:
        summaries = store.to_pandas("summaries")
    assert summaries["chunk_id"].is_unique and summaries["summary"].str.startswith("summary-").all()

    # Run it again on the same output: the kept summaries are reused, the rest computed.
    params.pop("run_id")
    params.pop("results_root")
    folder, nb, metrics = run("summarize_export", root, **{**params, "show_conversation": "Chat 3"})
    figures = metrics["figures"]
    assert (figures["chunks_total"], figures["summaries_reused"], figures["summaries_computed"]) == (
        60,
        kept,
        60 - kept,
    )
    assert metrics["key"]["reused"] == kept
    run_cell = cell_calling(nb, "run_export_live(")
    assert f"summarizing: finished (60/60 chunks · {kept} reused · 0 failed" in text_of(run_cell)
    (bar,) = widget_states(nb, "IntProgressModel")
    (label,) = [s for s in widget_states(nb, "LabelModel") if "chunks" in s["value"]]
    assert (bar["value"], bar["max"], bar["bar_style"]) == (60, 60, "success") and f"{kept} reused" in label["value"]
    assert sum("image/png" in o.get("data", {}) for o in run_cell.outputs) == 1  # the live figure, redrawn in place
    import pandas as pd

    assert len(pd.read_csv(folder / "summaries.csv")) == 60
    shown = text_of(cell_calling(nb, "filter_summaries(summaries"))
    assert "Chat 3" in shown and "Chat 4" not in shown  # the show_conversation parameter filters the table
    for name in ("memory.parquet", "memory.png", "memory.json"):
        assert (folder / name).stat().st_size > 0
    assert any(s["value"] == "60 of 60 summaries" for s in widget_states(nb, "LabelModel"))  # the browser's count


# -- backend_comparison: real engines ---------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.transformers
def test_backend_comparison_runs_real_transformers_and_vllm_on_the_same_chunks(root):
    folder, nb, metrics = run(
        "backend_comparison",
        root,
        backends=["transformers", "vllm"],
        chunks=4,
        chunk_size=600,
        max_length=8,
        batch_size=4,
        dtype="float32",
        monitor_interval=0.1,
        engine_options={"vllm": {"max_model_len": 2048}},
    )
    rows = {r["backend"]: r for r in metrics["figures"]["rows"]}
    assert set(rows) == {"transformers", "vllm"}
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert row["chunks"] == 4 and row["failed"] == 0 and 4 <= row["completion_tokens"] <= 32
        assert row["completion_tokens_per_s"] > 0 and row["load_s"] > 0 and row["peak_rss_mb"] > 100
        assert row["max_tokens"] == 8 and row["dtype"] == "float32"
    assert rows["transformers"]["prompt_tokens"] == rows["vllm"]["prompt_tokens"]  # the same chunks, the same prompts
    assert set(metrics["key"]) == {"transformers_out_tok_s", "vllm_out_tok_s", "fastest"}
    import pandas as pd

    table = pd.read_csv(folder / "comparison.csv")
    assert list(table["backend"]) == ["transformers", "vllm"] and table["error"].isna().all()
    assert (folder / "comparison.png").stat().st_size > 0
    for name in ("transformers", "vllm"):
        assert (folder / f"memory_{name}" / "memory.png").stat().st_size > 0
    sources = json.loads((folder / "memory_vllm" / "memory.json").read_text())["sources"]
    assert sources["engine"] == "ok"  # vLLM ran with stats on: its KV-cache gauges were read
    assert images(nb) == 3  # the bars and one timeline per backend
    assert "Loading weights" not in json.dumps(nb.cells[6:])  # transformers' loading bar stays out of the notebook
    # No red box of engine start-up warnings (no Triton, NUMA binding): they are in the run's engine.log.
    stderr = [o["text"] for c in code_cells(nb) for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert not stderr, stderr
    assert "(EngineCore pid=" in (folder / "engine.log").read_text()


# -- batch_size_sweep ----------------------------------------------------------------------------
def test_batch_size_sweep_plots_two_batch_sizes_and_marks_the_out_of_memory_one(root):
    folder, nb, metrics = run(
        "batch_size_sweep",
        root,
        backend="fake",
        batch_sizes=[2, 1],
        chunks=4,
        max_length=8,
        engine_options={"oom_above": 1, "latency": 0.05},
        monitor_interval=0.1,
    )
    rows = {r["batch_size"]: r for r in metrics["figures"]["rows"]}
    assert sorted(rows) == [1, 2] and rows[2]["oom"] and not rows[1]["oom"]
    assert min(metrics["figures"]["chunk_tokens"]) >= 1000  # the default: synthetic long chunks
    assert metrics["key"]["recommended_batch_size"] == 1
    import pandas as pd

    table = pd.read_csv(folder / "sweep.csv")
    assert list(table["batch_size"]) == [1, 2] and list(table["oom"]) == [False, True]
    assert "Recommended batch size: 1" in text_of(cell_calling(nb, "describe_sweep(sweep)"))
    assert "Out of memory or failed at batch size 2 (marked)" in text_of(cell_calling(nb, "describe_sweep(sweep)"))
    for name in ("sweep.png", "memory.png", "memory.parquet"):
        assert (folder / name).stat().st_size > 0
    assert images(nb) == 2


# -- ab_migration_check ----------------------------------------------------------------------------
AB = dict(backend="fake", chunks=4, engine_options={"latency": 0.05}, max_length=16)


@pytest.fixture(scope="module")
def ab_go_run(root):
    """An A/B run that passes, made once for the tests that read it."""
    return run("ab_migration_check", root, **AB)


@pytest.fixture(scope="module")
def ab_no_go_run(root):
    """The real `apiana-lab notebook` command, as CI runs it, on a change made on purpose: (process, run folder)."""
    before = set((root / "ab_migration_check").iterdir()) if (root / "ab_migration_check").exists() else set()
    done = subprocess.run(
        [
            str(BIN / "apiana-lab"),
            "notebook",
            "ab_migration_check",
            "--root",
            str(root),
            "-p",
            "backend",
            "fake",
            "-p",
            "chunks",
            "4",
            "-p",
            "max_length",
            "16",
            "-p",
            "new_max_length",
            "3",
            "-p",
            "engine_options",
            '{"latency": 0.05}',
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    (folder,) = set((root / "ab_migration_check").iterdir()) - before
    return done, folder


def test_ab_check_is_go_on_a_correct_setup(ab_go_run):
    folder, nb, metrics = ab_go_run
    verdict = metrics["verdict"]
    assert verdict["verdict"] == "GO" and all(c["passed"] for c in verdict["checks"])
    assert verdict["summary"]["mode"] == "same setup" and all(c["decisive"] for c in verdict["checks"])
    # Sameness (7); quality: the flagged share, each of six flags, echo and repetition, three measures; the speed-up.
    assert len(verdict["checks"]) == 7 + 1 + 6 + 2 + 3 + 1
    assert verdict["summary"]["exact_match_rate"] == 1.0 and verdict["summary"]["speedup"] > 1.0
    assert metrics["key"]["exact_match_rate"] == 1.0
    import pandas as pd

    per_chunk = pd.read_csv(folder / "per_chunk.csv")
    assert len(per_chunk) == 4 and per_chunk["exact"].all() and (per_chunk["similarity"] == 1.0).all()
    assert (
        len(pd.read_csv(folder / "checks.csv")) == len(verdict["checks"])
        and (folder / "similarity.png").stat().st_size > 0
    )
    last = code_cells(nb)[-1]
    assert last.source == "verdict.raise_if_no_go()" and not any(o["output_type"] == "error" for o in last.outputs)


def test_ab_check_changed_on_purpose_is_no_go_and_the_command_exits_non_zero(ab_no_go_run):
    """NO-GO fails the run: the command exits non-zero, and the run folder says why."""
    done, folder = ab_no_go_run
    assert done.returncode != 0
    assert "ab_migration_check failed: ABCheckFailed: NO-GO" in done.stderr and "flag truncated" in done.stderr
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["verdict"]["verdict"] == "NO-GO"
    failed = {c["name"] for c in metrics["verdict"]["checks"] if c["decisive"] and not c["passed"]}
    # A cut max_length is a change of setup: quality decides (every summary now stops mid-sentence, and is
    # far shorter); sameness is shown, not counted.
    assert metrics["verdict"]["summary"]["mode"] == "migration"
    assert {"flag truncated: share, new - old (95% lower bound)", "compression, new / old (90% interval)"} <= failed
    assert not any(c["decisive"] for c in metrics["verdict"]["checks"] if c["name"] == "exact-match rate")
    import pandas as pd

    quality = pd.read_csv(folder / "quality.csv")
    assert quality.set_index("measure").loc["flag: truncated", "new"] == 1.0
    nb = nbformat.read(folder / "ab_migration_check.ipynb", as_version=4)
    errors = [o for o in code_cells(nb)[-1].outputs if o["output_type"] == "error"]
    assert len(errors) == 1 and errors[0]["ename"] == "ABCheckFailed" and "NO-GO" in errors[0]["evalue"]
    # papermill's banner opens the saved notebook and points at the failing cell, the verdict's.
    banner = nb.cells[0]
    assert banner.cell_type == "markdown" and banner.metadata["tags"] == ["papermill-error-cell-tag"]
    assert (
        'An Exception was encountered at \'<a href="#papermill-error-cell">'
        f"In [{code_cells(nb)[-1].execution_count}]</a>'" in banner.source
    )


def test_ab_check_compares_two_finished_runs_without_recomputing(root, tmp_path, monkeypatch):
    from apiana_lab.cli import export_v2_main

    monkeypatch.delenv("APIANA_PARALLEL", raising=False)
    for side, extra in (("old", ["--sequential"]), ("new", [])):
        assert (
            export_v2_main(
                [
                    "-i",
                    SAMPLE,
                    "-o",
                    str(tmp_path / side),
                    "--backend",
                    "fake",
                    "--no-progress",
                    "--chunk-size",
                    "600",
                    *extra,
                ]
            )
            == 0
        )
    # One summary edited on disk: the notebook must see it, which it would not if it recomputed the runs.
    jsonl = tmp_path / "new" / "summaries.jsonl"
    lines = jsonl.read_text().splitlines()
    edited = json.loads(lines[0])
    edited["summary"] += " (edited)"
    jsonl.write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
    folder, nb, metrics = run(
        "ab_migration_check", root, old_dir=str(tmp_path / "old"), new_dir=str(tmp_path / "new"), min_speedup=0.0
    )  # the fake takes no time: speed says nothing here
    assert metrics["parameters"]["mode"] == "folders" and metrics["verdict"]["verdict"] == "GO"
    assert metrics["verdict"]["summary"]["compared"] == 13
    assert metrics["verdict"]["summary"]["exact_match_rate"] == pytest.approx(12 / 13, abs=1e-3)
    assert "sequential" in text_of(cell_calling(nb, "ab.sides(result)"))


# -- the index of runs --------------------------------------------------------------------------------
def test_results_lists_every_notebook_run(root, ab_go_run, ab_no_go_run):
    """Every run folder under the root is listed, whichever tests made them (the two A/B runs at least)."""
    done = subprocess.run(
        [str(BIN / "apiana-lab"), "results", "--root", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)
    on_disk = {(f.parent.name, f.name) for f in root.glob("*/*") if (f / "metrics.json").exists()}
    assert {(r["notebook"], r["run_id"]) for r in runs} == on_disk and len(on_disk) >= 2
    verdicts = {r["run_id"]: r["verdict"] for r in runs if r["notebook"] == "ab_migration_check"}
    assert verdicts[ab_go_run[0].name] == "GO" and verdicts[ab_no_go_run[1].name] == "NO-GO"
    index = (root / "README.md").read_text()
    for r in runs:
        assert f"| {r['notebook']} | {r['run_id']} |" in index
        if r["executed_notebook"]:
            assert f"[notebook]({r['executed_notebook']})" in index
