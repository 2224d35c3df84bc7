"""Backends as plugins: a package of its own, installed with pip, seen by the CLI, --help, Ray and the notebooks.

`tests/plugins/apiana-echo` is written the way a user writes a backend: an `LLMProvider` subclass
with only the design's `invoke` and `batch_invoke`, registered under the entry-point group
`apiana_lab.backends` in its own pyproject.toml. The module installs it once with
`pip install --target` into a temporary folder, and every command here runs with that folder on
PYTHONPATH: no edit to apiana_lab, nothing left in the venv.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from apiana_lab.errors import ConfigError, MissingDependencyError
from apiana_lab.providers import LLMProvider, registry

PLUGIN = Path(__file__).parent / "plugins" / "apiana-echo"
SAMPLE = str(Path("apiana_lab/data/sample_export.json").resolve())
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The plugin installed by pip (no network, no build isolation) into a folder of its own."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "src"
    shutil.copytree(PLUGIN, source)  # pip builds in the source folder: keep tests/ clean
    target = work / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (target / "apiana_echo").is_dir()
    return target


def env_with(site, **extra):
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def cli(site, *args, env=None, timeout=300):
    return subprocess.run(
        [str(BIN / "chatgpt-export-v2"), *args],
        capture_output=True,
        text=True,
        env=env or env_with(site),
        timeout=timeout,
    )


def summaries(out: Path) -> list[str]:
    with sqlite3.connect(out / "apiana.sqlite") as conn:
        return [row[0] for row in conn.execute("SELECT summary FROM summaries")]


# ---- the design's interface, in process ------------------------------------------------------


class InvokeOnly(LLMProvider):
    def invoke(self, prompt: str) -> str:
        return "I wrote about " + prompt[-20:]


class WithBatch(InvokeOnly):
    def batch_invoke(self, prompts: list[str]) -> list[str]:
        return [p.upper() for p in prompts]


def test_a_provider_written_to_the_design_builds_and_batches_exactly_when_it_overrides_batch_invoke():
    assert InvokeOnly.supports_batch is False
    assert WithBatch.supports_batch is True
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    one = InvokeOnly().complete(chat)
    assert one.text == "I wrote about " + "Be brief.\n\nhello there"[-20:]  # the chat reaches invoke as text
    assert one.meta == {"tokens_estimated": True}  # no tokenizer: the counts say they are estimates
    assert one.prompt_tokens > 0 and one.completion_tokens > 0 and one.finish_reason == "unknown"
    both = WithBatch().complete_batch(["ab", "cd"])
    assert [c.text for c in both] == ["AB", "CD"]  # through batch_invoke, in input order
    assert InvokeOnly().batch_invoke(["x", "y"]) == ["I wrote about x", "I wrote about y"]


def test_a_provider_with_neither_invoke_nor_complete_is_refused_when_built():
    class Empty(LLMProvider):
        pass

    with pytest.raises(TypeError, match="implements neither invoke nor complete"):
        Empty()


def test_the_built_in_backends_register_through_the_entry_point_group():
    import importlib.metadata

    names = {ep.name for ep in importlib.metadata.entry_points(group=registry.GROUP)}
    assert {"vllm", "transformers", "openai", "fake"} <= names
    ours = [n for n, b in registry.backends().items() if b.distribution == "apiana-lab"]
    assert registry.backend_names()[: len(ours)] == ours  # built-ins first, a plugin after them
    for name in ("vllm", "transformers", "openai"):
        cls = registry.provider_class(name)
        assert cls.extra and cls.requires, name  # what installs it, and what it needs
    assert registry.provider_class("vllm").loads_weights and not registry.provider_class("openai").loads_weights
    with pytest.raises(ConfigError, match="Did you mean 'vllm'"):
        registry.provider_class("vlm")


def test_a_backend_whose_library_is_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(InvokeOnly, "requires", ("apiana_missing_library_xyz",), raising=False)
    monkeypatch.setattr(InvokeOnly, "extra", "gpu", raising=False)
    backend = registry.Backend("needs-gpu", f"{__name__}:InvokeOnly", "apiana-echo")
    known = {**registry.backends(), "needs-gpu": backend}
    monkeypatch.setattr(registry, "_registered", lambda: known)
    assert backend.missing() == ["apiana_missing_library_xyz"]
    assert "needs-gpu (from apiana-echo): not installed, pip install 'apiana-echo[gpu]'" in registry.describe_backends()
    with pytest.raises(MissingDependencyError, match=r"pip install 'apiana-echo\[gpu\]'"):
        registry.get_provider("needs-gpu")


# ---- the installed plugin, as a user meets it -----------------------------------------------


def test_plugin_is_in_help_with_its_engine_flag(site):
    done = cli(site, "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "echo (from apiana-echo)" in text
    assert "--opening OPENING echo: the words each memory starts with" in text
    without = cli(site, "--help", env={**os.environ, "PYTHONPATH": ""})
    assert "apiana-echo" not in without.stdout and "--opening" not in without.stdout  # from the package alone


def test_plugin_summarizes_an_export_from_the_cli(site, tmp_path):
    out = tmp_path / "out"
    done = cli(
        site,
        "-i",
        SAMPLE,
        "-o",
        str(out),
        "--backend",
        "echo",
        "--opening",
        "I recall",
        "--limit",
        "6",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    texts = summaries(out)
    assert len(texts) == 6 and all(t.startswith("I recall that I talked about") for t in texts)
    run = json.loads((out / "run.json").read_text())
    assert run["backend"] == "echo" and run["mode"] == "batch"  # it overrides batch_invoke: batched
    assert run["summaries_with_estimated_tokens"] == 6 and run["completion_tokens"] > 0  # counted, and marked
    assert "token counts of 6 summaries are estimates" in done.stdout


def test_unknown_backend_lists_the_plugin_among_the_known(site, tmp_path):
    done = cli(site, "-i", SAMPLE, "-o", str(tmp_path / "out"), "--backend", "ecko", "--no-progress")
    assert done.returncode == 2
    assert "Did you mean 'echo'?" in done.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_plugin_runs_on_ray_and_is_built_on_the_replicas_not_the_driver(site, tmp_path):
    built = tmp_path / "built.txt"
    out = tmp_path / "out"
    command = [
        str(BIN / "chatgpt-export-v2"),
        "-i",
        SAMPLE,
        "-o",
        str(out),
        "--backend",
        "echo",
        "--limit",
        "6",
        "--no-progress",
        "--ray",
        "--replica-cpus",
        "1",
    ]
    proc = subprocess.Popen(
        command,
        env=env_with(site, APIANA_ECHO_BUILT=str(built), RAY_ADDRESS=""),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert len(summaries(out)) == 6
    pids = set(built.read_text().split())
    assert pids and str(proc.pid) not in pids  # it loads weights: only replicas build it


@pytest.mark.notebooks
@pytest.mark.slow
def test_plugin_runs_in_the_comparison_notebook(site, tmp_path):
    root = tmp_path / "results"
    done = subprocess.run(
        [
            str(BIN / "apiana-lab"),
            "notebook",
            "backend_comparison",
            "--root",
            str(root),
            "-p",
            "backends",
            '["echo"]',
            "-p",
            "chunks",
            "3",
            "-p",
            "engine_options",
            '{"echo": {"opening": "I recall"}}',
        ],
        capture_output=True,
        text=True,
        env=env_with(site),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (metrics,) = root.glob("backend_comparison/*/metrics.json")
    (row,) = json.loads(metrics.read_text())["figures"]["rows"]
    assert row["backend"] == "echo" and row["chunks"] == 3 and row["failed"] == 0 and row["completion_tokens"] > 0
