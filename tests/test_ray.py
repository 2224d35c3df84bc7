"""The Ray executor on a real multi-node cluster started on this machine (ray.cluster_utils).

A head with no CPUs (the driver's node: it holds the store and the chunk server) and two worker
nodes of 2 CPUs each, shared by the whole module. The transformers test runs the real library on
the bundled model; the fault, resume and scaling tests use the fake provider with injected latency,
since what they check is the orchestration.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from helpers import write_dialogue_export

from apiana_lab.ray_executor import add_node, start_cluster

ray = pytest.importorskip("ray")

# Tests that start a cluster are marked `ray` (registered in pyproject.toml), so they can be run or skipped alone.

TOTAL = 144  # chunks in the `dialogue_export` fixture at --chunk-size 64
WORKER_CPUS = 2
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CLI = [sys.executable, "-c", "import sys; from apiana_lab.cli import export_v2_main; sys.exit(export_v2_main())"]


def query(db, sql):
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def summaries_by_run(out):
    return dict(query(out / "apiana.sqlite", "SELECT run_id, COUNT(*) FROM summaries GROUP BY run_id"))


def fake_command(export, out, *extra, latency=0.0):
    return [
        *CLI,
        "-i",
        str(export),
        "-o",
        str(out),
        "--backend",
        "fake",
        "--chunk-size",
        "64",
        "--batch-size",
        "2",
        "--max-workers",
        "1",
        "--engine-arg",
        f"latency={latency}",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes; this process stays connected, so in-process runs reuse the connection."""
    c = start_cluster(worker_cpus=WORKER_CPUS)
    try:
        ray.init(address=c.address)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def test_rows_per_batch_and_placement_follow_the_cluster(monkeypatch):
    from apiana_lab.errors import ConfigError
    from apiana_lab.ray_executor import RayCluster, rows_per_batch

    assert rows_per_batch(10_000, 2, None) == 256  # capped: progress, commits and lost work stay small
    assert rows_per_batch(144, 2, 2) == 18  # 4 batches per replica share the tail
    assert rows_per_batch(8, 2, 16) == 16  # never less than one engine batch
    nodes = [
        {"id": "head", "resources": {"CPU": 0}},
        {"id": "a", "resources": {"CPU": 2}},
        {"id": "b", "resources": {"CPU": 2, "GPU": 2}},
    ]
    monkeypatch.setattr(RayCluster, "nodes", lambda self: nodes)
    assert RayCluster("x").placement() == (2, 1.0, 1.0)  # one replica per GPU when there are GPUs
    assert RayCluster("x", replica_gpus=0).placement() == (2, 0, 1.0)  # else one per node that can hold one
    assert RayCluster("x", replicas=3, replica_gpus=0, replica_cpus=2).placement() == (3, 0, 2)
    with pytest.raises(ConfigError, match="No node of the Ray cluster has 4 CPUs and 0 GPUs"):
        RayCluster("x", replica_gpus=0, replica_cpus=4).placement()


def test_the_driver_builds_a_provider_only_when_its_backend_declares_no_weights():
    from apiana_lab.providers.fake import FakeProvider
    from apiana_lab.providers.registry import provider_class
    from apiana_lab.ray_executor import RayCluster

    cluster = RayCluster("x")
    built = cluster.describe_provider("fake", None, {"latency": 0.5})
    assert isinstance(built, FakeProvider) and built.latency == 0.5
    named = cluster.describe_provider("transformers", None, {"device": "cpu"})  # the replicas load the weights
    assert provider_class("transformers").loads_weights and not isinstance(named, provider_class("transformers"))
    assert named.name == "transformers" and named.model


