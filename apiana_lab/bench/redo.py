"""What one `--redo flagged` buys: the flagged share before and after, for each set of options tried.

    python -m apiana_lab.bench.redo [--backend vllm] [--max-length 300]

The sample export with the bundled model, greedy first (what `make demo` writes). Then, each on a
copy of that output folder, one redo of every flagged chunk with other options: sampling with a
seed, a repetition penalty, both, and a longer max_length. One engine serves every run. Writes
results/bench-redo/redo.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from apiana_lab.experiments.record import machine, markdown_table, write_result

TRIES = [  # (name, RunConfig fields for the redo)
    ("sampling, temperature 0.7, seed 1", {"temperature": 0.7, "seed": 1}),
    ("repetition penalty 1.2", {"repetition_penalty": 1.2}),
    ("temperature 0.7, seed 1, repetition penalty 1.2", {"temperature": 0.7, "seed": 1, "repetition_penalty": 1.2}),
    ("max_length x2", {"max_length": None}),  # filled in from --max-length
]


def main() -> None:
    from apiana_lab.experiments.engine import loaded
    from apiana_lab.export.synth import SAMPLE_PATH
    from apiana_lab.pipeline import RunConfig, run_export

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="vllm")
    parser.add_argument("--max-length", type=int, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="apiana-redo-"))
    base = dict(input=str(SAMPLE_PATH), backend=args.backend, max_length=args.max_length)
    rows = []
    with loaded(args.backend) as provider:
        first = run_export(RunConfig(output=str(work / "greedy"), **base), provider=provider)
        before = first["quality"]
        rows.append({"options": "greedy (the first run)", "redone": None, **_figures(before)})
        print(rows[-1], flush=True)
        for name, changes in TRIES:
            changes = {k: (2 * args.max_length if k == "max_length" and v is None else v) for k, v in changes.items()}
            out = work / name.replace(" ", "_").replace(",", "")
            shutil.copytree(work / "greedy", out)
            after = run_export(RunConfig(output=str(out), **{**base, **changes}, redo=["flagged"]), provider=provider)
            rows.append({"options": name, "redone": after["redo"]["picked"], **_figures(after["quality"])})
            print(rows[-1], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    flags = [k for k in rows[0] if k.startswith("flag ")]
    table = markdown_table(
        rows,
        [
            ("options", "options of the redo"),
            ("redone", "chunks redone"),
            ("flagged", "flagged after"),
            ("flagged_share", "share"),
            *[(k, k.removeprefix("flag ")) for k in flags],
        ],
    )
    markdown = (
        f"# One redo of the flagged summaries ({args.backend}, the bundled model, the sample, max_length "
        f"{args.max_length})\n\nThe first row is the greedy run; every other row is one `--redo flagged` on a "
        f"copy of it, keeping per chunk the version with the fewest flags.\n\n{table}\n\n"
        f"Rerun: `python -m apiana_lab.bench.redo --backend {args.backend} --max-length {args.max_length}`\n"
    )
    write_result("bench-redo", "redo", {"machine": machine(), "rows": rows}, markdown)
    print(markdown)


def _figures(quality: dict) -> dict:
    return {
        "flagged": quality["flagged"],
        "flagged_share": quality["flagged_share"],
        **{f"flag {name}": f["count"] for name, f in quality["flags"].items()},
    }


if __name__ == "__main__":
    main()
