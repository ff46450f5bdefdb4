"""Pull-back of outputs over a real OpenSSH sshd on loopback: verified, atomic, capped, contained."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
from sshd import AGENT_SOURCE, SshServer, agent, session, sshd_server  # noqa: F401  (fixtures)

from cloudtrain.agent import receive as agent_receive
from cloudtrain.agent import wire
from cloudtrain.agent.receive import StreamReceiver
from cloudtrain.agent.wire import StreamError
from cloudtrain.errors import RemoteError
from cloudtrain.remote.pull import PullReport, pull
from cloudtrain.remote.session import Session
from cloudtrain.remote.sync import collect, push


def do_pull(
    session: Session, agent: str, remote: Path, paths: list[str], dest: Path, **kw: object
) -> PullReport:
    return pull(
        session,
        str(remote),
        paths,
        dest,
        remote_python=sys.executable,
        remote_agent_path=agent,
        **kw,  # type: ignore[arg-type]
    )


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("transport", ["auto", "paramiko"])
def test_pull_outputs_nested(session: Session, agent: str, tmp_path: Path, transport: str) -> None:
    remote, run_dir = tmp_path / "remote", tmp_path / "run"
    write(remote / "outputs" / "model.h5", os.urandom(50_000))
    write(remote / "outputs" / "logs" / "deep" / "events.txt", "loss=0.1\n")
    write(remote / "outputs" / "empty.txt", b"")
    write(remote / "preds.csv", "1,0\n")
    write(remote / "not-listed.txt", "stays there")
    (remote / "outputs" / "run.sh").write_text("#!/bin/sh\n")
    (remote / "outputs" / "run.sh").chmod(0o4755)  # setuid is not kept
    report = do_pull(
        session, agent, remote, ["outputs/", "preds.csv", "missing.txt"], run_dir, transport=transport
    )
    out = run_dir / "outputs"
    assert sorted(report.files) == [
        "outputs/empty.txt",
        "outputs/logs/deep/events.txt",
        "outputs/model.h5",
        "outputs/run.sh",
        "preds.csv",
    ]
    assert report.skipped == ("missing.txt: missing",)
    assert (out / "outputs" / "model.h5").read_bytes() == (remote / "outputs" / "model.h5").read_bytes()
    assert (out / "outputs" / "logs" / "deep" / "events.txt").read_text() == "loss=0.1\n"
    assert (out / "preds.csv").read_text() == "1,0\n"
    assert (out / "outputs" / "run.sh").stat().st_mode & 0o7777 == 0o755
    mtime = (remote / "preds.csv").stat().st_mtime_ns
    assert (out / "preds.csv").stat().st_mtime_ns == mtime
    assert not (out / "not-listed.txt").exists()
    assert report.transport == ("openssh" if transport == "auto" else "paramiko")
    # again: files are replaced atomically, nothing piles up
    write(remote / "preds.csv", "2,1\n")
    do_pull(session, agent, remote, ["preds.csv"], run_dir, transport=transport)
    assert (out / "preds.csv").read_text() == "2,1\n"
    assert not [p for p in out.rglob("*") if p.name.startswith(agent_receive.TMP_PREFIX)]


def test_pull_refuses_what_would_land_outside(session: Session, agent: str, tmp_path: Path) -> None:
    remote, run_dir, secret = tmp_path / "remote", tmp_path / "run", tmp_path / "secret"
    write(secret / "key.pem", "private")
    write(remote / "outputs" / "ok.txt", "ok")
    write(remote / "outputs" / "target.txt", "inside")
    (remote / "outputs" / "inside-link.txt").symlink_to(remote / "outputs" / "target.txt")
    (remote / "outputs" / "outside-link.pem").symlink_to(secret / "key.pem")
    (remote / "outputs" / "dir-link").symlink_to(secret)
    write(remote / "outputs" / "sub" / "in-sub.txt", "sub")
    (remote / "outputs" / "sub-link").symlink_to(remote / "outputs" / "sub")
    (remote / "escape").symlink_to(secret)
    os.mkfifo(remote / "outputs" / "fifo")
    report = do_pull(
        session,
        agent,
        remote,
        ["outputs", "../secret/key.pem", "/etc/hostname", "escape/key.pem", "a/../../x"],
        run_dir,
    )
    assert sorted(report.files) == [
        "outputs/inside-link.txt",
        "outputs/ok.txt",
        "outputs/sub/in-sub.txt",
        "outputs/target.txt",
    ]
    assert (run_dir / "outputs" / "outputs" / "inside-link.txt").read_text() == "inside"
    reasons = dict(entry.split(": ", 1) for entry in report.skipped)
    assert reasons["../secret/key.pem"].startswith("refused")
    assert reasons["/etc/hostname"].startswith("refused")
    assert reasons["a/../../x"].startswith("refused")
    assert "outside the workdir" in reasons["escape/key.pem"]
    assert "outside the workdir" in reasons["outputs/outside-link.pem"]
    assert "outside the workdir" in reasons["outputs/dir-link"]
    assert "symlink to a folder" in reasons["outputs/sub-link"]
    assert "not a regular file" in reasons["outputs/fifo"]
    assert not list(run_dir.rglob("*.pem"))


def test_pull_never_writes_through_a_local_symlink(session: Session, agent: str, tmp_path: Path) -> None:
    remote, run_dir, elsewhere = tmp_path / "remote", tmp_path / "run", tmp_path / "elsewhere"
    write(remote / "outputs" / "model.h5", "weights")
    write(remote / "top.txt", "top")
    elsewhere.mkdir()
    (run_dir / "outputs").mkdir(parents=True)
    (run_dir / "outputs" / "outputs").symlink_to(elsewhere)
    with pytest.raises(RemoteError) as caught:
        do_pull(session, agent, remote, ["outputs", "top.txt"], run_dir)
    assert "outputs is a symlink" in caught.value.message
    assert list(elsewhere.iterdir()) == []
    assert (run_dir / "outputs" / "top.txt").read_text() == "top"  # what was safe still arrived
    shutil.rmtree(run_dir / "outputs")
    (run_dir / "outputs").symlink_to(elsewhere)
    with pytest.raises(RemoteError, match="is a symlink"):
        do_pull(session, agent, remote, ["top.txt"], run_dir)
    assert list(elsewhere.iterdir()) == []


def test_pull_caps_the_size(session: Session, agent: str, tmp_path: Path) -> None:
    remote, run_dir = tmp_path / "remote", tmp_path / "run"
    write(remote / "outputs" / "a.bin", b"a" * 600)
    write(remote / "outputs" / "b.bin", b"b" * 600)
    write(remote / "outputs" / "c.bin", b"c" * 300)
    report = do_pull(session, agent, remote, ["outputs"], run_dir, max_bytes=1000)
    assert sorted(report.files) == ["outputs/a.bin", "outputs/c.bin"]
    assert report.skipped == ("outputs/b.bin: over the size cap of 1000 bytes",)
    assert report.bytes == 900


def test_the_receiver_cuts_a_stream_over_its_cap_and_rejects_lies(tmp_path: Path) -> None:
    """What a hostile instance could send: more than the cap, a file under a false hash."""
    body = os.urandom(2000)
    digest = hashlib.sha256(body).hexdigest().encode()
    over = wire.MAGIC + wire.put_header("big.bin", 2000, 0o644, 0) + body + digest + b"\n"
    receiver = StreamReceiver(str(tmp_path / "dest"), max_bytes=1000)
    with pytest.raises(StreamError, match="over the size cap"):
        receiver.feed(over)
    receiver.close()
    assert list((tmp_path / "dest").iterdir()) == []

    lie = wire.MAGIC + wire.put_header("x.bin", 2000, 0o644, 0) + body + b"f" * 64 + b"\n"
    receiver = StreamReceiver(str(tmp_path / "dest"))
    for i in range(0, len(lie), 7):  # any chunking
        receiver.feed(lie[i : i + 7])
    receiver.feed(wire.end_header(files=1, bytes=2000))
    receiver.finish()
    receiver.close()
    assert receiver.errors == [("x.bin", agent_receive.MISMATCH)]
    assert list((tmp_path / "dest").iterdir()) == []


def test_large_file_round_trip(session: Session, agent: str, tmp_path: Path) -> None:
    work, remote, run_dir = tmp_path / "work", tmp_path / "remote", tmp_path / "run"
    big = work / "outputs" / "weights.bin"
    big.parent.mkdir(parents=True)
    block = os.urandom(1 << 20)
    with open(big, "wb") as f:
        for i in range(100):
            f.write(block[:-4] + i.to_bytes(4, "little"))
    want = hashlib.sha256(big.read_bytes()).hexdigest()
    sent: list[tuple[int, int]] = []
    report = push(
        session,
        collect(work),
        str(remote),
        cache_dir=tmp_path / "cache",
        remote_python=sys.executable,
        remote_agent_path=agent,
        progress=lambda done, total: sent.append((done, total)),
    )
    assert report.transport == "openssh" and report.bytes_sent == 100 << 20
    assert agent_receive.sha256_file(str(remote / "outputs" / "weights.bin")) == want
    # the progress bar hears the big file piece by piece, never going back, to its end
    assert len(sent) > 10 and {total for _, total in sent} == {100 << 20}
    assert [done for done, _ in sent] == sorted(done for done, _ in sent) and sent[-1][0] == 100 << 20
    received: list[int] = []
    pulled = do_pull(session, agent, remote, ["outputs/weights.bin"], run_dir, progress=received.append)
    assert pulled.bytes == 100 << 20
    assert len(received) > 10 and received == sorted(received) and received[-1] > 100 << 20  # with headers
    assert agent_receive.sha256_file(str(run_dir / "outputs" / "outputs" / "weights.bin")) == want


def test_pull_reports_a_missing_workdir(session: Session, agent: str, tmp_path: Path) -> None:
    with pytest.raises(RemoteError, match="pack on .* exited with 1"):
        do_pull(session, agent, tmp_path / "no-such-workdir", ["outputs"], tmp_path / "run")
