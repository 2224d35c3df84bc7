"""Jupyter faces of a run: the progress widget, the live memory figure and its runner, the plots and browsers.

One cell runs a job and shows everything:

    monitor = MemoryMonitor(provider)
    report = run_live(lambda progress, cancel: run_export(config, provider=provider, progress=progress, cancel=cancel),
                      monitor=monitor, results_dir=run_dir)

- `environment`: whether this runs in a kernel, and `quiet_libraries` (engines' chatter to a log file);
- `widgets`: the progress bar (`WidgetProgress`, `auto_progress`);
- `live`: `LiveFigure`, `run_live` and `run_export_live`;
- `plots`: every figure the notebooks show (`plot_monitor`, `plot_quality`, `plot_sweep`...);
- `browsers`: `summary_browser` and `flagged_browser`.

ipywidgets, matplotlib and IPython are imported only when something here is used. This package
imports the core (`monitor`, `progress`, `pipeline`...); no core module imports it.
"""

from apiana_lab.notebook.browsers import flagged_browser, summary_browser
from apiana_lab.notebook.environment import in_kernel, quiet_libraries
from apiana_lab.notebook.live import Job, LiveFigure, run_export_live, run_live
from apiana_lab.notebook.plots import (
    figure_png,
    plot_comparison,
    plot_monitor,
    plot_per_month,
    plot_quality,
    plot_similarity,
    plot_sweep,
    plot_token_distribution,
    show,
)
from apiana_lab.notebook.widgets import WidgetProgress, auto_progress, describe, summary_line

__all__ = [
    "Job",
    "LiveFigure",
    "WidgetProgress",
    "auto_progress",
    "describe",
    "figure_png",
    "flagged_browser",
    "in_kernel",
    "plot_comparison",
    "plot_monitor",
    "plot_per_month",
    "plot_quality",
    "plot_similarity",
    "plot_sweep",
    "plot_token_distribution",
    "quiet_libraries",
    "run_export_live",
    "run_live",
    "show",
    "summary_browser",
    "summary_line",
]
