"""The whole job, export files to stored summaries: four steps that a Pipeline runs in order.

    read + chunk + store (Ingest) -> skip what is done (Checkpoint) -> summarize (Summarize) -> store (Write)

Memory stays flat whatever the export's size: chunks go to the store as they are made, the
run holds only their ids and token counts, and the summarizer loads texts a window at a time.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .chunking import Chunk, ChunkRef, ConversationChunkerComponent, load_tokenizer
from .errors import ConfigError
from .export.reader import read_export
from .export.types import ReadReport
from .progress import Progress, ProgressCallback
from .providers.base import LLMProvider
from .providers.registry import check_options, get_provider
from .quality import FLAGS, profile, summarize_profiles
from .store import ChatFragmentWriter, SQLiteStore, Store, SummaryKey, SummaryRecord
from .summarize import ParallelSummarizerTransform, SummarizerTransform

if TYPE_CHECKING:
    from .ray_executor import RayCluster

logger = logging.getLogger(__name__)

# While reading, conversations and chunks go to the store in transactions of this many: large
# enough for SQLite to be quick, small enough that what waits in memory stays a few MB.
STORE_CONVERSATIONS = 64
STORE_CHUNKS = 256


class Pipeline:
    """A named sequence of steps; each step is a callable fed the previous step's output."""

    def __init__(self, name: str, components: Sequence[Callable]):
        self.name = name
        self.components = list(components)

    def run(self, data):
        """Push `data` (for the export pipelines: the export paths) through every step."""
        for step in self.components:
            data = step(data)
        return data

    def __repr__(self) -> str:
        names = " -> ".join(type(c).__name__ for c in self.components)
        return f"Pipeline({self.name!r}: {names})"


class Ingest:
    """Export paths -> this run's chunks as (id, token count), in export order.

    Conversations and chunks are written to the store as they are made, so nothing of the
    export is held in memory. A chunk id seen twice in one run (the same text twice in one
    conversation) is summarized once.
    """

    def __init__(self, store: Store, chunker, *, limit: int | None = None, report: ReadReport | None = None):
        self.store = store
        self.chunker = chunker
        self.limit = limit
        self.report = report if report is not None else ReadReport()
        self.repeated = 0  # chunks dropped because the same id came earlier in this run

    def __call__(self, source) -> list[ChunkRef]:
        """`source`: export paths (one or a list), or conversations already being read."""
        refs: list[ChunkRef] = []
        seen: set[str] = set()
        conversations, chunks = [], []

        def flush() -> None:
            self.store.add_conversations(conversations)
            self.store.add_chunks(chunks)
            conversations.clear()
            chunks.clear()

        full = self.limit is not None and self.limit <= 0
        paths = isinstance(source, (str, os.PathLike)) or (
            isinstance(source, list) and all(isinstance(p, (str, os.PathLike)) for p in source)
        )
        reader = read_export(source, report=self.report) if paths else iter(source)
        try:
            for conversation in reader:
                if full:
                    break
                conversations.append(conversation)
                for chunk in self.chunker.chunk(conversation):
                    if chunk.id in seen:
                        self.repeated += 1
                        continue
                    seen.add(chunk.id)
                    chunks.append(chunk)
                    refs.append(ChunkRef(chunk.id, chunk.token_count))
                    if self.limit is not None and len(refs) >= self.limit:
                        full = True
                        break
                if len(conversations) >= STORE_CONVERSATIONS or len(chunks) >= STORE_CHUNKS:
                    flush()
        finally:
            close = getattr(reader, "close", None)
            if close is not None:
                close()
            flush()
        return refs


@dataclass
class QualityTally:
    """Flagged summaries so far in a run, reused ones included: the progress line's share."""

    flagged: int = 0


