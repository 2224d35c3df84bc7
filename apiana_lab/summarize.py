"""Chunks into reflective summaries: the sequential baseline and the parallel transform."""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .chunking import Chunk, ChunkRef
from .collate import Collator
from .errors import (
    ConfigError,
    FatalProviderError,
    PermanentProviderError,
    ProviderError,
    ProviderOutOfMemoryError,
    TransientProviderError,
)
from .progress import Progress, ProgressCallback
from .prompts import SYSTEM_PROMPT, USER_TEMPLATE, check_template, load_prompt, prompt_hash, render_user_prompt
from .providers.base import GenerationOptions, LLMProvider
from .store import SummaryKey, SummaryRecord
from .tuning import AUTO_MAX_SIZE, BatchTuner, is_auto, kv_cache_tight

logger = logging.getLogger(__name__)

# A run's work list: whole chunks, or references whose text a `load` function fetches when needed.
Item = Chunk | ChunkRef
Loader = Callable[[Sequence[str]], list[Chunk]]
LOAD_WINDOW = 64  # chunk texts fetched from the store at a time


@dataclass
class RunStats:
    """Figures of one summarization run, for run.json and benchmarks."""

    mode: str = ""  # sequential, batch, concurrent or stream: which path ran
    computed: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    first_result_seconds: float | None = None  # from the start to the first finished summary
    preemptions: int | None = None  # engine preemptions during the run; None when the engine does not say
    batch_size_changes: list[dict] = field(default_factory=list)
    batch_size_mode: str = "fixed"  # "auto": sized by a BatchTuner from measured throughput (apiana_lab.tuning)
    batch_size_final: int | None = None  # under auto: the size (or requests in flight) it ended at
    latencies: list[float] = field(default_factory=list)  # per batch, or per request when streaming
    provider_intervals: list[tuple[float, float]] = field(default_factory=list)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    estimated_tokens: int = 0  # summaries whose token counts are estimates (the backend gave none)

    def figures(self) -> dict:
        """Rates, latency percentiles and where the time went."""
        busy = _union_length(self.provider_intervals)
        lat = sorted(self.latencies)
        s = self.seconds or 1e-9
        return {
            "mode": self.mode,
            "summaries_computed": self.computed,
            "failed": self.failed,
            "failures_by_reason": dict(self.failures_by_reason),
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "summaries_with_estimated_tokens": self.estimated_tokens,
            "summarize_seconds": round(self.seconds, 4),
            "first_result_seconds": None if self.first_result_seconds is None else round(self.first_result_seconds, 4),
            "chunks_per_s": round(self.computed / s, 4),
            "prompt_tokens_per_s": round(self.prompt_tokens / s, 2),
            "completion_tokens_per_s": round(self.completion_tokens / s, 2),
            "batches": len(lat),
            # Streaming has no batches: each request's own latency, from submission to its end.
            "latency_per": "request" if self.mode == "stream" else "batch",
            "batch_latency_s": {f"p{q}": round(quantile(lat, q / 100), 4) for q in (50, 90, 99)} if lat else {},
            "provider_seconds": round(busy, 4),
            "orchestration_seconds": round(max(0.0, self.seconds - busy), 4),
            "batch_size_changes": list(self.batch_size_changes),
            "batch_size_mode": self.batch_size_mode,
            "batch_size_final": self.batch_size_final,
            "preemptions": self.preemptions,
        }

    def count(self, record: SummaryRecord) -> None:
        """Add one finished record to the totals."""
        if record.error is None:
            self.computed += 1
            self.prompt_tokens += record.prompt_tokens
            self.completion_tokens += record.completion_tokens
            self.estimated_tokens += record.tokens_estimated
        else:
            self.failed += 1
            self.failures_by_reason[record.reason] = self.failures_by_reason.get(record.reason, 0) + 1