def test_a_replica_batch_crosses_arrow_as_typed_columns():
    """What a replica hands back is its transform's own RunStats and records, typed, with no field left behind."""
    from dataclasses import fields

    import pyarrow as pa

    from apiana_lab.ray_executor import ReplicaBatch
    from apiana_lab.store import SummaryKey, SummaryRecord
    from apiana_lab.summarize import RunStats

    stats = RunStats(
        mode="batch",
        computed=1,
        failed=1,
        retries=2,
        prompt_tokens=50,
        completion_tokens=9,
        seconds=1.5,
        first_result_seconds=0.25,
        preemptions=3,
        latencies=[0.5, 0.75],
        provider_intervals=[(10.0, 10.5)],
        batch_size_changes=[
            {"from": 8, "to": 4, "reason": "out of memory at batch size 8", "at_done": 0, "seconds": 0.1}
        ],
        failures_by_reason={"oom": 1},
    )
    records = [
        SummaryRecord("c1", "a summary", 50, 9, "stop", worker="node-1"),
        SummaryRecord("c2", error="out of memory even at batch size 1", reason="oom", attempts=2, worker="node-1"),
    ]
    batch = ReplicaBatch("node-1", "actor-1", SummaryKey("m", "p", "o"), 9.5, 8, 2, stats, records)
    table = batch.to_arrow()
    assert table.num_rows == 1 and table.schema.field("stats").type.num_fields == len(fields(RunStats))
    assert {f.name for f in table.schema.field("stats").type} == {f.name for f in fields(RunStats)}
    record_type = table.schema.field("records").type.value_type
    assert {f.name for f in record_type} == {f.name for f in fields(SummaryRecord)} - {"quality"}
    assert record_type.field("attempts").type == pa.int64() and table.schema.field("began").type == pa.float64()
    assert ReplicaBatch.from_row(table.to_pylist()[0]) == batch


def test_store_from_before_ray_gains_a_worker_column(tmp_path):
    from apiana_lab.store import SQLiteStore, SummaryKey, SummaryRecord

    db = tmp_path / "apiana.sqlite"
    with sqlite3.connect(db) as old:  # the summaries table as it was before this column
        old.execute(
            "CREATE TABLE summaries (chunk_id TEXT NOT NULL, model TEXT NOT NULL, prompt_hash TEXT NOT NULL, "
            "options_hash TEXT NOT NULL, summary TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER, "
            "finish_reason TEXT, backend TEXT, run_id INTEGER, created_at REAL, "
            "PRIMARY KEY (chunk_id, model, prompt_hash, options_hash))"
        )
        old.execute("INSERT INTO summaries VALUES ('c0', 'm', 'p', 'o', 'old', 1, 1, 'stop', 'fake', 1, 0)")
    with SQLiteStore(db) as store:
        store.put_summaries(
            SummaryKey("m", "p", "o"),
            [SummaryRecord("c1", "new", worker="node-1"), SummaryRecord("c2", "x")],
            "fake",
            2,
        )
    assert query(db, "SELECT chunk_id, summary, worker FROM summaries ORDER BY chunk_id") == [
        ("c0", "old", None),
        ("c1", "new", "node-1"),
        ("c2", "x", None),
    ]


def worker_ids(cluster):
    return {n.node_id for n in cluster.worker_nodes}


