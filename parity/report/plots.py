"""Plots for report.html, drawn by matplotlib as inline SVG from a report document's numbers.

Figures are built with `matplotlib.figure.Figure` (no pyplot state, no GUI backend) and saved
as SVG with text kept as text; the XML prologue and metadata are dropped so the SVG can sit
inside HTML. Each function returns one ``<svg>`` string.
"""

from __future__ import annotations

import base64
import io
import math
import re
from typing import Any

import numpy as np

__all__ = ["error_distribution", "sorted_errors", "sorted_cosines", "pixel_thumbnails", "matrix_heatmap",
           "cause_effects", "choice_pareto"]

_RC = {"svg.fonttype": "none", "svg.hashsalt": "parity", "font.size": 8, "axes.titlesize": 9,
       "font.family": "sans-serif", "axes.spines.top": False, "axes.spines.right": False,
       # A fixed title height: placing titles automatically measures every tick label again.
       "axes.titley": 1.02}
_PASS, _FAIL, _SKIP, _BAR = "#2e7d32", "#c62828", "#9e9e9e", "#1565c0"
# Bars with sample names: more would not be legible at this size.
_NAMED = 25
_VERDICT_COLOR = {"PASS": _PASS, "DRIFT": _FAIL, "FAIL": _FAIL, "SKIP": _SKIP}


