"""The controller's side of spot interruptions, in pieces: --simulate-interruption's
syntax, what counts as a complete checkpoint, and swapping one in."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_run_e2e import CLOUDTRAIN
from test_simhost import client_key, host, make_host  # noqa: F401  (fixtures)

from cloudtrain.cloud.siminterrupt import SimulatedInterruption
from cloudtrain.errors import InputError
from cloudtrain.recovery import checkpoint_complete, last_checkpoint, swap_in


@pytest.mark.parametrize(
    ("text", "epoch", "seconds"),
    [("epoch:3", 3, None), ("90s", None, 90), (" epoch:12 ", 12, None), ("0s", None, 0)],
)
def test_interruption_syntax(text: str, epoch: int | None, seconds: int | None) -> None:
    parsed = SimulatedInterruption.parse(text)
    assert (parsed.epoch, parsed.seconds) == (epoch, seconds)
    assert SimulatedInterruption.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "epoch", "seconds"), [("epoch:12:no-notice", 12, None), ("0s:no-notice", None, 0)]
)
def test_an_interruption_without_notice(text: str, epoch: int | None, seconds: int | None) -> None:
    parsed = SimulatedInterruption.parse(text)
    assert (parsed.epoch, parsed.seconds, parsed.notice) == (epoch, seconds, False)
    assert str(parsed) == text and SimulatedInterruption.parse(str(parsed)) == parsed
    assert SimulatedInterruption.parse(text.removesuffix(":no-notice")).notice


@pytest.mark.parametrize(
    "text", ["epoch:0", "epoch:", "3", "90", "1m", "epoch:x", "-5s", "no-notice", "epoch:3:nonotice", "5s:"]
)
def test_bad_interruption_refused(text: str) -> None:
    with pytest.raises(InputError, match="expected epoch:N or Ns"):
        SimulatedInterruption.parse(text)


@pytest.mark.parametrize(
    ("text", "node", "epoch", "notice"),
    [("node1:epoch:3", 1, 3, True), ("node2:epoch:4:no-notice", 2, 4, False), ("node0:epoch:2", 0, 2, True)],
)
def test_an_interruption_of_one_node(text: str, node: int, epoch: int, notice: bool) -> None:
    parsed = SimulatedInterruption.parse(text)
    assert (parsed.node, parsed.epoch, parsed.notice) == (node, epoch, notice)
    assert SimulatedInterruption.parse(str(parsed)) == parsed
    assert SimulatedInterruption.parse("epoch:3").node == 0


@pytest.mark.parametrize("text", ["node:epoch:3", "nodeA:epoch:3", "node1", "node1:", "epoch:3:node1"])
def test_bad_node_interruption_refused(text: str) -> None:
    with pytest.raises(InputError, match="nodeK"):
        SimulatedInterruption.parse(text)


def test_epoch_marker_is_keras_progress_line() -> None:
    at = SimulatedInterruption.parse("epoch:3")
    assert at.due_in_log("Epoch 3/10") and at.due_in_log("  Epoch 3/10\r")
    assert not at.due_in_log("Epoch 13/20") and not at.due_in_log("Epoch 2/10")
    assert not SimulatedInterruption.parse("5s").due_in_log("Epoch 3/10")


def write_checkpoint(folder: Path, epoch: int, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    listing = {name: {"size": len(data)} for name, data in files.items()}
    (folder / "manifest.json").write_text(json.dumps({"schema": 1, "epoch": epoch, "files": listing}))


def test_a_checkpoint_is_complete_only_with_its_manifest_and_every_file(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "good", 3, {"weights.h5": b"w", "sub/optimizer.npz": b"o"})
    assert (checkpoint_complete(tmp_path / "good") or {}).get("epoch") == 3
    write_checkpoint(tmp_path / "partial", 4, {"weights.h5": b"w"})
    (tmp_path / "partial" / "weights.h5").unlink()
    assert checkpoint_complete(tmp_path / "partial") is None
    (tmp_path / "nomanifest").mkdir()
    (tmp_path / "nomanifest" / "weights.h5").write_bytes(b"w")
    assert checkpoint_complete(tmp_path / "nomanifest") is None
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "manifest.json").write_text("{not json")
    assert checkpoint_complete(tmp_path / "garbled") is None


def test_swap_in_replaces_the_old_checkpoint_only_once_the_new_is_there(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "checkpoint", 2, {"weights.h5": b"old"})
    write_checkpoint(tmp_path / "incoming", 3, {"weights.h5": b"new"})
    swap_in(tmp_path / "incoming", tmp_path / "checkpoint")
    assert (tmp_path / "checkpoint" / "weights.h5").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_swap_cut_short_still_leaves_a_checkpoint_to_restore(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "checkpoint.old", 2, {"weights.h5": b"old"})  # renamed away, then killed
    found = last_checkpoint(tmp_path)
    assert found is not None and found[0] == tmp_path / "checkpoint.old" and found[1]["epoch"] == 2
    write_checkpoint(tmp_path / "checkpoint", 3, {"weights.h5": b"new"})
    assert (last_checkpoint(tmp_path) or (None, {}))[1]["epoch"] == 3
    assert last_checkpoint(tmp_path / "nothing") is None


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLOUDTRAIN, *args], capture_output=True, text=True, timeout=120)


def test_simulate_interruption_needs_dry_run_and_a_valid_at(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: j\nrun: python t.py\n")
    real = cli("run", str(job), "--yes", "--simulate-interruption", "epoch:2")
    assert real.returncode == 2 and "--simulate-interruption needs --dry-run" in real.stderr
    bad = cli("run", str(job), "--dry-run", "--simulate-interruption", "soon")
    assert bad.returncode == 2 and "expected epoch:N or Ns" in bad.stderr


# --- `logs -f` across a relaunch (the ledger's side) ------------------------------------


def _following(settings: Any) -> tuple[Any, str]:
    from datetime import datetime, timezone

    from cloudtrain.ledger import Ledger, RunRow
    from cloudtrain.records import RunHandle, RunState

    ledger = Ledger.open(settings)
    run_id = "job-20261128-100000-abcd"
    ledger.create_run(
        RunRow(
            id=run_id,
            name="job",
            state=RunState.RUNNING,
            created_at=datetime(2026, 11, 28, 10, tzinfo=timezone.utc),
            handle=RunHandle(instance_id="i-1", training_started=True),
        )
    )
    return ledger, run_id


def test_logs_follow_waits_for_the_relaunch_and_gives_up_when_nothing_changes(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from cloudtrain import api
    from cloudtrain.errors import CloudError

    monkeypatch.setattr(api, "LOGS_POLL_S", 0.02)
    monkeypatch.setattr(api, "LOGS_RELAUNCH_WAIT_S", 0.3)
    ledger, run_id = _following(settings)
    with pytest.raises(CloudError, match="has not gone on since i-1 was taken away") as gave_up:
        api._until_relaunched(ledger, run_id, "i-1")
    assert f"cloudtrain attach {run_id}" in (gave_up.value.hint or "")

    def relaunch() -> None:  # each change restarts the wait; training on another instance ends it
        from cloudtrain.ledger import Ledger

        with Ledger.open(settings) as controller:  # another process's view, as in real life
            for step in ({"relaunches": 1, "training_started": False}, {"instance_id": "i-2"}):
                controller.update_run(run_id, handle=step)  # as the controller's _recover does
                time.sleep(1.0)  # 2 s in all, more than the wait: each change restarts it
            controller.update_run(run_id, handle={"training_started": True})

    monkeypatch.setattr(api, "LOGS_RELAUNCH_WAIT_S", 1.5)
    threading.Timer(0.2, relaunch).start()
    run = api._until_relaunched(ledger, run_id, "i-1")
    assert run.handle.instance_id == "i-2" and run.handle.training_started


@pytest.mark.parametrize(
    ("relaunches_now", "log_base_now", "expected"),
    [
        (1, 1000, 1300),  # not relaunched: the controller's copy of the lost one, past what was shown
        (2, 1250, 1250),  # relaunched: the rest of the lost one the controller got, then the next
        (2, 1500, 1300),
        (2, 1000, 1000),  # a detached run relaunched by attach: nothing of the lost one came home
    ],
)
def test_what_logs_follow_shows_when_the_run_ends_while_it_waits(
    relaunches_now: int, log_base_now: int, expected: int
) -> None:
    from types import SimpleNamespace

    from cloudtrain.api import _unshown
    from cloudtrain.records import RunHandle

    run = SimpleNamespace(handle=RunHandle(relaunches=relaunches_now, log_base=log_base_now))
    lost = SimpleNamespace(log_base=1000, relaunches=1)  # 300 bytes of it were shown
    assert _unshown(run, lost, 300) == expected


# --- the keeper against a trainer that saves faster than a copy takes ----------------------

# A stand-in trainer: the agent's real Store, a save of 4 files x 2 MB every 20 ms.
FAST_SAVER = """
import os, sys, time
from cloudtrain.agent.checkpoint import Store
store, blob = Store(sys.argv[1]), os.urandom(2 << 20)
epoch = 0
while True:
    epoch += 1
    names = ("weights.npz", "optimizer.npz", "extra.npz", "state.json")
    payload = {n: epoch.to_bytes(8, "big") + blob for n in names}
    store.save(0, epoch, payload, {"epochs": 10**9, "complete": False}, {"flavour": "test"})
    time.sleep(0.02)
