"""The run ledger: one SQLite file recording every run, its instances and its events.

The ledger is what ``cloudtrain status`` and ``cloudtrain cost-report`` read, and what
the orchestrator writes as a run moves through its lifecycle. Several cloudtrain
processes may use the same file at once (a ``run`` in one terminal, ``status`` in
another), so:

- the journal is WAL (readers never block the writer) and every connection sets a
  ``busy_timeout``, so a writer waits for another's lock instead of failing;
- every write is one short ``BEGIN IMMEDIATE`` transaction (take the write lock
  first, so a read can never need upgrading mid-transaction);
- the schema is versioned with ``PRAGMA user_version`` and an ordered list of
  migration functions, applied together in one transaction when the file is opened.

Times are stored as ISO 8601 UTC text (``records.iso``) and parsed back with
``records.parse_iso``. A leaf module: the standard library and cloudtrain's records,
errors and settings only.

Cost summaries are kept at write time: the requirement is a cost report in under a
second on a ledger of 100,000 runs (``benchmarks/ledger_bench.py``), and summing every
instance's billed seconds at report time (julianday arithmetic over a run x instance
join) takes about that long on its own. So the schema materialises what the report
reads, in columns that triggers on ``runs`` and ``instances`` keep, inside the very
transaction that writes (``create_run``, ``update_run``, ``record_instance``,
``instance_running``, ``instance_terminated``, or raw SQL such as the benchmark's bulk
fill):

- ``instances.billed_seconds``: whole seconds, at least 60, for an instance that ran
  and was terminated; 0 for one that never reached running (it costs nothing); NULL
  while it runs (the report bills it up to *now*, finding it by the small partial
  index ``instances_live``). ``instances.run_created_at`` and ``run_simulated`` copy
  the run's, so the per-instance-type report reads one covering index, no join;
- on each run, over its instances (recomputed from them whenever one changes):
  ``instance_types`` (sorted, unique, ``+``-joined), ``instances``, ``running`` (how
  many still run), and the sums ``billed_seconds``, ``cost_usd``, ``on_demand_usd``
  and ``ebs_usd`` over those with known billed seconds;
- ``runs.plain_text``: 1 when the run's texts that an export writes need no csv
  quoting or json escaping (printable ASCII without a quote, comma or backslash).

They are plain columns rather than generated ones because SQLite does not answer a
query from a covering index that holds a generated column.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from cloudtrain.errors import InputError, LedgerError
from cloudtrain.records import Lifecycle, RunHandle, RunState, iso, parse_iso, utcnow
from cloudtrain.settings import Settings

log = logging.getLogger(__name__)

FINISHED_STATES: tuple[str, ...] = tuple(s.value for s in RunState if s.finished)
_MAX_CANDIDATES = 10  # how many matching ids an ambiguous-reference hint lists


@dataclass(frozen=True)
class RunRow:
    """One run as the ledger stores it."""

    id: str
    name: str
    state: RunState
    created_at: datetime
    job_path: str | None = None
    backend: str | None = None
    simulated: bool = False
    region: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    run_dir: str | None = None
    exit_code: int | None = None
    handle: RunHandle = field(default_factory=RunHandle)
    projected_usd: float | None = None  # the whole run's cost, as projected after its first epoch


@dataclass(frozen=True)
class InstanceRow:
    """One instance launched for a run. ``running_at`` None: it never ran, costs nothing."""

    id: str
    run_id: str
    instance_type: str
    zone: str | None
    lifecycle: Lifecycle
    price_per_hour: float
    on_demand_per_hour: float
    launched_at: datetime
    disk_gb: int = 0
    ebs_per_gb_month: float = 0.0
    running_at: datetime | None = None
    terminated_at: datetime | None = None


@dataclass(frozen=True)
class EventRow:
    """A timestamped line in a run's history (state changes, interruptions, ...)."""

    run_id: str
    at: datetime
    kind: str
    message: str


# --- secrets: never written ----------------------------------------------------------

REDACTED = "***"
MIN_REDACTED_LEN = 4  # shorter values would blot out ids and times, and hide nothing


