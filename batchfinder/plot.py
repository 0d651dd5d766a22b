"""PNG plots of searches, estimates and predictions: memory against batch size.

Only this module imports matplotlib, and only when a plot is asked for (``result.plot(path)``,
``estimate.plot(path)``, ``prediction.plot(path)``). It draws with matplotlib's object-oriented API on the Agg
canvas, never through ``pyplot``, so it neither needs a display nor changes the backend of a session that uses
matplotlib itself.

What the plots show:

* a search (:func:`plot_search`): each trial's peak memory against its batch size (fitting trials as green dots,
  out-of-memory trials as open red crosses at the peak they reached before failing), the predicted curve when the
  search was guided, the device's capacity, the largest batch size that fitted and the recommended one
  (``safety`` x the largest). The largest size that fits and the smallest that does not are usually adjacent, so
  their markers land on the same spot: the dots are drawn above the crosses and smaller than them, and the crosses
  are open strokes, so each stays visible;
* estimates (:func:`plot_estimates`): the peak at each batch size stacked by category (parameters, gradients,
  optimizer state, batch, activations), with the capacity and ``safety`` x capacity lines when a capacity is given;
* a prediction (:func:`plot_prediction`): the predicted peak at every batch size the estimator traced that fits,
  the sizes predicted to run out of memory as marks on the capacity line (with what fails above the answer, not a
  peak that would read as a jump in memory), the capacity (and the GPU's memory before the allowance), the
  predicted largest and the recommended batch size. Guided searches draw their predicted peaks the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .units import binary_unit, format_bytes, parse_bytes

if TYPE_CHECKING:  # pragma: no cover - types only: plotting never imports the search engine at run time
    from matplotlib.figure import Figure

    from .memory.estimate import MemoryEstimate
    from .memory.predict import Prediction
    from .result import SearchResult

__all__ = ["plot_search", "search_figure", "plot_estimates", "plot_prediction", "prediction_figure"]

_SIZE = (9.0, 5.5)
_DPI = 100
_COLOURS = {
    "parameters": "#4C72B0",
    "buffers": "#64B5CD",
    "gradients": "#DD8452",
    "optimizer_state": "#8172B3",
    "batch": "#55A868",
    "activations": "#C44E52",
}
# Trial markers of a search plot. A trial that fits is drawn above one that ran out of memory, and smaller: at
# adjacent batch sizes (the largest that fits, the smallest that does not) both stay visible.
FITS_MARKER: dict[str, Any] = {
    "marker": "o",
    "color": "#2CA02C",
    "markersize": 7,
    "markeredgecolor": "white",
    "markeredgewidth": 1.0,
    "zorder": 4,
}
OOM_MARKER: dict[str, Any] = {"marker": "x", "color": "#D62728", "markersize": 12, "markeredgewidth": 2.5, "zorder": 3}
_LABELS = {
    "parameters": "parameters",
    "buffers": "buffers",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "batch": "batch",
    "activations": "activations, temporaries",
}


def _figure() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is an optional dependency
        raise ImportError("plots need matplotlib: pip install 'batchfinder[plot]' (or pip install matplotlib)") from exc
    figure = Figure(figsize=_SIZE, dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.grid(True, which="major", alpha=0.3)
    return figure, axes


def _unit(largest: float) -> tuple[float, str]:
    scale, name = binary_unit(largest)
    return float(scale), name


def _save(figure: Any, path: Any) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write the plot to {path!r}: the directory {directory!r} does not exist")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=_DPI)
    return path


def _dense(points: dict[int, int], scale: float) -> tuple[Any, Any]:
    """The traced points joined linearly *in batch size* (the peak is piecewise linear in it), sampled densely so
    that the line keeps that shape on a logarithmic axis too."""
    import numpy as np

    sizes = np.array(sorted(points), dtype=float)
    values = np.array([points[int(s)] for s in sizes], dtype=float) / scale
    if len(sizes) < 2:
        return sizes, values
    dense = np.unique(np.concatenate([np.geomspace(sizes[0], sizes[-1], 400), sizes]))
    return dense, np.interp(dense, sizes, values)


def _predicted(axes: Any, points: dict[int, int], capacity: int | None, scale: float, **style: Any) -> None:
    """Predicted peaks: a line through the sizes that fit, and the sizes predicted to run out of memory as marks on
    the capacity line. Their reported peak (what a device without a limit would reach, where the caching allocator
    places blocks differently) is left off: it would read as a jump in the model's memory, where the step only
    needs a little more than there is."""
    fitting = {size: peak for size, peak in points.items() if capacity is None or peak <= capacity}
    failing = sorted(size for size in points if size not in fitting)
    if fitting:
        xs, ys = _dense(fitting, scale)
        axes.plot(xs, ys, "-", label="predicted peak", **style)
        axes.plot(sorted(fitting), [fitting[s] / scale for s in sorted(fitting)], ".", color=style.get("color"))
    if failing and capacity is not None:
        axes.plot(failing, [capacity / scale] * len(failing), linestyle="none", marker="x", color="#D62728",
                  markersize=6, label="predicted: runs out of memory (a request exceeds the free memory)")


def _log_x(axes: Any, sizes: Sequence[int]) -> None:
    positive = [s for s in sizes if s > 0]
    if positive and max(positive) / min(positive) > 50:
        axes.set_xscale("log", base=2)


def plot_search(result: SearchResult, path: Any) -> str:
    """Write a PNG of a search to ``path`` (see the module documentation); returns the path."""
    return _save(search_figure(result), path)


def search_figure(result: SearchResult) -> Figure:
    """The figure :func:`plot_search` saves: trials, predicted peaks (guided searches), capacity, largest and
    recommended batch sizes. A matplotlib ``Figure`` on the Agg canvas (no ``pyplot``)."""
    figure, axes = _figure()
    trials = list(result.trials)
    predicted = {int(size): int(peak) for size, peak in result.predicted_peaks.items()}
    drawn = [peak for peak in predicted.values() if not result.capacity_bytes or peak <= result.capacity_bytes]
    values = [t.peak_bytes for t in trials] + [t.peak_reserved_bytes for t in trials] + drawn
    if result.capacity_bytes:
        values.append(result.capacity_bytes)
    scale, unit = _unit(max(values, default=1))
    if any(t.peak_reserved_bytes > t.peak_bytes for t in trials):  # a caching allocator: what it reserved
        ordered = sorted(trials, key=lambda t: t.batch_size)
        axes.plot(
            [t.batch_size for t in ordered],
            [t.peak_reserved_bytes / scale for t in ordered],
            linestyle="none",
            marker="_",
            markersize=12,
            color="#8172B2",
            zorder=2,
            label="trial: peak reserved (allocator segments)",
        )
    if predicted:
        _predicted(axes, predicted, result.capacity_bytes, scale, color="#4C72B0", alpha=0.8)
    fits = [t for t in trials if t.fits]
    fails = [t for t in trials if not t.fits]
    if fits:
        axes.plot(
            [t.batch_size for t in fits], [t.peak_bytes / scale for t in fits], linestyle="none", label="trial: fits", **FITS_MARKER
        )
    if fails:
        axes.plot(
            [t.batch_size for t in fails],
            [t.peak_bytes / scale for t in fails],
            linestyle="none",
            label="trial: out of memory (peak before failing)",
            **OOM_MARKER,
        )
        for trial in fails:
            axes.axvline(trial.batch_size, color="#D62728", alpha=0.25, linewidth=1)
    for index, trial in enumerate(trials if len(trials) <= 12 else [], 1):
        axes.annotate(str(index), (trial.batch_size, trial.peak_bytes / scale), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if result.capacity_bytes:
        axes.axhline(result.capacity_bytes / scale, color="#D62728", linestyle="--", label=f"capacity {format_bytes(result.capacity_bytes)}")
    axes.axvline(result.max_batch_size, color="black", linewidth=1.5, label=f"largest that fits: {result.max_batch_size:,}")
    axes.axvline(
        result.batch_size,
        color="#FF7F0E",
        linestyle="--",
        linewidth=1.5,
        label=f"recommended ({result.safety:g} x largest): {result.batch_size:,}",
    )
    _log_x(axes, [t.batch_size for t in trials] + list(predicted))
    axes.set_xlabel("batch size")
    axes.set_ylabel(f"peak memory ({unit})")
    axes.set_ylim(bottom=0)
    axes.set_title(
        f"batch size search ({result.mode}) on {result.device}: {result.num_trials} trial{'' if result.num_trials == 1 else 's'}, "
        f"{result.num_ooms} out of memory",
        fontsize=11,
    )
    axes.legend(loc="upper left", fontsize=8)
    return figure


def plot_estimates(
    estimates: Sequence[MemoryEstimate], path: Any, *, capacity: int | str | None = None, safety: float = 0.8
) -> str:
    """Write a PNG of estimates to ``path``: the peak at each batch size stacked by category; returns the path."""
    if not estimates:
        raise ValueError("estimates is empty: nothing to plot")
    limit = None if capacity is None else parse_bytes(capacity, argument="capacity")
    figure, axes = _figure()
    ordered = sorted(estimates, key=lambda e: e.batch_size)
    scale, unit = _unit(max([e.peak for e in ordered] + ([limit] if limit else [])))
    positions = list(range(len(ordered)))
    bottoms = [0.0] * len(ordered)
    for key in ("parameters", "buffers", "gradients", "optimizer_state", "batch", "activations"):
        heights = [e.at_peak.get(key, 0) / scale for e in ordered]
        if not any(heights):
            continue
        axes.bar(positions, heights, bottom=bottoms, color=_COLOURS[key], label=_LABELS[key], width=0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for position, est in zip(positions, ordered):
        axes.annotate(format_bytes(est.peak), (position, est.peak / scale), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    if limit:
        axes.axhline(limit / scale, color="#D62728", linestyle="--", label=f"capacity {format_bytes(limit)}")
        axes.axhline(safety * limit / scale, color="#FF7F0E", linestyle=":", label=f"{safety:g} x capacity")
    axes.set_xticks(positions)
    axes.set_xticklabels([f"{e.batch_size:,}" for e in ordered])
    axes.set_xlabel("batch size")
    axes.set_ylabel(f"memory at the peak ({unit})")
    first = ordered[0]
    axes.set_title(f"{first.model}, {first.optimizer}: memory at the peak by category (estimated)", fontsize=11)
    axes.legend(loc="upper left", fontsize=8)
    return _save(figure, path)


def plot_prediction(prediction: Prediction, path: Any) -> str:
    """Write a PNG of a prediction to ``path``: predicted peak against batch size; returns the path."""
    return _save(prediction_figure(prediction), path)


def prediction_figure(prediction: Prediction) -> Figure:
    """The figure :func:`plot_prediction` saves (a matplotlib ``Figure`` on the Agg canvas, no ``pyplot``)."""
    figure, axes = _figure()
    curve = dict(sorted(prediction.curve.items()))
    drawn = [peak for peak in curve.values() if peak <= prediction.capacity_bytes]
    scale, unit = _unit(max(drawn + [prediction.memory_bytes]))
    _predicted(axes, curve, prediction.capacity_bytes, scale, color="#4C72B0")
    if prediction.next_failure is not None:
        axes.annotate(
            f"at {prediction.max_batch_size + 1:,}: {prediction.next_failure}", (0.01, 0.01), xycoords="axes fraction",
            fontsize=7, wrap=True,
        )
    axes.axhline(prediction.capacity_bytes / scale, color="#D62728", linestyle="--", label=f"for tensors: {format_bytes(prediction.capacity_bytes)}")
    if prediction.allowance_bytes:
        axes.axhline(
            prediction.memory_bytes / scale,
            color="#7F7F7F",
            linestyle="-.",
            label=f"GPU memory {format_bytes(prediction.memory_bytes)} (minus context and workspace above)",
        )
    axes.axvline(prediction.max_batch_size, color="black", linewidth=1.5, label=f"largest that fits: {prediction.max_batch_size:,}")
    axes.axvline(
        prediction.batch_size,
        color="#FF7F0E",
        linestyle="--",
        label=f"recommended ({prediction.safety:g} x largest): {prediction.batch_size:,}",
    )
    axes.plot([prediction.max_batch_size], [prediction.peak_bytes / scale], "o", color="black")
    _log_x(axes, list(curve))
    axes.set_ylim(bottom=0)
    axes.set_xlabel("batch size")
    axes.set_ylabel(f"peak memory ({unit})")
    where = prediction.gpu.name if prediction.gpu is not None else format_bytes(prediction.capacity_bytes)
    axes.set_title(f"{prediction.estimate.model}, {prediction.estimate.optimizer}: predicted largest batch size on {where}", fontsize=11)
    axes.legend(loc="upper left", fontsize=8)
    return figure