def test_address_that_does_not_answer_exits_2_and_writes_nothing(dialogue_export, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    done = subprocess.run(
        fake_command(dialogue_export, out, "--ray", f"127.0.0.1:{port}"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"The Ray cluster at 127.0.0.1:{port} does not answer" in done.stderr
    assert not out.exists()


@pytest.mark.ray
def test_transformers_on_two_worker_nodes_equals_a_local_run(cluster, tmp_path):
    from apiana_lab.pipeline import RunConfig, run_export

    export = write_dialogue_export(tmp_path / "conversations.json", conversations=2, messages=4)
    common = dict(
        backend="transformers",
        chunk_size=64,
        max_length=12,
        batch_size=2,
        engine_options={"dtype": "float32", "device": "cpu"},
    )
    local = run_export(RunConfig(str(export), str(tmp_path / "local"), **common))
    # One replica per worker node: each asks for all of a node's CPUs.
    snapshots = []
    on_ray = run_export(
        RunConfig(
            str(export),
            str(tmp_path / "ray"),
            executor="ray",
            ray_address=cluster.address,
            replicas=2,
            replica_cpus=WORKER_CPUS,
            **common,
        ),
        progress=snapshots.append,
    )
    assert (local["summaries_computed"], on_ray["summaries_computed"], on_ray["failed"]) == (8, 8, 0)

    # Same key, so the same rows would be reused by either executor; greedy float32 gives the same text.
    sql = "SELECT chunk_id, model, prompt_hash, options_hash, summary, prompt_tokens, completion_tokens FROM summaries"
    assert sorted(query(tmp_path / "ray" / "apiana.sqlite", sql)) == sorted(
        query(tmp_path / "local" / "apiana.sqlite", sql)
    )
    assert (tmp_path / "ray" / "summaries.jsonl").read_text() == (tmp_path / "local" / "summaries.jsonl").read_text()

    facts = on_ray["ray"]
    workers = worker_ids(cluster)
    assert set(facts["nodes"]) == workers | {cluster.head_node.node_id}
    assert facts["replicas"] == 2 and {r["node"] for r in facts["replica_runs"]} == workers
    assert sum(r["chunks"] for r in facts["replica_runs"]) == 8
    recorded = dict(query(tmp_path / "ray" / "apiana.sqlite", "SELECT worker, COUNT(*) FROM summaries GROUP BY worker"))
    assert set(recorded) == workers  # each summary names the node that made it, and both nodes made some
    assert recorded == {r["node"]: r["chunks"] for r in facts["replica_runs"]}
    assert query(tmp_path / "local" / "apiana.sqlite", "SELECT DISTINCT worker FROM summaries") == [
        (socket.gethostname(),)
    ]
    # The same progress protocol as locally: a start with the total, then a last snapshot that says finished.
    assert (snapshots[0].event, snapshots[0].total, snapshots[0].done) == ("start", 8, 0)
    assert snapshots[-1].finished and (snapshots[-1].done, snapshots[-1].error) == (8, "")


@pytest.mark.ray
def test_driver_killed_then_rerun_resumes_on_ray_then_locally(cluster, dialogue_export, tmp_path):
    out = tmp_path / "out"
    db = out / "apiana.sqlite"
    ray_args = ("--ray", cluster.address, "--replicas", "2", "--replica-cpus", "1")
    # 72 calls of 0.2 s per replica once started: about 15 s of summarizing, committed every 2 s.
    proc = subprocess.Popen(
        fake_command(dialogue_export, out, *ray_args, latency=0.2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    seen, deadline = 0, time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                seen = query(db, "SELECT COUNT(*) FROM summaries")[0][0] if db.exists() else 0
            except sqlite3.OperationalError:  # schema not created yet
                seen = 0
            if 0 < seen < TOTAL:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and not 0 < seen < TOTAL:
            proc.kill()
        proc.wait(timeout=60)
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way: {stderr[-2000:]}"
    before = query(db, "SELECT COUNT(*) FROM summaries")[0][0]
    assert 0 < before < TOTAL and not (out / "run.json").exists()

    rerun = subprocess.run(
        fake_command(dialogue_export, out, *ray_args), capture_output=True, text=True, env=ENV, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    run = json.loads((out / "run.json").read_text())
    assert (run["chunks_total"], run["failed"], run["summaries_reused"], run["summaries_computed"]) == (
        TOTAL,
        0,
        before,
        TOTAL - before,
    )
    assert summaries_by_run(out) == {1: before, 2: TOTAL - before}  # nothing lost, nothing recomputed
    assert query(db, "SELECT COUNT(*), COUNT(DISTINCT chunk_id) FROM summaries") == [(TOTAL, TOTAL)]
    assert "on Ray, 2 replicas" in rerun.stdout

    # The same command without --ray finds every summary: a Ray run and a local one share the key.
    local = subprocess.run(fake_command(dialogue_export, out), capture_output=True, text=True, env=ENV, timeout=120)
    assert local.returncode == 0, local.stderr
    run = json.loads((out / "run.json").read_text())
    assert (run["summaries_reused"], run["summaries_computed"]) == (TOTAL, 0) and "ray" not in run
    ids = [json.loads(line)["chunk_id"] for line in (out / "summaries.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == TOTAL


@pytest.mark.ray
def test_two_worker_nodes_against_one(cluster, tmp_path):
    """The same latency-bound fake export on one replica (a whole worker node) and on two."""
    from apiana_lab.pipeline import RunConfig, run_export

    export = write_dialogue_export(tmp_path / "conversations.json", conversations=12, messages=24)  # 288 chunks

    def on_ray(replicas):
        run = run_export(
            RunConfig(
                str(export),
                str(tmp_path / f"ray-{replicas}"),
                backend="fake",
                chunk_size=64,
                batch_size=2,
                max_workers=1,
                engine_options={"latency": 0.05},
                executor="ray",
                replicas=replicas,
                replica_cpus=WORKER_CPUS,
            )
        )
        # Throughput after the replicas started: starting actors is loading the model, not scaling.
        steady = run["summarize_seconds"] - (run["ray"]["startup_seconds"] or 0.0)
        nodes = {r["node"] for r in run["ray"]["replica_runs"]}
        return {
            "chunks": run["summaries_computed"],
            "failed": run["failed"],
            "nodes_used": len(nodes),
            "steady_s": round(steady, 3),
            "chunks_per_s": run["summaries_computed"] / steady,
        }

    context = ray.data.DataContext.get_current()
    # Every replica starts before the first batch is handed out, so one that starts late (a busy
    # machine) does not count as poor scaling.
    saved, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 600
    try:
        one, two = on_ray(1), on_ray(2)
    finally:
        context.wait_for_min_actors_s = saved
    assert one["chunks"] == two["chunks"] == 288 and one["failed"] == two["failed"] == 0
    assert (one["nodes_used"], two["nodes_used"]) == (1, 2)
    ratio = two["chunks_per_s"] / one["chunks_per_s"]
    # 1.8x is the benchmark's target on a quiet machine; here other tests share two cores.
    assert ratio >= 1.4, (ratio, one, two)
    print(json.dumps({"one": one, "two": two, "ratio_two_to_one": round(ratio, 3)}, indent=1))


@pytest.mark.ray
def test_cluster_without_room_for_a_replica_is_refused_before_anything_is_written(cluster, dialogue_export, tmp_path):
    from apiana_lab.errors import ConfigError
    from apiana_lab.pipeline import RunConfig, run_export

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="No node of the Ray cluster has 1 CPUs and 1 GPUs for a replica"):
        run_export(RunConfig(str(dialogue_export), str(out), backend="fake", executor="ray", replica_gpus=1))
    assert not out.exists()
    assert ray.is_initialized()  # the test's own connection is left as it was


@pytest.mark.ray
def test_worker_node_removed_mid_run_still_stores_every_chunk_once(cluster, dialogue_export, tmp_path):
    """It takes a worker node away (its replica restarts on the other node's spare CPU), then puts one back."""
    from apiana_lab.pipeline import RunConfig, run_export

    out = tmp_path / "out"
    db = out / "apiana.sqlite"
    workers = {n.node_id: n for n in cluster.worker_nodes}
    removed, done_at_removal = [], []

    def remove_a_busy_node():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not removed:
            try:
                rows = query(db, "SELECT worker, COUNT(*) FROM summaries GROUP BY worker") if db.exists() else []
            except sqlite3.OperationalError:
                rows = []
            busy = [w for w, _ in rows if w in workers]
            if busy:
                done_at_removal.append(sum(n for _, n in rows))
                cluster.remove_node(workers[busy[0]])
                removed.append(busy[0])
            time.sleep(0.05)

    watcher = threading.Thread(target=remove_a_busy_node, daemon=True)
    watcher.start()
    config = RunConfig(
        str(dialogue_export),
        str(out),
        backend="fake",
        chunk_size=64,
        batch_size=2,
        max_workers=1,
        engine_options={"latency": 0.2},
        executor="ray",
        replicas=2,
        replica_cpus=1,
    )
    try:
        run = run_export(config)
    finally:
        watcher.join(timeout=30)
        if removed:  # the cluster is the module's: the tests that run after this one need both worker nodes
            add_node(cluster, num_cpus=WORKER_CPUS)
            cluster.wait_for_nodes(timeout=300)
    assert removed and done_at_removal[0] < TOTAL, "no node was removed while work was in flight"
    assert removed[0] not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert (run["summaries_computed"], run["failed"]) == (TOTAL, 0)
    assert query(db, "SELECT COUNT(*), COUNT(DISTINCT chunk_id) FROM summaries") == [(TOTAL, TOTAL)]
    assert query(db, "SELECT COUNT(*) FROM chunks WHERE id NOT IN (SELECT chunk_id FROM summaries)") == [(0,)]
    ids = [json.loads(line)["chunk_id"] for line in (out / "summaries.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == TOTAL
    survivor = (set(workers) - set(removed)).pop()
    nodes = {r["node"] for r in run["ray"]["replica_runs"]}
    assert survivor in nodes  # the surviving node finished the work, the lost one's included
    print(json.dumps({"removed": removed[0], "done_at_removal": done_at_removal[0], "ray": run["ray"]}, indent=1))