"""


def test_the_keeper_brings_home_whole_saves_from_a_trainer_saving_faster_than_a_copy(
    host: Any, client_key: Any, tmp_path: Path
) -> None:
    from test_session import endpoint

    from cloudtrain.agent import checkpoint
    from cloudtrain.recovery import CheckpointKeeper, pull_checkpoint
    from cloudtrain.remote.agent import REMOTE_AGENT, REMOTE_CHECKPOINT, RemoteAgent
    from cloudtrain.remote.session import Session

    remote = host.home / REMOTE_CHECKPOINT
    session = Session(endpoint(host, client_key, tmp_path)).connect()
    RemoteAgent(session, "tensorflow").install()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with open(tmp_path / "saver.log", "wb") as err:
        saver = subprocess.Popen(
            [sys.executable, "-c", FAST_SAVER, str(remote)], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
    copies: list[tuple[int, int]] = []  # (epoch copied, epoch the trainer had saved when it landed)

    def on_event(kind: str, message: str) -> None:
        found = re.search(r"checkpoint of epoch (\d+) copied home", message)
        if found:
            latest = json.loads((remote / "manifest.json").read_text())["epoch"]
            copies.append((int(found.group(1)), latest))

    def pull(session: Session, dest: Path) -> None:
        pull_checkpoint(
            session, dest, remote_python=sys.executable, remote_agent_path=f"$HOME/{REMOTE_AGENT}"
        )

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    keeper = CheckpointKeeper(
        session, run_dir, pull, notice_path=".cloudtrain/run/notice.json", on_event=on_event, poll_s=1.0
    )
    try:
        while not (remote / "manifest.json").exists():
            assert saver.poll() is None, (tmp_path / "saver.log").read_text()
            time.sleep(0.05)
        started = time.monotonic()
        with keeper:
            while len(copies) < 3 and time.monotonic() - started < 10.0:  # a few keeper periods
                time.sleep(0.05)
    finally:
        saver.kill()
        saver.wait()
        session.close()
    assert saver.returncode == -9, (tmp_path / "saver.log").read_text()
    assert len(copies) >= 3, f"{len(copies)} checkpoint(s) came home in 10 s, of a trainer saving every 20 ms"
    # The premise: the trainer saved at least twice while a copy was under way, so the
    # folders the copied manifest named were pruned on the instance before it landed.
    assert max(latest - epoch for epoch, latest in copies) >= 2, copies
    assert [epoch for epoch, _ in copies] == sorted({epoch for epoch, _ in copies})  # each a newer save
    home = run_dir / "checkpoint"
    manifest = checkpoint.verify(str(home))  # every file there, at its sha256
    assert manifest is not None and manifest["epoch"] == copies[-1][0]
    assert sorted(p.name for p in home.iterdir()) == sorted(
        [manifest["fits"]["0"]["folder"], "manifest.json"]
    )
    # Nothing is left on the instance by the copies' snapshots.
    assert not [p.name for p in (host.home / ".cloudtrain").iterdir() if p.name.startswith(".pack-snapshot")]


# --- the one loop of recovery, against scripted phases -----------------------------------


class Script:
    """PhaseSteps whose phases fail as told: ``fail[phase]`` lists the errors of its next
    calls (None: that call works). ``relaunch`` relaunches on an InstanceLost (up to
    ``max_relaunches``) and raises anything else again, as the orchestrator's does."""

    def __init__(self, fail: dict[str, list[Any]], exit_codes: list[int], max_relaunches: int = 3) -> None:
        self.fail = fail
        self.exit_codes = exit_codes
        self.max_relaunches = max_relaunches
        self.calls: list[str] = []
        self.relaunches = 0

    def _step(self, name: str) -> None:
        self.calls.append(name)
        errors = self.fail.get(name) or [None]
        error = errors.pop(0) if len(errors) > 1 or errors[0] is not None else None
        if error is not None:
            raise error

    def steps(self) -> Any:
        from cloudtrain.recovery import PhaseSteps

        def train() -> int:
            self._step("train")
            return self.exit_codes.pop(0)

        def relaunch(error: Any) -> None:
            from cloudtrain.errors import CloudError
            from cloudtrain.recovery import InstanceLost

            self.calls.append("relaunch")
            if not isinstance(error, InstanceLost):
                raise error
            self.relaunches += 1
            if self.relaunches > self.max_relaunches:
                raise CloudError("interrupted too often") from error

        return PhaseSteps(
            bring_up=lambda: self._step("bring_up"),
            train=train,
            pull=lambda: self._step("pull"),
            relaunch=relaunch,
        )


