"""Dry-run interruptions: ``--simulate-interruption AT`` (``SimulatedInterruption``), and the
schedule that has the simulator interrupt the n-th instance of a run when its training
reaches the n-th AT (``InterruptionSchedule``).

The orchestrator knows nothing of this: ``run --dry-run`` hands it the schedule as its
training watcher, which it tells when training starts on an instance and each line the
log prints there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cloudtrain.errors import InputError
from cloudtrain.settings import Settings

_AT_RE = re.compile(
    r"^(?:node(?P<node>\d+):)?(?:epoch:(?P<epoch>[1-9]\d*)|(?P<seconds>\d+)s)(?P<silent>:no-notice)?$"
)


@dataclass(frozen=True)
class SimulatedInterruption:
    """``--simulate-interruption AT``: a spot notice at the start of an epoch, or seconds
    after training starts on an instance (the first AT for the first instance, ...).
    ``AT:no-notice`` (``notice=False``): no notice at all, the instance is simply gone at
    AT, as when AWS takes it with a notice the agent never saw, or the hardware fails.
    ``nodeK:AT`` (``node=K``): in a run on several nodes, node K's instance is the one
    interrupted (AT is read from the chief's log: the nodes train in step)."""

    epoch: int | None = None
    seconds: int | None = None
    notice: bool = True
    node: int = 0

    @classmethod
    def parse(cls, text: str) -> SimulatedInterruption:
        found = _AT_RE.match(text.strip())
        if found is None:
            raise InputError(
                f"--simulate-interruption {text!r}: expected epoch:N or Ns, optionally with :no-notice "
                "and after nodeK:",
                hint="For example --simulate-interruption epoch:3, 90s, epoch:12:no-notice or node1:epoch:3.",
            )
        notice, node = not found["silent"], int(found["node"] or 0)
        if found["epoch"]:
            return cls(epoch=int(found["epoch"]), notice=notice, node=node)
        return cls(seconds=int(found["seconds"]), notice=notice, node=node)

    def __str__(self) -> str:
        at = f"epoch:{self.epoch}" if self.epoch is not None else f"{self.seconds}s"
        at = f"node{self.node}:{at}" if self.node else at
        return at if self.notice else f"{at}:no-notice"

    def due_in_log(self, line: str) -> bool:
        """Is this training log line the start of the epoch to interrupt ("Epoch N/...")?"""
        return self.epoch is not None and line.lstrip().startswith(f"Epoch {self.epoch}/")


class InterruptionSchedule:
    """The run's ``--simulate-interruption`` ATs, the first for its first instance, the
    second for the one relaunched after it, ...; each is scheduled with the simulator
    once (``schedule_interruption``) as the training reaches it."""

    def __init__(self, settings: Settings, interruptions: Sequence[SimulatedInterruption]) -> None:
        self.settings = settings
        self.pending: dict[int, SimulatedInterruption] = dict(enumerate(interruptions))

    def training_started(self, nodes: Sequence[str], instance_number: int) -> None:
        """Training started on the run's ``instance_number``-th instance (0: the first), or
        group of them: ``nodes``, their ids in rank order."""
        at = self.pending.get(instance_number)
        if at is not None and at.seconds is not None:
            self._schedule(nodes, instance_number, at)

    def log_line(self, nodes: Sequence[str], instance_number: int, line: str) -> None:
        """The training there printed ``line`` (the chief's, on several nodes)."""
        at = self.pending.get(instance_number)
        if at is not None and at.due_in_log(line):
            self._schedule(nodes, instance_number, at)

    def _schedule(self, nodes: Sequence[str], instance_number: int, at: SimulatedInterruption) -> None:
        from cloudtrain.cloud.simulator import schedule_interruption

        del self.pending[instance_number]  # due for nothing more
        if at.node >= len(nodes):  # api.run_job refuses it first
            raise InputError(f"--simulate-interruption {at}: the run has {len(nodes)} nodes")
        schedule_interruption(self.settings, nodes[at.node], delay_s=at.seconds or 0, notice=at.notice)
