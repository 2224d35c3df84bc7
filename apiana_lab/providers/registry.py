"""Backend names to classes, imported only when chosen."""

from __future__ import annotations

import difflib
import importlib

from ..errors import ConfigError, MissingDependencyError

BACKENDS = {
    "vllm": "apiana_lab.providers.vllm_backend:VLLMProvider",
    "transformers": "apiana_lab.providers.transformers_backend:TransformersProvider",
    "fake": "apiana_lab.providers.fake:FakeProvider",
    "openai": "apiana_lab.providers.openai_backend:OpenAIProvider",
    "server": "apiana_lab.providers.openai_backend:OpenAIProvider",  # alias: any OpenAI-compatible server
}
# Which extra brings each backend's libraries.
_EXTRAS = {"vllm": "cpu] or [vllm", "transformers": "transformers", "openai": "openai", "server": "openai"}


def provider_class(name: str):
    """The provider class registered under `name`."""
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, BACKENDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown backend {name!r}.{hint} Known backends: {', '.join(BACKENDS)}.")
    module, cls = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise MissingDependencyError(e.name or name, _EXTRAS.get(name, name)) from e


def get_provider(name: str, **kwargs):
    """Build the provider registered under `name` with these constructor arguments."""
    return provider_class(name)(**kwargs)


def check_options(name: str, options: dict) -> None:
    """Raise ConfigError, naming the closest valid option, when the backend does not take one of `options`."""
    known = provider_class(name).engine_option_names()
    for option in options:
        if option not in known:
            close = difflib.get_close_matches(option, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            listed = ", ".join(sorted(known)) if len(known) <= 20 else ", ".join(sorted(known)[:20]) + ", ..."
            raise ConfigError(f"The {name} backend does not take the option {option!r}.{hint} It takes: {listed}.")
