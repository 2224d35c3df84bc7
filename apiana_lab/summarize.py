"""Chunks into reflective summaries: the sequential baseline and the parallel transform."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .chunking import Chunk
from .errors import ConfigError, PermanentProviderError, ProviderError, ProviderOutOfMemoryError
from .progress import Progress, ProgressCallback
from .prompts import SYSTEM_PROMPT, USER_TEMPLATE, check_template, load_prompt, prompt_hash, render_user_prompt
from .providers.base import GenerationOptions, LLMProvider
from .store import SummaryKey, SummaryRecord

logger = logging.getLogger(__name__)


@dataclass
class RunStats:
    """Figures of one summarization run, for run.json and benchmarks."""

    computed: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    batch_size_changes: list[dict] = field(default_factory=list)
    batch_latencies: list[float] = field(default_factory=list)
    provider_intervals: list[tuple[float, float]] = field(default_factory=list)
    failures_by_reason: dict[str, int] = field(default_factory=dict)

    def figures(self) -> dict:
        """Rates, latency percentiles and where the time went."""
        busy = _union_length(self.provider_intervals)
        lat = sorted(self.batch_latencies)
        s = self.seconds or 1e-9
        return {
            "summaries_computed": self.computed,
            "failed": self.failed,
            "failures_by_reason": dict(self.failures_by_reason),
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "summarize_seconds": round(self.seconds, 4),
            "chunks_per_s": round(self.computed / s, 4),
            "prompt_tokens_per_s": round(self.prompt_tokens / s, 2),
            "completion_tokens_per_s": round(self.completion_tokens / s, 2),
            "batches": len(lat),
            "batch_latency_s": {f"p{q}": round(_percentile(lat, q), 4) for q in (50, 90, 99)} if lat else {},
            "provider_seconds": round(busy, 4),
            "orchestration_seconds": round(max(0.0, self.seconds - busy), 4),
            "batch_size_changes": list(self.batch_size_changes),
        }


class SummarizerTransform:
    """The sequential baseline: one chunk at a time through `provider.complete`.

    Args:
        provider: any LLMProvider.
        system_prompt, user_template: prompt texts (default: the files in prompts/).
        max_length: most new tokens per summary.
        **options: other generation options (temperature, top_p, seed, stop).
    """

    def __init__(self, provider: LLMProvider, system_prompt: str | None = None, user_template: str | None = None, max_length: int = 300, **options):
        self.provider = provider
        self.system_prompt = system_prompt if system_prompt is not None else load_prompt(SYSTEM_PROMPT)
        self.user_template = user_template if user_template is not None else load_prompt(USER_TEMPLATE)
        check_template(self.user_template)
        self.options = GenerationOptions.from_kwargs(max_tokens=max_length, **options)
        self.stats = RunStats()

    @property
    def key(self) -> SummaryKey:
        """Summaries made under the same key are interchangeable, so a rerun may reuse them."""
        return SummaryKey(self.provider.model, prompt_hash(self.system_prompt, self.user_template), self.options.digest())

    def prompt(self, chunk: Chunk) -> list[dict]:
        """The chat sent to the model for one chunk."""
        user = render_user_prompt(self.user_template, title=chunk.title, date=chunk.date, text=chunk.text)
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    def run(self, chunks: Iterable[Chunk], progress: ProgressCallback | None = None) -> Iterator[tuple[Chunk, SummaryRecord]]:
        """Summarize in order, yielding each (chunk, record) as it finishes."""
        chunks = list(chunks)
        self.stats = stats = RunStats()
        start = time.perf_counter()
        if progress:
            progress(Progress(0, len(chunks), 0, 0, 0, 0, 0.0, 1, 0))
        for i, chunk in enumerate(chunks):
            t0 = time.perf_counter()
            try:
                c = self.provider.complete(self.prompt(chunk), self.options)
                record = SummaryRecord(chunk.id, c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason)
                stats.computed += 1
                stats.prompt_tokens += c.prompt_tokens
                stats.completion_tokens += c.completion_tokens
            except ProviderError as e:
                reason = _classify(e)
                record = SummaryRecord(chunk.id, error=str(e), reason=reason)
                stats.failed += 1
                stats.failures_by_reason[reason] = stats.failures_by_reason.get(reason, 0) + 1
                logger.warning("chunk %s failed (%s): %s", chunk.id, reason, e)
            t1 = time.perf_counter()
            stats.batch_latencies.append(t1 - t0)
            stats.provider_intervals.append((t0, t1))
            stats.seconds = t1 - start
            if progress:
                progress(Progress(i + 1, len(chunks), stats.failed, 0, stats.prompt_tokens, stats.completion_tokens, stats.seconds, 1, 0))
            yield chunk, record

    def transform(self, chunks: Iterable[Chunk]) -> list[SummaryRecord]:
        """All records, in input order."""
        return [record for _, record in self.run(chunks)]

    def __call__(self, chunks: Iterable[Chunk], progress: ProgressCallback | None = None) -> Iterator[tuple[Chunk, SummaryRecord]]:
        """Same as run(); a method, so that a subclass's run() is the one called."""
        return self.run(chunks, progress)


