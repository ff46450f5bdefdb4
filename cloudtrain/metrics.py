"""A run's metrics: the epochs its trainer finished, and what is made of them.

The job's `fit` hook (agent/checkpoint.py) appends one JSON line per finished epoch to the
instance's run folder: ``{fit, epoch, epochs, epoch_s, at, logs}``, and a resumed fit
first writes its restored epochs' lines again from the checkpoint (``restored``: true,
``epoch_s``: null), so epochs whose lines were lost with an instance stay in the series.
The controller brings the new lines home as the log streams and appends them to the run
folder's ``metrics.jsonl``; instances of a relaunched run add to the same file. Read back, the
series has one row per (fit, epoch), the last trained winning (an epoch trained again
after a relaunch replaces the one lost; a restored line only fills a gap). From it:
``metrics.csv`` (one row per epoch per fit, every metric a column), the ``progress`` that
`status` shows, and the line per epoch that `run` prints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
ETA_EPOCHS = 5  # the ETA is the mean of the fit's last epochs, times the epochs left
Row = dict[str, Any]


def _rows(data: bytes) -> list[Row]:
    rows = []
    for line in data.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a full disk, say: the rest still counts
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and isinstance(row.get("logs"), dict):
            rows.append(row)
    return rows


def series(run_dir: Path) -> list[Row]:
    """The run's epochs in order, one row per (fit, epoch)."""
    try:
        data = (run_dir / METRICS_FILE).read_bytes()
    except OSError:
        return []
    latest: dict[tuple[int, int], Row] = {}
    for row in _rows(data):
        key = (row.get("fit", 0), row["epoch"])
        if not (row.get("restored") and key in latest):  # a replay never replaces the epoch it replays
            latest[key] = row
    return [latest[key] for key in sorted(latest)]


def add(run_dir: Path, data: bytes) -> list[Row]:
    """Append lines brought home to the run's metrics; the rows of epochs new to it."""
    if not data:
        return []
    known = {(row.get("fit", 0), row["epoch"]) for row in series(run_dir)}
    with open(run_dir / METRICS_FILE, "ab") as f:
        f.write(data if data.endswith(b"\n") else data + b"\n")
    return [row for row in _rows(data) if (row.get("fit", 0), row["epoch"]) not in known]


def write_csv(run_dir: Path) -> Path | None:
    """``metrics.csv`` from the series (None when there is none): fit, epoch, epochs, epoch_s,
    at, then each metric (loss first, the others as they first appear)."""
    import csv  # here: `status` and `--help` import this module, and never write a csv

    rows = series(run_dir)
    if not rows:
        return None
    names: dict[str, None] = {"loss": None} if any("loss" in row["logs"] for row in rows) else {}
    for row in rows:
        names.update(dict.fromkeys(row["logs"]))
    path = run_dir / CSV_FILE
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["fit", "epoch", "epochs", "epoch_s", "at", *names])
        for row in rows:
            fixed = [row.get("fit", 0), row["epoch"], row.get("epochs"), row.get("epoch_s"), row.get("at")]
            writer.writerow(fixed + [_blank_if_none(row["logs"].get(name)) for name in names])
    return path


def _blank_if_none(value: Any) -> Any:
    return "" if value is None else value


def progress(rows: list[Row], *, finished: bool) -> dict[str, Any] | None:
    """Where the training stands: the last epoch's ``fit``, ``epoch``, ``epochs`` and
    ``metrics``, and ``eta_s``, the seconds its fit has left at the pace of its last epochs
    (None once the run has ended, or before an epoch has)."""
    if not rows:
        return None
    last = rows[-1]
    fit, epoch, epochs = last.get("fit", 0), last["epoch"], last.get("epochs")
    eta_s = None
    if not finished and isinstance(epochs, int):
        recent = [
            r["epoch_s"]
            for r in rows
            if r.get("fit", 0) == fit and isinstance(r.get("epoch_s"), (int, float))
        ]
        if recent:
            recent = recent[-ETA_EPOCHS:]
            eta_s = round(max(0, epochs - epoch) * sum(recent) / len(recent), 1)
    return {"fit": fit, "epoch": epoch, "epochs": epochs, "metrics": dict(last["logs"]), "eta_s": eta_s}


def eta_s(rows: list[Row], beat: Mapping[str, Any] | None) -> float | None:
    """Seconds the running fit has left, from its progress.json (``beat``): the epochs left,
    the current one in part (its steps done, else its time so far), at the mean of the fit's
    last ETA_EPOCHS epochs (before one has finished: the current epoch's pace). None when
    no fit runs or its pace is unknown yet."""
    if not beat or not beat.get("active"):
        return None
    fit, epochs, done = beat.get("fit"), beat.get("epochs"), beat.get("done")
    if not (isinstance(fit, int) and isinstance(epochs, int) and isinstance(done, int)):
        return None
    if done >= epochs:
        return 0.0
    elapsed = _number(beat.get("epoch_elapsed_s")) or 0.0
    step, steps = beat.get("step"), beat.get("steps")
    fraction = None
    if beat.get("call") == "fit" and isinstance(step, int) and isinstance(steps, int) and steps > 0:
        fraction = min(step / steps, 1.0)
    recent = [s for r in rows if r.get("fit", 0) == fit and (s := _number(r.get("epoch_s"))) is not None]
    if recent:
        per_epoch = sum(recent[-ETA_EPOCHS:]) / len(recent[-ETA_EPOCHS:])
    elif (last := _number(beat.get("epoch_s"))) is not None:
        per_epoch = last
    elif fraction:
        per_epoch = elapsed / fraction
    else:
        return None
    if fraction is None:
        fraction = min(elapsed / per_epoch, 0.99) if per_epoch > 0 else 0.0
    return round(max(0.0, per_epoch * (epochs - done - fraction)), 1)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def describe(metrics: Mapping[str, Any]) -> str:
    """``loss 0.1234, accuracy 0.95``: loss first, the rest as given; four significant digits."""
    ordered = sorted(metrics.items(), key=lambda item: item[0] != "loss")  # a stable sort
    return ", ".join(
        f"{name} {value:.4g}" if isinstance(value, float) else f"{name} -" for name, value in ordered
    )


def summary(row: Row) -> str:
    """The line `run` prints for a finished epoch: ``epoch 3/20: loss 0.1234, ... (12.3 s)``."""
    fit = f"fit {row['fit']} " if row.get("fit") else ""
    took = f" ({row['epoch_s']:.1f} s)" if isinstance(row.get("epoch_s"), (int, float)) else ""
    return f"{fit}epoch {row['epoch']}/{row.get('epochs', '?')}: {describe(row['logs'])}{took}"
