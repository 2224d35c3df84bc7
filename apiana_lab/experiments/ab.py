"""The A/B migration check: the sequential pipeline (old) against the parallel one (new), chunk by chunk.

A verdict is data first: every check with its value, its threshold and whether it held. GO only
when all hold; a chunk missing, duplicated or extra on either side is always NO-GO. Similarity
is rapidfuzz's normalized Indel similarity (`fuzz.ratio` / 100: 1.0 identical, 0.0 nothing in
common), a maintained, standard edit-distance score.

Two kinds of change are judged differently. When only the orchestration changes (sequential to
parallel on the same engine, model, dtype, prompt and options), the outputs should be the same
text, so sameness decides. When the engine, dtype, model, prompt or options change, no two
outputs agree token for token; then the quality profiles decide (apiana_lab.quality): the new
side may not be worse beyond a tolerance, judged on a one-sided 95% confidence bound of the
paired per-chunk difference, so one more flagged summary among 8 is noise and among 500 is not.
Sameness is still shown there, as information.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from apiana_lab.errors import ApianaError, ConfigError
from apiana_lab.summarize import quantile


@dataclass(frozen=True)
class Thresholds:
    """What GO requires. Defaults come from measurements written down in the README (A/B check)."""

    min_exact_match: float = 0.5  # share of chunks whose summaries are identical
    min_similarity_p10: float = 0.3  # the 10th percentile of per-chunk similarity
    min_similarity_median: float = 0.9
    length_ratio_range: tuple[float, float] = (0.8, 1.25)  # median new/old completion tokens
    min_finish_agreement: float = 0.8  # share of chunks whose finish reasons agree
    max_extra_failures: int = 0  # new may fail at most this many more chunks than old
    min_speedup: float = 1.0  # new wall time must not exceed old's (only when both were timed)
    # Quality, decisive when the sides differ in engine, dtype, model, prompt or options:
    max_flagged_increase: float = 0.05  # flagged share (any flag, and each flag), new - old, at the 95% lower bound
    max_measure_ratio: float = 1.5  # median-type measures (compression, coverage, density) may not move by more
    # How much more echo and repetition per summary, at the 95% lower bound: these still move when a model that
    # already echoes and loops almost everywhere leaves its flags no room to rise (the bundled model does).
    max_echo_increase: float = 0.25  # role labels ("User:", "Assistant:") per summary
    max_repetition_increase: float = 0.05  # share of the summary's n-grams repeated

    def __post_init__(self):
        for name in ("min_exact_match", "min_similarity_p10", "min_similarity_median", "min_finish_agreement"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"threshold {name} must be between 0 and 1, not {value!r}")
        lo, hi = self.length_ratio_range
        if not 0 < lo <= 1 <= hi:
            raise ConfigError(
                f"length_ratio_range must be (low <= 1 <= high) with low > 0, not {self.length_ratio_range!r}"
            )
        if self.max_extra_failures < 0 or self.min_speedup < 0:
            raise ConfigError("max_extra_failures and min_speedup must be >= 0")
        if not 0.0 <= self.max_flagged_increase <= 1.0 or self.max_measure_ratio < 1.0:
            raise ConfigError("max_flagged_increase must be between 0 and 1, max_measure_ratio at least 1")
        if self.max_echo_increase < 0 or not 0.0 <= self.max_repetition_increase <= 1.0:
            raise ConfigError("max_echo_increase must be >= 0 and max_repetition_increase between 0 and 1")


@dataclass
class Check:
    """One condition of the verdict."""

    name: str
    value: float | int | None
    threshold: str
    passed: bool
    decisive: bool = True  # False: shown as information, not part of the verdict


@dataclass
class Verdict:
    """GO or NO-GO, with every check behind it."""

    go: bool
    checks: list[Check] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.decisive and not c.passed]

    def to_dict(self) -> dict:
        return {
            "verdict": "GO" if self.go else "NO-GO",
            "checks": [asdict(c) for c in self.checks],
            "summary": self.summary,
        }

    def raise_if_no_go(self) -> None:
        """Raise ABCheckFailed naming the failed checks, so papermill marks the notebook failed."""
        if not self.go:
            raise ABCheckFailed(self)

    def __str__(self) -> str:
        decisive = [c for c in self.checks if c.decisive]
        lines = [
            f"{'GO' if self.go else 'NO-GO'}: {sum(c.passed for c in decisive)}/{len(decisive)} checks hold"
            + (f" ({self.summary.get('mode')})" if self.summary.get("mode") else "")
        ]
        for c in self.checks:
            mark = ("ok  " if c.passed else "FAIL") if c.decisive else "info"
            lines.append(
                f"  {mark} {c.name}: {_fmt(c.value)} ({'needs' if c.decisive else 'would need'} {c.threshold})"
            )
        return "\n".join(lines)


class ABCheckFailed(ApianaError):
    """The A/B check said NO-GO; the message names each failed check."""

    def __init__(self, verdict: Verdict):
        self.verdict = verdict
        failed = "; ".join(f"{c.name} = {_fmt(c.value)}, needs {c.threshold}" for c in verdict.failed)
        super().__init__(f"NO-GO: the parallel pipeline is not a safe replacement: {failed}")


def compare(old: list[dict], new: list[dict], chunk_ids: list[str] | None = None) -> tuple[list[dict], dict]:
    """Per-chunk comparison rows and their summary.

    `old`, `new`: one dict per output row: `chunk_id`, `summary` (or `error`), `completion_tokens`,
    `finish_reason`. `chunk_ids`: the chunks both sides were meant to cover (default: old's).
    """
    from rapidfuzz import fuzz

    count_old, count_new = Counter(r["chunk_id"] for r in old), Counter(r["chunk_id"] for r in new)
    by_old, by_new = {r["chunk_id"]: r for r in old}, {r["chunk_id"]: r for r in new}
    expected = list(dict.fromkeys(chunk_ids if chunk_ids is not None else [r["chunk_id"] for r in old]))
    rows = []
    for cid in expected:
        a, b = by_old.get(cid), by_new.get(cid)
        row = {
            "chunk_id": cid,
            "in_old": a is not None,
            "in_new": b is not None,
            "failed_old": bool(a and a.get("error")),
            "failed_new": bool(b and b.get("error")),
        }
        if a and b and not row["failed_old"] and not row["failed_new"]:
            sa, sb = a["summary"], b["summary"]
            row.update(
                exact=sa == sb,
                similarity=fuzz.ratio(sa, sb) / 100,
                length_ratio=(b["completion_tokens"] / a["completion_tokens"]) if a["completion_tokens"] else None,
                finish_old=a.get("finish_reason"),
                finish_new=b.get("finish_reason"),
                old_summary=sa,
                new_summary=sb,
            )
            if a.get("quality") and b.get("quality"):
                row.update(quality_old=a["quality"], quality_new=b["quality"])
        rows.append(row)
    compared = [r for r in rows if "exact" in r]
    sims = sorted(r["similarity"] for r in compared)
    ratios = [r["length_ratio"] for r in compared if r["length_ratio"] is not None]
    summary = {
        "chunks": len(expected),
        "compared": len(compared),
        "missing_old": sum(not r["in_old"] for r in rows),
        "missing_new": sum(not r["in_new"] for r in rows),
        "duplicated_old": sum(n - 1 for n in count_old.values() if n > 1),
        "duplicated_new": sum(n - 1 for n in count_new.values() if n > 1),
        "extra_old": len(set(count_old) - set(expected)),
        "extra_new": len(set(count_new) - set(expected)),
        "failed_old": sum(r["failed_old"] for r in rows),
        "failed_new": sum(r["failed_new"] for r in rows),
        "exact_match_rate": _share(r["exact"] for r in compared),
        "similarity_mean": statistics.fmean(sims) if sims else None,
        "similarity_p10": quantile(sims, 0.10),
        "similarity_median": quantile(sims, 0.50),
        "similarity_min": sims[0] if sims else None,
        "length_ratio_median": statistics.median(ratios) if ratios else None,
        "finish_agreement": _share(r["finish_old"] == r["finish_new"] for r in compared),
        "quality": quality_difference(rows),
    }
    return rows, summary


QUALITY_MEASURES = ("compression", "coverage", "density")
# Per-summary amounts where more is worse, compared as a paired difference: {measure: Thresholds field}.
QUALITY_INTENSITIES = {"role_markers": "max_echo_increase", "repeated_ngrams": "max_repetition_increase"}


def quality_difference(rows: list[dict]) -> dict:
    """Old against new quality over the chunks both sides profiled: per flag and measure, with 95% bounds.

    Flags: the paired difference in flagged share (new - old) and its one-sided lower bound.
    Measures: the geometric mean of new/old per chunk with its two-sided 90% interval, so a
    change counts only when the whole interval lies beyond the tolerance.
    """
    from apiana_lab.quality import FLAGS

    pairs = [(r["quality_old"], r["quality_new"]) for r in rows if "quality_old" in r]
    out: dict = {"chunks": len(pairs), "flags": {}, "measures": {}}
    if not pairs:
        return out
    for name in ("any", *FLAGS):

        def has(q: dict, name: str = name) -> bool:
            return bool(q["flags"]) if name == "any" else name in q["flags"]

        diffs = [has(new) - has(old) for old, new in pairs]
        mean, half = _mean_half_width(diffs)
        out["flags"][name] = {
            "old": _share(has(old) for old, _ in pairs),
            "new": _share(has(new) for _, new in pairs),
            "difference": mean,
            "lower_bound": mean - half,
        }
    out["intensities"] = {}
    for name in QUALITY_INTENSITIES:
        mean, half = _mean_half_width([new[name] - old[name] for old, new in pairs])
        out["intensities"][name] = {
            "old_mean": statistics.fmean(old[name] for old, _ in pairs),
            "new_mean": statistics.fmean(new[name] for _, new in pairs),
            "difference": mean,
            "lower_bound": mean - half,
        }
    for name in QUALITY_MEASURES:
        # A floor keeps a zero (no copied fragment at all) from turning into an infinite ratio.
        logs = [math.log(max(new[name], 1e-3) / max(old[name], 1e-3)) for old, new in pairs]
        mean, half = _mean_half_width(logs)
        out["measures"][name] = {
            "old_median": statistics.median(old[name] for old, _ in pairs),
            "new_median": statistics.median(new[name] for _, new in pairs),
            "ratio": math.exp(mean),
            "ratio_low": math.exp(mean - half),
            "ratio_high": math.exp(mean + half),
        }
    return out


def quality_rows(summary: dict) -> list[dict]:
    """The quality comparison as table rows: per flag the shares and the bound, per measure the medians and ratio."""
    q = summary.get("quality") or {}
    rows = [
        {
            "measure": "flagged share" if name == "any" else f"flag: {name}",
            "old": f["old"],
            "new": f["new"],
            "new - old": f["difference"],
            "95% lower bound": f["lower_bound"],
        }
        for name, f in q.get("flags", {}).items()
    ]
    rows += [
        {
            "measure": f"{name} (mean per summary)",
            "old": f["old_mean"],
            "new": f["new_mean"],
            "new - old": f["difference"],
            "95% lower bound": f["lower_bound"],
        }
        for name, f in q.get("intensities", {}).items()
    ]
    rows += [
        {
            "measure": f"{name} (median)",
            "old": m["old_median"],
            "new": m["new_median"],
            "new / old": m["ratio"],
            "90% interval": f"{m['ratio_low']:.2f} - {m['ratio_high']:.2f}",
        }
        for name, m in q.get("measures", {}).items()
    ]
    return rows


def _mean_half_width(values: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its one-sided 95% (two-sided 90%) t interval; 0 width for one value."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.inf if n == 1 and values[0] else 0.0
    return mean, _T95[min(n - 1, len(_T95)) - 1] * statistics.stdev(values) / math.sqrt(n)


# Student's t, one-sided 95%, for 1..30 degrees of freedom; beyond 30 the last value (the normal's is 1.645).
_T95 = (
    6.314,
    2.920,
    2.353,
    2.132,
    2.015,
    1.943,
    1.895,
    1.860,
    1.833,
    1.812,
    1.796,
    1.782,
    1.771,
    1.761,
    1.753,
    1.746,
    1.740,
    1.734,
    1.729,
    1.725,
    1.721,
    1.717,
    1.714,
    1.711,
    1.708,
    1.706,
    1.703,
    1.701,
    1.699,
    1.697,
    1.645,
)


def verdict(
    summary: dict, thresholds: Thresholds | None = None, speedup: float | None = None, migration: bool = False
) -> Verdict:
    """GO only if every decisive check holds; a missing, duplicated or extra chunk is always NO-GO.

    `migration`: the sides differ in engine, dtype, model, prompt or options. Quality then
    decides and sameness (exact match, similarity, length ratio, finish agreement) is shown only.
    """
    t = thresholds or Thresholds()
    lo, hi = t.length_ratio_range
    s = summary
    coverage = (
        s["missing_old"]
        + s["missing_new"]
        + s["duplicated_old"]
        + s["duplicated_new"]
        + s["extra_old"]
        + s["extra_new"]
    )
    checks = [
        Check("chunks missing, duplicated or extra (either side)", coverage, "== 0", coverage == 0),
        Check(
            "extra failures (new - old)",
            s["failed_new"] - s["failed_old"],
            f"<= {t.max_extra_failures}",
            s["failed_new"] - s["failed_old"] <= t.max_extra_failures,
        ),
        Check(
            "exact-match rate",
            s["exact_match_rate"],
            f">= {t.min_exact_match}",
            _at_least(s["exact_match_rate"], t.min_exact_match),
        ),
        Check(
            "similarity p10",
            s["similarity_p10"],
            f">= {t.min_similarity_p10}",
            _at_least(s["similarity_p10"], t.min_similarity_p10),
        ),
        Check(
            "similarity median",
            s["similarity_median"],
            f">= {t.min_similarity_median}",
            _at_least(s["similarity_median"], t.min_similarity_median),
        ),
        Check(
            "length ratio median (new/old)",
            s["length_ratio_median"],
            f"in [{lo}, {hi}]",
            s["length_ratio_median"] is not None and lo <= s["length_ratio_median"] <= hi,
        ),
        Check(
            "finish-reason agreement",
            s["finish_agreement"],
            f">= {t.min_finish_agreement}",
            _at_least(s["finish_agreement"], t.min_finish_agreement),
        ),
    ]
    if migration:
        for c in checks[2:]:
            c.decisive = False
    quality = s.get("quality") or {}
    for name, f in quality.get("flags", {}).items():
        what = "flagged share (any flag)" if name == "any" else f"flag {name}: share"
        checks.append(
            Check(
                f"{what}, new - old (95% lower bound)",
                f["lower_bound"],
                f"<= {t.max_flagged_increase}",
                f["lower_bound"] <= t.max_flagged_increase,
            )
        )
    for name, f in quality.get("intensities", {}).items():
        limit = getattr(t, QUALITY_INTENSITIES[name])
        what = "echo: role labels per summary" if name == "role_markers" else "repetition: repeated n-gram share"
        checks.append(
            Check(f"{what}, new - old (95% lower bound)", f["lower_bound"], f"<= {limit}", f["lower_bound"] <= limit)
        )
    for name, m in quality.get("measures", {}).items():
        lo, hi = 1 / t.max_measure_ratio, t.max_measure_ratio
        # Failing needs the whole 90% interval of the new/old ratio beyond the tolerance.
        moved = m["ratio_low"] > hi or m["ratio_high"] < lo
        value = m["ratio_low"] if m["ratio_low"] > hi else m["ratio_high"] if m["ratio_high"] < lo else m["ratio"]
        checks.append(
            Check(f"{name}, new / old (90% interval)", value, f"interval reaches [{lo:.2f}, {hi:.2f}]", not moved)
        )
    if migration and not quality.get("chunks"):
        checks.append(Check("chunks with a quality profile on both sides", 0, ">= 1", False))
    if speedup is not None:
        checks.append(Check("speed-up (old wall / new wall)", speedup, f">= {t.min_speedup}", speedup >= t.min_speedup))
    go = all(c.passed for c in checks if c.decisive)
    return Verdict(go, checks, {**summary, "speedup": speedup, "mode": "migration" if migration else "same setup"})


def run_ab(
    chunks,
    provider,
    *,
    batch_size: int | None = None,
    max_workers: int | None = None,
    max_length: int = 300,
    new_max_length: int | None = None,
    new_system_prompt: str | None = None,
    new_user_template: str | None = None,
    thresholds: Thresholds | None = None,
) -> dict:
    """Old (SummarizerTransform) and new (ParallelSummarizerTransform) on the same chunks, greedy; rows and verdict.

    `new_*` change the new side on purpose (a wrong max_length or prompt), to see the check fail.
    """
    from apiana_lab.summarize import ParallelSummarizerTransform, SummarizerTransform

    from .measure import measure

    old_t = SummarizerTransform(provider, max_length=max_length, temperature=0.0)
    new_t = ParallelSummarizerTransform(
        provider,
        max_workers=max_workers,
        batch_size=batch_size,
        max_length=new_max_length or max_length,
        temperature=0.0,
        system_prompt=new_system_prompt,
        user_template=new_user_template,
    )
    old_fig, old_records = measure(old_t, chunks, config="old: sequential")
    new_fig, new_records = measure(new_t, chunks, config="new: parallel")
    changed = new_max_length not in (None, 0, max_length) or bool(new_system_prompt) or bool(new_user_template)
    return _judge(chunks, old_fig, old_records, new_fig, new_records, thresholds, migration=changed)


def run_migration(chunks, old: dict, new: dict, *, model: str | None = None, **kwargs) -> dict:
    """The design's migration: old = sequential on one engine, new = parallel on another; quality decides.

    `old`, `new`: {"backend", "dtype", "engine_options"}. Each engine is loaded in turn and
    freed before the next, so the two never share memory. `kwargs` go to `migrate`.
    """
    from apiana_lab.experiments.engine import loaded

    sides = []
    for side in (old, new):
        options = dict(side.get("engine_options") or {})
        with loaded(side["backend"], model, dtype=options.pop("dtype", side.get("dtype")), **options) as provider:
            sides.append(_run_side(provider, chunks, sequential=not sides, **kwargs))
    changed = any(old.get(k) != new.get(k) for k in ("backend", "dtype", "engine_options"))
    return _judge(chunks, *sides[0], *sides[1], kwargs.get("thresholds"), migration=changed)


def migrate(chunks, old_provider, new_provider, **kwargs) -> dict:
    """`run_migration` on two engines already loaded: old sequential on one, new parallel on the other."""
    old = _run_side(old_provider, chunks, sequential=True, **kwargs)
    new = _run_side(new_provider, chunks, sequential=False, **kwargs)
    return _judge(chunks, *old, *new, kwargs.get("thresholds"), migration=True)


def _run_side(
    provider,
    chunks,
    *,
    sequential: bool,
    batch_size: int | None = None,
    max_workers: int | None = None,
    max_length: int = 300,
    thresholds: Thresholds | None = None,
):
    from apiana_lab.summarize import ParallelSummarizerTransform, SummarizerTransform

    from .measure import measure

    transform = (
        SummarizerTransform(provider, max_length=max_length, temperature=0.0)
        if sequential
        else ParallelSummarizerTransform(
            provider, max_workers=max_workers, batch_size=batch_size, max_length=max_length, temperature=0.0
        )
    )
    name = f"{'old: sequential' if sequential else 'new: parallel'} on {provider.name}"
    figures, records = measure(transform, chunks, config=name)
    return dict(figures, backend=provider.name), records


def _judge(chunks, old_fig, old_records, new_fig, new_records, thresholds, migration: bool) -> dict:
    rows, summary = compare(
        profiled_rows(old_records, chunks), profiled_rows(new_records, chunks), [c.id for c in chunks]
    )
    speedup = old_fig["wall_s"] / new_fig["wall_s"] if new_fig["wall_s"] else None
    result = verdict(summary, thresholds, speedup, migration=migration)
    return {"rows": rows, "verdict": result, "old": old_fig, "new": new_fig}


def run_ab_on_backend(
    chunks,
    backend: str,
    *,
    model: str | None = None,
    dtype: str | None = None,
    engine_options: dict | None = None,
    new_backend: str | None = None,
    new_dtype: str | None = None,
    new_engine_options: dict | None = None,
    **kwargs,
) -> dict:
    """`run_ab` on a backend loaded here and freed afterwards; `kwargs` go to run_ab.

    With `new_backend`, `new_dtype` or `new_engine_options`, the new side runs on that engine
    instead (`run_migration`).
    """
    from apiana_lab.experiments.engine import loaded

    if new_backend or new_dtype or new_engine_options:
        kwargs = {k: v for k, v in kwargs.items() if not (k.startswith("new_") and not v)}  # unset: unchanged
        old = {"backend": backend, "dtype": dtype, "engine_options": engine_options or {}}
        new = {
            "backend": new_backend or backend,
            "dtype": new_dtype or dtype,
            "engine_options": new_engine_options if new_engine_options is not None else engine_options or {},
        }
        unknown = set(kwargs) - {"batch_size", "max_workers", "max_length", "thresholds"}
        if unknown:
            raise ConfigError(
                f"{', '.join(sorted(unknown))} cannot be combined with another engine on the new side; "
                f"change one thing at a time."
            )
        return run_migration(chunks, old, new, model=model, **kwargs)
    options = dict(engine_options or {})
    with loaded(backend, model, dtype=options.pop("dtype", dtype), **options) as provider:
        return run_ab(chunks, provider, **kwargs)


def sides(result: dict) -> list[dict]:
    """Old and new side by side: chunks, failures, seconds, output tokens/s.

    From a run_ab or compare_outputs result.
    """
    out = []
    for side in ("old", "new"):
        figures = result[side]
        out.append(
            {
                "side": side,
                "mode": figures.get("mode"),
                # run_ab measures the transform; compare_outputs reads run.json, which names them differently.
                "chunks": figures.get("chunks", figures.get("chunks_total")),
                "failed": figures.get("failed"),
                "seconds": figures.get("wall_s", figures.get("summarize_seconds")),
                "completion_tokens_per_s": figures.get("completion_tokens_per_s"),
                "batch_size": figures.get("batch_size"),
                "max_length": figures.get("max_tokens", figures.get("max_length")),
            }
        )
    return out


def compare_outputs(old_dir: str | Path, new_dir: str | Path, thresholds: Thresholds | None = None) -> dict:
    """Compare two finished runs' output folders by chunk id, without recomputing anything.

    Reads each folder's summaries.jsonl (the run's list: where a duplicate would show) and its
    run.json (failed chunks, wall time).
    """
    sides = []
    for folder in (Path(old_dir), Path(new_dir)):
        jsonl, run_json = folder / "summaries.jsonl", folder / "run.json"
        if not jsonl.is_file() or not run_json.is_file():
            raise ConfigError(
                f"{folder} is not a finished run's output folder (needs summaries.jsonl and run.json); "
                f"run chatgpt-export-v2 -o {folder} first."
            )
        rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
        if any(not r.get("quality") for r in rows) and (folder / "apiana.sqlite").is_file():
            rows = _profiled(rows, folder / "apiana.sqlite")  # a run from before quality profiles
        run = json.loads(run_json.read_text(encoding="utf-8"))
        rows += [
            {"chunk_id": cid, "error": why, "summary": "", "completion_tokens": 0}
            for cid, why in (run.get("failed_chunks") or {}).items()
        ]
        sides.append((rows, run))
    (old, old_run), (new, new_run) = sides
    expected = list(dict.fromkeys([r["chunk_id"] for r in old] + [r["chunk_id"] for r in new]))
    rows, summary = compare(old, new, expected)
    wall_old, wall_new = old_run.get("summarize_seconds"), new_run.get("summarize_seconds")
    speedup = wall_old / wall_new if wall_old and wall_new else None
    migration = _setup(old_run, old) != _setup(new_run, new)
    return {"rows": rows, "verdict": verdict(summary, thresholds, speedup, migration), "old": old_run, "new": new_run}


def _setup(run: dict, rows: list[dict]) -> tuple:
    """What decides a run's text besides the orchestration: engine, model, dtype, options, prompt."""
    engine = run.get("engine_options") or {}
    return (
        run.get("backend"),
        run.get("model"),
        engine.get("dtype"),
        run.get("max_length"),
        run.get("temperature"),
        run.get("seed"),
        run.get("repetition_penalty", 1.0),
        tuple(sorted({(r.get("prompt_hash"), r.get("options_hash")) for r in rows if r.get("prompt_hash")})),
    )


def _profiled(rows: list[dict], db: Path) -> list[dict]:
    from apiana_lab.quality import profile
    from apiana_lab.store import SQLiteStore

    with SQLiteStore(db) as store:
        texts = {c.id: c.text for c in store.load_chunks([r["chunk_id"] for r in rows])}
    return [
        {
            **r,
            "quality": r.get("quality")
            or profile(r["summary"], texts[r["chunk_id"]], r.get("finish_reason")).to_dict(),
        }
        for r in rows
    ]


def profiled_rows(records, chunks) -> list[dict]:
    """`compare`'s input from a transform's records: each finished summary with its quality profile."""
    from apiana_lab.quality import profile

    texts = {c.id: c.text for c in chunks}
    rows = []
    for record in records:
        row = {
            "chunk_id": record.chunk_id,
            "summary": record.summary,
            "error": record.error,
            "completion_tokens": record.completion_tokens,
            "finish_reason": record.finish_reason,
        }
        if record.error is None:
            row["quality"] = profile(record.summary, texts[record.chunk_id], record.finish_reason).to_dict()
        rows.append(row)
    return rows


def _share(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def _at_least(value, threshold) -> bool:
    return value is not None and value >= threshold


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
