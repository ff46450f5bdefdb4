"""The numbers behind ``cloudtrain cost-report``: what runs cost, from the ledger.

Pure over the ledger (no printing, no rich): ``cost_report`` returns a frozen
``CostReport`` that the CLI renders and ``to_csv`` / ``to_json`` export.

Billing model (EC2 Linux): per second with a 60 s minimum per instance, from the
moment the instance reached running until it was terminated (still running: until
``now``); an instance that never reached running costs nothing. ``cost`` is what was
paid at the instance's own rate (spot or on-demand), ``on_demand`` what the same
seconds would have cost on demand, and ``ebs`` the root volume:
``disk_gb * ebs_per_gb_month * seconds / (730 * 3600)``.

The aggregation runs in SQLite (julianday arithmetic, sums per group), a pass or two
over the matched runs per report; ``benchmarks/ledger_bench.py`` times it on 100,000
runs. Simulated (dry-run) runs are
never mixed with real spend: rows are marked ``simulated`` (a day or an instance
type used by both gets two rows) and the totals come in a ``real`` and a
``simulated`` block.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cloudtrain.errors import InputError
from cloudtrain.ledger import Ledger
from cloudtrain.records import iso, parse_iso, utcnow

GROUP_BY_CHOICES: tuple[str, ...] = ("run", "day", "instance-type")
JSON_SCHEMA = 1
MIN_BILLED_SECONDS = 60
HOURS_PER_MONTH = 730  # AWS prices EBS per GB-month of 730 hours
MONEY_DECIMALS = 4


@dataclass(frozen=True)
class CostRow:
    """One group of the report: a run, a UTC day, or an instance type."""

    key: str  # the run id, the day (YYYY-MM-DD, UTC) or the instance type
    name: str | None  # the run's name (group_by="run")
    started_at: datetime | None  # first start (creation if never started); None by type
    state: str | None  # the run's state (group_by="run")
    instance_types: tuple[str, ...]
    instances: int
    runs: int
    hours: float  # billed hours
    cost_usd: float  # what was paid for the instances (spot or on-demand rate)
    on_demand_usd: float  # what the same hours cost on demand
    ebs_usd: float
    total_usd: float  # cost_usd + ebs_usd
    saving_pct: float | None  # vs on demand; None when nothing was billed
    simulated: bool


@dataclass(frozen=True)
class CostTotals:
    """Sums over every matched run (real or simulated), whatever the row limit."""

    runs: int
    instances: int
    hours: float
    cost_usd: float
    on_demand_usd: float
    ebs_usd: float
    total_usd: float
    saving_pct: float | None


@dataclass(frozen=True)
class CostReport:
    group_by: str
    since: datetime | None
    until: datetime | None
    generated_at: datetime
    rows: tuple[CostRow, ...]  # newest group first, at most ``limit``
    real: CostTotals
    simulated: CostTotals
    matched: int  # groups before the limit


def saving_pct(cost: float, on_demand: float) -> float | None:
    """Percent saved against on demand; None when there is nothing to compare."""
    if on_demand <= 0:
        return None
    return 100.0 * (on_demand - cost) / on_demand


# --- SQL ------------------------------------------------------------------------------
# Times are ISO 8601 UTC text: compared as text they order, julianday() reads them.
# An instance's billed seconds: whole seconds (the times are; ROUND drops julianday's
# float error), at least the minimum; NULL when it never reached running
# (multi-argument MAX is NULL when an argument is), which TOTAL() and Python count as 0.
_SECONDS = f"""MAX({float(MIN_BILLED_SECONDS)}, ROUND(
    (julianday(COALESCE(i.terminated_at, :now)) - julianday(i.running_at)) * 86400.0))"""

# One row per instance of the newest runs (all of them, or the ``:limit`` newest),
# a run without instances once with NULLs, in report order; folded per run in Python.
_BY_RUN = f"""
SELECT m.id, m.name, COALESCE(m.started_at, m.created_at), m.state, m.simulated,
       i.instance_type, {_SECONDS}, i.price_per_hour, i.on_demand_per_hour,
       i.disk_gb * i.ebs_per_gb_month
FROM {{runs}} AS m LEFT JOIN instances AS i ON i.run_id = m.id {{where}}
ORDER BY m.created_at DESC, m.id DESC"""

# Runs counted per (group key, simulated), with the newest creation and first start.
_RUN_COUNTS = """
SELECT {key} AS key, m.simulated, COUNT(*), MAX(m.created_at),
       MIN(COALESCE(m.started_at, m.created_at))
