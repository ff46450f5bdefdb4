"""Where cloudtrain keeps its state and how it reaches AWS, read from the environment.

A leaf: every other layer receives a ``Settings`` value instead of reading
``os.environ`` itself, so tests and the dry-run simulator can swap any of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_REGION = "us-east-1"
DEFAULT_SALVAGE_PULL_S = 120.0


@dataclass(frozen=True)
class Settings:
    """Everything environment-dependent, resolved once per CLI call."""

    home: Path
    profile: str | None = None
    region: str | None = None  # the profile's region, if it has one
    endpoint_url: str | None = None  # set in dry-run: the simulated AWS
    ssh_cidr: str | None = None  # the caller's public address for ingress; looked up if unset
    owner: str = "unknown"
    simulated: bool = False  # the cloud is the dry-run's: labels its runs and output
    # What the instances are like; the simulator's settings say theirs (no GPU, loopback).
    instance_gpus: bool = True  # a backend must see a GPU there
    loopback_hosts: bool = False  # an instance's SSH address off loopback is refused
    # After Ctrl-C, SIGTERM or an error: how long pulling back what there is may take
    # before teardown goes ahead without it.
    salvage_pull_s: float = DEFAULT_SALVAGE_PULL_S

    @classmethod
    def from_env(cls, profile: str | None = None) -> Settings:
        env = os.environ
        home = Path(env.get("CLOUDTRAIN_HOME") or Path.home() / ".cloudtrain").expanduser().absolute()
        return cls(
            home=home,
            profile=profile or env.get("AWS_PROFILE") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
            ssh_cidr=env.get("CLOUDTRAIN_SSH_CIDR") or None,
            owner=env.get("CLOUDTRAIN_OWNER") or default_owner(),
            salvage_pull_s=_seconds(env.get("CLOUDTRAIN_SALVAGE_PULL_S"), DEFAULT_SALVAGE_PULL_S),
        )

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def ledger_path(self) -> Path:
        return self.home / "ledger.sqlite"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"


def _seconds(text: str | None, default: float) -> float:
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return value if value >= 0 else default


def default_owner() -> str:
    """The ``cloudtrain:owner`` tag value: who launched it, from where (the host name as
    ``socket.gethostname`` gives it, without loading socket for every command)."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{os.uname().nodename}"
