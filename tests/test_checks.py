"""The notebooks' parameter checks: a wrong value fails with what is wrong and what is allowed."""

from pathlib import Path

import pytest

from apiana_lab.errors import ConfigError, ParameterError
from apiana_lab.experiments import checks
from apiana_lab.providers.registry import backend_names

SAMPLE = Path("apiana_lab/data/sample_export.json").resolve()


def test_unknown_backend_names_the_known_ones_and_the_closest():
    with pytest.raises(ParameterError) as raised:
        checks.check_backend("vlm")
    message = str(raised.value)
    assert message.startswith("parameter backend = 'vlm': unknown backend (did you mean 'vllm'?)")
    allowed = message.split("Allowed: one of ", 1)[1].rstrip(".").split(", ")
    assert {"vllm", "transformers", "fake"} <= set(allowed) and allowed == backend_names()
    assert raised.value.name == "backend" and raised.value.value == "vlm"
    assert checks.check_backend("fake") == "fake"


def test_backends_list_must_be_non_empty_known_and_without_repeats():
    assert checks.check_backends(["fake", "vllm"]) == ["fake", "vllm"]
    with pytest.raises(ParameterError, match=r"parameter backends = \[\]: not a non-empty list"):
        checks.check_backends([])
    with pytest.raises(ParameterError, match=r"parameter backends = 'vllm': not a non-empty list"):
        checks.check_backends("vllm")  # a string is not a list of one
    with pytest.raises(
        ParameterError,
        match=r"parameter backends\[1\] = 'transformer': unknown backend \(did you mean 'transformers'\?\)",
    ):
        checks.check_backends(["vllm", "transformer"])
    with pytest.raises(ParameterError, match="fake listed twice"):
        checks.check_backends(["fake", "fake"])


def test_missing_input_file_says_where_relative_paths_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checks.check_inputs(str(SAMPLE)) == [str(SAMPLE)]
    (tmp_path / "here.json").write_text("[]")
    assert checks.check_inputs(["here.json"]) == [str(tmp_path / "here.json")]  # made absolute
    with pytest.raises(ParameterError) as raised:
        checks.check_inputs(["here.json", "nowhere.json"])
    message = str(raised.value)
    assert "parameter input_paths = 'nowhere.json': no such file or folder" in message
    assert f"relative paths start from {tmp_path}" in message and "conversations.json" in message
    with pytest.raises(ParameterError, match="no export given"):
        checks.check_inputs([])


def test_batch_sizes_must_be_a_non_empty_list_of_positive_whole_numbers():
    assert checks.check_batch_sizes([8, 1, 2, 2]) == [1, 2, 8]
    with pytest.raises(
        ParameterError, match=r"parameter batch_sizes = \[\]: empty. Allowed: a non-empty list of whole numbers >= 1"
    ):
        checks.check_batch_sizes([])
    with pytest.raises(ParameterError, match=r"batch_sizes\[1\] = 0: below 1"):
        checks.check_batch_sizes([4, 0])
    with pytest.raises(ParameterError, match=r"batch_sizes\[0\] = 2.5: not a whole number"):
        checks.check_batch_sizes([2.5])
    with pytest.raises(ParameterError, match="not a list"):
        checks.check_batch_sizes(8)


@pytest.mark.parametrize("value", [-0.1, 1.5, "high", True, float("nan")])
def test_a_threshold_outside_0_1_is_refused(value):
    with pytest.raises(ParameterError, match=r"Allowed: a number from 0 to 1"):
        checks.check_fraction(value, "min_exact_match")


def test_small_checks_take_the_defaults_notebooks_use():
    assert checks.check_optional_whole(None, "batch_size") is None
    assert checks.check_optional_whole(0, "batch_size") is None and checks.check_optional_whole(16, "batch_size") == 16
    with pytest.raises(ParameterError, match="negative"):
        checks.check_optional_whole(-2, "limit")
    with pytest.raises(ParameterError, match="not a whole number"):
        checks.check_whole(True, "chunks")  # a bool is not a count, although Python calls it an int
    assert checks.check_model("") is None and checks.check_model("/models/x") == "/models/x"
    assert checks.check_day("2024-02-01", "show_from") == "2024-02-01" and checks.check_day("", "show_from") is None
    with pytest.raises(ParameterError, match="not a date.*YYYY-MM-DD"):
        checks.check_day("01/02/2024", "show_from")
    with pytest.raises(ParameterError, match="unknown dtype.*auto, float32, bfloat16, float16"):
        checks.check_dtype("fp32")
    with pytest.raises(ParameterError, match="> 0"):
        checks.check_number(0, "monitor_interval", above=True)


def test_engine_options_are_checked_against_the_backend():
    assert checks.check_engine_options("fake", {"latency": 0.1}) == {"latency": 0.1}
    with pytest.raises(
        ConfigError,
        match=r"parameter engine_options: The fake backend does not take the option 'latncy'. Did you mean 'latency'\?",
    ):
        checks.check_engine_options("fake", {"latncy": 0.1})
    with pytest.raises(ParameterError, match="not a dict"):
        checks.check_engine_options("fake", [("latency", 1)])
    with pytest.raises(ParameterError, match="options for 'vllm', which is not in the backends list"):
        checks.check_options_per_backend(["fake"], {"vllm": {"max_model_len": 1024}})


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert checks.check_output_dir(str(tmp_path / "new" / "out")) == str(tmp_path / "new" / "out")
    with pytest.raises(ConfigError, match="parameter output_dir:"):
        checks.check_output_dir(str(tmp_path / "a_file"))


