"""Kernels talk over Unix sockets, whose paths must fit in 107 bytes however deep the runtime folder is."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("jupyter_client")

from apiana_lab.experiments.results import kernel_manager_class  # noqa: E402


@pytest.mark.skipif(os.name != "posix", reason="Unix sockets only on POSIX")
@pytest.mark.parametrize("depth", [10, 120])
def test_kernel_socket_path_fits_whatever_the_runtime_folder(tmp_path, monkeypatch, depth):
    runtime = tmp_path / ("d" * depth) / "runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    manager = kernel_manager_class()(kernel_name="python3")
    assert manager.transport == "ipc"
    assert len(manager.ip) + len("-65535") <= 107  # zmq appends "-<port>" to the path
    assert os.path.isdir(os.path.dirname(manager.ip))
    if len(str(runtime)) < 60:
        assert manager.ip.startswith(str(runtime))  # a shallow folder is used as it is
