"""The run ledger on real SQLite files: schema and migrations, round-trips, references,
and several processes writing at once."""

from __future__ import annotations

import multiprocessing
import sqlite3
import stat
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from cloudtrain import ledger as ledger_mod
from cloudtrain.errors import InputError
from cloudtrain.ledger import EventRow, InstanceRow, Ledger, RunRow
from cloudtrain.records import Lifecycle, RunHandle, RunState, SshAddress
from cloudtrain.settings import Settings

T0 = datetime(2026, 3, 1, 10, 0, 0, tzinfo=timezone.utc)


def run_row(run_id: str, created: datetime = T0, **changes: object) -> RunRow:
    fields: dict[str, object] = {
        "id": run_id,
        "name": run_id.split("-")[0],
        "state": RunState.PLANNED,
        "created_at": created,
    }
    fields.update(changes)
    return RunRow(**fields)  # type: ignore[arg-type]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "state" / "ledger.sqlite") as led:
        yield led


# --- schema ----------------------------------------------------------------------------


def test_fresh_file_is_migrated_to_the_latest_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as led:
        conn = led.connection
        assert conn.execute("PRAGMA user_version").fetchone()[0] == ledger_mod.schema_version() == 3
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"runs", "instances", "events"} <= tables
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"runs_created_at", "instances_run_id", "events_run_id"} <= indexes
        assert {"runs_days", "instances_types", "instances_live"} <= indexes  # the report's
        triggers = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        assert {"instances_insert", "instances_update", "instances_delete", "runs_insert"} <= triggers
    # WAL is a property of the file: a plain connection sees it too
    plain = sqlite3.connect(path)
    try:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        plain.close()


def test_reopening_does_not_migrate_again_and_keeps_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counting(version: int, migrate: Callable[[sqlite3.Connection], None]) -> Any:
        def counted(conn: sqlite3.Connection) -> None:
            calls.append(version)
            migrate(conn)

        return counted

    monkeypatch.setattr(
        ledger_mod, "MIGRATIONS", [counting(n + 1, m) for n, m in enumerate(ledger_mod.MIGRATIONS)]
    )
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as led:
        led.create_run(run_row("keep-20260301-100000-aaaa"))
    with Ledger(path) as led:
        assert led.get_run("keep-20260301-100000-aaaa") is not None
        assert led.connection.execute("PRAGMA user_version").fetchone()[0] == 3
    assert calls == [1, 2, 3]


