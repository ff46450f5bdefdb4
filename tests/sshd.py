"""A real OpenSSH ``sshd`` on a free loopback port, for the SSH tests and the sync benchmark.

It runs as the current user with its own ed25519 host key and a freshly generated
client key in ``authorized_keys``; its output goes to a log file (never to pytest's
streams), and it is stopped when the fixture ends. Tests that need it are skipped
with a reason when ``/usr/sbin/sshd`` or ``ssh-keygen`` is missing (``.ci/run``
installs Debian's openssh-server).

Import the fixture into a test module with ``from sshd import sshd_server``
(pytest puts tests/ on sys.path; it discovers fixtures imported into a module).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import needs
import pytest

from cloudtrain.remote.session import Endpoint, Session
from cloudtrain.remote.sync import upload_tree

SSHD = Path(shutil.which("sshd") or "/usr/sbin/sshd")  # where .ci/run finds one too
STARTUP_TIMEOUT_S = 10.0


def missing_reason() -> str | None:
    """Why a real sshd cannot be started here, or None when it can."""
    if not SSHD.exists():
        return f"{SSHD} is missing (apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is missing (apt-get install openssh-client)"
    return None


@dataclass
class SshServer:
    """A running sshd and what a client needs to reach it."""

    host: str
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    fingerprint: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def endpoint(self) -> Endpoint:
        """The endpoint with the host key's SHA256 fingerprint pinned."""
        return Endpoint(self.host, self.port, self.user, self.client_key, frozenset({self.fingerprint}))

    def ssh_args(self) -> list[str]:
        """An OpenSSH client command line (without the destination's command) for this server."""
        return [
            "ssh",
            "-i",
            str(self.client_key),
            "-p",
            str(self.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "LogLevel=ERROR",
        ]

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _fingerprint(public_key: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key)],
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    ).stdout
    return out.split()[1]  # "256 SHA256:... comment (ED25519)"


def _wait_listening(server: SshServer) -> None:
    end = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < end:
        if server.process.poll() is not None:
            raise RuntimeError(f"sshd exited with {server.process.returncode}: {server.log()}")
        try:
            with socket.create_connection((server.host, server.port), timeout=0.5) as conn:
                conn.settimeout(2)
                if conn.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"sshd did not listen on port {server.port} in {STARTUP_TIMEOUT_S} s: {server.log()}")


def start_sshd(folder: Path) -> SshServer:
    """Start sshd with keys and configuration under ``folder``; the caller stops it."""
    reason = missing_reason()
    if reason:
        raise RuntimeError(reason)
    folder.mkdir(parents=True, exist_ok=True)
    host_key, client_key = folder / "host_ed25519", folder / "client_ed25519"
    _keygen(host_key, "cloudtrain-test-host")
    _keygen(client_key, "cloudtrain-test-client")
    authorized = folder / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    if os.geteuid() == 0:  # sshd as root insists on its privilege separation folder
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    user = getpass.getuser()
    fingerprint = _fingerprint(host_key.with_suffix(".pub"))
    host_pub = host_key.with_suffix(".pub").read_text().split()
    last_error: Exception | None = None
    for _ in range(3):  # the free port can be taken between the probe and sshd's bind
        port = _free_port()
        config = folder / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key}",
                    f"PidFile {folder / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "UsePAM no",
                    "StrictModes no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "MaxStartups 64",
                    "MaxSessions 64",
                    "LogLevel ERROR",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )
        known_hosts = folder / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        log_path = folder / "sshd.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        server = SshServer("127.0.0.1", port, user, client_key, known_hosts, fingerprint, log_path, process)
        try:
            _wait_listening(server)
            return server
        except RuntimeError as e:
            server.stop()
            last_error = e
    raise RuntimeError(f"could not start sshd: {last_error}")


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A real sshd for this test module; skipped when OpenSSH's server is not installed."""
    reason = missing_reason()
    if reason:
        needs.unavailable(reason)
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


AGENT_SOURCE = Path(__file__).resolve().parents[1] / "cloudtrain" / "agent"


@pytest.fixture(scope="module")
def session(sshd_server: SshServer) -> Iterator[Session]:
    with Session(sshd_server.endpoint()) as s:
        yield s


@pytest.fixture(scope="module")
def agent(session: Session, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The agent uploaded as `cloudtrain_agent`; the folder to put on PYTHONPATH."""
    folder = tmp_path_factory.mktemp("agent")
    upload_tree(session, AGENT_SOURCE, str(folder / "cloudtrain_agent"))
    return str(folder)
