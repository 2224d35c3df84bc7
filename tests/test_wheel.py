"""A wheel that runs: built from this checkout, installed alone into a fresh virtual environment, used from elsewhere.

Nothing is downloaded: the wheel is built without build isolation and installed without its
dependencies; those (filelock, tokenizers, tqdm, and for the notebook papermill and friends) come
from this test's own environment through a .pth file, which imports none of its packages. The
checkout's apiana_lab must not be what runs, so each test checks where apiana_lab came from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "apiana_lab" / "data" / "sample_export.json"


def quiet(*args, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, failing with its output when it fails."""
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` makes of this checkout (built from a copy: an in-tree build leaves build/ behind)."""
    work = tmp_path_factory.mktemp("build")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    # symlinks=True keeps apiana_lab/data/notebooks a link to notebooks/, as in the checkout.
    for name in ("apiana_lab", "notebooks"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    quiet(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-index",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        work / "dist",
        source,
    )
    (built,) = (work / "dist").glob("apiana_lab-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel (not editable); returns its bin/ folder."""
    folder = tmp_path_factory.mktemp("venv")
    quiet(sys.executable, "-m", "venv", "--without-pip", folder)
    python = folder / "bin" / "python"
    quiet(sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-deps", "-q", wheel)
    purelib = Path(quiet(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # A plain path line: the dependencies become importable, after the venv's own site-packages, and
    # the .pth files there (this checkout's editable install among them) are not run.
    (purelib / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder / "bin"


@pytest.fixture
def env(tmp_path) -> dict:
    """A user's environment outside the checkout: no PYTHONPATH, no results override, a Jupyter folder of its own."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "APIANA_LAB_RESULTS", "JUPYTER_PATH", "JUPYTER_RUNTIME_DIR")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "JUPYTER_DATA_DIR": str(tmp_path / "jupyter")}


def test_the_wheel_carries_the_prompts_and_the_notebooks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    prompts = {p.name for p in (REPO / "prompts").glob("*.txt")}
    assert prompts and {f"apiana_lab/data/prompts/{p}" for p in prompts} <= names
    notebooks = {p.name for p in (REPO / "notebooks").glob("*.ipynb")}
    assert len(notebooks) == 5 and {f"apiana_lab/data/notebooks/{n}" for n in notebooks} <= names


def test_the_installed_package_is_the_wheels_copy(venv, tmp_path, env):
    code = (
        "import json, sys, apiana_lab, apiana_lab.prompts as p; "
        "print(json.dumps({'file': apiana_lab.__file__, 'prompts': str(p.PROMPTS_DIR), 'path': sys.path}))"
    )
    found = json.loads(quiet(venv / "python", "-c", code, cwd=tmp_path, env=env).stdout)
    root = str(venv.parent)
    assert found["file"].startswith(root) and found["prompts"].startswith(root)
    # The only way into the checkout is the dependencies' folder (this checkout's .venv, under `make`).
    deps = sysconfig.get_paths()["purelib"]
    assert [e for e in found["path"] if e.startswith(str(REPO)) and e != deps] == [], found["path"]


def test_chatgpt_export_v2_and_inspect_run_from_the_wheel_outside_the_checkout(venv, tmp_path, env):
    sample = shutil.copy(SAMPLE, tmp_path / "conversations.json")
    done = quiet(
        venv / "chatgpt-export-v2",
        "-i",
        sample,
        "-o",
        "out",
        "--backend",
        "fake",
        "--no-progress",
        cwd=tmp_path,
        env=env,
    )
    assert "12 summarized" in done.stdout
    lines = (tmp_path / "out" / "summaries.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(line)["summary"] for line in lines)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["backend"] == "fake"

    done = quiet(venv / "apiana-lab", "inspect", sample, cwd=tmp_path, env=env)
    assert "conversations:      12 read, 0 skipped" in done.stdout


@pytest.mark.notebooks
def test_apiana_lab_notebook_runs_the_packaged_copy_into_dot_results(venv, tmp_path, env):
    pytest.importorskip("papermill")
    pytest.importorskip("ipykernel")
    spec = "from jupyter_client.kernelspec import KernelSpecManager as M; print(M().get_kernel_spec('python3').argv[0])"
    assert quiet(venv / "python", "-c", spec, cwd=tmp_path, env=env).stdout.strip() == str(
        venv / "python"
    )  # the kernel too

    done = quiet(
        venv / "apiana-lab",
        "notebook",
        "explore_export",
        "-p",
        "backend",
        "fake",
        "-p",
        "rate_tokens_per_s",
        "50",
        "-p",
        "longest",
        "3",
        cwd=tmp_path,
        env=env,
    )
    (metrics,) = (tmp_path / "results" / "explore_export").glob("*/metrics.json")
    assert done.stdout.strip() == str(metrics.parent / "explore_export.ipynb")
    figures = json.loads(metrics.read_text())
    assert figures["key"]["conversations"] == 12
    # The default input, written for the checkout's notebooks/ folder, is the wheel's bundled sample.
    (sample,) = venv.parent.glob("lib/python*/site-packages/apiana_lab/data/sample_export.json")
    assert figures["parameters"]["input_paths"] == [str(sample)]
    assert (tmp_path / "results" / "README.md").is_file()
