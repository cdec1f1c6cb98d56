"""The plots of ``recipes/evaluate.py``'s report: matplotlib figures drawn on an Agg canvas (no
pyplot, no global backend switch), saved as PNG files of exactly the requested pixel size.
Split out of :mod:`mgf_sb.report` (tables, ranks, verdict), which re-exports these names.
"""

import math

import numpy as np

# Tab10, the matplotlib default cycle: series i gets PALETTE[i % 10] in every plot.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
DPI = 100


def _number(v):
    """A float, or None for a missing, boolean, non-numeric or NaN value (as :mod:`mgf_sb.report`'s)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg canvas)
# ----------------------------------------------------------------------------------------------
def _figure(size):
    """A matplotlib Figure of ``size`` = (width, height) pixels on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, h = (int(s) for s in size)
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    fig.savefig(path, dpi=DPI, format="png")
    return path


def loss_curves_size(n_panels):
    """Default (width, height) in pixels of :func:`loss_curves_png`: 300 px per panel, 320 high."""
    return 300 * max(int(n_panels), 1) + 40, 320


def loss_curves_png(path, panels, title="", size=None):
    """One panel per curve group (e.g. each scale's loss), side by side, own y range each.

    Arguments
    ---------
    path : str
        Output PNG.
    panels : dict
        panel title -> {series name -> (xs, ys)}; e.g. ``{"frame": {"train": ([1, 2], [0.9, 0.7])}}``.
        A series keeps its colour (``PALETTE``, by first appearance) in every panel.
    title : str
    size : (int, int), optional
        Pixels; default :func:`loss_curves_size`.
    """
    names = []
    for series in panels.values():
        names += [n for n in series if n not in names]
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    fig = _figure(size or loss_curves_size(len(panels)))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (ptitle, series) in zip(axes, panels.items()):
        ax.set_title(ptitle)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        drawn = False
        for name, (xs, ys) in series.items():
            pts = [(float(x), float(y)) for x, y in zip(xs, ys) if _number(y) is not None and math.isfinite(float(y))]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=5, linewidth=2, color=colors[name], label=name)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("loss")
    if names:
        axes[0].legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def bar_chart_size(n_groups, n_series):
    """Default (width, height) in pixels of :func:`bar_chart_png`."""
    return max(560, 120 + int(n_groups) * (max(int(n_series), 1) * 28 + 24)), 440


def bar_chart_png(path, groups, series, errors=None, title="", ylabel="", size=None, lower_better=None):
    """Grouped bars with value labels and error bars.

    One group per column (e.g. a task metric under one head), one bar per series (e.g.
    an upstream). Each bar is labelled with its value; a series' ``errors`` (a std) are
    drawn as error bars. A missing value leaves a gap labelled ``n/a``. With
    ``lower_better`` (one bool per group) holding both kinds, the higher-is-better groups
    and the lower-is-better ones (EER, WER) get an axis each, side by side, so that
    neither scale squeezes the other.

    Arguments
    ---------
    path : str
    groups : list of str
        Group labels (x axis; ``"\\n"`` breaks a label).
    series : dict
        series name -> list of values (one per group; None = missing).
    errors : dict, optional
        series name -> list of stds (None = no error bar).
    title, ylabel : str
    size : (int, int), optional
        Pixels; default :func:`bar_chart_size`.
    lower_better : list of bool, optional
        Per group: lower is better (its own axis when both kinds are present).
    """
    errors = errors or {}
    names = list(series)
    n = max(len(names), 1)

    def padded(values):
        values = list(values or [])
        return [_number(v) for v in values + [None] * (len(groups) - len(values))][:len(groups)]

    vals = {name: padded(series[name]) for name in names}
    errs = {name: padded(errors.get(name)) for name in names}
    lower = list(lower_better or [False] * len(groups))
    parts = [[i for i in range(len(groups)) if not lower[i]], [i for i in range(len(groups)) if lower[i]]]
    parts = [p for p in parts if p] if all(parts) else [list(range(len(groups)))]
    fig = _figure(size or bar_chart_size(len(groups), n))
    axes = fig.subplots(1, len(parts), squeeze=False, width_ratios=[len(p) for p in parts])[0]
    rotate = n * len(groups) > 12
    for ax, idx in zip(axes, parts):
        width = 0.8 / n
        x = np.arange(len(idx), dtype=float)
        for i, name in enumerate(names):
            v = [vals[name][j] for j in idx]
            e = [errs[name][j] for j in idx]
            pos = x - 0.4 + width * (i + 0.5)
            heights = [y if y is not None else 0.0 for y in v]
            yerr = [d if (d is not None and y is not None) else np.nan for y, d in zip(v, e)]
            has_err = any(np.isfinite(yerr))
            bars = ax.bar(pos, heights, width * 0.92, color=PALETTE[i % len(PALETTE)],
                          label=name if ax is axes[0] else None,
                          yerr=yerr if has_err else None, capsize=3, error_kw={"elinewidth": 1, "ecolor": "black"})
            labels = ["n/a" if y is None else (f"{y:.1f}" if d is None else f"{y:.1f}±{d:.1f}") for y, d in zip(v, e)]
            ax.bar_label(bars, labels=labels, fontsize=7, rotation=90 if rotate else 0, padding=2)
        ax.set_xticks(x)
        ax.set_xticklabels([groups[j] for j in idx], fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.margins(y=0.25 if rotate else 0.12)
        direction = ("" if len(parts) == 1 else
                     " (lower is better)" if lower[idx[0]] else " (higher is better)")
        if ylabel or direction:
            ax.set_ylabel((ylabel or "") + direction)
        ax.set_axisbelow(True)
        ax.grid(True, axis="y", alpha=0.3)
    if names:  # beside the axes, so that it never hides a bar or its label
        fig.legend(fontsize=8, loc="outside right upper")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def layer_weights_size(n_probes, n_layers):
    """Default (width, height) in pixels of :func:`layer_weights_png`."""
    return max(480, 220 + 56 * int(n_layers)), max(240, 110 + 34 * int(n_probes))


def layer_weights_png(path, weights, title="", size=None):
    """Heat map of the layer weights each probe learned (SUPERB's weighted sum).

    Rows: probes (e.g. ``"timit / linear"``), columns: encoder layers (0 = input
    embedding); each cell shows its weight. Rows may have different lengths (missing
    cells are blank).

    Arguments
    ---------
    path : str
    weights : dict
        probe name -> list of softmax weights over the layers (each row sums to 1).
    title : str
    size : (int, int), optional
        Pixels; default :func:`layer_weights_size`.
    """
    names = list(weights)
    n_layers = max((len(w) for w in weights.values()), default=0)
    grid = np.full((max(len(names), 1), max(n_layers, 1)), np.nan)
    for i, name in enumerate(names):
        grid[i, :len(weights[name])] = [float(v) for v in weights[name]]
    fig = _figure(size or layer_weights_size(len(names), n_layers))
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(np.nanmax(grid)) if names else 1.0, 1e-6))
    for i in range(len(names)):
        for j in range(n_layers):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < 0.6 * np.nanmax(grid) else "black")
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer (0 = input embedding)")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    fig.colorbar(im, ax=ax, label="weight")
    if title:
        ax.set_title(title)
    return _save(fig, path)
