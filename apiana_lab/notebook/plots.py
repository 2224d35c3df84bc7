"""Every figure the notebooks show, each on its own Agg canvas; matplotlib is imported when one is drawn."""

from __future__ import annotations

import io

from apiana_lab.monitor import RATE_WINDOW_S, MemoryMonitor

_MEMORY_LINES = [  # (column, label, style)
    ("rss_mb", "CPU: RSS of this process + children", "-"),
    ("gpu_process_mb", "GPU: this process + children", "-"),
    ("torch_allocated_mb", "torch.cuda allocated", "-"),
    ("torch_reserved_mb", "torch.cuda reserved", "--"),
]
_SOURCE_TITLES = {"cpu": "CPU", "gpu": "GPU (NVML)", "torch.cuda": "torch.cuda", "engine": "engine metrics"}


def plot_monitor(monitor: MemoryMonitor, title: str = ""):
    """A matplotlib Figure of a monitor's series: memory per source, KV-cache use, output tokens/s, events.

    Built on its own Agg canvas, outside pyplot, so it is never shown twice and is safe to
    draw while other threads run.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    samples, rates, events, sources = monitor.to_pandas(), monitor.progress_frame(), monitor.events, monitor.sources
    fig = Figure(figsize=(10, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_mem, ax_kv, ax_tok = fig.subplots(3, 1, sharex=True)
    fig.suptitle(title or "Memory, KV cache and throughput during the run")

    # Memory: every source that reads, in one unit so lines compare.
    lines = [(c, label, style) for c, label, style in _MEMORY_LINES if c in samples]
    for c in sorted(samples.columns):
        if c.startswith("gpu") and c.endswith("_used_mb"):
            lines.append((c, f"GPU {c[3:-8]}: used, all processes", "-"))
        elif c.startswith("gpu") and c.endswith("_total_mb"):
            lines.append((c, f"GPU {c[3:-9]}: total", ":"))
    peak = max((samples[c].max() for c, _, _ in lines if samples[c].notna().any()), default=0.0)
    unit, scale = ("GB", 1e3) if peak >= 2000 else ("MB", 1.0)
    for c, label, style in lines:
        ax_mem.plot(samples["t_s"], samples[c] / scale, style, label=label)
    ax_mem.set_ylabel(f"memory ({unit})")
    title_mem = "Memory per source"
    if "system_available_mb" in samples and samples["system_available_mb"].notna().any():
        # Drawn as a line it would flatten everything else; its low point is the headroom that matters.
        title_mem += f" (system memory available, lowest: {samples['system_available_mb'].min() / 1e3:.1f} GB)"
    absent = [
        f"{_SOURCE_TITLES.get(n, n)}: {why.split(' (')[0]}"
        for n, why in sources.items()
        if n != "engine" and not why.startswith("ok")
    ]
    if absent:
        title_mem += "\nabsent: " + "; ".join(absent)
    ax_mem.set_title(title_mem, loc="left", fontsize="small")
    if lines:
        ax_mem.legend(loc="best", fontsize="x-small")
    ax_mem.set_ylim(0, peak / scale * 1.12 if peak > 0 else 1.0)  # headroom, so a flat line is not hidden by the frame

    # Engine: KV-cache use and the scheduler's queue.
    ax_kv.set_ylabel("KV cache used (%)")
    ax_kv.set_title("Engine", loc="left", fontsize="small")
    if "kv_cache_pct" in samples:
        ax_kv.plot(samples["t_s"], samples["kv_cache_pct"], color="tab:purple", label="KV cache used")
        ax_kv.set_ylim(0, max(5.0, float(samples["kv_cache_pct"].max()) * 1.15))
        queue = [c for c in ("requests_running", "requests_waiting") if c in samples]
        if queue:
            twin = ax_kv.twinx()
            for c, color in zip(queue, ("tab:green", "tab:orange")):
                twin.step(samples["t_s"], samples[c], where="post", color=color, lw=0.9, label=c.replace("_", " "))
            twin.set_ylabel("requests")
            twin.legend(loc="upper right", fontsize="x-small")
        ax_kv.legend(loc="upper left", fontsize="x-small")
    else:
        ax_kv.set_ylim(0, 100)
        ax_kv.text(
            0.5,
            0.5,
            f"no engine metrics: {sources.get('engine', 'monitor not started')}",
            transform=ax_kv.transAxes,
            ha="center",
            va="center",
            fontsize="small",
            color="dimgray",
        )

    # Throughput: at each snapshot, the rate over the trailing window that ends there (progress_frame
    # says why a window and not one step), drawn back over the step before it.
    ax_tok.set_ylabel("output tokens/s")
    ax_tok.set_xlabel("time since the monitor started (s)")
    ax_tok.set_title(
        f"Throughput (over trailing windows of at least {RATE_WINDOW_S:g} s and one in-flight batch)",
        loc="left",
        fontsize="small",
    )
    if not rates.empty and rates["output_tokens_per_s"].notna().any():
        ax_tok.step(rates["t_s"], rates["output_tokens_per_s"], where="pre", color="tab:blue", label="output tokens/s")
        ax_tok.set_ylim(0, float(rates["output_tokens_per_s"].max()) * 1.15 or 1.0)
        sizes = rates["batch_size"] if "batch_size" in rates else None
        if sizes is not None and sizes[sizes > 0].nunique() > 1:
            # The size changed during the run (auto's steps, an out-of-memory halving): beside what it did to the rate.
            twin = ax_tok.twinx()
            twin.step(rates["t_s"], sizes, where="post", color="tab:red", lw=0.9, label="batch size (or in flight)")
            twin.set_ylabel("batch size")
            twin.set_ylim(0, float(sizes.max()) * 1.15)
            twin.legend(loc="upper right", fontsize="x-small")
    else:
        ax_tok.text(
            0.5,
            0.5,
            "no progress snapshots with new tokens yet",
            transform=ax_tok.transAxes,
            ha="center",
            va="center",
            fontsize="small",
            color="dimgray",
        )

    # Events: a marker on every panel, the label once at the top. Events within 2% of the time
    # span of each other share one label ("end · finished"), which would otherwise overprint.
    label_at = blended_transform_factory(ax_mem.transData, ax_mem.transAxes)
    span = max([e["t_s"] for e in events] + [float(samples["t_s"].max()) if not samples.empty else 0.0, 1.0])
    labels: list[list] = []  # [t, [names]]
    for e in events:
        for ax in (ax_mem, ax_kv, ax_tok):
            ax.axvline(e["t_s"], color="gray", ls="--", lw=0.8)
        if labels and e["t_s"] - labels[-1][0] < 0.02 * span:
            labels[-1][1].append(e["event"])
        else:
            labels.append([e["t_s"], [e["event"]]])
    for t, names in labels[:20]:  # beyond that the labels only overlap; the full list is in memory.json
        text = " · ".join(dict.fromkeys(names))
        text = text if len(text) <= 40 else text[:39] + "…"
        ax_mem.text(
            t,
            0.98,
            " " + text,
            transform=label_at,
            rotation=90,
            va="top",
            ha="right",
            fontsize="x-small",
            color="dimgray",
        )
    return fig


def figure_png(fig, dpi: int = 90) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def show(fig) -> None:
    """Display a figure built here (on its own canvas) as a PNG in the cell's output."""
    from IPython.display import Image, display

    display(Image(data=figure_png(fig), format="png"))


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize="small", color="dimgray")


