"""The provider interface, and the two real backends on the real bundled model."""

import pytest

from apiana_lab.errors import ConfigError, MissingDependencyError, PermanentProviderError
from apiana_lab.providers import GenerationOptions, get_provider, provider_class
from apiana_lab.providers import registry
from apiana_lab.summarize import SummarizerTransform

NAMES = ["Zorblax", "Quintaro", "Melvaine"]


def dialogue_prompt(summarizer, name, padding):
    """A reflective-summary prompt about a dog with a made-up name, padded to vary its length."""
    extra = " ".join(["We also talked about the weather, which was mild and grey all week."] * padding)
    text = (
        f"User: My new dog is called {name}. {extra} How often should I walk {name}?\n\n"
        f"Assistant: {name} should be walked twice a day, morning and evening."
    )
    user = summarizer.user_template.format(title=f"About {name}", conversation_date="2024-05-01", formatted_messages=text)
    return [{"role": "system", "content": summarizer.system_prompt}, {"role": "user", "content": user}]


# ---- options and registry: no engine needed ------------------------------------------------


def test_generation_options_defaults_and_validation():
    o = GenerationOptions()
    assert (o.max_tokens, o.temperature, o.top_p) == (300, 0.0, 1.0)
    with pytest.raises(ConfigError, match="Did you mean 'max_tokens'"):
        GenerationOptions.from_kwargs(max_token=10)
    with pytest.raises(ConfigError, match="max_tokens"):
        GenerationOptions(max_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        GenerationOptions(temperature=5)
    assert GenerationOptions(stop="###").stop == ("###",)
    assert GenerationOptions(max_tokens=5).digest() != GenerationOptions(max_tokens=6).digest()


def test_unknown_backend_lists_known_and_suggests():
    with pytest.raises(ConfigError) as e:
        get_provider("vlm")
    assert "Did you mean 'vllm'" in str(e.value)
    for name in ("vllm", "transformers", "fake"):
        assert name in str(e.value)


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "transformers", "apiana_lab_missing_module_xyz:Nope")
    with pytest.raises(MissingDependencyError, match=r"pip install 'apiana-lab\[transformers\]'"):
        provider_class("transformers")


def test_backends_import_lazily():
    import subprocess
    import sys

    code = "import sys, apiana_lab; print(sorted(m for m in ('torch','vllm','ray','transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_bad_model_path_is_clear(tmp_path):
    from apiana_lab.models import resolve_model

    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


@pytest.mark.transformers
def test_hub_id_offline_says_no_network():
    from apiana_lab.providers.transformers_backend import TransformersProvider

    with pytest.raises(ConfigError, match="no network"):
        TransformersProvider("some-org/some-model-that-is-not-here", device="cpu")


# ---- the same contract, checked on both real backends --------------------------------------


@pytest.fixture(params=["vllm", "transformers"])
def provider(request):
    marker = request.param
    return request.getfixturevalue(f"{marker}_provider")


def test_summary_is_grounded(provider):
    s = SummarizerTransform(provider, max_length=60)
    c = provider.complete(dialogue_prompt(s, "Zorblax", 0), s.options)
    assert c.text.strip()
    assert "Zorblax" in c.text, c.text
    assert 0 < c.completion_tokens <= 60


def test_batch_results_come_back_in_input_order(provider, monkeypatch):
    s = SummarizerTransform(provider, max_length=40)
    # Very different lengths: a batch sorted by length inside the backend must be unsorted on the way out.
    prompts = [dialogue_prompt(s, name, pad) for name, pad in zip(NAMES, (0, 24, 6))]
    lengths = [provider.count_tokens(p) for p in prompts]
    assert max(lengths) > 2.5 * min(lengths)
    results = provider.complete_batch(prompts, s.options)
    assert [r.prompt_tokens for r in results] == lengths
    for name, r in zip(NAMES, results):
        others = [n for n in NAMES if n != name]
        assert name in r.text and not any(o in r.text for o in others), (name, r.text)
    monkeypatch.setattr(provider, "options", GenerationOptions(max_tokens=24))
    texts = provider.batch_invoke(prompts[::-1])  # the str API, with the provider's own options
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    assert NAMES[-1] in texts[0] and NAMES[0] in texts[-1]


def test_max_tokens_and_finish_reason(provider):
    s = SummarizerTransform(provider)
    prompt = dialogue_prompt(s, "Zorblax", 0)
    short = provider.complete(prompt, GenerationOptions(max_tokens=5))
    assert short.completion_tokens == 5 and short.finish_reason == "length"
    longer = provider.complete(prompt, GenerationOptions(max_tokens=12))
    assert longer.completion_tokens == 12 and longer.text.startswith(short.text.strip())
    # A question with a one-line answer ends on its own, well before the limit.
    done = provider.complete("What is the capital of France? Answer in one short sentence.", GenerationOptions(max_tokens=200))
    assert done.finish_reason == "stop" and done.completion_tokens < 200
    assert "Paris" in done.text


def test_chat_template_is_applied(provider, tokenizer):
    # The prompt the engine saw is the ChatML rendering, not the bare text.
    text = "Say hello."
    bare = len(tokenizer.encode(text, add_special_tokens=False).ids)
    templated = provider.count_tokens(text)
    c = provider.complete(text, GenerationOptions(max_tokens=4))
    assert c.prompt_tokens == templated
    chatml = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    assert templated == len(tokenizer.encode(chatml, add_special_tokens=False).ids) > bare + 10


def test_prompt_longer_than_context_is_permanent(provider):
    huge = "word " * 9000
    with pytest.raises(PermanentProviderError, match="context|max_model_len"):
        provider.complete(huge, GenerationOptions(max_tokens=8))


@pytest.mark.transformers
def test_transformers_batched_equals_one_by_one_in_fp32(transformers_provider):
    """Left padding with an attention mask changes nothing under greedy decoding in float32."""
    s = SummarizerTransform(transformers_provider, max_length=48)
    prompts = [dialogue_prompt(s, name, pad) for name, pad in zip(NAMES, (0, 24, 6))]
    batched = transformers_provider.complete_batch(prompts, s.options)
    single = [transformers_provider.complete(p, s.options) for p in prompts]
    for b, one in zip(batched, single):
        assert b.text == one.text
        assert (b.prompt_tokens, b.completion_tokens, b.finish_reason) == (one.prompt_tokens, one.completion_tokens, one.finish_reason)


@pytest.mark.transformers
def test_transformers_rejects_8bit_on_cpu(model_dir):
    from apiana_lab.providers.transformers_backend import TransformersProvider

    with pytest.raises(ConfigError, match="CUDA"):
        TransformersProvider(str(model_dir), device="cpu", load_in_8bit=True)


@pytest.mark.transformers
def test_transformers_dummy_weights_keep_the_shape(model_dir, transformers_provider):
    from apiana_lab.providers.transformers_backend import TransformersProvider

    dummy = TransformersProvider(str(model_dir), device="cpu", load_format="dummy")
    real = transformers_provider.models[0]
    shapes = {k: v.shape for k, v in real.state_dict().items()}
    assert {k: v.shape for k, v in dummy.models[0].state_dict().items()} == shapes
    import torch

    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(dummy.models[0].state_dict()[name].float(), real.state_dict()[name].float())
    out = dummy.complete("Hello", GenerationOptions(max_tokens=3))
    assert out.completion_tokens <= 3
    dummy.close()