def secret_values(values: Iterable[str]) -> tuple[str, ...]:
    """The values to redact, longest first (a secret that holds another goes whole)."""
    return tuple(sorted({v for v in values if len(v) >= MIN_REDACTED_LEN}, key=lambda v: (-len(v), v)))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret value replaced by ``REDACTED``."""
    for value in secret_values(secrets):
        text = text.replace(value, REDACTED)
    return text


# --- schema -------------------------------------------------------------------------

MIN_BILLED_SECONDS = 60  # EC2 Linux: per second, with a 60 s minimum per instance
EBS_SECONDS_PER_MONTH = 730 * 3600  # AWS prices EBS per GB-month of 730 hours

# An instance's billed seconds once it is over (see the module docstring): whole
# seconds (the times are; ROUND drops julianday's float error), at least the minimum;
# 0 if it never ran, NULL while it runs.
_BILLED_SECONDS = f"""CASE
    WHEN running_at IS NULL THEN 0
    WHEN terminated_at IS NULL THEN NULL
    ELSE MAX({MIN_BILLED_SECONDS}, CAST(ROUND(
        (julianday(terminated_at) - julianday(running_at)) * 86400.0) AS INTEGER))
END"""


def _plain_text(*texts: str) -> str:
    """SQL: 1 when the texts are printable ASCII without a quote, comma or backslash.

    Such text needs no csv quoting and no json escaping, so an export may write a run
    whose texts are all plain as they are, which makes exporting every run markedly
    cheaper (``runs.plain_text``; the report escapes the others).
    """
    joined = " || ".join(texts)
    return f"""(({joined}) NOT GLOB '*[^ -~]*' AND ({joined}) NOT GLOB '*[",\\]*')"""


def _run_texts(table: str = "") -> tuple[str, ...]:
    """A run's own texts that an export writes (``table``: a qualifying prefix)."""
    return (
        f"{table}id",
        f"{table}name",
        f"{table}state",
        f"{table}created_at",
        f"COALESCE({table}started_at, '')",
    )


def _refresh_run_summary(run_id: str, condition: str = "") -> str:
    """SQL (for a trigger body) recomputing one run's summary columns from its instances."""
    return f"""
    UPDATE runs SET (instance_types, instances, running, billed_seconds, cost_usd, on_demand_usd,
                     ebs_usd, plain_text) = (
        SELECT types, n, n - billed, s, c, o, e, {_plain_text(*_run_texts("runs."), "types")}
        FROM (SELECT COALESCE((
                         SELECT group_concat(instance_type, '+') FROM (
                             SELECT DISTINCT instance_type FROM instances WHERE run_id = {run_id}
                             ORDER BY instance_type)
                     ), '') AS types,
                     COUNT(*) AS n,
                     COUNT(billed_seconds) AS billed,
                     TOTAL(billed_seconds) AS s,
                     TOTAL(billed_seconds * price_per_hour) / 3600.0 AS c,
                     TOTAL(billed_seconds * on_demand_per_hour) / 3600.0 AS o,
                     TOTAL(billed_seconds * disk_gb * ebs_per_gb_month)
                         / {float(EBS_SECONDS_PER_MONTH)} AS e
              FROM instances WHERE run_id = {run_id}))
    WHERE id = {run_id}{condition};"""


# What an instance's billing, and so its run's summary, depends on.
_INSTANCE_BILLING = (
    "run_id, instance_type, price_per_hour, on_demand_per_hour, disk_gb, ebs_per_gb_month,"
    " running_at, terminated_at"
)
# An instance's derived columns: its billed seconds, and its run's creation and flag.
_SET_INSTANCE_DERIVED = f"""
    UPDATE instances SET billed_seconds = {_BILLED_SECONDS},
        (run_created_at, run_simulated) = (SELECT created_at, simulated FROM runs WHERE id = NEW.run_id)
    WHERE rowid = NEW.rowid;"""
# A run's creation or flag changed: its instances' copies follow.
_SET_INSTANCES_RUN = """
    UPDATE instances SET run_created_at = NEW.created_at, run_simulated = NEW.simulated
    WHERE run_id = NEW.id;"""
_SET_PLAIN_TEXT = (
    f"UPDATE runs SET plain_text = {_plain_text(*_run_texts(), 'instance_types')} WHERE rowid = NEW.rowid;"
)


