"""Data behind the A/B check's quality tolerances: the design's migration, and two changes that must fail.

    python -m apiana_lab.bench.ab_quality                      # both workloads, every side, then judge
    python -m apiana_lab.bench.ab_quality --workloads short    # one workload
    python -m apiana_lab.bench.ab_quality --sides new,cut      # regenerate some sides, keep the saved others
    python -m apiana_lab.bench.ab_quality --judge              # judge the saved outputs again (no engine)

Two workloads of the sample export with the bundled model, greedy:
- `real`: its 12 chunks at the default chunk size (3,500 tokens), up to 300 new tokens;
- `short`: its 27 chunks at 300 tokens, up to 96 new tokens (what tests/test_ab_engines.py runs).
Sides on each:
- old: the sequential transformers pipeline in float32 (the design's starting point);
- new: the parallel vLLM pipeline at its default dtype, bfloat16 where the CPU has it (the migration);
- cut: the same vLLM pipeline with max_length cut to a sixth;
- transcript: the same vLLM pipeline with a prompt that asks for a transcript instead of a memory.
Verdicts: old -> new must be GO; old -> cut, old -> transcript, new -> cut and new -> transcript
must be NO-GO. Every side's summaries are saved, so the judging can be redone without an engine.
Writes results/bench-ab-quality/ab-quality.{json,md} and outputs-<workload>.json.
"""

from __future__ import annotations

import argparse
import json

from apiana_lab.experiments.record import machine, markdown_table, results_root, write_result

NAME = "bench-ab-quality"
TRANSCRIPT_SYSTEM = "Rewrite the conversation below as a transcript, word for word."
TRANSCRIPT_TEMPLATE = (
    'Conversation "{title}" ({conversation_date}):\n\n{formatted_messages}\n\n---\n'
    "Write this conversation out again as a transcript, word for word: every turn on its own line, "
    "starting with 'User:' or 'Assistant:'."
)
WORKLOADS = {
    "real": {"n": 12, "chunk_size": 3500, "max_length": 300},
    "short": {"n": 27, "chunk_size": 300, "max_length": 96},
}
SIDES = ("old", "new", "cut", "transcript")
CASES = [  # (old side, new side, the verdict the tolerances must give)
    ("old", "new", "GO"),
    ("old", "cut", "NO-GO"),
    ("old", "transcript", "NO-GO"),
    ("new", "cut", "NO-GO"),
    ("new", "transcript", "NO-GO"),
]


