"""Scaling out on Ray: one worker node against two in one run, and what Ray costs per chunk against a local run.

    python -m apiana_lab.bench.ray_scaling                 # a head and two worker nodes started on this machine
    python -m apiana_lab.bench.ray_scaling --quick         # a smaller export, for a check
    python -m apiana_lab.bench.ray_scaling --address H:P   # an existing cluster (give --replica-cpus = a worker's CPUs)
    python -m apiana_lab.bench.ray_scaling --ray-data-llm  # our vLLM replica against ray.data.llm's, same chunks

The provider is the fake one with a latency injected per call (`time.sleep` releases the GIL), so
a replica is bound by that latency, not by this machine's cores: what is measured is how well the
orchestration (Ray Data, the chunk server, the driver's writer) keeps replicas busy. Each replica
asks for a whole worker node's CPUs, so one replica means one worker node and two mean two.

Three runs of the same export through `run_export`: local, Ray with one replica, Ray with two.
Throughput is chunks over the summarize step's time after the first replica started
(`ray.startup_seconds` in run.json: starting actors is loading the model, which a local run's
`summarize_seconds` does not count either); startup is reported on its own.
Writes results/bench-ray/ray_scaling.json and .md (ray_scaling-quick.* with --quick).

`--ray-data-llm` runs the bundled model on vLLM (CPU here) over the same chunks twice on a local
Ray instance: through our executor (one replica) and through `ray.data.llm`'s vLLM processor with
the same engine settings, and writes results/bench-ray/ray_data_llm.json and .md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from apiana_lab.experiments.record import machine, markdown_table, write_result
from apiana_lab.ray_executor import start_cluster

TARGET_RATIO = 1.8  # two worker nodes against one


def run_once(
    export: Path,
    out: Path,
    *,
    executor: str,
    latency: float,
    batch_size: int,
    max_workers: int,
    chunk_size: int,
    replicas: int | None = None,
    replica_cpus: float = 1.0,
) -> dict:
    """One run of the fake provider through run_export into a fresh `out`; the figures a comparison needs."""
    from apiana_lab.pipeline import RunConfig, run_export

    shutil.rmtree(out, ignore_errors=True)
    config = RunConfig(
        str(export),
        str(out),
        backend="fake",
        chunk_size=chunk_size,
        batch_size=batch_size,
        max_workers=max_workers,
        engine_options={"latency": latency},
        executor=executor,
        replicas=replicas,
        replica_cpus=replica_cpus,
    )
    start = time.perf_counter()
    run = run_export(config)
    wall = time.perf_counter() - start
    cluster = run.get("ray", {})
    startup = cluster.get("startup_seconds") or 0.0
    busy = run["summarize_seconds"] - startup
    return {
        "config": "local" if executor == "local" else f"ray, {replicas} replica{'s' * (replicas != 1)}",
        "chunks": run["summaries_computed"],
        "failed": run["failed"],
        "wall_s": round(wall, 3),
        "summarize_s": run["summarize_seconds"],
        "startup_s": startup,
        "steady_s": round(busy, 3),
        "chunks_per_s": round(run["summaries_computed"] / busy, 2) if busy > 0 else None,
        "batches": cluster.get("batches"),
        "rows_per_batch": cluster.get("rows_per_batch"),
        "nodes_used": len({r["node"] for r in cluster.get("replica_runs", [])}),
        "chunks_by_node": {r["node"][:12]: r["chunks"] for r in cluster.get("replica_runs", [])},
    }


def scaling(
    export: Path,
    workdir: Path,
    *,
    latency: float = 0.05,
    batch_size: int = 4,
    max_workers: int = 2,
    chunk_size: int = 128,
    replica_cpus: float = 1.0,
) -> dict:
    """Local, one replica and two replicas on the connected (or RAY_ADDRESS) cluster; ratio and overhead per chunk.

    Ray Data is told to start every replica before it hands out the first batch, so that a
    replica that happens to start late (a busy machine) does not count as poor scaling; startup
    is reported on its own.
    """
    import ray

    common = dict(latency=latency, batch_size=batch_size, max_workers=max_workers, chunk_size=chunk_size)
    local = run_once(export, workdir / "local", executor="local", **common)
    context = ray.data.DataContext.get_current()
    saved, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 600
    try:
        one = run_once(export, workdir / "ray-1", executor="ray", replicas=1, replica_cpus=replica_cpus, **common)
        two = run_once(export, workdir / "ray-2", executor="ray", replicas=2, replica_cpus=replica_cpus, **common)
    finally:
        context.wait_for_min_actors_s = saved
    chunks = local["chunks"]
    return {
        "settings": {**common, "replica_cpus": replica_cpus},
        "rows": [local, one, two],
        "ratio_two_to_one": round(two["chunks_per_s"] / one["chunks_per_s"], 3),
        # What one replica on Ray costs per chunk over the same provider run locally, once started...
        "overhead_ms_per_chunk": round((one["steady_s"] - local["summarize_s"]) / chunks * 1000, 3),
        # ...and counting the replicas' start (actor processes, imports, the provider).
        "overhead_ms_per_chunk_with_startup": round((one["summarize_s"] - local["summarize_s"]) / chunks * 1000, 3),
    }


def compare_ray_data_llm(workdir: Path, *, chunks: int = 24, max_tokens: int = 32, chunk_size: int = 512) -> dict:
    """The same chunks through our executor and through ray.data.llm's vLLM processor.

    One engine each, same settings.
    """
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from apiana_lab.export.synth import write_synthetic_export
    from apiana_lab.models import default_model_dir
    from apiana_lab.pipeline import RunConfig, run_export
    from apiana_lab.store import SQLiteStore

    model = str(default_model_dir())
    # Prefix caching off: both engines see each prompt once, and the measure is orchestration, not cache hits.
    engine = {"max_model_len": 4096, "enforce_eager": True, "enable_prefix_caching": False}
    export = workdir / "llm-export.json"
    write_synthetic_export(export, size_mb=0.5, seed=1, demo=True)
    out = workdir / "ours"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run = run_export(
        RunConfig(
            str(export),
            str(out),
            backend="vllm",
            chunk_size=chunk_size,
            limit=chunks,
            max_length=max_tokens,
            batch_size=chunks,
            engine_options=engine,
            executor="ray",
            replicas=1,
            replica_cpus=1,
        )
    )
    ours_wall = time.perf_counter() - start
    ours = {
        "path": "ours: RaySummarizer, one replica",
        "rows": run["summaries_computed"],
        "wall_s": round(ours_wall, 2),
        "summarize_s": run["summarize_seconds"],
        "engine_s": round(run["summarize_seconds"] - run["ray"]["startup_seconds"], 2),
        "completion_tokens": run["completion_tokens"],
    }

    # The very same prompts (the stored chunks, rendered by our transform) as ray.data.llm rows.
    store = SQLiteStore(out / "apiana.sqlite")
    try:
        ids = [row[0] for row in store.db.execute("SELECT chunk_id FROM summaries")]
        texts = store.load_chunks(ids)
    finally:
        store.close()
    from apiana_lab.summarize import SummarizerTransform

    prompts = SummarizerTransform(_Named(model), max_length=max_tokens)
    rows = [{"id": c.id, "messages": prompts.prompt(c)} for c in texts]
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=dict(engine),
        batch_size=len(rows),
        concurrency=1,
        # CPU only: without a placement group config the stage asks Ray for one GPU per replica.
        placement_group_config={"bundles": [{"CPU": 1}]},
        # Its default (True) makes vLLM import ray.serve, which only the ray[llm] extra installs:
        # with ray[data] alone the engine fails to start ("RayPrometheusMetric requires Ray").
        log_engine_metrics=False,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: dict(
            messages=row["messages"], sampling_params=dict(temperature=0.0, max_tokens=max_tokens)
        ),
        postprocess=lambda row: dict(
            text=row["generated_text"], tokens=row["num_generated_tokens"], llm_s=row["time_taken_llm"]
        ),
    )
    start = time.perf_counter()
    error = None
    try:
        results = processor(ray.data.from_items(rows)).take_all()
    except Exception as e:  # recorded: whether it runs here at all is one of the findings
        results, error = [], f"{type(e).__name__}: {str(e)[:500]}"
    wall = time.perf_counter() - start
    theirs = {
        "path": "ray.data.llm vLLMEngineProcessor",
        "rows": len(results),
        "wall_s": round(wall, 2),
        "summarize_s": round(wall, 2),
        "engine_s": round(max((r["llm_s"] for r in results), default=0.0), 2),
        "completion_tokens": sum(r["tokens"] for r in results),
        "error": error,
    }
    for row in (ours, theirs):
        # Everything that is not the engine generating: actor starts, stages, moving rows, storing.
        row["outside_engine_s"] = round(row["wall_s"] - row["engine_s"], 2)
    return {
        "model": model,
        "chunks": chunks,
        "max_tokens": max_tokens,
        "engine": engine,
        "rows": [ours, theirs],
        "extra_outside_engine_s": None if error else round(theirs["outside_engine_s"] - ours["outside_engine_s"], 2),
    }


class _Named:
    """Just enough of a provider for SummarizerTransform to render prompts."""

    name = "vllm"

    def __init__(self, model: str):
        self.model = model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small export and shorter runs, for a check")
    parser.add_argument("--size-mb", type=float, default=None, help="synthetic export size (default 1.5, quick 0.3)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the fake provider sleeps per call")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=128, help="tokens per chunk (small: many chunks)")
    parser.add_argument(
        "--address", default=None, help="an existing cluster with two worker nodes (default: start one here)"
    )
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica: a whole worker node's")
    parser.add_argument("--ray-data-llm", action="store_true", help="compare with ray.data.llm on vLLM instead")
    parser.add_argument("--chunks", type=int, default=24, help="with --ray-data-llm: chunks to summarize")
    args = parser.parse_args(argv)
    import ray

    if args.ray_data_llm:
        return main_ray_data_llm(args.chunks)

    from apiana_lab.export.synth import write_synthetic_export

    workdir = Path(tempfile.mkdtemp(prefix="apiana-bench-ray-"))
    cluster = None
    try:
        export = workdir / "conversations.json"
        write_synthetic_export(export, size_mb=args.size_mb or (0.3 if args.quick else 1.5), seed=0)
        if args.address is None:
            cluster = start_cluster(worker_cpus=args.replica_cpus)
        ray.init(address=args.address or cluster.address)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(f"{len(nodes)} nodes; running local, 1 and 2 replicas ...", file=sys.stderr, flush=True)
        figures = scaling(
            export,
            workdir,
            latency=args.latency,
            batch_size=args.batch_size,
            max_workers=args.max_workers,
            chunk_size=args.chunk_size,
            replica_cpus=args.replica_cpus,
        )
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    results = {
        "benchmark": "ray_scaling",
        "machine": machine(),
        "cluster": "started here" if cluster else args.address,
        "nodes": len(nodes),
        "ray_version": ray.__version__,
        **figures,
        "targets": {f"two worker nodes / one >= {TARGET_RATIO}": figures["ratio_two_to_one"] >= TARGET_RATIO},
    }
    s = figures["settings"]
    columns = [
        ("config", "configuration"),
        ("chunks", "chunks"),
        ("summarize_s", "summarize s"),
        ("startup_s", "startup s"),
        ("steady_s", "after startup s"),
        ("chunks_per_s", "chunks/s"),
        ("batches", "Ray batches"),
        ("nodes_used", "nodes used"),
    ]
    target_met = results["targets"][next(iter(results["targets"]))]
    markdown = (
        f"# Ray scaling: one worker node against two\n\n"
        f"{results['machine']['cores']} cores ({results['machine']['cpu']}), "
        f"load {results['machine']['loadavg_at_start']}; "
        f"Ray {ray.__version__}, {len(nodes)} nodes ({results['cluster']}). "
        f"Fake provider, {s['latency'] * 1000:g} ms per call, "
        f"batch {s['batch_size']}, {s['max_workers']} workers per replica, {s['replica_cpus']:g} CPUs per replica "
        f"(a whole worker node).\n\n{markdown_table(figures['rows'], columns)}\n\n"
        f"Two worker nodes / one (chunks/s after startup): **{figures['ratio_two_to_one']:.2f}×** "
        f"(target ≥ {TARGET_RATIO}: {'met' if target_met else 'NOT met'})\n\n"
        f"Ray's overhead against the same provider locally: **{figures['overhead_ms_per_chunk']:.2f} ms per chunk** "
        f"after startup, {figures['overhead_ms_per_chunk_with_startup']:.2f} ms per chunk "
        f"counting the replicas' startup.\n"
    )
    json_path, md_path = write_result(
        "bench-ray", "ray_scaling-quick" if args.quick else "ray_scaling", results, markdown
    )
    print(markdown)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return results


def main_ray_data_llm(chunks: int = 24) -> dict:
    import ray

    workdir = Path(tempfile.mkdtemp(prefix="apiana-bench-ray-llm-"))
    try:
        ray.init(num_cpus=2, include_dashboard=False)
        figures = compare_ray_data_llm(workdir, chunks=chunks)
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    results = {"benchmark": "ray_data_llm", "machine": machine(), "ray_version": ray.__version__, **figures}
    json_path, md_path = write_result("bench-ray", "ray_data_llm", results, ray_data_llm_markdown(results))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return results


def ray_data_llm_markdown(results: dict) -> str:
    """The comparison as a markdown page."""
    columns = [
        ("path", "path"),
        ("rows", "rows"),
        ("wall_s", "wall s"),
        ("engine_s", "engine s"),
        ("outside_engine_s", "outside the engine s"),
        ("completion_tokens", "completion tokens"),
        ("error", "error"),
    ]
    return (
        f"# Our Ray executor against ray.data.llm, vLLM on CPU\n\n"
        f"{results['machine']['cores']} cores, load {results['machine']['loadavg_at_start']}; "
        f"Ray {results['ray_version']}; "
        f"{results['chunks']} chunks, {results['max_tokens']} new tokens, greedy; engine {results['engine']}; "
        f"one replica of 1 CPU each on a local Ray instance. "
        f"Engine s: ours, from the replica's first batch to the end; ray.data.llm, "
        f"the longest request (all were submitted at once).\n\n"
        f"{markdown_table(results['rows'], columns)}\n\n"
        f"ray.data.llm spends {results['extra_outside_engine_s']} s more outside the engine. "
        f"It starts four actor pools "
        f"(chat template, tokenize, engine, detokenize) where we start one, and they compete for the same CPUs "
        f"(here the engine's actor waited while the detokenize pool held a CPU). "
        f"One run on a shared machine: read the difference "
        f"as mostly start-up, not as a per-row cost. With its default `log_engine_metrics=True` "
        f"the engine does not start under `ray[data]` alone (vLLM's metrics need `ray.serve`: \"RayPrometheusMetric "
        f'requires Ray to be installed"); the run above sets it to False.\n'
    )


if __name__ == "__main__":
    main()
