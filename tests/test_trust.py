"""Which result notebooks JupyterLab trusts: ours (executed here, or committed unmodified), never one copied in.

A trusted notebook's HTML and JavaScript outputs run in the reviewer's browser, so `make lab`'s
trust step (`apiana-lab results --trust`) must leave a colleague's run untrusted. Signatures go
to a Jupyter data folder of each test's own, so they neither read nor change the user's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

from nbformat.sign import NotebookNotary  # noqa: E402

from apiana_lab.cli import main  # noqa: E402
from apiana_lab.experiments.results import ResultsRun, execute, trust  # noqa: E402

SCRIPT = {"text/html": "<script>document.title = 'ran from a copied notebook'</script>", "text/plain": "<HTML>"}


@pytest.fixture(autouse=True)
def notary(tmp_path, monkeypatch):
    from jupyter_core.paths import jupyter_runtime_dir

    # The runtime folder stays where it was: kernel sockets under tmp_path could outgrow a Unix socket path.
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", jupyter_runtime_dir())
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))


def trusted(path: Path) -> bool:
    return NotebookNotary().check_signature(nbformat.read(path, as_version=4))


def with_script(nb):
    """The notebook with one more cell whose saved output is HTML with a script, as a colleague's could hold."""
    cell = nbformat.v4.new_code_cell("show()")
    cell.outputs = [nbformat.v4.new_output("display_data", data=SCRIPT)]
    nb.cells.append(cell)
    return nb


def result_run(root: Path, nb, run: str = "20260101T000000Z-00000000") -> Path:
    """A results/<notebook>/<run-id>/ folder holding `nb` and its metrics.json; returns the notebook's path."""
    folder = ResultsRun.create("explore_export", {}, root=root, run=run)
    folder.metrics({}, key={"conversations": 12})
    path = folder.folder / "explore_export.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.notebooks
def test_make_labs_trust_step_trusts_a_run_executed_here_and_not_one_copied_in(tmp_path, capsys):
    pytest.importorskip("papermill")
    root = tmp_path / "results"
    ours = execute("explore_export", {"backend": "fake", "rate_tokens_per_s": 50.0, "longest": 3}, root)
    assert trusted(ours)  # signed as it ran

    # A colleague's run of the same notebook, with a script in an output, copied in for review.
    colleague = tmp_path / "colleague" / "explore_export" / "20260101T000000Z-c0ffee00"
    shutil.copytree(ours.parent, colleague)
    nbformat.write(with_script(nbformat.read(colleague / ours.name, as_version=4)), colleague / ours.name)
    shutil.copytree(colleague, root / "explore_export" / colleague.name)
    copied = root / "explore_export" / colleague.name / ours.name
    assert not trusted(copied)

    assert main(["results", "--root", str(root), "--trust"]) == 0  # what `make lab` runs first
    assert "trusted 1 executed notebooks" in capsys.readouterr().err
    assert trusted(ours) and not trusted(copied)

    assert main(["results", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"  {copied}" in out and f"  {ours}" not in out and "jupyter trust PATH" in out
    assert main(["results", "--root", str(root), "--json"]) == 0
    runs = {r["executed_notebook"]: r["trusted"] for r in json.loads(capsys.readouterr().out)}
    assert runs == {str(ours.relative_to(root)): True, str(copied.relative_to(root)): False}

    trust([copied])  # a person's deliberate `jupyter trust`, once read
    assert trusted(copied)


def git(folder: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args],
        cwd=folder,
        check=True,
        capture_output=True,
    )


def test_a_committed_unmodified_run_is_trusted_and_a_changed_or_only_staged_one_is_not(tmp_path, capsys):
    if shutil.which("git") is None:
        pytest.fail("git is missing: install it (the trust step asks git which result notebooks are committed)")
    root = tmp_path / "repo" / "results"
    committed = result_run(root, with_script(nbformat.v4.new_notebook()), "20260101T000000Z-00000001")
    changed = result_run(root, nbformat.v4.new_notebook(), "20260101T000000Z-00000002")
    git(tmp_path / "repo", "init", "-q")
    git(tmp_path / "repo", "add", "-A")
    git(tmp_path / "repo", "commit", "-q", "-m", "reference runs")
    nbformat.write(with_script(nbformat.read(changed, as_version=4)), changed)  # edited after the commit
    staged = result_run(root, with_script(nbformat.v4.new_notebook()), "20260101T000000Z-00000003")
    git(tmp_path / "repo", "add", "-A")  # copied in and staged, never committed
    outside = result_run(tmp_path / "elsewhere", with_script(nbformat.v4.new_notebook()))  # not in a repository

    assert main(["results", "--root", str(root), "--trust"]) == 0
    assert main(["results", "--root", str(outside.parents[2]), "--trust"]) == 0
    assert [trusted(p) for p in (committed, changed, staged, outside)] == [True, False, False, False]
    assert "trusted 0 executed notebooks" in capsys.readouterr().err.splitlines()[-1]


def test_a_file_that_is_not_a_notebook_is_left_untrusted_and_listed(tmp_path, capsys):
    root = tmp_path / "results"
    broken = result_run(root, nbformat.v4.new_notebook())
    broken.write_text("{}")
    assert main(["results", "--root", str(root), "--trust"]) == 0
    assert f"  {broken}" in capsys.readouterr().out
