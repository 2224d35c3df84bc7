"""The summarize step on a Ray cluster: the chunks still to do as a Ray Dataset, one provider per actor.

Reading, chunking, the checkpoint and the writer stay on the driver, as in a local run. Only the
summarizing moves:

    chunk ids + token counts (a Ray Dataset, no texts) -> map_batches on an actor pool, one provider
    and one ParallelSummarizerTransform per actor -> records stream back -> the driver's writer

The texts reach the actors from the driver's `apiana.sqlite` through a small actor pinned to the
driver's node (`_ChunkServer`), one Ray batch at a time, so the driver's memory stays flat and the
cluster's machines need no shared file system. Each replica runs the local scheduler
(ParallelSummarizerTransform) on its Ray batch and hands back one typed row (`ReplicaBatch`): the
records and the transform's own RunStats. Ray is imported here only, and only when used.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from urllib.parse import urlparse

from .chunking import Chunk, ChunkRef
from .collate import Collator
from .errors import ApianaError, ConfigError, MissingDependencyError
from .progress import ProgressCallback
from .providers.base import LLMProvider
from .providers.registry import get_provider, provider_class
from .store import SummaryKey, SummaryRecord
from .summarize import Item, Loader, Reporter, RunStats, SummarizerTransform, why_stopped

logger = logging.getLogger(__name__)

# Rows per Ray batch: at least one engine batch, at most this many so that progress, commits and
# the work a dead node takes with it stay small...
MAX_ROWS_PER_BATCH = 256
# ...and at least this many batches per replica when there is enough work, so replicas share the tail.
BATCHES_PER_REPLICA = 4
CONNECT_TIMEOUT = 5.0  # seconds a cluster address has to accept a TCP connection
GCS_PORT = 6379  # Ray's default when an address has no port


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(e.name or "ray", "ray") from e
    return ray


class RayCluster:
    """A connection to a Ray cluster for one run, and the replica settings it runs with.

    Args:
        address: where it connected ("local" when it started a cluster of its own).
        replicas: model replicas (None: one per GPU, or one per node when the cluster has none).
        replica_gpus: GPUs per replica (None: 1 when the cluster has GPUs, else 0).
        replica_cpus: CPUs per replica.
        owned: whether this connection called ray.init (and so calls ray.shutdown on close).
    """

    def __init__(
        self,
        address: str,
        replicas: int | None = None,
        replica_gpus: float | None = None,
        replica_cpus: float = 1.0,
        owned: bool = True,
    ):
        self.address = address
        self.replicas = replicas
        self.replica_gpus = replica_gpus
        self.replica_cpus = replica_cpus
        self.owned = owned

    def nodes(self) -> list[dict]:
        """The cluster's live nodes: id and resources (ids, never IPs: several nodes can share a host)."""
        return [
            {"id": n["NodeID"], "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}}
            for n in _ray().nodes()
            if n.get("Alive")
        ]

    def placement(self) -> tuple[int, float, float]:
        """(replicas, GPUs per replica, CPUs per replica) after the defaults are applied to this cluster."""
        nodes = self.nodes()
        gpus = sum(n["resources"].get("GPU", 0) for n in nodes)
        per_gpu, per_cpu = (
            (self.replica_gpus if self.replica_gpus is not None else (1.0 if gpus else 0.0)),
            self.replica_cpus,
        )
        # How many replicas each node can hold: a replica never spans nodes.
        fits = [
            min(
                n["resources"].get("CPU", 0) // per_cpu if per_cpu else math.inf,
                n["resources"].get("GPU", 0) // per_gpu if per_gpu else math.inf,
            )
            for n in nodes
        ]
        room = sum(f for f in fits if f != math.inf) if any(f != math.inf for f in fits) else math.inf
        if not any(fits):
            # Ray would wait forever for a node that can hold one.
            raise ConfigError(
                f"No node of the Ray cluster has {per_cpu:g} CPUs and {per_gpu:g} GPUs for a replica; "
                f"lower --replica-cpus / --replica-gpus, or add such a node."
            )
        replicas = self.replicas
        if replicas is None:
            replicas = max(1, int(gpus // per_gpu)) if per_gpu else sum(1 for f in fits if f >= 1)
        elif replicas > room:
            logger.warning(
                "the cluster holds only %d replicas of %g CPUs and %g GPUs; the other %d wait for room",
                room,
                per_cpu,
                per_gpu,
                replicas - room,
            )
        return replicas, per_gpu, per_cpu

    def describe_provider(self, backend: str, model: str | None, engine_options: dict) -> LLMProvider:
        """The provider as the driver sees it: its name and model (for the summary key and the tokenizer).

        A backend that loads weights gets a stand-in that loads nothing; the replicas load the model. Any
        other backend (fake, a server's client) is cheap enough to build on the driver.
        """
        if not provider_class(backend).loads_weights:
            return get_provider(backend, model=model, **engine_options)
        from .models import resolve_model

        return _Named(backend, resolve_model(model))

    def summarizer(
        self,
        provider: LLMProvider,
        store_path,
        *,
        backend: str,
        model: str | None,
        engine_options: dict,
        max_workers: int | None,
        batch_size: int | None,
        max_length: int,
        **options,
    ) -> RaySummarizer:
        """The summarize step's transform for this cluster."""
        return RaySummarizer(
            provider,
            self,
            store_path,
            backend=backend,
            model=model,
            engine_options=engine_options,
            max_workers=max_workers,
            batch_size=batch_size,
            max_length=max_length,
            **options,
        )

    def close(self) -> None:
        """Disconnect (and stop the cluster when this connection started it)."""
        if self.owned:
            _ray().shutdown()


def connect(
    address: str | None = None,
    *,
    replicas: int | None = None,
    replica_gpus: float | None = None,
    replica_cpus: float = 1.0,
) -> RayCluster:
    """Connect to the cluster at `address` (None or "": RAY_ADDRESS, else a new local cluster).

    Raises ConfigError, before anything is written, when the address does not answer or no node
    can hold a replica.
    """
    if replicas is not None and replicas < 1:
        raise ConfigError("--replicas must be at least 1")
    if (replica_gpus is not None and replica_gpus < 0) or replica_cpus < 0:
        raise ConfigError("--replica-gpus and --replica-cpus must be >= 0")
    ray = _ray()
    settings = dict(replicas=replicas, replica_gpus=replica_gpus, replica_cpus=replica_cpus)
    if ray.is_initialized():  # the caller connected already (a notebook, a test): use it, leave it up
        current = ray.get_runtime_context().gcs_address
        if address and address not in (current, "auto"):
            raise ConfigError(
                f"This process is already connected to the Ray cluster at {current}; "
                f"call ray.shutdown() first to run on {address}."
            )
        return _checked(RayCluster(current, **settings, owned=False))
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target.startswith("ray://"):
        raise ConfigError(
            f"{target} is a Ray Client address; replicas read chunk texts from this machine's store, so the driver "
            f"must run on a node of the cluster. Run `ray start --address=HEAD:6379` here, then pass HEAD:6379."
        )
    if target not in ("local", "auto"):
        _check_answers(target)
    runtime_env = None
    if target != "local":
        # Workers on other machines run the driver's own apiana_lab code (prompts and options then
        # mean the same everywhere); its libraries (torch, vllm...) must be installed on every node.
        runtime_env = {
            "py_modules": [os.path.dirname(os.path.abspath(__file__))],
            "excludes": ["data/", "__pycache__/"],
        }
    try:
        ray.init(
            address=target,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            **({"include_dashboard": False} if target == "local" else {}),
        )
    except (
        Exception
    ) as e:  # ray.init raises ConnectionError, RuntimeError, ValueError, or a bare Exception on a start-up timeout
        if target == "local":
            raise ConfigError(
                f"Could not start a local Ray cluster: {e} On a busy machine Ray's start-up can time out: "
                f"retry, or start one with `ray start --head` and pass its address."
            ) from e
        raise ConfigError(
            f"Could not connect to the Ray cluster at {target}: {e} Check the address "
            f"(`ray status` on the head node prints it), or leave ADDRESS out to start a local cluster."
        ) from e
    return _checked(RayCluster(ray.get_runtime_context().gcs_address if target != "local" else "local", **settings))


def _checked(cluster: RayCluster) -> RayCluster:
    """The cluster, once it is known to hold at least one replica (else disconnected, and ConfigError)."""
    try:
        cluster.placement()
    except BaseException:
        cluster.close()
        raise
    return cluster


def _check_answers(address: str) -> None:
    """Fail fast with a clear message when nothing listens at `address` (ray.init would retry for minutes)."""
    parsed = urlparse(f"//{address}")
    try:
        host, port = parsed.hostname, parsed.port or GCS_PORT
    except ValueError:  # a port that is not a number
        host = None
    if not host:
        raise ConfigError(f"{address!r} is not a Ray address; give HOST:PORT, e.g. 10.0.0.5:6379.")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        raise ConfigError(
            f"The Ray cluster at {host}:{port} does not answer ({e}). Start it (`ray start --head` on the head node), "
            f"check the address and firewall, or leave ADDRESS out to start a local cluster. Nothing was written."
        ) from e


@contextmanager
def _quiet_ray_data(ray):
    """Datasets made inside show no Ray Data bars or plans: ours report the run, and theirs would interleave.

    A dataset keeps a copy of the context it was made in, so the caller's own settings come back after.
    """
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    context.enable_progress_bars = context.print_on_execution_start = False
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


class _Named(LLMProvider):
    """The driver's stand-in for a provider that runs on the replicas: a name and a model, no weights."""

    def __init__(self, name: str, model: str):
        super().__init__(model)
        self.name = name

    def complete(self, prompt, options=None):
        raise ConfigError(f"On Ray the replicas run the {self.name} model; the driver does not generate.")


class RaySummarizer(SummarizerTransform):
    """Summarize on a Ray cluster with the local transform's prompts, options and key.

    Each replica is an actor with its own provider (`get_provider(backend, model=..., **engine_options)`)
    and its own ParallelSummarizerTransform, so batching, retries and out-of-memory handling are the
    local ones; `transform.key` is a local run's, so a run can start locally and resume on Ray or the
    other way round. `run` yields (ChunkRef, SummaryRecord) pairs as Ray batches finish; each record's
    `worker` is the Ray node id that made it.
    """

    def __init__(
        self,
        provider: LLMProvider,
        cluster: RayCluster,
        store_path,
        *,
        backend: str,
        model: str | None,
        engine_options: dict | None = None,
        max_workers: int | None = None,
        batch_size: int | str | None = None,
        max_length: int = 300,
        system_prompt: str | None = None,
        user_template: str | None = None,
        **options,
    ):
        super().__init__(provider, system_prompt, user_template, max_length, **options)
        self.cluster = cluster
        self.store_path = str(store_path)
        self.backend = backend
        self.model = model
        self.engine_options = dict(engine_options or {})
        self.max_workers = max_workers  # what each replica's transform uses; known once the first batch is back
        # Each replica's transform resolves "auto"; until one reports back, the engine's default stands in.
        self.batch_size = batch_size if isinstance(batch_size, int) else None
        self.transform_options = dict(
            max_workers=max_workers,
            batch_size=batch_size,
            max_length=max_length,
            system_prompt=self.system_prompt,
            user_template=self.user_template,
            **options,
        )
        self.facts: dict = {}  # for run.json: the cluster, the replicas, and which node did what
        self._model_warned = False

    def run(
        self, chunks: Iterable[Item], progress: ProgressCallback | None = None, *, load: Loader | None = None
    ) -> Iterator[tuple[ChunkRef, SummaryRecord]]:
        """Summarize on the cluster, yielding (ChunkRef, record) as each Ray batch comes back.

        `load` is not used: the replicas read texts from the store through the driver node's chunk server.
        """
        ray = _ray()
        refs = [ChunkRef(c.id, c.token_count) for c in chunks]
        self.stats = stats = RunStats()
        start, epoch = time.perf_counter(), time.time()
        replicas, gpus, cpus = self.cluster.placement()
        rows = rows_per_batch(len(refs), replicas, self.batch_size)
        report = Reporter(progress, len(refs), stats, start)
        self.facts = {
            "address": self.cluster.address,
            "ray_version": ray.__version__,
            "nodes": [n["id"] for n in self.cluster.nodes()],
            "replicas": replicas,
            "replica_gpus": gpus,
            "replica_cpus": cpus,
            "rows_per_batch": rows,
            "batches": 0,
            "startup_seconds": None,
            "duplicates_dropped": 0,
            "replica_runs": [],
        }
        runs: dict[tuple[str, str], dict] = {}  # (replica, node) -> what it did there
        report(self.batch_size or 0, "start")
        server = batches = None
        error = "stopped before the end"
        try:
            if refs:
                server = _start_chunk_server(ray, self.store_path)
                batches = iter(
                    self._dataset(ray, refs, server, rows, replicas, gpus, cpus).iter_batches(
                        batch_size=None, batch_format="pyarrow"
                    )
                )
                seen: set[str] = set()
                by_id = {r.id: r for r in refs}
                for table in batches:
                    for row in table.to_pylist():  # one row per Ray batch a replica summarized
                        done = self._absorb(
                            ReplicaBatch.from_row(row), time.perf_counter() - start, epoch, by_id, runs, seen
                        )
                        report.done += len(done)
                        report(self.batch_size or 0)
                        yield from done
            error = ""
        except BaseException as e:
            error = why_stopped(e)
            ours = _unwrapped(e)
            if ours is e:
                raise
            raise ours from e
        finally:
            stats.seconds = time.perf_counter() - start
            if batches is not None and hasattr(batches, "close"):
                batches.close()  # stops Ray Data's executor and its actors when the run ends early
            if server is not None:
                ray.kill(server)
            self.facts["replica_runs"] = list(runs.values())
            report(self.batch_size or 0, "end", finished=True, error=error)

    def _dataset(self, ray, refs: list[ChunkRef], server, rows: int, replicas: int, gpus: float, cpus: float):
        import pyarrow as pa

        # Longest first, as locally: an out-of-memory error shows up in the first batches, and
        # chunks of similar length share a batch so padding stays small. Records come back by
        # chunk id, so no order needs restoring.
        ids = [r.id for r in Collator.by(refs, lambda r: r.token_count).ordered(refs)]
        # One block per Ray batch: map_batches gives a whole block to one actor, so a single
        # block would send every chunk to one replica. from_blocks keeps the blocks as they are
        # and, unlike from_arrow, reads their metadata here rather than in a task per block.
        blocks = [pa.table({"id": ids[k : k + rows]}) for k in range(0, len(ids), rows)]
        # Ray Data's actor pool already restarts a dead actor without limit and retries its
        # tasks on the new one (max_restarts=-1, max_task_retries=-1), which is what a lost node
        # needs; a provider error inside a batch is the transform's to retry, not Ray's.
        with _quiet_ray_data(ray):
            return ray.data.from_blocks(blocks).map_batches(
                _Replica,
                batch_size=rows,
                batch_format="pyarrow",
                zero_copy_batch=True,
                compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=2),
                num_cpus=cpus,
                num_gpus=gpus or None,
                fn_constructor_kwargs=dict(
                    server=server,
                    backend=self.backend,
                    model=self.model,
                    engine_options=self.engine_options,
                    transform_options=self.transform_options,
                ),
            )

    def _absorb(
        self, batch: ReplicaBatch, arrived: float, epoch: float, refs: dict[str, ChunkRef], runs: dict, seen: set[str]
    ) -> list[tuple[ChunkRef, SummaryRecord]]:
        """Count one Ray batch's records and figures; returns the pairs to yield.

        A batch redone after a node loss may repeat records that came back before; those are dropped.
        """
        stats, facts, theirs = self.stats, self.facts, batch.stats
        self._check_key(batch)
        facts["batches"] += 1
        stats.mode = theirs.mode
        stats.batch_size_mode, stats.batch_size_final = theirs.batch_size_mode, theirs.batch_size_final
        self.batch_size, self.max_workers = batch.batch_size, batch.max_workers
        stats.retries += theirs.retries
        stats.latencies.extend(theirs.latencies)
        # Replicas report wall-clock times (nodes' clocks are kept in sync, as Ray's own
        # timeline assumes); the driver counts in seconds since this step began.
        stats.provider_intervals.extend((a - epoch, b - epoch) for a, b in theirs.provider_intervals)
        # Startup ends when a replica first calls its model: actor, model and chunk server all up.
        began = min((a for a, _ in theirs.provider_intervals), default=batch.began) - epoch
        if facts["startup_seconds"] is None or began < facts["startup_seconds"]:
            facts["startup_seconds"] = round(max(0.0, began), 3)
        stats.batch_size_changes.extend({**change, "node": batch.node} for change in theirs.batch_size_changes)
        if theirs.preemptions is not None:
            stats.preemptions = (stats.preemptions or 0) + theirs.preemptions
        run = _replica_run(runs, batch)
        run["batches"] += 1
        run["provider_seconds"] = round(run["provider_seconds"] + theirs.figures()["provider_seconds"], 4)
        out = []
        for record in batch.records:
            if record.chunk_id in seen:
                facts["duplicates_dropped"] += 1
                continue
            seen.add(record.chunk_id)
            stats.count(record)
            if record.error is None and stats.first_result_seconds is None:
                stats.first_result_seconds = arrived
            run["chunks"] += 1
            out.append((refs[record.chunk_id], record))
        return out

    def _check_key(self, batch: ReplicaBatch) -> None:
        theirs = batch.key
        if (theirs.prompt_hash, theirs.options_hash) != (self.key.prompt_hash, self.key.options_hash):
            raise ConfigError(
                f"A replica on node {batch.node} builds prompts or generation options differently from this driver "
                f"(another apiana_lab version?); install the same version on every node."
            )
        if theirs.model != self.key.model and not self._model_warned:
            self._model_warned = True
            logger.warning(
                "a replica loaded the model from %s; summaries are stored under this driver's name for it, %s",
                theirs.model,
                self.key.model,
            )


def _replica_run(runs: dict, batch: ReplicaBatch) -> dict:
    """What one replica did on one node (a replica restarted elsewhere gets a second entry)."""
    key = (batch.replica, batch.node)
    if key not in runs:
        runs[key] = {"replica": batch.replica, "node": batch.node, "chunks": 0, "batches": 0, "provider_seconds": 0.0}
    return runs[key]


def rows_per_batch(todo: int, replicas: int, batch_size: int | None) -> int:
    """Rows in each Ray batch (see MAX_ROWS_PER_BATCH and BATCHES_PER_REPLICA for why)."""
    engine = batch_size or 16
    return max(engine, min(MAX_ROWS_PER_BATCH, math.ceil(todo / (replicas * BATCHES_PER_REPLICA))))


def _start_chunk_server(ray, store_path: str):
    """An actor on the driver's node that reads chunk texts from the store for the replicas."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    server = (
        ray.remote(_ChunkServer)
        .options(
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        )
        .remote(store_path)
    )
    # Not waited for: it starts while the replicas load their models; their first call waits for it.
    return server


class _ChunkServer:
    """Serves `load_chunks(ids)` from the driver's apiana.sqlite (WAL lets it read while the driver writes)."""

    def __init__(self, path: str):
        from .store import SQLiteStore

        self.store = SQLiteStore(path)

    def load_chunks(self, ids: list[str]) -> list[Chunk]:
        return self.store.load_chunks(ids)


class _Replica:
    """One model replica: a Ray Data actor that summarizes the Ray batches it is given with the local scheduler."""

    def __init__(self, server, backend: str, model: str | None, engine_options: dict, transform_options: dict):
        import ray

        from .summarize import ParallelSummarizerTransform

        context = ray.get_runtime_context()
        self.node = context.get_node_id()
        self.replica = context.get_actor_id()
        self.server = server
        self.provider = get_provider(backend, model=model, **engine_options)
        self.transform = ParallelSummarizerTransform(self.provider, **transform_options)

    def __call__(self, batch):
        import ray

        began = time.time()
        # The whole Ray batch's texts in one call (at most MAX_ROWS_PER_BATCH chunks): fetching
        # them per engine batch cost a round trip to the driver's node for every few chunks.
        chunks = ray.get(self.server.load_chunks.remote(batch["id"].to_pylist()))
        records = []
        for _, record in self.transform.run(chunks):
            record.worker = self.node
            records.append(record)
        # perf_counter intervals to wall-clock ones, which the driver can place on its own timeline.
        shift = time.time() - time.perf_counter()
        stats = self.transform.stats
        stats = replace(stats, provider_intervals=[(a + shift, b + shift) for a, b in stats.provider_intervals])
        return ReplicaBatch(
            self.node,
            self.replica,
            self.transform.key,
            began,
            self.transform.batch_size,
            self.transform.max_workers,
            stats,
            records,
        ).to_arrow()

    def __del__(self):
        provider = getattr(self, "provider", None)
        if provider is not None:
            provider.close()


@dataclass
class ReplicaBatch:
    """What a replica hands back for one Ray batch: one row of the Ray dataset, its fields the columns."""

    node: str  # the Ray node id (each record's `worker`)
    replica: str  # the actor id
    key: SummaryKey  # the replica's own, checked against the driver's
    began: float  # wall clock, when the batch reached the replica
    batch_size: int  # what the replica's transform ran with, after the backend's defaults
    max_workers: int
    stats: RunStats  # the transform's figures for this batch; provider_intervals in wall-clock seconds
    records: list[SummaryRecord]

    def to_arrow(self):
        """A one-row pyarrow Table (the quality profile is the driver's to make, so it is not sent)."""
        import pyarrow as pa

        return pa.Table.from_pylist([asdict(self)], schema=_schema())

    @classmethod
    def from_row(cls, row: dict) -> ReplicaBatch:
        """Back from a row of that table."""
        stats = row["stats"]
        stats = RunStats(
            **{
                **stats,
                "provider_intervals": [tuple(i) for i in stats["provider_intervals"]],
                "failures_by_reason": dict(stats["failures_by_reason"]),
                # A change no measured throughput caused (out of memory) has none; Arrow's struct gave it a null.
                "batch_size_changes": [
                    {k: v for k, v in c.items() if not (k == "tokens_per_s" and v is None)}
                    for c in stats["batch_size_changes"]
                ],
            }
        )
        return cls(
            **{
                **row,
                "key": SummaryKey(**row["key"]),
                "stats": stats,
                "records": [SummaryRecord(**r) for r in row["records"]],
            }
        )


def _schema():
    """ReplicaBatch's columns, with SummaryKey, RunStats and SummaryRecord as typed structs."""
    import pyarrow as pa

    text, number, real = pa.string(), pa.int64(), pa.float64()
    key = pa.struct([("model", text), ("prompt_hash", text), ("options_hash", text)])
    change = pa.struct(
        [
            ("from", number),
            ("to", number),
            ("reason", text),
            ("at_done", number),
            ("seconds", real),
            ("tokens_per_s", real),
        ]
    )
    stats = pa.struct(
        [
            ("mode", text),
            ("computed", number),
            ("failed", number),
            ("retries", number),
            ("prompt_tokens", number),
            ("completion_tokens", number),
            ("seconds", real),
            ("first_result_seconds", real),
            ("preemptions", number),
            ("batch_size_changes", pa.list_(change)),
            ("batch_size_mode", text),
            ("batch_size_final", number),
            ("latencies", pa.list_(real)),
            ("provider_intervals", pa.list_(pa.list_(real, 2))),
            ("failures_by_reason", pa.map_(text, number)),
            ("estimated_tokens", number),
        ]
    )
    record = pa.struct(
        [
            ("chunk_id", text),
            ("summary", text),
            ("prompt_tokens", number),
            ("completion_tokens", number),
            ("finish_reason", text),
            ("error", text),
            ("reason", text),
            ("attempts", number),
            ("worker", text),
            ("tokens_estimated", pa.bool_()),
        ]
    )
    return pa.schema(
        [
            ("node", text),
            ("replica", text),
            ("key", key),
            ("began", real),
            ("batch_size", number),
            ("max_workers", number),
            ("stats", stats),
            ("records", pa.list_(record)),
        ]
    )


def _unwrapped(error: BaseException) -> BaseException:
    """Our own error when a replica raised one (Ray wraps it in RayTaskError and Ray Data's own types)."""
    seen = set()
    e = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ApianaError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return error


def start_cluster(worker_cpus: float = 1, workers: int = 2, attempts: int = 4):
    """A head and `workers` worker nodes, on this machine.

    The head has no CPUs: it holds the driver, its store and the chunk server.
    """
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    try:
        add_node(cluster, attempts, num_cpus=0, include_dashboard=False)
        for _ in range(workers):
            add_node(cluster, attempts, num_cpus=worker_cpus)
        cluster.wait_for_nodes(timeout=300)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def add_node(cluster, attempts: int = 4, **args):
    """Add one node, trying again when it misses Ray's fixed 30 s start-up wait (a loaded machine does).

    A node that timed out leaves its processes running, and they would join later as a stray
    node: those this call started (children of this process that were not there before) go first.
    """
    import psutil

    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            return cluster.add_node(**args)
        except Exception:
            for stray in me.children(recursive=True):
                if stray.pid not in before:
                    stray.kill()
            if attempt == attempts:
                raise
            time.sleep(5 * attempt)
