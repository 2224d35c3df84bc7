"""Browsers over a run's summaries: by conversation and date, and by quality flag (ipywidgets, imported when built)."""

from __future__ import annotations

from apiana_lab.errors import MissingDependencyError


def summary_browser(frame):
    """A conversation picker and a date range over a summaries table; the matching rows show below them."""
    try:
        import ipywidgets as w
    except ImportError as e:
        raise MissingDependencyError("ipywidgets", "notebooks") from e
    from IPython.display import display

    from apiana_lab.experiments.summaries import filter_summaries

    titles = frame.drop_duplicates("conversation_id")
    choices = [("all conversations", "")] + [
        (f"{t or '(untitled)'} [{c[:8]}]", c) for t, c in zip(titles["title"], titles["conversation_id"])
    ]
    pick = w.Dropdown(options=choices, description="conversation", style={"description_width": "initial"})
    start = w.DatePicker(description="from")
    end = w.DatePicker(description="to")
    # Plain traits, not an Output widget: capturing into an Output while papermill executes the
    # cell (clear_output, display) could leave the cell "running" forever under load.
    count = w.Label()
    table = w.HTML()

    def refresh(_=None) -> None:
        shown = filter_summaries(
            frame, pick.value or None, start.value and start.value.isoformat(), end.value and end.value.isoformat()
        )
        count.value = f"{len(shown)} of {len(frame)} summaries"
        table.value = shown.to_html(index=False, max_rows=200) if len(shown) < len(frame) else ""

    for control in (pick, start, end):
        control.observe(refresh, "value")
    refresh()
    box = w.VBox([w.HBox([pick, start, end]), count, table])
    display(box)
    return box


def flagged_browser(frame):
    """A flag picker over a review.quality_frame; the flagged summaries show beside their chunks below it."""
    try:
        import ipywidgets as w
    except ImportError as e:
        raise MissingDependencyError("ipywidgets", "notebooks") from e
    import html

    from IPython.display import display

    from apiana_lab.quality import FLAGS

    pick = w.Dropdown(
        options=[("any flag", "")] + [(f, f) for f in FLAGS], description="flag", style={"description_width": "initial"}
    )
    count = w.Label()
    table = w.HTML()

    def refresh(_=None) -> None:
        flag = pick.value
        if flag:
            shown = frame[frame["flags"].str.split(", ").apply(lambda f: flag in f)]
        else:
            shown = frame[frame["flagged"]]
        count.value = f"{len(shown)} of {len(frame)} summaries flagged" + (f" {flag}" if flag else "")
        rows = "".join(
            f"<tr><td>{html.escape(r.title or '')}<br><b>{html.escape(r.flags)}</b></td>"
            f"<td style='text-align:left'>{html.escape(r.summary)}</td>"
            f"<td style='text-align:left'>{html.escape(r.chunk)}</td></tr>"
            for r in shown.head(100).itertuples()
        )
        table.value = (
            (f"<table><tr><th>conversation, flags</th><th>summary</th><th>chunk (excerpt)</th></tr>{rows}</table>")
            if rows
            else ""
        )

    pick.observe(refresh, "value")
    refresh()
    box = w.VBox([pick, count, table])
    display(box)
    return box