def _lost(n: int = 1) -> Any:
    from cloudtrain.recovery import InstanceLost

    return InstanceLost(f"i-{n}", "terminated")


def test_phases_without_a_loss_run_once_in_order() -> None:
    from cloudtrain.recovery import run_phases

    script = Script({}, [0])
    assert run_phases(script.steps()) == 0
    assert script.calls == ["bring_up", "train", "pull"]


@pytest.mark.parametrize(
    ("lost_in", "calls"),
    [
        ("bring_up", ["bring_up", "relaunch", "bring_up", "train", "pull"]),
        ("train", ["bring_up", "train", "relaunch", "bring_up", "train", "pull"]),
        # the finished training's checkpoint is restored: the command runs again and pulls anew
        ("pull", ["bring_up", "train", "pull", "relaunch", "bring_up", "train", "pull"]),
    ],
)
def test_an_instance_lost_in_any_phase_starts_over_at_bring_up(lost_in: str, calls: list[str]) -> None:
    from cloudtrain.recovery import run_phases

    script = Script({lost_in: [_lost(), None]}, [0, 0])
    assert run_phases(script.steps()) == 0
    assert script.calls == calls and script.relaunches == 1


def test_a_failed_command_is_never_run_again_when_its_pull_fails() -> None:
    from cloudtrain.recovery import run_phases

    script = Script({"pull": [_lost(), None]}, [3])
    with pytest.raises(type(_lost())):
        run_phases(script.steps())
    assert script.calls == ["bring_up", "train", "pull"]  # no relaunch asked for