def plot_per_month(months):
    """Bars of conversations and of dialogue messages per month (a table from ExportProfile.per_month)."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(2, 1, (10, 5.5))
    (ax_conv,), (ax_msg,) = axes
    fig.suptitle("Conversations and messages per month (by the conversation's creation date)")
    for ax, column, label, color in (
        (ax_conv, "conversations", "conversations", "tab:blue"),
        (ax_msg, "messages", "dialogue messages", "tab:orange"),
    ):
        ax.set_ylabel(label)
        ax.set_xlabel("month (YYYY-MM, UTC)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if months.empty:
            _no_data(ax, "no conversations")
            continue
        x = range(len(months))
        ax.bar(x, months[column], color=color)
        step = max(1, len(months) // 40)  # past ~40 labels they overlap; label every step-th month
        ax.set_xticks(
            list(x)[::step], months["month"][::step], rotation=90 if len(months) > 12 else 0, fontsize="small"
        )
    return fig


def plot_token_distribution(profile):
    """Histograms of tokens per conversation and per chunk, with the chunk size marked."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(1, 2, (11, 4))
    (ax_conv, ax_chunk) = axes[0]
    fig.suptitle(f"Token counts at chunk size {profile.chunk_size} (the summarizing model's tokenizer)")
    per_conversation = [row["tokens"] for row in profile.conversations if row["tokens"] > 0]
    for ax, values, what in ((ax_conv, per_conversation, "conversation"), (ax_chunk, profile.chunk_tokens, "chunk")):
        ax.set_xlabel(f"tokens per {what}")
        ax.set_ylabel(f"{what}s")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if not values:
            _no_data(ax, f"no {what}s with dialogue")
            continue
        low, high = min(values), max(values)
        if what == "chunk":  # from 0 to the chunk size, so how full the chunks are shows at a glance
            ax.hist(values, bins=np.linspace(0, max(high, profile.chunk_size), 36), color="tab:blue")
        elif high / max(low, 1) > 50:  # real exports span 10 to 100,000 tokens a conversation: log bins keep both ends
            ax.hist(values, bins=np.geomspace(max(low, 1), high, 30), color="tab:blue")
            ax.set_xscale("log")
        else:
            ax.hist(values, bins=min(30, max(5, len(values))), color="tab:blue")
    ax_conv.set_title(f"{len(per_conversation)} conversations with dialogue", loc="left", fontsize="small")
    ax_chunk.axvline(profile.chunk_size, color="tab:red", ls="--", lw=1, label=f"chunk size {profile.chunk_size}")
    ax_chunk.legend(fontsize="x-small")
    ax_chunk.set_title(f"{len(profile.chunk_tokens)} chunks", loc="left", fontsize="small")
    return fig


