"""Load an engine for a measurement, warm it up, reset its caches, watch it and free it: one helper for the lab."""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager

from apiana_lab.providers.base import GenerationOptions
from apiana_lab.providers.registry import get_provider, provider_class

logger = logging.getLogger(__name__)

WARM_UP = "Say hello."


def backend_options(backend: str, dtype: str | None = None, extra: dict | None = None, *, stats: bool = False) -> dict:
    """Constructor arguments for one backend in a measurement: dtype and engine stats only where the backend
    takes them, and the backend's own `benchmark_options` (e.g. no prefix cache: the same chunks run once per
    configuration, and cached prefixes would flatter whichever runs second). `extra` wins over both."""
    cls = provider_class(backend)
    options = dict(extra or {})
    accepted = cls.engine_option_names()
    if dtype and "dtype" in accepted:
        options.setdefault("dtype", dtype)
    if stats and "stats" in accepted:
        options.setdefault("stats", True)  # the engine's gauges (e.g. KV-cache use), for the memory timeline
    for name, value in cls.benchmark_options.items():
        options.setdefault(name, value)
    return options


@contextmanager
def loaded(
    backend: str,
    model: str | None = None,
    *,
    dtype: str | None = None,
    stats: bool = False,
    monitor=None,
    facts: dict | None = None,
    warm_up: bool = True,
    **options,
):
    """The backend's provider, loaded with `backend_options`, warmed up once and its caches reset; closed on exit.

    Args:
        monitor: a MemoryMonitor to watch the load and the engine (started here if it is not running;
            the caller stops it, so one monitor can span several engines).
        facts: a dict that gets `load_s`, the seconds the engine took to load.
        warm_up: send one short prompt first, since lazy start-up is not throughput.
        options: more constructor arguments (over the backend's benchmark options).
    """
    options = backend_options(backend, dtype, options, stats=stats)
    if monitor is not None:
        monitor.start()
        monitor.mark(f"{backend}: load")
    start = time.perf_counter()
    provider = get_provider(backend, model=model, **options)
    try:
        load_s = time.perf_counter() - start
        logger.info("%s loaded in %.1f s", backend, load_s)
        if facts is not None:
            facts["load_s"] = load_s
        if monitor is not None:
            monitor.attach(provider)
        if warm_up:
            provider.complete(WARM_UP, GenerationOptions(max_tokens=4))
        provider.reset_caches()
        yield provider
    finally:
        provider.close()
        del provider
        gc.collect()
