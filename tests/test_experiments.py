"""The experiments behind the notebooks: profile, sample, plan, A/B verdicts, results folders (fake provider only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_mixed_export

from apiana_lab.cli import export_v2_main, main
from apiana_lab.errors import ConfigError
from apiana_lab.experiments import ab
from apiana_lab.experiments.compare import (
    compare_backends,
    comparison_table,
    describe_sweep,
    sweep_batch_sizes,
    sweep_table,
    sweep_turn,
)
from apiana_lab.experiments.measure import sample_chunks
from apiana_lab.experiments.plan import format_plan, plan_export, project_rate
from apiana_lab.experiments.profile import profile_export
from apiana_lab.experiments.results import ResultsRun, list_runs, run_id, write_index
from apiana_lab.experiments.summaries import filter_summaries, load_summaries
from apiana_lab.notebook import (
    figure_png,
    plot_comparison,
    plot_per_month,
    plot_similarity,
    plot_sweep,
    plot_token_distribution,
)
from apiana_lab.pipeline import RunConfig, run_export
from apiana_lab.providers.fake import FakeProvider

SAMPLE = Path("apiana_lab/data/sample_export.json").resolve()


def heights(bars) -> list[float]:
    return [b.get_height() for b in bars]


def assert_histogram(bars, values) -> None:
    """A histogram's bars count the values between their own edges, every value once."""
    import numpy as np

    edges = [b.get_x() for b in bars] + [bars[-1].get_x() + bars[-1].get_width()]
    edges[-1] += 1e-9 * max(
        1.0, abs(edges[-1])
    )  # the last bin holds its right edge: keep it through x + width rounding
    counts, _ = np.histogram(values, bins=edges)
    assert heights(bars) == list(counts) and sum(counts) == len(values), (heights(bars), list(counts))


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
    assert tokens[2] == counts[len(counts) // 2]  # the middle pick is the median chunk


def test_plan_projects_a_run_within_a_quarter_of_what_it_takes(dialogue_export, tmp_path):
    """A latency-bound fake: the projection from 12 sampled chunks against the real run of all 144."""

    def slow():
        return FakeProvider(batch=False, latency=0.1)  # long enough that thread start-up is not what is measured

    plan = plan_export(dialogue_export, "fake", sample=12, chunk_size=64, max_length=16, max_workers=4, provider=slow())
    result = run_export(
        RunConfig(
            input=str(dialogue_export),
            output=str(tmp_path / "out"),
            backend="fake",
            chunk_size=64,
            max_length=16,
            max_workers=4,
        ),
        provider=slow(),
    )
    projected = plan["projection"]["prefill_seconds"] + plan["projection"]["decode_seconds"]
    assert plan["export"]["chunks"] == 144 and plan["sample"]["chunks"] == 12
    assert plan["projection"]["low_seconds"] <= plan["projection"]["seconds"] <= plan["projection"]["high_seconds"]
    assert abs(projected - result["summarize_seconds"]) <= 0.25 * result["summarize_seconds"], (
        projected,
        result["summarize_seconds"],
    )
    # The headline target scales the run to a 200 MB export: at 0.1 s a call that is far over an hour.
    target, p = plan["target"], plan["projection"]
    scale = target["megabytes"] / (dialogue_export.stat().st_size / 1e6)
    scaled = p["load_seconds"] + scale * (p["read_and_chunk_seconds"] + p["prefill_seconds"] + p["decode_seconds"])
    assert target["projected_seconds"] == pytest.approx(scaled, rel=0.05)
    assert target["projected_seconds"] > target["seconds"] == 3600 and target["met"] is False


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
    new = [
        rec("a", "I walked the dog."),
        rec("b", "I cooked a nice dinner.", 12),
        rec("b", "I cooked a nice dinner.", 12),
    ]
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


@pytest.mark.parametrize(
    "bad", [dict(min_exact_match=1.5), dict(min_similarity_p10=-0.1), dict(length_ratio_range=(1.2, 2.0))]
)
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
        assert (
            export_v2_main(
                [
                    "-i",
                    str(SAMPLE),
                    "-o",
                    str(tmp_path / name),
                    "--backend",
                    "fake",
                    "--no-progress",
                    "--chunk-size",
                    "600",
                    *extra,
                ]
            )
            == 0
        )
    result = ab.compare_outputs(tmp_path / "old", tmp_path / "new", ab.Thresholds(min_speedup=0.0))
    assert result["verdict"].go and result["verdict"].summary["compared"] == 13
    # It compares what the folders hold: a summary edited on disk shows, where recomputing would hide it.
    jsonl = tmp_path / "new" / "summaries.jsonl"
    lines = jsonl.read_text().splitlines()
    edited = json.loads(lines[0])
    edited["summary"] += " (edited)"
    jsonl.write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
    rows = ab.compare_outputs(tmp_path / "old", tmp_path / "new", ab.Thresholds(min_speedup=0.0))["rows"]
    assert [r["chunk_id"] for r in rows if not r["exact"]] == [edited["chunk_id"]]
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


# -- what the notebooks show ---------------------------------------------------------------------
def test_profile_tables_per_month_chunks_longest_and_skipped(tmp_path):
    profile = profile_export(write_mixed_export(tmp_path / "conversations.json"), chunk_size=64)
    months = profile.per_month()
    assert list(months["month"]) == ["2023-11", "2023-12", "2024-01", "2024-02"]  # the empty months are there, as zeros
    assert list(months["conversations"]) == [11, 0, 0, 1] and months["messages"].sum() == 144
    stats = profile.chunk_stats()
    assert (stats["chunks"], stats["tokens"]) == (144, profile.totals["tokens"])
    assert stats["max_chunk_tokens"] <= 64 and stats["conversations_in_several_chunks"] == 12
    assert 0 < stats["median_chunk_tokens"] <= stats["p90_chunk_tokens"] <= stats["max_chunk_tokens"]
    longest = profile.longest(3)
    assert len(longest) == 3 and list(longest["tokens"]) == sorted(longest["tokens"], reverse=True)
    assert longest["tokens"].iloc[0] == max(r["tokens"] for r in profile.conversations)
    skipped = profile.skipped_table()
    assert list(skipped["reason"]) == ["not_an_object", "no_mapping"] and list(skipped["index"]) == [12, 13]


def test_project_rate_from_a_known_rate(dialogue_export):
    profile = profile_export(dialogue_export, chunk_size=64)
    plan = project_rate(profile, 100.0, 10)
    assert plan["projection"]["generate_seconds"] == 14.4  # 144 chunks x 10 tokens / 100 tok/s
    assert plan["projection"]["seconds"] >= 14.4 and plan["sample"] is None
    text = format_plan(plan)
    assert "rate:        100.0 output tok/s given, 10 tokens per summary" in text and "target:" in text
    with pytest.raises(ValueError, match="positive rate"):
        project_rate(profile, 0.0, 10)


def test_sweep_marks_the_out_of_memory_point_and_recommends_within_it(dialogue_export):
    """The fake runs out of memory above batch 2: that point is a marked row, not a crash."""
    chunks = sample_chunks(dialogue_export, 8, chunk_size=64)
    sweep = sweep_batch_sizes(
        chunks, "fake", [4, 1, 2], max_length=8, engine_options={"oom_above": 2, "latency": 0.02}, interval=0.05
    )
    rows = {r["batch_size"]: r for r in sweep["rows"]}
    assert sorted(rows) == [1, 2, 4] and rows[4]["oom"] and not rows[2]["oom"] and not rows[1]["oom"]
    assert rows[4]["failed"] == 0  # it shrank and finished
    assert sweep["recommended_batch_size"] == 2  # batches of 2 take half the calls of 1, and fit
    table = sweep_table(sweep)
    assert list(table["recommended"]) == [False, True, False] and "peak_kv_cache_pct" not in table
    text = describe_sweep(sweep)
    assert text.startswith("Recommended batch size: 2 (") and "Out of memory or failed at batch size 4 (marked)" in text
    fig = plot_sweep(sweep)
    assert fig.get_suptitle() == "Batch-size sweep: same chunks, one loaded engine"
    ax_tok, ax_mem = fig.axes
    ordered = [rows[b] for b in (1, 2, 4)]
    for ax, column, scale, unit in (
        (ax_tok, "completion_tokens_per_s", 1.0, "output tokens/s"),
        (ax_mem, sweep["memory_key"], 1e3, "peak memory (GB)"),
    ):
        measured, marked, recommended = ax.get_lines()[:3]
        assert list(measured.get_xdata()) == [1, 2, 4] and ax.get_ylabel() == unit
        assert list(measured.get_ydata()) == pytest.approx([r[column] / scale for r in ordered])
        assert list(marked.get_xdata()) == [4] and list(marked.get_ydata()) == pytest.approx([rows[4][column] / scale])
        assert marked.get_label() == "out of memory or failed" and list(recommended.get_xdata()) == [2, 2]
    assert figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_turn_finds_where_throughput_peaks():
    rows = [
        {"batch_size": b, "completion_tokens_per_s": t, "failed": 0, "oom": False}
        for b, t in ((1, 10.0), (2, 20.0), (4, 15.0))
    ]
    turn = sweep_turn(rows + [{"batch_size": 8, "error": "RuntimeError: boom", "oom": False}])
    assert (turn["peak_batch_size"], turn["turns"], turn["largest_batch_size"], turn["largest_vs_peak"]) == (
        2,
        True,
        4,
        0.75,
    )
    rising = sweep_turn(rows[:2])
    assert rising["peak_batch_size"] == 2 and not rising["turns"]
    sweep = {
        "rows": rows,
        "recommended_batch_size": 2,
        "recommended_tokens_per_s": 20.0,
        "memory_limit_mb": 10_000.0,
        "headroom": 0.2,
        "memory_key": "peak_rss_mb",
    }
    assert "peaks at batch size 2 and falls beyond it: batch size 4 reaches 75% of the peak" in describe_sweep(sweep)


def test_comparison_table_and_chart_keep_a_failed_backend_as_a_row(dialogue_export):
    chunks = sample_chunks(dialogue_export, 4, chunk_size=64)
    result = compare_backends(chunks, ["fake"], max_length=8, engine_options={"fake": {"latency": 0.01}}, interval=0.05)
    rows = result["rows"] + [{"backend": "broken", "model": None, "dtype": None, "error": "ConfigError: no engine"}]
    table = comparison_table(rows)
    assert list(table["backend"]) == ["fake", "broken"] and table["error"].isna().tolist() == [True, False]
    assert (
        table.loc[0, "completion_tokens_per_s"] > 0 and table.loc[0, "peak_rss_mb"] > 0 and table.loc[0, "load_s"] >= 0
    )
    for column in ("prompt_tokens_per_s", "chunks_per_s", "latency_p50_s", "latency_p90_s", "wall_s", "failed"):
        assert column in table
    fig = plot_comparison(table)
    assert fig.get_suptitle() == "Backends on the same chunks"
    bars = {ax.get_title(loc="left"): {c.get_label(): heights(c) for c in ax.containers} for ax in fig.axes}
    drawn = lambda column: list(table[column].astype(float).fillna(0.0))  # the failed backend: a zero bar
    peaks = [c for c in table.columns if c.startswith("peak_") and c.endswith("_mb")]
    assert "peak_rss_mb" in peaks
    assert bars == {
        "Generation speed (above each bar: share of summaries flagged)": {"output": drawn("completion_tokens_per_s")},
        "Prompt processing speed": {"prompt": drawn("prompt_tokens_per_s")},
        "Load time and run time": {"load": drawn("load_s"), "run": drawn("wall_s")},
        "Peak memory per source": {c.removeprefix("peak_").removesuffix("_mb"): drawn(c) for c in peaks},
    }
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["fake", "broken"]
        assert [t.get_text() for t in ax.texts].count("failed") == 1  # over the broken backend's place
    # Beside the speed, the share of the backend's summaries that the quality profile flagged.
    import pandas as pd

    share = table.loc[0, "flagged_share"]
    assert pd.notna(share) and pd.isna(table.loc[1, "flagged_share"])  # the broken backend wrote nothing to judge
    speed = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("Generation speed"))
    assert [t.get_text() for t in speed.texts if "flagged" in t.get_text()] == [f"{share:.0%} flagged"]
    assert result["monitors"]["fake"].sources["engine"].startswith("FakeProvider reports no engine metrics")