class Checkpoint:
    """This run's chunks -> those without a summary under the summarizer's key (the rest are reused).

    With `redo` (flag names, or "flagged" for any), only chunks whose kept summary carries one of
    those flags are done again; the new version goes beside the old one in the store.
    """

    def __init__(
        self,
        store: Store,
        key: SummaryKey,
        fresh: bool = False,
        redo: frozenset[str] | None = None,
        tally: QualityTally | None = None,
    ):
        self.store = store
        self.key = key
        self.fresh = fresh
        self.redo = redo
        self.tally = tally if tally is not None else QualityTally()
        self.redone = 0  # chunks picked by `redo`
        self.ids: list[str] = []  # this run's chunk ids, in export order
        self.total = 0
        self.reused = 0
        self.other_keys = False  # earlier results exist under another model, prompt or options

    def __call__(self, refs: list[ChunkRef]) -> list[ChunkRef]:
        if self.fresh:
            dropped = self.store.clear_summaries(self.key)
            if dropped:
                logger.warning("--fresh: ignoring %d earlier summaries", dropped)
        done = self.store.done_chunk_ids(self.key)
        self.ids = [r.id for r in refs]
        # Only the flagged ones: a set per chunk of a large export would cost more than its id.
        flagged = {
            v["chunk_id"]: set(v["quality"]["flags"])
            for v in self.store.kept_versions(self.ids)
            if v["quality"] and v["quality"]["flags"]
        }
        if self.redo is not None:
            picked = {cid for cid, flags in flagged.items() if "flagged" in self.redo or flags & self.redo}
            self.redone = len(picked)
            todo = [r for r in refs if r.id in picked and r.id not in done]
            if picked and not todo:
                logger.warning(
                    "--redo: the %d flagged chunks already have a summary made with these options; change "
                    "one (--seed, --temperature, --repetition-penalty, --model) to get a new version.",
                    len(picked),
                )
        else:
            self.other_keys = not done and self.store.has_summaries_under_other_keys(self.key)
            todo = [r for r in refs if r.id not in done]
        redoing = {r.id for r in todo}
        self.tally.flagged = sum(cid not in redoing for cid in flagged)
        self.total, self.reused = len(refs), len(refs) - len(todo)
        return todo


class Summarize:
    """Chunks to do -> (chunk, record) pairs as they finish; texts come from the store a window at a time."""

    def __init__(
        self,
        summarizer: SummarizerTransform,
        store: SQLiteStore,
        checkpoint: Checkpoint,
        progress: ProgressCallback | None = None,
    ):
        self.summarizer = summarizer
        self.store = store
        self.checkpoint = checkpoint
        self.progress = progress
        self.tally = checkpoint.tally

    def __call__(self, todo: list[ChunkRef]) -> Iterator[tuple[Chunk, SummaryRecord]]:
        reused, progress, tally = self.checkpoint.reused, self.progress, self.tally

        def relay(p: Progress) -> None:
            # The summarizer only sees chunks left to do; the user wants the whole picture.
            progress(replace(p, done=p.done + reused, total=p.total + reused, reused=reused, flagged=tally.flagged))

        return self.summarizer.run(todo, relay if progress else None, load=self.store.load_chunks)


class Write:
    """(chunk, record) pairs -> quality profile -> the store via ChatFragmentWriter; stops early when `cancel` is set.

    A record whose chunk comes without its text (a Ray run hands back ids) is profiled from the
    store after the run (`SQLiteStore.profile_missing`).
    """

    def __init__(
        self, writer: ChatFragmentWriter, cancel: threading.Event | None = None, tally: QualityTally | None = None
    ):
        self.writer = writer
        self.cancel = cancel
        self.tally = tally if tally is not None else QualityTally()
        self.failed: dict[str, str] = {}
        self.cancelled = False

    def __call__(self, results: Iterable[tuple[Chunk, SummaryRecord]]) -> int:
        try:
            for chunk, record in results:
                if record.error is not None:
                    self.failed[chunk.id] = f"{record.reason}: {record.error}"
                elif getattr(chunk, "text", None) is not None:
                    quality = profile(record.summary, chunk.text, record.finish_reason)
                    record.quality = quality.to_dict()
                    self.tally.flagged += bool(quality.flags)
                self.writer.write(record)
                if self.cancel is not None and self.cancel.is_set():
                    self.cancelled = True
                    break
        finally:
            # Whatever stopped the run (Ctrl-C, cancel, an engine crash), keep what was finished,
            # then stop the summarizer's workers.
            self.writer.flush()
            close = getattr(results, "close", None)
            if close is not None:
                close()
        return self.writer.written


