"""Frozen records that cross layer boundaries: run ids and states, spot prices, times.

A leaf module: the cloud layer produces these, the planner, orchestrator and ledger
consume them. Times are timezone-aware UTC datetimes; money is USD floats.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum

RUN_ID_RE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9-]*)-(?P<stamp>\d{8}-\d{6})-(?P<tag>[0-9a-f]{4})$")


class RunState(str, Enum):
    """The lifecycle states of a run (a public contract: add, never rename)."""

    PLANNED = "planned"
    LAUNCHING = "launching"
    PROVISIONING = "provisioning"
    SYNCING = "syncing"
    RUNNING = "running"
    RECOVERING = "recovering"
    PULLING = "pulling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


class Lifecycle(str, Enum):
    """How an instance is billed."""

    SPOT = "spot"
    ON_DEMAND = "on-demand"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(dt: datetime) -> str:
    """ISO 8601 UTC with a ``Z`` suffix and whole seconds: ``2026-11-28T12:00:00Z``."""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def new_run_id(name: str, now: datetime | None = None) -> str:
    """``<name>-<yyyymmdd-hhmmss>-<4 hex>``, the stamp in UTC."""
    stamp = (now or utcnow()).astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class SpotPrice:
    """One spot price observation for an instance type in an availability zone."""

    instance_type: str
    zone: str
    price: float
    timestamp: datetime
