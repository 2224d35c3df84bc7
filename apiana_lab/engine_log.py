"""Where engines' own output goes: a log file that the run names, not the progress bar or a notebook cell.

vLLM logs to stdout, and its engine core and workers are child processes that print start-up
warnings (no Triton, NUMA binding, deprecations, a checkpoint-loading bar) to the stdout and
stderr they inherit. Python's logging cannot reach a child, so `EngineLog` works one level
down: while it is on, file descriptors 1 and 2 of this process, and so of every child started
meanwhile, are a pipe into the log file. A child keeps that pipe for its whole life.

Errors still show: a line that reads as one (`ERROR`, `CRITICAL`, `SomethingError: ...`) and
every line of a Python traceback is copied to the terminal (or the notebook cell) as well.

    with EngineLog("out/engine.log") as log:
        bar = TerminalProgress(file=log.console)  # ours: stays on the terminal
        run_export(config, progress=bar)
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import TextIO

logger = logging.getLogger(__name__)

# A line that reports an error: vLLM's "(EngineCore pid=1) ERROR ...", logging's "ERROR name: ...",
# or an exception's last line ("RuntimeError: ...", "torch.OutOfMemoryError: ...").
_ERROR = re.compile(rb"\b(?:ERROR|CRITICAL|FATAL)\b|^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)\b(?::|$)")
_TRACEBACK = b"Traceback (most recent call last):"
_CHAINED = (b"During handling of the above exception", b"The above exception was the direct cause")
_SYNC = re.compile(rb"\x1eapiana-engine-log-sync (\d+)\x1e\n?")
_temporary = itertools.count()


class EngineLog:
    """Sends what this process and its children write to stdout and stderr into `path`, errors also to the terminal.

    Args:
        path: the log file, appended to (a resumed run keeps its earlier log). Until its folder
            exists (a run creates its output folder once the export has been read) the log is
            kept in a temporary file, moved there by `stop()`: a run that fails on bad input
            writes nothing into a folder it was not going to make.
        echo: copy every line to the terminal too (`-v`).
        errors_to: where error lines are copied (default: the terminal's stderr as it was at
            `start()`; a notebook passes its cell's stream).
    """

    def __init__(self, path, *, echo: bool = False, errors_to: TextIO | None = None):
        self.path = Path(path)
        self.echo = echo
        self.errors_to = errors_to
        self.console: TextIO = sys.stderr  # the terminal's stderr, for what must stay on it (a progress bar)
        self.active = False
        self._saved: tuple[int, int] | None = None
        self._destination: Path | None = None  # where the log goes once that folder exists
        self._thread: threading.Thread | None = None
        self._file = None
        self._lock = threading.Lock()  # the pump writes, move() swaps the file
        self._synced = threading.Condition()
        self._seen = 0
        self._syncs = itertools.count(1)
        self._in_traceback = False

    def start(self) -> EngineLog:
        """Point fds 1 and 2 at the log; children started from now on inherit that."""
        if self.active:
            return self
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        try:
            saved = (os.dup(1), os.dup(2))
        except OSError as e:  # no usable fd 1 or 2 (some front ends): output stays where it was
            logger.info("engine output not redirected to %s: %s", self.path, e)
            return self
        if not self.path.parent.is_dir():
            temporary = Path(tempfile.gettempdir()) / f"apiana-{os.getpid()}-{next(_temporary)}-{self.path.name}"
            self._destination, self.path = self.path, temporary
        self.console = open(
            os.dup(saved[1]),
            "w",
            buffering=1,
            encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
            errors="replace",
        )
        if self.errors_to is None:
            self.errors_to = self.console
        read_end, write_end = os.pipe()
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name="engine-log", daemon=True)
        self._thread.start()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._saved, self.active = saved, True
        return self

    def stop(self) -> None:
        """Give fds 1 and 2 back, once all written so far is in the log; children still running keep logging there."""
        if not self.active:
            return
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)  # what Python buffered for fd 1 or 2 belongs in the log, not after it
        self.sync()
        out, err = self._saved
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        self._saved, self.active = None, False
        with self._lock:
            if self.path.exists() and self.path.stat().st_size == 0:
                self.path.unlink()  # a file made for the log, and nothing was said: leave none behind
        if self._destination is not None and self._destination.parent.is_dir():
            self.move(self._destination)
        self._destination = None

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until the log holds everything written to fds 1 and 2 before this call (False on timeout)."""
        if not self.active:
            return True
        n = next(self._syncs)
        os.write(
            2, b"\x1eapiana-engine-log-sync %d\x1e\n" % n
        )  # a pipe keeps order: when this is read, so is all before it
        with self._synced:
            return self._synced.wait_for(lambda: self._seen >= n, timeout)

    def join(self, timeout: float | None = None) -> bool:
        """After `stop()`: wait until every child that inherited the log has exited and its output is in.

        Returns False on timeout.
        """
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def move(self, path) -> None:
        """Carry on in `path`, with what was logged so far (a notebook knows its run folder only after start-up)."""
        path = Path(path)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None  # opened again at the next line, there
            if self._thread is not None and self.path.exists():  # started: the file is the log's own
                path.parent.mkdir(parents=True, exist_ok=True)
                with (
                    open(self.path, "rb") as old,
                    open(path, "ab") as new,
                ):  # appended: a resumed run keeps the runs before
                    shutil.copyfileobj(old, new)
                self.path.unlink()
            self.path = path

    def __enter__(self) -> EngineLog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _pump(self, read_end: int) -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            # Ends when every writer is gone: this process's fds given back and every child exited.
            while data := pipe.read(65536):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    self._line(line + b"\n")
        if pending:
            self._line(pending)

    def _line(self, line: bytes) -> None:
        synced = [int(n) for n in _SYNC.findall(line)]
        line = _SYNC.sub(b"", line)
        if line:
            with self._lock:
                try:
                    if self._file is None:  # made at the first line: a run whose engines said nothing leaves no file
                        self._file = open(self.path, "ab")
                    self._file.write(line)
                    self._file.flush()
                except OSError:  # the pipe must keep draining, or the engine blocks on a full one
                    pass
            show, self._in_traceback = _shows(line.rstrip(b"\r\n"), self._in_traceback)
            if self.echo or show:
                try:
                    self.errors_to.write(line.decode("utf-8", "replace"))
                    self.errors_to.flush()
                except (OSError, ValueError):  # the terminal went away: the log still has it
                    pass
        if synced:  # only now: what came before the mark is written
            with self._synced:
                self._seen = max(self._seen, *synced)
                self._synced.notify_all()


def _shows(text: bytes, in_traceback: bool) -> tuple[bool, bool]:
    """Whether a line goes to the terminal too, and whether a traceback goes on after it."""
    if _TRACEBACK in text:
        return True, True
    if in_traceback:
        # Frames are indented; the exception's own line, flush left, ends the traceback.
        if not text.strip() or text[:1].isspace() or text.startswith(_CHAINED):
            return True, True
        return True, False
    return bool(_ERROR.search(text)), False


def _flush(stream) -> None:
    try:
        stream.flush()
    except (AttributeError, OSError, ValueError):
        pass
