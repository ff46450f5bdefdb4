"""The simulated instance host: real SSH clients (paramiko, OpenSSH) against SimHost, no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import needs
import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloudtrain.cloud.simhost import HostSpec, SimHost
from cloudtrain.errors import CloudError

MB = 1 << 20
TIMEOUT = 20.0


@dataclass(frozen=True)
class ClientKey:
    pkey: paramiko.PKey
    public: str  # OpenSSH public key line
    pem: str  # OpenSSH private key file


def new_client_key() -> ClientKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return ClientKey(paramiko.Ed25519Key.from_private_key(io.StringIO(pem)), public.decode(), pem)


class PinnedKeys(paramiko.MissingHostKeyPolicy):
    """Accept a host key only if its SHA256 fingerprint is pinned (the controller's pattern)."""

    def __init__(self, fingerprint_lines: list[str]) -> None:
        self.fingerprints = {line.split()[1] for line in fingerprint_lines}
        self.seen: str | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.seen = key.fingerprint
        if key.fingerprint not in self.fingerprints:
            raise paramiko.SSHException(f"host key mismatch: {hostname} presented {key.fingerprint}")
        client.get_host_keys().add(hostname, key.get_name(), key)


@pytest.fixture
def client_key() -> ClientKey:
    return new_client_key()


@pytest.fixture
def make_host(tmp_path: Path, client_key: ClientKey) -> Iterator[Callable[..., SimHost]]:
    hosts: list[SimHost] = []

    def make(name: str = "", env: dict[str, str] | None = None, path_prefix: Sequence[str] = ()) -> SimHost:
        # unique ids: stop() kills by the instance id marker, also in a parallel test run
        name = name or f"i-{secrets.token_hex(8)}"
        host = SimHost(
            HostSpec(name, tmp_path / name, client_key.public, env=env or {}, path_prefix=path_prefix)
        )
        hosts.append(host)
        host.start()
        return host

    yield make
    for host in hosts:
        host.stop()


@pytest.fixture
def host(make_host: Callable[..., SimHost]) -> SimHost:
    return make_host()


def connect(
    host: SimHost, key: paramiko.PKey, *, username: str = "ubuntu", pinned: list[str] | None = None
) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(PinnedKeys(host.host_key_fingerprints() if pinned is None else pinned))
    client.connect(
        host.host,
        host.port,
        username=username,
        pkey=key,
        look_for_keys=False,
        allow_agent=False,
        timeout=TIMEOUT,
        banner_timeout=TIMEOUT,
        auth_timeout=TIMEOUT,
    )
    return client


@pytest.fixture
def client(host: SimHost, client_key: ClientKey) -> Iterator[paramiko.SSHClient]:
    c = connect(host, client_key.pkey)
    yield c
    c.close()


def open_channel(client: paramiko.SSHClient, command: str | None) -> paramiko.Channel:
    transport = client.get_transport()
    assert transport is not None
    chan = transport.open_session(timeout=TIMEOUT)
    chan.settimeout(TIMEOUT)
    if command is None:
        chan.invoke_shell()
    else:
        chan.exec_command(command)
    return chan


def read_all(chan: paramiko.Channel, stderr: bool = False) -> bytes:
    recv = chan.recv_stderr if stderr else chan.recv
    parts = []
    while data := recv(MB):
        parts.append(data)
    return b"".join(parts)


def run(client: paramiko.SSHClient, command: str, stdin: bytes = b"") -> tuple[int, str, str]:
    chan = open_channel(client, command)
    if stdin:
        chan.sendall(stdin)
    chan.shutdown_write()
    out = read_all(chan)
    err = read_all(chan, stderr=True)
    return chan.recv_exit_status(), out.decode(), err.decode()


def alive(pid: int) -> bool:
    """A process exists and is not a zombie (killed orphans may wait for an init that never reaps)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# --- commands ---------------------------------------------------------------------------


def test_command_output_and_exit_status(client: paramiko.SSHClient, host: SimHost) -> None:
    status, out, err = run(client, "echo hello; pwd; echo oops >&2; exit 3")
    assert status == 3
    assert out == f"hello\n{host.home}\n"
    assert err == "oops\n"
    assert run(client, "true")[0] == 0


def test_environment_is_clean(
    make_host: Callable[..., SimHost], client_key: ClientKey, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leak-me-if-you-can")
    monkeypatch.setenv("SOME_CONTROLLER_VAR", "x")
    host = make_host(env={"CLOUDTRAIN_IMAGE": "/img"}, path_prefix=["/layer/tf/bin"])
    with connect(host, client_key.pkey) as client:
        status, out, _ = run(client, "env -0", b"")
    assert status == 0
    env = dict(item.split("=", 1) for item in out.split("\0") if item)
    sandbox = tmp_path / host.spec.instance_id
    expected = {
        "HOME": str(sandbox / "home"),
        "USER": "ubuntu",
        "LOGNAME": "ubuntu",
        "PATH": "/layer/tf/bin:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TMPDIR": str(sandbox / "tmp"),
        "SHELL": "/bin/bash",
        "CLOUDTRAIN_SIM_INSTANCE": host.spec.instance_id,
        "CLOUDTRAIN_POWEROFF_HOOK": str(sandbox / "poweroff"),
        "CLOUDTRAIN_IMDS_ENDPOINT": host.imds.endpoint,  # its own instance's metadata, on loopback
        "CLOUDTRAIN_IMAGE": "/img",
    }
    # bash itself adds PWD, SHLVL and _ to what it exports
    assert {k: v for k, v in env.items() if k not in ("PWD", "SHLVL", "_")} == expected
    assert "AWS_SECRET_ACCESS_KEY" not in env and "SOME_CONTROLLER_VAR" not in env
    assert env["PWD"] == str(sandbox / "home")
    assert (sandbox / "home").is_dir() and (sandbox / "tmp").is_dir()


def test_killed_command_reports_nonzero(client: paramiko.SSHClient) -> None:
    status, _, _ = run(client, "kill -KILL $$")
    assert status != 0  # exit-signal KILL, like sshd: paramiko reads -1
    assert run(client, "sleep 5 & kill -TERM $!; wait $!")[0] == 143


def test_signal_requests_reach_the_command(host: SimHost, client_key: ClientKey) -> None:
    """asyncssh's client can send signals (paramiko cannot): they go to the command's process group."""

    async def scenario() -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect(
            host.host,
            host.port,
            username="ubuntu",
            client_keys=[asyncssh.import_private_key(client_key.pem)],
            known_hosts=([asyncssh.import_public_key(k) for k in host.host_public_keys()], [], []),
            config=None,
            agent_path=None,
        ) as conn:
            process = await conn.create_process("echo ready; sleep 30")
            assert await asyncio.wait_for(process.stdout.readline(), TIMEOUT) == "ready\n"
            process.send_signal("TERM")
            return await asyncio.wait_for(process.wait(), TIMEOUT)

    result = asyncio.run(scenario())
    assert result.exit_signal is not None and result.exit_signal[0] == "TERM"  # the whole group got it
    assert result.returncode == -15


def test_two_channels_at_once(client: paramiko.SSHClient) -> None:
    first = open_channel(client, "read line; echo first:$line")  # waits for its input
    second = open_channel(client, "echo second")
    assert read_all(second) == b"second\n" and second.recv_exit_status() == 0
    assert not first.exit_status_ready()
    first.sendall(b"go\n")
    first.shutdown_write()
    assert read_all(first) == b"first:go\n" and first.recv_exit_status() == 0


def test_shell_request_runs_bash_on_stdin(client: paramiko.SSHClient, host: SimHost) -> None:
    chan = open_channel(client, None)
    chan.sendall(b'echo "$HOME"\nexit 4\n')
    chan.shutdown_write()
    assert read_all(chan) == f"{host.home}\n".encode()
    assert chan.recv_exit_status() == 4


def test_keepalive_requests_are_answered(client: paramiko.SSHClient) -> None:
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(5)
    transport.global_request("keepalive@openssh.com", wait=True)  # answered (success or failure)
    assert transport.is_active()
    assert run(client, "echo still here")[1] == "still here\n"


def test_client_going_away_closes_the_commands_pipes(client: paramiko.SSHClient) -> None:
    chan = open_channel(client, "echo $$; while :; do echo tick; sleep 0.05; done")
    pid = int(chan.recv(64).split(b"\n")[0])
    assert alive(pid)
    chan.close()
    assert wait_until(lambda: not alive(pid)), "the command should die of SIGPIPE once its channel closed"


def test_large_streams_both_ways(client: paramiko.SSHClient, host: SimHost) -> None:
    data = os.urandom(50 * MB)
    digest = hashlib.sha256(data).hexdigest()

    chan = open_channel(client, "cat > upload.bin")
    start = time.perf_counter()
    # one sendall per MB: paramiko's sendall copies the rest of its buffer after every packet
    for offset in range(0, len(data), MB):
        chan.sendall(data[offset : offset + MB])
    chan.shutdown_write()
    assert chan.recv_exit_status() == 0
    up = len(data) / MB / (time.perf_counter() - start)
    assert hashlib.sha256((host.home / "upload.bin").read_bytes()).hexdigest() == digest

    chan = open_channel(client, "cat upload.bin")
    start = time.perf_counter()
    received = read_all(chan)
    down = len(data) / MB / (time.perf_counter() - start)
    assert chan.recv_exit_status() == 0
    assert hashlib.sha256(received).hexdigest() == digest
    print(f"\nsimhost over paramiko: upload {up:.0f} MB/s, download {down:.0f} MB/s (50 MB each)")


def test_sftp_resolves_relative_paths_in_home(client: paramiko.SSHClient, host: SimHost) -> None:
    with client.open_sftp() as sftp:
        assert sftp.normalize(".") == str(host.home)
        with sftp.open("hello.txt", "wb") as f:
            f.write(b"hi over sftp")
        assert "hello.txt" in sftp.listdir(".")
    assert (host.home / "hello.txt").read_bytes() == b"hi over sftp"


# --- authentication and host keys ---------------------------------------------------------


def test_wrong_client_key_is_refused(host: SimHost) -> None:
    with pytest.raises(paramiko.AuthenticationException):
        connect(host, new_client_key().pkey)


def test_wrong_username_is_refused(host: SimHost, client_key: ClientKey) -> None:
    with pytest.raises(paramiko.AuthenticationException):
        connect(host, client_key.pkey, username="root")


def test_pinned_fingerprint_mismatch_is_detected(
    make_host: Callable[..., SimHost], client_key: ClientKey
) -> None:
    a, b = make_host(), make_host()
    assert set(a.host_key_fingerprints()).isdisjoint(b.host_key_fingerprints())
    with pytest.raises(paramiko.SSHException, match="host key mismatch"):
        connect(a, client_key.pkey, pinned=b.host_key_fingerprints())
    connect(a, client_key.pkey, pinned=a.host_key_fingerprints()).close()


def test_console_output_has_the_fingerprints_of_the_key_the_client_saw(
    host: SimHost, client: paramiko.SSHClient
) -> None:
    console = host.console_output()
    block = re.search(
        r"-----BEGIN SSH HOST KEY FINGERPRINTS-----\n(.*?)\n-----END SSH HOST KEY FINGERPRINTS-----",
        console,
        re.S,
    )
    assert block is not None
    lines = block.group(1).split("\n")
    assert lines == host.host_key_fingerprints()
    for line in lines:
        assert re.fullmatch(r"256 SHA256:[A-Za-z0-9+/]{43} root@ip-127-0-0-1 \((ED25519|ECDSA)\)", line)
    transport = client.get_transport()
    assert transport is not None
    seen = transport.get_remote_server_key()
    assert seen.fingerprint in {line.split()[1] for line in lines}
    assert f"{seen.get_name()} {seen.get_base64()}" in host.host_public_keys()


def test_bad_authorized_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CloudError, match="not an OpenSSH public key"):
        SimHost(HostSpec("i-0bad", tmp_path / "sb", "ssh-ed25519 not-base64"))


def test_openssh_client_with_pinned_known_hosts(host: SimHost, client_key: ClientKey, tmp_path: Path) -> None:
    if shutil.which("ssh") is None:
        needs.unavailable("no OpenSSH client (apt-get install openssh-client)")
    key_file = tmp_path / "id_ed25519"
    key_file.write_text(client_key.pem)
    key_file.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text("".join(f"[{host.host}]:{host.port} {line}\n" for line in host.host_public_keys()))
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")

    def ssh(known_hosts: Path, command: str) -> subprocess.CompletedProcess[str]:
        argv = ["ssh", "-F", "/dev/null", "-i", str(key_file), "-p", str(host.port)]
        for option in (
            "StrictHostKeyChecking=yes",
            f"UserKnownHostsFile={known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "ConnectTimeout=10",
        ):
            argv += ["-o", option]
        argv += [f"ubuntu@{host.host}", command]
        return subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )

    ok = ssh(known, "echo ok")
    assert (ok.returncode, ok.stdout) == (0, "ok\n"), ok.stderr
    assert ssh(known, "exit 7").returncode == 7
    refused = ssh(empty, "echo ok")
    assert refused.returncode == 255 and refused.stdout == ""
    assert "Host key verification failed" in refused.stderr


# --- power-off and stop ---------------------------------------------------------------------


def test_poweroff_hook_only_raises_a_flag(client: paramiko.SSHClient, host: SimHost) -> None:
    assert not host.poweroff_requested()
    status, _, err = run(client, 'CLOUDTRAIN_POWEROFF_REASON=done "$CLOUDTRAIN_POWEROFF_HOOK"')
    assert status == 0, err
    assert host.poweroff_requested()
    assert (host.sandbox / "poweroff-requested").read_text() == "done\n"


def test_stop_kills_escaped_and_foreground_processes(
    host: SimHost, client: paramiko.SSHClient, client_key: ClientKey
) -> None:
    # a double-forked, setsid'ed process: outside every process group the host started
    status, _, err = run(
        client,
        "( setsid bash -c 'echo $$ > escaped.pid; exec sleep 600' </dev/null >/dev/null 2>&1 & )",
    )
    assert status == 0, err
    pid_file = host.home / "escaped.pid"
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
    escaped = int(pid_file.read_text())
    assert wait_until(lambda: Path(f"/proc/{escaped}/cmdline").read_bytes().startswith(b"sleep"))
    session = int(Path(f"/proc/{escaped}/stat").read_text().rsplit(")", 1)[1].split()[3])
    assert session == escaped  # its own session

    foreground = open_channel(client, "echo $$; exec sleep 600")
    sleeper = int(foreground.recv(64).strip())
    assert alive(escaped) and alive(sleeper)

    start = time.monotonic()
    host.stop()
    assert time.monotonic() - start < 5
    assert not alive(escaped), "the escaped process survived stop()"
    assert not alive(sleeper), "the foreground command survived stop()"
    assert foreground.recv_exit_status() != 0
    with pytest.raises((OSError, paramiko.SSHException)):
        connect(host, client_key.pkey)
    host.stop()  # idempotent


def kill(*pids: int) -> None:
    """SIGKILL what a failed test may leave behind (only the pids it started)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, session, ...]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