class Reporter:
    """Turns a run's state into Progress snapshots: a start, every change, and exactly one last one."""

    def __init__(self, progress: ProgressCallback | None, total: int, stats: RunStats, start: float):
        self.progress = progress
        self.total = total
        self.stats = stats
        self.start = start
        self.done = 0
        self.ended = False

    def __call__(self, batch_size: int, event: str = "", finished: bool = False, error: str = "") -> None:
        if self.ended:
            return
        self.ended = finished
        if self.progress:
            s = self.stats
            self.progress(
                Progress(
                    done=self.done,
                    total=self.total,
                    failed=s.failed,
                    prompt_tokens=s.prompt_tokens,
                    completion_tokens=s.completion_tokens,
                    elapsed=time.perf_counter() - self.start,
                    batch_size=batch_size,
                    retries=s.retries,
                    event=event,
                    finished=finished,
                    error=error,
                )
            )


class SummarizerTransform:
    """The sequential baseline: one chunk at a time through `provider.complete`.

    Args:
        provider: any LLMProvider.
        system_prompt, user_template: prompt texts (default: the files in prompts/).
        max_length: most new tokens per summary.
        **options: other generation options (temperature, top_p, seed, stop).
    """

    def __init__(
        self,
        provider: LLMProvider,
        system_prompt: str | None = None,
        user_template: str | None = None,
        max_length: int = 300,
        **options,
    ):
        self.provider = provider
        self.system_prompt = system_prompt if system_prompt is not None else load_prompt(SYSTEM_PROMPT)
        self.user_template = user_template if user_template is not None else load_prompt(USER_TEMPLATE)
        check_template(self.user_template)
        self.options = GenerationOptions.from_kwargs(max_tokens=max_length, **options)
        self.stats = RunStats()

    @property
    def key(self) -> SummaryKey:
        """Summaries made under the same key are interchangeable, so a rerun may reuse them."""
        return SummaryKey(
            self.provider.model, prompt_hash(self.system_prompt, self.user_template), self.options.digest()
        )

    def prompt(self, chunk: Chunk) -> list[dict]:
        """The chat sent to the model for one chunk."""
        user = render_user_prompt(self.user_template, title=chunk.title, date=chunk.date, text=chunk.text)
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    def run(
        self, chunks: Iterable[Item], progress: ProgressCallback | None = None, *, load: Loader | None = None
    ) -> Iterator[tuple[Chunk, SummaryRecord]]:
        """Summarize in order, yielding each (chunk, record) as it finishes.

        `chunks` may hold ChunkRefs when `load` fetches their texts (from the store, a window at a time).
        """
        items = list(chunks)
        self.stats = stats = RunStats(mode="sequential")
        start = time.perf_counter()
        report = Reporter(progress, len(items), stats, start)
        report(1, "start")
        error = "stopped before the end"
        try:
            for chunk in _loaded(items, load):
                t0 = time.perf_counter()
                try:
                    c = self.provider.complete(self.prompt(chunk), self.options)
                    record = SummaryRecord(
                        chunk.id,
                        c.text,
                        c.prompt_tokens,
                        c.completion_tokens,
                        c.finish_reason,
                        tokens_estimated=bool(c.meta.get("tokens_estimated")),
                    )
                except FatalProviderError:
                    raise
                except ProviderError as e:
                    reason = _reason(e)
                    record = SummaryRecord(chunk.id, error=str(e), reason=reason)
                    logger.warning("chunk %s failed (%s): %s", chunk.id, reason, e)
                t1 = time.perf_counter()
                stats.count(record)
                if record.error is None and stats.first_result_seconds is None:
                    stats.first_result_seconds = t1 - start
                stats.latencies.append(t1 - t0)
                stats.provider_intervals.append((t0, t1))
                stats.seconds = t1 - start
                report.done += 1
                report(1)
                yield chunk, record
            error = ""
        except BaseException as e:
            error = why_stopped(e)
            raise
        finally:
            stats.seconds = time.perf_counter() - start
            report(1, "end", finished=True, error=error)

    def transform(self, chunks: Iterable[Item], *, load: Loader | None = None) -> list[SummaryRecord]:
        """All records, in input order."""
        return [record for _, record in self.run(chunks, load=load)]

    def __call__(
        self, chunks: Iterable[Item], progress: ProgressCallback | None = None, **kwargs
    ) -> Iterator[tuple[Chunk, SummaryRecord]]:
        """Same as run(); a method, so that a subclass's run() is the one called."""
        return self.run(chunks, progress, **kwargs)