def test_an_error_on_a_live_instance_ends_the_loop_as_it_is() -> None:
    from cloudtrain.errors import RemoteError
    from cloudtrain.recovery import run_phases

    refused = RemoteError("the recipe failed")
    script = Script({"bring_up": [refused, None]}, [0])
    with pytest.raises(RemoteError) as caught:
        run_phases(script.steps())
    assert caught.value is refused and script.calls == ["bring_up", "relaunch"]


def test_the_loop_gives_up_when_relaunch_does() -> None:
    from cloudtrain.errors import CloudError
    from cloudtrain.recovery import run_phases

    script = Script({"train": [_lost(1), _lost(2), _lost(3), None]}, [0] * 4, max_relaunches=2)
    with pytest.raises(CloudError, match="too often"):
        run_phases(script.steps())
    assert script.calls.count("bring_up") == 3 and script.relaunches == 3


def test_detach_stops_once_training_has_started_and_attach_starts_at_train() -> None:
    from cloudtrain.recovery import Phase, run_phases

    script = Script({"bring_up": [_lost(), None]}, [0])
    assert run_phases(script.steps(), until=Phase.TRAIN) is None
    assert script.calls == ["bring_up", "relaunch", "bring_up"]
    attached = Script({"train": [_lost(), None]}, [7])
    assert run_phases(attached.steps(), Phase.TRAIN) == 7
    assert attached.calls == ["train", "relaunch", "bring_up", "train", "pull"]


# --- relaunch decisions, against a fake cloud --------------------------------------------