# Escapes every way a process can: a double fork (its parent exits: it is orphaned), a new
# session (setsid), a clean environment (env -i: no CLOUDTRAIN_SIM_INSTANCE), SIGTERM
# ignored, and a child in a process group of its own (set -m) that ignores it too.
ESCAPE = (
    "( setsid env -i /bin/bash -c '"
    'trap "" TERM; set -m; '
    "sleep 600 & echo $! > group.pid; "
    "echo $$ > escaped.pid; exec sleep 601"
    "' </dev/null >/dev/null 2>&1 & )"
)


@pytest.mark.parametrize("grace", [0.0, 0.5])
def test_stop_kills_every_process_of_the_host_however_it_escaped(
    host: SimHost, client: paramiko.SSHClient, grace: float
) -> None:
    status, out, err = run(client, "echo $$; " + ESCAPE)
    assert status == 0, err
    command = int(out)  # the command's shell: its process group and session are the host's
    files = [host.home / "escaped.pid", host.home / "group.pid"]
    assert wait_until(lambda: all(f.exists() and f.read_text().strip() for f in files))
    escaped, grouped = (int(f.read_text()) for f in files)
    assert wait_until(lambda: Path(f"/proc/{escaped}/cmdline").read_bytes() == b"sleep\x00601\x00")
    for pid in (escaped, grouped):
        pgrp, session = (int(field) for field in proc_stat(pid)[2:4])
        assert session == escaped != command and pgrp in (escaped, grouped)  # neither the host's
        assert b"CLOUDTRAIN_SIM_INSTANCE" not in Path(f"/proc/{pid}/environ").read_bytes()
        ignored = re.search(r"^SigIgn:\s*(\w+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
        assert ignored is not None and int(ignored[1], 16) & (1 << (signal.SIGTERM - 1))
    assert int(proc_stat(grouped)[2]) == grouped  # a process group of its own
    assert not alive(command)  # the command itself is gone: both are orphans

    try:
        start = time.monotonic()
        host.stop(grace=grace)
        assert time.monotonic() - start < grace + 5
        assert not alive(escaped) and not alive(grouped), "an escaped process survived stop()"
    finally:
        kill(escaped, grouped)


def test_processes_die_with_the_simulator_however_it_dies(tmp_path: Path, client_key: ClientKey) -> None:
    """The simulator killed outright (no stop()): its hosts' processes go with it."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import paramiko
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_simhost import ESCAPE, connect
        from cloudtrain.cloud.simhost import HostSpec, SimHost
        import io
        pem = sys.stdin.read()
        key = paramiko.Ed25519Key.from_private_key(io.StringIO(pem))
        host = SimHost(HostSpec("i-{secrets.token_hex(8)}", Path({str(tmp_path / "sb")!r}), {client_key.public!r}))
        host.start()
        client = connect(host, key)
        _, out, _ = client.exec_command(ESCAPE)
        out.channel.recv_exit_status()
        print("ready", flush=True)
        time.sleep(600)
    """)
    simulator = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "simulator.err").open("w"),
        text=True,
    )
    pids: list[int] = []
    try:
        assert simulator.stdin is not None and simulator.stdout is not None
        simulator.stdin.write(client_key.pem)
        simulator.stdin.close()
        assert simulator.stdout.readline() == "ready\n", (tmp_path / "simulator.err").read_text()
        files = [tmp_path / "sb" / "home" / "escaped.pid", tmp_path / "sb" / "home" / "group.pid"]
        assert wait_until(lambda: all(f.exists() and f.read_text().strip() for f in files))
        pids += [int(f.read_text()) for f in files]
        assert all(alive(pid) for pid in pids)
        simulator.kill()
        simulator.wait()
        assert wait_until(lambda: not any(alive(pid) for pid in pids)), "orphans outlived the simulator"
    finally:
        simulator.kill()
        simulator.wait()
        kill(*pids)


