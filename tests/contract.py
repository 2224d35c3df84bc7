"""The contract every real backend meets; test_vllm.py and test_transformers.py run it on their engine.

Not collected by itself (no test_ prefix): each backend module imports these tests and
supplies a module-scoped `provider` fixture, so one engine is alive at a time.
"""

import pytest

from apiana_lab.errors import PermanentProviderError
from apiana_lab.providers import GenerationOptions
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
    forced = provider.complete("What is the capital of France? Answer in one short sentence.", GenerationOptions(max_tokens=done.completion_tokens + 8, ignore_eos=True))
    assert forced.completion_tokens == done.completion_tokens + 8 and forced.finish_reason == "length"


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


def test_parallel_matches_sequential_under_greedy(provider, tokenizer, request):
    """The parallel transform gives the sequential baseline's summaries; any drift is measured and shown."""
    from apiana_lab.chunking import Chunker, ChunkingOptions
    from apiana_lab.export import read_export
    from apiana_lab.summarize import ParallelSummarizerTransform

    conversations = list(read_export("apiana_lab/data/sample_export.json"))
    chunks = list(Chunker(ChunkingOptions(chunk_size=256), tokenizer).chunk_all(conversations))[:6]
    sequential = SummarizerTransform(provider, max_length=24).transform(chunks)
    parallel = ParallelSummarizerTransform(provider, max_workers=2, batch_size=4, max_length=24).transform(chunks)
    assert [r.chunk_id for r in parallel] == [c.id for c in chunks]
    assert all(r.error is None for r in sequential + parallel)
    same = [a.summary == b.summary for a, b in zip(sequential, parallel)]
    drift = [
        {"chunk": a.chunk_id, "common_prefix_chars": _common_prefix(a.summary, b.summary), "sequential": a.summary, "parallel": b.summary}
        for a, b, ok in zip(sequential, parallel, same) if not ok
    ]
    request.node.user_properties.append(("identical", f"{sum(same)}/{len(same)}"))
    if drift:
        print(f"\n{request.node.name}: {sum(same)}/{len(same)} identical; where batching changed the text:")
        for d in drift:
            print(f"  {d['chunk']}: same for {d['common_prefix_chars']} chars\n    seq: {d['sequential']!r}\n    par: {d['parallel']!r}")
    # Both engines run in float32 here, where batching changes nothing. In bfloat16 it can:
    # see the README ("Batched vs one-by-one results") for what was measured and why.
    assert not drift, drift


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
