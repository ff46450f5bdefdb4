"""Cost-report numbers on a seeded ledger, checked against hand-computed values."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

import pytest

from cloudtrain.errors import InputError
from cloudtrain.ledger import InstanceRow, Ledger, RunRow
from cloudtrain.records import Lifecycle, RunState
from cloudtrain.report import CostReport, CostRow, cost_report, export, to_csv, to_json

REPO = Path(__file__).resolve().parents[1]
UTC = timezone.utc
NOW = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC)
EBS_HOURS = 730 * 3600  # seconds in AWS's EBS month


def t(day: int, hh: int, mm: int = 0, ss: int = 0, month: int = 3) -> datetime:
    return datetime(2026, month, day, hh, mm, ss, tzinfo=UTC)


A = "alpha-20260301-100000-aaaa"  # real, one spot instance, 2 h, with EBS
S = "sim-20260301-110000-5555"  # simulated (dry run), 30 min, with EBS
B = "beta-20260302-080000-bbbb"  # real, interrupted after 30 s and relaunched on demand
C = "gamma-20260302-150000-cccc"  # real, its instance never reached running
D = "delta-20260310-090000-dddd"  # real, still running at NOW
E = "empty-20260220-120000-eeee"  # real, planned, no instance yet

# hand-computed expectations (seconds, $ paid, $ on demand, $ EBS)
A_COST, A_OD, A_EBS = 2 * 0.2, 2 * 1.0 * 0.5, 100 * 0.08 * 7200 / EBS_HOURS
S_COST, S_OD, S_EBS = 0.5 * 0.15, 0.5 * 0.5, 50 * 0.1 * 1800 / EBS_HOURS
B1_COST, B1_OD = 60 / 3600 * 0.25, 60 / 3600 * 0.5  # 30 s billed as the 60 s minimum
B2_COST, B2_OD = 1.5 * 1.0, 1.5 * 1.0  # 90 min on demand
D_COST, D_OD = 1.5 * 0.3, 1.5 * 0.5  # 10:30 to NOW (12:00)
REAL_SECONDS = 7200 + 60 + 5400 + 0 + 5400
REAL_COST = A_COST + B1_COST + B2_COST + D_COST
REAL_OD = A_OD + B1_OD + B2_OD + D_OD


def instance(
    iid: str,
    run_id: str,
    itype: str,
    price: float,
    od: float,
    running: datetime | None,
    terminated: datetime | None,
    *,
    lifecycle: Lifecycle = Lifecycle.SPOT,
    disk_gb: int = 0,
    ebs: float = 0.0,
) -> InstanceRow:
    launched = (running or terminated or NOW) - timedelta(seconds=40)
    return InstanceRow(
        id=iid,
        run_id=run_id,
        instance_type=itype,
        zone="us-east-1a",
        lifecycle=lifecycle,
        price_per_hour=price,
        on_demand_per_hour=od,
        launched_at=launched,
        disk_gb=disk_gb,
        ebs_per_gb_month=ebs,
        running_at=running,
        terminated_at=terminated,
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.sqlite") as led:
        runs = [
            RunRow(A, "alpha", RunState.SUCCEEDED, t(1, 10), started_at=t(1, 10, 1)),
            RunRow(S, "sim", RunState.SUCCEEDED, t(1, 11), simulated=True, started_at=t(1, 11, 0, 30)),
            RunRow(B, "beta", RunState.SUCCEEDED, t(2, 8), started_at=t(2, 8, 1)),
            RunRow(C, "gamma", RunState.FAILED, t(2, 15)),
            RunRow(D, "delta", RunState.RUNNING, t(10, 9), started_at=t(10, 9, 1)),
            RunRow(E, "empty", RunState.PLANNED, t(20, 12, month=2)),
        ]
        for run in runs:
            led.create_run(run)
        for row in [
            instance("i-a1", A, "g4dn.xlarge", 0.2, 0.5, t(1, 10, 2), t(1, 12, 2), disk_gb=100, ebs=0.08),
            instance("i-s1", S, "g4dn.xlarge", 0.15, 0.5, t(1, 11, 1), t(1, 11, 31), disk_gb=50, ebs=0.1),
            instance("i-b1", B, "g4dn.xlarge", 0.25, 0.5, t(2, 8, 5), t(2, 8, 5, 30)),
            instance(
                "i-b2", B, "g5.xlarge", 1.0, 1.0, t(2, 8, 10), t(2, 9, 40), lifecycle=Lifecycle.ON_DEMAND
            ),
            instance("i-c1", C, "g5.xlarge", 0.4, 1.0, None, t(2, 15, 5)),
            instance("i-d1", D, "g4dn.xlarge", 0.3, 0.5, t(10, 10, 30), None),
        ]:
            led.record_instance(row)
        yield led


def by_key(report: CostReport) -> dict[tuple[str, bool], CostRow]:
    return {(r.key, r.simulated): r for r in report.rows}


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-9, abs=1e-9)


# --- group_by run ----------------------------------------------------------------------


def test_one_row_per_run_newest_first(ledger: Ledger) -> None:
    report = cost_report(ledger, now=NOW)
    assert [r.key for r in report.rows] == [D, C, B, S, A, E]
    assert report.matched == 6
    assert report.group_by == "run"
    assert report.generated_at == NOW
    assert all(r.runs == 1 for r in report.rows)
    rows = {r.key: r for r in report.rows}
    assert rows[A].name == "alpha" and rows[A].state == "succeeded"
    assert rows[D].state == "running"
    assert rows[A].started_at == t(1, 10, 1)
    assert rows[C].started_at == t(2, 15)  # never started: its creation
    assert [r.simulated for r in report.rows] == [False, False, False, True, False, False]


def test_spot_run_cost_on_demand_saving_and_ebs(ledger: Ledger) -> None:
    a = {r.key: r for r in cost_report(ledger, now=NOW).rows}[A]
    assert a.instance_types == ("g4dn.xlarge",)
    assert a.instances == 1
    assert a.hours == approx(2.0)
    assert a.cost_usd == approx(0.4)
    assert a.on_demand_usd == approx(1.0)
    assert a.ebs_usd == approx(A_EBS) and a.ebs_usd == approx(0.0219178082)
    assert a.total_usd == approx(0.4 + A_EBS)
    assert a.saving_pct == approx(60.0)


def test_relaunched_run_is_one_row_with_both_types_and_60s_minimum(ledger: Ledger) -> None:
    b = {r.key: r for r in cost_report(ledger, now=NOW).rows}[B]
    assert b.instance_types == ("g4dn.xlarge", "g5.xlarge")
    assert b.instances == 2
    assert b.hours == approx((60 + 5400) / 3600)  # 30 s of spot billed as 60 s
    assert b.cost_usd == approx(B1_COST + B2_COST)
    assert b.on_demand_usd == approx(B1_OD + B2_OD)
    assert b.ebs_usd == 0.0
    assert b.saving_pct == approx(100 * (B1_OD - B1_COST) / (B1_OD + B2_OD))


def test_instance_that_never_ran_costs_nothing(ledger: Ledger) -> None:
    c = {r.key: r for r in cost_report(ledger, now=NOW).rows}[C]
    assert c.instances == 1
    assert c.instance_types == ("g5.xlarge",)
    assert (c.hours, c.cost_usd, c.on_demand_usd, c.ebs_usd, c.total_usd) == (0, 0, 0, 0, 0)
    assert c.saving_pct is None


def test_still_running_instance_is_billed_up_to_now(ledger: Ledger) -> None:
    d = {r.key: r for r in cost_report(ledger, now=NOW).rows}[D]
    assert d.hours == approx(1.5)
    assert d.cost_usd == approx(D_COST)
    later = {r.key: r for r in cost_report(ledger, now=NOW + timedelta(hours=1)).rows}[D]
    assert later.hours == approx(2.5)
    assert later.cost_usd == approx(2.5 * 0.3)
    # a finished instance does not grow with now
    a_later = {r.key: r for r in cost_report(ledger, now=NOW + timedelta(hours=1)).rows}[A]
    assert a_later.hours == approx(2.0)


def test_instance_billed_at_least_60_seconds_even_just_started(ledger: Ledger) -> None:
    ledger.create_run(RunRow("fresh-20260310-115950-ffff", "fresh", RunState.RUNNING, NOW))
    ledger.record_instance(
        instance(
            "i-f1", "fresh-20260310-115950-ffff", "g5.xlarge", 0.36, 1.0, NOW - timedelta(seconds=10), None
        )
    )
    fresh = cost_report(ledger, now=NOW).rows[0]
    assert fresh.key == "fresh-20260310-115950-ffff"
    assert fresh.hours == approx(60 / 3600)
    assert fresh.cost_usd == approx(60 / 3600 * 0.36)


def test_run_without_instances_is_a_zero_row(ledger: Ledger) -> None:
    e = cost_report(ledger, now=NOW).rows[-1]
    assert e.key == E
    assert (e.instances, e.instance_types, e.hours, e.total_usd) == (0, (), 0.0, 0.0)
    assert e.saving_pct is None


def test_simulated_runs_are_totalled_apart(ledger: Ledger) -> None:
    report = cost_report(ledger, now=NOW)
    real, sim = report.real, report.simulated
    assert (real.runs, real.instances) == (5, 5)
    assert real.hours == approx(REAL_SECONDS / 3600)
    assert real.cost_usd == approx(REAL_COST)
    assert real.on_demand_usd == approx(REAL_OD)
    assert real.ebs_usd == approx(A_EBS)
    assert real.total_usd == approx(REAL_COST + A_EBS)
    assert real.saving_pct == approx(100 * (REAL_OD - REAL_COST) / REAL_OD)
    assert (sim.runs, sim.instances) == (1, 1)
    assert sim.hours == approx(0.5)
    assert sim.cost_usd == approx(S_COST)
    assert sim.on_demand_usd == approx(S_OD)
    assert sim.ebs_usd == approx(S_EBS)
    assert sim.saving_pct == approx(70.0)


def test_limit_keeps_the_newest_rows_and_totals_over_all(ledger: Ledger) -> None:
    full = cost_report(ledger, now=NOW)
    limited = cost_report(ledger, limit=2, now=NOW)
    assert [r.key for r in limited.rows] == [D, C]
    assert limited.rows == full.rows[:2]
    assert limited.matched == 6
    # the limited report totals with SQL, the full one from its rows: same numbers
    for a, b in ((limited.real, full.real), (limited.simulated, full.simulated)):
        assert (a.runs, a.instances) == (b.runs, b.instances)
        for field in ("hours", "cost_usd", "on_demand_usd", "ebs_usd", "total_usd", "saving_pct"):
            assert getattr(a, field) == approx(getattr(b, field))
    assert limited.real.runs == 5
    none = cost_report(ledger, limit=0, now=NOW)
    assert none.rows == () and none.matched == 6 and none.real.runs == 5


def test_since_until_filter_on_created_at(ledger: Ledger) -> None:
    report = cost_report(ledger, since=t(1, 0), until=t(2, 12), now=NOW)
    assert [r.key for r in report.rows] == [B, S, A]
    assert (report.real.runs, report.real.instances) == (2, 3)
    assert report.real.cost_usd == approx(A_COST + B1_COST + B2_COST)
    assert (report.simulated.runs, report.simulated.instances) == (1, 1)
    assert report.since == t(1, 0) and report.until == t(2, 12)
    # since is inclusive, until exclusive
    assert [r.key for r in cost_report(ledger, since=t(2, 8), now=NOW).rows] == [D, C, B]
    assert [r.key for r in cost_report(ledger, until=t(2, 8), now=NOW).rows] == [S, A, E]
    limited = cost_report(ledger, since=t(1, 0), until=t(2, 12), limit=1, now=NOW)
    assert [r.key for r in limited.rows] == [B]
    assert (limited.matched, limited.real.runs, limited.simulated.runs) == (3, 2, 1)


def test_empty_ledger(tmp_path: Path) -> None:
    with Ledger(tmp_path / "empty.sqlite") as led:
        for group_by in ("run", "day", "instance-type"):
            report = cost_report(led, group_by=group_by, now=NOW)
            assert report.rows == () and report.matched == 0
            assert report.real.runs == 0 and report.real.cost_usd == 0.0
            assert report.real.saving_pct is None and report.simulated.saving_pct is None


def test_default_now_is_the_current_time(ledger: Ledger) -> None:
    before = datetime.now(UTC)
    report = cost_report(ledger)
    assert before <= report.generated_at <= datetime.now(UTC)
    d = {r.key: r for r in report.rows}[D]
    assert d.hours > 24  # still running since 2026-03-10 10:30


# --- group_by day / instance-type ------------------------------------------------------


def test_group_by_day(ledger: Ledger) -> None:
    report = cost_report(ledger, group_by="day", now=NOW)
    assert [(r.key, r.simulated) for r in report.rows] == [
        ("2026-03-10", False),
        ("2026-03-02", False),
        ("2026-03-01", True),  # a simulated run that day: its own row
        ("2026-03-01", False),
        ("2026-02-20", False),
    ]
    assert report.matched == 5
    rows = by_key(report)
    mar2 = rows[("2026-03-02", False)]
    assert (mar2.runs, mar2.instances) == (2, 3)
    assert mar2.instance_types == ("g4dn.xlarge", "g5.xlarge")
    assert mar2.hours == approx((60 + 5400) / 3600)
    assert mar2.cost_usd == approx(B1_COST + B2_COST)
    assert mar2.started_at == t(2, 8, 1)  # the first start that day
    assert mar2.name is None and mar2.state is None
    assert rows[("2026-03-01", True)].cost_usd == approx(S_COST)
    assert rows[("2026-03-01", False)].ebs_usd == approx(A_EBS)
    assert rows[("2026-02-20", False)].runs == 1
    assert rows[("2026-02-20", False)].instances == 0
    assert (report.real.runs, report.real.instances) == (5, 5)
    assert report.real.cost_usd == approx(REAL_COST)
    assert report.simulated.cost_usd == approx(S_COST)
    limited = cost_report(ledger, group_by="day", limit=1, now=NOW)
    assert [r.key for r in limited.rows] == ["2026-03-10"]
    assert limited.matched == 5 and limited.real.runs == 5


def test_group_by_instance_type(ledger: Ledger) -> None:
    report = cost_report(ledger, group_by="instance-type", now=NOW)
    assert [(r.key, r.simulated) for r in report.rows] == [
        ("g4dn.xlarge", False),  # newest use: delta, 03-10
        ("g5.xlarge", False),  # gamma, 03-02 15:00
        ("g4dn.xlarge", True),
    ]
    rows = by_key(report)
    g4 = rows[("g4dn.xlarge", False)]
    assert (g4.instances, g4.runs) == (3, 3)
    assert g4.instance_types == ("g4dn.xlarge",)
    assert g4.started_at is None and g4.name is None and g4.state is None
    assert g4.hours == approx((7200 + 60 + 5400) / 3600)
    assert g4.cost_usd == approx(A_COST + B1_COST + D_COST)
    assert g4.on_demand_usd == approx(A_OD + B1_OD + D_OD)
    assert g4.ebs_usd == approx(A_EBS)
    g5 = rows[("g5.xlarge", False)]
    assert (g5.instances, g5.runs) == (2, 2)
    assert g5.cost_usd == approx(B2_COST)
    assert g5.saving_pct == approx(0.0)
    assert rows[("g4dn.xlarge", True)].cost_usd == approx(S_COST)
    # totals count runs once (beta used both types) and include the run without instances
    assert (report.real.runs, report.real.instances) == (5, 5)
    assert report.real.cost_usd == approx(REAL_COST)
    assert (report.simulated.runs, report.simulated.instances) == (1, 1)


def test_instance_type_counts_a_run_once_per_type(ledger: Ledger) -> None:
    ledger.create_run(RunRow("twice-20260305-100000-0000", "twice", RunState.SUCCEEDED, t(5, 10)))
    for k in (1, 2):
        ledger.record_instance(
            instance(
                f"i-t{k}",
                "twice-20260305-100000-0000",
                "p3.2xlarge",
                1.0,
                3.06,
                t(5, 10 + k),
                t(5, 10 + k, 30),
            )
        )
    p3 = by_key(cost_report(ledger, group_by="instance-type", now=NOW))[("p3.2xlarge", False)]
    assert (p3.instances, p3.runs) == (2, 1)
    assert p3.hours == approx(1.0)


def test_invalid_group_by(ledger: Ledger) -> None:
    with pytest.raises(InputError) as info:
        cost_report(ledger, group_by="week")
    assert "'week'" in info.value.message
    assert info.value.hint is not None
    for choice in ("run", "day", "instance-type"):
        assert choice in info.value.hint


def test_negative_limit_is_refused(ledger: Ledger) -> None:
    with pytest.raises(InputError, match="limit"):
        cost_report(ledger, limit=-1)


# --- exports ---------------------------------------------------------------------------

CSV_TAIL = [
    "name",
    "started_at",
    "state",
    "instance_types",
    "instances",
    "runs",
    "hours",
    "cost_usd",
    "on_demand_usd",
    "ebs_usd",
    "total_usd",
    "saving_pct",
    "simulated",
]


def test_csv_header_and_rows(ledger: Ledger) -> None:
    text = to_csv(cost_report(ledger, now=NOW))
    lines = list(csv.reader(io.StringIO(text)))
    assert lines[0] == ["run_id", *CSV_TAIL]
    assert len(lines) == 1 + 6
    rows = {line[0]: dict(zip(lines[0], line, strict=True)) for line in lines[1:]}
    b = rows[B]
    assert b == {
        "run_id": B,
        "name": "beta",
        "started_at": "2026-03-02T08:01:00Z",
        "state": "succeeded",
        "instance_types": "g4dn.xlarge+g5.xlarge",
        "instances": "2",
        "runs": "1",
        "hours": "1.5167",
        "cost_usd": "1.5042",
        "on_demand_usd": "1.5083",
        "ebs_usd": "0.0000",
        "total_usd": "1.5042",
        "saving_pct": "0.28",
        "simulated": "false",
    }
    assert rows[A]["ebs_usd"] == "0.0219"
    assert rows[A]["total_usd"] == "0.4219"
    assert rows[C]["saving_pct"] == ""  # nothing billed: no saving to speak of
    assert rows[S]["simulated"] == "true"
    assert rows[E]["instance_types"] == ""


def test_csv_names_the_group_column(ledger: Ledger) -> None:
    day = list(csv.reader(io.StringIO(to_csv(cost_report(ledger, group_by="day", now=NOW)))))
    assert day[0] == ["day", *CSV_TAIL]
    assert day[1][:5] == ["2026-03-10", "", "2026-03-10T09:01:00Z", "", "g4dn.xlarge"]
    types = to_csv(cost_report(ledger, group_by="instance-type", now=NOW)).splitlines()
    assert types[0].startswith("instance_type,name,")
    assert len(types) == 1 + 3


def test_csv_of_limited_report_has_only_its_rows(ledger: Ledger) -> None:
    assert len(to_csv(cost_report(ledger, limit=2, now=NOW)).splitlines()) == 3


def test_json_schema_times_and_money(ledger: Ledger) -> None:
    report = cost_report(ledger, since=t(1, 0), now=NOW)
    data = to_json(report)
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    assert data["schema"] == 1
    assert data["group_by"] == "run"
    assert data["since"] == "2026-03-01T00:00:00Z"
    assert data["until"] is None
    assert data["generated_at"] == "2026-03-10T12:00:00Z"
    assert [r["key"] for r in data["rows"]] == [D, C, B, S, A]
    iso_z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
    assert all(iso_z.match(r["started_at"]) for r in data["rows"])
    b = next(r for r in data["rows"] if r["key"] == B)
    assert b["instance_types"] == ["g4dn.xlarge", "g5.xlarge"]
    assert b["cost_usd"] == 1.5042 and isinstance(b["cost_usd"], float)
    assert b["simulated"] is False and b["state"] == "succeeded"
    c = next(r for r in data["rows"] if r["key"] == C)
    assert c["saving_pct"] is None
    real, sim = data["totals"]["real"], data["totals"]["simulated"]
    assert real["runs"] == 4  # since 03-01: the planned February run is out
    assert real["cost_usd"] == round(REAL_COST, 4)
    assert real["ebs_usd"] == round(A_EBS, 4)
    assert real["saving_pct"] == round(100 * (REAL_OD - REAL_COST) / REAL_OD, 2)
    assert sim == {
        "runs": 1,
        "instances": 1,
        "hours": 0.5,
        "cost_usd": 0.075,
        "on_demand_usd": 0.25,
        "ebs_usd": round(S_EBS, 4),
        "total_usd": round(S_COST + S_EBS, 4),
        "saving_pct": 70.0,
    }


# --- export: every row, formatted by SQLite ----------------------------------------------

NUMERIC = {"hours", "cost_usd", "on_demand_usd", "ebs_usd", "total_usd", "saving_pct"}


def close(key: str, a: object, b: object) -> bool:
    """Equal, numbers up to their rounding (4 decimals, a saving 2) formatted apart."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= (0.0101 if key == "saving_pct" else 0.000101)
    return a == b