FROM runs AS m {where}
GROUP BY key, m.simulated"""


def _instance_sums_sql(key: str, where: str, *, per_type: bool, run_stats: bool) -> str:
    """Instances summed per (key, simulated[, instance type]).

    Row: key, simulated, instance type (NULL unless ``per_type``), instances,
    seconds, seconds x price, seconds x on-demand price, seconds x EBS GB-month price
    [, runs, newest created_at: with ``run_stats``].

    The inner query computes each instance's seconds once; its ``LIMIT -1`` (no limit)
    keeps SQLite from flattening it into the outer query, which would evaluate the
    seconds expression again for every sum.
    """
    extra_columns = extra_sums = ""
    if run_stats:
        extra_columns = ", m.rowid AS run_key, m.created_at"  # rowid: cheaper to DISTINCT
        extra_sums = ", COUNT(DISTINCT run_key), MAX(created_at)"
    type_column = "instance_type" if per_type else "NULL"
    group = "key, simulated, instance_type" if per_type else "key, simulated"
    return f"""
SELECT key, simulated, {type_column}, COUNT(*), TOTAL(s), TOTAL(s * p), TOTAL(s * o),
       TOTAL(s * ge){extra_sums}
FROM (
    SELECT {key} AS key, m.simulated, i.instance_type, i.price_per_hour AS p,
           i.on_demand_per_hour AS o, i.disk_gb * i.ebs_per_gb_month AS ge,
           {_SECONDS} AS s{extra_columns}
    FROM runs AS m JOIN instances AS i ON i.run_id = m.id {where}
    LIMIT -1
)
GROUP BY {group}"""


def _where(since: datetime | None, until: datetime | None) -> str:
    """The runs created in [since, until)."""
    terms = []
    if since is not None:
        terms.append("m.created_at >= :since")
    if until is not None:
        terms.append("m.created_at < :until")
    return "WHERE " + " AND ".join(terms) if terms else ""


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction, so rows and totals see the same ledger (WAL snapshot)."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


_EBS_SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600.0


class _Group:
    """Running sums for one group (or one totals block) while folding query rows."""

    __slots__ = ("types", "instances", "runs", "seconds", "cost", "od", "ebs", "latest", "first")

    def __init__(self) -> None:
        self.types: set[str] = set()
        self.instances = 0
        self.runs = 0
        self.seconds = 0.0
        self.cost = 0.0
        self.od = 0.0
        self.ebs = 0.0
        self.latest = ""  # newest created_at (ISO text) in the group
        self.first = ""  # earliest start (ISO text) in the group

    def add_instance_sums(self, r: Sequence[Any]) -> None:
        """Fold one row of ``_instance_sums_sql``."""
        if r[2] is not None:
            self.types.add(r[2])
        self.instances += r[3]
        self.seconds += r[4]
        self.cost += r[5] / 3600.0
        self.od += r[6] / 3600.0
        self.ebs += r[7] / _EBS_SECONDS_PER_MONTH
        if len(r) > 8:
            self.add_runs(r[8], r[9])

    def add_runs(self, runs: int, latest: str, first: str = "") -> None:
        self.runs += runs
        if latest > self.latest:
            self.latest = latest
        if first and (not self.first or first < self.first):
            self.first = first

    def add(self, other: _Group) -> None:
        self.instances += other.instances
        self.runs += other.runs
        self.seconds += other.seconds
        self.cost += other.cost
        self.od += other.od
        self.ebs += other.ebs

    def totals(self) -> CostTotals:
        return CostTotals(
            runs=self.runs,
            instances=self.instances,
            hours=self.seconds / 3600.0,
            cost_usd=self.cost,
            on_demand_usd=self.od,
            ebs_usd=self.ebs,
            total_usd=self.cost + self.ebs,
            saving_pct=saving_pct(self.cost, self.od),
        )


# --- the report -----------------------------------------------------------------------


def cost_report(
    ledger: Ledger,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    group_by: str = "run",
    limit: int | None = None,
    now: datetime | None = None,
) -> CostReport:
    """Cost of the runs created in ``[since, until)`` (UTC), grouped.

    ``rows`` are the newest ``limit`` groups (by their latest run's creation; None:
    all of them), the totals are over every matched run. Instances still running are
    billed up to ``now`` (default: the current time).
    """
    if group_by not in GROUP_BY_CHOICES:
        raise InputError(
            f"cannot group a cost report by {group_by!r}",
            hint=f"group by one of: {', '.join(GROUP_BY_CHOICES)}",
        )
    if limit is not None and limit < 0:
        raise InputError(f"limit must be 0 or more, not {limit}", hint="leave it out for all")
    generated_at = now or utcnow()
    params: dict[str, object] = {"now": iso(generated_at), "limit": limit}
    if since is not None:
        params["since"] = iso(since)
    if until is not None:
        params["until"] = iso(until)
    where = _where(since, until)
    conn = ledger.connection

    totals = {False: _Group(), True: _Group()}  # by simulated
    with _snapshot(conn):
        if group_by == "run":
            rows = _rows_by_run(conn, where, params, limit)
            if limit is None:  # every matched run has its row: total the rows
                for row in rows:
                    _add_row(totals[row.simulated], row)
            else:
                _totals_query(conn, where, params, totals)
            matched = totals[False].runs + totals[True].runs
        else:
            groups = _groups(conn, where, params, group_by)
            for (_, simulated), group in groups:
                totals[simulated].add(group)
            if group_by == "instance-type":  # a run with several types is in several rows
                for group in totals.values():
                    group.runs = 0
                for _, simulated, runs, latest, first in conn.execute(
                    _RUN_COUNTS.format(key="''", where=where), params
                ):
                    totals[bool(simulated)].add_runs(runs, latest, first)
            matched = len(groups)
            if limit is not None:
                groups = groups[:limit]
            rows = [_group_row(key, simulated, group) for (key, simulated), group in groups]

    return CostReport(
        group_by=group_by,
        since=since,
        until=until,
        generated_at=generated_at,
        rows=tuple(rows),
        real=totals[False].totals(),
        simulated=totals[True].totals(),
        matched=matched,
    )


def _rows_by_run(
    conn: sqlite3.Connection, where: str, params: dict[str, object], limit: int | None
) -> list[CostRow]:
    """One row per run, newest first: fold the run x instance join."""
    if limit is None:
        sql = _BY_RUN.format(runs="runs", where=where)
    else:  # the newest runs first, then their instances
        runs = (
            f"(SELECT id, name, state, simulated, created_at, started_at FROM runs AS m {where}"
            " ORDER BY m.created_at DESC, m.id DESC LIMIT :limit)"
        )
        sql = _BY_RUN.format(runs=runs, where="")
    rows: list[CostRow] = []
    append = rows.append
    head: Sequence[Any] = (None,)
    types: list[str] = []
    seconds = cost = od = ebs = 0.0
    for r in conn.execute(sql, params):
        if r[0] != head[0]:
            if head[0] is not None:
                append(_run_row(head, types, seconds, cost, od, ebs))
            head, types = r, []
            seconds = cost = od = ebs = 0.0
        if r[5] is not None:  # an instance (a run without any has NULLs here)
            types.append(r[5])
            s = r[6]
            if s is not None:  # it reached running
                seconds += s
                cost += s * r[7]
                od += s * r[8]
                ebs += s * r[9]
    if head[0] is not None:
        append(_run_row(head, types, seconds, cost, od, ebs))
    return rows


def _run_row(
    head: Sequence[Any],
    types: list[str],
    seconds: float,
    cost_s: float,
    od_s: float,
    ebs_s: float,
) -> CostRow:
    """A run's row from its sums of seconds and dollar-seconds."""
    cost = cost_s / 3600.0
    od = od_s / 3600.0
    ebs = ebs_s / _EBS_SECONDS_PER_MONTH
    return CostRow(
        head[0],  # key: the run id
        head[1],  # name
        parse_iso(head[2]),  # started_at (created_at if it never started)
        head[3],  # state
        tuple(sorted(set(types))) if len(types) > 1 else tuple(types),
        len(types),
        1,
        seconds / 3600.0,
        cost,
        od,
        ebs,
        cost + ebs,
        saving_pct(cost, od),
        bool(head[4]),
    )


