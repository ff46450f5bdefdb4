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

from cloudtrain.errors import InputError
from cloudtrain.recovery import SimulatedInterruption, checkpoint_complete, last_checkpoint, swap_in


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