class FakeCloud:
    """The cloud at the orchestrator's boundary: instances by id, each in a state AWS
    could report; a launch hands out the next id, running at once."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}
        self.types: dict[str, tuple[str, str]] = {}
        self.launches: list[tuple[str, str | None, str]] = []  # (type, zone, client token)
        self.terminated: list[str] = []

    def describe(self, instance_id: str) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(state=self.states[instance_id])

    def terminate(self, instance_id: str) -> Any:
        from cloudtrain.records import utcnow

        self.states[instance_id] = "terminated"
        self.terminated.append(instance_id)
        return utcnow()

    def launch(self, request: Any) -> str:
        instance_id = f"i-{len(self.states) + 1}"
        self.states[instance_id] = "pending"
        self.types[instance_id] = (request.instance_type, request.zone)
        self.launches.append((request.instance_type, request.zone, request.client_token))
        return instance_id

    def wait_running(self, instance_id: str) -> Any:
        from cloudtrain.cloud.aws import LaunchedInstance
        from cloudtrain.records import utcnow

        self.states[instance_id] = "running"
        kind, zone = self.types[instance_id]
        return LaunchedInstance(instance_id, kind, zone, "spot", "203.0.113.9", utcnow(), "running")


@pytest.fixture
def relaunching(settings: Any, tmp_path: Path) -> Any:
    """An orchestrator whose run trains on i-1 (g4dn.xlarge in us-east-1a) of a fake cloud."""
    from test_launch import planned

    from cloudtrain.cloud.aws import KeyPair
    from cloudtrain.ledger import Ledger
    from cloudtrain.orchestrator import Orchestrator
    from cloudtrain.progress import Reporter

    the_plan = planned(tmp_path, "  gpu: T4\n")
    ledger = Ledger.open(settings)
    orchestrator = Orchestrator(
        the_plan.job,
        settings,
        ledger,
        region="us-east-1",
        out_dir=tmp_path / "runs",
        plan=the_plan,
        reporter=Reporter(),
    )
    ctx = orchestrator.start()
    cloud = FakeCloud()
    ctx.cloud = cloud
    ctx.image, ctx.key = object(), KeyPair("k", tmp_path / "k.pem")
    ctx.handle = ctx.handle.changed(security_group_id="sg-1")
    orchestrator._launch_instance(ctx, [the_plan.choice], token=ctx.run_id)
    ctx.log_offset = 500  # bytes of its log came home
    yield orchestrator, ctx, cloud
    ledger.close()


def test_a_lost_instance_is_replaced_on_an_offer_not_lost_and_the_ledger_says_so(relaunching: Any) -> None:
    from cloudtrain.errors import RemoteError
    from cloudtrain.records import RunState

    orchestrator, ctx, cloud = relaunching
    ((first_type, first_zone, _),) = cloud.launches
    cloud.states["i-1"] = "terminated"  # AWS took it
    orchestrator._recover(ctx, RemoteError("the connection dropped"))
    assert cloud.terminated == ["i-1"]  # confirmed gone before the next one
    assert ctx.instance_id == "i-2" and cloud.launches[1][2] == f"{ctx.run_id}-r1-1"
    assert cloud.launches[1][:2] != (first_type, first_zone)
    run = orchestrator.ledger.get_run(ctx.run_id)
    assert run.state is RunState.RECOVERING
    assert (run.handle.instance_id, run.handle.relaunches, run.handle.log_base) == ("i-2", 1, 500)
    assert run.handle.training_started is False and ctx.log_offset == 0
    assert [i.terminated_at is not None for i in orchestrator.ledger.instances(ctx.run_id)] == [True, False]


def test_an_error_on_a_live_instance_is_raised_and_nothing_launched(relaunching: Any) -> None:
    from cloudtrain.errors import RemoteError

    orchestrator, ctx, cloud = relaunching
    error = RemoteError("the recipe failed")
    with pytest.raises(RemoteError) as caught:
        orchestrator._recover(ctx, error)
    assert caught.value is error and len(cloud.launches) == 1 and cloud.terminated == []


def test_relaunches_stop_after_the_limit_with_the_lost_instance_ended(relaunching: Any) -> None:
    from cloudtrain.errors import CloudError
    from cloudtrain.orchestrator import MAX_RELAUNCHES
    from cloudtrain.recovery import InstanceLost

    orchestrator, ctx, cloud = relaunching
    for _ in range(MAX_RELAUNCHES):
        cloud.states[ctx.instance_id] = "stopped"
        orchestrator._recover(ctx, InstanceLost(ctx.instance_id, "stopped"))
    last = ctx.instance_id
    cloud.states[last] = "terminated"
    with pytest.raises(CloudError, match=f"giving up after {MAX_RELAUNCHES} relaunches"):
        orchestrator._recover(ctx, InstanceLost(last, "terminated"))
    assert cloud.terminated[-1] == last and len(cloud.launches) == MAX_RELAUNCHES + 1


def test_a_resumed_run_with_no_way_to_plan_does_not_relaunch(relaunching: Any) -> None:
    from cloudtrain.recovery import InstanceLost

    orchestrator, ctx, cloud = relaunching
    orchestrator.plan = orchestrator.replan = None  # attach without a catalog to plan from
    cloud.states["i-1"] = "terminated"
    with pytest.raises(InstanceLost):
        orchestrator._recover(ctx, InstanceLost("i-1", "terminated"))
    assert len(cloud.launches) == 1


# --- budget, salvage and --keep, against a fake agent and the fake cloud -----------------


class FakeAgent:
    """The agent on the instance, at the orchestrator's boundary: the log it hands back, and
    what it was told; a step given an exception raises it."""

    def __init__(self, log: bytes = b"", *, tail_error: Exception | None = None) -> None:
        self.log = log
        self.metrics_file = b""
        self.tail_error = tail_error
        self.collected_with: list[str | None] = []
        self.collect_error: Exception | None = None
        self.renewed: list[str] = []
        self.renew_error: Exception | None = None

    def tail(self, offset: int, sink: Any, *, follow: bool = False, for_s: float | None = None) -> int:
        if self.tail_error is not None:
            raise self.tail_error
        sink(self.log[offset:])
        return 0

    def metrics(self, offset: int) -> bytes:
        return self.metrics_file[offset:]

    def collected(self, keep_until: str | None = None) -> None:
        if self.collect_error is not None:
            raise self.collect_error
        self.collected_with.append(keep_until)

    def renew(self, deadline: str) -> None:
        if self.renew_error is not None:
            raise self.renew_error
        self.renewed.append(deadline)


class FakeSession:
    """A connection to the instance; ``stuck`` makes reconnecting hang until released."""

    def __init__(self) -> None:
        import threading

        self.stuck = threading.Event()
        self.release = threading.Event()
        self.closed = False

    def reconnect(self, *, deadline_s: float = 120.0) -> FakeSession:
        if self.stuck.is_set():
            self.release.wait(10)
        return self

    def close(self) -> None:
        self.closed = True


class FakeKeeper:
    """The checkpoint keeper: counts its last rounds; ``error`` makes them fail."""

    def __init__(self, error: Exception | None = None) -> None:
        self.final_rounds = 0
        self.error = error

    def final_round(self, session: Any) -> None:
        self.final_rounds += 1
        if self.error is not None:
            raise self.error


@pytest.fixture
def on_instance(relaunching: Any) -> Any:
    """The relaunching run, trained on i-1 with a session and a fake agent there."""
    orchestrator, ctx, cloud = relaunching
    agent = FakeAgent()
    orchestrator._remote_agent = lambda session, backend: agent
    ctx.session = FakeSession()
    ctx.handle = ctx.handle.changed(training_started=True)
    ctx.log_offset = 0
    yield orchestrator, ctx, cloud, agent


def events(orchestrator: Any, ctx: Any, kind: str) -> list[str]:
    return [e.message for e in orchestrator.ledger.events(ctx.run_id) if e.kind == kind]


@pytest.mark.parametrize("keeper_error", [None, "the copy failed"])
def test_a_cost_budget_reached_brings_the_checkpoint_home_then_stops(
    on_instance: Any, keeper_error: str | None
) -> None:
    from cloudtrain.errors import BudgetError, RemoteError
    from cloudtrain.spec import Budget

    orchestrator, ctx, _, _ = on_instance
    orchestrator.spec = orchestrator.spec.model_copy(update={"budget": Budget(max_cost_usd=0.001)})
    keeper = FakeKeeper(RemoteError(keeper_error) if keeper_error else None)
    with pytest.raises(BudgetError, match=r"0\.001") as caught:  # a minute at $0.20/h is $0.0033
        orchestrator._check_budget(ctx, keeper)
    assert keeper.final_rounds == 1  # tried, even when it fails: the run still stops
    assert "job.yaml" in (caught.value.hint or "") and caught.value.exit_code == 4
    assert events(orchestrator, ctx, "budget") == [caught.value.message]


@pytest.mark.parametrize("limits", [{}, {"max_cost_usd": 5.0, "max_hours": 1.0}])
def test_within_budget_the_run_goes_on(on_instance: Any, limits: dict[str, float]) -> None:
    from cloudtrain.spec import Budget

    orchestrator, ctx, _, _ = on_instance
    orchestrator.spec = orchestrator.spec.model_copy(update={"budget": Budget(**limits)})
    keeper = FakeKeeper()
    orchestrator._check_budget(ctx, keeper)
    assert keeper.final_rounds == 0 and events(orchestrator, ctx, "budget") == []


def beat(idle_s: float | None, call: str | None = "fit", **progress: Any) -> Any:
    from cloudtrain.remote.agent import Beat

    state = {"call": call, "active": True, **progress} if call else {"active": False}
    return Beat(idle_s, state)


@pytest.mark.parametrize("call", ["fit", "evaluate", "predict"])
def test_a_run_stalled_inside_a_keras_call_is_a_budget_stop(on_instance: Any, call: str) -> None:
    from cloudtrain.errors import BudgetError
    from cloudtrain.spec import Budget

    orchestrator, ctx, _, _ = on_instance
    orchestrator.spec = orchestrator.spec.model_copy(update={"budget": Budget(max_idle_minutes=0.5)})
    keeper = FakeKeeper()
    orchestrator._check_idle(ctx, beat(29.0, call), keeper)  # not yet
    assert keeper.final_rounds == 0 and events(orchestrator, ctx, "idle") == []
    with pytest.raises(BudgetError, match=f"no progress for 30 s \\(inside {call}") as caught:
        orchestrator._check_idle(ctx, beat(30.0, call), keeper)
    assert keeper.final_rounds == 1 and caught.value.exit_code == 4
    assert "budget.on_idle: warn" in (caught.value.hint or "")
    assert events(orchestrator, ctx, "idle") == [
        f"no progress for 30 s (inside {call}; budget.max_idle_minutes: 0.5)"
    ]


@pytest.mark.parametrize("on_idle, call", [("warn", "fit"), ("stop", None)])
def test_idle_only_warns_with_on_idle_warn_or_outside_a_keras_call(
    on_instance: Any, on_idle: str, call: str | None
) -> None:
    from cloudtrain.spec import Budget

    orchestrator, ctx, _, _ = on_instance
    orchestrator.spec = orchestrator.spec.model_copy(
        update={"budget": Budget(max_idle_minutes=1, on_idle=on_idle)}
    )
    keeper = FakeKeeper()
    for idle_s in (60.0, 90.0, 5.0, 61.0):  # said once, then again after progress came
        orchestrator._check_idle(ctx, beat(idle_s, call), keeper)
    where = "inside fit" if call else "outside fit, evaluate and predict"
    assert events(orchestrator, ctx, "idle") == [
        f"no progress for {s} s ({where}; budget.max_idle_minutes: 1)" for s in (60, 61)
    ]
    assert keeper.final_rounds == 0


def test_the_live_status_has_the_epoch_eta_dollars_projection_and_budget_left(on_instance: Any) -> None:
    from cloudtrain import metrics
    from cloudtrain.spec import Budget

    orchestrator, ctx, _, _ = on_instance
    orchestrator.spec = orchestrator.spec.model_copy(update={"budget": Budget(max_cost_usd=2.0)})
    metrics.add(
        ctx.run_dir, b'{"fit": 0, "epoch": 1, "epochs": 10, "epoch_s": 600.0, "logs": {"loss": 0.5}}\n'
    )
    ctx.beat = beat(1.0, "fit", fit=0, epoch=2, epochs=10, done=1, step=50, steps=100, epoch_elapsed_s=300.0)
    status = orchestrator.live_status(ctx)
    assert status.run_id == ctx.run_id and status.metrics == {"loss": 0.5}
    assert status.eta_s == 600.0 * 8.5  # the epochs left, half of this one done
    assert status.instance is not None and status.instance.startswith("g4dn.xlarge in ")
    running = orchestrator.ledger.instances(ctx.run_id)[0]
    hours = status.elapsed_s / 3600 + status.eta_s / 3600
    per_hour = running.price_per_hour + running.disk_gb * running.ebs_per_gb_month / 730
    assert status.projected_usd == pytest.approx(hours * per_hour, rel=0.01)
    assert status.spent_usd < status.projected_usd
    assert status.budget_left == f"${2.0 - status.spent_usd:.4f} left"
    ctx.beat = beat(1.0, None)  # between Keras calls: no ETA, no projection
    assert (orchestrator.live_status(ctx).eta_s, orchestrator.live_status(ctx).projected_usd) == (None, None)


def test_the_estimate_is_recorded_once_after_the_first_epoch(on_instance: Any) -> None:
    orchestrator, ctx, _, agent = on_instance
    agent.metrics_file = b'{"fit": 0, "epoch": 1, "epochs": 4, "epoch_s": 60.0, "logs": {"loss": 0.5}}\n'
    ctx.beat = beat(1.0, "fit", fit=0, epoch=2, epochs=4, done=1, step=0, steps=10, epoch_elapsed_s=0.0)
    orchestrator._fetch_metrics(ctx)
    projected = orchestrator.ledger.get_run(ctx.run_id).projected_usd
    assert projected is not None and projected > 0
    assert events(orchestrator, ctx, "estimate") == [f"projected ${projected:.4f} after the first epoch"]
    agent.metrics_file += b'{"fit": 0, "epoch": 2, "epochs": 4, "epoch_s": 90.0, "logs": {"loss": 0.4}}\n'
    ctx.beat = beat(1.0, "fit", fit=0, epoch=3, epochs=4, done=2, step=0, steps=10, epoch_elapsed_s=0.0)
    orchestrator._fetch_metrics(ctx)
    assert orchestrator.ledger.get_run(ctx.run_id).projected_usd == projected  # the first one stays
    assert len(events(orchestrator, ctx, "estimate")) == 1


def test_salvage_pulls_the_log_home_masked_and_restarts_the_watchdogs_grace(on_instance: Any) -> None:
    orchestrator, ctx, _, agent = on_instance
    orchestrator.secrets = {"TOKEN": "hunter2"}
    agent.log = b"Epoch 1/3\nloss 0.1 token hunter2\n"
    agent.metrics_file = b'{"fit": 0, "epoch": 1, "epochs": 3, "logs": {"loss": 0.1}}\n'
    orchestrator._salvage(ctx)
    assert (ctx.run_dir / "logs" / "train.log").read_bytes() == b"Epoch 1/3\nloss 0.1 token *******\n"
    assert (ctx.run_dir / "metrics.csv").read_text().splitlines()[1].startswith("0,1,3,")
    assert agent.collected_with == [None]
    assert events(orchestrator, ctx, "salvage-failed") + events(orchestrator, ctx, "salvage-timeout") == []


def test_a_failed_salvage_is_named_never_raised(on_instance: Any) -> None:
    from cloudtrain.errors import RemoteError

    orchestrator, ctx, _, agent = on_instance
    agent.tail_error = RemoteError("the connection dropped")
    orchestrator._salvage(ctx)  # nothing raised over the error that brought the run here
    assert events(orchestrator, ctx, "salvage-failed") == ["pulling back failed: the connection dropped"]


def test_a_stuck_salvage_is_given_up_after_salvage_pull_s(on_instance: Any) -> None:
    from dataclasses import replace

    orchestrator, ctx, _, agent = on_instance
    orchestrator.settings = replace(orchestrator.settings, salvage_pull_s=0.2)
    ctx.session.stuck.set()
    started = time.monotonic()
    orchestrator._salvage(ctx)
    ctx.session.release.set()
    assert time.monotonic() - started < 2  # teardown is not held up
    assert events(orchestrator, ctx, "salvage-timeout") == ["pulling back took over 0 s: gave up on it"]


def test_nothing_is_salvaged_before_training_started(on_instance: Any) -> None:
    orchestrator, ctx, _, agent = on_instance
    ctx.handle = ctx.handle.changed(training_started=False)
    agent.tail_error = AssertionError("nothing to pull before training")
    orchestrator._salvage(ctx)
    assert not (ctx.run_dir / "logs" / "train.log").exists() and agent.collected_with == []


class EndingCloud(FakeCloud):
    """The fake cloud with what --keep and teardown ask of it."""

    def __init__(self, fake: FakeCloud, settings: Any) -> None:
        super().__init__()
        self.states, self.types, self.settings = fake.states, fake.types, settings
        self.expiries: list[tuple[str, Any]] = []
        self.expiry_error: Exception | None = None
        self.deleted: list[str] = []

    def set_run_expiry(self, run_id: str, when: Any, instance_profile: str | None = None) -> None:
        if self.expiry_error is not None:
            raise self.expiry_error
        self.expiries.append((run_id, when))

    def find_run_instances(self, run_id: str) -> list[Any]:
        return []

    def owned_resources(self, owner: str, run_id: str) -> list[Any]:
        return []

    def delete_security_group(self, name: str) -> None:
        self.deleted.append(name)

    delete_key_pair = delete_instance_profile = delete_security_group

    def forget_private_key(self, run_id: str) -> None:
        self.deleted.append("private key")


@pytest.mark.parametrize("told", [True, False])
def test_keep_leaves_the_instance_until_a_deadline_it_and_its_tags_know(on_instance: Any, told: bool) -> None:
    from datetime import timedelta

    from cloudtrain.errors import CloudError, RemoteError
    from cloudtrain.records import RunState, parse_iso, utcnow

    orchestrator, ctx, fake, agent = on_instance
    ctx.cloud = cloud = EndingCloud(fake, orchestrator.settings)
    cloud.expiry_error = CloudError("tagging refused")  # only a warning: gc may end it early
    if not told:  # the instance never heard: it ends itself after the grace, so the deadline says so
        agent.collect_error = RemoteError("the connection dropped")
    orchestrator.keep = True
    orchestrator.finish(ctx, RunState.SUCCEEDED, 0)
    run = orchestrator.ledger.get_run(ctx.run_id)
    assert run.state is RunState.SUCCEEDED and cloud.terminated == [] and ctx.session.closed
    kept_until = parse_iso(run.handle.kept_until)
    assert cloud.deleted == []  # the group and key pair stay with the instance
    if told:
        assert agent.collected_with == [run.handle.kept_until]
        assert abs(kept_until - (utcnow() + timedelta(hours=24))) < timedelta(minutes=1)
    else:
        grace = timedelta(seconds=orchestrator.spec.watchdog.collect_grace_s)
        assert abs(kept_until - (utcnow() + grace)) < timedelta(minutes=1)


def test_without_max_hours_a_following_controller_moves_the_deadline_on(on_instance: Any) -> None:
    from datetime import timedelta

    from cloudtrain import orchestrator as orchestrator_module
    from cloudtrain.errors import RemoteError
    from cloudtrain.records import parse_iso, utcnow
    from cloudtrain.spec import Budget

    orchestrator, ctx, fake, agent = on_instance
    ctx.cloud = cloud = EndingCloud(fake, orchestrator.settings)
    orchestrator.renew_deadline(ctx)  # a controller that never renewed (attach, logs -f): at once
    assert len(agent.renewed) == 1 and len(cloud.expiries) == 1
    deadline = parse_iso(agent.renewed[0])
    assert abs(deadline - (utcnow() + timedelta(hours=24))) < timedelta(minutes=1)
    ((run_id, expires),) = cloud.expiries
    assert run_id == ctx.run_id and abs(expires - deadline - timedelta(minutes=30)) < timedelta(seconds=1)
    orchestrator.renew_deadline(ctx)  # then every RENEW_S
    assert len(agent.renewed) == 1
    ctx.renewed -= orchestrator_module.RENEW_S
    agent.renew_error = RemoteError("the connection dropped")
    orchestrator.renew_deadline(ctx)  # a failure waits for the next round
    assert len(cloud.expiries) == 1
    agent.renew_error = None
    orchestrator.renew_deadline(ctx)
    assert len(agent.renewed) == 2 and len(cloud.expiries) == 2
    # budget.max_hours is a hard limit: never moved
    orchestrator.spec = orchestrator.spec.model_copy(update={"budget": Budget(max_hours=2)})
    ctx.renewed -= orchestrator_module.RENEW_S
    orchestrator.renew_deadline(ctx)
    assert len(agent.renewed) == 2


def test_keep_is_ignored_before_training_started_and_the_instance_ends(on_instance: Any) -> None:
    from cloudtrain.records import RunState

    orchestrator, ctx, fake, agent = on_instance
    ctx.cloud = cloud = EndingCloud(fake, orchestrator.settings)
    ctx.handle = ctx.handle.changed(training_started=False)
    orchestrator.keep = True
    orchestrator.finish(ctx, RunState.FAILED, None)
    assert cloud.terminated == ["i-1"] and agent.collected_with == [] and cloud.expiries == []
    assert cloud.deleted == ["sg-1", "private key"]
    assert orchestrator.ledger.get_run(ctx.run_id).handle.kept_until is None


class BootedCloud:
    """A cloud whose instance has booted at ``address`` and printed its host key."""

    FINGERPRINT = "SHA256:" + "A" * 43

    def __init__(self, address: str | None) -> None:
        self.address = address

    def console_output(self, instance_id: str) -> str:
        return (
            "cloud-init ...\n-----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
            f"256 {self.FINGERPRINT} root@host (ED25519)\n-----END SSH HOST KEY FINGERPRINTS-----\n"
        )

    def describe(self, instance_id: str) -> Any:
        from cloudtrain.cloud.aws import LaunchedInstance
        from cloudtrain.records import utcnow

        return LaunchedInstance(
            instance_id, "g4dn.xlarge", "us-east-1a", "spot", self.address, utcnow(), "running", self.address
        )


@pytest.mark.parametrize(
    ("address", "loopback_only", "refused"),
    [
        ("127.0.0.1", True, None),
        ("203.0.113.9", False, None),
        ("203.0.113.9", True, "refusing to dial 203.0.113.9 in a dry-run"),
        (None, False, "has no public IP address"),
    ],
)
def test_the_ssh_endpoint_is_pinned_and_a_dry_run_dials_only_loopback(
    address: str | None, loopback_only: bool, refused: str | None
) -> None:
    from cloudtrain.bringup import REMOTE_USER, ssh_endpoint
    from cloudtrain.errors import RemoteError

    cloud = BootedCloud(address)
    if refused:
        with pytest.raises(RemoteError, match=refused):
            ssh_endpoint(cloud, "i-1", Path("k.pem"), loopback_only=loopback_only)  # type: ignore[arg-type]
        return
    launched, endpoint = ssh_endpoint(cloud, "i-1", Path("k.pem"), loopback_only=loopback_only)  # type: ignore[arg-type]
    assert (endpoint.host, endpoint.user, endpoint.key_path) == (address, REMOTE_USER, Path("k.pem"))
    assert endpoint.fingerprints == frozenset({BootedCloud.FINGERPRINT}) and launched.ssh_host == address
