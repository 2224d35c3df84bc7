"""`apiana-lab review OUT`: how good a run's memories are, by quality flag, with the worst beside their chunks."""

from __future__ import annotations

import json
from pathlib import Path

from apiana_lab.errors import ConfigError
from apiana_lab.quality import FLAGS, summarize_profiles


def review(output_dir: str | Path, flag: str | None = None, worst: int = 5, excerpt: int = 300) -> dict:
    """Counts per flag over the run's kept summaries, then the `worst` ones (most flags first) with chunk excerpts.

    With `flag`, the examples are those carrying it. The store is opened as a run would open it:
    summaries from before quality profiles are profiled (and saved) first.
    """
    if flag is not None and flag not in FLAGS:
        raise ConfigError(f"unknown flag {flag!r}; flags: {', '.join(FLAGS)}")

    def worst_first(kept: list[dict]) -> list[dict]:
        chosen = [r for r in kept if flag is None or flag in r["quality"]["flags"]]
        # Most flags first; among equals, the loopiest and most copied, which a reader notices first.
        chosen.sort(
            key=lambda r: (-len(r["quality"]["flags"]), -r["quality"]["repeated_ngrams"], -r["quality"]["coverage"])
        )
        return chosen[:worst]

    folder = Path(output_dir)
    kept, chosen, texts = _read_run(folder, worst_first)
    return {
        "output": str(folder),
        "quality": summarize_profiles(r["quality"] for r in kept),
        "flag": flag,
        "examples": [
            {
                "chunk_id": r["chunk_id"],
                "title": r["title"],
                "flags": r["quality"]["flags"],
                "finish_reason": r["finish_reason"],
                "versions": r["versions"],
                "summary": _cut(r["summary"], excerpt),
                "chunk": _cut(texts[r["chunk_id"]], excerpt),
            }
            for r in chosen
        ],
    }


def format_review(result: dict) -> str:
    """The review as text: a line per flag, then each example with its chunk."""
    q = result["quality"]
    lines = [f"{result['output']}: {q['count']} summaries, {q['flagged']} flagged ({q['flagged_share']:.0%})"]
    for name, figures in q["flags"].items():
        lines.append(f"  {name:<17} {figures['count']:>6}  {figures['share']:>5.0%}")
    if q["count"]:
        m = q["medians"]
        lines.append(
            f"  medians: compression {m.get('compression', 0):.3f}, coverage {m.get('coverage', 0):.2f}, "
            f"density {m.get('density', 0):.1f}, repeated n-grams {m.get('repeated_ngrams', 0):.2f}"
        )
    what = f"carrying {result['flag']!r}" if result["flag"] else "with the most flags"
    lines.append(
        f"\nThe {len(result['examples'])} summaries {what}:" if result["examples"] else f"\nNo summary {what}."
    )
    for e in result["examples"]:
        lines.append(
            f"\n— {e['title'] or '(untitled)'} [{e['chunk_id'][:12]}] flags: {', '.join(e['flags']) or 'none'}"
            f" · finish: {e['finish_reason']}" + (f" · {e['versions']} versions" if e["versions"] > 1 else "")
        )
        lines.append("  summary: " + e["summary"].replace("\n", " ⏎ "))
        lines.append("  chunk:   " + e["chunk"].replace("\n", " ⏎ "))
    return "\n".join(lines)


def _read_run(folder: Path, choose) -> tuple[list[dict], list[dict], dict[str, str]]:
    """A finished run's kept summaries, those `choose` picks from them, and the picked ones' chunk texts.

    The store is opened as a run would open it: summaries from before quality profiles are
    profiled (and saved) first.
    """
    from apiana_lab.store import SQLiteStore

    jsonl, db = folder / "summaries.jsonl", folder / "apiana.sqlite"
    if not jsonl.is_file() or not db.is_file():
        raise ConfigError(
            f"{folder} holds no finished run (needs summaries.jsonl and apiana.sqlite); "
            f"run chatgpt-export-v2 -o {folder} first."
        )
    ids = [json.loads(line)["chunk_id"] for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    with SQLiteStore(db) as store:
        store.profile_missing()
        kept = list(store.kept_versions(ids))
        chosen = choose(kept)
        texts = {c.id: c.text for c in store.load_chunks([r["chunk_id"] for r in chosen])}
    return kept, chosen, texts


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def quality_frame(output_dir: str | Path, excerpt: int = 400):
    """One row per kept summary of a run: the profile's measures, its flags, the summary and an excerpt of its chunk."""
    import pandas as pd

    kept, _, texts = _read_run(Path(output_dir), lambda kept: kept)
    rows = [
        {
            "chunk_id": r["chunk_id"],
            "title": r["title"],
            "flags": ", ".join(r["quality"]["flags"]),
            "flagged": bool(r["quality"]["flags"]),
            **{k: v for k, v in r["quality"].items() if k != "flags"},
            "summary": r["summary"],
            "chunk": _cut(texts[r["chunk_id"]], excerpt),
        }
        for r in kept
    ]
    frame = pd.DataFrame(rows)
    frame.attrs["quality"] = summarize_profiles(r["quality"] for r in kept)
    return frame


def flag_table(frame):
    """Count and share of each flag over a quality_frame, with the share flagged at all."""
    import pandas as pd

    q = frame.attrs.get("quality") or summarize_profiles([])
    rows = [{"flag": "any", "count": q["flagged"], "share": q["flagged_share"]}]
    rows += [{"flag": name, "count": f["count"], "share": f["share"]} for name, f in q["flags"].items()]
    return pd.DataFrame(rows)
