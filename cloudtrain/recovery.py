"""Surviving spot interruptions, controller side: the run's phases on an instance and the
one loop that starts them over on a new one (``run_phases``), noticing a lost instance,
keeping the run's checkpoint off the instance.

The training process checkpoints itself (the agent's hook, into REMOTE_CHECKPOINT on
the instance). ``CheckpointKeeper`` runs beside the log stream on its own SSH
connection: a round starts every ``KEEPER_POLL_S`` seconds (or as soon as the last one
ended, when a copy takes longer); it reads the remote checkpoint's manifest and, when it
changed, copies the checkpoint into ``<run folder>/checkpoint`` (complete or not at
all: into a staging folder, swapped in only once its manifest's files are all there).
The copy is of a hard-link snapshot of the latest save, taken on the instance as it
starts (``pull(checkpoint=True)``), so a trainer that saves faster than a copy takes
cannot prune it mid-copy: a save made one round's interval plus one copy's time before
the instance is lost is home, with or without a notice. It also reports the spot
interruption notice the agent's watcher recorded. The orchestrator pushes that folder
onto the replacement instance before training starts again there.
"""

from __future__ import annotations

import json
import logging
import posixpath
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from cloudtrain.errors import RemoteError
from cloudtrain.remote.agent import REMOTE_CHECKPOINT
from cloudtrain.remote.session import Session

log = logging.getLogger(__name__)

LOCAL_CHECKPOINT = "checkpoint"  # in the run folder
KEEPER_POLL_S = 3.0
NOTICE_POLL_S = 0.5
FINAL_ROUND_S = 120.0
LOST_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})


class InstanceLost(RemoteError):
    """The instance went away under the run (a spot interruption, or stopped by AWS)."""

    def __init__(self, instance_id: str, state: str) -> None:
        super().__init__(f"{instance_id} is {state}: the instance was taken away")
        self.instance_id = instance_id
        self.state = state


class Phase(str, Enum):
    """Where a run stands on its instance; an instance lost in any of them sends it back
    to BRING_UP on a new one (``run_phases``)."""

    BRING_UP = "bring-up"  # provision, sync, restore the checkpoint, start the training
    TRAIN = "train"  # follow the training to its exit code
    PULL = "pull"  # outputs and the log's last bytes home
    DONE = "done"


@dataclass(frozen=True)
class PhaseSteps:
    """What each phase does (the orchestrator's stages; a test's fakes). ``relaunch`` gets
    the RemoteError a phase raised: it raises it again unless the instance was lost and a
    new one could be launched, which it then has launched."""

    bring_up: Callable[[], None]
    train: Callable[[], int]  # the training command's exit code
    pull: Callable[[], None]
    relaunch: Callable[[RemoteError], None]


def run_phases(steps: PhaseSteps, first: Phase = Phase.BRING_UP, until: Phase = Phase.DONE) -> int | None:
    """Go through the phases from ``first`` to ``until`` (``DONE``: the training's exit code;
    ``--detach`` stops at ``TRAIN``), as many times over as instances are lost.

    The one loop of recovery: a RemoteError in any phase goes to ``steps.relaunch``,
    which re-raises it or relaunches, and the run starts again at BRING_UP on the new
    instance, from the last checkpoint. An instance lost during the pull is relaunched
    like one lost in training: the last checkpoint is the finished training, so the
    command runs again without training (its fits restore as done) and writes the
    outputs anew; but a failed command is never run again (its log says why)."""
    phase, exit_code = first, None
    while phase is not until:
        try:
            if phase is Phase.BRING_UP:
                steps.bring_up()
                phase = Phase.TRAIN
            elif phase is Phase.TRAIN:
                exit_code = steps.train()
                phase = Phase.PULL
            else:
                steps.pull()
                phase = Phase.DONE
        except RemoteError as e:
            if phase is Phase.PULL and exit_code != 0:
                raise
            steps.relaunch(e)
            phase = Phase.BRING_UP
    return exit_code


