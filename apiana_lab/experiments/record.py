"""What every measurement is recorded with: the machine, the results root, and the JSON-plus-markdown writer."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def checkout() -> Path | None:
    """The source checkout this package runs from (the repository, or an editable install of it); None if installed."""
    folder = PACKAGE.parent
    if (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir():
        return folder
    return None


def results_root() -> Path:
    """$APIANA_LAB_RESULTS, else the checkout's results/ (when run from one), else ./results."""
    if os.environ.get("APIANA_LAB_RESULTS"):
        return Path(os.environ["APIANA_LAB_RESULTS"]).expanduser()
    repo = checkout()
    return repo / "results" if repo else Path("results")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def gpu_names() -> list[str] | None:
    """The GPUs NVML sees; None without a driver, a GPU or nvidia-ml-py."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return [pynvml.nvmlDeviceGetName(h) for h in handles]
    except Exception:  # no driver, no GPU, or nvidia-ml-py missing: the machine has no usable GPU
        return None


def machine() -> dict:
    """The machine the figures were measured on, recorded next to them (benchmarks and notebook runs alike)."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu_names(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        # The machine is shared: a high load explains slow absolute figures. Two names, as older files read them.
        "loadavg": load,
        "loadavg_at_start": load,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of `rows`, with (key, header) columns; floats rounded for reading."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key, "")
            if isinstance(value, float):
                value = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
            elif isinstance(value, int):
                value = f"{value:,}"
            cells.append(str(value if value is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_result(name: str, stem: str, data: dict, markdown: str, root: str | Path | None = None) -> tuple[Path, Path]:
    """Write <root>/<name>/<stem>.json and .md (root: `results_root()`); returns both paths."""
    folder = Path(root or results_root()).absolute() / name
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return json_path, md_path
