"""A run's metrics at home: the series merged across instances, metrics.csv, progress."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from cloudtrain import metrics


def line(fit: int, epoch: int, epochs: int, loss: float | None, epoch_s: float = 10.0, **more: Any) -> bytes:
    row = {"fit": fit, "epoch": epoch, "epochs": epochs, "epoch_s": epoch_s, "at": "2026-12-06T12:00:00Z"}
    return (json.dumps({**row, "logs": {"loss": loss, **more}}) + "\n").encode()


def test_a_relaunched_run_continues_one_series_and_a_retrained_epoch_replaces_its_row(tmp_path: Path) -> None:
    first = line(0, 1, 4, 0.9) + line(0, 2, 4, 0.7, accuracy=0.5)
    assert [r["epoch"] for r in metrics.add(tmp_path, first)] == [1, 2]
    # the second instance restored epoch 1, trained epoch 2 again, then 3; a cut line is skipped
    second = line(0, 2, 4, 0.65, accuracy=0.6) + b'{"fit": 0, "epo\n' + line(0, 3, 4, 0.5, accuracy=0.7)
    assert [r["epoch"] for r in metrics.add(tmp_path, second)] == [3]  # new to the series: printed once
    rows = metrics.series(tmp_path)
    assert [(r["epoch"], r["logs"]["loss"]) for r in rows] == [(1, 0.9), (2, 0.65), (3, 0.5)]
    assert metrics.add(tmp_path, first) == []  # attach fetches everything again: nothing new


def test_a_restored_line_fills_a_gap_and_never_replaces_a_trained_epoch(tmp_path: Path) -> None:
    metrics.add(tmp_path, line(0, 1, 3, 0.9, 5.0))  # epoch 2's line was lost with its instance
    replay = [json.loads(line(0, n, 3, loss, None)) for n, loss in ((1, 0.9), (2, 0.7))]  # type: ignore[arg-type]
    data = b"".join(json.dumps(dict(row, restored=True)).encode() + b"\n" for row in replay)
    assert [r["epoch"] for r in metrics.add(tmp_path, data)] == [2]
    assert [(r["epoch"], r["epoch_s"]) for r in metrics.series(tmp_path)] == [(1, 5.0), (2, None)]


def test_metrics_csv_has_a_row_per_epoch_per_fit_and_a_column_per_metric(tmp_path: Path) -> None:
    metrics.add(
        tmp_path, line(0, 1, 2, 0.9) + line(0, 2, 2, None, val_loss=1.0) + line(1, 1, 1, 0.4, accuracy=0.8)
    )
    path = metrics.write_csv(tmp_path)
    assert path == tmp_path / "metrics.csv"
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["fit", "epoch", "epochs", "epoch_s", "at", "loss", "val_loss", "accuracy"]
    assert [row[:2] + row[5:] for row in table[1:]] == [
        ["0", "1", "0.9", "", ""],
        ["0", "2", "", "1.0", ""],  # a NaN loss (null in the file): an empty cell
        ["1", "1", "0.4", "", "0.8"],
    ]


def test_no_metrics_no_csv(tmp_path: Path) -> None:
    assert metrics.write_csv(tmp_path) is None and not (tmp_path / "metrics.csv").exists()
    assert metrics.progress(metrics.series(tmp_path), finished=False) is None


def test_progress_and_its_eta_from_the_fits_recent_epochs(tmp_path: Path) -> None:
    durations = [100.0, 12.0, 12.0, 10.0, 8.0, 8.0]  # the first (compiling) falls out of the last 5
    metrics.add(tmp_path, b"".join(line(0, n + 1, 20, 1.0 / (n + 1), s) for n, s in enumerate(durations)))
    progress = metrics.progress(metrics.series(tmp_path), finished=False)
    assert progress == {"fit": 0, "epoch": 6, "epochs": 20, "metrics": {"loss": 1.0 / 6}, "eta_s": 14 * 10.0}
    assert metrics.progress(metrics.series(tmp_path), finished=True)["eta_s"] is None  # type: ignore[index]


def test_the_line_per_epoch() -> None:
    (row,) = metrics._rows(line(0, 3, 20, 0.123456, 12.34, accuracy=0.95))
    row["logs"] = {"accuracy": 0.95, "val_loss": 0.2, "loss": 0.123456}  # Keras 3's order
    assert metrics.summary(row) == "epoch 3/20: loss 0.1235, accuracy 0.95, val_loss 0.2 (12.3 s)"
    (row,) = metrics._rows(line(2, 1, 1, None, 1.0))
    assert metrics.summary(row) == "fit 2 epoch 1/1: loss - (1.0 s)"
