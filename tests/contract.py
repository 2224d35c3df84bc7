"""The contract every real backend meets; test_vllm.py and test_transformers.py run it on their engine.

Not collected by itself (no test_ prefix): each backend module imports these tests and
supplies a module-scoped `provider` fixture, so one engine is alive at a time. The streaming
tests run only for providers with `supports_stream`; a backend module that can see its
engine's queue overrides `engine_unfinished` so they also check the engine itself.
"""

import pytest

from apiana_lab.errors import PermanentProviderError, ProviderError
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
    user = summarizer.user_template.format(
        title=f"About {name}", conversation_date="2024-05-01", formatted_messages=text
    )
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
    done = provider.complete(
        "What is the capital of France? Answer in one short sentence.", GenerationOptions(max_tokens=200)
    )
    assert done.finish_reason == "stop" and done.completion_tokens < 200
    assert "Paris" in done.text
    forced = provider.complete(
        "What is the capital of France? Answer in one short sentence.",
        GenerationOptions(max_tokens=done.completion_tokens + 8, ignore_eos=True),
    )
    assert forced.completion_tokens == done.completion_tokens + 8 and forced.finish_reason == "length"


def test_chat_template_is_applied(provider, tokenizer):
    # The prompt the engine saw is the ChatML rendering, not the bare text.
    text = "Say hello."
    bare = len(tokenizer.encode(text, add_special_tokens=False).ids)
    templated = provider.count_tokens(text)
    c = provider.complete(text, GenerationOptions(max_tokens=4))
    assert c.prompt_tokens == templated
    chatml = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert templated == len(tokenizer.encode(chatml, add_special_tokens=False).ids) > bare + 10


def test_prompt_longer_than_context_is_permanent(provider):
    huge = "word " * 9000
    with pytest.raises(PermanentProviderError, match="context|max_model_len") as caught:
        provider.complete(huge, GenerationOptions(max_tokens=8))
    assert caught.value.reason == "too_long"


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
        {
            "chunk": a.chunk_id,
            "common_prefix_chars": _common_prefix(a.summary, b.summary),
            "sequential": a.summary,
            "parallel": b.summary,
        }
        for a, b, ok in zip(sequential, parallel, same)
        if not ok
    ]
    request.node.user_properties.append(("identical", f"{sum(same)}/{len(same)}"))
    if drift:
        print(f"\n{request.node.name}: {sum(same)}/{len(same)} identical; where batching changed the text:")
        for d in drift:
            print(
                f"  {d['chunk']}: same for {d['common_prefix_chars']} chars\n"
                f"    seq: {d['sequential']!r}\n    par: {d['parallel']!r}"
            )
    # Both engines run in float32 here, where batching changes nothing. In bfloat16 it can:
    # see the README ("Batched vs one-by-one results") for what was measured and why.
    assert not drift, drift


def test_throughput_series_stays_near_the_runs_rate(provider, tokenizer):
    """The monitor's tokens/s on a real run: no spike where one engine step finishes several chunks at once."""
    from apiana_lab.chunking import Chunker, ChunkingOptions
    from apiana_lab.export import read_export
    from apiana_lab.monitor import MemoryMonitor
    from apiana_lab.summarize import ParallelSummarizerTransform

    conversations = list(read_export("apiana_lab/data/sample_export.json"))
    chunks = list(Chunker(ChunkingOptions(chunk_size=256), tokenizer).chunk_all(conversations))[:6]
    transform = ParallelSummarizerTransform(provider, max_workers=2, batch_size=3, max_length=24)
    with MemoryMonitor(provider, interval=0.2) as monitor:
        records = [r for _, r in transform.run(chunks, progress=monitor.progress)]
    assert all(r.error is None for r in records)
    rates = monitor.progress_frame()
    last = rates.iloc[-1]
    overall = last["completion_tokens"] / last["elapsed_s"]
    series = rates["output_tokens_per_s"].dropna()
    assert last["done"] == 6 and overall > 0 and len(series) >= 2
    assert series.max() <= 3 * overall, rates[
        ["elapsed_s", "done", "completion_tokens", "output_tokens_per_s"]
    ].to_string()


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --- Streaming: requests in, completions out as each finishes -------------------------------

FRANCE = "What is the capital of France? Answer in one short sentence."
STORY = "Write a long, detailed story about a lighthouse keeper called {name} and the storms of one winter."


@pytest.fixture
def streaming(provider):
    if not provider.supports_stream:
        pytest.skip(f"{type(provider).__name__} has no streaming path")
    return provider


@pytest.fixture
def engine_unfinished():
    """Requests the engine itself still holds; None where a backend cannot see its engine."""
    return lambda: None