def explore(**changes):
    params = dict(
        input_paths=[str(SAMPLE)],
        chunk_size=3500,
        longest=10,
        rate_tokens_per_s=0.0,
        summary_tokens=300,
        backend="fake",
        model="",
        sample=4,
        max_length=300,
        batch_size=None,
        engine_options={},
    )
    return checks.explore_export(**{**params, **changes})


def test_explore_checks_the_backend_only_when_it_measures():
    measured = explore()
    assert measured["measure"] and measured["backend"] == "fake" and measured["model"] is None
    given = explore(rate_tokens_per_s=68, backend="nonsense")  # not used with a rate given
    assert not given["measure"] and "backend" not in given
    with pytest.raises(ParameterError, match="parameter backend = 'nonsense'"):
        explore(backend="nonsense")
    with pytest.raises(ParameterError, match="rate_tokens_per_s = -1"):
        explore(rate_tokens_per_s=-1)


def sweep(**changes):
    params = dict(
        input_paths=[],
        backend="fake",
        model="",
        batch_sizes=[1, 2],
        chunks=4,
        chunk_size=1400,
        max_length=8,
        dtype="auto",
        headroom=0.2,
        memory_limit_mb=None,
        engine_options={},
        monitor_interval=0.5,
    )
    return checks.batch_size_sweep(**{**params, **changes})


def test_sweep_parameters():
    assert sweep()["input_paths"] == [] and sweep()["batch_sizes"] == [1, 2]
    with pytest.raises(ParameterError, match="parameter batch_sizes = \\[\\]: empty"):
        sweep(batch_sizes=[])
    with pytest.raises(ParameterError, match="headroom = 1.0: 1 leaves no memory"):
        sweep(headroom=1.0)
    with pytest.raises(ParameterError, match="headroom = 1.2: outside 0-1"):
        sweep(headroom=1.2)


def ab_params(**changes):
    params = dict(
        input_paths=[str(SAMPLE)],
        backend="fake",
        model="",
        chunks=4,
        chunk_size=600,
        batch_size=4,
        max_workers=None,
        max_length=32,
        dtype="float32",
        engine_options={},
        new_max_length=0,
        new_system_prompt="",
        old_dir="",
        new_dir="",
        min_exact_match=0.5,
        min_similarity_p10=0.3,
        min_similarity_median=0.9,
        length_ratio_low=0.8,
        length_ratio_high=1.25,
        min_finish_agreement=0.8,
        max_extra_failures=0,
        min_speedup=1.0,
    )
    return checks.ab_migration_check(**{**params, **changes})


def test_ab_parameters_build_the_thresholds_and_pair_the_folders(tmp_path):
    from apiana_lab.experiments.ab import Thresholds

    params = ab_params()
    assert params["mode"] == "run" and params["new_max_length"] is None and params["new_system_prompt"] is None
    assert Thresholds(**params["thresholds"]) == Thresholds()  # the notebook's defaults are the class's
    with pytest.raises(ParameterError, match="parameter min_similarity_median = 1.5: outside 0-1"):
        ab_params(min_similarity_median=1.5)
    with pytest.raises(ParameterError, match="must hold 1"):
        ab_params(length_ratio_low=1.1)
    with pytest.raises(ParameterError, match="parameter old_dir = .*given without the other"):
        ab_params(old_dir=str(tmp_path))
    with pytest.raises(ParameterError, match="no summaries.jsonl or run.json there"):
        ab_params(old_dir=str(tmp_path), new_dir=str(tmp_path))
    for side in ("old", "new"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "summaries.jsonl").write_text("")
        (tmp_path / side / "run.json").write_text("{}")
    folders = ab_params(old_dir=str(tmp_path / "old"), new_dir=str(tmp_path / "new"), backend="not used")
    assert folders["mode"] == "folders" and folders["new_dir"] == str(tmp_path / "new")


def test_comparison_and_summarize_parameters(tmp_path):
    params = checks.backend_comparison(
        input_paths=str(SAMPLE),
        backends=["fake"],
        model="",
        chunks=4,
        chunk_size=600,
        max_length=8,
        batch_size=None,
        dtype="float32",
        engine_options={"fake": {"latency": 0.01}},
        monitor_interval=0.5,
    )
    assert params["input_paths"] == [str(SAMPLE)] and params["engine_options"] == {"fake": {"latency": 0.01}}
    summarize = dict(
        input_paths=[str(SAMPLE)],
        output_dir=str(tmp_path / "out"),
        backend="fake",
        model="",
        batch_size=None,
        max_workers=None,
        chunk_size=300,
        max_length=16,
        limit=None,
        fresh=False,
        engine_options={},
        monitor_interval=0.5,
        show_conversation="",
        show_from="2024-01-01",
        show_to="",
    )
    assert checks.summarize_export(**summarize)["show_from"] == "2024-01-01"
    with pytest.raises(ParameterError, match="parameter fresh = 'yes': not True or False"):
        checks.summarize_export(**{**summarize, "fresh": "yes"})