def plot_comparison(table):
    """Bars per backend: output and prompt tokens/s, load and run seconds, peak memory (a comparison_table)."""
    import numpy as np

    fig, axes = _figure(2, 2, (11, 7))
    fig.suptitle("Backends on the same chunks")
    names = list(table["backend"])
    x = np.arange(len(names))
    failed = table["error"].notna() if "error" in table else [False] * len(names)
    panels = [
        (
            axes[0][0],
            [("completion_tokens_per_s", "output")],
            "output tokens/s",
            "Generation speed (above each bar: share of summaries flagged)",
        ),
        (axes[0][1], [("prompt_tokens_per_s", "prompt")], "prompt tokens/s", "Prompt processing speed"),
        (axes[1][0], [("load_s", "load"), ("wall_s", "run")], "seconds", "Load time and run time"),
        (
            axes[1][1],
            [
                (c, c.removeprefix("peak_").removesuffix("_mb"))
                for c in table.columns
                if c.startswith("peak_") and c.endswith("_mb")
            ],
            "peak memory (MB)",
            "Peak memory per source",
        ),
    ]
    for ax, series, unit, title in panels:
        ax.set_title(title, loc="left", fontsize="small")
        ax.set_ylabel(unit)
        ax.set_xticks(x, names)
        if not series:
            _no_data(ax, "not measured")
            continue
        width = 0.8 / len(series)
        for k, (column, label) in enumerate(series):
            values = table[column].astype(float).fillna(0.0) if column in table else np.zeros(len(names))
            bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=label)
            ax.bar_label(bars, fmt=lambda v: f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}", fontsize="x-small")
        if len(series) > 1:
            ax.legend(fontsize="x-small")
        if series[0][0] == "completion_tokens_per_s" and "flagged_share" in table:
            # A faster backend that writes worse memories must show beside its speed.
            for i, share in enumerate(table["flagged_share"]):
                if share == share and share is not None:  # not NaN: the backend ran
                    ax.annotate(
                        f"{share:.0%} flagged",
                        (x[i], 0),
                        xytext=(0, 2),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        fontsize="x-small",
                        color="tab:red",
                    )
        for i, bad in enumerate(failed):
            if bad:
                ax.text(x[i], 0, "failed", ha="center", va="bottom", color="tab:red", fontsize="small")
    return fig