class Feed:
    """A request iterator that records, at each pull, how many requests were in flight."""

    def __init__(self, items, engine_unfinished=lambda: None):
        self.items = list(items)
        self.engine_unfinished = engine_unfinished
        self.finished = 0  # the consumer counts what comes out
        self.pulled = 0
        self.in_flight_at_pull: list[int] = []
        self.engine_at_pull: list[int | None] = []

    def __iter__(self):
        for item in self.items:
            self.in_flight_at_pull.append(self.pulled - self.finished)
            self.engine_at_pull.append(self.engine_unfinished())
            if item is not None:
                self.pulled += 1
            yield item

    def run(self, provider, options, **kw):
        out = []
        for key, result in provider.stream(self, options, **kw):
            self.finished += 1
            out.append((key, result))
        return out


def test_stream_keys_each_result_to_its_own_prompt(streaming):
    s = SummarizerTransform(streaming, max_length=40)
    prompts = {f"key-{name}": dialogue_prompt(s, name, pad) for name, pad in zip(NAMES, (0, 24, 6))}
    out = dict(streaming.stream(iter(prompts.items()), s.options))
    assert set(out) == set(prompts)
    for name in NAMES:
        c = out[f"key-{name}"]
        assert c.prompt_tokens == streaming.count_tokens(prompts[f"key-{name}"])
        others = [n for n in NAMES if n != name]
        assert name in c.text and not any(o in c.text for o in others), (name, c.text)


def test_stream_yields_in_completion_order(streaming):
    # The story, sent first, runs to max_tokens; the one-line answer sent after it finishes first.
    requests = [("story", STORY.format(name="Zorblax")), ("france", FRANCE)]
    out = list(streaming.stream(iter(requests), GenerationOptions(max_tokens=48)))
    assert [k for k, _ in out] == ["france", "story"]
    assert out[0][1].finish_reason == "stop" and "Paris" in out[0][1].text
    assert out[1][1].finish_reason == "length" and out[1][1].completion_tokens == 48


def test_stream_keeps_the_window_full_and_never_over(streaming, engine_unfinished):
    feed = Feed([(f"q{i}", f"Count from 1 to {i + 3}.") for i in range(7)], engine_unfinished)
    out = feed.run(streaming, GenerationOptions(max_tokens=12), window=3)
    assert sorted(k for k, _ in out) == [f"q{i}" for i in range(7)]
    assert all(not isinstance(r, ProviderError) for _, r in out)
    # At each pull fewer than 3 were in flight (room for one more), and the window did fill up.
    assert max(feed.in_flight_at_pull) == 2 and feed.in_flight_at_pull[:3] == [0, 1, 2], feed.in_flight_at_pull
    engine = [n for n in feed.engine_at_pull if n is not None]
    assert all(n < 3 for n in engine), engine


def test_stream_none_means_nothing_to_send_yet(streaming):
    items = [None, None, ("a", FRANCE), None, None, None, ("b", "Name one colour of the rainbow."), None]
    feed = Feed(items)
    out = dict(feed.run(streaming, GenerationOptions(max_tokens=16)))
    assert set(out) == {"a", "b"} and "Paris" in out["a"].text
    assert len(feed.in_flight_at_pull) == len(items)  # every None was taken, and the stream asked again


def test_stream_too_long_fails_that_request_alone(streaming):
    requests = [("before", FRANCE), ("huge", "word " * 9000), ("after", "Name one colour of the rainbow.")]
    out = dict(streaming.stream(iter(requests), GenerationOptions(max_tokens=16)))
    assert set(out) == {"before", "huge", "after"}
    assert isinstance(out["huge"], PermanentProviderError) and out["huge"].reason == "too_long"
    assert "huge" in str(out["huge"])  # the message names the request
    assert "Paris" in out["before"].text and out["after"].text


def test_stream_closed_early_aborts_what_is_in_flight(streaming, engine_unfinished):
    requests = [("france", FRANCE)] + [(f"story-{n}", STORY.format(name=n)) for n in NAMES]
    stream = streaming.stream(iter(requests), GenerationOptions(max_tokens=200), window=4)
    key, first = next(stream)
    assert key == "france" and "Paris" in first.text
    held = engine_unfinished()
    assert held in (None, 3), held  # the three stories are still running
    stream.close()
    assert engine_unfinished() in (None, 0)
    # The engine serves the next call as if nothing had happened.
    again = streaming.complete(FRANCE, GenerationOptions(max_tokens=16))
    assert again.text == first.text


def test_stream_equals_batch_under_greedy(streaming):
    s = SummarizerTransform(streaming, max_length=24)
    prompts = [dialogue_prompt(s, name, pad) for name, pad in zip(NAMES, (0, 24, 6))]
    batch = streaming.complete_batch(prompts, s.options)
    streamed = dict(streaming.stream(((str(i), p) for i, p in enumerate(prompts)), s.options, window=2))
    for i, b in enumerate(batch):
        got = streamed[str(i)]
        assert (got.text, got.prompt_tokens, got.completion_tokens, got.finish_reason) == (
            b.text,
            b.prompt_tokens,
            b.completion_tokens,
            b.finish_reason,
        )
