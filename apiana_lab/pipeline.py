"""The whole job, export file to stored summaries, as one linear pipeline."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from .chunking import Chunk, ConversationChunkerComponent
from .export.reader import read_export
from .export.types import Conversation, ReadReport
from .progress import Progress, ProgressCallback
from .providers.base import LLMProvider
from .providers.registry import get_provider
from .store import ChatFragmentWriter, SQLiteStore, Store, SummaryKey, SummaryRecord
from .summarize import ParallelSummarizerTransform, SummarizerTransform

logger = logging.getLogger(__name__)


class Pipeline:
    """A named sequence of steps; each step is a callable fed the previous step's output."""

    def __init__(self, name: str, components: Sequence[Callable]):
        self.name = name
        self.components = list(components)

    def run(self, data):
        """Push `data` (for the export pipelines: the export's path) through every step."""
        for step in self.components:
            data = step(data)
        return data

    def __repr__(self) -> str:
        names = " -> ".join(getattr(c, "__qualname__", type(c).__name__) for c in self.components)
        return f"Pipeline({self.name!r}: {names})"


class Checkpoint:
    """Stores chunks, then lets through only those without a summary under the summarizer's key."""

    def __init__(self, store: Store, key: SummaryKey, fresh: bool = False):
        self.store = store
        self.key = key
        self.fresh = fresh
        self.chunks: list[Chunk] = []
        self.reused = 0
        self.other_keys = False  # earlier results exist under another model or prompt

    def __call__(self, chunks: Iterable[Chunk]) -> list[Chunk]:
        self.chunks = list(chunks)
        self.store.add_chunks(self.chunks)
        if self.fresh:
            dropped = self.store.clear_summaries(self.key)
            if dropped:
                logger.warning("--fresh: ignoring %d earlier summaries", dropped)
        done = self.store.done_chunk_ids(self.key)
        self.other_keys = not done and self.store.has_summaries_under_other_keys(self.key)
        todo = [c for c in self.chunks if c.id not in done]
        self.reused = len(self.chunks) - len(todo)
        return todo


class ConversationRecorder:
    """Passes conversations through, saving each one's metadata in the store along the way."""

    def __init__(self, store: Store, every: int = 500):
        self.store = store
        self.every = every
        self.count = 0

    def __call__(self, conversations: Iterable[Conversation]) -> Iterator[Conversation]:
        pending = []
        for c in conversations:
            pending.append(c)
            self.count += 1
            if len(pending) >= self.every:
                self.store.add_conversations(pending)
                pending = []
            yield c
        self.store.add_conversations(pending)


class SummaryWriterStep:
    """The last step: (chunk, record) pairs into the store through ChatFragmentWriter."""

    def __init__(self, writer: ChatFragmentWriter):
        self.writer = writer
        self.failed: dict[str, str] = {}

    def __call__(self, results: Iterable[tuple[Chunk, SummaryRecord]]) -> int:
        try:
            for chunk, record in results:
                if record.error is not None:
                    self.failed[chunk.id] = f"{record.reason}: {record.error}"
                self.writer.write(record)
        finally:
            # Whatever stopped the run (Ctrl-C, an engine crash), keep what was finished.
            self.writer.flush()
        return self.writer.written


@dataclass
class RunConfig:
    """Every parameter of one export run, as recorded in run.json."""

    input: str
    output: str
    backend: str = "vllm"
    model: str | None = None
    batch_size: int = 16
    max_workers: int = 2
    chunk_size: int = 3500
    chunk_method: str = "tokens"
    max_length: int = 300
    limit: int | None = None
    sequential: bool = False
    fresh: bool = False
    temperature: float = 0.0
    seed: int | None = None


def build_summarizer(provider: LLMProvider, sequential: bool, max_workers: int, batch_size: int, max_length: int, **options):
    """The parallel transform, or the sequential baseline for A/B comparison."""
    if sequential:
        return SummarizerTransform(provider, max_length=max_length, **options)
    return ParallelSummarizerTransform(provider, max_workers=max_workers, batch_size=batch_size, max_length=max_length, **options)


def chatgpt_parallel_processing_pipeline(
    backend: str = "vllm",
    max_workers: int = 2,
    batch_size: int = 16,
    model_name: str | None = None,
    *,
    store: Store,
    provider: LLMProvider | None = None,
    chunk_size: int = 3500,
    chunk_method: str = "tokens",
    max_length: int = 300,
    sequential: bool = False,
    fresh: bool = False,
    limit: int | None = None,
    progress: ProgressCallback | None = None,
    report: ReadReport | None = None,
    provider_kwargs: dict | None = None,
    run_id: int | None = None,
    **options,
) -> Pipeline:
    """reader -> chunker -> checkpoint -> summarizer -> ChatFragmentWriter, ready to `run(path)`."""
    provider = provider or get_provider(backend, model=model_name, **(provider_kwargs or {}))
    summarizer = build_summarizer(provider, sequential, max_workers, batch_size, max_length, **options)
    chunker = ConversationChunkerComponent(chunk_method=chunk_method, chunk_size=chunk_size)
    checkpoint = Checkpoint(store, summarizer.key, fresh)
    writer = ChatFragmentWriter(store, summarizer.key, backend=provider.name, run_id=run_id)
    steps = [
        functools.partial(read_export, report=report if report is not None else ReadReport()),
        ConversationRecorder(store),
        chunker.chunk_all,
    ]
    if limit is not None:
        steps.append(lambda chunks: _first(chunks, limit))
    steps += [checkpoint, functools.partial(summarizer.run, progress=progress), SummaryWriterStep(writer)]
    pipeline = Pipeline("chatgpt_parallel_processing", steps)
    pipeline.provider, pipeline.summarizer, pipeline.checkpoint, pipeline.writer = provider, summarizer, checkpoint, writer
    return pipeline