def checkpoint_complete(folder: Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint folder whose listed files are all there at their sizes,
    else None (the agent checks their sha256 before restoring from them)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    for name, meta in manifest["files"].items():
        path = folder / name
        size = meta.get("size") if isinstance(meta, dict) else None
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            return None
    return manifest


class CheckpointKeeper:
    """Copies the instance's checkpoint home whenever it changes, and notices the notice."""

    def __init__(
        self,
        session: Session,
        run_dir: Path,
        pull_checkpoint: Callable[[Session, Path], None],
        *,
        notice_path: str,
        on_event: Callable[[str, str], None],
        poll_s: float = KEEPER_POLL_S,
    ) -> None:
        self._endpoint = session.endpoint
        self.run_dir = run_dir
        self._pull = pull_checkpoint
        self._on_event = on_event
        self.notice_path = notice_path  # the agent's notice.json, relative to the remote HOME
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="cloudtrain-checkpoints", daemon=True)
        # The copy at home, as pushed onto this instance: no need to copy it back.
        self.last_manifest: str | None = _manifest_text(run_dir / LOCAL_CHECKPOINT)
        self.notice: dict[str, Any] | None = None
        self._round = threading.Lock()  # one round at a time: the thread's, or final_round's

    def start(self) -> CheckpointKeeper:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:  # a Ctrl-C must not wait for a copy in flight
        self._stop.set()
        self._thread.join(timeout)

    def final_round(self, session: Session, timeout: float = FINAL_ROUND_S) -> None:
        """Stop the thread, then copy home the checkpoint it has not (the training's last),
        on ``session``; a copy still in flight is waited for up to ``timeout``."""
        self._stop.set()
        if not self._round.acquire(timeout=timeout):
            log.warning("checkpoint keeper: a copy is still in flight; the last checkpoint may not be home")
            return
        try:
            self._check(session)
        finally:
            self._round.release()

    def __enter__(self) -> CheckpointKeeper:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _main(self) -> None:
        # Its own connection (the log stream keeps the other); a stopped keeper retries no connect.
        session = Session(
            self._endpoint, give_up=lambda: RemoteError("stopped") if self._stop.is_set() else None
        )
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    session.connect(deadline_s=20)  # not the 5 minutes a booting instance gets
                    self.check(session)
                except RemoteError as e:  # the instance may be going away: keep what we have
                    log.info("checkpoint keeper: %s", e.message)
                    session.close()
                except Exception:  # never let one bad round end the keeping
                    log.exception("checkpoint keeper: this round failed")
                    session.close()
                # Rounds start every poll_s, however long the copy took (a save waits at most
                # that long for its round); after a notice every checkpoint counts.
                period = NOTICE_POLL_S if self.notice else self.poll_s
                self._stop.wait(max(0.0, started + period - time.monotonic()))
        finally:
            session.close()

    def check(self, session: Session) -> None:
        """One round: the notice, then the checkpoint if its manifest changed."""
        with self._round:
            self._check(session)

    def _check(self, session: Session) -> None:
        started = time.monotonic()
        probe = session.run(
            f"cat {REMOTE_CHECKPOINT}/manifest.json 2>/dev/null; echo; echo '--notice--'; "
            f"cat {self.notice_path} 2>/dev/null",
            check=False,
            timeout=30,
        ).text
        manifest, _, notice = probe.partition("--notice--")
        manifest = manifest.strip()
        if notice.strip() and self.notice is None:
            try:
                self.notice = json.loads(notice)
            except ValueError:
                self.notice = {"raw": notice.strip()}
            self._on_event("notice", f"interruption notice: {json.dumps(self.notice, sort_keys=True)}")
        if manifest and manifest != self.last_manifest:
            staging = self.run_dir / (LOCAL_CHECKPOINT + ".incoming")
            shutil.rmtree(staging, ignore_errors=True)
            try:
                self._pull(session, staging)  # -> staging/checkpoint/..., the latest save
                arrived = staging / "checkpoint"
                got = checkpoint_complete(arrived)
                if got is None:  # the snapshot makes this rare: the next round tries again
                    log.info("checkpoint keeper: the copy arrived incomplete: %s", _what_lacks(arrived))
                    return
                size = sum(p.stat().st_size for p in arrived.rglob("*") if p.is_file())
                # The manifest that came home: newer than the probe's when a save came between.
                copied = (arrived / "manifest.json").read_text().strip()
                swap_in(arrived, self.run_dir / LOCAL_CHECKPOINT)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self.last_manifest = copied
            took = time.monotonic() - started
            self._on_event(
                "checkpoint",
                f"checkpoint of epoch {got.get('epoch')} copied home ({size / 1e6:.1f} MB in {took:.1f} s)",
            )


def _manifest_text(folder: Path) -> str | None:
    try:
        return (folder / "manifest.json").read_text().strip() or None
    except (OSError, ValueError):
        return None


def _what_lacks(folder: Path) -> str:
    """Why ``checkpoint_complete(folder)`` is None, for the log."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest.json"
    missing = sorted(name for name in files if not (folder / name).is_file())
    if missing:
        return f"{len(missing)} of the {len(files)} files its manifest lists are missing ({missing[0]}, ...)"
    return "a file's size differs from its manifest's"


def pull_checkpoint(
    session: Session, dest: Path, *, remote_python: str, remote_agent_path: str | None
) -> None:
    """The instance's checkpoint into ``dest/checkpoint``: its latest save alone, from a
    hard-link snapshot the instance takes as the copy starts (see ``CheckpointKeeper``)."""
    from cloudtrain.remote.pull import pull

    pull(
        session,
        posixpath.dirname(REMOTE_CHECKPOINT),
        [posixpath.basename(REMOTE_CHECKPOINT)],
        dest,
        remote_python=remote_python,
        remote_agent_path=remote_agent_path,
        into="",
        checkpoint=True,
    )


def last_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The run's checkpoint copied home, and its manifest (also if a swap was cut short)."""
    for folder in (run_dir / LOCAL_CHECKPOINT, run_dir / (LOCAL_CHECKPOINT + ".old")):
        manifest = checkpoint_complete(folder)
        if manifest is not None:
            return folder, manifest
    return None


def swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging`` (the old one goes only after the new is in place)."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