def plot_sweep(sweep: dict):
    """Throughput and peak memory against batch size; failed or out-of-memory points and the recommendation marked."""
    fig, axes = _figure(2, 1, (9, 7))
    (ax_tok,), (ax_mem,) = axes
    rows = sorted(sweep["rows"], key=lambda r: r["batch_size"])
    key = sweep["memory_key"]
    fig.suptitle("Batch-size sweep: same chunks, one loaded engine")
    ok = [r for r in rows if "error" not in r]
    bad = [r for r in rows if "error" in r or r.get("oom") or r.get("failed")]
    for ax, column, unit, scale in (
        (ax_tok, "completion_tokens_per_s", "output tokens/s", 1.0),
        (ax_mem, key, "peak memory (GB)", 1e3),
    ):
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        points = [(r["batch_size"], r.get(column, 0.0) / scale) for r in ok]
        if points:
            ax.plot(*zip(*points), "o-", color="tab:blue", label=unit.split(" (")[0])
        if bad:
            ax.plot(
                [r["batch_size"] for r in bad],
                [(r.get(column) or 0.0) / scale for r in bad],
                "x",
                color="tab:red",
                markersize=12,
                mew=2.5,
                label="out of memory or failed",
            )
        if sweep["recommended_batch_size"] is not None:
            ax.axvline(
                sweep["recommended_batch_size"],
                color="tab:green",
                ls="--",
                lw=1,
                label=f"recommended: {sweep['recommended_batch_size']}",
            )
        ax.set_xticks([r["batch_size"] for r in rows], [str(r["batch_size"]) for r in rows])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="x-small", loc="best")
    ax_tok.set_title("Throughput (beside each point: share of summaries flagged)", loc="left", fontsize="small")
    for r in ok:
        if r.get("flagged_share") is not None:
            ax_tok.annotate(
                f"{r['flagged_share']:.0%}",
                (r["batch_size"], r.get("completion_tokens_per_s", 0.0)),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize="x-small",
                color="tab:red",
            )
    limit = sweep["memory_limit_mb"]
    source = key.removeprefix("peak_").removesuffix("_mb")
    if source == "rss":
        title = "Peak memory: CPU RSS of this process + children"
    elif source.startswith("gpu"):
        title = f"Peak memory: GPU {source.removeprefix('gpu').removesuffix('_used')}, used by all processes"
    else:
        title = f"Peak memory: {source}"
    ax_mem.set_ylim(0, max([(r.get(key) or 0.0) / 1e3 for r in rows], default=0.0) * 1.15 or 1.0)
    if limit:
        budget = limit * (1 - sweep["headroom"]) / 1e3
        peak = max([(r.get(key) or 0.0) / 1e3 for r in rows], default=0.0)
        if budget <= 3 * max(peak, 1e-9):
            ax_mem.axhline(budget, color="tab:orange", ls=":", label=f"budget {budget:,.1f} GB")
            ax_mem.legend(fontsize="x-small", loc="best")
        else:  # drawn to scale it would flatten the curve
            title += f"; budget {budget:,.1f} GB, far above"
    ax_mem.set_title(title, loc="left", fontsize="small")
    ax_mem.set_xlabel("batch size (log scale)")
    return fig


