"""A run's ``metrics.png``: its metrics series (cloudtrain.metrics) drawn, one panel per metric.

matplotlib is an extra (``cloudtrain[plot]``), imported only when a picture is drawn, and
only through its object API (a Figure on an Agg canvas, no pyplot): no global backend is
chosen for a program that imports cloudtrain.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from cloudtrain import metrics
from cloudtrain.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PNG_FILE = "metrics.png"
VAL = "val_"
WIDTH_IN = 8  # the figure: this wide, PANEL_IN tall per panel, at DPI dots per inch
PANEL_IN = 3
DPI = 100


def panels(rows: list[metrics.Row]) -> list[tuple[str, list[str]]]:
    """The figure's layout: (title, metric names) per panel, top to bottom. A metric shares its
    panel with its ``val_`` twin (train first); a ``val_`` metric without one has its own;
    loss comes first, the others as they first appear in the series."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row["logs"]))
    groups: dict[str, list[str]] = {}  # panel title -> its metrics; where either first appeared
    for name in names:
        base = name[len(VAL) :] if name.startswith(VAL) and name[len(VAL) :] in names else name
        groups.setdefault(base, [])
    for base in groups:
        groups[base] = [name for name in (base, VAL + base) if name in names]
    order = sorted(groups, key=lambda base: base not in ("loss", VAL + "loss"))  # stable: loss first
    return [(base, groups[base]) for base in order]


def write_png(run_dir: Path, out: Path | None = None) -> Path | None:
    """Draw the run's metrics to ``out`` (default: ``metrics.png`` in the run folder); the path
    written, or None when the run has no epochs yet."""
    rows = metrics.series(run_dir)
    if not rows:
        return None
    path = out or run_dir / PNG_FILE
    _figure(rows, run_dir.name).savefig(path, format="png", dpi=DPI)
    return path


def _figure(rows: list[metrics.Row], title: str) -> Figure:
    """The figure of `panels`, on an Agg canvas of its own: each fit a line per metric, in a
    colour of its own (a ``val_`` metric dashed, in its twin's colour)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise InputError(
            "plotting needs matplotlib, which "
            + ("is not installed" if isinstance(e, ModuleNotFoundError) else f"failed to import: {e}"),
            hint="install it with: pip install 'cloudtrain[plot]' (metrics.csv has the numbers meanwhile)",
        ) from e

    layout = panels(rows)
    fits = sorted({row.get("fit", 0) for row in rows})
    fig = Figure(figsize=(WIDTH_IN, PANEL_IN * len(layout)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    axes = fig.subplots(len(layout), 1, squeeze=False)[:, 0]
    for ax, (panel, names) in zip(axes, layout, strict=True):
        for colour, fit in enumerate(fits):
            for name in names:
                drawn = [r for r in rows if r.get("fit", 0) == fit and _is_number(r["logs"].get(name))]
                if drawn:
                    ax.plot(
                        [r["epoch"] for r in drawn],
                        [r["logs"][name] for r in drawn],
                        "--" if name.startswith(VAL) and name != panel else "-",
                        color=f"C{colour % 10}",
                        marker="o",
                        markersize=3,
                        label=name if len(fits) == 1 else f"{name} (fit {fit})",
                    )
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.set_ylabel(panel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig


def _is_number(value: object) -> bool:
    """A value to draw: a finite int or float (not None, a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
