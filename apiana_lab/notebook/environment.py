"""Where a notebook's code runs, and what reaches its cells: the kernel test and the engines' quiet settings."""

from __future__ import annotations

import logging
import sys

from apiana_lab.engine_log import EngineLog


def in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (tqdm.autonotebook's test), without importing IPython."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


_engine_log: EngineLog | None = None  # this kernel's, from the last quiet_libraries() call


def quiet_libraries(log_path=None) -> EngineLog:
    """Keep engines' start-up chatter out of executed notebooks: it goes to a log file; errors still show.

    Call it before the engines are imported: they read these settings once, at import. It
    overrides what the kernel inherited (`apiana-lab -v` asks for vLLM's INFO lines in a terminal,
    not in a notebook that a reviewer reads). In a kernel, what this process and the engines'
    child processes print (vLLM's log, no Triton, NUMA binding, deprecations, loading bars) goes
    to `log_path`, by default a temporary file until `EngineLog.move` puts it in the run's
    folder; error lines and tracebacks still reach the cell. Returns that EngineLog (left off
    outside a kernel, where fds 1 and 2 are the user's terminal).
    """
    import os
    import tempfile

    global _engine_log
    if _engine_log is not None:
        _engine_log.stop()  # the cell ran again: one log at a time; an engine already running keeps the old one
    log_path = log_path or os.path.join(tempfile.gettempdir(), f"apiana-engine-{os.getpid()}.log")
    log = EngineLog(log_path, errors_to=sys.stderr)
    if in_kernel():
        log.start()
    _engine_log = log
    # vLLM's own lines go to fd 2, which is the log while it is on, rather than into the cell's stream.
    os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.__stderr__"
    os.environ["VLLM_LOGGING_LEVEL"] = "INFO" if log.active else "ERROR"
    if log.active and not logging.getLogger("vllm").handlers:
        # vLLM warns while it is imported, before it sets up its own logging (no Triton here):
        # logging's last resort would print that straight into the cell.
        early = logging.getLogger("vllm")
        early.addHandler(logging.StreamHandler(sys.__stderr__))
        early.propagate = False
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    # transformers' "Loading weights" bar would become a widget of its own in every cell that loads a model.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return log
