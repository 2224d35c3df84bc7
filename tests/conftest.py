"""Shared fixtures. Real engines are module-scoped in test_vllm.py / test_transformers.py, one alive at a time."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from helpers import write_dialogue_export


@pytest.fixture(scope="session")
def model_dir():
    from apiana_lab.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from apiana_lab.chunking import load_tokenizer

    return load_tokenizer(model_dir)


@pytest.fixture(scope="session")
def dialogue_export(tmp_path_factory):
    """A small ChatGPT export that cuts into one chunk per message at --chunk-size 64 (144 chunks)."""
    return write_dialogue_export(tmp_path_factory.mktemp("export") / "conversations.json")


@pytest.fixture
def cli_env(monkeypatch):
    """The CLI sets a few environment defaults in its own process; put them back after a test that runs it."""
    for name in ("VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM", "APIANA_PARALLEL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch
