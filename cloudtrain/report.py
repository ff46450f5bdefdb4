"""The numbers behind ``cloudtrain cost-report``: what runs cost, from the ledger.

Pure over the ledger (no printing, no rich): ``cost_report`` returns a frozen
``CostReport`` that the CLI renders as a table, and ``export`` writes the whole report
as csv or json text (``to_csv`` / ``to_json`` turn a ``CostReport`` into the same).

Billing model (EC2 Linux): per second with a 60 s minimum per instance, from the
moment the instance reached running until it was terminated (still running: until
``now``); an instance that never reached running costs nothing. ``cost`` is what was
paid at the instance's own rate (spot or on-demand), ``on_demand`` what the same
seconds would have cost on demand, and ``ebs`` the root volume:
``disk_gb * ebs_per_gb_month * seconds / (730 * 3600)``.

Speed: on a ledger of 100,000 runs every report and export answers in under a second
(``benchmarks/ledger_bench.py``; summing per instance at report time and building
100,000 Python rows each took longer than that on their own). So:

- nothing is summed per instance at report time: the ledger keeps each run's cost
  summary as its instances change (see ``cloudtrain.ledger``), and the report only
  adds the part of the instances still running, billed up to ``now``, found through
  a small partial index. Totals and the per-day rows are one grouped pass over a
  covering index of the run summaries; the per-type rows one over a covering index
  of the instances (a run may mix types);
- an export of every run is formatted by SQLite, one ``printf`` per row (csv, or a
  json object; ``json_quote`` escapes text that needs it) joined by
  ``group_concat``, with the totals summed in the same pass: no Python object per
  run. (``json_object`` per row was about twice as slow as ``printf``.)

Simulated (dry-run) runs are never mixed with real spend: rows are marked
``simulated`` (a day or an instance type used by both gets two rows) and the totals
come in a ``real`` and a ``simulated`` block.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cloudtrain.errors import InputError
from cloudtrain.ledger import EBS_SECONDS_PER_MONTH, MIN_BILLED_SECONDS, Ledger
from cloudtrain.records import iso, parse_iso, utcnow

GROUP_BY_CHOICES: tuple[str, ...] = ("run", "day", "instance-type")
EXPORT_FORMATS: tuple[str, ...] = ("csv", "json")
JSON_SCHEMA = 1
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
class Estimates:
    """The ended runs' cost as projected after their first epoch, against their bill."""

    runs: int
    projected_usd: float
    billed_usd: float
    mean_error_pct: float | None  # the mean of |projected - billed| / billed, in %


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
    estimates: Estimates = Estimates(0, 0.0, 0.0, None)


def saving_pct(cost: float, on_demand: float) -> float | None:
    """Percent saved against on demand; None when there is nothing to compare."""
    if on_demand <= 0:
        return None
    return 100.0 * (on_demand - cost) / on_demand


# --- SQL ------------------------------------------------------------------------------
# Times are ISO 8601 UTC text: compared as text they order, julianday() reads them.
# Money in the ledger's summaries is in dollars; the live part is summed here in
# dollar-seconds (seconds x $/h, x $/GB-month for EBS) and converted once.

# The seconds of an instance still running, billed up to :now (whole, >= the minimum).
_LIVE_SECONDS = f"""MAX({MIN_BILLED_SECONDS}, CAST(ROUND(
    (julianday(:now) - julianday(i.running_at)) * 86400.0) AS INTEGER))"""
# Exactly the partial index ``instances_live``'s condition, so that index answers.
_LIVE_WHERE = "i.terminated_at IS NULL AND i.running_at IS NOT NULL"

# The instances of the matched runs still running: one row each (few in practice).
# Instances carry copies of their run's creation time and simulated flag: no join.
_LIVE_INSTANCES = f"""
SELECT i.run_id, i.run_simulated, substr(i.run_created_at, 1, 10), i.instance_type,
       {_LIVE_SECONDS}, i.price_per_hour, i.on_demand_per_hour, i.disk_gb * i.ebs_per_gb_month
FROM instances AS i
WHERE {_LIVE_WHERE} {{and_where}}"""

# Matched runs per (UTC day, simulated), from the run summaries: the covering index
# ``runs_days`` delivers them in group order (no sort). ``{types}``: the distinct
# instance-type sets ('+'-joined) of the group, ','-joined; or NULL when not needed.
_DAYS = """
SELECT substr(m.created_at, 1, 10), m.simulated, COUNT(*), TOTAL(m.instances),
       TOTAL(m.billed_seconds), TOTAL(m.cost_usd), TOTAL(m.on_demand_usd), TOTAL(m.ebs_usd),
       MAX(m.created_at), MIN(COALESCE(m.started_at, m.created_at)), {types}
FROM runs AS m {where}
GROUP BY substr(m.created_at, 1, 10), m.simulated"""

# The matched runs' summaries, newest first (all, or the ``:limit`` newest).
_RUNS = """
SELECT m.id, m.name, COALESCE(m.started_at, m.created_at), m.state, m.simulated,
       m.instance_types, m.instances, m.billed_seconds, m.cost_usd, m.on_demand_usd, m.ebs_usd
FROM runs AS m {where}
ORDER BY m.created_at DESC, m.id DESC {limit}"""

# The matched ended runs with a projected cost, and their bills.
_ESTIMATES = """
SELECT COUNT(*), TOTAL(m.projected_usd), TOTAL(m.cost_usd + m.ebs_usd),
       AVG(ABS(m.projected_usd - m.cost_usd - m.ebs_usd) / NULLIF(m.cost_usd + m.ebs_usd, 0))
FROM runs AS m WHERE m.projected_usd IS NOT NULL AND m.ended_at IS NOT NULL {and_where}"""

# Instances of the matched runs per (type, simulated): a run may mix types, so these
# come from the instances, from the covering index ``instances_types`` in group order.
# ``billed_seconds`` is NULL for the instances still running: the live part adds them.
_TYPES = """
SELECT i.instance_type, i.run_simulated, COUNT(*), COUNT(DISTINCT i.run_id),
       MAX(i.run_created_at), TOTAL(i.billed_seconds), TOTAL(i.billed_seconds * i.price_per_hour),
       TOTAL(i.billed_seconds * i.on_demand_per_hour),
       TOTAL(i.billed_seconds * i.disk_gb * i.ebs_per_gb_month)
FROM instances AS i {where}
GROUP BY i.instance_type, i.run_simulated"""


def _terms(created_at: str, since: datetime | None, until: datetime | None) -> list[str]:
    """The conditions selecting the runs created in [since, until)."""
    terms = []
    if since is not None:
        terms.append(f"{created_at} >= :since")
    if until is not None:
        terms.append(f"{created_at} < :until")
    return terms


def _where(terms: list[str]) -> str:
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


class _Group:
    """Running sums for one group (or one totals block)."""

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

    def add_sums(self, seconds: float, cost: float, od: float, ebs: float) -> None:
        """Add billed seconds and dollars."""
        self.seconds += seconds
        self.cost += cost
        self.od += od
        self.ebs += ebs

    def add_live(self, r: tuple[Any, ...]) -> None:
        """Add one row of ``_LIVE_INSTANCES``: its seconds up to now, and their price."""
        s = r[4]
        self.add_sums(s, s * r[5] / 3600.0, s * r[6] / 3600.0, s * r[7] / EBS_SECONDS_PER_MONTH)

    def add_runs(self, runs: int, latest: str, first: str = "") -> None:
        self.runs += runs
        if latest > self.latest:
            self.latest = latest
        if first and (not self.first or first < self.first):
            self.first = first

    def add(self, other: _Group) -> None:
        self.instances += other.instances
        self.runs += other.runs
        self.add_sums(other.seconds, other.cost, other.od, other.ebs)

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

    def row(self, key: str, simulated: bool, *, with_start: bool) -> CostRow:
        return CostRow(
            key=key,
            name=None,
            started_at=parse_iso(self.first) if with_start and self.first else None,
            state=None,
            instance_types=tuple(sorted(self.types)),
            instances=self.instances,
            runs=self.runs,
            hours=self.seconds / 3600.0,
            cost_usd=self.cost,
            on_demand_usd=self.od,
            ebs_usd=self.ebs,
            total_usd=self.cost + self.ebs,
            saving_pct=saving_pct(self.cost, self.od),
            simulated=simulated,
        )


class _Query:
    """The parameters of one report: the matched runs and the time ``now``."""

    def __init__(self, ledger: Ledger, since: datetime | None, until: datetime | None, now: datetime) -> None:
        self.ledger = ledger
        self.conn = ledger.connection
        self.where = _where(_terms("m.created_at", since, until))  # over runs AS m
        self.instance_terms = _terms("i.run_created_at", since, until)  # over instances AS i
        self.params: dict[str, object] = {"now": iso(now)}
        if since is not None:
            self.params["since"] = iso(since)
        if until is not None:
            self.params["until"] = iso(until)

    def estimates(self) -> Estimates:
        and_where = self.where.replace("WHERE", "AND", 1)
        runs, projected, billed, error = self.conn.execute(
            _ESTIMATES.format(and_where=and_where), self.params
        ).fetchone()
        return Estimates(runs, projected, billed, None if error is None else error * 100.0)

    def live(self) -> list[tuple[Any, ...]]:
        """The matched runs' instances still running (``_LIVE_INSTANCES`` rows)."""
        and_where = "".join(f" AND {term}" for term in self.instance_terms)
        return self.conn.execute(_LIVE_INSTANCES.format(and_where=and_where), self.params).fetchall()

    def days(self, live: list[tuple[Any, ...]], *, types: bool) -> dict[tuple[str, bool], _Group]:
        """Every matched run summed per (UTC day, simulated), the live part included."""
        groups: dict[tuple[str, bool], _Group] = {}
        sql = _DAYS.format(
            types="group_concat(DISTINCT NULLIF(m.instance_types, ''))" if types else "NULL",
            where=self.where,
        )
        for day, simulated, runs, instances, seconds, cost, od, ebs, latest, first, sets in self.conn.execute(
            sql, self.params
        ):
            group = groups[day, bool(simulated)] = _Group()
            group.add_runs(runs, latest, first)
            group.instances = int(instances)
            group.add_sums(seconds, cost, od, ebs)
            if sets:
                group.types.update(_split_types(sets))
        for r in live:
            groups.setdefault((r[2], bool(r[1])), _Group()).add_live(r)
        return groups

    def types(self, live: list[tuple[Any, ...]]) -> dict[tuple[str, bool], _Group]:
        """Every matched run's instances summed per (instance type, simulated)."""
        groups: dict[tuple[str, bool], _Group] = {}
        for itype, simulated, instances, runs, latest, seconds, cost_s, od_s, ebs_s in self.conn.execute(
            _TYPES.format(where=_where(self.instance_terms)), self.params
        ):
            group = groups[itype, bool(simulated)] = _Group()
            group.types.add(itype)
            group.instances = instances
            group.add_runs(runs, latest)
            group.add_sums(seconds, cost_s / 3600.0, od_s / 3600.0, ebs_s / EBS_SECONDS_PER_MONTH)
        for r in live:
            groups.setdefault((r[3], bool(r[1])), _Group()).add_live(r)
        return groups

    def runs(self, live: list[tuple[Any, ...]], limit: int | None) -> list[CostRow]:
        """One row per matched run (the ``limit`` newest), newest first."""
        live_by_run: dict[str, _Group] = {}
        for r in live:
            live_by_run.setdefault(r[0], _Group()).add_live(r)
        params = dict(self.params)
        if limit is not None:
            params["limit"] = limit
        sql = _RUNS.format(where=self.where, limit="LIMIT :limit" if limit is not None else "")
        rows: list[CostRow] = []
        append = rows.append
        for run_id, name, started, state, simulated, types, instances, s, cost, od, ebs in self.conn.execute(
            sql, params
        ):
            extra = live_by_run.get(run_id)
            if extra is not None:
                s += extra.seconds
                cost += extra.cost
                od += extra.od
                ebs += extra.ebs
            with self.ledger.reading(f" (run {run_id})"):  # a row changed outside cloudtrain
                started_at = parse_iso(started)
            append(
                CostRow(
                    run_id,
                    name,
                    started_at,
                    state,
                    tuple(types.split("+")) if types else (),
                    instances,
                    1,
                    s / 3600.0,
                    cost,
                    od,
                    ebs,
                    cost + ebs,
                    saving_pct(cost, od),
                    bool(simulated),
                )
            )
        return rows


def _split_types(sets: str) -> list[str]:
    """The instance types in ``group_concat``'s ','-joined '+'-joined sets."""
    return [t for t in re.split(r"[,+]", sets) if t]


def _totals(days: dict[tuple[str, bool], _Group]) -> dict[bool, _Group]:
    """The real and simulated totals, from the per-day groups."""
    totals = {False: _Group(), True: _Group()}
    for (_, simulated), group in days.items():
        totals[simulated].add(group)
    return totals


def _newest_first(groups: dict[tuple[str, bool], _Group]) -> list[tuple[tuple[str, bool], _Group]]:
    return sorted(groups.items(), key=lambda kv: (kv[1].latest, kv[0][0], kv[0][1]), reverse=True)


# --- the report -----------------------------------------------------------------------


def _check(group_by: str, limit: int | None = None) -> None:
    if group_by not in GROUP_BY_CHOICES:
        raise InputError(
            f"cannot group a cost report by {group_by!r}",
            hint=f"group by one of: {', '.join(GROUP_BY_CHOICES)}",
        )
    if limit is not None and limit < 0:
        raise InputError(f"limit must be 0 or more, not {limit}", hint="leave it out for all")


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

    Fast for the table (a ``limit``) and for per-day or per-type reports; every row
    of a large per-run report is better written by ``export``.
    """
    _check(group_by, limit)
    generated_at = now or utcnow()
    query = _Query(ledger, since, until, generated_at)
    with _snapshot(query.conn):
        live = query.live()
        estimates = query.estimates()
        days = query.days(live, types=group_by == "day")
        totals = _totals(days)
        if group_by == "run":
            rows = query.runs(live, limit)
            matched = totals[False].runs + totals[True].runs
        else:
            groups = _newest_first(days if group_by == "day" else query.types(live))
            matched = len(groups)
            if limit is not None:
                groups = groups[:limit]
            rows = [
                group.row(key, simulated, with_start=group_by == "day") for (key, simulated), group in groups
            ]

    return CostReport(
        group_by=group_by,
        since=since,
        until=until,
        generated_at=generated_at,
        rows=tuple(rows),
        real=totals[False].totals(),
        simulated=totals[True].totals(),
        matched=matched,
        estimates=estimates,
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
        **_json_head(report.group_by, report.since, report.until, report.generated_at, report.matched),
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


def _json_head(
    group_by: str, since: datetime | None, until: datetime | None, generated_at: datetime, matched: int
) -> dict[str, Any]:
    """The keys of the json document before its rows."""
    return {
        "schema": JSON_SCHEMA,
        "group_by": group_by,
        "since": iso(since) if since else None,
        "until": iso(until) if until else None,
        "generated_at": iso(generated_at),
        "matched": matched,
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


def _dumps(value: object) -> str:
    """Compact JSON, as SQLite's json functions write it."""
    return json.dumps(value, separators=(",", ":"))


def _live(column: str) -> str:
    """SQL: the live part of a run's ``column`` (of ``live``), for the few runs with an
    instance still running (``runs.running``; cheaper than joining every run)."""
    found = f"(SELECT l.{column} FROM live AS l WHERE l.run_id = m.id)"
    return f"CASE WHEN m.running THEN COALESCE({found}, 0) ELSE 0 END"


# The totals of an export, summed over its rows in the same pass: for real, then for
# simulated runs: runs, instances, seconds, cost, on demand, EBS.
_EXPORT_TOTALS = ", ".join(
    f"{total} FILTER (WHERE {which})"
    for which in ("NOT simulated", "simulated")
    for total in ("COUNT(*)", "TOTAL(instances)", "TOTAL(s)", "TOTAL(c)", "TOTAL(o)", "TOTAL(e)")
)

# Every matched run with its cost (the summary plus the live part), newest first, each
# formatted by SQLite (``{line}``, an expression over the subquery's columns) and joined
# by ``group_concat``; then ``_EXPORT_TOTALS``. The runs come from the covering index
# ``runs_created_at`` in its order (no sort). SQLite keeps the ORDER BY of a FROM-clause
# subquery when the outer query uses an aggregate other than count(), min() or max()
# (see ``sqlite3Select`` in its select.c), so ``group_concat`` joins the rows in that
# order; the tests check it. The subquery computes each run's numbers once.
_EXPORT_RUNS = f"""
WITH live AS MATERIALIZED (
    SELECT run_id, TOTAL(s) AS s, TOTAL(s * p) / 3600.0 AS c, TOTAL(s * o) / 3600.0 AS o,
           TOTAL(s * ge) / {float(EBS_SECONDS_PER_MONTH)} AS e
    FROM (SELECT i.run_id, {_LIVE_SECONDS} AS s, i.price_per_hour AS p,
                 i.on_demand_per_hour AS o, i.disk_gb * i.ebs_per_gb_month AS ge
          FROM instances AS i WHERE {_LIVE_WHERE})
    GROUP BY run_id
)
SELECT group_concat({{line}}, {{separator}}), {_EXPORT_TOTALS} FROM (
    SELECT m.id, m.name, COALESCE(m.started_at, m.created_at) AS started, m.state,
           m.simulated, m.plain_text, m.instance_types AS types, m.instances,
           m.billed_seconds + {_live("s")} AS s, m.cost_usd + {_live("c")} AS c,
           m.on_demand_usd + {_live("o")} AS o, m.ebs_usd + {_live("e")} AS e
    FROM runs AS m {{where}}
    ORDER BY m.created_at DESC, m.id DESC
)"""


def _printf_row(texts: Sequence[str], types: tuple[str, str], formats: tuple[str, str]) -> str:
    """SQL: a run's row by one ``printf`` (each call and argument counts, 100,000 times).

    ``texts``: the id, name, start and state, as arguments; ``types``: the instance
    types' argument when something was billed (then there are some), and when not;
    ``formats``: the same two ways, the second without a saving.
    """

    def args(types: str) -> str:
        return f"{', '.join(texts)}, {types}, instances, s / 3600.0, c, o, e, c + e"

    simulated = "CASE WHEN simulated THEN 'true' ELSE 'false' END"
    return (
        f"CASE WHEN o > 0"
        f" THEN printf('{formats[0]}', {args(types[0])}, 100.0 * (o - c) / o, {simulated})"
        f" ELSE printf('{formats[1]}', {args(types[1])}, {simulated}) END"
    )


def _plain_or_not(plain: str, other: str) -> str:
    """SQL: ``plain`` for a run whose text needs no quoting or escaping (most)."""
    return f"CASE WHEN plain_text THEN {plain} ELSE {other} END"


_TEXTS = ("id", "name", "started", "state")


def _csv_quoted(column: str) -> str:
    """SQL: ``column`` as csv writes it, quoted (quotes doubled) if it holds a comma,
    quote or line break."""
    return (
        f"""CASE WHEN {column} GLOB '*[,"' || char(10, 13) || ']*'"""
        f""" THEN '"' || replace({column}, '"', '""') || '"' ELSE {column} END"""
    )


_CSV_HEAD = "%s,%s,%s,%s,%s,%d,1,%.4f,%.4f,%.4f,%.4f,%.4f,"
_CSV_FORMATS = (_CSV_HEAD + "%.2f,%s", _CSV_HEAD + ",%s")
_CSV_LINE = _plain_or_not(
    _printf_row(_TEXTS, ("types", "types"), _CSV_FORMATS),
    _printf_row([_csv_quoted(text) for text in _TEXTS], (_csv_quoted("types"),) * 2, _CSV_FORMATS),
)

