"""Parameter checks for the notebooks' second cell: a bad value fails there, saying what is wrong and what is allowed.

Each notebook has one function here that takes all its parameters and returns them cleaned
(paths made absolute, "" and 0 turned into None where they mean "the default"), ready for
metrics.json. The small checks they are built from work on their own too. Every failure is a
ParameterError (a ConfigError) naming the parameter, its value and what it may be.
"""

from __future__ import annotations

import difflib
import math
import os
from datetime import date
from pathlib import Path

from apiana_lab import chunking
from apiana_lab.errors import ApianaError, ConfigError, ParameterError
from apiana_lab.providers.registry import backend_names, check_options, provider_class

EXPORT_KINDS = (
    "a ChatGPT conversations.json, the export .zip, a folder of conversations-NNN.json shards, "
    "or a Claude conversations.json"
)


# -- the small checks -----------------------------------------------------------------------
def dtypes() -> tuple[str, ...]:
    """The weight dtypes the backends declare, "auto" (the backend's choice) first; others ignore the dtype."""
    out = ["auto"]
    for backend in backend_names():
        try:
            declared = provider_class(backend).dtypes
        except ApianaError:  # a plugin that cannot load here declares nothing
            continue
        out += [d for d in declared if d not in out]
    return tuple(out)


def check_backend(value, name: str = "backend") -> str:
    """A registered backend's name."""
    names = backend_names()
    if not isinstance(value, str) or value not in names:
        close = difflib.get_close_matches(str(value), names, n=1)
        problem = "unknown backend" + (f" (did you mean {close[0]!r}?)" if close else "")
        raise ParameterError(name, value, problem, "one of " + ", ".join(names))
    return value


def check_backends(values, name: str = "backends") -> list[str]:
    """A non-empty list of registered backends, each once."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise ParameterError(
            name, values, "not a non-empty list", "a list of backends from " + ", ".join(backend_names())
        )
    for i, value in enumerate(values):
        check_backend(value, f"{name}[{i}]")
    twice = sorted({v for v in values if list(values).count(v) > 1})
    if twice:
        raise ParameterError(name, values, f"{', '.join(twice)} listed twice", "each backend once")
    return list(values)


def check_inputs(paths, name: str = "input_paths") -> list[str]:
    """Export paths (one string or a list) that exist, made absolute."""
    listed = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    if not isinstance(listed, (list, tuple)) or not listed:
        raise ParameterError(name, paths, "no export given", f"a path or a list of paths to {EXPORT_KINDS}")
    out = []
    for p in listed:
        if not isinstance(p, (str, os.PathLike)) or not str(p).strip():
            raise ParameterError(name, paths, f"{p!r} is not a path", f"paths to {EXPORT_KINDS}")
        path = Path(p).expanduser()
        if not path.exists():
            raise ParameterError(
                name,
                p,
                f"no such file or folder (relative paths start from {Path.cwd()})",
                f"existing paths to {EXPORT_KINDS}",
            )
        out.append(str(path.resolve()))
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a user


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_whole(value, name: str, minimum: int = 1) -> int:
    """A whole number of at least `minimum`."""
    if not _is_int(value) or value < minimum:
        raise ParameterError(
            name, value, f"below {minimum}" if _is_int(value) else "not a whole number", f"a whole number >= {minimum}"
        )
    return value


def check_optional_whole(value, name: str) -> int | None:
    """None (or 0): the default; otherwise a whole number >= 1."""
    if value is None or (_is_int(value) and value == 0):
        return None
    if not _is_int(value) or value < 0:
        raise ParameterError(
            name,
            value,
            "negative" if _is_int(value) else "not a whole number",
            "None (or 0) for the default, or a whole number >= 1",
        )
    return value


def check_batch_size(value, name: str = "batch_size") -> int | str | None:
    """A batch size: "auto" (sized from measured throughput), None (or 0) for the backend's fixed default, or a
    whole number >= 1."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str):
        raise ParameterError(name, value, "not 'auto'", "'auto', None (or 0) for the default, or a whole number >= 1")
    return check_optional_whole(value, name)


def check_number(value, name: str, minimum: float = 0.0, *, above: bool = False) -> float:
    """A real number >= `minimum` (> with `above`)."""
    if not _is_number(value) or value < minimum or (above and value == minimum):
        raise ParameterError(
            name,
            value,
            "out of range" if _is_number(value) else "not a number",
            f"a number {'>' if above else '>='} {minimum:g}",
        )
    return float(value)