class ParallelSummarizerTransform(SummarizerTransform):
    """Many chunks at once, whatever the provider can do.

    A provider with native batching gets batches of `batch_size`; one without gets
    `max_workers` concurrent calls; a provider with several replicas gets one worker
    per replica. Out-of-memory halves the batch and retries the same chunks, then grows
    back after `grow_after` successes. Transient errors retry with exponential backoff
    and jitter; permanent ones are isolated to the chunk that caused them.
    """

    def __init__(
        self,
        provider: LLMProvider,
        max_workers: int = 2,
        batch_size: int = 16,
        system_prompt: str | None = None,
        user_template: str | None = None,
        max_length: int = 300,
        *,
        max_retries: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        grow_after: int = 4,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        **options,
    ):
        super().__init__(provider, system_prompt, user_template, max_length, **options)
        if max_workers < 1 or batch_size < 1:
            raise ConfigError("max_workers and batch_size must be at least 1")
        self.max_workers = max_workers
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.grow_after = grow_after
        self.sleep = sleep
        self.rng = rng or random.Random(0)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based): exponential, half jittered."""
        cap = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return cap / 2 + self.rng.random() * cap / 2

    def run(self, chunks: Iterable[Chunk], progress: ProgressCallback | None = None) -> Iterator[tuple[Chunk, SummaryRecord]]:
        """Summarize everything, yielding (chunk, record) pairs as batches complete."""
        for _, chunk, record in self._results(chunks, progress):
            yield chunk, record

    def transform(self, chunks: Iterable[Chunk]) -> list[SummaryRecord]:
        """All records, in input order (run() yields them in completion order)."""
        chunks = list(chunks)
        records: list[SummaryRecord | None] = [None] * len(chunks)
        for i, _, record in self._results(chunks, None):
            records[i] = record
        return records

    def _results(self, chunks: Iterable[Chunk], progress: ProgressCallback | None) -> Iterator[tuple[int, Chunk, SummaryRecord]]:
        """(input index, chunk, record) triples as batches complete."""
        chunks = list(chunks)
        self.stats = RunStats()
        if not chunks:
            return
        state = _State(self, chunks, progress)
        state._report()  # the bar appears, with its total, before the first batch is back
        workers = self.max_workers
        if getattr(self.provider, "replicas", 1) > 1:
            workers = self.provider.replicas
        threads = [threading.Thread(target=state.work, args=(w,), name=f"summarizer-{w}", daemon=True) for w in range(workers)]
        for th in threads:
            th.start()
        try:
            remaining = len(chunks)
            while remaining:
                item = state.out.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= 1
                yield item
        finally:
            state.stop.set()
            with state.cond:
                state.cond.notify_all()
            for th in threads:
                th.join(timeout=60)
            self.stats.seconds = time.perf_counter() - state.start


class _State:
    """What the workers of one parallel run share."""

    def __init__(self, t: ParallelSummarizerTransform, chunks: list[Chunk], progress):
        self.t = t
        self.chunks = chunks
        self.progress = progress
        self.prompts = [t.prompt(c) for c in chunks]
        self.out: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.in_flight = 0
        self.stop = threading.Event()
        self.batching = t.provider.supports_batch
        self.batch_size = t.batch_size if self.batching else 1
        self.streak = 0
        self.done = 0
        self.start = time.perf_counter()
        self.lengths = [self._length(i) for i in range(len(chunks))]
        # Longest first: an out-of-memory error shows up in the first batch, not after an
        # hour, and chunks of similar length share a batch so padding stays small.
        order = sorted(range(len(chunks)), key=lambda i: -self.lengths[i])
        self.pending: deque[int] = deque()
        limit = t.provider.max_context
        for i in order:
            if limit and self.lengths[i] + t.options.max_tokens > limit:
                self._fail([i], "too_long", f"prompt of {self.lengths[i]} tokens plus max_tokens={t.options.max_tokens} exceeds the model's context of {limit}; use a smaller --chunk-size")
            else:
                self.pending.append(i)
        self.isolated: deque[int] = deque()  # singled out after a permanent error in a batch

    def _length(self, i: int) -> int:
        n = self.t.provider.count_tokens(self.prompts[i])
        return n if n is not None else self.chunks[i].token_count

    def take(self) -> list[int]:
        """The next batch; waits while other batches are in flight, since an OOM may requeue them."""
        with self.cond:
            while not self.stop.is_set():
                if self.isolated:
                    batch = [self.isolated.popleft()]
                elif self.pending:
                    batch = [self.pending.popleft() for _ in range(min(self.batch_size, len(self.pending)))]
                elif self.in_flight == 0:
                    return []
                else:
                    self.cond.wait(timeout=0.5)
                    continue
                self.in_flight += 1
                return batch
            return []

    def work(self, worker: int) -> None:
        try:
            while not self.stop.is_set():
                batch = self.take()
                if not batch:
                    return
                try:
                    self._run_batch(batch, worker)
                finally:
                    with self.cond:
                        self.in_flight -= 1
                        self.cond.notify_all()
        except BaseException as e:  # a bug in orchestration must surface, not hang the run
            self.out.put(e)
            with self.cond:
                self.stop.set()
                self.cond.notify_all()

    def _run_batch(self, batch: list[int], worker: int) -> None:
        t, stats = self.t, self.t.stats
        attempt = 0
        while True:
            t0 = time.perf_counter()
            try:
                prompts = [self.prompts[i] for i in batch]
                if self.batching and t.provider.replicas > 1:
                    # One worker per replica: each worker's batches stay on its own GPU.
                    results = t.provider.complete_batch(prompts, t.options, replica=worker % t.provider.replicas)
                elif self.batching:
                    results = t.provider.complete_batch(prompts, t.options)
                else:
                    results = [t.provider.complete(prompts[0], t.options)]
                error = None
            except Exception as e:  # classified below; anything unknown counts as transient
                results, error = None, e
            t1 = time.perf_counter()
            with self.lock:
                stats.provider_intervals.append((t0, t1))
            if error is None:
                with self.lock:
                    stats.batch_latencies.append(t1 - t0)
                self._succeed(batch, results, attempt)
                return
            kind = _classify(error)
            if kind == "oom":
                self._shrink(batch, error)
                return
            if kind == "permanent":
                if len(batch) > 1:
                    # One bad prompt must not fail its batch-mates: retry them one by one.
                    with self.lock:
                        self.isolated.extend(batch)
                else:
                    self._fail(batch, "permanent", str(error))
                return
            attempt += 1
            if attempt > t.max_retries:
                self._fail(batch, "transient", f"{error} (gave up after {t.max_retries} retries)")
                return
            with self.lock:
                stats.retries += 1
            delay = t.backoff(attempt)
            logger.warning("transient error on a batch of %d (%s); retry %d/%d in %.2f s", len(batch), error, attempt, t.max_retries, delay)
            t.sleep(delay)

    def _succeed(self, batch, results, attempt) -> None:
        stats = self.t.stats
        with self.lock:
            for i, c in zip(batch, results):
                stats.computed += 1
                stats.prompt_tokens += c.prompt_tokens
                stats.completion_tokens += c.completion_tokens
                rec = SummaryRecord(self.chunks[i].id, c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason, attempts=attempt + 1)
                self.out.put((i, self.chunks[i], rec))
            self.done += len(batch)
            self.streak += 1
            if self.batching and self.streak >= self.t.grow_after and self.batch_size < self.t.batch_size:
                self._change(min(self.t.batch_size, self.batch_size * 2), "grow back after successes")
            self._report()

    def _shrink(self, batch, error) -> None:
        with self.lock:
            if len(batch) == 1:
                self._fail(batch, "oom", f"out of memory even at batch size 1: {error}", locked=True)
                return
            self.streak = 0
            self._change(max(1, min(self.batch_size, len(batch) // 2)), f"out of memory at batch size {len(batch)}")
            # The same chunks go back to the front, so the next (smaller) batch retries them.
            self.pending.extendleft(reversed(batch))

    def _change(self, new: int, why: str) -> None:
        old, self.batch_size = self.batch_size, new
        self.streak = 0
        change = {"from": old, "to": new, "reason": why, "at_done": self.done, "seconds": round(time.perf_counter() - self.start, 3)}
        self.t.stats.batch_size_changes.append(change)
        logger.warning("batch size %d -> %d (%s)", old, new, why)

    def _fail(self, batch, reason: str, message: str, locked: bool = False) -> None:
        if not locked:
            with self.lock:
                return self._fail(batch, reason, message, locked=True)
        stats = self.t.stats
        for i in batch:
            stats.failed += 1
            stats.failures_by_reason[reason] = stats.failures_by_reason.get(reason, 0) + 1
            logger.warning("chunk %s failed (%s): %s", self.chunks[i].id, reason, message)
            self.out.put((i, self.chunks[i], SummaryRecord(self.chunks[i].id, error=message, reason=reason)))
        self.done += len(batch)
        self._report()

    def _report(self) -> None:
        if self.progress:
            s = self.t.stats
            elapsed = time.perf_counter() - self.start
            self.progress(Progress(self.done, len(self.chunks), s.failed, 0, s.prompt_tokens, s.completion_tokens, elapsed, self.batch_size, s.retries))


def _classify(error: BaseException) -> str:
    """oom, transient or permanent: decides between shrink, retry and isolate."""
    if isinstance(error, ProviderOutOfMemoryError) or "OutOfMemory" in type(error).__name__ or isinstance(error, MemoryError):
        return "oom"
    if isinstance(error, (PermanentProviderError, ConfigError, ValueError, TypeError)):
        return "permanent"
    # TransientProviderError, timeouts, dropped connections, and anything unknown: worth a retry.
    return "transient"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    """Wall time during which at least one provider call was running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total