def test_stop_before_start_and_twice(tmp_path: Path, client_key: ClientKey) -> None:
    host = SimHost(HostSpec(f"i-{secrets.token_hex(8)}", tmp_path / "sb", client_key.public))
    host.stop()
    host.stop()
    with pytest.raises(RuntimeError):
        _ = host.port
    with pytest.raises(RuntimeError):
        host.start()


def test_stopped_port_refuses_connections(tmp_path: Path, client_key: ClientKey) -> None:
    with SimHost(HostSpec(f"i-{secrets.token_hex(8)}", tmp_path / "sb", client_key.public)) as host:
        port = host.port
        with socket.create_connection((host.host, port), timeout=TIMEOUT):
            pass
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()


def test_a_host_listens_on_its_own_loopback_address(tmp_path: Path, client_key: ClientKey) -> None:
    """A simulated cluster's node: SSH and IMDS on its private IP 127.0.0.N (the whole 127/8
    is loopback on Linux), and its console names it ip-127-0-0-N."""
    spec = HostSpec(f"i-{secrets.token_hex(8)}", tmp_path / "sb", client_key.public, address="127.0.0.7")
    with SimHost(spec) as host:
        assert (host.host, host.hostname) == ("127.0.0.7", "ip-127-0-0-7")
        client = connect(host, client_key.pkey)
        try:
            stdout = client.exec_command('printf %s "$CLOUDTRAIN_IMDS_ENDPOINT"', timeout=TIMEOUT)[1]
            assert stdout.read().decode().startswith("http://127.0.0.7:")
        finally:
            client.close()
        with pytest.raises(OSError):  # on its own address only
            socket.create_connection(("127.0.0.1", host.port), timeout=TIMEOUT).close()
        assert all(" root@ip-127-0-0-7 (" in line for line in host.host_key_fingerprints())
        console = host.console_output()
        assert "root@ip-127-0-0-1" not in console
        assert re.search(r"ens5 +\| True \| +127\.0\.0\.7 +\|", console)


@pytest.mark.parametrize("address", ["10.0.0.5", "0.0.0.0", "::1", "localhost"])
def test_a_host_never_listens_off_ipv4_loopback(tmp_path: Path, client_key: ClientKey, address: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        SimHost(HostSpec("i-0abc", tmp_path / "sb", client_key.public, address=address))