@dataclass
class RunConfig:
    """Every parameter of one export run, as recorded in run.json."""

    input: str | list[str]  # one export, or several merged by conversation id
    output: str
    backend: str = "vllm"
    model: str | None = None
    # "auto": sized from measured throughput where the size is ours (rows per batch, or requests in flight),
    # the engine's window on vLLM (apiana_lab.tuning); None: the backend's fixed default
    batch_size: int | str | None = "auto"
    max_workers: int | None = None  # None: 2 for batching backends, the backend's window for the others
    chunk_size: int = 3500
    chunk_method: str = "tokens"
    max_length: int = 300
    limit: int | None = None
    sequential: bool = False
    fresh: bool = False
    redo: list[str] | None = None  # quality flags (or ["flagged"]): redo only chunks whose kept summary has one
    temperature: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    engine_options: dict = field(default_factory=dict)  # constructor arguments of the backend
    executor: str = "local"  # "local", or "ray": summarize on a Ray cluster's actors
    ray_address: str | None = None  # the cluster (None: RAY_ADDRESS, else a new local one)
    replicas: int | None = None  # Ray: model replicas (None: one per GPU, or one per node without GPUs)
    replica_gpus: float | None = None  # Ray: GPUs per replica (None: 1 when the cluster has GPUs, else 0)
    replica_cpus: float = 1.0  # Ray: CPUs per replica

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, (str, os.PathLike)) else [str(p) for p in self.input]


def build_summarizer(
    provider: LLMProvider,
    sequential: bool,
    max_workers: int | None,
    batch_size: int | str | None,
    max_length: int,
    **options,
):
    """The parallel transform, or the sequential baseline for A/B comparison."""
    if sequential:
        return SummarizerTransform(provider, max_length=max_length, **options)
    return ParallelSummarizerTransform(
        provider, max_workers=max_workers, batch_size=batch_size, max_length=max_length, **options
    )


def chatgpt_parallel_processing_pipeline(
    backend: str = "vllm",
    max_workers: int | None = None,
    batch_size: int | str | None = None,
    model_name: str | None = None,
    *,
    store: SQLiteStore,
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
    cancel: threading.Event | None = None,
    ray: RayCluster | None = None,
    redo: Iterable[str] | None = None,
    **options,
) -> Pipeline:
    """Ingest -> Checkpoint -> Summarize -> Write, ready to `run(paths)`; with `ray`, Summarize runs on that cluster."""
    if ray is not None:
        if sequential:
            raise ConfigError("--sequential runs on this machine only; leave it out with --ray.")
        provider = provider or ray.describe_provider(backend, model_name, provider_kwargs or {})
        summarizer = ray.summarizer(
            provider,
            store.path,
            backend=backend,
            model=model_name,
            engine_options=provider_kwargs or {},
            max_workers=max_workers,
            batch_size=batch_size,
            max_length=max_length,
            **options,
        )
    else:
        provider = provider or get_provider(backend, model=model_name, **(provider_kwargs or {}))
        summarizer = build_summarizer(provider, sequential, max_workers, batch_size, max_length, **options)
    chunker = ConversationChunkerComponent(
        chunk_method=chunk_method, chunk_size=chunk_size, tokenizer=_tokenizer_for(provider)
    )
    checkpoint = Checkpoint(store, summarizer.key, fresh, redo=check_redo(redo))
    # Who made each summary: Ray records carry their node id; a local run stamps this host's name.
    writer = ChatFragmentWriter(
        store, summarizer.key, backend=provider.name, run_id=run_id, worker=socket.gethostname()
    )
    return Pipeline(
        "chatgpt_parallel_processing",
        [
            Ingest(store, chunker, limit=limit, report=report),
            checkpoint,
            Summarize(summarizer, store, checkpoint, progress),
            Write(writer, cancel, checkpoint.tally),
        ],
    )


