"""A run's metrics.png: the panels, the lines per fit, the file, and matplotlib as an extra."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from cloudtrain import metrics, plot

KERAS: dict[str, Any] = {"loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.75}


def line(fit: int, epoch: int, epochs: int = 3, **logs: Any) -> bytes:
    row = {"fit": fit, "epoch": epoch, "epochs": epochs, "epoch_s": 1.2, "at": "2026-12-06T10:00:00Z"}
    return (json.dumps({**row, "logs": logs}) + "\n").encode()


def run(tmp_path: Path, *lines: bytes) -> Path:
    run_dir = tmp_path / "job-20261206-100000-a1b2"
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics.add(run_dir, b"".join(lines))
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which follows the 8-byte signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def lines(ax: Any) -> list[list[tuple[float, float]]]:
    """The points of each line drawn in a panel."""
    return [
        [(float(x), float(y)) for x, y in zip(ln.get_xdata(), ln.get_ydata(), strict=True)]
        for ln in ax.get_lines()
    ]


def legends(rows: list[metrics.Row]) -> list[list[str]]:
    fig = plot._figure(rows, "run")
    return [[str(ln.get_label()) for ln in ax.get_lines()] for ax in fig.axes]


def test_loss_comes_first_and_a_val_metric_shares_its_twins_panel(tmp_path: Path) -> None:
    logs: dict[str, Any] = {
        "accuracy": 0.8,
        "loss": 0.5,
        "val_accuracy": 0.75,
        "val_loss": 0.6,
        "val_auc": 0.9,
        "lr": 0.01,
    }
    rows = metrics.series(run(tmp_path, line(0, 1, **logs)))
    assert plot.panels(rows) == [
        ("loss", ["loss", "val_loss"]),
        ("accuracy", ["accuracy", "val_accuracy"]),
        ("val_auc", ["val_auc"]),  # no auc: a panel of its own
        ("lr", ["lr"]),
    ]


def test_panels_follow_first_appearance_across_epochs_and_fits(tmp_path: Path) -> None:
    # a val metric seen before its twin still shares the twin's panel, in the val metric's place
    rows = metrics.series(
        run(
            tmp_path,
            line(0, 1, loss=0.9, val_precision=0.4),
            line(0, 2, loss=0.8, precision=0.5, val_precision=0.45),
            line(1, 1, loss=0.7, learning_rate=0.001),
        )
    )
    assert plot.panels(rows) == [
        ("loss", ["loss"]),
        ("precision", ["precision", "val_precision"]),
        ("learning_rate", ["learning_rate"]),
    ]
    assert plot.panels([]) == []
    assert plot.panels([{"epoch": 1, "logs": {"accuracy": 0.5, "val_loss": 0.9}}])[0] == (
        "val_loss",
        ["val_loss"],
    )


def test_each_fit_is_a_line_of_its_own_labelled_with_its_fit(tmp_path: Path) -> None:
    one = metrics.series(run(tmp_path, line(0, 1, **KERAS), line(0, 2, **KERAS)))
    assert legends(one) == [["loss", "val_loss"], ["accuracy", "val_accuracy"]]  # one fit: no label
    two = metrics.series(run(tmp_path, line(1, 1, epochs=1, loss=0.4, val_loss=0.5)))
    assert legends(two) == [
        ["loss (fit 0)", "val_loss (fit 0)", "loss (fit 1)", "val_loss (fit 1)"],
        ["accuracy (fit 0)", "val_accuracy (fit 0)"],  # fit 1 had no accuracy: no empty line
    ]


def test_none_nan_and_a_metric_missing_in_some_epochs_are_skipped(tmp_path: Path) -> None:
    run_dir = run(
        tmp_path,
        line(0, 1, loss=0.9, accuracy=0.5),
        line(0, 2, loss=None, val_loss=None),  # no accuracy this epoch; val_loss never has a value
        line(0, 3, loss=float("nan"), accuracy=0.7),
        line(0, 4, loss=0.6, accuracy=0.8),
    )
    fig = plot._figure(metrics.series(run_dir), "run")
    loss_ax, accuracy_ax = fig.axes
    assert lines(loss_ax) == [[(1, 0.9), (4, 0.6)]]
    assert lines(accuracy_ax) == [[(1, 0.5), (3, 0.7), (4, 0.8)]]
    fig.canvas.draw()
    assert all(tick == int(tick) for tick in accuracy_ax.get_xticks())  # whole epochs only
    assert plot.write_png(run_dir) == run_dir / plot.PNG_FILE


def test_the_png_is_a_png_and_grows_a_panel_height_per_panel(tmp_path: Path) -> None:
    run_dir = run(tmp_path, line(0, 1, val_auc=0.9, **KERAS), line(0, 2, val_auc=0.95, **KERAS))
    path = plot.write_png(run_dir)
    assert path == run_dir / plot.PNG_FILE
    width = plot.WIDTH_IN * plot.DPI
    assert png_size(path) == (width, 3 * plot.PANEL_IN * plot.DPI)  # loss, accuracy, val_auc

    single = run(tmp_path / "single", line(0, 1, loss=0.5))
    assert png_size(plot.write_png(single) or Path()) == (width, plot.PANEL_IN * plot.DPI)


def test_out_is_where_the_png_goes(tmp_path: Path) -> None:
    run_dir = run(tmp_path, line(0, 1, **KERAS))
    out = tmp_path / "elsewhere.png"
    assert plot.write_png(run_dir, out) == out
    assert png_size(out)[1] == 2 * plot.PANEL_IN * plot.DPI
    assert not (run_dir / plot.PNG_FILE).exists()


def test_no_epochs_no_png(tmp_path: Path) -> None:
    assert plot.write_png(tmp_path) is None  # no metrics.jsonl at all
    (tmp_path / metrics.METRICS_FILE).write_bytes(b'{"fit": 0, "epo\n')  # only a cut line
    assert plot.write_png(tmp_path) is None
    assert list(tmp_path.iterdir()) == [tmp_path / metrics.METRICS_FILE]


def python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_module_leaves_matplotlib_alone_and_drawing_never_touches_pyplot(
    tmp_path: Path,
) -> None:
    run_dir = run(tmp_path, line(0, 1, **KERAS))
    code = (
        "import sys; from pathlib import Path; import cloudtrain.plot as plot\n"
        "print('matplotlib' in sys.modules)\n"
        "plot.write_png(Path(sys.argv[1]))\n"
        "print('matplotlib' in sys.modules, 'matplotlib.pyplot' in sys.modules)\n"
    )
    assert python(code, str(run_dir)).splitlines() == ["False", "True False"]


def test_without_matplotlib_the_error_names_the_extra(tmp_path: Path) -> None:
    run_dir = run(tmp_path, line(0, 1, **KERAS))
    code = (
        "import sys; from pathlib import Path\n"
        "sys.modules['matplotlib'] = None  # as if it were not installed\n"
        "from cloudtrain import plot; from cloudtrain.errors import InputError, ExitCode\n"
        "try:\n"
        "    plot.write_png(Path(sys.argv[1]))\n"
        "except InputError as e:\n"
        "    print(e.exit_code == ExitCode.INVALID_INPUT); print(e.message); print(e.hint)\n"
    )
    ok, message, hint = python(code, str(run_dir)).splitlines()
    assert ok == "True" and message == "plotting needs matplotlib, which is not installed"
    assert "pip install 'cloudtrain[plot]'" in hint and "metrics.csv" in hint
    assert not (run_dir / plot.PNG_FILE).exists()
