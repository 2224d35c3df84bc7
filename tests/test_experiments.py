"""The experiments behind the notebooks: profile, sample, plan, A/B verdicts, results folders (fake provider only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apiana_lab.cli import export_v2_main, main
from apiana_lab.errors import ConfigError
from apiana_lab.experiments import ab
from apiana_lab.experiments.measure import sample_chunks
from apiana_lab.experiments.plan import plan_export
from apiana_lab.experiments.profile import profile_export
from apiana_lab.experiments.results import ResultsRun, list_runs, run_id, write_index
from apiana_lab.pipeline import RunConfig, run_export
from apiana_lab.providers.fake import FakeProvider

SAMPLE = Path("apiana_lab/data/sample_export.json").resolve()


def test_profile_counts_match_inspect_and_keep_every_chunk_size(dialogue_export):
    profile = profile_export(dialogue_export, chunk_size=64)
    assert profile.totals["conversations"] == 12 and profile.totals["chunks"] == 144 == len(profile.chunk_tokens)
    assert sum(profile.chunk_tokens) == profile.totals["tokens"] == sum(r["tokens"] for r in profile.conversations)
    df = profile.to_pandas()
    assert list(df["month"].unique()) == ["2023-11"] and df["chunks"].sum() == 144
    assert profile.inspect_json()["totals"] == profile.totals


def test_sample_spans_short_median_and_long_chunks():
    profile = profile_export(SAMPLE, chunk_size=300)
    picked = sample_chunks(SAMPLE, 5, chunk_size=300, profile=profile)
    counts = sorted(profile.chunk_tokens)
    tokens = sorted(c.token_count for c in picked)
    assert len(picked) == 5 and len({c.id for c in picked}) == 5
    assert tokens[0] <= counts[len(counts) // 5] and tokens[-1] >= counts[-(len(counts) // 5) - 1]
    assert min(counts) <= tokens[2] <= max(counts)


def test_plan_projects_a_run_within_a_quarter_of_what_it_takes(dialogue_export, tmp_path):
    """A latency-bound fake: the projection from 12 sampled chunks against the real run of all 144."""
    def slow():
        return FakeProvider(batch=False, latency=0.02)

    plan = plan_export(dialogue_export, "fake", sample=12, chunk_size=64, max_length=16, max_workers=4, provider=slow())
    result = run_export(RunConfig(input=str(dialogue_export), output=str(tmp_path / "out"), backend="fake", chunk_size=64,
                                  max_length=16, max_workers=4), provider=slow())
    projected = plan["projection"]["prefill_seconds"] + plan["projection"]["decode_seconds"]
    assert plan["export"]["chunks"] == 144 and plan["sample"]["chunks"] == 12
    assert plan["projection"]["low_seconds"] <= plan["projection"]["seconds"] <= plan["projection"]["high_seconds"]
    assert abs(projected - result["summarize_seconds"]) <= 0.25 * result["summarize_seconds"], (projected, result["summarize_seconds"])
    assert plan["target"]["met"] in (True, False) and plan["target"]["projected_seconds"] > 0


def test_plan_command_prints_a_table_and_json_and_rejects_a_wrong_option(capsys):
    assert main(["plan", str(SAMPLE), "--backend", "fake", "--sample", "3", "--chunk-size", "600"]) == 0
    out = capsys.readouterr().out
    assert "projection:" in out and "target:" in out
    assert main(["plan", str(SAMPLE), "--backend", "fake", "--sample", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sample"]["chunks"] == 3
    assert main(["plan", str(SAMPLE), "--backend", "fake", "--max-model-len", "10"]) == 2
    assert "does not take the option 'max_model_len'" in capsys.readouterr().err


def rec(cid, summary, tokens=10, finish="stop", error=None):
    return {"chunk_id": cid, "summary": summary, "completion_tokens": tokens, "finish_reason": finish, "error": error}


def test_compare_scores_each_chunk_and_finds_missing_and_duplicated_ones():
    old = [rec("a", "I walked the dog."), rec("b", "I cooked dinner."), rec("c", "I read a book.")]
    new = [rec("a", "I walked the dog."), rec("b", "I cooked a nice dinner.", 12), rec("b", "I cooked a nice dinner.", 12)]
    rows, s = ab.compare(old, new, ["a", "b", "c"])
    assert [r["chunk_id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["exact"] and rows[0]["similarity"] == 1.0
    assert not rows[1]["exact"] and 0.5 < rows[1]["similarity"] < 1.0 and rows[1]["length_ratio"] == 1.2
    assert (s["missing_new"], s["duplicated_new"], s["compared"]) == (1, 1, 2)
    v = ab.verdict(s, ab.Thresholds(min_exact_match=0.0))
    assert not v.go and [c.name for c in v.failed] == ["chunks missing, duplicated or extra (either side)"]


def test_verdict_is_go_only_when_every_check_holds_and_raises_naming_the_failures():
    old = [rec(c, f"Summary number {c} of the day.") for c in "abcd"]
    rows, s = ab.compare(old, [dict(r) for r in old])
    assert ab.verdict(s, speedup=2.0).go
    short = [rec(r["chunk_id"], r["summary"][:8], tokens=3, finish="length") for r in old]
    v = ab.verdict(ab.compare(old, short)[1], speedup=2.0)
    names = {c.name for c in v.failed}
    assert not v.go and {"length ratio median (new/old)", "finish-reason agreement", "exact-match rate"} <= names
    with pytest.raises(ab.ABCheckFailed, match="length ratio median") as raised:
        v.raise_if_no_go()
    assert raised.value.verdict is v and "NO-GO" in str(v)
    assert not ab.verdict(s, speedup=0.5).go  # slower than the old pipeline is NO-GO by default


@pytest.mark.parametrize("bad", [dict(min_exact_match=1.5), dict(min_similarity_p10=-0.1), dict(length_ratio_range=(1.2, 2.0))])
def test_thresholds_outside_their_range_are_refused(bad):
    with pytest.raises(ConfigError, match="must be"):
        ab.Thresholds(**bad)


def test_run_ab_in_process_is_go_on_the_same_setup_and_no_go_on_another_max_length(tokenizer):
    from apiana_lab.chunking import Chunker, ChunkingOptions
    from apiana_lab.export import read_export

    chunks = list(Chunker(ChunkingOptions(chunk_size=300), tokenizer).chunk_all(read_export(SAMPLE)))[:8]
    loose = ab.Thresholds(min_speedup=0.0)  # the fake takes no time: speed says nothing here
    same = ab.run_ab(chunks, FakeProvider(), batch_size=4, max_length=32, thresholds=loose)
    assert same["verdict"].go and same["verdict"].summary["exact_match_rate"] == 1.0
    changed = ab.run_ab(chunks, FakeProvider(), batch_size=4, max_length=32, new_max_length=3, thresholds=loose)
    assert not changed["verdict"].go


def test_compare_outputs_reads_two_finished_runs_without_recomputing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("APIANA_PARALLEL", raising=False)
    for name, extra in (("old", ["--sequential"]), ("new", [])):
        assert export_v2_main(["-i", str(SAMPLE), "-o", str(tmp_path / name), "--backend", "fake", "--no-progress",
                               "--chunk-size", "600", *extra]) == 0
    result = ab.compare_outputs(tmp_path / "old", tmp_path / "new", ab.Thresholds(min_speedup=0.0))
    assert result["verdict"].go and result["verdict"].summary["compared"] == 13
    with pytest.raises(ConfigError, match="not a finished run"):
        ab.compare_outputs(tmp_path / "old", tmp_path / "nowhere")


def test_results_runs_are_listed_and_indexed(tmp_path, capsys):
    params = {"backend": "fake", "chunks": 4}
    first = ResultsRun.create("ab_migration_check", params, root=tmp_path)
    assert first.folder == tmp_path / "ab_migration_check" / first.run_id and first.run_id.endswith(run_id(params)[-8:])
    first.table("per_chunk", [{"chunk_id": "a", "similarity": 1.0}])
    first.metrics({"exact_match_rate": 1.0}, verdict={"verdict": "GO"}, key={"exact_match_rate": 1.0})
    (first.folder / "ab_migration_check.ipynb").write_text("{}")
    second = ResultsRun.create("batch_size_sweep", {"b": [1, 2]}, root=tmp_path)
    second.metrics({}, key={"recommended_batch_size": 2})
    runs = list_runs(tmp_path)
    assert {r["notebook"] for r in runs} == {"ab_migration_check", "batch_size_sweep"}
    ab_run = next(r for r in runs if r["notebook"] == "ab_migration_check")
    assert ab_run["verdict"] == "GO" and ab_run["executed_notebook"].endswith("ab_migration_check.ipynb")
    index = write_index(tmp_path).read_text()
    assert "| ab_migration_check |" in index and "[notebook](ab_migration_check/" in index and "GO" in index
    assert main(["results", "--root", str(tmp_path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    metrics = json.loads((first.folder / "metrics.json").read_text())
    assert metrics["parameters"] == params and "python" in metrics["versions"] and metrics["machine"]["cores"] >= 1