def _figure(width: float, height: float, *, left: float = 0.6, right: float = 0.15, bottom: float = 0.45,
            top: float = 0.3, wspace: float = 0.3):
    """A figure with fixed margins in inches: a layout engine would cost more than every plot's drawing."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                           wspace=wspace)
    return figure


def _log(ax, which: str) -> None:
    """Log scale with plain ``1e-05`` decade labels: mathtext labels dominate the drawing time."""
    from matplotlib.ticker import LogFormatter, LogLocator, NullLocator

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(LogLocator(base=10, numticks=6))
    axis.set_major_formatter(LogFormatter(labelOnlyBase=True))
    # Minor ticks are tick objects too, dozens per decade; decades are enough to read an error.
    axis.set_minor_locator(NullLocator())


def _svg(figure) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context(_RC):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)


def _errors(samples: list[dict[str, Any]]) -> np.ndarray:
    # JSON null is an infinite or NaN error; plot it at the top of the scale rather than drop it.
    values = np.array([s["max_abs"] if s["max_abs"] is not None else np.nan for s in samples], dtype=float)
    top = np.nanmax(values) if np.isfinite(values).any() else 1.0
    return np.where(np.isfinite(values), values, top * 10 if top > 0 else 1.0)


def error_distribution(stage: str, comparison: dict[str, Any]) -> str:
    """Histogram of per-sample max abs error on a log axis, with the atol budget line."""
    import matplotlib

    values = _errors(comparison["samples"])
    atol = comparison["tolerance"]["atol"]
    exact = int((values == 0).sum())
    positive = values[values > 0]
    with matplotlib.rc_context(_RC):
        figure = _figure(4.2, 2.4)
        ax = figure.add_subplot()
        if positive.size:
            low = min(positive.min(), atol) / 2
            high = max(positive.max(), atol) * 2
            bins = np.geomspace(low, high, 30)
            ax.hist(positive, bins=bins, color=_BAR)
            _log(ax, "x")
        ax.axvline(atol, color=_FAIL, linestyle="--", linewidth=1, label=f"budget atol {atol:.2g}")
        ax.set_xlabel("per-sample max abs error")
        ax.set_ylabel("samples")
        ax.set_title(f"{stage}: {len(values)} samples" + (f", {exact} bit-exact" if exact else ""), loc="left")
        ax.legend(frameon=False)
        return _svg(figure)


def sorted_errors(stage: str, comparison: dict[str, Any], total: int) -> str:
    """Per-sample max abs error sorted: the whole curve, and the worst samples by name with their cosine."""
    import matplotlib

    samples = comparison["samples"]
    values = _errors(samples)
    order = np.argsort(-values, kind="stable")
    atol = comparison["tolerance"]["atol"]
    named = order[:_NAMED]
    with matplotlib.rc_context(_RC):
        width, height = 7.6, max(2.4, 0.16 * len(named) + 0.8)
        figure = _figure(width, height)
        # Inches: the curve on the left, the named bars on the right with room for names and cosines.
        box = (0.45 / height, 1 - 0.75 / height)
        curve = figure.add_axes((0.8 / width, box[0], 2.3 / width, box[1]))
        bars = figure.add_axes((5.3 / width, box[0], 2.15 / width, box[1]))
        curve.plot(np.arange(1, len(values) + 1), values[order], color=_BAR, linewidth=1.2)
        curve.axhline(atol, color=_FAIL, linestyle="--", linewidth=1, label=f"atol {atol:.2g}")
        if (values > 0).any():
            _log(curve, "y")
        curve.set_xlabel("sample rank (worst first)")
        curve.set_ylabel("max abs error")
        shown = f"{len(values)} of {total}" if total > len(values) else f"{len(values)}"
        curve.set_title(f"{stage}: {shown} samples, sorted", loc="left")
        curve.legend(frameon=False)
        positions = np.arange(len(named))[::-1]
        bars.barh(positions, values[named], color=[_FAIL if values[i] > atol else _PASS for i in named])
        labels = []
        for i in named:
            cosine = samples[i].get("cosine")
            labels.append(samples[i]["name"] + ("" if cosine is None else f"  cos {cosine:.6f}"))
        bars.set_yticks(positions, labels, fontsize=7)
        bars.axvline(atol, color=_FAIL, linestyle="--", linewidth=1)
        if (values[named] > 0).any():
            _log(bars, "x")
        bars.set_xlabel("max abs error")
        bars.set_title(f"worst {len(named)} of {total} by name", loc="left")
        return _svg(figure)


def sorted_cosines(stage: str, comparison: dict[str, Any]) -> str:
    """Per-sample cosine gap (1 - cosine) sorted, with the floor from the tolerance."""
    import matplotlib

    cosines = np.array([s["cosine"] if s.get("cosine") is not None else np.nan for s in comparison["samples"]])
    gap = np.sort(np.nan_to_num(1.0 - cosines, nan=2.0))[::-1]
    floor = comparison["tolerance"].get("min_cosine")
    with matplotlib.rc_context(_RC):
        figure = _figure(4.2, 2.4)
        ax = figure.add_subplot()
        ax.plot(np.arange(1, len(gap) + 1), gap, color=_BAR, linewidth=1.2)
        if floor is not None:
            ax.axhline(1.0 - floor, color=_FAIL, linestyle="--", linewidth=1, label=f"budget cos >= {floor:.8g}")
            ax.legend(frameon=False)
        if (gap > 0).any():
            _log(ax, "y")
        ax.set_xlabel("sample rank (worst first)")
        ax.set_ylabel("1 - cosine")
        ax.set_title(f"{stage}: cosine to the reference, sorted", loc="left")
        return _svg(figure)


def _decode(text: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(shape)


def pixel_thumbnails(thumbnail: dict[str, Any]) -> str:
    """The worst golden image: reference, candidate, and the absolute-difference heat map."""
    import matplotlib

    h, w = thumbnail["height"], thumbnail["width"]
    peak = thumbnail["difference_max"]
    with matplotlib.rc_context(_RC):
        figure = _figure(7.6, 2.6, left=0.1, bottom=0.1, top=0.5, wspace=0.1)
        axes = figure.subplots(1, 3)
        for ax, key, title in zip(axes[:2], ("reference", "candidate"), ("reference (fixture)", "candidate")):
            ax.imshow(_decode(thumbnail[key], (h, w, 3)), interpolation="nearest")
            ax.set_title(title, loc="left")
        # Levels are 0..255 of difference_max: the colour bar reads in normalized pixel units.
        heat = axes[2].imshow(_decode(thumbnail["difference"], (h, w)), cmap="inferno", vmin=0, vmax=255,
                              extent=(0, w, h, 0), interpolation="nearest")
        bar = figure.colorbar(heat, ax=axes[2], shrink=0.85)
        bar.set_ticks([0, 127.5, 255], labels=[f"{0:.2g}", f"{peak / 2:.2g}", f"{peak:.2g}"])
        axes[2].set_title("|candidate - reference|", loc="left")
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        figure.suptitle(f"worst golden image: {thumbnail['name']}", x=0.01, ha="left", fontsize=9)
        return _svg(figure)


def matrix_heatmap(cells: list[dict[str, Any]]) -> str:
    """One row per cell: max abs error and cosine gap as colour (log scale), the number and the verdict."""
    import matplotlib
    import matplotlib.ticker
    from matplotlib.colors import LogNorm

    values = np.full((len(cells), 2), np.nan)
    words = [["-", "-"] for _ in cells]
    for row, cell in enumerate(cells):
        c = cell.get("comparison")
        if c and c["candidate_shape"] != c["reference_shape"]:
            words[row] = ["shape", "shape"]
        elif c:
            values[row, 0] = c["max_abs"] if c["max_abs"] is not None else np.nan
            values[row, 1] = 1.0 - c["min_cosine"] if c.get("min_cosine") is not None else np.nan
            words[row] = ["-" if math.isnan(v) else "0" if v == 0 else f"{v:.2g}" for v in values[row]]
    shown = np.where(values > 0, values, np.nan)
    finite = shown[np.isfinite(shown)]
    norm = LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 10)) if finite.size else None
    labels = [f"{c['cell']['id']} ({c['role']})" for c in cells]
    # Inches: names on the left (about 0.055 in per character at 7 pt), two columns, verdicts, colour bar.
    left = 0.3 + 0.055 * max(map(len, labels))
    width, height = left + 4.2, 0.22 * len(cells) + 0.8
    with matplotlib.rc_context(_RC):
        figure = _figure(width, height)
        ax = figure.add_axes((left / width, 0.1 / height, 2.0 / width, 1 - 0.6 / height))
        image = ax.imshow(shown, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        for row in range(len(cells)):
            for col in range(2):
                ax.text(col, row, words[row][col], ha="center", va="center", fontsize=7,
                        color="white" if math.isfinite(shown[row, col]) else "black")
        ax.set_xticks([0, 1], ["max abs", "1 - min cos"])
        ax.xaxis.tick_top()
        ax.set_yticks(range(len(cells)), labels, fontsize=7)
        for label, cell in zip(ax.get_yticklabels(), cells):
            label.set_color(_VERDICT_COLOR[cell["verdict"]])
        verdicts = ax.secondary_yaxis("right")
        verdicts.set_yticks(range(len(cells)), [c["verdict"] for c in cells], fontsize=7)
        for label, cell in zip(verdicts.get_yticklabels(), cells):
            label.set_color(_VERDICT_COLOR[cell["verdict"]])
        if norm is not None:
            bar_height = min(3.0, height - 0.9)
            cax = figure.add_axes(((left + 2.9) / width, (height - 0.5 - bar_height) / height, 0.15 / width,
                                   bar_height / height))
            figure.colorbar(image, cax=cax, label="error (log)")
            cax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=True))
            cax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        return _svg(figure)


def cause_effects(causes: list[dict[str, Any]]) -> str:
    """Each ranked cause: the error before and after applying its change (log scale)."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        figure = _figure(7.6, 0.45 * len(causes) + 1.2, left=3.4, top=0.35)
        ax = figure.add_subplot()
        positions = np.arange(len(causes))[::-1]
        before = [c["before"] for c in causes]
        after = [c["after"] for c in causes]
        ax.barh(positions + 0.2, before, height=0.4, color=_FAIL, label="before (the spec as is)")
        ax.barh(positions - 0.2, after, height=0.4, color=_PASS, label="after the change")
        ax.set_yticks(positions, [f"{i}. {c['toml']} ({c['stage']} {c['metric']})"
                                  for i, c in enumerate(causes, start=1)], fontsize=7)
        if min(before + after) > 0:
            _log(ax, "x")
        ax.set_xlabel("error on the probe samples")
        ax.legend(frameon=False, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2)
        return _svg(figure)