def test_summaries_table_is_filtered_by_conversation_and_date(tmp_path):
    run_export(
        RunConfig(input=str(SAMPLE), output=str(tmp_path / "out"), backend="fake", chunk_size=300, max_length=16)
    )
    table = load_summaries(tmp_path / "out")
    assert len(table) == 27 and table["summary"].str.startswith("summary-").all()
    assert str(table["date"].dtype).startswith("datetime64") and table["date"].notna().all()
    japan = filter_summaries(table, "JAPAN itinerary")  # words of the title, any case
    assert set(japan["title"]) == {"Two Weeks in Japan Itinerary"} and list(japan["chunk"]) == [0, 1]
    by_id = filter_summaries(table, japan["conversation_id"].iloc[0])
    assert len(by_id) == 2
    day = japan["date"].iloc[0].date().isoformat()
    assert len(filter_summaries(table, start=day, end=day)) == 2  # the end day counts whole
    assert filter_summaries(table, start="2030-01-01").empty
    older = filter_summaries(table, end="2023-12-31")
    assert len(older) > 0 and (older["date"] < "2024-01-01").all()
    with pytest.raises(ConfigError, match="holds no finished run"):
        load_summaries(tmp_path / "nothing")


def test_run_export_live_outside_a_kernel_returns_the_run_and_saves_memory(tmp_path):
    from apiana_lab.notebook import run_export_live

    config = RunConfig(
        input=str(SAMPLE),
        output=str(tmp_path / "out"),
        backend="fake",
        chunk_size=600,
        max_length=8,
        engine_options={"latency": 0.05},
    )
    result = run_export_live(config, interval=0.05, results_dir=tmp_path / "run")
    assert result["chunks_total"] == 13 and result["summaries_computed"] == 13 and result["load_seconds"] >= 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["chunks_total"] == 13
    memory = json.loads((tmp_path / "run" / "memory.json").read_text())
    assert memory["events"][0]["event"] == "fake: loading" and (tmp_path / "run" / "memory.png").stat().st_size > 0


