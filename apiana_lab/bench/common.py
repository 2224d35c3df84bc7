"""What both benchmarks share: machine facts, peak memory, and writing results as JSON and markdown."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

from ..experiments.results import default_root

# The checkout's results/, else ./results (an installed package); absolute, so a later chdir cannot move it.
RESULTS_DIR = default_root().absolute()


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


def machine() -> dict:
    """Facts that decide the figures, recorded next to them."""
    cpu = cpu_name()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg_at_start": load,  # the machine is shared: a high load explains slow absolute figures
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


def write_results(name: str, stem: str, figures: dict, markdown: str) -> tuple[Path, Path]:
    """Write results/<name>/<stem>.json and .md; returns both paths."""
    folder = RESULTS_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(figures, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return json_path, md_path