def _short_labels(ids: list[str]) -> list[str]:
    """Cell ids without the ``-`` parts every cell shares (``pre_logits-bicubic-pil-cpu-float32-bs8`` -> ``float32-bs8``)."""
    parts = [cell_id.split("-") for cell_id in ids]
    common = set.intersection(*map(set, parts)) if parts else set()
    return ["-".join(p for p in split if p not in common) or cell_id for split, cell_id in zip(parts, ids)]


def _spread(positions: list[float], gap: float, low: float, high: float) -> list[float]:
    """Label heights (inches) as near ``positions`` as they can be, at least ``gap`` apart, within [low, high]."""
    order = sorted(range(len(positions)), key=lambda i: -positions[i])
    placed: dict[int, float] = {}
    previous = high + gap
    for i in order:  # top down: each label at its point's height, or just under the one above
        previous = placed[i] = min(positions[i], previous - gap)
    overflow = low - min(placed.values(), default=low)
    if overflow > 0:  # pushed below the bottom: move the whole stack up (it fits: the figure is sized for it)
        placed = {i: min(y + overflow, high - gap * rank) for rank, (i, y) in enumerate(
            sorted(placed.items(), key=lambda item: -item[1]))}
    return [placed[i] for i in range(len(positions))]


def choice_pareto(rows: list[dict[str, Any]], chosen: dict[str, str | None], budget_ms: float | None = None) -> str:
    """`parity choose`: per-image latency p50 (x) against max abs (y, log) per cell; passing and failing cells
    marked apart, the Pareto front's cells ringed (the front is over flip-rate bound too) and joined where
    they bound what they dominate on the two drawn measures, the chosen cell of each device named.

    Each cell's label sits in a column right of the plot, joined to its point by a thin line: cells of
    one dtype often share their max abs and differ little in latency, so labels beside the points overlap.
    """
    import matplotlib

    shown = [r for r in rows if r.get("max_abs") is not None and math.isfinite(r["max_abs"])]
    short = _short_labels([r["cell"] for r in shown])
    latency = np.array([r["p50_ms"] for r in shown], dtype=float)
    error = np.array([r["max_abs"] for r in shown], dtype=float)
    positive = error[error > 0]
    # A bit-exact cell (max abs 0) has no place on a log axis: it sits on the floor, labelled as exact.
    floor = positive.min() / 10 if positive.size else 1e-8
    y = np.where(error > 0, error, floor)
    winners = {cell_id: device for device, cell_id in chosen.items() if cell_id is not None}
    labels = []
    for i, r in enumerate(shown):
        text = short[i] + (" (exact)" if error[i] == 0 else "") + (" *" if r.get("pareto") else "")
        labels.append(f"chosen on {winners[r['cell']]}: {text}" if r["cell"] in winners else text)
    # Inches: the axes, then the label column sized for the longest label (about 0.055 in per character at 7 pt).
    missing = len(rows) - len(shown)  # a shape mismatch or a non-finite output has no max abs to draw
    title = f"{len(shown)} deployment cells that ran: latency against error" + (
        f" ({missing} without a finite max abs not drawn)" if missing else "")
    gap, left = 0.15, 0.75
    column = 0.35 + 0.056 * max(map(len, labels), default=10)
    column = max(column, left + 0.07 * len(title) - 4.6)  # room for the title too (about 0.07 in per character at 9 pt)
    plot_height = max(2.6, gap * len(shown) + 0.2)
    width, height, bottom, top = 4.6 + column, plot_height + 1.05, 0.5, 0.55
    with matplotlib.rc_context(_RC):
        figure = _figure(width, height, left=left, right=column, bottom=bottom, top=top)
        ax = figure.add_subplot()
        passing = np.array([r["verdict"] == "PASS" for r in shown], dtype=bool)
        front = sorted((i for i, r in enumerate(shown) if r.get("pareto")), key=lambda i: (latency[i], y[i]))
        if front:
            # The front is over latency, flip-rate bound and max abs; the staircase (what the cells drawn here
            # dominate) joins the front's cells that no other beats on the two drawn measures alone.
            stairs = [i for i in front if not any(latency[j] <= latency[i] and y[j] <= y[i]
                                                  and (latency[j], y[j]) != (latency[i], y[i]) for j in front)]
            ax.plot(latency[stairs], y[stairs], color=_BAR, linewidth=1.2, drawstyle="steps-post", zorder=2)
            ax.plot(latency[front], y[front], color=_BAR, linestyle="none", marker="o", markersize=10,
                    markerfacecolor="none", markeredgewidth=1.0, label="Pareto front (*)", zorder=2)
        if passing.any():
            ax.scatter(latency[passing], y[passing], s=30, color=_PASS, marker="o", label="passes", zorder=3)
        if (~passing).any():
            ax.scatter(latency[~passing], y[~passing], s=40, color=_FAIL, marker="x", linewidths=1.6,
                       label="fails", zorder=3)
        picked = [i for i, r in enumerate(shown) if r["cell"] in winners]
        if picked:
            ax.scatter(latency[picked], y[picked], s=220, facecolors="none", edgecolors="black", linewidths=1.4,
                       label="chosen", zorder=4)
        if budget_ms is not None:
            ax.axvline(budget_ms, color=_SKIP, linestyle="--", linewidth=1, label=f"budget {budget_ms:g} ms")
        if latency.size and latency.min() > 0 and latency.max() / latency.min() > 30:  # else linear reads better
            _log(ax, "x")
            ax.set_xlim(latency.min() / 1.6, latency.max() * 1.6)
        else:
            ax.set_xlim(0, latency.max() * 1.15 if latency.size else 1)
        if y.size:
            _log(ax, "y")
            ax.set_ylim(y.min() / 3, y.max() * 3)
        ax.set_xlabel("latency per image, p50 (ms)")
        ax.set_ylabel("max abs vs the reference")
        figure.suptitle(title, x=left / width, y=1 - 0.08 / height, ha="left", va="top", fontsize=9)
        if shown:
            ax.legend(frameon=False, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=5, fontsize=7,
                      handletextpad=0.3, columnspacing=1.0, borderaxespad=0.2)
        # Each label at its point's height in the column, spread apart; a thin line joins them.
        inches = figure.dpi_scale_trans.inverted()
        points = [inches.transform(ax.transData.transform((latency[i], y[i]))) for i in range(len(shown))]
        heights = _spread([p[1] for p in points], gap, bottom + 0.05, height - top)
        x_text = width - column + 0.3
        for i, (point, at) in enumerate(zip(points, heights)):
            ax.annotate(labels[i], xy=(latency[i], y[i]), xycoords="data", xytext=(x_text, at),
                        textcoords=figure.dpi_scale_trans, fontsize=7, va="center", ha="left",
                        fontweight="bold" if shown[i]["cell"] in winners else "normal",
                        color=_PASS if passing[i] else _FAIL, annotation_clip=False,
                        arrowprops={"arrowstyle": "-", "color": "#bbbbbb", "linewidth": 0.6,
                                    "shrinkA": 1, "shrinkB": 4})
        return _svg(figure)