def generate(workload: str, sides, saved: dict | None) -> dict:
    """The chosen sides' records as plain rows, with the chunks' texts; other sides come from `saved`."""
    from apiana_lab.experiments.engine import loaded
    from apiana_lab.experiments.measure import measure, sample_chunks
    from apiana_lab.export.synth import SAMPLE_PATH
    from apiana_lab.summarize import ParallelSummarizerTransform, SummarizerTransform

    w = WORKLOADS[workload]
    chunks = sample_chunks([str(SAMPLE_PATH)], w["n"], w["chunk_size"])
    out = {"chunks": {c.id: c.text for c in chunks}, "sides": {}, "vllm_dtype": "auto", **w}
    if saved and set(saved["chunks"]) == set(out["chunks"]):
        out.update(sides={k: v for k, v in saved["sides"].items() if k not in sides}, vllm_dtype=saved["vllm_dtype"])

    def keep(name: str, figures: dict, records) -> None:
        out["sides"][name] = {
            "figures": figures,
            "rows": [
                {
                    "chunk_id": r.chunk_id,
                    "summary": r.summary,
                    "error": r.error,
                    "completion_tokens": r.completion_tokens,
                    "finish_reason": r.finish_reason,
                }
                for r in records
            ],
        }
        print(workload, name, {k: figures.get(k) for k in ("wall_s", "completion_tokens")}, flush=True)

    if "old" in sides:
        with loaded("transformers", dtype="float32") as provider:
            keep("old", *measure(SummarizerTransform(provider, max_length=w["max_length"]), chunks, config="old"))
    vllm_sides = [s for s in ("new", "cut", "transcript") if s in sides]
    if vllm_sides:
        with loaded("vllm", dtype="auto") as provider:
            try:  # what the engine resolved "auto" to: bfloat16 where the CPU has it natively, else float32
                out["vllm_dtype"] = str(provider.llm.llm_engine.model_config.dtype).removeprefix("torch.")
            except AttributeError:
                pass
            changes = {
                "new": {},
                "cut": {"max_length": max(1, w["max_length"] // 6)},
                "transcript": {"system_prompt": TRANSCRIPT_SYSTEM, "user_template": TRANSCRIPT_TEMPLATE},
            }
            for name in vllm_sides:
                transform = ParallelSummarizerTransform(provider, **{"max_length": w["max_length"], **changes[name]})
                keep(name, *measure(transform, chunks, config=name))
    return out


def judge(outputs: dict) -> list[dict]:
    """Each case's verdict, with the figures that decided it."""
    from apiana_lab.experiments import ab
    from apiana_lab.quality import profile

    texts = outputs["chunks"]

    def rows(side: str) -> list[dict]:
        return [
            {**r, "quality": profile(r["summary"], texts[r["chunk_id"]], r["finish_reason"]).to_dict()}
            for r in outputs["sides"][side]["rows"]
        ]

    results = []
    for old, new, expected in CASES:
        table, summary = ab.compare(rows(old), rows(new), list(texts))
        verdict = ab.verdict(summary, migration=True)
        q = summary["quality"]
        results.append(
            {
                "case": f"{old} -> {new}",
                "expected": expected,
                "verdict": "GO" if verdict.go else "NO-GO",
                "flagged_old": q["flags"]["any"]["old"],
                "flagged_new": q["flags"]["any"]["new"],
                "flagged_bound": q["flags"]["any"]["lower_bound"],
                "echo_bound": q["intensities"]["role_markers"]["lower_bound"],
                **{f"{m}_ratio": q["measures"][m]["ratio"] for m in ab.QUALITY_MEASURES},
                **{
                    f"{m}_interval": [q["measures"][m]["ratio_low"], q["measures"][m]["ratio_high"]]
                    for m in ab.QUALITY_MEASURES
                },
                "flags_new_minus_old": {k: round(v["new"] - v["old"], 3) for k, v in q["flags"].items()},
                "exact_match_rate": summary["exact_match_rate"],
                "similarity_median": summary["similarity_median"],
                "failed": [c.name for c in verdict.failed],
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", action="store_true", help="judge the saved outputs again; load no engine")
    parser.add_argument("--workloads", default="real,short", help="comma-separated: real, short")
    parser.add_argument(
        "--sides", default=",".join(SIDES), help="sides to generate (the others are read from the saved outputs)"
    )
    args = parser.parse_args()
    results, markdown = [], ["# A/B quality tolerances on the sample, with the bundled model\n"]
    for workload in args.workloads.split(","):
        saved_path = results_root() / NAME / f"outputs-{workload}.json"
        saved = json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else None
        if args.judge:
            outputs = saved
        else:
            outputs = generate(workload, args.sides.split(","), saved)
            saved_path.parent.mkdir(parents=True, exist_ok=True)
            saved_path.write_text(json.dumps(outputs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        rows = [{"workload": workload, **r} for r in judge(outputs)]
        results += rows
        table = markdown_table(
            rows,
            [
                ("case", "old -> new"),
                ("expected", "expected"),
                ("verdict", "verdict"),
                ("flagged_old", "flagged old"),
                ("flagged_new", "flagged new"),
                ("echo_bound", "role labels new - old, 95% lower bound"),
                ("compression_ratio", "compression new/old"),
                ("density_ratio", "density new/old"),
                ("exact_match_rate", "exact match"),
                ("similarity_median", "similarity median"),
            ],
        )
        failed = "\n".join(f"- {r['case']}: {'; '.join(r['failed']) or 'none'}" for r in rows)
        markdown.append(
            f"## {workload}: {len(outputs['chunks'])} chunks at chunk size {outputs['chunk_size']}, "
            f"max_length {outputs['max_length']}, vLLM dtype {outputs['vllm_dtype']}\n\n{table}\n\n"
            f"Failed checks:\n{failed}\n"
        )
    write_result(NAME, "ab-quality", {"machine": machine(), "results": results}, "\n".join(markdown))
    print("\n".join(markdown))


if __name__ == "__main__":
    main()
