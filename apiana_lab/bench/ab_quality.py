"""Data behind the A/B check's quality tolerances: the design's migration, and two changes that must fail.

    python -m apiana_lab.bench.ab_quality            # generate every side, then judge
    python -m apiana_lab.bench.ab_quality --judge    # judge the saved outputs again (after a threshold change)

On the sample export's chunks (default chunk size, 300 new tokens, greedy, the bundled model):
- old: the sequential transformers pipeline in float32 (the design's starting point);
- new: the parallel vLLM pipeline in bfloat16 where the CPU has it (the migration);
- cut: the same vLLM pipeline with max_length cut to 48;
- transcript: the same vLLM pipeline with a system prompt that asks for a transcript.
Verdicts: old -> new must be GO; old -> cut, old -> transcript, new -> cut and new -> transcript
must be NO-GO. Every side's summaries are saved, so the judging can be redone without an engine.
Writes results/bench-ab-quality/ab-quality.{json,md} and outputs.json.
"""

from __future__ import annotations

import argparse
import json

from apiana_lab.bench.common import RESULTS_DIR, machine, markdown_table, write_results

NAME = "bench-ab-quality"
TRANSCRIPT_PROMPT = ("Rewrite the conversation below as a transcript: every turn on its own line, starting with "
                     "'User:' or 'Assistant:', word for word.")
CUT = 48
CASES = [  # (old side, new side, the verdict the tolerances must give)
    ("old", "new", "GO"),
    ("old", "cut", "NO-GO"),
    ("old", "transcript", "NO-GO"),
    ("new", "cut", "NO-GO"),
    ("new", "transcript", "NO-GO"),
]


def generate(max_length: int) -> dict:
    """Every side's records as plain rows, with the chunks' texts."""
    from apiana_lab.experiments.compare import backend_options
    from apiana_lab.experiments.measure import measure, sample_chunks
    from apiana_lab.export.synth import SAMPLE_PATH
    from apiana_lab.providers.registry import get_provider
    from apiana_lab.summarize import ParallelSummarizerTransform, SummarizerTransform

    chunks = sample_chunks([str(SAMPLE_PATH)], 12)
    sides: dict = {}

    def keep(name: str, figures: dict, records) -> None:
        sides[name] = {"figures": figures, "rows": [
            {"chunk_id": r.chunk_id, "summary": r.summary, "error": r.error, "completion_tokens": r.completion_tokens,
             "finish_reason": r.finish_reason} for r in records]}
        print(name, {k: figures.get(k) for k in ("wall_s", "completion_tokens")}, flush=True)

    with get_provider("transformers", **backend_options("transformers", "float32", {})) as provider:
        keep("old", *measure(SummarizerTransform(provider, max_length=max_length), chunks, config="old"))
    with get_provider("vllm", **backend_options("vllm", "auto", {"enable_prefix_caching": False})) as provider:
        try:  # what the engine resolved "auto" to: bfloat16 where the CPU has it natively, else float32
            dtype = str(provider.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        except AttributeError:
            dtype = "auto"
        for name, kwargs in (("new", {}), ("cut", {"max_length": CUT}), ("transcript", {"system_prompt": TRANSCRIPT_PROMPT})):
            transform = ParallelSummarizerTransform(provider, **{"max_length": max_length, **kwargs})
            keep(name, *measure(transform, chunks, config=name))
    return {"chunks": {c.id: c.text for c in chunks}, "sides": sides, "vllm_dtype": dtype, "max_length": max_length}


def judge(outputs: dict) -> list[dict]:
    """Each case's verdict, with the figures that decided it."""
    from apiana_lab.experiments import ab
    from apiana_lab.quality import profile

    texts = outputs["chunks"]

    def rows(side: str) -> list[dict]:
        return [{**r, "quality": profile(r["summary"], texts[r["chunk_id"]], r["finish_reason"]).to_dict()}
                for r in outputs["sides"][side]["rows"]]

    results = []
    for old, new, expected in CASES:
        table, summary = ab.compare(rows(old), rows(new), list(texts))
        verdict = ab.verdict(summary, migration=True)
        q = summary["quality"]
        results.append({
            "case": f"{old} -> {new}", "expected": expected, "verdict": "GO" if verdict.go else "NO-GO",
            "flagged_old": q["flags"]["any"]["old"], "flagged_new": q["flags"]["any"]["new"],
            "flagged_bound": q["flags"]["any"]["lower_bound"],
            **{f"{m}_ratio": q["measures"][m]["ratio"] for m in ab.QUALITY_MEASURES},
            **{f"{m}_interval": [q["measures"][m]["ratio_low"], q["measures"][m]["ratio_high"]] for m in ab.QUALITY_MEASURES},
            "flags_new_minus_old": {k: round(v["new"] - v["old"], 3) for k, v in q["flags"].items()},
            "exact_match_rate": summary["exact_match_rate"], "similarity_median": summary["similarity_median"],
            "failed": [c.name for c in verdict.failed],
        })
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", action="store_true", help="judge the saved outputs again; load no engine")
    parser.add_argument("--max-length", type=int, default=300)
    args = parser.parse_args()
    saved = RESULTS_DIR / NAME / "outputs.json"
    if args.judge:
        outputs = json.loads(saved.read_text(encoding="utf-8"))
    else:
        outputs = generate(args.max_length)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(outputs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    results = judge(outputs)
    for r in results:
        print(r["case"], r["verdict"], "(expected", r["expected"] + ")", "; ".join(r["failed"]), flush=True)
    table = markdown_table(results, [("case", "old -> new"), ("expected", "expected"), ("verdict", "verdict"),
                                     ("flagged_old", "flagged old"), ("flagged_new", "flagged new"),
                                     ("flagged_bound", "new - old, 95% lower bound"),
                                     ("compression_ratio", "compression new/old"), ("coverage_ratio", "coverage new/old"),
                                     ("density_ratio", "density new/old"), ("exact_match_rate", "exact match"),
                                     ("similarity_median", "similarity median")])
    failed = "\n".join(f"- {r['case']}: {'; '.join(r['failed']) or 'none'}" for r in results)
    markdown = (f"# A/B quality tolerances on the sample ({len(outputs['chunks'])} chunks, max_length "
                f"{outputs['max_length']}, vLLM dtype {outputs['vllm_dtype']})\n\n{table}\n\nFailed checks:\n{failed}\n")
    write_results(NAME, "ab-quality", {"machine": machine(), "results": results}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