def test_ab_sides_read_both_kinds_of_result(tokenizer):
    from apiana_lab.chunking import Chunker, ChunkingOptions
    from apiana_lab.export import read_export

    chunks = list(Chunker(ChunkingOptions(chunk_size=300), tokenizer).chunk_all(read_export(SAMPLE)))[:4]
    result = ab.run_ab_on_backend(
        chunks,
        "fake",
        engine_options={"latency": 0.01},
        batch_size=2,
        max_length=16,
        new_max_length=8,
        thresholds=ab.Thresholds(min_speedup=0.0),
    )
    old, new = ab.sides(result)
    assert (old["side"], old["mode"], old["chunks"], old["max_length"]) == ("old", "sequential", 4, 16)
    assert (new["side"], new["batch_size"], new["max_length"]) == ("new", 2, 8) and new["seconds"] > 0
    assert not result["verdict"].go
    fig = plot_similarity(result["rows"], ab.Thresholds())
    assert fig.get_suptitle() == "Old against new, per chunk (4 compared)"
    ax_sim, ax_len = fig.axes
    ratios = [r["length_ratio"] for r in result["rows"] if r.get("length_ratio") is not None]
    assert len(ratios) == 4
    assert_histogram(ax_sim.containers[0], [r["similarity"] for r in result["rows"]])
    assert_histogram(ax_len.containers[0], ratios)
    t = ab.Thresholds()
    assert [line.get_xdata()[0] for line in ax_sim.get_lines()] == [t.min_similarity_median, t.min_similarity_p10]
    runs = {
        "old": {"mode": "sequential", "chunks_total": 9, "failed": 1, "summarize_seconds": 3.0, "max_length": 300},
        "new": {"mode": "batch", "chunks_total": 9, "failed": 0, "summarize_seconds": 1.0, "max_length": 300},
    }
    assert [(s["chunks"], s["failed"], s["seconds"]) for s in ab.sides(runs)] == [(9, 1, 3.0), (9, 0, 1.0)]


