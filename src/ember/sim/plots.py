"""Plots of one scenario's run: the latency CDF, cost against attainment, and tier occupancy over time.

``series_of`` keeps what the plots need from a ``RunResult`` (a downsampled latency CDF and the
occupancy samples) so a caller need not hold every latency of every set; ``write_plots`` draws
three PNGs into a folder::

    latency_cdf.png          served requests' latency CDF per policy set (log x), whole and tail, SLOs marked
    cost_vs_attainment.png   GPU-seconds over always-on's against SLO attainment, one point per set
    occupancy.png            devices held, instances hot or loading, warm copies, over time, per set

matplotlib is an optional extra (``pip install 'ember-serve[plots]'``); it is imported here, lazily,
with the non-interactive Agg backend, so importing ``ember`` never pays for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ember.errors import InvalidInput
from ember.sim.engine import RunResult
from ember.sim.report import PolicyReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PLOT_FILES", "SWEEP_FILE", "RunSeries", "prepare_plots_dir", "series_of", "write_plots", "write_sweep_plot"]

PLOT_FILES = ("latency_cdf.png", "cost_vs_attainment.png", "occupancy.png")
#: Evenly spaced CDF levels, plus this many more spaced geometrically into the tail (1 - 10^-k).
CDF_POINTS, TAIL_POINTS = 1000, 300
#: Beyond this many occupancy samples, runs of consecutive ones are merged into one that keeps each
#: column's maximum, so short peaks stay visible (a day at 10 s ticks is 8,640 samples; a figure is 1,440 px wide).
MAX_OCCUPANCY_POINTS = 2_000
_DPI = 120
_OCCUPANCY_ROWS = (("devices held", 3), ("instances hot or loading", 1), ("warm copies in host memory", 2))

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class _Style:
    """How one policy set's lines look, the same in every figure; sets that overlap stay visible."""

    color: str
    linestyle: str
    linewidth: float

    def plot(self, ax: Axes, x: Floats, y: Floats, label: str | None = None, steps: bool = False) -> None:
        ax.plot(x, y, color=self.color, linestyle=self.linestyle, linewidth=self.linewidth, label=label,
                drawstyle="steps-post" if steps else "default")  # fmt: skip


_Styles = dict[str, _Style]


@dataclass(frozen=True)
class RunSeries:
    """What the plots draw of one policy set's run."""

    policy_set: str
    #: Served requests, and the CDF at ``latency_ms``: the fraction of them served within it.
    served: int
    latency_ms: Floats
    cdf: Floats
    #: Columns: time (s), instances hot or loading, warm copies in host memory, devices held.
    occupancy: Floats


def series_of(result: RunResult) -> RunSeries:
    """The latency CDF at ~1,300 quantiles (dense in the tail); at most ``MAX_OCCUPANCY_POINTS`` occupancy rows."""
    lat = np.sort(np.asarray(result.latencies_s, dtype=np.float64)) * 1000
    n = len(lat)
    if n:
        levels = np.linspace(0.0, 1.0, CDF_POINTS + 1)
        if n > 10:
            levels = np.union1d(levels, 1 - np.logspace(-1, -math.log10(n), TAIL_POINTS))
        idx = np.unique(np.clip(np.ceil(levels * n).astype(np.int64) - 1, 0, n - 1))
        latency_ms, cdf = lat[idx], (idx + 0.5) / n  # Hazen plotting positions: never 0 or 1 (the logit axis)
    else:
        latency_ms = cdf = np.empty(0)
    occupancy = np.asarray(result.occupancy, dtype=np.float64).reshape(-1, 4)
    if len(occupancy) > MAX_OCCUPANCY_POINTS:
        starts = np.arange(0, len(occupancy), math.ceil(len(occupancy) / MAX_OCCUPANCY_POINTS))
        peaks = np.maximum.reduceat(occupancy[:, 1:], starts, axis=0)
        occupancy = np.column_stack([occupancy[starts, 0], peaks])
    return RunSeries(result.policy_set, n, latency_ms, cdf, occupancy)