_JSON_NUMBERS = (
    ',"instances":%d,"runs":1,"hours":%.4f,"cost_usd":%.4f,"on_demand_usd":%.4f,"ebs_usd":%.4f'
    ',"total_usd":%.4f,"saving_pct":'
)
_JSON_TAILS = ('%.2f,"simulated":%s}', 'null,"simulated":%s}')
# plain text: the quotes are in the format; the types joined by '","'
_JSON_PLAIN = '{"key":"%s","name":"%s","started_at":"%s","state":"%s","instance_types":'
_JSON_PLAIN_TYPES = (
    "CASE WHEN instr(types, '+') THEN replace(types, '+', '\",\"') ELSE types END",
    "CASE WHEN types = '' THEN '' ELSE '\"' || replace(types, '+', '\",\"') || '\"' END",
)
# other text: JSON1's json_quote quotes and escapes it
_JSON_QUOTED = '{"key":%s,"name":%s,"started_at":%s,"state":%s,"instance_types":[%s]'
_JSON_QUOTED_TYPES = "CASE WHEN types = '' THEN '' ELSE replace(json_quote(types), '+', '\",\"') END"
_JSON_ROW = _plain_or_not(
    _printf_row(
        _TEXTS,
        _JSON_PLAIN_TYPES,
        (
            _JSON_PLAIN + '["%s"]' + _JSON_NUMBERS + _JSON_TAILS[0],
            _JSON_PLAIN + "[%s]" + _JSON_NUMBERS + _JSON_TAILS[1],
        ),
    ),
    _printf_row(
        [f"json_quote({text})" for text in _TEXTS],
        (_JSON_QUOTED_TYPES, _JSON_QUOTED_TYPES),
        (_JSON_QUOTED + _JSON_NUMBERS + _JSON_TAILS[0], _JSON_QUOTED + _JSON_NUMBERS + _JSON_TAILS[1]),
    ),
)


def export(
    ledger: Ledger,
    fmt: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    group_by: str = "run",
    now: datetime | None = None,
) -> str:
    """The whole report as ``csv`` or ``json`` text: every row, and (json) the totals.

    The content of ``to_csv`` / ``to_json`` of the unlimited ``cost_report`` (json
    compact, and both ending in a newline). Per run, SQLite formats the rows (see the
    module docstring); per day or instance type, a few hundred rows at most, the
    report is built and formatted here.
    """
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"cannot export a cost report as {fmt!r}", hint="Use csv or json.")
    _check(group_by)
    if group_by != "run":
        report = cost_report(ledger, since=since, until=until, group_by=group_by, now=now)
        return to_csv(report) if fmt == "csv" else _dumps(to_json(report)) + "\n"

    generated_at = now or utcnow()
    query = _Query(ledger, since, until, generated_at)
    if fmt == "csv":
        sql = _EXPORT_RUNS.format(line=_CSV_LINE, separator="char(10)", where=query.where)
    else:
        sql = _EXPORT_RUNS.format(line=_JSON_ROW, separator="','", where=query.where)
    text, *sums = query.conn.execute(sql, query.params).fetchone()
    totals = {False: _Group(), True: _Group()}
    for simulated, (runs, instances, seconds, cost, od, ebs) in ((False, sums[:6]), (True, sums[6:])):
        totals[simulated].runs, totals[simulated].instances = runs, int(instances)
        totals[simulated].add_sums(seconds, cost, od, ebs)
    if fmt == "csv":  # text: the lines
        header = ",".join((_KEY_COLUMN[group_by], *CSV_COLUMNS))
        return f"{header}\n{text}\n" if text else f"{header}\n"
    matched = totals[False].runs + totals[True].runs
    head = _dumps(_json_head(group_by, since, until, generated_at, matched))
    blocks = {"real": _totals_json(totals[False].totals()), "simulated": _totals_json(totals[True].totals())}
    # the head's keys, then the rows (text: the objects) and the totals: to_json's document
    return f'{head[:-1]},"rows":[{text or ""}],"totals":{_dumps(blocks)}}}\n'