def _first(chunks: Iterable[Chunk], n: int) -> Iterator[Chunk]:
    for i, c in enumerate(chunks):
        if i >= n:
            return
        yield c


def run_export(
    config: RunConfig,
    *,
    provider: LLMProvider | None = None,
    progress: ProgressCallback | None = None,
    provider_kwargs: dict | None = None,
) -> dict:
    """Run the whole job; write apiana.sqlite, summaries.jsonl and run.json under config.output."""
    started = time.perf_counter()
    out = Path(config.output)
    # Read the first conversation before creating anything, so bad input writes nothing.
    report = ReadReport()
    _check_input(config.input)
    options = {"temperature": config.temperature}
    if config.seed is not None:
        options["seed"] = config.seed
    t0 = time.perf_counter()
    owned = provider is None  # an engine this call starts, this call also stops
    if owned:
        provider = get_provider(config.backend, model=config.model, **(provider_kwargs or {}))
    load_seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    store = SQLiteStore(out / "apiana.sqlite")
    run_id = store.start_run(asdict(config))
    reused_box = {"reused": 0}

    def relay(p: Progress) -> None:
        # The summarizer only sees chunks left to do; the user wants the whole picture.
        r = reused_box["reused"]
        if progress:
            progress(Progress(p.done + r, p.total + r, p.failed, r, p.prompt_tokens, p.completion_tokens, p.elapsed, p.batch_size, p.retries))

    try:
        pipeline = chatgpt_parallel_processing_pipeline(
            config.backend, config.max_workers, config.batch_size, config.model,
            store=store, provider=provider, chunk_size=config.chunk_size, chunk_method=config.chunk_method,
            max_length=config.max_length, sequential=config.sequential, fresh=config.fresh, limit=config.limit,
            progress=relay, report=report, run_id=run_id, **options,
        )
        checkpoint, summarizer = pipeline.checkpoint, pipeline.summarizer
        # Run the steps up to the checkpoint first, to learn how much is reused before summarizing.
        todo = _run_until(pipeline, checkpoint, config.input)
        reused_box["reused"] = checkpoint.reused
        if checkpoint.other_keys:
            logger.warning(
                "Earlier summaries in %s were made with another model, prompt or generation options; none are reused.", out
            )
        summarize_step, writer_step = pipeline.components[-2:]
        writer_step(summarize_step(todo))
        figures = summarizer.stats.figures()
        wall = time.perf_counter() - started
        chunks = checkpoint.chunks
        result = {
            **asdict(config),
            "backend": provider.name,
            "model": provider.model,  # what was loaded; config's model may be None (the default)
            "format": report.format,
            "conversations_read": report.conversations,
            "conversations_skipped": len(report.skipped),
            "skipped_by_reason": report.skipped_by_reason,
            "chunks_total": len(chunks),
            "summaries_reused": checkpoint.reused,
            **figures,
            "failed_chunks": writer_step.failed,
            "wall_seconds": round(wall, 3),
            "load_seconds": round(load_seconds, 3),
            "provider_adjustments": getattr(provider, "adjustments", []),
            "parallel": not config.sequential,
        }
        _write_jsonl(out / "summaries.jsonl", store, summarizer.key, chunks, provider)
        store.finish_run(run_id, result)
        (out / "run.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        return result
    finally:
        store.close()
        if owned:
            provider.close()


def _run_until(pipeline: Pipeline, stop_step, data):
    for step in pipeline.components:
        data = step(data)
        if step is stop_step:
            return data
    raise AssertionError("checkpoint step not in pipeline")


def _check_input(path: str) -> None:
    """Fail on unreadable input before anything is written."""
    it = read_export(path)
    try:
        next(it, None)
    finally:
        it.close()


def _write_jsonl(path: Path, store: SQLiteStore, key: SummaryKey, chunks: list[Chunk], provider: LLMProvider) -> None:
    """One object per chunk that has a summary, in export order (rewritten whole each run)."""
    stored = store.summaries_for(key, (c.id for c in chunks))
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for c in chunks:
            s = stored.get(c.id)
            if s is None:
                continue
            row = {"chunk_id": c.id, "conversation_id": c.conversation_id, "title": c.title, **s, "backend": provider.name, "model": provider.model}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
