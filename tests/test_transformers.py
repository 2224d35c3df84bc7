"""Real transformers on the real bundled model (float32 on CPU): one model for this module."""

import pytest
from contract import *  # noqa: F401,F403  the shared backend contract, run here on transformers
from contract import NAMES, dialogue_prompt

from apiana_lab.errors import ConfigError
from apiana_lab.providers import GenerationOptions
from apiana_lab.summarize import SummarizerTransform

pytestmark = pytest.mark.transformers


@pytest.fixture(scope="module")
def provider(model_dir):
    from apiana_lab.providers.transformers_backend import TransformersProvider

    p = TransformersProvider(str(model_dir), device="cpu", dtype="float32")
    yield p
    p.close()


@pytest.fixture
def generate_calls(provider, monkeypatch):
    """(rows, padded prompt length, max_new_tokens) of every real `generate` call the model gets."""
    calls = []
    model = provider.models[0]
    real = model.generate

    def recording(*args, **kwargs):
        rows, cols = kwargs["input_ids"].shape
        calls.append((rows, cols, kwargs["max_new_tokens"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    return calls


def test_batched_equals_one_by_one_in_fp32(provider, generate_calls, monkeypatch):
    """Left padding with an attention mask changes nothing under greedy decoding in float32, split or not.

    On CPU the padded batches go through the grouped-query SDPA path, one prompt alone through
    transformers' own: the texts must still be the same.
    """
    assert provider.models[0].config._attn_implementation == "apiana_grouped_sdpa"
    s = SummarizerTransform(provider, max_length=24)
    prompts = [dialogue_prompt(s, name, pad) for name, pad in zip(NAMES, (0, 24, 6))]
    single = [provider.complete(p, s.options) for p in prompts]
    longest, middle, _ = sorted((provider.count_tokens(p) for p in prompts), reverse=True)
    # One batch of three, then a budget that puts the longest alone and the other two together.
    for budget, shapes in ((10**9, [(3, longest, 24)]), (2 * (middle + 24), [(1, longest, 24), (2, middle, 24)])):
        monkeypatch.setattr(provider, "max_batch_tokens", budget)
        generate_calls.clear()
        batched = provider.complete_batch(prompts, s.options)
        assert generate_calls == shapes
        for b, one in zip(batched, single):
            assert b.text == one.text
            assert (b.prompt_tokens, b.completion_tokens, b.finish_reason) == (
                one.prompt_tokens,
                one.completion_tokens,
                one.finish_reason,
            )


def test_micro_batches_stay_within_the_token_budget(provider, generate_calls, monkeypatch):
    prompts = [f"Repeat after me: {'one two three ' * k}" for k in (1, 40, 5, 25, 12, 3, 60)]
    lengths = [provider.count_tokens(p) for p in prompts]
    options = GenerationOptions(max_tokens=6)
    budget = 3 * (sorted(lengths)[3] + 6)
    monkeypatch.setattr(provider, "max_batch_tokens", budget)
    results = provider.complete_batch(prompts, options)
    assert [r.prompt_tokens for r in results] == lengths  # back in input order
    assert sum(rows for rows, _, _ in generate_calls) == len(prompts)
    assert len(generate_calls) > 1
    for i, (rows, cols, new) in enumerate(generate_calls):
        assert rows == 1 or rows * (cols + new) <= budget, generate_calls
        if i + 1 < len(generate_calls):  # greedy: one more prompt would not have fitted
            assert (rows + 1) * (cols + new) > budget, generate_calls
    # A prompt longer than the whole budget still runs, alone.
    monkeypatch.setattr(provider, "max_batch_tokens", 8)
    generate_calls.clear()
    assert provider.complete_batch(prompts[:2], options)[1].completion_tokens > 0
    assert [rows for rows, _, _ in generate_calls] == [1, 1]


def test_micro_batches_split_longest_first():
    from apiana_lab.providers.transformers_backend import micro_batches

    assert micro_batches([100, 90, 50, 50, 10], 10, 330) == [[0, 1, 2], [3, 4]]  # 3 x 110 fits, 4 x 110 does not
    assert micro_batches([500, 20], 10, 100) == [[0], [1]]  # over budget alone: still one batch
    assert micro_batches([], 10, 100) == []


def test_default_budget_counts_the_kv_cache_against_the_weights(provider):
    from apiana_lab.providers.transformers_backend import CPU_KV_PER_WEIGHT

    cfg = provider.models[0].config
    kv_per_token = (
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    )
    weights = sum(p.numel() for p in provider.models[0].parameters()) * 4
    assert provider.max_batch_tokens == int(CPU_KV_PER_WEIGHT * weights / kv_per_token)
    # What it means for the benchmark's workloads: 16 prompts of 440 tokens with 256 new share a
    # batch; 1,400-token prompts with 128 new go seven at a time, never a whole batch of 16.
    assert provider.max_batch_tokens >= 16 * (440 + 256)
    assert 7 * (1400 + 128) <= provider.max_batch_tokens < 8 * (1400 + 128)


def test_rows_at_once_follow_the_budget_and_one_call_per_replica(provider):
    """What `plan` assumes runs together: micro-batches under the budget, the workers taking turns on one replica."""
    budget = provider.max_batch_tokens
    assert provider.rows_at_once(16, 2, 1340, 128) == budget // (1340 + 128) == 7
    assert provider.rows_at_once(16, 2, 400, 256) == 16  # short prompts: the whole batch
    assert provider.rows_at_once(16, 1, budget, 128) == 1  # a prompt over the budget still runs, alone


def test_max_batch_tokens_must_be_positive(model_dir):
    from apiana_lab.providers.transformers_backend import TransformersProvider

    with pytest.raises(ConfigError, match="max_batch_tokens"):
        TransformersProvider(str(model_dir), device="cpu", max_batch_tokens=0)


def test_rejects_8bit_on_cpu(model_dir):
    from apiana_lab.providers.transformers_backend import TransformersProvider

    with pytest.raises(ConfigError, match="CUDA"):
        TransformersProvider(str(model_dir), device="cpu", load_in_8bit=True)


def test_dummy_weights_keep_the_shape(model_dir, provider):
    import torch

    from apiana_lab.providers.transformers_backend import TransformersProvider

    dummy = TransformersProvider(str(model_dir), device="cpu", load_format="dummy")
    real = provider.models[0].state_dict()
    fake = dummy.models[0].state_dict()
    assert {k: v.shape for k, v in fake.items()} == {k: v.shape for k, v in real.items()}
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(fake[name].float(), real[name].float())
    assert dummy.complete("Hello", GenerationOptions(max_tokens=3)).completion_tokens <= 3
    dummy.close()


def test_hub_id_offline_says_no_network():
    from apiana_lab.providers.transformers_backend import TransformersProvider

    with pytest.raises(ConfigError, match="no network"):
        TransformersProvider("some-org/some-model-that-is-not-here", device="cpu")


def test_torch_out_of_memory_is_the_contracts_out_of_memory_and_other_errors_stay_as_they_are():
    """The one error map: torch's OutOfMemoryError (what CUDA raises) becomes ProviderOutOfMemoryError
    with the batch size, so the scheduler halves the batch; an error it does not know is left to surface."""
    import torch

    from apiana_lab.errors import ProviderOutOfMemoryError
    from apiana_lab.providers.transformers_backend import provider_error

    oom = provider_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), 12)
    assert isinstance(oom, ProviderOutOfMemoryError) and oom.batch_size == 12
    assert str(oom) == "CUDA out of memory. Tried to allocate 2.00 GiB (batch size 12)"
    assert provider_error(ValueError("bad generation config"), 12) is None