def test_migrations_apply_in_order_and_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def v2_broken(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE runs ADD COLUMN note TEXT")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [ledger_mod.MIGRATIONS[0], v2_broken])
    path = tmp_path / "ledger.sqlite"
    with pytest.raises(RuntimeError, match="migration bug"):
        Ledger(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        assert ("runs",) not in tables  # v1 was rolled back with the failing v2
    finally:
        conn.close()

    def v2(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE runs ADD COLUMN note TEXT")

    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [ledger_mod._migrate_v1, v2])
    with Ledger(path) as led:
        conn2 = led.connection
        assert conn2.execute("PRAGMA user_version").fetchone()[0] == 2
        columns = {r[1] for r in conn2.execute("PRAGMA table_info(runs)")}
        assert "note" in columns


def test_a_newer_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(InputError, match="schema version 99") as info:
        Ledger(path)
    assert info.value.hint and "upgrade cloudtrain" in info.value.hint


def test_a_file_that_is_not_a_database_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not sqlite at all, just some text " * 100)
    with pytest.raises(InputError, match="is damaged: file is not a database"):
        Ledger(path)


def test_open_uses_the_settings_home_and_creates_it_private(settings: Settings) -> None:
    assert not settings.home.exists()
    with Ledger.open(settings) as led:
        assert led.path == settings.ledger_path
    assert settings.ledger_path.is_file()
    assert stat.S_IMODE(settings.home.stat().st_mode) == 0o700
    assert stat.S_IMODE(settings.ledger_path.stat().st_mode) == 0o600


# --- runs ------------------------------------------------------------------------------


def test_run_round_trips_every_field(ledger: Ledger) -> None:
    run = RunRow(
        id="mnist-20260301-100000-abcd",
        name="mnist",
        state=RunState.SUCCEEDED,
        created_at=T0,
        job_path="/home/me/mnist/job.yaml",
        backend="theano",
        simulated=True,
        region="eu-west-1",
        started_at=T0 + timedelta(minutes=1),
        ended_at=T0 + timedelta(hours=2),
        run_dir="/home/me/.cloudtrain/runs/mnist-20260301-100000-abcd",
        exit_code=0,
        handle=RunHandle(
            plan={"type": "g4dn.xlarge", "spot": True},
            relaunches=2,
            ssh=SshAddress("127.0.0.1", 2222, "ubuntu", ("SHA256:abc",)),
            training_started=True,
        ),
    )
    ledger.create_run(run)
    back = ledger.get_run(run.id)
    assert back == run
    assert back is not None and back.created_at.tzinfo is not None
    assert back.created_at.utcoffset() == timedelta(0)
    assert isinstance(back.state, RunState)


def test_run_defaults_round_trip(ledger: Ledger) -> None:
    run = run_row("bare-20260301-100000-0000")
    ledger.create_run(run)
    back = ledger.get_run(run.id)
    assert back == run
    assert back is not None and back.handle == RunHandle() and back.simulated is False


def test_times_are_stored_as_iso_utc_text(ledger: Ledger) -> None:
    plus_two = timezone(timedelta(hours=2))
    ledger.create_run(run_row("tz-20260301-100000-0000", created=T0.astimezone(plus_two)))
    stored = ledger.connection.execute("SELECT created_at FROM runs").fetchone()[0]
    assert stored == "2026-03-01T10:00:00Z"


def test_create_run_twice_is_refused(ledger: Ledger) -> None:
    ledger.create_run(run_row("dup-20260301-100000-0000"))
    with pytest.raises(ValueError, match="already in the ledger"):
        ledger.create_run(run_row("dup-20260301-100000-0000"))


def test_update_run_changes_fields_and_the_handles_named_fields(ledger: Ledger) -> None:
    run_id = "upd-20260301-100000-0000"
    ledger.create_run(run_row(run_id, handle=RunHandle(instance_id="i-1", backend_report={"x": 1})))
    ledger.update_run(run_id, state=RunState.RUNNING, started_at=T0 + timedelta(minutes=2))
    ledger.update_run(run_id, handle={"log_base": 2, "backend_report": {"y": 2}})
    ledger.update_run(
        run_id,
        state=RunState.FAILED,
        ended_at=T0 + timedelta(hours=1),
        exit_code=3,
        run_dir="/runs/upd",
        handle={"instance_id": "i-10"},
    )
    back = ledger.get_run(run_id)
    assert back is not None
    assert back.state is RunState.FAILED
    assert back.started_at == T0 + timedelta(minutes=2)  # kept from the earlier update
    assert back.ended_at == T0 + timedelta(hours=1)
    assert back.exit_code == 3
    assert back.run_dir == "/runs/upd"
    # field by field: instance_id replaced, log_base kept, the report replaced as a whole value
    assert back.handle == RunHandle(instance_id="i-10", log_base=2, backend_report={"y": 2})
    with pytest.raises(TypeError, match="attempts"):  # a field the handle lacks
        ledger.update_run(run_id, handle={"attempts": 3})


def test_update_unknown_run_is_a_key_error(ledger: Ledger) -> None:
    with pytest.raises(KeyError):
        ledger.update_run("nope-20260301-100000-0000", state=RunState.FAILED)
    with pytest.raises(KeyError):
        ledger.update_run("nope-20260301-100000-0000")


def test_get_unknown_run_is_none(ledger: Ledger) -> None:
    assert ledger.get_run("missing") is None


def test_list_runs_newest_first_limit_and_active_only(ledger: Ledger) -> None:
    states = [RunState.SUCCEEDED, RunState.RUNNING, RunState.FAILED, RunState.LAUNCHING]
    for k, state in enumerate(states):
        ledger.create_run(run_row(f"r{k}-20260301-100000-0000", T0 + timedelta(hours=k), state=state))
    ledger.create_run(run_row("r9-20260301-100000-0000", T0 - timedelta(days=1), state=RunState.CANCELLED))
    assert [r.id[:2] for r in ledger.list_runs()] == ["r3", "r2", "r1", "r0", "r9"]
    assert [r.id[:2] for r in ledger.list_runs(limit=2)] == ["r3", "r2"]
    assert [r.id[:2] for r in ledger.list_runs(active_only=True)] == ["r3", "r1"]
    assert [r.id[:2] for r in ledger.list_runs(active_only=True, limit=1)] == ["r3"]


# --- resolve_run -----------------------------------------------------------------------


@pytest.fixture
def three_runs(ledger: Ledger) -> Ledger:
    for run_id in (
        "mnist-20260301-100000-aaaa",
        "mnist-20260301-110000-bbbb",
        "cifar-20260302-090000-cccc",
    ):
        ledger.create_run(run_row(run_id))
    return ledger


def test_resolve_run_exact_id(three_runs: Ledger) -> None:
    assert three_runs.resolve_run("mnist-20260301-100000-aaaa").id == "mnist-20260301-100000-aaaa"


def test_resolve_run_exact_id_wins_over_longer_ids_it_prefixes(ledger: Ledger) -> None:
    ledger.create_run(run_row("job-1"))
    ledger.create_run(run_row("job-10"))
    assert ledger.resolve_run("job-1").id == "job-1"


def test_resolve_run_unique_prefix(three_runs: Ledger) -> None:
    assert three_runs.resolve_run("cifar").id == "cifar-20260302-090000-cccc"
    assert three_runs.resolve_run("mnist-20260301-11").id == "mnist-20260301-110000-bbbb"


def test_resolve_run_ambiguous_lists_the_candidates(three_runs: Ledger) -> None:
    with pytest.raises(InputError) as info:
        three_runs.resolve_run("mnist")
    err = info.value
    assert err.message == "'mnist' matches more than one run"
    assert err.hint is not None
    assert "mnist-20260301-100000-aaaa" in err.hint
    assert "mnist-20260301-110000-bbbb" in err.hint
    assert "cifar" not in err.hint


def test_resolve_run_none_suggests_status(three_runs: Ledger) -> None:
    with pytest.raises(InputError) as info:
        three_runs.resolve_run("resnet")
    assert info.value.message == "no run matches 'resnet'"
    assert info.value.hint is not None and "cloudtrain status" in info.value.hint


def test_resolve_run_prefix_is_literal_not_a_pattern(three_runs: Ledger) -> None:
    with pytest.raises(InputError, match="no run matches"):
        three_runs.resolve_run("mn%")
    with pytest.raises(InputError, match="no run matches"):
        three_runs.resolve_run("MNIST")  # ids are case-sensitive


# --- instances and events --------------------------------------------------------------


def test_instance_round_trip_and_billing_times(ledger: Ledger) -> None:
    ledger.create_run(run_row("inst-20260301-100000-0000"))
    row = InstanceRow(
        id="i-0123456789abcdef0",
        run_id="inst-20260301-100000-0000",
        instance_type="g4dn.xlarge",
        zone="us-east-1b",
        lifecycle=Lifecycle.SPOT,
        price_per_hour=0.1578,
        on_demand_per_hour=0.526,
        launched_at=T0,
        disk_gb=100,
        ebs_per_gb_month=0.08,
    )
    ledger.record_instance(row)
    assert ledger.instances(row.run_id) == [row]
    ledger.instance_running(row.id, T0 + timedelta(seconds=40))
    ledger.instance_running(row.id, T0 + timedelta(seconds=90))  # only the first counts
    ledger.instance_terminated(row.id, T0 + timedelta(hours=1))
    (back,) = ledger.instances(row.run_id)
    assert back.running_at == T0 + timedelta(seconds=40)
    assert back.terminated_at == T0 + timedelta(hours=1)
    assert back.lifecycle is Lifecycle.SPOT
    assert (back.price_per_hour, back.on_demand_per_hour) == (0.1578, 0.526)
    assert (back.disk_gb, back.ebs_per_gb_month) == (100, 0.08)
    assert back.zone == "us-east-1b"


def test_instances_listed_in_launch_order_per_run(ledger: Ledger) -> None:
    ledger.create_run(run_row("a-20260301-100000-0000"))
    ledger.create_run(run_row("b-20260301-100000-0000"))
    for k, (iid, run) in enumerate([("i-2", "a"), ("i-1", "a"), ("i-3", "b")]):
        ledger.record_instance(
            InstanceRow(
                id=iid,
                run_id=f"{run}-20260301-100000-0000",
                instance_type="g5.xlarge",
                zone=None,
                lifecycle=Lifecycle.ON_DEMAND,
                price_per_hour=1.006,
                on_demand_per_hour=1.006,
                launched_at=T0 + timedelta(minutes=k),
            )
        )
    assert [i.id for i in ledger.instances("a-20260301-100000-0000")] == ["i-2", "i-1"]
    assert [i.id for i in ledger.instances("b-20260301-100000-0000")] == ["i-3"]
    assert ledger.instances("c") == []


def test_record_instance_again_updates_and_keeps_known_times(ledger: Ledger) -> None:
    ledger.create_run(run_row("re-20260301-100000-0000"))
    row = InstanceRow(
        id="i-re",
        run_id="re-20260301-100000-0000",
        instance_type="g4dn.xlarge",
        zone="us-east-1a",
        lifecycle=Lifecycle.SPOT,
        price_per_hour=0.2,
        on_demand_per_hour=0.526,
        launched_at=T0,
    )
    ledger.record_instance(row)
    ledger.instance_running("i-re", T0 + timedelta(minutes=1))
    ledger.record_instance(InstanceRow(**{**row.__dict__, "price_per_hour": 0.25}))
    (back,) = ledger.instances(row.run_id)
    assert back.price_per_hour == 0.25
    assert back.running_at == T0 + timedelta(minutes=1)


def test_instance_errors(ledger: Ledger) -> None:
    with pytest.raises(KeyError):
        ledger.record_instance(
            InstanceRow(
                id="i-orphan",
                run_id="no-such-run",
                instance_type="g4dn.xlarge",
                zone=None,
                lifecycle=Lifecycle.SPOT,
                price_per_hour=0.2,
                on_demand_per_hour=0.5,
                launched_at=T0,
            )
        )
    with pytest.raises(KeyError):
        ledger.instance_running("i-unknown", T0)
    with pytest.raises(KeyError):
        ledger.instance_terminated("i-unknown", T0)


def test_events_in_time_order(ledger: Ledger) -> None:
    run_id = "ev-20260301-100000-0000"
    ledger.add_event(run_id, "state", "launching", at=T0 + timedelta(seconds=5))
    ledger.add_event(run_id, "state", "planned", at=T0)
    ledger.add_event(run_id, "spot", "interruption notice", at=T0 + timedelta(seconds=5))
    ledger.add_event("other-run", "state", "planned", at=T0)
    assert ledger.events(run_id) == [
        EventRow(run_id, T0, "state", "planned"),
        EventRow(run_id, T0 + timedelta(seconds=5), "state", "launching"),
        EventRow(run_id, T0 + timedelta(seconds=5), "spot", "interruption notice"),
    ]


def test_event_time_defaults_to_now(ledger: Ledger) -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    ledger.add_event("now-run", "note", "hello")
    after = datetime.now(timezone.utc)
    (event,) = ledger.events("now-run")
    assert before <= event.at <= after


def test_failed_write_rolls_back_and_the_ledger_stays_usable(ledger: Ledger) -> None:
    ledger.create_run(run_row("tx-20260301-100000-0000"))
    with pytest.raises(TypeError):
        ledger.update_run("tx-20260301-100000-0000", handle={"bad": object()})
    assert not ledger.connection.in_transaction
    ledger.update_run("tx-20260301-100000-0000", state=RunState.RUNNING)
    back = ledger.get_run("tx-20260301-100000-0000")
    assert back is not None and back.state is RunState.RUNNING and back.handle == RunHandle()


# --- the cost summary the triggers keep -----------------------------------------------

SUMMARY = "instance_types, instances, running, billed_seconds, cost_usd, on_demand_usd, ebs_usd"


def summary(ledger: Ledger, run_id: str) -> tuple[object, ...]:
    row = ledger.connection.execute(f"SELECT {SUMMARY} FROM runs WHERE id = ?", (run_id,)).fetchone()
    return tuple(row)


def expected_summary(ledger: Ledger, run_id: str) -> tuple[object, ...]:
    """The summary computed here from the run's instances: 60 s minimum, whole seconds,
    nothing for a launch that never ran, instances still running left out."""
    instances = ledger.instances(run_id)
    over = [i for i in instances if i.running_at is None or i.terminated_at is not None]

    def seconds(i: InstanceRow) -> int:
        if i.running_at is None or i.terminated_at is None:
            return 0
        return max(60, round((i.terminated_at - i.running_at).total_seconds()))

    return (
        "+".join(sorted({i.instance_type for i in instances})),
        len(instances),
        len(instances) - len(over),
        sum(seconds(i) for i in over),
        sum(seconds(i) * i.price_per_hour for i in over) / 3600,
        sum(seconds(i) * i.on_demand_per_hour for i in over) / 3600,
        sum(seconds(i) * i.disk_gb * i.ebs_per_gb_month for i in over) / (730 * 3600),
    )


def assert_summary(ledger: Ledger, run_id: str) -> tuple[object, ...]:
    got, want = summary(ledger, run_id), expected_summary(ledger, run_id)
    assert got[:4] == want[:4]
    assert got[4:] == pytest.approx(want[4:], rel=1e-12, abs=1e-15)
    return got


def test_run_summary_follows_its_instances(ledger: Ledger) -> None:
    r1, r2 = "sum-20260301-100000-0001", "sum-20260301-100000-0002"
    ledger.create_run(run_row(r1))
    ledger.create_run(run_row(r2, simulated=True))
    assert summary(ledger, r1) == ("", 0, 0, 0, 0.0, 0.0, 0.0)
    first = InstanceRow(
        id="i-1",
        run_id=r1,
        instance_type="g5.xlarge",
        zone=None,
        lifecycle=Lifecycle.SPOT,
        price_per_hour=0.4,
        on_demand_per_hour=1.0,
        launched_at=T0,
        disk_gb=100,
        ebs_per_gb_month=0.08,
    )
    ledger.record_instance(first)  # launched, not yet running: nothing billed
    assert assert_summary(ledger, r1)[:4] == ("g5.xlarge", 1, 0, 0)
    ledger.instance_running("i-1", T0 + timedelta(seconds=40))  # running: billed at report time
    assert assert_summary(ledger, r1)[:4] == ("g5.xlarge", 1, 1, 0)
    ledger.instance_terminated("i-1", T0 + timedelta(hours=1))
    assert assert_summary(ledger, r1)[:4] == ("g5.xlarge", 1, 0, 3560)
    assert summary(ledger, r1)[4] == pytest.approx(3560 / 3600 * 0.4)
    # relaunched on another type for 30 s (billed 60), and a launch that never ran
    second = InstanceRow(**{**first.__dict__, "id": "i-2", "instance_type": "g4dn.xlarge"})
    ledger.record_instance(second)
    ledger.instance_running("i-2", T0 + timedelta(hours=2))
    ledger.instance_terminated("i-2", T0 + timedelta(hours=2, seconds=30))
    never = InstanceRow(**{**first.__dict__, "id": "i-3", "instance_type": "p3.2xlarge"})
    ledger.record_instance(never)
    ledger.instance_terminated("i-3", T0 + timedelta(hours=3))
    assert assert_summary(ledger, r1)[:4] == ("g4dn.xlarge+g5.xlarge+p3.2xlarge", 3, 0, 3620)
    # recorded again (recovery): the new price counts, the known times stay
    ledger.record_instance(InstanceRow(**{**first.__dict__, "price_per_hour": 0.5}))
    assert summary(ledger, r1)[4] == pytest.approx((3560 * 0.5 + 60 * 0.4) / 3600)
    assert_summary(ledger, r1)
    # recorded again under another run: both runs' summaries follow
    ledger.record_instance(InstanceRow(**{**second.__dict__, "run_id": r2}))
    assert assert_summary(ledger, r1)[:4] == ("g5.xlarge+p3.2xlarge", 2, 0, 3560)
    assert assert_summary(ledger, r2)[:4] == ("g4dn.xlarge", 1, 0, 60)
    # instances carry their run's creation and flag (the per-type report reads them)
    copies = ledger.connection.execute(
        "SELECT id, run_created_at, run_simulated FROM instances ORDER BY id"
    ).fetchall()
    assert copies == [
        ("i-1", "2026-03-01T10:00:00Z", 0),
        ("i-2", "2026-03-01T10:00:00Z", 1),
        ("i-3", "2026-03-01T10:00:00Z", 0),
    ]
    # any writer keeps them: a raw delete, a raw change of the run
    with ledger.connection:
        ledger.connection.execute("DELETE FROM instances WHERE id = 'i-3'")
        ledger.connection.execute("UPDATE runs SET simulated = 0 WHERE id = ?", (r2,))
    assert assert_summary(ledger, r1)[:4] == ("g5.xlarge", 1, 0, 3560)
    assert ledger.connection.execute("SELECT run_simulated FROM instances WHERE id = 'i-2'").fetchone() == (
        0,
    )
    # other run fields change without touching the summary
    before = summary(ledger, r1)
    ledger.update_run(
        r1, state=RunState.SUCCEEDED, ended_at=T0 + timedelta(hours=4), handle={"relaunches": 1}
    )
    assert summary(ledger, r1) == before


def test_plain_text_flag(ledger: Ledger) -> None:
    ledger.create_run(run_row("plain-20260301-100000-0000"))
    ledger.create_run(run_row("odd-20260301-100000-0000", name='with "quotes", commas'))
    ledger.create_run(run_row("utf-20260301-100000-0000", name="données"))

    def flags() -> dict[str, int]:
        return dict(ledger.connection.execute("SELECT id, plain_text FROM runs").fetchall())

    assert flags() == {
        "plain-20260301-100000-0000": 1,
        "odd-20260301-100000-0000": 0,
        "utf-20260301-100000-0000": 0,
    }
    ledger.update_run("plain-20260301-100000-0000", state=RunState.RUNNING, started_at=T0)
    assert flags()["plain-20260301-100000-0000"] == 1
    ledger.record_instance(
        InstanceRow(
            id="i-odd",
            run_id="plain-20260301-100000-0000",
            instance_type="odd\\type",
            zone=None,
            lifecycle=Lifecycle.SPOT,
            price_per_hour=0.2,
            on_demand_per_hour=0.5,
            launched_at=T0,
        )
    )
    assert flags()["plain-20260301-100000-0000"] == 0


# --- several processes at once ---------------------------------------------------------

WORKERS = 6
RUNS_PER_WORKER = 25
EVENTS_PER_RUN = 3


def _writer(path: str, worker: int, barrier: object, results: object) -> None:
    """Runs in a child process: open the (maybe not yet created) ledger and write."""
    try:
        barrier.wait()  # type: ignore[attr-defined]
        with Ledger(Path(path), timeout=60.0) as led:
            for k in range(RUNS_PER_WORKER):
                run_id = f"w{worker}-20260301-100000-{k:04x}"
                led.create_run(run_row(run_id, T0 + timedelta(seconds=k)))
                for e in range(EVENTS_PER_RUN):
                    led.add_event(run_id, "state", f"step {e}", at=T0 + timedelta(seconds=e))
                led.record_instance(
                    InstanceRow(
                        id=f"i-{worker}-{k}",
                        run_id=run_id,
                        instance_type="g4dn.xlarge",
                        zone=None,
                        lifecycle=Lifecycle.SPOT,
                        price_per_hour=0.2,
                        on_demand_per_hour=0.5,
                        launched_at=T0,
                    )
                )
                led.update_run(run_id, state=RunState.SUCCEEDED, handle={"relaunches": worker})
                led.list_runs(limit=5)  # readers interleave with the writers
        results.put((worker, "ok"))  # type: ignore[attr-defined]
    except BaseException:
        results.put((worker, traceback.format_exc()))  # type: ignore[attr-defined]


def test_concurrent_writers_from_several_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    path = tmp_path / "shared" / "ledger.sqlite"  # created by the racing workers themselves
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(path), w, barrier, results)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    failures = {w: out for w, out in outcomes.items() if out != "ok"}
    assert not failures, failures  # includes any "database is locked"
    assert sorted(outcomes) == list(range(WORKERS))

    with Ledger(path) as led:
        runs = led.list_runs()
        assert len(runs) == WORKERS * RUNS_PER_WORKER
        assert len({r.id for r in runs}) == WORKERS * RUNS_PER_WORKER
        assert all(r.state is RunState.SUCCEEDED for r in runs)
        for w in range(WORKERS):
            for k in range(RUNS_PER_WORKER):
                run_id = f"w{w}-20260301-100000-{k:04x}"
                assert [e.message for e in led.events(run_id)] == ["step 0", "step 1", "step 2"]
                assert [i.id for i in led.instances(run_id)] == [f"i-{w}-{k}"]
                got = led.get_run(run_id)
                assert got is not None and got.handle == RunHandle(relaunches=w)
        assert led.connection.execute("PRAGMA user_version").fetchone()[0] == ledger_mod.schema_version()
        n_events = led.connection.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        assert n_events == WORKERS * RUNS_PER_WORKER * EVENTS_PER_RUN
