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


def test_batched_equals_one_by_one_in_fp32(provider):
    """Left padding with an attention mask changes nothing under greedy decoding in float32."""
    s = SummarizerTransform(provider, max_length=24)
    prompts = [dialogue_prompt(s, name, pad) for name, pad in zip(NAMES, (0, 24, 6))]
    batched = provider.complete_batch(prompts, s.options)
    single = [provider.complete(p, s.options) for p in prompts]
    for b, one in zip(batched, single):
        assert b.text == one.text
        assert (b.prompt_tokens, b.completion_tokens, b.finish_reason) == (one.prompt_tokens, one.completion_tokens, one.finish_reason)


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