def test_explore_plots_draw_the_months_and_the_token_counts_with_units(tmp_path):
    profile = profile_export(write_mixed_export(tmp_path / "conversations.json"), chunk_size=64)
    months = profile.per_month()
    fig = plot_per_month(months)
    assert fig.get_suptitle() == "Conversations and messages per month (by the conversation's creation date)"
    for ax, column, unit in zip(fig.axes, ("conversations", "messages"), ("conversations", "dialogue messages")):
        assert heights(ax.containers[0]) == list(months[column])  # [11, 0, 0, 1] conversations: empty months too
        assert [t.get_text() for t in ax.get_xticklabels()] == list(months["month"])
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("month (YYYY-MM, UTC)", unit)

    fig = plot_token_distribution(profile)
    assert fig.get_suptitle() == "Token counts at chunk size 64 (the summarizing model's tokenizer)"
    ax_conv, ax_chunk = fig.axes
    assert_histogram(ax_conv.containers[0], [r["tokens"] for r in profile.conversations if r["tokens"] > 0])
    assert_histogram(ax_chunk.containers[0], profile.chunk_tokens)
    assert list(ax_chunk.get_lines()[0].get_xdata()) == [64, 64]  # the chunk size, marked
    assert (ax_conv.get_xlabel(), ax_chunk.get_xlabel()) == ("tokens per conversation", "tokens per chunk")


# ---- the lab's shared pieces: engine, sweep, record, chunk size --------------------------------------


