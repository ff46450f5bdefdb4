"""How long-running work tells the user what it does: the ``Reporter`` interface, and
``LiveStatus``, a running run's state for a live view.

A leaf: the orchestrator calls it, the CLI implements it with rich. The base class
says nothing, for tests and library use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudtrain.records import RunState


@dataclass(frozen=True)
class LiveStatus:
    """Where a run stands, every few seconds while it trains (and at each stage).

    ``progress`` is the instance's progress.json (agent/checkpoint.py: ``call``, ``fit``,
    ``epoch``, ``epochs``, ``done``, ``step``, ``steps``, ...), None before a hooked Keras
    call. ``eta_s``: seconds the current fit has left at its pace; ``projected_usd``: what the
    run will have cost when it ends at that pace (None while unknown)."""

    run_id: str
    state: RunState
    elapsed_s: float  # since the run started
    instance: str | None = None  # "g4dn.xlarge in us-east-1a, spot $0.1578/h"
    progress: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)  # the last finished epoch's
    eta_s: float | None = None
    spent_usd: float = 0.0
    projected_usd: float | None = None
    budget_left: str | None = None  # "$0.9876 and 0.91 h left"
    idle_s: float | None = None

    def money(self, since_s: float = 0.0) -> str:
        """``ETA 4 min · $0.0312 so far · projected $0.0421 · $0.9688 left``, ``since_s``
        seconds after this status came."""
        from cloudtrain.tables import duration

        parts = [] if self.eta_s is None else [f"ETA {duration(max(0.0, self.eta_s - since_s))}"]
        parts.append(f"${self.spent_usd:.4f} so far")
        if self.projected_usd is not None:
            parts.append(f"projected ${self.projected_usd:.4f}")
        if self.budget_left:
            parts.append(self.budget_left)
        return " · ".join(parts)


class Reporter:
    """Receives a run's progress. Override what you render; the default is silent."""

    def stage(self, state: RunState, message: str) -> None:
        """The run entered ``state``."""

    def info(self, message: str) -> None:
        """A detail worth showing (instance id, backend verified, bytes synced)."""

    def warn(self, message: str) -> None:
        """Something the user should know about (a dropped stream, a large workdir)."""

    def log(self, data: bytes) -> None:
        """Bytes of the training log, as they arrive."""

    def live(self, status: LiveStatus) -> None:
        """The run's state for a live view, every few seconds while it trains."""

    def transfer(self, what: str, done: int, total: int | None) -> None:
        """Bytes of a transfer (sync, pull-back, checkpoint restore) so far, as it goes;
        ``total`` None when it is not known ahead."""

    def steps(self, what: str, done: int, total: int | None) -> None:
        """Steps of long work (the image recipe, an image being created) finished so far;
        ``total`` None when it is not known. ``done == total`` ends it."""
