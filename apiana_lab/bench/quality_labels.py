"""How well each quality flag agrees with human labels: precision and recall on the labelled set.

    python -m apiana_lab.bench.quality_labels [--labels tests/data/quality_labels.jsonl]

The set (tests/data/quality_labels.jsonl, described in tests/data/quality_labels.md) holds the
bundled model's real outputs on the sample export, good memories written by hand and hand-made
bad ones, each with the flags a reader gave it. Writes results/bench-quality/labels.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from apiana_lab.experiments.record import machine, markdown_table, write_result
from apiana_lab.quality import DEFAULT_THRESHOLDS, load_labels, score_flags

logger = logging.getLogger("apiana_lab.bench.quality_labels")

LABELS_PATH = Path(__file__).resolve().parent.parent.parent / "tests" / "data" / "quality_labels.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default=str(LABELS_PATH), help="the labelled set (JSONL)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    records = load_labels(args.labels)
    result = score_flags(records)
    held_out = [r for r in records if r.get("split") == "held_out"]
    held_result = score_flags(held_out) if held_out else None
    origins: dict[str, int] = {}
    for r in records:
        origins[r["origin"]] = origins.get(r["origin"], 0) + 1
    figures = {
        "machine": machine(),
        "labels": args.labels,
        "origins": origins,
        "thresholds": dataclasses.asdict(DEFAULT_THRESHOLDS),
        **result,
        "held_out": held_result,
    }
    columns = [
        ("flag", "flag"),
        ("positives", "labelled"),
        ("flagged", "flagged"),
        ("tp", "tp"),
        ("fp", "fp"),
        ("fn", "fn"),
        ("precision", "precision"),
        ("recall", "recall"),
    ]
    md = [
        "# Quality flags against human labels",
        "",
        f"{len(records)} labelled summaries ({', '.join(f'{n} {o}' for o, n in sorted(origins.items()))}): "
        "`model` = SmolLM2-135M-Instruct's real outputs on the sample export, read and labelled by hand; "
        "`hand` = good first-person memories written by hand; `made` = hand-made bad ones and hard good ones "
        "(tests/data/quality_labels.md). Precision is blank where a flag was never raised.",
        "",
        "## All records",
        "",
        "The thresholds were chosen on the `tuning` records, so on them this is agreement, not a held-out estimate.",
        "",
        markdown_table([{"flag": f, **v} for f, v in result["flags"].items()], columns),
        "",
    ]
    if held_result:
        md += [
            f"## Held out: {len(held_out)} outputs of a run labelled before profiling and used to choose nothing",
            "",
            f"({held_out[0]['model']}.)",
            "",
            markdown_table([{"flag": f, **v} for f, v in held_result["flags"].items()], columns),
            "",
        ]
    md += [
        "Thresholds: " + ", ".join(f"`{k}={v}`" for k, v in dataclasses.asdict(DEFAULT_THRESHOLDS).items()),
        "",
        "Disagreements: "
        + (
            "; ".join(
                f"{flag}: " + ", ".join(f"{m['id']} ({'missed' if 'missed' in m else 'false alarm'})" for m in ms)
                for flag, ms in result["misses"].items()
            )
            or "none"
        ),
        "",
        "Rerun: `python -m apiana_lab.bench.quality_labels`",
    ]
    json_path, md_path = write_result("bench-quality", "labels", figures, "\n".join(md))
    logger.info("%s\n\nwrote %s and %s", "\n".join(md), json_path, md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
