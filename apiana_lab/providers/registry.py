"""Backend names to provider classes, found through the entry-point group `apiana_lab.backends`.

The built-in backends register there like any other package's (see pyproject.toml): a plugin is
a package whose metadata names an `LLMProvider` subclass under that group, e.g.

    [project.entry-points."apiana_lab.backends"]
    mybackend = "my_package.provider:MyProvider"

Classes are imported on lookup; a backend module imports its heavy libraries only when built.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass

from apiana_lab.errors import ConfigError, MissingDependencyError

GROUP = "apiana_lab.backends"


@dataclass(frozen=True)
class Backend:
    """One registered backend: where it lives, which package provides it, and whether it can run here."""

    name: str
    target: str  # "module:Class"
    distribution: str  # the package that registers it ("apiana-lab" for the built-ins)
    entry_extras: tuple[str, ...] = ()  # extras named on the entry point itself, if any

    def load(self) -> type:
        """The provider class (ConfigError when the target is not an LLMProvider)."""
        from apiana_lab.providers.base import LLMProvider

        module, _, attr = self.target.partition(":")
        try:
            cls = importlib.import_module(module)
            for part in attr.split("."):
                cls = getattr(cls, part)
        except ImportError as e:
            raise MissingDependencyError(
                e.name or module, self.extra or self.name, distribution=self.distribution
            ) from e
        except AttributeError as e:
            raise ConfigError(
                f"The backend {self.name!r} (from {self.distribution}) points at {self.target}, "
                f"which does not exist: {e}. Reinstall {self.distribution}."
            ) from e
        if not (isinstance(cls, type) and issubclass(cls, LLMProvider)):
            raise ConfigError(
                f"The backend {self.name!r} (from {self.distribution}) points at {self.target}, "
                "which is not an apiana_lab.providers.LLMProvider subclass."
            )
        return cls

    @property
    def extra(self) -> str | None:
        if self.entry_extras:
            return self.entry_extras[0]
        try:
            return self.load().extra
        except Exception:  # noqa: BLE001 - a class that cannot load has no declaration to read
            return None

    def missing(self) -> list[str]:
        """The top-level modules its class `requires` that are not installed ([] when it can run)."""
        try:
            cls = self.load()
        except MissingDependencyError as e:
            return [e.package]
        return [m for m in cls.requires if importlib.util.find_spec(m) is None]

    def install_command(self) -> str:
        extra = self.extra
        return f"pip install '{self.distribution}[{extra}]'" if extra else f"pip install '{self.distribution}'"


@functools.cache
def _registered() -> dict[str, Backend]:
    found: dict[str, Backend] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        backend = Backend(ep.name, ep.value.partition("[")[0].strip(), dist, tuple(ep.extras))
        # The built-ins first: a plugin cannot silently replace one by taking its name.
        if ep.name in found and found[ep.name].distribution == "apiana-lab":
            continue
        found[ep.name] = backend
    if not any(b.distribution == "apiana-lab" for b in found.values()):
        found = {**_from_checkout(), **found}
    if not found:
        raise ConfigError(
            f"No backends are registered under the entry-point group {GROUP!r}: apiana-lab's own "
            "metadata is missing. Install the package (`pip install -e .` or `make install`)."
        )
    return found


def _from_checkout() -> dict[str, Backend]:
    """The built-ins as the checkout's pyproject.toml names them, when the package runs from a source tree
    on PYTHONPATH with no installed metadata (the prepared GPU check does)."""
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        table = tomllib.loads(pyproject.read_text())["project"]["entry-points"][GROUP]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return {}
    return {name: Backend(name, target, "apiana-lab") for name, target in table.items()}


def refresh() -> None:
    """Forget the backends found so far (after installing a plugin into a running process)."""
    _registered.cache_clear()


def backends() -> dict[str, Backend]:
    """Every registered backend by name, built-ins first."""
    ours = {n: b for n, b in _registered().items() if b.distribution == "apiana-lab"}
    return {**ours, **{n: b for n, b in _registered().items() if n not in ours}}


def backend_names() -> list[str]:
    return list(backends())


class _Targets(Mapping):
    """`BACKENDS`: name -> "module:Class", read from the entry points when first used."""

    def __getitem__(self, name):
        return backends()[name].target

    def __iter__(self):
        return iter(backends())

    def __len__(self):
        return len(backends())


BACKENDS = _Targets()


def _lookup(name: str) -> Backend:
    known = backends()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"Unknown backend {name!r}.{hint} Known backends: {', '.join(known)}. "
            f"Another package can add one through the entry-point group {GROUP!r}."
        )
    return known[name]


def provider_class(name: str):
    """The provider class registered under `name`."""
    return _lookup(name).load()


def get_provider(name: str, **kwargs):
    """Build the provider registered under `name` with these constructor arguments."""
    backend = _lookup(name)
    cls = backend.load()
    missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(missing[0], backend.extra or name, distribution=backend.distribution)
    return cls(**kwargs)


def check_options(name: str, options: dict) -> None:
    """Raise ConfigError, naming the closest valid option, when the backend does not take one of `options`."""
    known = provider_class(name).engine_option_names()
    for option in options:
        if option not in known:
            close = difflib.get_close_matches(option, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            listed = ", ".join(sorted(known)) if len(known) <= 20 else ", ".join(sorted(known)[:20]) + ", ..."
            raise ConfigError(f"The {name} backend does not take the option {option!r}.{hint} It takes: {listed}.")


def describe_backends() -> str:
    """One line per backend for `--help`: its name, and the install command when it cannot run here."""
    lines = []
    for name, backend in backends().items():
        missing = backend.missing()
        origin = "" if backend.distribution == "apiana-lab" else f" (from {backend.distribution})"
        state = f": not installed, {backend.install_command()}" if missing else ""
        lines.append(f"{name}{origin}{state}")
    return "; ".join(lines)
