"""EngineLog for real: what a process and the children it starts print goes to the log; errors still show.

The children here are plain Python processes that print what vLLM's engine core prints (a
WARNING, torch's NUMA notice, an ERROR and a traceback); the vLLM end-to-end checks are in
test_cli.py.
"""

import os
import subprocess
import sys

import pytest

# What an engine's child process prints: noise on both streams, then a real failure.
CHILD = r"""
import sys, time
print("(EngineCore pid=1) WARNING 12-06 05:16:09 [cpu.py:224] Triton is not installed.", flush=True)
print("[W1206 05:16:01 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy",
      file=sys.stderr, flush=True)
print("(EngineCore pid=1) ERROR 12-06 05:16:10 [core.py:1] EngineCore failed to start.", flush=True)
print("Traceback (most recent call last):\n  File \"core.py\", line 9, in run_engine_core\n"
      "    raise RuntimeError('x')\nRuntimeError: engine blew up", file=sys.stderr, flush=True)
print("Loading safetensors checkpoint shards: 100% Completed", file=sys.stderr, flush=True)
if sys.argv[1:] == ["linger"]:  # an engine that outlives the block it was started in
    sys.stdin.readline()
    print("(EngineCore pid=1) WARNING late: shutting down", flush=True)
"""

SCRIPT = r"""
import logging, subprocess, sys
from apiana_lab.engine_log import EngineLog

child, first, second = sys.argv[1:4]
print("stdout before", flush=True)
log = EngineLog(first).start()
print("a print while the engine runs")
logging.getLogger("vllm.triton_utils.importing").warning("Triton is installed, but doesn't include CPU backend.")
subprocess.run([sys.executable, child], check=True)
lingering = subprocess.Popen([sys.executable, child, "linger"], stdin=subprocess.PIPE)
log.console.write("our progress bar\n")
log.move(second)
log.stop()
print("stdout after", flush=True)
lingering.communicate(b"go\n")
print("joined", log.join(10), flush=True)
"""


def test_children_and_this_process_write_to_the_log_and_only_errors_show(tmp_path):
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "script.py").write_text(SCRIPT)
    first, second = tmp_path / "first.log", tmp_path / "run" / "engine.log"
    p = subprocess.run(
        [sys.executable, tmp_path / "script.py", tmp_path / "child.py", first, second],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    # stdout is ours alone, before and after.
    assert p.stdout == "stdout before\nstdout after\njoined True\n"
    # The terminal's stderr: the bar, the two children's error lines and whole tracebacks; no noise.
    shown = p.stderr.splitlines()
    assert "our progress bar" in shown
    assert sum("EngineCore failed to start" in line for line in shown) == 2
    assert shown.count("Traceback (most recent call last):") == 2 and shown.count("RuntimeError: engine blew up") == 2
    assert shown.count('  File "core.py", line 9, in run_engine_core') == 2
    for noise in ("WARNING", "NUMA", "Triton", "Loading safetensors", "a print while"):
        assert noise not in p.stderr, noise
    # The log has everything, moved to where the run said, including what the lingering child
    # printed after the block ended; nothing of ours.
    assert not first.exists()
    log = second.read_text()
    for line in (
        "a print while the engine runs",
        "Triton is installed, but doesn't include CPU backend.",
        "Triton is not installed.",
        "NUMA binding",
        "EngineCore failed to start",
        "RuntimeError: engine blew up",
        "Loading safetensors",
        "WARNING late: shutting down",
    ):
        assert line in log, line
    assert log.count("Triton is not installed.") == 2 and "our progress bar" not in log and "stdout" not in log


def test_a_block_where_nothing_was_printed_leaves_no_file(tmp_path):
    from apiana_lab.engine_log import EngineLog

    with EngineLog(tmp_path / "engine.log") as log:
        assert log.active
    assert not (tmp_path / "engine.log").exists()


def test_the_log_waits_in_a_temporary_file_until_the_run_makes_its_folder(tmp_path):
    from apiana_lab.engine_log import EngineLog

    out = tmp_path / "out"
    with EngineLog(out / "engine.log") as log:
        subprocess.run([sys.executable, "-c", "print('(EngineCore pid=1) WARNING engine noise')"], check=True)
        log.sync()
        assert not out.exists() and "engine noise" in log.path.read_text()  # a bad input would leave no folder
        temporary = log.path
        out.mkdir()  # the run got past reading the export
    assert log.path == out / "engine.log" and "engine noise" in log.path.read_text() and not temporary.exists()
    with EngineLog(tmp_path / "missing" / "engine.log") as log:  # a run that never made its folder
        os.write(1, b"said\n")  # fd 1 itself: pytest puts its own object in sys.stdout
    assert log.path.read_text() == "said\n" and not (tmp_path / "missing").exists()
    log.path.unlink()


def test_in_a_kernel_engine_output_goes_to_the_log_and_errors_to_the_cell(tmp_path):
    """The executed notebook keeps the error and its traceback, and none of the start-up warnings."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    (tmp_path / "child.py").write_text(CHILD)
    cells = [
        "import logging, subprocess, sys\n"
        "from apiana_lab.notebook import quiet_libraries\n"
        "engine_log = quiet_libraries()\n"
        "print('active:', engine_log.active)",
        # vLLM's warning while it is imported, then an engine process's output, as in summarize_export
        "logging.getLogger('vllm.triton_utils.importing')"
        '.warning("Triton is installed, but doesn\'t include CPU backend.")\n'
        f"subprocess.run([sys.executable, {str(tmp_path / 'child.py')!r}], check=True)\n"
        "engine_log.sync()",
        f"engine_log.move({str(tmp_path / 'run' / 'engine.log')!r})\nprint('moved')",
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    def streams(cell):
        return "".join(o["text"] for o in nb.cells[cell].outputs if o["output_type"] == "stream")

    assert streams(0) == "active: True\n" and streams(2) == "moved\n"
    shown = streams(1)
    assert "EngineCore failed to start" in shown and "RuntimeError: engine blew up" in shown
    assert 'File "core.py", line 9' in shown
    for noise in ("WARNING", "NUMA", "Triton", "Loading safetensors"):
        assert noise not in shown, noise
    log = (tmp_path / "run" / "engine.log").read_text()
    for line in (
        "Triton is installed, but doesn't include CPU backend.",
        "Triton is not installed.",
        "NUMA binding",
        "EngineCore failed to start",
        "RuntimeError: engine blew up",
    ):
        assert line in log, line
