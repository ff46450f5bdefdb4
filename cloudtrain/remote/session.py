"""SSH to an instance: pinned host keys, retries while it boots, keepalive, commands, streams.

The only place (with its siblings in ``cloudtrain.remote``) that imports fabric or
paramiko. A host key is accepted only when its SHA256 fingerprint is one the
instance printed on its console (cloud-init's ``BEGIN SSH HOST KEY FINGERPRINTS``
block, read through EC2's GetConsoleOutput); anything else aborts the connection
before a byte of data is sent. Nothing is ever added to a known_hosts file on disk
except the run's own pinned file for the OpenSSH client.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from fabric import Config, Connection

from cloudtrain.errors import InputError, RemoteError

log = logging.getLogger(__name__)

_BLOCK_RE = re.compile(
    r"-----BEGIN SSH HOST KEY FINGERPRINTS-----(.*?)-----END SSH HOST KEY FINGERPRINTS-----", re.S
)
_FINGERPRINT_RE = re.compile(r"\bSHA256:[A-Za-z0-9+/]{43}\b")
CHUNK = 1 << 16
CLOSE_TIMEOUT_S = 10.0


class HostKeyMismatch(RemoteError):
    """The instance presented a host key it did not print on its console: a possible MITM."""


def parse_console_fingerprints(console: str) -> frozenset[str]:
    """The SHA256 host key fingerprints from cloud-init's console block (empty if not there yet)."""
    found: set[str] = set()
    for block in _BLOCK_RE.findall(console or ""):
        found.update(_FINGERPRINT_RE.findall(block))
    return frozenset(found)


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:<base64, unpadded>`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def check_private_key(path: Path) -> None:
    """Refuse a private key file that anyone but its owner may read (or write)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as e:
        raise RemoteError(
            f"cannot read the private key {path}: {e.strerror or e}",
            hint="A run's private key stays under CLOUDTRAIN_HOME/keys until its teardown.",
        ) from e
    if mode & 0o077:
        raise InputError(
            f"{path} has permissions {mode:o}; others could read the private key",
            hint=f"Run: chmod 600 {path}",
        )


class PinnedHostKeys(paramiko.MissingHostKeyPolicy):
    """Accept a host key only if its fingerprint is pinned; remember it for this client only."""

    def __init__(self, fingerprints: Iterable[str]) -> None:
        self.fingerprints = frozenset(fingerprints)
        self.accepted: paramiko.PKey | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        seen = fingerprint(key)
        if seen not in self.fingerprints:
            raise HostKeyMismatch(
                f"{hostname} presented host key {seen} ({key.get_name()}), which is not one of the "
                f"{len(self.fingerprints)} fingerprints the instance printed on its console",
                hint="Nothing was sent. This can mean a man-in-the-middle; the instance is terminated.",
            )
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.accepted = key


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach an instance over SSH."""

    host: str
    port: int
    user: str
    key_path: Path
    fingerprints: frozenset[str]

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Result:
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


class Session:
    """One SSH connection to an instance, reconnected on demand."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        connect_timeout: float = 10,
        keepalive_s: int = 15,
        give_up: Callable[[], Exception | None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.keepalive_s = keepalive_s
        # Asked before each retry of a failed connect: an error to raise at once rather than
        # retry until the deadline (the orchestrator's: the instance has been taken away).
        self.give_up = give_up
        self.policy = PinnedHostKeys(endpoint.fingerprints)
        self._connection: Connection | None = None

    # --- connection ----------------------------------------------------------------------

    def _new_connection(self) -> Connection:
        connection = Connection(
            self.endpoint.host,
            # Never ~/.ssh/config or /etc/ssh/ssh_config: a Host * HostName or ProxyJump there
            # would change where this connects (and, in a dry-run, leave loopback).
            config=Config(overrides={"load_ssh_configs": False}),
            user=self.endpoint.user,
            port=self.endpoint.port,
            connect_timeout=int(self.connect_timeout),
            connect_kwargs={
                "key_filename": str(self.endpoint.key_path),
                "look_for_keys": False,
                "allow_agent": False,
                "banner_timeout": self.connect_timeout,
                "auth_timeout": self.connect_timeout,
            },
        )
        # fabric's Connection auto-adds unknown host keys by default: pin them instead.
        connection.client.set_missing_host_key_policy(self.policy)
        return connection

    def connect(self, *, deadline_s: float = 300.0, first_delay: float = 0.5) -> Session:
        """Connect, retrying while the instance boots; a host key mismatch is never retried."""
        if self.connected:
            return self
        check_private_key(self.endpoint.key_path)
        end = time.monotonic() + deadline_s
        delay = first_delay
        attempt = 0
        while True:
            attempt += 1
            connection = self._new_connection()
            try:
                connection.open()
                transport = connection.client.get_transport()
                assert transport is not None
                transport.set_keepalive(self.keepalive_s)
                # Short commands are many (status, tail, probes): without this, Nagle's delay
                # meeting delayed ACKs held each for ~40 ms.
                with suppress(OSError, AttributeError):
                    transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._connection = connection
                log.info("connected to %s (attempt %d)", self.endpoint.label, attempt)
                return self
            except HostKeyMismatch:
                connection.close()
                raise
            except (OSError, EOFError, paramiko.SSHException) as e:
                connection.close()
                reason = self.give_up() if self.give_up is not None else None
                if reason is not None:
                    raise reason from e
                if time.monotonic() + delay > end:
                    raise RemoteError(
                        f"cannot connect to {self.endpoint.label} after {attempt} attempts: {e}",
                        hint="The instance may still be booting or its SSH port blocked; check the "
                        "security group and the instance's console output.",
                    ) from e
                log.info("ssh to %s not ready (%s); retrying in %.1f s", self.endpoint.label, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    @property
    def connected(self) -> bool:
        if self._connection is None:
            return False
        transport = self._connection.client.get_transport()
        return bool(transport and transport.is_active())

    def reconnect(self, *, deadline_s: float = 120.0) -> Session:
        self.close()
        return self.connect(deadline_s=deadline_s)

    def close(self) -> None:
        """Close the connection; never waits more than CLOSE_TIMEOUT_S (a transport stuck
        in a read must not hold up teardown: its thread is a daemon)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            closer = threading.Thread(target=connection.close, name="cloudtrain-ssh-close", daemon=True)
            closer.start()
            closer.join(CLOSE_TIMEOUT_S)
            if closer.is_alive():
                log.warning(
                    "the connection to %s did not close in %s s", self.endpoint.label, CLOSE_TIMEOUT_S
                )

    def __enter__(self) -> Session:
        return self.connect()

    def __exit__(self, *_: object) -> None:
        self.close()

    def known_hosts_line(self) -> str:
        """The verified host key as a known_hosts line, for the OpenSSH client."""
        key = self.policy.accepted
        if key is None:
            raise RemoteError("no host key verified yet", hint="connect() first")
        host, port = self.endpoint.host, self.endpoint.port
        name = host if port == 22 else f"[{host}]:{port}"
        return f"{name} {key.get_name()} {key.get_base64()}\n"

    # --- commands ------------------------------------------------------------------------

    def _channel(self, command: str) -> paramiko.Channel:
        if not self.connected:
            self.connect()
        assert self._connection is not None
        transport: paramiko.Transport | None = self._connection.client.get_transport()
        assert transport is not None
        channel: paramiko.Channel = transport.open_session()
        channel.exec_command(command)
        return channel

    def run(
        self,
        command: str,
        *,
        stdin: bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> Result:
        """Run a command; return its exit code and output. ``check``: non-zero raises RemoteError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            channel = self._channel(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            out, err = bytearray(), bytearray()
            while True:  # read both streams as they come: a full stderr must not stall stdout
                select.select([channel], [], [], 0.5)
                while channel.recv_ready():
                    out += channel.recv(CHUNK)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(CHUNK)
                if channel.exit_status_ready() and not (channel.recv_ready() or channel.recv_stderr_ready()):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    channel.close()
                    raise RemoteError(
                        f"a command on {self.endpoint.label} timed out after {timeout} s",
                        debug=f"command: {command}",
                        reason=f"no answer in {timeout} s",
                    )
            code = channel.recv_exit_status()
            channel.close()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise RemoteError(
                f"ssh to {self.endpoint.label} failed running a command: {e}",
                debug=f"command: {command}",
                reason=str(e) or type(e).__name__,
            ) from e
        self._check_not_dropped(code, channel)
        result = Result(code, bytes(out), bytes(err))
        if check and code != 0:
            detail = (result.stderr or result.stdout).decode("utf-8", "replace").strip()[-2000:]
            reason = detail.splitlines()[-1].strip() if detail else f"exit code {code}"
            raise RemoteError(
                f"a command on {self.endpoint.label} failed with exit code {code}"
                + (f":\n{detail}" if detail else ""),
                debug=f"command: {command}",
                reason=reason[:200],
            )
        return result

    def stream(
        self,
        command: str,
        sink: Callable[[bytes], Any],
        *,
        stdin: bytes | None = None,
        errors: Callable[[bytes], Any] | None = None,
    ) -> int:
        """Run a command, handing stdout to ``sink`` chunk by chunk as it arrives (and stderr
        to ``errors``, when given; else it is dropped); return the exit code."""
        try:
            channel = self._channel(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            while True:  # both streams as they come, as `run` reads them
                select.select([channel], [], [], 0.5)
                while channel.recv_ready():
                    sink(channel.recv(CHUNK))
                while channel.recv_stderr_ready():
                    data = channel.recv_stderr(CHUNK)
                    if errors is not None:
                        errors(data)
                if channel.exit_status_ready() and not (channel.recv_ready() or channel.recv_stderr_ready()):
                    break
            code = channel.recv_exit_status()
            channel.close()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise RemoteError(
                f"ssh stream from {self.endpoint.label} broke: {e}",
                debug=f"command: {command}",
                reason=str(e) or type(e).__name__,
            ) from e
        self._check_not_dropped(code, channel)
        return code

    def _check_not_dropped(self, code: int, channel: paramiko.Channel) -> None:
        """A channel that ended without an exit status on a dead transport is a dropped
        connection, not a command that finished: say so (callers reconnect)."""
        transport = channel.get_transport()
        if code == -1 and (transport is None or not transport.is_active()):
            raise RemoteError(
                f"the connection to {self.endpoint.label} dropped", reason="the connection dropped"
            )

    def send_stream(self, command: str, chunks: Iterable[bytes]) -> Result:
        """Run a command whose stdin is a stream of chunks (bulk upload); return its result."""
        try:
            channel = self._channel(command)
            for chunk in chunks:
                channel.sendall(chunk)
            channel.shutdown_write()
            out = bytearray()
            while True:
                data = channel.recv(CHUNK)
                if not data:
                    break
                out += data
            err = _drain_stderr(channel)
            code = channel.recv_exit_status()
            channel.close()
            return Result(code, bytes(out), err)
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise RemoteError(f"upload to {self.endpoint.label} broke: {e}") from e


def _drain_stderr(channel: paramiko.Channel) -> bytes:
    err = bytearray()
    while True:
        data = channel.recv_stderr(CHUNK)
        if not data:
            return bytes(err)
        err += data