def _add_row(group: _Group, row: CostRow) -> None:
    group.runs += row.runs
    group.instances += row.instances
    group.seconds += row.hours * 3600.0
    group.cost += row.cost_usd
    group.od += row.on_demand_usd
    group.ebs += row.ebs_usd


def _totals_query(
    conn: sqlite3.Connection,
    where: str,
    params: dict[str, object],
    totals: dict[bool, _Group],
) -> None:
    """Sum every matched run and instance into ``totals`` (by simulated)."""
    for _, simulated, runs, latest, first in conn.execute(_RUN_COUNTS.format(key="''", where=where), params):
        totals[bool(simulated)].add_runs(runs, latest, first)
    sql = _instance_sums_sql("''", where, per_type=False, run_stats=False)
    for r in conn.execute(sql, params):
        totals[bool(r[1])].add_instance_sums(r)


def _groups(
    conn: sqlite3.Connection, where: str, params: dict[str, object], group_by: str
) -> list[tuple[tuple[str, bool], _Group]]:
    """Groups per UTC day or per instance type, each split real/simulated, newest first."""
    groups: dict[tuple[str, bool], _Group] = {}
    if group_by == "day":
        key = "substr(m.created_at, 1, 10)"
        for day, simulated, runs, latest, first in conn.execute(
            _RUN_COUNTS.format(key=key, where=where), params
        ):
            groups.setdefault((day, bool(simulated)), _Group()).add_runs(runs, latest, first)
        sql = _instance_sums_sql(key, where, per_type=True, run_stats=False)
    else:
        sql = _instance_sums_sql("i.instance_type", where, per_type=True, run_stats=True)
    for r in conn.execute(sql, params):
        groups.setdefault((r[0], bool(r[1])), _Group()).add_instance_sums(r)
    return sorted(groups.items(), key=lambda kv: (kv[1].latest, kv[0][0], kv[0][1]), reverse=True)


