"""A real JupyterLab server and a real headless Chromium, for tests that look where users look.

The server runs on a free loopback port with a token, its own config/runtime/settings folders,
the project's `python3` kernel and a temporary root folder. Chromium is Debian's package,
driven through Playwright; nothing downloads a browser. Everything started here is stopped at
the end, kernels included, even when a check fails.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("APIANA_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = REPO / "results" / "browser"


@dataclass
class Lab:
    """A running JupyterLab: where it is and how to reach it."""

    url: str
    token: str
    root: Path
    process: subprocess.Popen
    log: Path

    def open_url(self, path: str) -> str:
        """The address of a file in the root, as JupyterLab opens it."""
        return f"{self.url}/lab/tree/{path}?token={self.token}&reset"

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(
            f"{self.url}/api/{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Lab:
    root = tmp_path_factory.mktemp("lab-root")
    home = tmp_path_factory.mktemp("lab-home")
    settings = home / "settings"
    # No news pop-up over the bottom right of the page (it covers outputs in screenshots).
    notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    port, token = _free_port(), secrets.token_hex(16)
    log = home / "jupyter.log"
    jupyter = Path(sys.executable).parent / "jupyter"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                str(jupyter),
                "lab",
                "--no-browser",
                "--ip",
                "127.0.0.1",
                f"--port={port}",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={root}",
                "--allow-root",
                "--ServerApp.open_browser=False",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = Lab(f"http://127.0.0.1:{port}", token, root, process, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"jupyter lab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                server.api("status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer on port {port} within 120 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield server
    finally:
        _stop(server)


def _stop(server: Lab) -> None:
    """Shut every kernel down, stop the server, then kill anything of its that is left."""
    try:
        for kernel in server.api("kernels") or []:
            server.api(f"kernels/{kernel['id']}", method="DELETE")
    except OSError:
        pass
    leftovers = _descendants(server.process.pid)
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(server.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for child in leftovers:  # kernels start in sessions of their own: killpg does not reach them
        try:
            child.kill()
        except Exception:
            pass


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"No Chromium at {CHROMIUM}. Install Debian's package: `apt-get install chromium` "
            f"(`make test-browser` does this), or point APIANA_CHROMIUM at a Chromium binary."
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("The Python driver is missing: pip install 'apiana-lab[browser]' (`make test-browser` does this).")
    with sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        except Exception as e:
            pytest.fail(f"Chromium at {CHROMIUM} did not start: {e}")
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
