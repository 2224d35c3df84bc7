"""How fast the model-free quality profile runs: summaries profiled per second on one core.

    python -m apiana_lab.bench.quality [--summaries 50000] [--pairs 1000]

Builds `--pairs` distinct (chunk, summary) pairs (`make_pairs`): chunks of about 1,000 words laid
out as a transcript, summaries of about 150 words. Then profiles `--summaries` of them, cycling
through the pairs in one thread (not pinned: on a shared machine the pinned core may be the busy
one; CPU seconds are reported beside wall seconds for the same reason). The detector's one-off
load is timed apart. Writes results/bench-quality/quality.json and .md.
"""

from __future__ import annotations

import os

# One core means one thread: keep numpy's BLAS (used by the language detector) from starting more.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

from apiana_lab.experiments.record import machine, markdown_table, write_result  # noqa: E402
from apiana_lab.export.reader import read_export  # noqa: E402
from apiana_lab.export.synth import SAMPLE_PATH  # noqa: E402
from apiana_lab.quality import profile, summarize_profiles  # noqa: E402

logger = logging.getLogger("apiana_lab.bench.quality")

TARGET_SECONDS = 60.0  # the issue: 50,000 summaries in well under a minute, on one core
_FRENCH = (
    "L'utilisateur m'a demandé comment préparer son entretien. Je lui ai conseillé de se renseigner sur "
    "l'entreprise et de prendre des notes. J'ai retenu qu'il faut rester centré sur sa question."
)


def make_pairs(n: int, seed: int = 0, chunk_words: int = 1000, summary_words: int = 150) -> list[tuple[str, str, str]]:
    """`n` distinct (summary, chunk, finish_reason) triples of realistic size and word statistics.

    Words follow a Zipf law over the sample export's English vocabulary padded to 5,000 words, so
    n-grams repeat about as often as in prose. Chunks alternate User/Assistant turns; summaries are
    first-person sentences with a few copied from the chunk. One in ten loops (a sentence eight
    times, stopped at the cap), one in ten echoes the turns, one in twenty is French.
    """
    rng = random.Random(seed)
    counts = Counter(
        w.lower() for c in read_export(SAMPLE_PATH) for e in c.entries for w in re.findall(r"[A-Za-z]+", e.text)
    )
    vocabulary = [w for w, _ in counts.most_common()]  # the sample's words, most frequent first, then made-up ones
    while len(vocabulary) < 5000:
        vocabulary.append(
            "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
        )
    cumulative, total = [], 0.0
    for rank in range(1, len(vocabulary) + 1):
        total += 1 / rank
        cumulative.append(total)

    def sentence(lo: int = 6, hi: int = 22) -> str:
        words = rng.choices(vocabulary, cum_weights=cumulative, k=rng.randint(lo, hi))
        return " ".join(words).capitalize() + rng.choice(".....?!")

    pairs = []
    for i in range(n):
        turns, words, speaker = [], 0, "User"
        while words < chunk_words:
            turn = " ".join(sentence() for _ in range(rng.randint(1, 6)))
            turns.append(f"{speaker}: {turn}")
            words += len(turn.split())
            speaker = "Assistant" if speaker == "User" else "User"
        chunk = "\n\n".join(turns)
        copied = re.findall(r"[A-Z][^.?!:]*[.?!]", chunk)
        parts, words = [f"The user told me that {sentence().lower()}"], 0
        while words < summary_words:
            part = rng.choice(
                (f"I suggested that {sentence().lower()}", f"I {sentence().lower()}", rng.choice(copied), sentence())
            )
            parts.append(part)
            words += len(part.split())
        kind, finish = i % 20, "stop"
        if kind in (1, 11):
            summary, finish = " ".join(parts[:3] + [parts[3]] * 8), "length"
        elif kind in (2, 12):
            summary = "\n\n".join(turns[:3])
        elif kind == 3:
            summary = _FRENCH
        else:
            summary = " ".join(parts)
        if kind == 4:
            summary, finish = summary.rsplit(" ", 3)[0], "length"  # stopped at the cap, mid-sentence
        pairs.append((summary, chunk, finish))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summaries", type=int, default=50_000, help="profiles to compute")
    parser.add_argument("--pairs", type=int, default=1000, help="distinct (chunk, summary) pairs to cycle through")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pairs = make_pairs(args.pairs, args.seed)
    summary_words = statistics.median(len(s.split()) for s, _, _ in pairs)
    chunk_words = statistics.median(len(c.split()) for _, c, _ in pairs)

    start = time.perf_counter()
    profile(*pairs[0])  # loads the language detector
    load_s = time.perf_counter() - start

    profiles = []
    cpu0, start = time.process_time(), time.perf_counter()
    for i in range(args.summaries):
        summary, chunk, finish = pairs[i % len(pairs)]
        profiles.append(profile(summary, chunk, finish))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0

    figures = {
        "machine": machine(),
        "summaries": args.summaries,
        "distinct_pairs": len(pairs),
        "summary_words_median": summary_words,
        "chunk_words_median": chunk_words,
        "detector_load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "summaries_per_s": round(args.summaries / wall, 1),
        "ms_per_summary": round(1000 * wall / args.summaries, 3),
        "projected_50k_s": round(50_000 * wall / args.summaries, 1),
        "target_50k_s": TARGET_SECONDS,
        "quality": summarize_profiles(profiles[: len(pairs)]),
    }
    row = {
        k: figures[k]
        for k in (
            "summaries",
            "summary_words_median",
            "chunk_words_median",
            "wall_s",
            "cpu_s",
            "summaries_per_s",
            "ms_per_summary",
            "projected_50k_s",
            "detector_load_s",
        )
    }
    md = "\n".join(
        [
            "# Quality profile speed",
            "",
            f"One core of {figures['machine']['cpu']} "
            f"(load average at start {figures['machine']['loadavg_at_start']}). "
            f"{len(pairs)} distinct pairs cycled; the detector's one-off load is not in the rate.",
            "",
            markdown_table(
                [row],
                [
                    ("summaries", "summaries"),
                    ("summary_words_median", "summary words"),
                    ("chunk_words_median", "chunk words"),
                    ("wall_s", "wall s"),
                    ("cpu_s", "CPU s"),
                    ("summaries_per_s", "summaries/s"),
                    ("ms_per_summary", "ms each"),
                    ("projected_50k_s", "50k in s"),
                    ("detector_load_s", "detector load s"),
                ],
            ),
            "",
            f"Target: 50,000 in under {TARGET_SECONDS:.0f} s. Flag shares on the distinct pairs: "
            + ", ".join(f"{k} {v['share']:.0%}" for k, v in figures["quality"]["flags"].items()),
            "",
            "Rerun: `python -m apiana_lab.bench.quality`",
        ]
    )
    json_path, md_path = write_result("bench-quality", "quality", figures, md)
    logger.info(
        "%d summaries in %.1f s (%.0f/s, %.2f ms each) on one core; wrote %s and %s",
        args.summaries,
        wall,
        args.summaries / wall,
        1000 * wall / args.summaries,
        json_path,
        md_path,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