class ParallelSummarizerTransform(SummarizerTransform):
    """Many chunks at once, whatever the provider can do.

    - A streaming provider (vLLM) gets a window of `batch_size` requests in flight; each
      summary comes back as its request finishes, with no batch barrier. One thread owns
      the engine, so `max_workers` does not apply.
    - A provider with native batching gets batches of `batch_size` from `max_workers`
      workers; with several replicas (GPUs), one worker per replica. Out of memory halves
      the batch and retries the same chunks, then grows back after `grow_after` successes.
    - Any other provider gets `max_workers` concurrent single calls.

    `batch_size="auto"` sizes the run from its measured output tokens/s (apiana_lab.tuning.BatchTuner):
    with native batching, the rows per batch; for single calls, the requests in flight, never above
    `max_workers` (default AUTO_MAX_SIZE). Either starts at the backend's default window. Out of
    memory still halves the batch, and auto never climbs back to a size that failed. A streaming
    provider keeps its engine's window.

    Errors are told apart by their type alone (apiana_lab.errors): a TransientProviderError
    retries with exponential backoff and jitter (at least as long as the backend's
    Retry-After); a PermanentProviderError is isolated to the chunk that caused it; a
    ProviderOutOfMemoryError shrinks the batch; a FatalProviderError (rejected credentials)
    stops the run. Any other exception is a bug, in a provider or here: the run stops at once,
    hands on the summaries that finished before it (so they are stored), and raises it with
    its traceback. `batch_size=None` and `max_workers=None` take the provider's defaults
    (`default_window`).
    """

    def __init__(
        self,
        provider: LLMProvider,
        max_workers: int | None = None,
        batch_size: int | str | None = None,
        system_prompt: str | None = None,
        user_template: str | None = None,
        max_length: int = 300,
        *,
        stream: bool | None = None,
        max_retries: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        grow_after: int = 4,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        tune_window: int = 2,
        tune_tolerance: float = 0.05,
        clock: Callable[[], float] = time.perf_counter,
        **options,
    ):
        super().__init__(provider, system_prompt, user_template, max_length, **options)
        if stream and not provider.supports_stream:
            raise ConfigError(f"The {provider.name} backend has no streaming path; leave stream unset.")
        self.streaming = provider.supports_stream if stream is None else stream
        # Auto where the batch size is ours to choose; a stream keeps its engine's window.
        self.auto = is_auto(batch_size) and not self.streaming
        if is_auto(batch_size):
            batch_size = None
        elif isinstance(batch_size, str):
            raise ConfigError(f"batch_size must be 'auto' or a whole number, not {batch_size!r}")
        # Auto's ceiling: rows per batch, or for single calls the requests in flight (`max_workers`).
        self.auto_max = AUTO_MAX_SIZE if provider.supports_batch or max_workers is None else max_workers
        if max_workers is None:
            # A batching backend is kept busy by its batches; any other one by concurrent calls.
            max_workers = 2 if provider.supports_batch else AUTO_MAX_SIZE if self.auto else provider.default_window
        if batch_size is None:
            batch_size = provider.default_window
        # Where auto starts: the fixed default, so a run too short to tune runs as it would have, and a
        # long one climbs from there.
        self.auto_start = max(1, min(provider.default_window, self.auto_max))
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
        self.tune_window = tune_window
        self.tune_tolerance = tune_tolerance
        self.clock = clock

    def backoff(self, attempt: int, error: BaseException | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1-based): exponential, half jittered, at least Retry-After."""
        cap = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        delay = cap / 2 + self.rng.random() * cap / 2
        return max(delay, getattr(error, "retry_after", None) or 0.0)

    def run(
        self, chunks: Iterable[Item], progress: ProgressCallback | None = None, *, load: Loader | None = None
    ) -> Iterator[tuple[Chunk, SummaryRecord]]:
        """Summarize everything, yielding (chunk, record) pairs as they complete."""
        for _, chunk, record in self._results(chunks, progress, load):
            yield chunk, record

    def transform(self, chunks: Iterable[Item], *, load: Loader | None = None) -> list[SummaryRecord]:
        """All records, in input order (run() yields them in completion order)."""
        chunks = list(chunks)
        records: list[SummaryRecord | None] = [None] * len(chunks)
        for i, _, record in self._results(chunks, None, load):
            records[i] = record
        return records

    def _results(
        self, chunks: Iterable[Item], progress: ProgressCallback | None, load: Loader | None
    ) -> Iterator[tuple[int, Chunk, SummaryRecord]]:
        """(input index, chunk, record) triples as they complete."""
        items = list(chunks)
        mode = "stream" if self.streaming else "batch" if self.provider.supports_batch else "concurrent"
        self.stats = RunStats(mode=mode)
        state = _State(self, items, progress, load)
        preempted = self.provider.engine_metrics().get("num_preemptions")
        error = "stopped before the end"
        try:
            state.report("start")  # the bar appears, with its total, before the first result is back
            for i in state.rejected:
                chunk, record = state.reject(i)
                state.report()
                yield i, chunk, record
            if not state.order:
                error = ""
                return
            if self.streaming:
                yield from _stream(state)
            else:
                yield from _workers(state)
            error = ""
        except BaseException as e:
            error = why_stopped(e)
            raise
        finally:
            state.stop.set()
            self.stats.seconds = time.perf_counter() - state.start
            if state.tuner is not None:
                self.stats.batch_size_final = state.size
            after = self.provider.engine_metrics().get("num_preemptions")
            if preempted is not None and after is not None:
                self.stats.preemptions = int(after - preempted)
            state.report("end", finished=True, error=error)


class _State:
    """What one parallel run shares between its workers (or its one streaming loop)."""

    def __init__(self, t: ParallelSummarizerTransform, items: list[Item], progress, load: Loader | None):
        self.t = t
        self.items = items
        self.load = load
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.stop = threading.Event()
        self.start = time.perf_counter()
        self.batching = t.provider.supports_batch and not t.streaming
        self.batch_size = t.batch_size if (self.batching or t.streaming) else 1
        self.limit: int | None = None  # under auto without batching: the requests allowed in flight
        self.tuner: BatchTuner | None = None
        self.streak = 0
        self.reporter = Reporter(progress, len(items), t.stats, self.start)
        if any(not isinstance(c, Chunk) for c in items) and load is None:
            raise ConfigError("ChunkRefs need a `load` function that fetches their texts")
        # Lengths come from the chunker's token counts plus the prompt's fixed part, measured
        # once: no prompt is tokenized here (the engine does it once, when it is sent).
        overhead = t.provider.count_tokens(t.prompt(_EMPTY)) or 0
        self.lengths = [c.token_count + overhead for c in items]
        limit = t.provider.max_context
        max_tokens = t.options.max_tokens
        self.rejected = [i for i, n in enumerate(self.lengths) if limit and n + max_tokens > limit]
        rejected = set(self.rejected)
        # Longest first: an out-of-memory error shows up in the first batch, not after an
        # hour, and chunks of similar length share a batch so padding stays small. Results
        # carry their input index, so transform() puts them back in input order.
        kept = [i for i in range(len(items)) if i not in rejected]
        self.order = Collator.by(kept, lambda i: self.lengths[i]).ordered(kept)
        self.pending: deque[int] = deque(self.order)
        self.isolated: deque[int] = deque()  # singled out after a permanent error in a batch
        self.in_flight = 0
        self.out: queue.Queue = queue.Queue()
        if t.auto:
            start = t.auto_start
            t.batch_size = start  # what this run started at (run.json's batch_size)
            self.tuner = BatchTuner(
                start,
                hi=t.auto_max,
                window=t.tune_window,
                tolerance=t.tune_tolerance,
                tight=lambda: kv_cache_tight(t.provider),
            )
            if self.batching:
                self.batch_size = start
            else:
                self.limit = start
            t.stats.batch_size_mode = "auto"
        # Finished results wait in `out` until the caller stores them, and profiling them can take
        # longer than a fast backend takes to answer. Each one holds its chunk's text, so workers
        # take no new batch while this many wait: otherwise the whole export could pile up here. Set
        # from the starting size and kept there when auto grows the batches: a larger limit would only
        # let more texts wait (memory), and a worker held back costs nothing while the caller is the
        # slower side.
        self.ahead = max(LOAD_WINDOW, 2 * t.max_workers * self.batch_size)
        self.throttled = False  # a worker is waiting for the caller to take results

    @property
    def size(self) -> int:
        """The batch size as progress shows it: rows per batch, or under auto without batching the requests
        allowed in flight."""
        return self.limit if self.limit is not None else self.batch_size

    def report(self, event: str = "", finished: bool = False, error: str = "") -> None:
        self.reporter(self.size, event, finished, error)

    def reject(self, i: int) -> tuple[Chunk | ChunkRef, SummaryRecord]:
        """A prompt that cannot fit the context fails at once, without being sent."""
        limit, max_tokens = self.t.provider.max_context, self.t.options.max_tokens
        message = (
            f"prompt of about {self.lengths[i]} tokens plus max_tokens={max_tokens} exceeds the model's context "
            f"of {limit}; use a smaller --chunk-size or --max-length"
        )
        return self.items[i], self.fail(i, "too_long", message)

    def chunks(self, indices: Sequence[int]) -> list[Chunk]:
        """The chunks at these positions, texts loaded for references."""
        refs = [i for i in indices if not isinstance(self.items[i], Chunk)]
        loaded = dict(zip(refs, self.load([self.items[i].id for i in refs]))) if refs else {}
        return [loaded[i] if i in loaded else self.items[i] for i in indices]

    def succeed(self, i: int, chunk: Chunk, completion, attempts: int) -> SummaryRecord:
        """Count a finished summary (the caller holds the lock where workers run)."""
        c = completion
        record = SummaryRecord(
            chunk.id,
            c.text,
            c.prompt_tokens,
            c.completion_tokens,
            c.finish_reason,
            attempts=attempts,
            tokens_estimated=bool(c.meta.get("tokens_estimated")),
        )
        self.t.stats.count(record)
        if self.t.stats.first_result_seconds is None:
            self.t.stats.first_result_seconds = time.perf_counter() - self.start
        self.reporter.done += 1
        return record

    def fail(self, i: int, reason: str, message: str, attempts: int = 1) -> SummaryRecord:
        """Count a chunk that failed for good."""
        record = SummaryRecord(self.items[i].id, error=message, reason=reason, attempts=attempts)
        self.t.stats.count(record)
        self.reporter.done += 1
        logger.warning("chunk %s failed (%s): %s", self.items[i].id, reason, message)
        return record

    def change(self, new: int, why: str, tokens_per_s: float | None = None) -> None:
        """Record a batch-size change (under auto without batching: of the requests in flight), with the
        throughput that caused it when one did, and put it on the timeline."""
        what = "in flight" if self.limit is not None else "batch size"
        if self.limit is not None:
            old, self.limit = self.limit, new
        else:
            old, self.batch_size = self.batch_size, new
        self.streak = 0
        change = {
            "from": old,
            "to": new,
            "reason": why,
            "at_done": self.reporter.done,
            "seconds": round(time.perf_counter() - self.start, 3),
        }
        if tokens_per_s is not None:
            change["tokens_per_s"] = round(tokens_per_s, 2)
        self.t.stats.batch_size_changes.append(change)
        if tokens_per_s is not None:
            logger.info("%s %d -> %d (%s)", what, old, new, why)  # auto's own steps: expected, not a warning
        else:
            logger.warning("batch size %d -> %d (%s)", old, new, why)
        self.report(f"{what} {old} -> {new} ({why})")


_EMPTY = Chunk(
    id="", conversation_id="", title="", date=None, index=0, first_message=0, last_message=0, token_count=0, text=""
)


def _loaded(items: list[Item], load: Loader | None) -> Iterator[Chunk]:
    """Items as chunks, in order, loading references a window at a time."""
    for k in range(0, len(items), LOAD_WINDOW):
        window = items[k : k + LOAD_WINDOW]
        refs = [c.id for c in window if not isinstance(c, Chunk)]
        if refs and load is None:
            raise ConfigError("ChunkRefs need a `load` function that fetches their texts")
        loaded = iter(load(refs)) if refs else iter(())
        for c in window:
            yield c if isinstance(c, Chunk) else next(loaded)


# ---- the streaming path: one thread owns the engine, a window of requests in flight ----------


def _stream(state: _State) -> Iterator[tuple[int, Chunk, SummaryRecord]]:
    t, stats = state.t, state.t.stats
    attempts: dict[int, int] = {}
    waiting: list[tuple[float, int, int]] = []  # (not before, tie-break, index): retries in their backoff
    tie = itertools.count()
    sent: dict[str, tuple[int, Chunk, float]] = {}  # key -> (index, chunk, when sent)
    loaded: dict[int, Chunk] = {}

    def take(i: int) -> tuple[str, list[dict]]:
        if i not in loaded:
            # Fetch this chunk's text with the next few waiting behind it, a window at a time.
            ahead = [i] + [j for j in itertools.islice(state.pending, LOAD_WINDOW - 1) if j not in loaded]
            loaded.update(zip(ahead, state.chunks(ahead)))
        chunk = loaded.pop(i)
        key = f"{i}:{attempts.get(i, 0)}"
        sent[key] = (i, chunk, time.perf_counter())
        return key, t.prompt(chunk)

    def requests():
        while True:
            if waiting and waiting[0][0] <= time.monotonic():
                yield take(heapq.heappop(waiting)[2])
            elif state.pending:
                yield take(state.pending.popleft())
            elif waiting or sent:
                yield None  # retries are backing off, or answers are due: nothing to send yet
            else:
                return

    def retry_or_fail(i: int, chunk: Chunk, error: BaseException) -> SummaryRecord | None:
        attempts[i] = attempts.get(i, 0) + 1
        if attempts[i] > t.max_retries:
            return state.fail(i, _reason(error), f"{error} (gave up after {t.max_retries} retries)", attempts[i])
        stats.retries += 1
        delay = t.backoff(attempts[i], error)
        logger.warning(
            "chunk %s: transient error (%s); retry %d/%d in %.2f s", chunk.id, error, attempts[i], t.max_retries, delay
        )
        loaded[i] = chunk
        heapq.heappush(waiting, (time.monotonic() + delay, next(tie), i))
        return None

    while state.pending or waiting:
        stream = t.provider.stream(requests(), t.options, window=state.batch_size)
        try:
            for key, result in stream:
                i, chunk, sent_at = sent.pop(key)
                now = time.perf_counter()
                stats.latencies.append(now - sent_at)
                stats.provider_intervals.append((sent_at, now))
                if not isinstance(result, BaseException):
                    record = state.succeed(i, chunk, result, attempts.get(i, 0) + 1)
                else:
                    kind = _kind(result)  # raises a fatal error, and anything that is not a ProviderError
                    if kind == "permanent":
                        record = state.fail(i, _reason(result), str(result), attempts.get(i, 0) + 1)
                    else:
                        record = retry_or_fail(i, chunk, result)
                if record is not None:
                    state.report()
                    yield i, chunk, record
        except ProviderError as e:
            # The engine itself failed: everything in flight is lost and goes back in line.
            _kind(e)  # a fatal one stops the run
            logger.warning("the engine failed with %d requests in flight: %s", len(sent), e)
            for i, chunk, _ in list(sent.values()):
                record = retry_or_fail(i, chunk, e)
                if record is not None:
                    state.report()
                    yield i, chunk, record
            sent.clear()
            if waiting:
                t.sleep(max(0.0, waiting[0][0] - time.monotonic()))
        finally:
            stream.close()


# ---- the worker path: batches (or single calls) from max_workers threads --------------------


def _workers(state: _State) -> Iterator[tuple[int, Chunk, SummaryRecord]]:
    t = state.t
    workers = t.max_workers
    if state.batching and t.provider.replicas > 1:
        workers = t.provider.replicas
    threads: list[threading.Thread] = []

    def top_up() -> None:
        # Under auto without batching, one thread per request allowed in flight, started as the limit rises.
        while len(threads) < (workers if state.limit is None else state.limit):
            w = len(threads)
            threads.append(threading.Thread(target=_work, args=(state, w), name=f"summarizer-{w}", daemon=True))
            threads[-1].start()

    top_up()
    try:
        remaining = len(state.order)
        while remaining:
            item = state.out.get()
            if state.throttled and state.out.qsize() < state.ahead:
                with state.cond:
                    state.throttled = False
                    state.cond.notify_all()
            if isinstance(item, BaseException):
                # Stop at once, but first hand on what finished before the error, so it is stored.
                state.stop.set()
                with state.lock:  # whole batches: a worker puts a batch's records under the lock
                    finished = _drain(state.out)
                yield from finished
                raise item
            remaining -= 1
            top_up()
            yield item
    finally:
        state.stop.set()
        with state.cond:
            state.cond.notify_all()
        for th in threads:
            th.join(timeout=60)


def _take(state: _State) -> tuple[list[int], int]:
    """The next batch; waits while other batches are in flight (an OOM may requeue them) or the caller is behind."""
    epoch = 0  # the tuner's, when the batch was taken: a batch from before auto's last change is not measured
    with state.cond:
        while not state.stop.is_set():
            epoch = state.tuner.epoch if state.tuner is not None else 0
            if state.limit is not None and state.in_flight >= state.limit:
                state.cond.wait(timeout=0.5)  # under auto without batching: the requests allowed are in flight
                continue
            if (state.isolated or state.pending) and state.out.qsize() >= state.ahead:
                state.throttled = True  # the caller wakes us when it has taken some
                state.cond.wait(timeout=0.5)
                continue
            if state.isolated:
                batch = [state.isolated.popleft()]
            elif state.pending:
                batch = [state.pending.popleft() for _ in range(min(state.batch_size, len(state.pending)))]
            elif state.in_flight == 0:
                return [], epoch
            else:
                state.cond.wait(timeout=0.5)
                continue
            state.in_flight += 1
            return batch, epoch
        return [], epoch


def _work(state: _State, worker: int) -> None:
    try:
        while not state.stop.is_set():
            batch, epoch = _take(state)
            if not batch:
                return
            try:
                _run_batch(state, batch, worker, epoch)
            finally:
                with state.cond:
                    state.in_flight -= 1
                    state.cond.notify_all()
    except BaseException as e:  # a fatal provider error, or a bug here or in the provider: stops the run
        state.out.put(e)
        with state.cond:
            state.stop.set()
            state.cond.notify_all()


def _run_batch(state: _State, batch: list[int], worker: int, epoch: int = 0) -> None:
    t, stats = state.t, state.t.stats
    chunks = state.chunks(batch)
    prompts = [t.prompt(c) for c in chunks]
    attempt = 0
    while True:
        t0 = time.perf_counter()
        try:
            if state.batching and t.provider.replicas > 1:
                # One worker per replica: each worker's batches stay on its own GPU.
                results = t.provider.complete_batch(prompts, t.options, replica=worker % t.provider.replicas)
            elif state.batching:
                results = t.provider.complete_batch(prompts, t.options)
            else:
                results = [t.provider.complete(prompts[0], t.options)]
            error = None
        except ProviderError as e:  # anything else is a bug, and stops the run (see _work)
            results, error = None, e
        t1 = time.perf_counter()
        with state.lock:
            stats.provider_intervals.append((t0, t1))
        if error is None:
            with state.lock:
                stats.latencies.append(t1 - t0)
                for i, chunk, c in zip(batch, chunks, results, strict=True):  # one result per prompt, or a bug
                    state.out.put((i, chunk, state.succeed(i, chunk, c, attempt + 1)))
                state.streak += 1
                step = None
                if state.tuner is not None:  # auto: its own climb replaces the grow-back
                    tokens = sum(c.completion_tokens for c in results)
                    step = state.tuner.observe(epoch, len(batch), tokens, t.clock())
                if step is not None:
                    state.change(step.size, step.reason, step.tokens_per_s)
                elif (
                    state.tuner is None
                    and state.batching
                    and state.streak >= t.grow_after
                    and state.batch_size < t.batch_size
                ):
                    state.change(min(t.batch_size, state.batch_size * 2), "grow back after successes")
                else:
                    state.report()
            return
        kind = _kind(error)
        if kind == "oom":
            _shrink(state, batch, chunks, error)
            return
        if kind == "permanent":
            if len(batch) > 1:
                # One bad prompt must not fail its batch-mates: retry them one by one.
                with state.lock:
                    state.isolated.extend(batch)
            else:
                _fail(state, batch, chunks, _reason(error), str(error))
            return
        attempt += 1
        if state.stop.is_set():  # the run is stopping: leave the batch undone rather than wait for a retry
            return
        if attempt > t.max_retries:
            _fail(state, batch, chunks, "transient", f"{error} (gave up after {t.max_retries} retries)", attempt)
            return
        with state.lock:
            stats.retries += 1
        delay = t.backoff(attempt, error)
        logger.warning(
            "transient error on a batch of %d (%s); retry %d/%d in %.2f s",
            len(batch),
            error,
            attempt,
            t.max_retries,
            delay,
        )
        t.sleep(delay)


def _shrink(state: _State, batch: list[int], chunks: list[Chunk], error: BaseException) -> None:
    with state.lock:
        if len(batch) == 1:
            _fail(state, batch, chunks, "oom", f"out of memory even at batch size 1: {error}", locked=True)
            return
        new = max(1, min(state.batch_size, len(batch) // 2))
        state.change(new, f"out of memory at batch size {len(batch)}")
        if state.tuner is not None:
            state.tuner.out_of_memory(len(batch), new)  # the floor: auto never climbs back to a size that failed
        # The same chunks go back to the front, so the next (smaller) batch retries them.
        state.pending.extendleft(reversed(batch))


def _fail(state: _State, batch, chunks, reason: str, message: str, attempts: int = 1, locked: bool = False) -> None:
    if not locked:
        with state.lock:
            return _fail(state, batch, chunks, reason, message, attempts, locked=True)
    for i, chunk in zip(batch, chunks):
        state.out.put((i, chunk, state.fail(i, reason, message, attempts)))
    state.report()


# ---- errors and figures ---------------------------------------------------------------------


def _kind(error: BaseException) -> str:
    """oom, transient or permanent, by type alone: decides between shrink, retry and isolate.

    Raises `error` itself when it is fatal, or when it is not a ProviderError at all (a bug).
    """
    if not isinstance(error, ProviderError) or isinstance(error, FatalProviderError):
        raise error
    if isinstance(error, ProviderOutOfMemoryError):
        return "oom"
    if isinstance(error, TransientProviderError):
        return "transient"
    return "permanent"  # PermanentProviderError, or a ProviderError that does not say it is transient


def _reason(error: ProviderError) -> str:
    """The slug a failed chunk is stored under."""
    if isinstance(error, PermanentProviderError):
        return error.reason  # "too_long" when the backend says so
    return _kind(error)


def _drain(out: queue.Queue) -> list:
    """The finished results waiting in `out` (errors from other workers dropped: the first one is raised)."""
    finished = []
    while True:
        try:
            item = out.get_nowait()
        except queue.Empty:
            return finished
        if not isinstance(item, BaseException):
            finished.append(item)


def why_stopped(error: BaseException) -> str:
    """What the last progress snapshot says about a run that `error` ended."""
    if isinstance(error, GeneratorExit):
        return "stopped before the end"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"{type(error).__name__}: {error}"


def quantile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 to 1) of sorted `values`, interpolated between neighbours; None when empty."""
    if not values:
        return None
    k = (len(values) - 1) * q
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
