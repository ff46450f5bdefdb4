"""The run's spending against its `budget:`: the arithmetic (per-second billing with a 60-s
minimum, EBS, relaunches), the cost limit end to end, and the exit codes errors map to."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_cli import cli
from test_run_e2e import cloudtrain, live_instances, only_run, py, sim_image, status, write_job  # noqa: F401
from test_watchdog import STEPS

from cloudtrain import budget
from cloudtrain.errors import (
    BudgetError,
    CloudError,
    ExitCode,
    InputError,
    LedgerError,
    RemoteError,
    SpecError,
    TrainingFailed,
)
from cloudtrain.ledger import InstanceRow
from cloudtrain.records import Lifecycle
from cloudtrain.settings import Settings
from cloudtrain.spec import Budget

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
GP3 = 0.08  # USD per GB-month


def instance(
    name: str,
    price: float,
    running: timedelta | None,
    ended: timedelta | None = None,
    disk_gb: int = 100,
) -> InstanceRow:
    return InstanceRow(
        id=f"i-{name}",
        run_id="r",
        instance_type="g4dn.xlarge",
        zone="us-east-1a",
        lifecycle=Lifecycle.SPOT,
        price_per_hour=price,
        on_demand_per_hour=0.526,
        launched_at=T0,
        disk_gb=disk_gb,
        ebs_per_gb_month=GP3,
        running_at=None if running is None else T0 + running,
        terminated_at=None if ended is None else T0 + ended,
    )


def ebs(hours: float, disk_gb: int = 100) -> float:
    return hours / 730.0 * disk_gb * GP3


def test_per_second_billing_with_a_60_s_minimum_and_the_volume() -> None:
    short = instance("a", 0.36, timedelta(0), timedelta(seconds=20))  # billed 60 s
    assert budget.spent_usd([short], T0 + timedelta(hours=9)) == pytest.approx(0.36 / 60 + ebs(1 / 60))
    live = instance("b", 0.36, timedelta(0))  # still running: billed up to now
    assert budget.spent_usd([live], T0 + timedelta(minutes=30)) == pytest.approx(0.18 + ebs(0.5))
    never = instance("c", 0.36, None)  # launched, never running: nothing
    assert budget.spent_usd([never], T0 + timedelta(hours=1)) == 0.0


def test_spending_sums_every_instance_of_a_relaunched_run() -> None:
    first = instance("first", 0.20, timedelta(0), timedelta(hours=1))  # taken away after an hour
    second = instance("second", 0.30, timedelta(hours=1, minutes=2), disk_gb=50)  # the relaunch
    now = T0 + timedelta(hours=1, minutes=32)
    expected = 0.20 + ebs(1.0) + 0.30 * 0.5 + ebs(0.5, 50)
    assert budget.spent_usd([first, second], now) == pytest.approx(expected)


def test_the_cost_limit_is_reached_at_the_cent_and_named() -> None:
    run = [instance("a", 0.30, timedelta(0), timedelta(hours=1), disk_gb=0)]  # exactly $0.30
    now = T0 + timedelta(hours=2)
    assert budget.breach(Budget(max_cost_usd=0.31), T0, run, now) is None
    reason = budget.breach(Budget(max_cost_usd=0.30), T0, run, now)
    assert reason == "budget.max_cost_usd reached: $0.3000 spent of $0.3"
    # the cost limit is checked before the hours, and either alone stops the run
    both = budget.breach(Budget(max_cost_usd=0.30, max_hours=1.0), T0, run, now)
    assert both is not None and both.startswith("budget.max_cost_usd")
    assert budget.breach(Budget(max_hours=1.0), T0, run, now) == (
        "budget.max_hours reached: 2.000 h of 1 h since the run started"
    )
    assert budget.describe(Budget(max_cost_usd=5.0, max_hours=4.0), T0, run, now) == (
        "so far: $0.3000, 2.00 h (budget: $5, 4 h)"
    )


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TrainingFailed("the training failed"), 1),
        (InputError("bad input"), 2),
        (SpecError("job.yaml:1: bad"), 2),
        (LedgerError("the ledger is damaged"), 2),
        (CloudError("AWS said no"), 3),
        (RemoteError("ssh broke"), 3),
        (BudgetError("budget.max_cost_usd reached"), 4),
        (RuntimeError("a bug"), 70),
        (KeyboardInterrupt(), 130),
    ],
)
def test_each_error_maps_to_its_exit_code_at_the_cli(
    monkeypatch: pytest.MonkeyPatch, error: BaseException, code: int
) -> None:
    def fail(*_: object, **__: object) -> None:
        raise error

    monkeypatch.setattr("cloudtrain.api.run_status", fail)
    result = cli("status")
    assert result.exit_code == code, result.output
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 70, 130, 141, 143]


def test_a_cost_budget_stops_a_long_run_with_exit_4(
    sim_image: Path, tmp_path: Path, settings: Settings
) -> None:
    # The simulated spot price of a T4 is $0.1578/h: the 60-s minimum alone is $0.0026, over
    # the limit as soon as the instance runs.
    job = write_job(tmp_path / "job", py(STEPS.format(n=600)), extra="budget: {max_cost_usd: 0.002}\n")
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(tmp_path / "runs"))
    assert done.returncode == 4, done.stderr
    assert "budget.max_cost_usd reached: $0.00" in done.stderr and "spent of $0.002" in done.stderr
    run_dir = only_run(tmp_path / "runs")
    record = status(run_dir.name)
    assert record["state"] == "failed" and any(e["kind"] == "budget" for e in record["events"])
    assert 0.002 <= record["cost_usd"] < 0.01
    assert live_instances(settings, run_dir.name) == []
    log = (run_dir / "logs" / "train.log").read_text()
    assert "step 1\n" in log and "\nfinished\n" not in log  # stopped well before its 2 minutes