def _group_row(key: str, simulated: bool, g: _Group) -> CostRow:
    return CostRow(
        key=key,
        name=None,
        started_at=parse_iso(g.first) if g.first else None,
        state=None,
        instance_types=tuple(sorted(g.types)),
        instances=g.instances,
        runs=g.runs,
        hours=g.seconds / 3600.0,
        cost_usd=g.cost,
        on_demand_usd=g.od,
        ebs_usd=g.ebs,
        total_usd=g.cost + g.ebs,
        saving_pct=saving_pct(g.cost, g.od),
        simulated=simulated,
    )


# --- export ---------------------------------------------------------------------------

_KEY_COLUMN = {"run": "run_id", "day": "day", "instance-type": "instance_type"}
CSV_COLUMNS: tuple[str, ...] = (
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
)


def _iso(dt: datetime) -> str:
    """``records.iso``, with a fast path for the whole-second UTC times the rows hold."""
    if dt.tzinfo is timezone.utc and not dt.microsecond:
        return dt.isoformat()[:19] + "Z"
    return iso(dt)


def _money(value: float) -> float:
    return round(value, MONEY_DECIMALS)


def _pct(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


def to_csv(report: CostReport) -> str:
    """A header naming the group (run_id, day or instance_type), then one line per row.

    Money and hours are rounded to 4 decimals, instance types joined with ``+``,
    times ISO 8601 UTC; an empty cell is a missing value.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((_KEY_COLUMN[report.group_by], *CSV_COLUMNS))
    for row in report.rows:
        pct = _pct(row.saving_pct)
        writer.writerow(
            (
                row.key,
                row.name or "",
                _iso(row.started_at) if row.started_at else "",
                row.state or "",
                "+".join(row.instance_types),
                row.instances,
                row.runs,
                f"{row.hours:.4f}",
                f"{row.cost_usd:.4f}",
                f"{row.on_demand_usd:.4f}",
                f"{row.ebs_usd:.4f}",
                f"{row.total_usd:.4f}",
                "" if pct is None else f"{pct:.2f}",
                "true" if row.simulated else "false",
            )
        )
    return out.getvalue()


def to_json(report: CostReport) -> dict[str, Any]:
    """A JSON-ready dict (``schema`` 1): times ISO 8601 UTC, money as numbers (4 decimals)."""
    return {
        "schema": JSON_SCHEMA,
        "group_by": report.group_by,
        "since": iso(report.since) if report.since else None,
        "until": iso(report.until) if report.until else None,
        "generated_at": iso(report.generated_at),
        "matched": report.matched,
        "rows": [
            {
                "key": row.key,
                "name": row.name,
                "started_at": _iso(row.started_at) if row.started_at else None,
                "state": row.state,
                "instance_types": list(row.instance_types),
                "instances": row.instances,
                "runs": row.runs,
                "hours": round(row.hours, 4),
                "cost_usd": _money(row.cost_usd),
                "on_demand_usd": _money(row.on_demand_usd),
                "ebs_usd": _money(row.ebs_usd),
                "total_usd": _money(row.total_usd),
                "saving_pct": _pct(row.saving_pct),
                "simulated": row.simulated,
            }
            for row in report.rows
        ],
        "totals": {"real": _totals_json(report.real), "simulated": _totals_json(report.simulated)},
    }


def _totals_json(t: CostTotals) -> dict[str, Any]:
    return {
        "runs": t.runs,
        "instances": t.instances,
        "hours": round(t.hours, 4),
        "cost_usd": _money(t.cost_usd),
        "on_demand_usd": _money(t.on_demand_usd),
        "ebs_usd": _money(t.ebs_usd),
        "total_usd": _money(t.total_usd),
        "saving_pct": _pct(t.saving_pct),
    }


def export(
    ledger: Ledger,
    fmt: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    group_by: str = "run",
    now: datetime | None = None,
) -> str:
    """The whole report as ``csv`` or ``json`` text: every row, and (json) the totals."""
    report = cost_report(ledger, since=since, until=until, group_by=group_by, now=now)
    if fmt == "csv":
        return to_csv(report)
    if fmt == "json":
        return json.dumps(to_json(report), indent=2) + "\n"
    raise InputError(f"cannot export a cost report as {fmt!r}", hint="Use csv or json.")