def check_redo(redo: Iterable[str] | None) -> frozenset[str] | None:
    """`--redo` names as a set, or a ConfigError naming the allowed ones."""
    if redo is None:
        return None
    names = frozenset(n.strip() for n in redo if n.strip())
    unknown = sorted(names - set(FLAGS) - {"flagged"})
    if unknown or not names:
        raise ConfigError(
            f"--redo takes quality flags separated by commas, or 'flagged' for any; unknown: "
            f"{', '.join(unknown) or '(none given)'}. Flags: {', '.join(FLAGS)}."
        )
    return names


def run_export(
    config: RunConfig,
    *,
    provider: LLMProvider | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> dict:
    """Run the whole job; write apiana.sqlite, summaries.jsonl and run.json under config.output.

    Bad input, a bad output path or a bad engine option raises before anything is written or
    loaded. Setting `cancel` stops the run at the next finished summary, keeping all finished ones.
    """
    started = time.perf_counter()
    out = Path(config.output)
    report = ReadReport()
    # The reader goes through every input once before its first conversation comes out, so
    # a missing file, broken JSON or a changed file raises here, before anything is written.
    conversations = _primed(read_export(config.inputs, report=report))
    check_output(out)
    owned = provider is None  # an engine this call starts, this call also stops
    check_redo(config.redo)
    if owned:
        check_options(config.backend, config.engine_options)
    ray = _connect(config, owned)  # a cluster that does not answer stops the run here, before anything is written
    progress = _Finisher(progress)
    store = None
    try:
        t0 = time.perf_counter()
        if owned:
            # On Ray the replicas load the model; the driver only names it (for the summary key and the tokenizer).
            provider = (
                ray.describe_provider(config.backend, config.model, config.engine_options)
                if ray
                else get_provider(config.backend, model=config.model, **config.engine_options)
            )
        load_seconds = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        store = SQLiteStore(out / "apiana.sqlite")
        existing = store.count("summaries")
        run_id = store.start_run(asdict(config))
        options = {"temperature": config.temperature}
        if config.seed is not None:
            options["seed"] = config.seed
        if config.repetition_penalty != 1.0:
            options["repetition_penalty"] = config.repetition_penalty
        pipeline = chatgpt_parallel_processing_pipeline(
            config.backend,
            config.max_workers,
            config.batch_size,
            config.model,
            store=store,
            provider=provider,
            chunk_size=config.chunk_size,
            chunk_method=config.chunk_method,
            max_length=config.max_length,
            sequential=config.sequential,
            fresh=config.fresh,
            limit=config.limit,
            progress=progress,
            report=report,
            run_id=run_id,
            cancel=cancel,
            ray=ray,
            provider_kwargs=config.engine_options,
            redo=config.redo,
            **options,
        )
        ingest, checkpoint, summarize, write = pipeline.components
        pipeline.run(conversations)
        if checkpoint.other_keys:
            logger.warning(
                "Earlier summaries in %s were made with another model, prompt or generation options; none are reused.",
                out,
            )
        summarizer = summarize.summarizer
        store.profile_missing()  # summaries of an older store, or handed back by Ray without their text
        quality = _write_jsonl(out / "summaries.jsonl", store, checkpoint.ids)
        result = {
            **asdict(config),
            "inputs": config.inputs,
            "backend": provider.name,
            "model": provider.model,  # what was loaded; config's model may be None (the default)
            "batch_size": getattr(summarizer, "batch_size", 1),  # what ran (auto: what it started at)
            "max_workers": getattr(summarizer, "max_workers", 1),
            "format": report.format,
            "conversations_read": report.conversations,
            "conversations_skipped": len(report.skipped),
            "skipped_by_reason": report.skipped_by_reason,
            "duplicates": getattr(report, "duplicates", 0),
            "chunks_total": checkpoint.total,
            "chunks_repeated_in_run": ingest.repeated,
            "summaries_in_store_at_start": existing,
            "summaries_reused": checkpoint.reused,
            **({"redo": {"flags": sorted(checkpoint.redo), "picked": checkpoint.redone}} if config.redo else {}),
            **summarizer.stats.figures(),
            "failed_chunks": write.failed,
            "cancelled": write.cancelled,
            "wall_seconds": round(time.perf_counter() - started, 3),
            "load_seconds": round(load_seconds, 3),
            "provider_adjustments": getattr(provider, "adjustments", []),
            "parallel": not config.sequential,
            **({"ray": summarizer.facts} if ray else {}),  # nodes, replicas, and which node did what
            "quality": quality,
        }
        store.finish_run(run_id, result)
        (out / "run.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        return result
    except BaseException as e:
        progress.finish(e)
        raise
    finally:
        progress.finish(None)
        if store is not None:
            store.close()
        if owned and provider is not None:
            provider.close()
        if ray is not None:
            ray.close()


def _connect(config: RunConfig, owned: bool):
    """The Ray cluster for an executor="ray" run (None for a local one)."""
    if config.executor == "local":
        return None
    if config.executor != "ray":
        raise ConfigError(f"executor must be 'local' or 'ray', not {config.executor!r}")
    if not owned:
        raise ConfigError(
            "run_export(provider=...) runs on this machine; on Ray each replica builds its own provider "
            "from config.backend, config.model and config.engine_options."
        )
    if config.sequential:
        raise ConfigError("--sequential runs on this machine only; leave it out with --ray.")
    from .ray_executor import connect

    return connect(
        config.ray_address, replicas=config.replicas, replica_gpus=config.replica_gpus, replica_cpus=config.replica_cpus
    )


class _Finisher:
    """Passes snapshots on, and makes sure the last one says finished even when the run broke before summarizing."""

    def __init__(self, progress: ProgressCallback | None):
        self.progress = progress
        self.finished = progress is None

    def __call__(self, p: Progress) -> None:
        self.finished = self.finished or p.finished
        self.progress(p)

    def __bool__(self) -> bool:
        return self.progress is not None

    def finish(self, error: BaseException | None) -> None:
        if not self.finished:
            self.finished = True
            why = "" if error is None else f"{type(error).__name__}: {error}"
            self.progress(Progress(event="end", finished=True, error=why))


def _primed(conversations: Iterator) -> Iterator:
    """The same conversations, the first one already read (so read errors surface now, not later)."""
    first = next(conversations, None)

    def rest():
        try:
            if first is not None:
                yield first
            yield from conversations
        finally:
            conversations.close()

    return rest()


def check_output(out: Path) -> None:
    """Fail before any work when the output folder is a file, or cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"{out} is a file; -o needs a folder (for apiana.sqlite, summaries.jsonl and run.json). "
            f"Pick another name, or remove the file."
        )
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"Cannot create the output folder {out}: {parent} is a file.")
    target = out if out.exists() else parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"Cannot write to {target} (permission denied or read-only); pick another -o folder.")


def _tokenizer_for(provider: LLMProvider):
    """The summarizing model's own tokenizer when it is a local folder, else the bundled one."""
    folder = Path(provider.model) if provider.model else None
    if folder is not None and (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    logger.info(
        "counting chunk tokens with the bundled SmolLM2 tokenizer (%s has no local tokenizer.json)", provider.model
    )
    return load_tokenizer()


def _write_jsonl(path: Path, store: SQLiteStore, ids: Sequence[str]) -> dict:
    """One object per chunk of this run that has a summary, in export order (rewritten whole each run).

    A chunk with several versions (see `--redo`) gets the one `SQLiteStore.kept_versions` keeps,
    saying which and why. Returns the quality figures of what was written, for run.json.
    """
    tmp = path.with_suffix(".jsonl.tmp")

    def written(f) -> Iterator[dict]:
        # The profiles stream into their figures as the rows go out: none is held.
        for row in store.kept_versions(ids):
            row.pop("created_at")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if row["quality"] is not None:
                yield row["quality"]

    with tmp.open("w", encoding="utf-8") as f:
        figures = summarize_profiles(written(f))
    os.replace(tmp, path)
    return figures