def prepare_plots_dir(directory: Path) -> None:
    """Check that plots can be written into ``directory`` (creating it): before a long run, not after.

    Raises ``InvalidInput`` naming the extra to install when matplotlib is missing, or saying why the
    folder cannot be made.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidInput(
            "plots need matplotlib, which is not installed: pip install 'ember-serve[plots]' (or just matplotlib)"
        ) from None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot create the plots folder {directory}: {exc.strerror}; give another one") from None


def write_plots(
    directory: Path,
    scenario: str,
    reports: Sequence[PolicyReport],
    series: Sequence[RunSeries],
    slos_ms: Sequence[float] = (),
) -> list[Path]:
    """Write ``PLOT_FILES`` into ``directory`` (created if missing); return their paths in that order.

    ``reports`` and ``series`` hold one entry per policy set, matched by name; ``slos_ms`` are the
    scenario's SLOs, marked on the latency CDF.
    """
    prepare_plots_dir(directory)
    styles = _styles([r.policy_set for r in reports] + [s.policy_set for s in series])
    figures = (
        _latency_cdf(scenario, series, sorted(set(slos_ms)), styles),
        _cost_vs_attainment(scenario, reports, styles),
        _occupancy(scenario, series, styles),
    )
    paths = [directory / name for name in PLOT_FILES]
    for fig, path in zip(figures, paths, strict=True):
        fig.savefig(path, dpi=_DPI)
    return paths


def _figure(width_in: float, height_in: float) -> Figure:
    # The object API with the Agg canvas: no pyplot, no global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _styles(names: Sequence[str]) -> _Styles:
    dashes = ["-", "--", "-.", ":"]
    return {
        name: _Style(f"C{i % 10}", dashes[i % len(dashes)], 2.4 - 0.3 * (i % len(dashes)))
        for i, name in enumerate(dict.fromkeys(names))
    }


def _latency_cdf(scenario: str, series: Sequence[RunSeries], slos_ms: list[float], styles: _Styles) -> Figure:
    fig = _figure(12, 5.5)
    whole, tail = fig.subplots(1, 2)
    most = 0
    for s in series:
        if not s.served:
            continue
        most = max(most, s.served)
        p99 = float(np.interp(0.99, s.cdf, s.latency_ms))
        label = f"{s.policy_set} ({s.served:,} served, p99 {p99:,.0f} ms)"
        x = np.maximum(s.latency_ms, 1e-3)  # a log axis has no zero
        styles[s.policy_set].plot(whole, x, s.cdf, label)
        styles[s.policy_set].plot(tail, x, s.cdf)
    for ax in (whole, tail):
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        for slo in slos_ms:
            ax.axvline(slo, color="0.3", linestyle="--", linewidth=1)
            ax.text(slo, 0.02, f" SLO {slo:g} ms", transform=ax.get_xaxis_transform(), rotation=90, va="bottom",
                    fontsize=8, color="0.3")  # fmt: skip
    whole.set_ylim(0, 1)
    whole.set_ylabel("fraction of served requests within latency")
    whole.set_title("whole distribution")
    # The tail on a logit axis from the median up, ticked 50%, 90%, 99%, ... as far as the data reaches.
    tail.set_yscale("logit")
    nines = [1 - 10.0**-k for k in range(1, 1 + max(1, int(math.log10(max(most, 10)))))]
    ticks = [0.5, *nines]
    tail.set_yticks(ticks, [f"{100 * t:.{max(0, k - 2)}f}%" for k, t in enumerate(ticks)])
    tail.set_yticks([], minor=True)
    tail.set_ylim(0.5, 1 - 0.5 / max(most, 2))
    tail.set_ylabel("fraction of served requests within latency (logit scale)")
    tail.set_title("tail, from the median")
    if most:
        fig.legend(loc="outside lower center", ncols=min(4, len(series)), fontsize=8)
    missing = [s.policy_set for s in series if not s.served]
    note = f" (no request served: {', '.join(missing)})" if missing else ""
    fig.suptitle(f"{scenario}: latency of served requests (refused ones are left out){note}")
    return fig


def _cost_vs_attainment(scenario: str, reports: Sequence[PolicyReport], styles: _Styles) -> Figure:
    fig = _figure(8, 5.5)
    ax = fig.subplots()
    relative = all(r.gpu_seconds_vs_always_on is not None for r in reports)
    for r in reports:
        cost = r.gpu_seconds_vs_always_on if r.gpu_seconds_vs_always_on is not None else r.gpu_seconds
        attained = 100 * r.slo_attainment
        ax.scatter([cost], [attained], s=60, color=styles[r.policy_set].color, zorder=3)
        shown = f"{cost:.2f}x" if relative else f"{cost:,.0f} GPU-s"
        # \\$: a dollar, not mathtext
        billed = f"\\${r.usd:,.2f} (host memory \\${r.host_memory_usd:,.2f}, pinned \\${r.pinned_memory_usd:,.2f})"
        ax.annotate(f"{r.policy_set}\n{attained:.2f}% at {shown}\n{billed}", (cost, attained), xytext=(8, -4),
                    textcoords="offset points", fontsize=9, va="top")  # fmt: skip
    if relative:
        ax.axvline(1.0, color="0.3", linestyle=":", linewidth=1)
        ax.set_xlabel("GPU-seconds relative to always-on (dotted: always-on's; lower is cheaper)")
        ax.set_xlim(0, max([1.2] + [1.3 * (r.gpu_seconds_vs_always_on or 0) for r in reports]))
    else:
        ax.set_xlabel("GPU-seconds (always-on did not run)")
        ax.set_xlim(0, 1.3 * max([r.gpu_seconds for r in reports] + [1.0]))
    low = min([100 * r.slo_attainment for r in reports] + [100.0])
    ax.set_ylim(max(0.0, low - 0.1 * (100 - low) - 1), 100.5)
    ax.set_ylabel("SLO attainment (% of all requests, refused ones count as missed)")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{scenario}: cost against SLO attainment (up and left is better)")
    return fig


def _occupancy(scenario: str, series: Sequence[RunSeries], styles: _Styles) -> Figure:
    fig = _figure(12, 8)
    axes: Sequence[Axes] = fig.subplots(len(_OCCUPANCY_ROWS), 1, sharex=True)
    span_s = max((float(s.occupancy[-1, 0]) for s in series if len(s.occupancy)), default=0.0)
    unit, per = ("h", 3600.0) if span_s >= 3 * 3600 else ("min", 60.0) if span_s >= 180 else ("s", 1.0)
    for ax, (title, column) in zip(axes, _OCCUPANCY_ROWS, strict=True):
        for s in series:
            if len(s.occupancy):
                label = s.policy_set if column == 3 else None  # one legend entry per set
                styles[s.policy_set].plot(ax, s.occupancy[:, 0] / per, s.occupancy[:, column], label, steps=True)
        ax.set_ylabel(title, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    if any(len(s.occupancy) for s in series):
        fig.legend(loc="outside lower center", ncols=len(series), fontsize=9)
    axes[-1].set_xlabel(f"simulated time ({unit}), sampled at each control tick")
    fig.suptitle(f"{scenario}: tier occupancy over time")
    return fig


SWEEP_FILE = "cost_sweep.png"


def write_sweep_plot(directory: Path, scenario: str, reports: dict[float, list[PolicyReport]]) -> Path:
    """Dollars per million requests (log scale) against SLO attainment, one curve per policy set
    through its rates (each point labelled with its rate); written as ``SWEEP_FILE`` in ``directory``."""
    prepare_plots_dir(directory)
    names = [r.policy_set for rows in reports.values() for r in rows]
    styles = _styles(names)
    fig = _figure(9, 6)
    ax = fig.subplots()
    for name in dict.fromkeys(names):
        points = [(rate, r) for rate, rows in reports.items() for r in rows if r.policy_set == name]
        x = np.array([100 * r.slo_attainment for _, r in points])
        y = np.array([r.usd_per_million_requests for _, r in points])
        styles[name].plot(ax, x, y, label=name)
        ax.scatter(x, y, s=30, color=styles[name].color, zorder=3)
        for (rate, _), xi, yi in zip(points, x, y, strict=True):
            ax.annotate(f"{rate:g}/s", (xi, yi), xytext=(5, 3), textcoords="offset points", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("SLO attainment (% of all requests, refused ones count as missed)")
    ax.set_ylabel("dollars per million requests (log scale; devices held and host memory)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"{scenario}: cost against attainment over total request rates (down and right is better)")
    path = directory / SWEEP_FILE
    fig.savefig(path, dpi=_DPI)
    return path