def test_loaded_warms_the_engine_up_once_and_takes_the_backends_benchmark_options():
    from apiana_lab.experiments.engine import WARM_UP, backend_options, loaded

    facts = {}
    with loaded("fake", facts=facts, latency=0.0) as provider:
        assert len(provider.history) == 1 and WARM_UP in str(provider.history[0]["prompts"])
        assert isinstance(facts["load_s"], float)
    with loaded("fake", warm_up=False) as provider:
        assert provider.history == []
    # Read from each backend's declaration, never from a name spelled out here; what the caller gives wins.
    assert backend_options("vllm") == {"enable_prefix_caching": False}
    assert backend_options("vllm", extra={"enable_prefix_caching": True}) == {"enable_prefix_caching": True}
    assert backend_options("transformers", "float32") == {"dtype": "float32"}
    assert backend_options("fake", "float32", stats=True) == {}  # the fake takes neither dtype nor stats


def test_sweep_measures_each_configuration_and_keeps_a_tolerated_failure_as_a_row(dialogue_export):
    from apiana_lab.experiments.measure import sweep
    from apiana_lab.summarize import ParallelSummarizerTransform

    chunks = sample_chunks(dialogue_export, 4, chunk_size=64)
    provider = FakeProvider()
    seen = []

    def broken():
        raise RuntimeError("out of memory")

    configs = [
        ("batch 2", ParallelSummarizerTransform(provider, batch_size=2, max_length=8), {"batch_size": 2}),
        ("broken", broken, {"batch_size": 99}),
        ("by hand", lambda: {"wall_s": 1.5}),
    ]
    rows = sweep(configs, chunks, workload="w", on_row=seen.append, tolerate=(RuntimeError,))
    assert seen == rows and [r.get("config") for r in rows] == ["batch 2", None, None]
    assert rows[0]["batch_size"] == 2 and rows[0]["chunks"] == 4 and rows[0]["failed"] == 0
    assert rows[0]["workload"] == "w"
    assert rows[1] == {"batch_size": 99, "error": "RuntimeError: out of memory"}
    assert rows[2] == {"wall_s": 1.5}
    with pytest.raises(RuntimeError, match="out of memory"):
        sweep([("broken", broken)], chunks)  # not tolerated: the sweep stops


def test_record_writes_json_and_markdown_with_the_machine(tmp_path):
    from apiana_lab.experiments.record import machine, markdown_table, write_result

    facts = machine()
    # Benchmarks read cpu, cores, when and loadavg_at_start; notebook runs read memory_gb, gpu and loadavg.
    assert {"cpu", "cores", "when", "loadavg_at_start", "memory_gb", "gpu", "loadavg", "python"} <= set(facts)
    table = markdown_table([{"a": 1234.5, "b": 2}], [("a", "A"), ("b", "B")])
    json_path, md_path = write_result("bench-x", "x", {"machine": facts}, table, root=tmp_path)
    assert json_path == tmp_path / "bench-x" / "x.json"
    assert json.loads(json_path.read_text())["machine"]["cores"] == facts["cores"]
    assert md_path.read_text() == "| A | B |\n|---|---|\n| 1,234 | 2 |\n"


def test_chunk_size_has_one_bound_for_the_chunker_the_command_line_and_the_notebooks(tmp_path, capsys):
    from apiana_lab.chunking import MIN_CHUNK_SIZE, ChunkingOptions, check_chunk_size
    from apiana_lab.errors import ParameterError
    from apiana_lab.experiments import checks

    least = MIN_CHUNK_SIZE["tokens"]
    assert check_chunk_size(least) == least and checks.check_chunk_size(least) == least
    with pytest.raises(ConfigError, match=f"at least {least} tokens"):
        ChunkingOptions(chunk_size=least - 1)
    with pytest.raises(ParameterError, match=f"parameter chunk_size = {least - 1}: too small.*>= {least}"):
        checks.check_chunk_size(least - 1)
    with pytest.raises(ParameterError, match="not a whole number"):
        checks.check_chunk_size(True)
    assert ChunkingOptions(method="messages", chunk_size=1).chunk_size == 1  # a message count has its own bound
    assert (
        export_v2_main(
            ["-i", str(SAMPLE), "-o", str(tmp_path / "out"), "--backend", "fake", "--chunk-size", str(least - 1)]
        )
        != 0
    )
    assert f"--chunk-size: chunk_size must be a whole number of at least {least} tokens" in capsys.readouterr().err
    assert not (tmp_path / "out" / "apiana.sqlite").exists()
