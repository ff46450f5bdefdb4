"""The controller's SSH session against a simulated host: pinning, commands, streams, drops."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from test_simhost import ClientKey, client_key, host, make_host  # noqa: F401  (fixtures)

from cloudtrain.cloud.simhost import SimHost
from cloudtrain.errors import RemoteError
from cloudtrain.remote.session import Endpoint, HostKeyMismatch, Session, parse_console_fingerprints


def endpoint(
    host: SimHost, key: ClientKey, tmp_path: Path, fingerprints: frozenset[str] | None = None
) -> Endpoint:
    path = tmp_path / "client.pem"
    path.write_text(key.pem)
    path.chmod(0o600)
    pinned = parse_console_fingerprints(host.console_output()) if fingerprints is None else fingerprints
    return Endpoint(host.host, host.port, "ubuntu", path, pinned)


def test_console_fingerprints_pin_the_host(host: SimHost, client_key: ClientKey, tmp_path: Path) -> None:
    pinned = parse_console_fingerprints(host.console_output())
    assert len(pinned) == 2  # ecdsa and ed25519, as cloud-init prints them
    with Session(endpoint(host, client_key, tmp_path)) as session:
        result = session.run("echo hello; echo oops >&2; exit 4", check=False)
        assert (result.exit_code, result.text, result.stderr) == (4, "hello\n", b"oops\n")
        assert session.known_hosts_line().startswith(f"[127.0.0.1]:{host.port} ")
        with pytest.raises(RemoteError, match="exit code 5"):
            session.run("exit 5")


def test_mismatch_is_never_retried(host: SimHost, client_key: ClientKey, tmp_path: Path) -> None:
    wrong = endpoint(host, client_key, tmp_path, frozenset({"SHA256:" + "B" * 43}))
    started = time.monotonic()
    with pytest.raises(HostKeyMismatch, match="not one of the 1 fingerprints"):
        Session(wrong).connect(deadline_s=30)
    assert time.monotonic() - started < 10


def test_a_dropped_connection_raises_instead_of_looking_finished(
    host: SimHost, client_key: ClientKey, tmp_path: Path
) -> None:
    session = Session(endpoint(host, client_key, tmp_path)).connect()
    chunks: list[bytes] = []

    def drop() -> None:
        time.sleep(1.0)
        assert session._connection is not None
        transport = session._connection.client.get_transport()
        assert transport is not None
        transport.close()  # what a network drop looks like to the client

    threading.Thread(target=drop, daemon=True).start()
    with pytest.raises(RemoteError, match="dropped"):
        session.stream("echo started; sleep 30; echo never", chunks.append)
    assert b"".join(chunks) == b"started\n"
    session.reconnect(deadline_s=10)  # and a reconnection works
    assert session.run("echo back").text == "back\n"
    session.close()


def test_stdin_and_streams(host: SimHost, client_key: ClientKey, tmp_path: Path) -> None:
    with Session(endpoint(host, client_key, tmp_path)) as session:
        assert session.run("wc -c", stdin=b"x" * 100_000).text.strip() == "100000"
        got: list[bytes] = []
        assert session.stream("for i in 1 2 3; do echo $i; done", got.append) == 0
        assert b"".join(got) == b"1\n2\n3\n"
        sent = session.send_stream("cat > up.bin && wc -c < up.bin", (b"y" * 65536 for _ in range(32)))
        assert sent.exit_code == 0 and sent.stdout.strip() == b"2097152"


def test_a_failed_command_says_what_the_remote_said_not_its_command_line(
    host: SimHost, client_key: ClientKey, tmp_path: Path
) -> None:
    """The command line is for --debug: a user reads what happened (the remote's last words)."""
    command = "PYTHONPATH=$HOME/.cloudtrain/agent true; echo 'the instance is shutting down' >&2; exit 255"
    with Session(endpoint(host, client_key, tmp_path)) as session, pytest.raises(RemoteError) as failed:
        session.run(command)
    error = failed.value
    assert "PYTHONPATH" not in error.message and "PYTHONPATH" not in error.reason
    assert "exit code 255" in error.message and "the instance is shutting down" in error.message
    assert error.reason == "the instance is shutting down"
    assert error.debug == f"command: {command}"


def test_no_pinned_fingerprint_refuses_every_host_key(
    host: SimHost, client_key: ClientKey, tmp_path: Path
) -> None:
    """Nothing pinned is no reason to trust: the console gave no fingerprints, so no host is known."""
    unpinned = endpoint(host, client_key, tmp_path, frozenset())
    started = time.monotonic()
    with pytest.raises(HostKeyMismatch):
        Session(unpinned).connect(deadline_s=30)
    assert time.monotonic() - started < 10  # refused at once, never retried