def assert_same_json(got: object, want: object, key: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (key, got, want)
        for k in want:
            assert_same_json(got[k], want[k], k)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (key, got, want)
        for g, w in zip(got, want, strict=True):
            assert_same_json(g, w, key)
    else:
        assert type(got) is type(want) or {type(got), type(want)} <= {int, float}, (key, got, want)
        assert close(key, got, want), (key, got, want)


def assert_same_csv(got: str, want: str) -> None:
    got_rows = list(csv.reader(io.StringIO(got)))
    want_rows = list(csv.reader(io.StringIO(want)))
    assert got_rows[0] == want_rows[0]
    assert len(got_rows) == len(want_rows)
    header = want_rows[0]
    for g, w in zip(got_rows[1:], want_rows[1:], strict=True):
        for column, a, b in zip(header, g, w, strict=True):
            if column in NUMERIC and a and b:
                assert close(column, float(a), float(b)), (column, g, w)
            else:
                assert a == b, (column, g, w)


WINDOWS = [
    {},
    {"since": t(1, 0), "until": t(2, 12)},
    {"since": t(2, 8)},
    {"until": t(2, 8)},
    {"since": t(30, 0, month=4)},  # nothing matches
]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("group_by", ["run", "day", "instance-type"])
def test_export_equals_the_report(ledger: Ledger, group_by: str, window: dict[str, datetime]) -> None:
    report = cost_report(ledger, group_by=group_by, now=NOW, **window)
    csv_text = export(ledger, "csv", group_by=group_by, now=NOW, **window)
    assert csv_text.endswith("\n")
    assert_same_csv(csv_text, to_csv(report))
    json_text = export(ledger, "json", group_by=group_by, now=NOW, **window)
    assert json_text.endswith("}\n") and "\n" not in json_text[:-1]  # compact
    assert_same_json(json.loads(json_text), to_json(report))


def test_export_by_run_rows_and_totals(ledger: Ledger) -> None:
    data = json.loads(export(ledger, "json", now=NOW))
    assert [r["key"] for r in data["rows"]] == [D, C, B, S, A, E]  # newest first
    assert data["matched"] == 6 and data["group_by"] == "run"
    assert data["generated_at"] == "2026-03-10T12:00:00Z"
    b = data["rows"][2]
    assert b["instance_types"] == ["g4dn.xlarge", "g5.xlarge"] and b["instances"] == 2
    assert b["cost_usd"] == 1.5042 and isinstance(b["cost_usd"], float)
    assert b["saving_pct"] == 0.28 and b["simulated"] is False
    assert data["rows"][1]["saving_pct"] is None  # never ran: nothing billed
    assert data["rows"][1]["instance_types"] == ["g5.xlarge"]
    assert data["rows"][5]["instance_types"] == [] and data["rows"][5]["hours"] == 0.0
    assert data["rows"][3]["simulated"] is True
    real, sim = data["totals"]["real"], data["totals"]["simulated"]
    assert (real["runs"], real["instances"]) == (5, 5)
    assert real["cost_usd"] == round(REAL_COST, 4)
    assert real["saving_pct"] == round(100 * (REAL_OD - REAL_COST) / REAL_OD, 2)
    assert (sim["runs"], sim["hours"], sim["cost_usd"]) == (1, 0.5, 0.075)
    lines = export(ledger, "csv", now=NOW).splitlines()
    assert lines[0] == ",".join(["run_id", *CSV_TAIL])
    assert lines[3] == (
        f"{B},beta,2026-03-02T08:01:00Z,succeeded,g4dn.xlarge+g5.xlarge,2,1,"
        "1.5167,1.5042,1.5083,0.0000,1.5042,0.28,false"
    )
    assert lines[5].endswith(",0.0219,0.4219,60.00,false")  # alpha: EBS in the total
    assert (
        lines[2]
        == f"{C},gamma,2026-03-02T15:00:00Z,failed,g5.xlarge,1,1,0.0000,0.0000,0.0000,0.0000,0.0000,,false"
    )


def test_export_bills_a_still_running_instance_up_to_now(ledger: Ledger) -> None:
    for now, hours in ((NOW, 1.5), (NOW + timedelta(hours=1), 2.5)):
        d = json.loads(export(ledger, "json", now=now))["rows"][0]
        assert d["key"] == D and d["hours"] == hours and d["cost_usd"] == round(hours * 0.3, 4)
        line = export(ledger, "csv", now=now).splitlines()[1]
        assert line.startswith(f"{D},delta,") and f",1,1,{hours:.4f},{hours * 0.3:.4f}," in line
        a = json.loads(export(ledger, "json", now=now))["rows"][4]
        assert a["key"] == A and a["hours"] == 2.0  # a finished instance does not grow
    # just started: the 60 s minimum, also for the live part
    ledger.create_run(RunRow("fresh-20260310-115950-ffff", "fresh", RunState.RUNNING, NOW))
    ledger.record_instance(
        instance(
            "i-f1", "fresh-20260310-115950-ffff", "g5.xlarge", 0.36, 1.0, NOW - timedelta(seconds=10), None
        )
    )
    fresh = json.loads(export(ledger, "json", now=NOW))["rows"][0]
    assert fresh["hours"] == round(60 / 3600, 4) and fresh["cost_usd"] == round(60 / 3600 * 0.36, 4)
    totals = json.loads(export(ledger, "json", now=NOW + timedelta(hours=1)))["totals"]["real"]
    assert totals["hours"] == round((REAL_SECONDS + 3600 + 3610) / 3600, 4)  # delta +1 h, fresh 10 s + 1 h


def test_export_quotes_and_escapes_text_that_needs_it(ledger: Ledger) -> None:
    odd = [
        ("comma-20260305-100000-0001", 'a, "quoted"\nname'),
        ("slash-20260305-110000-0002", "back\\slash\ttab"),
        ("utf8-20260305-120000-0003", "données-é"),
    ]
    for k, (run_id, name) in enumerate(odd):
        ledger.create_run(RunRow(run_id, name, RunState.SUCCEEDED, t(5, 10 + k)))
        ledger.record_instance(
            instance(f"i-odd{k}", run_id, "g5.xlarge", 0.4, 1.0, t(5, 10 + k), t(5, 11 + k))
        )
    flags = dict(ledger.connection.execute("SELECT id, plain_text FROM runs").fetchall())
    assert flags[A] == 1 and not any(flags[run_id] for run_id, _ in odd)
    report = cost_report(ledger, now=NOW)
    assert_same_csv(export(ledger, "csv", now=NOW), to_csv(report))
    assert_same_json(json.loads(export(ledger, "json", now=NOW)), to_json(report))
    names = {row[0]: row[1] for row in csv.reader(io.StringIO(export(ledger, "csv", now=NOW)))}
    rows = {r["key"]: r for r in json.loads(export(ledger, "json", now=NOW))["rows"]}
    for run_id, name in odd:
        assert names[run_id] == name and rows[run_id]["name"] == name
        assert rows[run_id]["instance_types"] == ["g5.xlarge"]


def test_export_of_an_empty_ledger(tmp_path: Path) -> None:
    with Ledger(tmp_path / "empty.sqlite") as led:
        assert export(led, "csv", now=NOW) == ",".join(["run_id", *CSV_TAIL]) + "\n"
        data = json.loads(export(led, "json", now=NOW))
        assert data["rows"] == [] and data["matched"] == 0
        assert data["totals"]["real"] == {
            "runs": 0,
            "instances": 0,
            "hours": 0.0,
            "cost_usd": 0.0,
            "on_demand_usd": 0.0,
            "ebs_usd": 0.0,
            "total_usd": 0.0,
            "saving_pct": None,
        }


def test_export_refuses_unknown_formats_and_groups(ledger: Ledger) -> None:
    with pytest.raises(InputError, match="'xml'"):
        export(ledger, "xml")
    with pytest.raises(InputError, match="'week'"):
        export(ledger, "csv", group_by="week")


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ledger_bench", REPO / "benchmarks" / "ledger_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("group_by", ["run", "day", "instance-type"])
def test_export_equals_the_report_on_the_benchmark_ledger(tmp_path: Path, group_by: str) -> None:
    """Relaunches, mixed types, simulated runs, launches that never ran, live instances."""
    bench = _bench_module()
    with Ledger(tmp_path / "bench.sqlite") as led:
        bench.fill(led, 400)
        now = bench.NOW
        window = {"since": now - timedelta(days=60), "until": now - timedelta(days=1)}
        for kwargs in ({}, window):
            report = cost_report(led, group_by=group_by, now=now, **kwargs)
            assert_same_csv(export(led, "csv", group_by=group_by, now=now, **kwargs), to_csv(report))
            assert_same_json(
                json.loads(export(led, "json", group_by=group_by, now=now, **kwargs)), to_json(report)
            )
        limited = cost_report(led, group_by=group_by, limit=50, now=now)
        full = cost_report(led, group_by=group_by, now=now)
        assert limited.rows == full.rows[:50] and limited.matched == full.matched
        assert (limited.real, limited.simulated) == (full.real, full.simulated)


# --- the benchmark script stays runnable -----------------------------------------------


def test_benchmark_script_runs_and_reports_its_verdict() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ledger_bench.py"), "--runs", "300", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"ledger_bench: worst \d+\.\d{3} s for 300 runs; ratio to the 1\.0 s target: \d+\.\d+", last
    ), last