def _migrate_v1(conn: sqlite3.Connection) -> None:
    """The first schema: runs (with their cost summary), instances, events, the
    triggers that keep the summary and the indexes the report uses."""
    statements = [
        """
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            job_path TEXT,
            backend TEXT,
            state TEXT NOT NULL,
            simulated INTEGER NOT NULL DEFAULT 0,
            region TEXT,
            created_at TEXT NOT NULL,
            started_at TEXT,
            ended_at TEXT,
            run_dir TEXT,
            exit_code INTEGER,
            detail TEXT NOT NULL DEFAULT '{}',
            -- kept by the triggers (see the module docstring)
            instance_types TEXT NOT NULL DEFAULT '',
            instances INTEGER NOT NULL DEFAULT 0,
            running INTEGER NOT NULL DEFAULT 0,
            billed_seconds INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0,
            on_demand_usd REAL NOT NULL DEFAULT 0,
            ebs_usd REAL NOT NULL DEFAULT 0,
            plain_text INTEGER NOT NULL DEFAULT 0
        )
        """,
        """
        CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            instance_type TEXT NOT NULL,
            zone TEXT,
            lifecycle TEXT NOT NULL,
            price_per_hour REAL NOT NULL,
            on_demand_per_hour REAL NOT NULL,
            disk_gb INTEGER NOT NULL DEFAULT 0,
            ebs_per_gb_month REAL NOT NULL DEFAULT 0,
            launched_at TEXT NOT NULL,
            running_at TEXT,
            terminated_at TEXT,
            -- kept by the triggers: the billed seconds, and copies of the run's columns
            -- that the per-type report groups and filters by (it needs no join then)
            billed_seconds INTEGER,
            run_created_at TEXT,
            run_simulated INTEGER
        )
        """,
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            at TEXT NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL
        )
        """,
        # Each trigger's own UPDATE sets a column outside its UPDATE OF list, so it
        # never fires itself. The summary refresh does not set runs' own texts either.
        f"CREATE TRIGGER runs_insert AFTER INSERT ON runs BEGIN {_SET_PLAIN_TEXT} END",
        f"CREATE TRIGGER runs_update AFTER UPDATE OF id, name, state, created_at, started_at"
        f" ON runs BEGIN {_SET_PLAIN_TEXT} END",
        f"CREATE TRIGGER runs_update_instances AFTER UPDATE OF created_at, simulated ON runs BEGIN"
        f" {_SET_INSTANCES_RUN} END",
        f"CREATE TRIGGER instances_insert AFTER INSERT ON instances BEGIN {_SET_INSTANCE_DERIVED}"
        f" {_refresh_run_summary('NEW.run_id')} END",
        f"CREATE TRIGGER instances_update AFTER UPDATE OF {_INSTANCE_BILLING} ON instances BEGIN"
        f" {_SET_INSTANCE_DERIVED} {_refresh_run_summary('NEW.run_id')}"
        f" {_refresh_run_summary('OLD.run_id', ' AND OLD.run_id IS NOT NEW.run_id')} END",
        f"CREATE TRIGGER instances_delete AFTER DELETE ON instances BEGIN"
        f" {_refresh_run_summary('OLD.run_id')} END",
        # newest first (status, the report's rows), covering what an export of every
        # run reads
        "CREATE INDEX runs_created_at ON runs(created_at, id, name, state, started_at, simulated,"
        " plain_text, instance_types, instances, running, billed_seconds, cost_usd, on_demand_usd,"
        " ebs_usd)",
        # the run summaries in (UTC day, simulated) order, covering what the report's
        # totals and per-day rows read
        "CREATE INDEX runs_days ON runs(substr(created_at, 1, 10), simulated, created_at,"
        " started_at, instance_types, instances, billed_seconds, cost_usd, on_demand_usd,"
        " ebs_usd)",
        # by run, covering what the summary triggers read
        "CREATE INDEX instances_run_id ON instances(run_id, instance_type, billed_seconds,"
        " price_per_hour, on_demand_per_hour, disk_gb, ebs_per_gb_month)",
        # by type and real/simulated, covering what the per-type report reads
        "CREATE INDEX instances_types ON instances(instance_type, run_simulated, run_id,"
        " run_created_at, billed_seconds, price_per_hour, on_demand_per_hour, disk_gb,"
        " ebs_per_gb_month)",
        # the instances still running (billed up to now at report time): few rows
        "CREATE INDEX instances_live ON instances(run_id, instance_type, run_created_at,"
        " run_simulated, running_at, price_per_hour, on_demand_per_hour, disk_gb, ebs_per_gb_month)"
        " WHERE terminated_at IS NULL AND running_at IS NOT NULL",
        "CREATE INDEX events_run_id ON events(run_id, at)",
    ]
    for statement in statements:
        conn.execute(statement)


def _migrate_v2(conn: sqlite3.Connection) -> None:
    """A run's handle (records.RunHandle) in one column, ``handle``: v1's ``detail`` object,
    rewritten in the handle's form. A key no cloudtrain wrote (an edit by hand) is dropped,
    with a warning: it would mean nothing to the handle."""
    conn.execute("ALTER TABLE runs RENAME COLUMN detail TO handle")
    known = {f.name for f in fields(RunHandle)}
    for run_id, text in conn.execute("SELECT id, handle FROM runs").fetchall():
        try:
            stored = json.loads(text or "{}")
            handle = RunHandle.from_json({k: v for k, v in stored.items() if k in known})
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("ledger: run %s: its detail is not a run handle (%s); kept empty", run_id, e)
            handle, stored = RunHandle(), {}
        dropped = sorted(set(stored) - known)
        if dropped:
            log.warning("ledger: run %s: dropped detail keys no cloudtrain writes: %s", run_id, dropped)
        conn.execute("UPDATE runs SET handle = ? WHERE id = ?", (_dump_handle(handle), run_id))


def _migrate_v3(conn: sqlite3.Connection) -> None:
    """``projected_usd``: what the run was projected to cost after its first epoch, to
    measure the estimate against the bill."""
    conn.execute("ALTER TABLE runs ADD COLUMN projected_usd REAL")


# Ordered: MIGRATIONS[n] takes a version-n file to version n + 1. Append, never edit a
# released one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_v1, _migrate_v2, _migrate_v3]


def schema_version() -> int:
    """The schema version this cloudtrain writes."""
    return len(MIGRATIONS)


# --- the ledger -----------------------------------------------------------------------


class Ledger:
    """A connection to the ledger file; migrates the schema on open.

    One ``Ledger`` per thread (sqlite3 connections are not shared across threads);
    any number per process or across processes.
    """

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._secrets: tuple[str, ...] = ()  # redacted from the texts written (``redact``)
        try:
            _prepare_file(self.path)
            conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except (OSError, sqlite3.DatabaseError) as e:
            raise self.unusable(e) from e
        self._conn = conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._enable_wal()
            conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode
            self._migrate()
        except sqlite3.DatabaseError as e:
            conn.close()
            raise self.unusable(e) from e
        except BaseException:
            conn.close()
            raise

    def unusable(self, error: BaseException) -> LedgerError:
        """What is wrong with the ledger file, and what to do: it is never reset by cloudtrain."""
        text = str(error) or type(error).__name__
        if "locked" in text or "busy" in text:
            return LedgerError(
                f"the ledger {self.path} is busy: {text}",
                hint="Another cloudtrain holds it (a long write, or a process stopped mid-write): "
                "run the command again; nothing is wrong with the file.",
            )
        if isinstance(error, OSError) or any(
            word in text for word in ("readonly", "read-only", "unable to open", "disk I/O", "full")
        ):
            return LedgerError(
                f"cannot use the ledger {self.path}: {text}",
                hint="Its folder must be writable and have free space; or set CLOUDTRAIN_HOME to a "
                "writable folder (that starts another ledger).",
            )
        return LedgerError(
            f"the ledger {self.path} is damaged: {text}",
            hint=f"cloudtrain never resets it: restore a backup, or move it aside "
            f"(mv {self.path} {self.path}.damaged) to start a new one, which knows none of its runs.",
        )

    @contextmanager
    def reading(self, what: str = "") -> Iterator[None]:
        """Decoding what the file holds: a damaged file or row becomes a LedgerError."""
        try:
            yield
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as e:
            if type(e) not in (sqlite3.DatabaseError, sqlite3.OperationalError):
                raise
            raise self.unusable(e) from e
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise LedgerError(
                f"the ledger {self.path} holds a damaged row{what}: {e}",
                hint="A row was changed outside cloudtrain: restore a backup, or fix the row with sqlite3.",
            ) from e

    @classmethod
    def open(cls, settings: Settings) -> Ledger:
        """The ledger under the settings' home (``settings.ledger_path``)."""
        return cls(settings.ledger_path)

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying connection, for read-only queries (``report.py``)."""
        return self._conn

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        # Only this file raises these; a constraint or a misused API (IntegrityError,
        # ProgrammingError) is cloudtrain's bug, not the file's.
        if exc is not None and type(exc) in (sqlite3.DatabaseError, sqlite3.OperationalError):
            raise self.unusable(exc) from exc

    # --- opening ------------------------------------------------------------------

    def _enable_wal(self) -> None:
        """Switch the file to WAL (persistent, so only the first open really does it).

        Changing the journal mode needs an exclusive lock and can report SQLITE_BUSY
        without consulting the busy handler when several processes create the file at
        once, so retry until the timeout.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                row = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
                continue
            mode = str(row[0]).lower() if row else ""
            if mode != "wal":
                log.warning("ledger %s: journal mode is %s, not wal", self.path, mode)
            return

    def _migrate(self) -> None:
        """Bring the schema up to date: all pending migrations in one transaction."""
        known = schema_version()
        with self._write():
            current = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            if current > known:
                raise InputError(
                    f"the ledger {self.path} has schema version {current}, "
                    f"newer than this cloudtrain understands ({known})",
                    hint="upgrade cloudtrain, or set CLOUDTRAIN_HOME to use another ledger",
                )
            for version in range(current, known):
                MIGRATIONS[version](self._conn)
                log.info("ledger %s: migrated to schema version %d", self.path, version + 1)
            if current != known:
                self._conn.execute(f"PRAGMA user_version = {known}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, taking the write lock up front.

        BEGIN is inside the ``try``: a Ctrl-C that lands once it has begun (say, while
        it waited for another writer's lock) rolls it back, or every later write of this
        connection (teardown's included) would fail with "cannot start a transaction
        within a transaction"."""
        conn = self._conn
        nested = conn.in_transaction  # a misuse: BEGIN fails, and the outer one is not ours
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction and not nested:
                conn.execute("ROLLBACK")
            raise

    # --- runs ---------------------------------------------------------------------

    def create_run(self, run: RunRow) -> None:
        """Record a new run. A run id already in the ledger raises ``ValueError``."""
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO runs (id, name, job_path, backend, state, simulated, region,"
                    " created_at, started_at, ended_at, run_dir, exit_code, handle)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run.id,
                        run.name,
                        run.job_path,
                        run.backend,
                        RunState(run.state).value,
                        int(run.simulated),
                        run.region,
                        iso(run.created_at),
                        _iso_or_none(run.started_at),
                        _iso_or_none(run.ended_at),
                        run.run_dir,
                        run.exit_code,
                        _dump_handle(run.handle),
                    ),
                )
            except sqlite3.IntegrityError as e:
                raise ValueError(f"run {run.id} is already in the ledger") from e

    def update_run(
        self,
        run_id: str,
        *,
        state: RunState | None = None,
        started_at: datetime | None = None,
        ended_at: datetime | None = None,
        exit_code: int | None = None,
        run_dir: str | None = None,
        handle: Mapping[str, Any] | None = None,
        projected_usd: float | None = None,
    ) -> None:
        """Change the given fields (None: leave as is); ``handle`` names the fields of the
        run's handle to change (``RunHandle.changed``). An unknown run raises ``KeyError``."""
        with self._write() as conn:
            row = conn.execute("SELECT handle FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            changes: dict[str, object] = {}
            if state is not None:
                changes["state"] = RunState(state).value
            if started_at is not None:
                changes["started_at"] = iso(started_at)
            if ended_at is not None:
                changes["ended_at"] = iso(ended_at)
            if exit_code is not None:
                changes["exit_code"] = exit_code
            if run_dir is not None:
                changes["run_dir"] = run_dir
            if projected_usd is not None:
                changes["projected_usd"] = projected_usd
            if handle:
                with self.reading(f" (run {run_id})"):
                    stored = _load_handle(row[0])
                changes["handle"] = _dump_handle(stored.changed(**handle))
            if changes:
                assignments = ", ".join(f"{column} = ?" for column in changes)
                conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*changes.values(), run_id))

    def get_run(self, run_id: str) -> RunRow | None:
        with self.reading(f" (run {run_id})"):
            found = self._conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
            return _run_row(found) if found is not None else None

    def resolve_run(self, ref: str) -> RunRow:
        """The run whose id is ``ref``, or the one run whose id starts with it."""
        ref = ref.strip()
        if not ref:
            raise InputError("no run given", hint="`cloudtrain status` lists the runs")
        exact = self.get_run(ref)
        if exact is not None:
            return exact
        with self.reading():
            rows = self._conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE id >= ? AND id < ?"
                " ORDER BY created_at DESC, id DESC LIMIT ?",
                (ref, ref + "\U0010ffff", _MAX_CANDIDATES + 1),
            ).fetchall()
            if len(rows) == 1:
                return _run_row(rows[0])
        if not rows:
            raise InputError(
                f"no run matches {ref!r}",
                hint="`cloudtrain status` lists the runs in the ledger",
            )
        ids = [str(r[0]) for r in rows[:_MAX_CANDIDATES]]
        more = ", ..." if len(rows) > _MAX_CANDIDATES else ""
        raise InputError(
            f"{ref!r} matches more than one run",
            hint=f"give more of the id; candidates: {', '.join(ids)}{more}",
        )

    def list_runs(self, *, limit: int | None = None, active_only: bool = False) -> list[RunRow]:
        """Runs, newest first; ``active_only``: those not yet finished."""
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        params: list[object] = []
        if active_only:
            sql += f" WHERE state NOT IN ({', '.join('?' for _ in FINISHED_STATES)})"
            params.extend(FINISHED_STATES)
        sql += " ORDER BY created_at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        with self.reading():
            return [_run_row(r) for r in self._conn.execute(sql, params)]

    def runs_left_behind(self) -> set[str]:
        """Runs whose teardown left something in the cloud: a ``teardown-incomplete``
        event with no ``down`` (or ``gc``: ``cloudtrain gc`` removed the rest) event after it."""
        rows = self._conn.execute(
            "SELECT DISTINCT e.run_id FROM events e WHERE e.kind = 'teardown-incomplete' AND NOT EXISTS "
            "(SELECT 1 FROM events d WHERE d.run_id = e.run_id AND d.kind IN ('down', 'gc') AND d.id > e.id)"
        )
        return {str(r[0]) for r in rows}

    # --- instances ------------------------------------------------------------------

    def record_instance(self, row: InstanceRow) -> None:
        """Record an instance launched for a run (unknown run: ``KeyError``).

        Recording the same instance id again (recovery after a crash finds it by its
        tags) updates it; a known running/terminated time is kept unless given anew.
        """
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE id = ?", (row.run_id,)).fetchone() is None:
                raise KeyError(row.run_id)
            conn.execute(
                "INSERT INTO instances (id, run_id, instance_type, zone, lifecycle,"
                " price_per_hour, on_demand_per_hour, disk_gb, ebs_per_gb_month, launched_at,"
                " running_at, terminated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET run_id = excluded.run_id,"
                " instance_type = excluded.instance_type, zone = excluded.zone,"
                " lifecycle = excluded.lifecycle, price_per_hour = excluded.price_per_hour,"
                " on_demand_per_hour = excluded.on_demand_per_hour, disk_gb = excluded.disk_gb,"
                " ebs_per_gb_month = excluded.ebs_per_gb_month,"
                " launched_at = excluded.launched_at,"
                " running_at = COALESCE(excluded.running_at, running_at),"
                " terminated_at = COALESCE(excluded.terminated_at, terminated_at)",
                (
                    row.id,
                    row.run_id,
                    row.instance_type,
                    row.zone,
                    Lifecycle(row.lifecycle).value,
                    float(row.price_per_hour),
                    float(row.on_demand_per_hour),
                    int(row.disk_gb),
                    float(row.ebs_per_gb_month),
                    iso(row.launched_at),
                    _iso_or_none(row.running_at),
                    _iso_or_none(row.terminated_at),
                ),
            )

    def instance_running(self, instance_id: str, at: datetime) -> None:
        """The instance reached running (billing starts). Only the first call counts."""
        self._set_instance_time(instance_id, "running_at", at)

    def instance_terminated(self, instance_id: str, at: datetime) -> None:
        """The instance was terminated (billing stops). Only the first call counts."""
        self._set_instance_time(instance_id, "terminated_at", at)

    def _set_instance_time(self, instance_id: str, column: str, at: datetime) -> None:
        with self._write() as conn:
            cursor = conn.execute(
                f"UPDATE instances SET {column} = COALESCE({column}, ?) WHERE id = ?",
                (iso(at), instance_id),
            )
            if cursor.rowcount == 0:
                raise KeyError(instance_id)

    def instances(self, run_id: str) -> list[InstanceRow]:
        """A run's instances in launch order (a group of nodes: in rank order)."""
        with self.reading(f" (an instance of run {run_id})"):
            return self._instances(run_id)

    def _instances(self, run_id: str) -> list[InstanceRow]:
        rows = self._conn.execute(
            "SELECT id, run_id, instance_type, zone, lifecycle, price_per_hour,"
            " on_demand_per_hour, launched_at, disk_gb, ebs_per_gb_month, running_at,"
            " terminated_at FROM instances WHERE run_id = ? ORDER BY launched_at, rowid",
            (run_id,),
        )
        return [
            InstanceRow(
                id=r[0],
                run_id=r[1],
                instance_type=r[2],
                zone=r[3],
                lifecycle=Lifecycle(r[4]),
                price_per_hour=float(r[5]),
                on_demand_per_hour=float(r[6]),
                launched_at=parse_iso(r[7]),
                disk_gb=int(r[8]),
                ebs_per_gb_month=float(r[9]),
                running_at=_parse_or_none(r[10]),
                terminated_at=_parse_or_none(r[11]),
            )
            for r in rows
        ]

    # --- secrets --------------------------------------------------------------------

    def redact(self, secrets: Iterable[str]) -> None:
        """From now on, write each of ``secrets`` (a run's ``secrets:`` values) as ``***``
        wherever free text reaches the ledger: event messages, which carry error messages
        and remote output. (Run handles hold ids, addresses and reports made before any
        secret reaches the instance; they are left as they are, so no id is ever blotted.)"""
        self._secrets = secret_values((*self._secrets, *secrets))

    # --- events ---------------------------------------------------------------------

    def add_event(self, run_id: str, kind: str, message: str, at: datetime | None = None) -> None:
        """Append a line to a run's history (``at`` defaults to now); secrets redacted."""
        if self._secrets:
            message = redact(message, self._secrets)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO events (run_id, at, kind, message) VALUES (?, ?, ?, ?)",
                (run_id, iso(at or utcnow()), kind, message),
            )

    def events(self, run_id: str) -> list[EventRow]:
        """A run's events, oldest first (ties in the order they were added)."""
        with self.reading(f" (an event of run {run_id})"):
            rows = self._conn.execute(
                "SELECT run_id, at, kind, message FROM events WHERE run_id = ? ORDER BY at, id",
                (run_id,),
            )
            return [EventRow(run_id=r[0], at=parse_iso(r[1]), kind=r[2], message=r[3]) for r in rows]


