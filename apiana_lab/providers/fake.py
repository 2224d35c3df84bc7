"""A deterministic provider for testing the orchestration only: ordering, retries, OOM, resume."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence

from apiana_lab.errors import (
    FatalProviderError,
    PermanentProviderError,
    ProviderError,
    ProviderOutOfMemoryError,
    TransientProviderError,
)

from .base import Completion, GenerationOptions, LLMProvider, Prompt, as_messages

FAILURES = {
    "transient": TransientProviderError,
    "permanent": PermanentProviderError,
    "oom": ProviderOutOfMemoryError,
    "fatal": FatalProviderError,
}


class FakeProvider(LLMProvider):
    """Answers with a digest of the prompt. Never a stand-in for a real backend.

    Args:
        latency: seconds each call sleeps (per call, not per prompt).
        batch: whether it claims native batching.
        oom_above: a batch larger than this raises an out-of-memory error.
        fail: a function from the prompt's last message to a failure kind
            ("transient", "permanent", "oom", "fatal", and for streams "engine": the whole
            engine fails) or None; applied on every call.
        stream: offer the streaming path: requests finish after `steps(text)` engine steps
            (default 1 + len(text) % 5), so later, shorter requests can overtake earlier ones.
    """

    name = "fake"

    def __init__(
        self,
        model: str | None = None,
        options: GenerationOptions | None = None,
        *,
        latency: float = 0.0,
        batch: bool = True,
        oom_above: int | None = None,
        fail: Callable[[str], str | None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        stream: bool = False,
        steps: Callable[[str], int] | None = None,
        window: int = 16,
        history: bool = True,
    ):
        super().__init__(model or "fake-model", options)
        self.supports_stream = stream
        self.steps = steps or (lambda text: 1 + len(text) % 5)
        self.window = window
        self.max_in_flight = 0  # the most stream requests in flight at once
        self.latency = latency
        self.oom_above = oom_above
        self.fail = fail
        self.sleep = sleep
        # One entry per call (prompts, start, end, thread), for tests that check the orchestration.
        # It keeps every prompt's text: a long run turns it off (`--engine-arg history=false`).
        self.keep_history = history
        self.history: list[dict] = []
        self._scripted: list[str] = []
        self._lock = threading.Lock()
        # Instance attribute shadows the class default so one class serves both shapes.
        self.supports_batch = batch

    def enqueue_failure(self, kind: str, times: int = 1) -> None:
        """Make the next `times` calls fail with `kind`, whatever their prompts."""
        if kind not in FAILURES:
            raise ValueError(f"kind must be one of {sorted(FAILURES)}")
        with self._lock:
            self._scripted.extend([kind] * times)

    def complete(self, prompt: Prompt, options: GenerationOptions | None = None) -> Completion:
        return self._call([prompt], options)[0]

    def complete_batch(self, prompts: Sequence[Prompt], options: GenerationOptions | None = None) -> list[Completion]:
        if not self.supports_batch:
            return [self.complete(p, options) for p in prompts]
        return self._call(list(prompts), options)

    @property
    def default_window(self) -> int:
        return self.window

    def stream(self, requests, options: GenerationOptions | None = None, *, window: int | None = None):
        """Simulated continuous batching: every step advances all requests in flight by one."""
        options = options or self.options
        window = window or self.window
        flying: dict[str, list] = {}  # key -> [steps left, prompt, text]
        requests = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(flying) < window:
                item = next(requests, StopIteration)
                if item is StopIteration:
                    exhausted = True
                elif item is None:
                    break
                else:
                    key, prompt = item
                    text = as_messages(prompt)[-1]["content"]
                    if self.keep_history:
                        with self._lock:
                            self.history.append(
                                {
                                    "prompts": [text],
                                    "start": time.perf_counter(),
                                    "end": None,
                                    "thread": threading.get_ident(),
                                    "error": None,
                                    "key": key,
                                }
                            )
                    flying[key] = [self.steps(text), prompt, text]
            self.max_in_flight = max(self.max_in_flight, len(flying))
            if not flying:
                if exhausted:
                    return
                if self.latency:
                    self.sleep(self.latency)
                continue
            if self.latency:
                self.sleep(self.latency)
            for key in list(flying):
                flying[key][0] -= 1
                if flying[key][0] > 0:
                    continue
                _, prompt, text = flying.pop(key)
                kind = self.fail(text) if self.fail else None
                if kind == "engine":
                    raise TransientProviderError("fake engine died")
                if kind:
                    yield key, _failure(kind, 1)
                else:
                    yield key, self._call([prompt], options, record=False)[0]

    def count_tokens(self, prompt: Prompt) -> int:
        return sum(len(m["content"].split()) for m in as_messages(prompt))

    def _call(self, prompts: list[Prompt], options: GenerationOptions | None, record: bool = True) -> list[Completion]:
        options = options or self.options
        started = time.perf_counter()
        texts = [as_messages(p)[-1]["content"] for p in prompts]
        if not record:
            return [self._answer(p, text, options) for p, text in zip(prompts, texts)]
        record = {"prompts": texts, "start": started, "end": None, "thread": threading.get_ident(), "error": None}
        with self._lock:
            if self.keep_history:
                self.history.append(record)
            scripted = self._scripted.pop(0) if self._scripted else None
        if self.latency:
            self.sleep(self.latency)
        kind = scripted
        if kind is None and self.oom_above is not None and len(prompts) > self.oom_above:
            kind = "oom"
        if kind is None and self.fail is not None:
            kind = next((k for k in map(self.fail, texts) if k), None)
        record["end"] = time.perf_counter()
        if kind:
            record["error"] = kind
            raise _failure(kind, len(prompts))
        return [self._answer(p, text, options) for p, text in zip(prompts, texts)]

    def _answer(self, prompt: Prompt, text: str, options: GenerationOptions) -> Completion:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        words = text.split()[: max(1, min(options.max_tokens, 8)) - 1]
        reply = f"summary-{digest}: " + " ".join(words)
        n = len(reply.split())
        return Completion(reply, self.count_tokens(prompt), n, "length" if n >= options.max_tokens else "stop")


def _failure(kind: str, batch_size: int) -> ProviderError:
    if kind == "oom":
        return ProviderOutOfMemoryError("fake out of memory", batch_size=batch_size)
    return FAILURES[kind](f"fake {kind} failure")
