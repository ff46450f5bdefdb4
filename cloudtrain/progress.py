"""How long-running work tells the user what it does: the ``Reporter`` interface.

A leaf: the orchestrator calls it, the CLI implements it with rich. The base class
says nothing, for tests and library use.
"""

from __future__ import annotations

from cloudtrain.records import RunState


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
