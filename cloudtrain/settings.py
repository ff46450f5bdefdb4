"""Where cloudtrain keeps its state and how it reaches AWS, read from the environment.

A leaf: every other layer receives a ``Settings`` value instead of reading
``os.environ`` itself, so tests and the dry-run simulator can swap any of it.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class Settings:
    """Everything environment-dependent, resolved once per CLI call."""

    home: Path
    profile: str | None = None
    region: str | None = None  # the profile's region, if it has one
    endpoint_url: str | None = None  # set in dry-run: the simulated AWS
    ssh_cidr: str | None = None  # the caller's public address for ingress; looked up if unset
    owner: str = "unknown"
    simulated: bool = False

    @classmethod
    def from_env(cls, profile: str | None = None) -> Settings:
        env = os.environ
        home = Path(env.get("CLOUDTRAIN_HOME") or Path.home() / ".cloudtrain").expanduser()
        return cls(
            home=home,
            profile=profile or env.get("AWS_PROFILE") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
            ssh_cidr=env.get("CLOUDTRAIN_SSH_CIDR") or None,
            owner=env.get("CLOUDTRAIN_OWNER") or default_owner(),
        )

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def ledger_path(self) -> Path:
        return self.home / "ledger.sqlite"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"


def default_owner() -> str:
    """The ``cloudtrain:owner`` tag value: who launched it, from where."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