def check_fraction(value, name: str) -> float:
    """A number from 0 to 1 (a share, or a threshold on one)."""
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ParameterError(
            name, value, "outside 0-1" if _is_number(value) else "not a number", "a number from 0 to 1"
        )
    return float(value)


def check_batch_sizes(values, name: str = "batch_sizes") -> list[int]:
    """A non-empty list of batch sizes, returned sorted and each once."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
        raise ParameterError(
            name,
            values,
            "empty" if isinstance(values, (list, tuple)) else "not a list",
            "a non-empty list of whole numbers >= 1, e.g. [1, 2, 4, 8]",
        )
    for i, value in enumerate(values):
        check_whole(value, f"{name}[{i}]")
    return sorted(set(values))


def check_dtype(value, name: str = "dtype") -> str:
    """A weight dtype some backend declares (`dtypes`)."""
    known = dtypes()
    if value not in known:
        raise ParameterError(name, value, "unknown dtype", "one of " + ", ".join(known))
    return value


def check_chunk_size(value, name: str = "chunk_size") -> int:
    """A chunk size the chunker can cut to (`chunking.check_chunk_size`: at least MIN_CHUNK_SIZE tokens)."""
    try:
        return chunking.check_chunk_size(value)
    except ConfigError:
        least = chunking.MIN_CHUNK_SIZE["tokens"]
        raise ParameterError(
            name, value, "too small" if _is_int(value) else "not a whole number", f"a whole number of tokens >= {least}"
        ) from None


def check_model(value, name: str = "model") -> str | None:
    """A model folder or name; "" (or None) is the bundled model."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ParameterError(
            name, value, "not a string", '"" for the bundled model, a local HF folder, or (openai) the served name'
        )
    return value


def check_text(value, name: str) -> str | None:
    """Free text; "" (or None) means "unchanged"."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ParameterError(name, value, "not a string", '"" to leave it unchanged, or the text')
    return value


def check_day(value, name: str) -> str | None:
    """A date as YYYY-MM-DD; "" (or None) for no bound."""
    if value is None or value == "":
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except (TypeError, ValueError):
        raise ParameterError(name, value, "not a date", '"" for no bound, or a date as YYYY-MM-DD') from None


def check_engine_options(backend_name: str, options, name: str = "engine_options") -> dict:
    """Constructor arguments the backend takes (checked against its constructor)."""
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ParameterError(
            name,
            options,
            "not a dict of option names to values",
            'a dict of the backend\'s constructor arguments, e.g. {"max_model_len": 2048}',
        )
    try:
        check_options(backend_name, options)
    except ConfigError as e:
        raise ConfigError(f"parameter {name}: {e}") from e
    return dict(options)


def check_options_per_backend(names: list[str], options, name: str = "engine_options") -> dict:
    """{backend: {option: value}} for backends in `names` only."""
    if not isinstance(options, dict):
        raise ParameterError(
            name,
            options,
            "not a dict",
            'a dict from backend to its options, e.g. {"openai": {"base_url": "http://127.0.0.1:8000/v1"}}',
        )
    for key, value in options.items():
        if key not in names:
            raise ParameterError(
                name,
                options,
                f"options for {key!r}, which is not in the backends list",
                "keys from " + ", ".join(names),
            )
        check_engine_options(key, value, f"{name}[{key!r}]")
    return {k: dict(v) for k, v in options.items()}


def check_output_dir(value, name: str = "output_dir") -> str:
    """A folder the run can write apiana.sqlite, summaries.jsonl and run.json into, made absolute."""
    from apiana_lab.pipeline import check_output

    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ParameterError(name, value, "no folder given", "a folder path (created if missing)")
    path = Path(value).expanduser().resolve()
    try:
        check_output(path)
    except ConfigError as e:
        raise ConfigError(f"parameter {name}: {e}") from e
    return str(path)


def check_finished_run(value, name: str) -> str:
    """An existing output folder of a finished run (summaries.jsonl and run.json), made absolute."""
    path = Path(str(value)).expanduser()
    missing = [f for f in ("summaries.jsonl", "run.json") if not (path / f).is_file()]
    if missing:
        raise ParameterError(
            name,
            value,
            f"no {' or '.join(missing)} there (relative paths start from {Path.cwd()})",
            "the -o folder of a finished chatgpt-export-v2 run",
        )
    return str(path.resolve())


# -- one per notebook ---------------------------------------------------------------------------
def explore_export(
    *,
    input_paths,
    chunk_size,
    longest,
    rate_tokens_per_s,
    summary_tokens,
    backend: str,
    model,
    sample,
    max_length,
    batch_size,
    engine_options: dict,
) -> dict:
    """explore_export.ipynb's parameters; the backend is checked only when the rate is to be measured (rate 0)."""
    rate = check_number(rate_tokens_per_s, "rate_tokens_per_s")
    params = {
        "input_paths": check_inputs(input_paths),
        "chunk_size": check_chunk_size(chunk_size),
        "longest": check_whole(longest, "longest"),
        "rate_tokens_per_s": rate,
        "summary_tokens": check_whole(summary_tokens, "summary_tokens"),
        "measure": rate == 0,
    }
    if params["measure"]:
        b = check_backend(backend)
        params.update(
            backend=b,
            model=check_model(model),
            sample=check_whole(sample, "sample"),
            max_length=check_whole(max_length, "max_length"),
            batch_size=check_optional_whole(batch_size, "batch_size"),
            engine_options=check_engine_options(b, engine_options),
        )
    return params