# --- helpers --------------------------------------------------------------------------

_RUN_COLUMNS = (
    "id, name, state, created_at, job_path, backend, simulated, region,"
    " started_at, ended_at, run_dir, exit_code, handle, projected_usd"
)


def _run_row(r: tuple[Any, ...]) -> RunRow:
    return RunRow(
        id=r[0],
        name=r[1],
        state=RunState(r[2]),
        created_at=parse_iso(r[3]),
        job_path=r[4],
        backend=r[5],
        simulated=bool(r[6]),
        region=r[7],
        started_at=_parse_or_none(r[8]),
        ended_at=_parse_or_none(r[9]),
        run_dir=r[10],
        exit_code=r[11],
        handle=_load_handle(r[12]),
        projected_usd=r[13],
    )


def _prepare_file(path: Path) -> None:
    """Create the parent folder (mode 0700) and the file (mode 0600) if missing."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
    if not path.exists():
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return  # another process created it just now
        os.close(fd)


def _iso_or_none(dt: datetime | None) -> str | None:
    return iso(dt) if dt is not None else None


def _parse_or_none(text: str | None) -> datetime | None:
    return parse_iso(text) if text else None


def _dump_handle(handle: RunHandle) -> str:
    return json.dumps(handle.to_json(), sort_keys=True, separators=(",", ":"))


def _load_handle(text: str | None) -> RunHandle:
    """The stored handle; a damaged one raises ValueError or TypeError (Ledger.reading)."""
    value = json.loads(text or "{}")
    if not isinstance(value, dict):
        raise ValueError(f"its handle is not an object: {text[:80] if text else text!r}")
    return RunHandle.from_json(value)
