"""Frozen records that cross layer boundaries: run ids and states, spot prices, times.

A leaf module: the cloud layer produces these, the planner, orchestrator and ledger
consume them. Times are timezone-aware UTC datetimes; money is USD floats.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from enum import Enum
from typing import Any

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
    import secrets  # here: its hmac and hashlib are not worth loading for every command

    stamp = (now or utcnow()).astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class SpotPrice:
    """One spot price observation for an instance type in an availability zone."""

    instance_type: str
    zone: str
    price: float
    timestamp: datetime


@dataclass(frozen=True)
class SshAddress:
    """Where a run's instance answers SSH, and the host key fingerprints pinned for it."""

    host: str
    port: int
    user: str
    fingerprints: tuple[str, ...]


@dataclass(frozen=True)
class RunHandle:
    """What a run holds in the cloud and where it stands there: everything ``attach``,
    ``logs -f``, ``down``, ``gc`` and a relaunch need, kept in the ledger as one column.

    A field is None (or its default) until the run gets that far. ``image build`` runs
    fill the fields after ``kept_until``."""

    plan: Mapping[str, Any] | None = None  # Plan.to_json(): the offers a relaunch goes down
    owner: str | None = None  # what its resources' tags say
    image: str | None = None  # the image id its instances boot
    security_group_id: str | None = None
    key_name: str | None = None
    key_path: str | None = None  # the private key, on this machine
    instance_profile: str | None = None  # the run's own, for S3
    placement_group: str | None = None  # a run on several nodes: theirs (one zone, close together)
    instance_id: str | None = None  # the instance it is on now (on several nodes: the chief's)
    ssh: SshAddress | None = None
    backend_report: Mapping[str, Any] | None = None  # the agent's verify report
    training_started: bool = False  # on the instance it is on now
    log_base: int = 0  # the local log's bytes from earlier instances
    relaunches: int = 0
    kept_until: str | None = None  # --keep: the instance powers itself off then (ISO UTC)
    image_version: str | None = None
    instance_type: str | None = None
    base_image: str | None = None
    backend_reports: Mapping[str, Any] | None = None
    image_id: str | None = None
    image_name: str | None = None

    def changed(self, **changes: Any) -> RunHandle:
        """A copy with ``changes`` (field names, JSON values: an ``ssh`` dict is read)."""
        return replace(self, **_read_ssh(changes))

    def to_json(self) -> dict[str, Any]:
        """The fields that are set, as JSON values (what the ledger stores)."""
        return {
            f.name: asdict(value) if isinstance(value, SshAddress) else value
            for f in fields(self)
            if (value := getattr(self, f.name)) != f.default
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunHandle:
        """The handle stored as ``to_json`` made it; an unknown field raises TypeError."""
        return cls(**_read_ssh(data))


def _read_ssh(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with an ``ssh`` given as JSON (a dict) made an SshAddress."""
    ssh = values.get("ssh")
    if not isinstance(ssh, Mapping):
        return dict(values)
    address = SshAddress(str(ssh["host"]), int(ssh["port"]), str(ssh["user"]), tuple(ssh["fingerprints"]))
    return {**values, "ssh": address}
