"""Watching a run, in pieces: the ETA from the epochs and the progress file, the live view's
lines and its log, the tail's heartbeats, the budget left, `plot` and `logs` as a user runs
them. End to end (a pseudo-terminal, a hung fit): test_watching_e2e.py."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cloudtrain import budget, metrics
from cloudtrain.ledger import InstanceRow
from cloudtrain.liveview import LiveLog, epoch_bar, lines
from cloudtrain.progress import LiveStatus
from cloudtrain.records import Lifecycle, RunState
from cloudtrain.remote.agent import Beat, _BeatReader
from cloudtrain.spec import Budget

CLOUDTRAIN = str(Path(sys.executable).parent / "cloudtrain")


def row(epoch: int, epoch_s: float | None, fit: int = 0) -> dict[str, Any]:
    return {"fit": fit, "epoch": epoch, "epochs": 10, "epoch_s": epoch_s, "logs": {"loss": 1.0 / epoch}}


def fitting(**changes: Any) -> dict[str, Any]:
    state = {"call": "fit", "active": True, "fit": 0, "epochs": 10, "epoch": 4, "done": 3, "step": 25}
    return {**state, "steps": 100, "epoch_elapsed_s": 15.0, **changes}


@pytest.mark.parametrize(
    "rows, progress, eta",
    [
        # the mean of the last 5 epochs, times the epochs left (a quarter of this one done)
        ([row(1, 100.0), row(2, 60.0), row(3, 60.0)], fitting(), round(220 / 3 * 6.75, 1)),
        ([row(e, 10.0 * e) for e in range(1, 8)], fitting(done=7, epoch=8), round(50.0 * 2.75, 1)),
        # another fit's epochs do not count; before an epoch has ended: this epoch's pace
        ([row(1, 999.0, fit=1)], fitting(done=0, epoch=1), 60.0 * 9.75),
        # no steps known: the epoch's time so far against the last epoch's
        ([], fitting(steps=None, epoch_s=60.0), 60.0 * 7 - 15.0),
        ([row(1, 60.0)], fitting(done=10, epoch=10), 0.0),  # the fit has ended
        ([row(1, 60.0)], fitting(active=False), None),  # between Keras calls
        ([row(1, 60.0)], None, None),  # before a hooked call
        ([], fitting(steps=None, done=0), None),  # nothing to go by yet
    ],
)
def test_the_eta(rows: list[dict[str, Any]], progress: dict[str, Any] | None, eta: float | None) -> None:
    assert metrics.eta_s(rows, progress) == eta


def status(**changes: Any) -> LiveStatus:
    values: dict[str, Any] = {
        "run_id": "mnist-cnn-20261206-170000-b7c1",
        "state": RunState.RUNNING,
        "elapsed_s": 725.0,
        "instance": "g4dn.xlarge in us-east-1a, spot $0.1578/h",
        "progress": fitting(epoch=7, epochs=20, step=112, steps=469),
        "metrics": {"accuracy": 0.95, "loss": 0.1234},
        "eta_s": 250.0,
        "spent_usd": 0.0312,
        "projected_usd": 0.0421,
        "budget_left": "$0.9688 left",
    }
    return LiveStatus(**{**values, **changes})


def test_the_live_views_lines() -> None:
    assert lines(status(), since_s=10) == [
        "▸ running mnist-cnn-20261206-170000-b7c1 · 12 min · g4dn.xlarge in us-east-1a, spot $0.1578/h",
        f"  epoch 7/20 {epoch_bar(112, 469)} 112/469 · loss 0.1234, accuracy 0.95",
        "  ETA 4 min · $0.0312 so far · projected $0.0421 · $0.9688 left",
    ]
    assert epoch_bar(112, 469) == "━" * 7 + "─" * 23
    second_fit = fitting(fit=1, call="evaluate", step=3, steps=None)
    assert (
        lines(status(progress=second_fit, metrics={}))[1] == "  fit 1 epoch 4/10 · evaluate step 3"
    )  # as the epoch lines and status count fits
    before = lines(status(progress=None, eta_s=None, projected_usd=None, budget_left=None, idle_s=90.0))
    assert before[1:] == ["  $0.0312 so far · idle 1 min"]


def test_the_live_log_prints_whole_lines_with_bars_at_their_end_and_shows_the_one_being_drawn() -> None:
    screen = io.StringIO()
    view = LiveLog(Console(file=screen, width=100, force_terminal=False))
    view.log(b"Epoch 1/2\n\x1b[1m1/4\x1b[0m [=>...]\x08\x08\r2/4 [==>..]")
    assert screen.getvalue() == "Epoch 1/2\n" and view.pending == "2/4 [==>..]"
    view.log(b"\x08\x08\r4/4 [=====] - loss: 0.5\nEpoch 2/2\nhalf a li")
    assert screen.getvalue() == "Epoch 1/2\n4/4 [=====] - loss: 0.5\nEpoch 2/2\n"
    view.log("ne \u00e9".encode()[:-1])  # a character cut in two
    view.log("ne \u00e9".encode()[-1:] + b"\n")
    view.flush()
    assert screen.getvalue().endswith("Epoch 2/2\nhalf a line \u00e9\n") and view.pending == ""


def test_heartbeats_are_read_from_a_stderr_cut_anywhere(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="cloudtrain.remote.agent")
    got: list[Beat] = []
    reader = _BeatReader(got.append)
    data = (
        json.dumps({"idle_s": 3.5, "progress": {"call": "fit", "epoch": 2}}).encode()
        + b"\nTraceback: something else\n"
        + json.dumps({"idle_s": None, "progress": None}).encode()
        + b"\n"
    )
    for i in range(0, len(data), 7):
        reader.feed(data[i : i + 7])
    assert got == [Beat(3.5, {"call": "fit", "epoch": 2}), Beat(None, None)]
    assert "Traceback: something else" in caplog.text


def test_the_budget_left() -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
    started = now - timedelta(hours=1)
    instance = InstanceRow(
        "i-1", "r", "g4dn.xlarge", "us-east-1a", Lifecycle.SPOT, 0.5, 1.0, started, running_at=started
    )
    assert budget.left(Budget(), started, [instance], now) is None
    assert (
        budget.left(Budget(max_cost_usd=2, max_hours=4), started, [instance], now)
        == "$1.5000 and 3.00 h left"
    )
    assert budget.left(Budget(max_cost_usd=0.1), started, [instance], now) == "$0.0000 left"


def test_a_job_with_a_bad_stall_guard_is_refused_naming_the_key(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    for budget_text, named in (("max_idle_minutes: 0", "max_idle_minutes"), ("on_idle: pause", "on_idle")):
        job.write_text(f"name: j\nrun: python t.py\nbudget:\n  {budget_text}\n")
        done = subprocess.run([CLOUDTRAIN, "plan", str(job), "--dry-run"], capture_output=True, text=True)
        assert done.returncode == 2 and named in done.stderr and str(job) in done.stderr


def test_plot_without_metrics_or_without_matplotlib_exits_2_saying_why(tmp_path: Path) -> None:
    from cloudtrain.ledger import Ledger, RunRow
    from cloudtrain.settings import Settings

    run_dir = tmp_path / "runs" / "r-20261206-120000-abcd"
    run_dir.mkdir(parents=True)
    with Ledger.open(Settings.from_env()) as ledger:
        ledger.create_run(
            RunRow(
                "r-20261206-120000-abcd",
                "r",
                RunState.SUCCEEDED,
                datetime.now(timezone.utc),
                run_dir=str(run_dir),
            )
        )
    done = subprocess.run([CLOUDTRAIN, "plot", "r-2026"], capture_output=True, text=True)
    assert done.returncode == 2 and "has no metrics yet" in done.stderr
    metrics.add(run_dir, json.dumps(row(1, 1.0)).encode())
    blocked = tmp_path / "no-matplotlib"
    (blocked / "matplotlib").mkdir(parents=True)
    (blocked / "matplotlib" / "__init__.py").write_text("raise ImportError('not here')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    done = subprocess.run([CLOUDTRAIN, "plot", "r-2026"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "pip install 'cloudtrain[plot]'" in done.stderr
    assert (run_dir / "metrics.csv").is_file() and not (run_dir / "metrics.png").exists()  # the numbers still
    done = subprocess.run([CLOUDTRAIN, "plot", "r-2026"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(run_dir / "metrics.png")


def test_a_transfer_bar_shows_only_once_a_transfer_has_taken_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloudtrain.liveview import TransferBar

    screen = io.StringIO()
    console = Console(file=screen, width=100, force_terminal=True)
    quick = TransferBar(console, "syncing")
    quick.update(5 << 20, 10 << 20)
    quick.stop()
    assert screen.getvalue() == ""  # under a second: nothing drawn
    slow = TransferBar(console, "pulling back outputs")
    monkeypatch.setattr(slow, "started", slow.started - 2)
    slow.update(3 << 20, None)
    slow.stop()
    assert "pulling back outputs" in screen.getvalue() and "3.1/? MB" in screen.getvalue()


def test_a_step_bar_counts_the_steps_with_the_info_lines_above_and_goes_when_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloudtrain import cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=screen, width=100, force_terminal=True))
    reporter = cli.ConsoleReporter()
    reporter.transfer("uploading the recipe", 1, 2)
    reporter.steps("image recipe", 0, 3)  # a transfer bar would not leave room for it: ended
    assert reporter.bar is None and reporter.step_bar is not None
    reporter.info("recipe: tensorflow: creating a venv")
    reporter.steps("image recipe", 1, 3)
    reporter.step_bar.progress.refresh()
    assert "image recipe" in screen.getvalue() and "1/3 steps" in screen.getvalue()
    assert "recipe: tensorflow: creating a venv" in screen.getvalue()  # printed, the bar kept
    assert reporter.step_bar is not None
    reporter.steps("image recipe", 3, 3)
    assert reporter.step_bar is None  # full: gone
    reporter.steps("creating the image", 0, None)  # the number of steps unknown: time only
    reporter.step_bar.progress.refresh()
    assert "creating the image" in screen.getvalue() and "/? " not in screen.getvalue()
    reporter.stage(RunState.SUCCEEDED, "image build succeeded")
    assert reporter.step_bar is None


def test_status_shows_a_live_runs_progress_with_its_projected_cost(tmp_path: Path) -> None:
    from cloudtrain.ledger import Ledger, RunRow
    from cloudtrain.settings import Settings

    started = datetime.now(timezone.utc) - timedelta(hours=1)
    run_id = "r-20261206-120000-abcd"
    run_dir = tmp_path / "runs" / run_id
    run_dir.mkdir(parents=True)
    with Ledger.open(Settings.from_env()) as ledger:
        ledger.create_run(
            RunRow(run_id, "r", RunState.RUNNING, started, run_dir=str(run_dir), started_at=started)
        )
        ledger.record_instance(
            InstanceRow(
                "i-1",
                run_id,
                "g4dn.xlarge",
                "us-east-1a",
                Lifecycle.SPOT,
                0.5,
                1.0,
                started,
                running_at=started,
            )
        )
    metrics.add(run_dir, b"".join(json.dumps(row(e, 10.0)).encode() + b"\n" for e in (1, 2)))
    record = json.loads(
        subprocess.run([CLOUDTRAIN, "status", run_id, "--json"], capture_output=True, text=True).stdout
    )
    progress = record["progress"]
    assert (progress["epoch"], progress["epochs"], progress["eta_s"]) == (2, 10, 80.0)
    assert progress["projected_usd"] == pytest.approx(0.5 * (3600 + 80) / 3600, abs=0.001)
    assert record["cost_usd"] == pytest.approx(0.5, abs=0.001)
    shown = subprocess.run([CLOUDTRAIN, "status", run_id], capture_output=True, text=True).stdout
    # a moment after the JSON: the bill, and so the projection, has grown a little
    assert re.search(
        r"progress: epoch 2/10: loss 0\.5; ETA 1 min, projected \$0\.51\d\d at this pace", shown
    ), shown
