"""Data behind the A/B check's default thresholds: its figures for a correct setup and for deliberately changed ones.

    python -m apiana_lab.bench.ab_thresholds [float32|bfloat16]

Transformers on 8 chunks of the sample export (600 tokens), 64 new tokens, greedy; old = sequential,
new = parallel (batch 4). Writes results/ab-thresholds/ab-<dtype>.json.
"""

import json
import sys

from apiana_lab.experiments import ab
from apiana_lab.experiments.engine import loaded
from apiana_lab.experiments.measure import sample_chunks
from apiana_lab.experiments.record import results_root
from apiana_lab.export.synth import SAMPLE_PATH


def main() -> None:
    dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
    chunks = sample_chunks([str(SAMPLE_PATH)], 8, 600)
    rows = []
    with loaded("transformers", dtype=dtype) as p:
        for name, kw in [
            ("correct setup", {}),
            ("new max_length 48 (old 64)", {"new_max_length": 48}),
            ("new system prompt", {"new_system_prompt": "Summarize the conversation in one short factual sentence."}),
        ]:
            r = ab.run_ab(chunks, p, batch_size=4, max_length=64, **kw)
            s = r["verdict"].summary
            rows.append(
                {
                    "case": name,
                    "dtype": dtype,
                    **{
                        k: s.get(k)
                        for k in (
                            "compared",
                            "exact_match_rate",
                            "similarity_p10",
                            "similarity_median",
                            "length_ratio_median",
                            "finish_agreement",
                        )
                    },
                    "go": r["verdict"].go,
                    "failed_checks": [c.name for c in r["verdict"].failed],
                }
            )
            print(rows[-1], flush=True)
    out = results_root() / "ab-thresholds" / f"ab-{dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
