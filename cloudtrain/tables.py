"""Tables that fit the terminal (`status`, `cost-report`, `plan`): whole run ids, columns
dropped before anything is cut; and the times and durations they show, as people read them.

Each column is as wide as its widest cell. When a row is wider than the console, the
droppable columns go first, the least useful first (the highest ``drop``); if it is still
too wide, the foldable column (a run id) wraps onto more lines, never cut. Nothing else is
ever cut: an absurdly narrow console gets lines longer than it, not ``…``.

Drawing is string work (a few ms for 50 rows; rich's Table measured and padded every cell
as a renderable, 0.04 to 0.06 s, which was most of `cost-report`'s start-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from rich.text import Text

GAP = "  "
MIN_FOLD = 8  # a folded column is never narrower than this
RULE = "─"


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # numbers: right-justified
    drop: int = 0  # 0: always shown; else dropped when narrow, the highest first
    fold: bool = False  # wraps onto more lines when dropping was not enough


@dataclass(frozen=True)
class Row:
    cells: Sequence[str]
    style: str | None = None


def fit(columns: Sequence[Column], rows: Sequence[Row], width: int) -> tuple[list[int], list[int]]:
    """The columns shown (their indexes) and the width of each, for a console ``width`` wide."""
    natural = [max([len(c.header), *(len(r.cells[k]) for r in rows)]) for k, c in enumerate(columns)]
    shown = list(range(len(columns)))

    def total() -> int:
        return sum(natural[k] for k in shown) + len(GAP) * (len(shown) - 1)

    for k in sorted((k for k, c in enumerate(columns) if c.drop), key=lambda k: -columns[k].drop):
        if total() <= width:
            break
        shown.remove(k)
    widths = [natural[k] for k in shown]
    folding = [i for i, k in enumerate(shown) if columns[k].fold]
    if total() > width and folding:
        i = folding[0]
        widths[i] = max(MIN_FOLD, min(widths[i], width - (total() - widths[i])))
    return shown, widths


def folded(text: str, width: int) -> list[str]:
    """``text`` in pieces of at most ``width``, broken after a '-' or a space where one is near."""
    pieces = []
    while len(text) > width:
        cut = max(text.rfind("-", 0, width), text.rfind(" ", 0, width)) + 1
        cut = cut if cut > width // 2 else width
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return [*pieces, text]


def render(columns: Sequence[Column], rows: Sequence[Row], width: int) -> Text:
    """The table as styled text: the header (bold), a rule, then the rows, each line at most
    ``width`` wide whenever dropping and folding can make it so."""
    shown, widths = fit(columns, rows, width)
    text = Text()

    def line(cells: Sequence[str], style: str | None) -> None:
        stacked = [
            folded(cells[k], w) if columns[k].fold else [cells[k]] for k, w in zip(shown, widths, strict=True)
        ]
        for n in range(max(map(len, stacked))):
            parts = []
            for k, w, lines in zip(shown, widths, stacked, strict=True):
                cell = lines[n] if n < len(lines) else ""
                parts.append(cell.rjust(w) if columns[k].right else cell.ljust(w))
            text.append(GAP.join(parts).rstrip(), style=style)
            text.append("\n")

    line([c.header for c in columns], "bold")
    text.append(RULE * (sum(widths) + len(GAP) * (len(widths) - 1)) + "\n")
    for row in rows:
        line(row.cells, row.style)
    text.rstrip()
    return text


def ago(when: datetime, now: datetime) -> str:
    """``45 s ago``, ``12 min ago``, ``5 h ago``; the date after two days."""
    seconds = (now - when).total_seconds()
    if seconds < 0:
        return when.strftime("%Y-%m-%d %H:%M")
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f"{seconds // 3600:.0f} h ago"
    return when.strftime("%Y-%m-%d")


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``1 h 05 min``, ``3 d 04 h``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"