def plot_similarity(rows: list[dict], thresholds=None):
    """The A/B check per chunk: a histogram of similarity and one of the new/old length ratio, thresholds marked."""
    fig, axes = _figure(1, 2, (11, 4))
    ax_sim, ax_len = axes[0]
    compared = [r for r in rows if "similarity" in r]
    fig.suptitle(f"Old against new, per chunk ({len(compared)} compared)")
    ax_sim.set_xlabel("similarity (rapidfuzz ratio, 1 = identical)")
    ax_sim.set_ylabel("chunks")
    ax_len.set_xlabel("completion tokens, new / old")
    ax_len.set_ylabel("chunks")
    if not compared:
        _no_data(ax_sim, "no chunk summarized on both sides")
        _no_data(ax_len, "no chunk summarized on both sides")
        return fig
    ax_sim.hist([r["similarity"] for r in compared], bins=[i / 20 for i in range(21)], color="tab:blue")
    ax_sim.set_xlim(0, 1.02)
    ratios = [r["length_ratio"] for r in compared if r.get("length_ratio") is not None]
    if ratios:
        ax_len.hist(ratios, bins=20, color="tab:purple")
    if thresholds is not None:
        ax_sim.axvline(
            thresholds.min_similarity_median,
            color="tab:orange",
            ls="--",
            lw=1,
            label=f"median must reach {thresholds.min_similarity_median}",
        )
        ax_sim.axvline(
            thresholds.min_similarity_p10,
            color="tab:red",
            ls=":",
            lw=1,
            label=f"p10 must reach {thresholds.min_similarity_p10}",
        )
        ax_sim.legend(fontsize="x-small", loc="upper left")
        lo, hi = thresholds.length_ratio_range
        ax_len.axvspan(lo, hi, color="tab:green", alpha=0.15, label=f"median allowed in [{lo}, {hi}]")
        ax_len.legend(fontsize="x-small")
    ax_sim.set_title("Similarity", loc="left", fontsize="small")
    ax_len.set_title("Length ratio", loc="left", fontsize="small")
    return fig


def plot_quality(frame):
    """A run's quality at a glance (a review.quality_frame): compression, coverage against density, repetition.

    Flagged summaries are drawn in red, the others in blue, in every panel.
    """
    import numpy as np

    fig, axes = _figure(1, 3, (13, 4))
    ax_comp, ax_cd, ax_rep = axes[0]
    q = frame.attrs.get("quality", {})
    fig.suptitle(
        f"Quality of {len(frame)} summaries: {q.get('flagged', 0)} flagged "
        f"({q.get('flagged_share', 0.0):.0%}), flagged ones in red"
    )
    ax_comp.set_xlabel("compression (summary / chunk tokens)")
    ax_comp.set_ylabel("summaries")
    ax_cd.set_xlabel("coverage (share copied from the chunk)")
    ax_cd.set_ylabel("density (mean copied fragment, tokens)")
    ax_rep.set_xlabel("repeated n-grams (share seen before in it)")
    ax_rep.set_ylabel("summaries")
    if frame.empty:
        for ax in (ax_comp, ax_cd, ax_rep):
            _no_data(ax, "no summaries")
        return fig
    flagged = frame["flagged"].to_numpy(bool)
    groups = [(~flagged, "tab:blue", "not flagged"), (flagged, "tab:red", "flagged")]
    for ax, column, upper in ((ax_comp, "compression", None), (ax_rep, "repeated_ngrams", 1.0)):
        values = frame[column].to_numpy(float)
        bins = np.linspace(0, upper if upper is not None else max(values.max(), 1e-3) * 1.05, 21)
        ax.hist(
            [values[m] for m, _, _ in groups],
            bins=bins,
            stacked=True,
            color=[c for _, c, _ in groups],
            label=[label for _, _, label in groups],
        )
        ax.legend(fontsize="x-small")
    for mask, color, label in groups:
        ax_cd.scatter(frame["coverage"][mask], frame["density"][mask], color=color, s=18, label=label)
    ax_cd.set_xlim(0, 1.02)
    ax_cd.legend(fontsize="x-small")
    ax_comp.set_title("Length", loc="left", fontsize="small")
    ax_cd.set_title("Extractiveness (Grusky et al., 2018)", loc="left", fontsize="small")
    ax_rep.set_title("Repetition", loc="left", fontsize="small")
    return fig