def summarize_export(
    *,
    input_paths,
    output_dir: str,
    backend: str,
    model,
    batch_size,
    max_workers,
    chunk_size,
    max_length,
    limit,
    fresh,
    engine_options: dict,
    monitor_interval,
    show_conversation,
    show_from,
    show_to,
) -> dict:
    """summarize_export.ipynb's parameters."""
    b = check_backend(backend)
    if not isinstance(fresh, bool):
        raise ParameterError("fresh", fresh, "not True or False", "True (ignore earlier summaries) or False (resume)")
    return {
        "input_paths": check_inputs(input_paths),
        "output_dir": check_output_dir(output_dir),
        "backend": b,
        "model": check_model(model),
        "batch_size": check_batch_size(batch_size),
        "max_workers": check_optional_whole(max_workers, "max_workers"),
        "chunk_size": check_chunk_size(chunk_size),
        "max_length": check_whole(max_length, "max_length"),
        "limit": check_optional_whole(limit, "limit"),
        "fresh": fresh,
        "engine_options": check_engine_options(b, engine_options),
        "monitor_interval": check_number(monitor_interval, "monitor_interval", above=True),
        "show_conversation": check_text(show_conversation, "show_conversation"),
        "show_from": check_day(show_from, "show_from"),
        "show_to": check_day(show_to, "show_to"),
    }


def backend_comparison(
    *,
    input_paths,
    backends: list,
    model,
    chunks,
    chunk_size,
    max_length,
    batch_size,
    dtype: str,
    engine_options: dict,
    monitor_interval,
) -> dict:
    """backend_comparison.ipynb's parameters; engine_options maps a backend to its own options."""
    names = check_backends(backends)
    return {
        "input_paths": check_inputs(input_paths),
        "backends": names,
        "model": check_model(model),
        "chunks": check_whole(chunks, "chunks"),
        "chunk_size": check_chunk_size(chunk_size),
        "max_length": check_whole(max_length, "max_length"),
        "batch_size": check_batch_size(batch_size),
        "dtype": check_dtype(dtype),
        "engine_options": check_options_per_backend(names, engine_options),
        "monitor_interval": check_number(monitor_interval, "monitor_interval", above=True),
    }


def batch_size_sweep(
    *,
    input_paths,
    backend: str,
    model,
    batch_sizes: list,
    chunks,
    chunk_size,
    max_length,
    dtype: str,
    headroom,
    memory_limit_mb,
    engine_options: dict,
    monitor_interval,
) -> dict:
    """batch_size_sweep.ipynb's parameters; input_paths [] means synthetic long chunks."""
    b = check_backend(backend)
    head = check_fraction(headroom, "headroom")
    if head >= 1.0:
        raise ParameterError("headroom", headroom, "1 leaves no memory to use", "a number from 0 to 1, below 1")
    return {
        "input_paths": check_inputs(input_paths) if input_paths else [],
        "backend": b,
        "model": check_model(model),
        "batch_sizes": check_batch_sizes(batch_sizes),
        "chunks": check_whole(chunks, "chunks"),
        "chunk_size": check_chunk_size(chunk_size),
        "max_length": check_whole(max_length, "max_length"),
        "dtype": check_dtype(dtype),
        "headroom": head,
        "memory_limit_mb": None
        if not memory_limit_mb
        else check_number(memory_limit_mb, "memory_limit_mb", above=True),
        "engine_options": check_engine_options(b, engine_options),
        "monitor_interval": check_number(monitor_interval, "monitor_interval", above=True),
    }


def ab_migration_check(
    *,
    input_paths,
    backend: str,
    model,
    chunks,
    chunk_size,
    batch_size,
    max_workers,
    max_length,
    dtype: str,
    engine_options: dict,
    new_max_length,
    new_system_prompt,
    old_dir,
    new_dir,
    min_exact_match,
    min_similarity_p10,
    min_similarity_median,
    length_ratio_low,
    length_ratio_high,
    min_finish_agreement,
    max_extra_failures,
    min_speedup,
    new_backend="",
    new_dtype="",
    max_flagged_increase=0.05,
    max_measure_ratio=1.5,
) -> dict:
    """ab_migration_check.ipynb's parameters; params["thresholds"] holds ab.Thresholds' arguments."""
    from apiana_lab.experiments.ab import Thresholds

    thresholds = {
        name: check_fraction(value, name)
        for name, value in (
            ("min_exact_match", min_exact_match),
            ("min_similarity_p10", min_similarity_p10),
            ("min_similarity_median", min_similarity_median),
            ("min_finish_agreement", min_finish_agreement),
        )
    }
    low, high = (
        check_number(length_ratio_low, "length_ratio_low", above=True),
        check_number(length_ratio_high, "length_ratio_high"),
    )
    if not low <= 1.0 <= high:
        raise ParameterError(
            "length_ratio_low, length_ratio_high",
            (length_ratio_low, length_ratio_high),
            "the range must hold 1 (new as long as old)",
            "0 < length_ratio_low <= 1 <= length_ratio_high",
        )
    thresholds.update(
        length_ratio_range=(low, high),
        max_extra_failures=check_whole(max_extra_failures, "max_extra_failures", 0),
        min_speedup=check_number(min_speedup, "min_speedup"),
        max_flagged_increase=check_fraction(max_flagged_increase, "max_flagged_increase"),
        max_measure_ratio=check_number(max_measure_ratio, "max_measure_ratio", 1.0),
    )
    Thresholds(**thresholds)  # its own cross-checks
    if bool(old_dir) != bool(new_dir):
        raise ParameterError(
            "old_dir" if old_dir else "new_dir",
            old_dir or new_dir,
            "given without the other",
            "both old_dir and new_dir (compare two finished runs) or neither (run both sides here)",
        )
    params = {"thresholds": thresholds}
    if old_dir:
        params.update(
            mode="folders",
            old_dir=check_finished_run(old_dir, "old_dir"),
            new_dir=check_finished_run(new_dir, "new_dir"),
        )
        return params
    b = check_backend(backend)
    params.update(
        mode="run",
        input_paths=check_inputs(input_paths),
        backend=b,
        model=check_model(model),
        chunks=check_whole(chunks, "chunks"),
        chunk_size=check_chunk_size(chunk_size),
        batch_size=check_optional_whole(batch_size, "batch_size"),
        max_workers=check_optional_whole(max_workers, "max_workers"),
        max_length=check_whole(max_length, "max_length"),
        dtype=check_dtype(dtype),
        engine_options=check_engine_options(b, engine_options),
        new_max_length=check_optional_whole(new_max_length, "new_max_length"),
        new_system_prompt=check_text(new_system_prompt, "new_system_prompt"),
        new_backend=check_backend(new_backend, "new_backend") if new_backend else None,
        new_dtype=check_dtype(new_dtype, "new_dtype") if new_dtype else None,
    )
    if (params["new_backend"] or params["new_dtype"]) and (params["new_max_length"] or params["new_system_prompt"]):
        raise ParameterError(
            "new_backend" if params["new_backend"] else "new_dtype",
            new_backend or new_dtype,
            "combined with new_max_length or new_system_prompt",
            "change one thing at a time: another engine or dtype, or another max_length or prompt",
        )
    return params
