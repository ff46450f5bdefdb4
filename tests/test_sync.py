"""Workdir sync over a real OpenSSH sshd on loopback: no mocks.

The "instance" is this machine: sshd runs as the current user, the remote Python is
this interpreter, and the agent is uploaded with ``upload_tree`` as the package
``cloudtrain_agent`` into a temporary folder, as the orchestrator does on an instance.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sshd import AGENT_SOURCE, SshServer, agent, session, sshd_server  # noqa: F401  (fixtures)

from cloudtrain.agent import receive as agent_receive
from cloudtrain.agent import wire
from cloudtrain.errors import RemoteError
from cloudtrain.remote import sync
from cloudtrain.remote.agent import AgentCli
from cloudtrain.remote.session import Session
from cloudtrain.remote.sync import SyncReport, collect, push, upload_tree
from cloudtrain.spec import DataSource


def do_push(
    session: Session, agent: str, workdir: Path, remote: Path, cache: Path, **kw: object
) -> SyncReport:
    files = collect(workdir, **kw.pop("collect", {}))  # type: ignore[arg-type]
    return push(
        session,
        files,
        str(remote),
        cache_dir=cache,
        remote_python=sys.executable,
        remote_agent_path=agent,
        **kw,  # type: ignore[arg-type]
    )


def write(path: Path, data: bytes | str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    return path


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root (but cloudtrain's own folder) -> its bytes."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(".cloudtrain/"):
            out[rel] = path.read_bytes()
    return out


def old_mtime(*paths: Path) -> None:
    """Age files past the hash cache's racy window, as files edited a while ago are."""
    for path in paths:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))


def test_upload_tree_copies_the_agent_without_bytecode(agent: str) -> None:
    uploaded = Path(agent) / "cloudtrain_agent"
    assert (uploaded / "receive.py").read_bytes() == (AGENT_SOURCE / "receive.py").read_bytes()
    assert not list(uploaded.rglob("*.pyc"))


def test_upload_tree_replaces_the_folder_and_reports_its_bytes(session: Session, tmp_path: Path) -> None:
    source = write(tmp_path / "ckpt" / "fit0" / "weights.npz", os.urandom(3 << 20)).parent.parent
    write(source / "manifest.json", "{}")
    remote = tmp_path / "remote-ckpt"
    write(remote / "stale.txt", "old")
    seen: list[tuple[int, int]] = []
    sent = upload_tree(session, source, str(remote), lambda done, total: seen.append((done, total)))
    assert tree(remote) == tree(source)  # the old content is gone
    assert seen[-1] == (sent, sent) and len(seen) == -(-sent // (1 << 18))


def test_first_sync_noop_and_one_change(session: Session, agent: str, tmp_path: Path) -> None:
    work, remote, cache = tmp_path / "work", tmp_path / "remote", tmp_path / "cache"
    files = [
        write(work / "train.py", "print('hi')\n"),
        write(work / "pkg" / "mod.py", "X = 1\n"),
        write(work / "pkg" / "deep" / "data.bin", os.urandom(200_000)),
        write(work / "run.sh", "#!/bin/sh\necho run\n", mode=0o755),
        write(work / "empty.txt", b""),
        write(work / "név with space.txt", "ünïcode\n"),
    ]
    old_mtime(*files)

    first = do_push(session, agent, work, remote, cache)
    assert first.files_sent == 6 and first.files_deleted == 0
    assert first.transport == "paramiko"  # small: over the open session
    assert tree(remote) == tree(work)
    assert stat.S_IMODE((remote / "run.sh").stat().st_mode) == 0o755
    assert (remote / "pkg" / "mod.py").stat().st_mtime_ns == (work / "pkg" / "mod.py").stat().st_mtime_ns
    assert not [p for p in remote.rglob("*") if p.name.startswith(agent_receive.TMP_PREFIX)]
    manifest = json.loads((remote / ".cloudtrain" / "manifest.json").read_text().splitlines()[1])
    assert manifest["train.py"][0] == hashlib.sha256(b"print('hi')\n").hexdigest()

    again = do_push(session, agent, work, remote, cache)
    assert (again.files_sent, again.files_deleted, again.transport) == (0, 0, "none")

    write(work / "pkg" / "mod.py", "X = 2\n")
    os.utime(work / "train.py")  # touched, same content: not sent
    changed = do_push(session, agent, work, remote, cache)
    assert changed.sent == ("pkg/mod.py",)
    assert (changed.files_sent, changed.bytes_sent) == (1, 6)
    assert (remote / "pkg" / "mod.py").read_text() == "X = 2\n"

    (work / "run.sh").chmod(0o644)  # permissions count
    assert do_push(session, agent, work, remote, cache).sent == ("run.sh",)
    assert stat.S_IMODE((remote / "run.sh").stat().st_mode) == 0o644


def test_deletions_and_renames_stay_inside_the_synced_set(
    session: Session, agent: str, tmp_path: Path
) -> None:
    work, remote, cache = tmp_path / "work", tmp_path / "remote", tmp_path / "cache"
    write(work / "a.txt", "a")
    write(work / "b.txt", "b")
    write(work / "pkg" / "old.py", "old")
    write(work / "sub" / "deeper" / "x.txt", "x")
    do_push(session, agent, work, remote, cache)
    # what the job made on the instance: never the sync's to delete
    write(remote / "outputs" / "model.h5", "weights")
    write(remote / "checkpoints" / "epoch1.ckpt", "ckpt")
    write(remote / "sub" / "deeper" / "made-there.txt", "mine")
    write(remote / "b.txt", "changed by the job")

    (work / "a.txt").unlink()
    (work / "b.txt").unlink()
    (work / "pkg" / "old.py").rename(work / "pkg" / "new.py")
    (work / "sub" / "deeper" / "x.txt").unlink()

    report = do_push(session, agent, work, remote, cache)
    assert report.sent == ("pkg/new.py",)
    assert set(report.deleted) == {"a.txt", "pkg/old.py", "sub/deeper/x.txt"}
    assert report.kept == ("b.txt",)  # changed on the instance since: left alone
    assert tree(remote) == {
        "pkg/new.py": b"old",
        "b.txt": b"changed by the job",
        "outputs/model.h5": b"weights",
        "checkpoints/epoch1.ckpt": b"ckpt",
        "sub/deeper/made-there.txt": b"mine",
    }
    # b.txt left the synced set: a later sync never deletes it
    assert do_push(session, agent, work, remote, cache).files_deleted == 0
    assert (remote / "b.txt").exists()

    (remote / "sub" / "deeper" / "made-there.txt").unlink()
    write(work / "gone" / "only.txt", "1")
    do_push(session, agent, work, remote, cache)
    (work / "gone" / "only.txt").unlink()
    do_push(session, agent, work, remote, cache)
    assert not (remote / "gone").exists()  # a folder a deletion emptied goes too


def test_ignore_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    write(work / ".gitignore", "*.pyc\nbuild/\n/data/\n!keep.pyc\n# comment\n")
    write(work / ".cloudtrainignore", "secret.txt\n!data/\n*.log\n")
    write(work / "sub" / ".gitignore", "*.tmp\n!important.tmp\n")
    for rel in [
        "train.py",
        "a.pyc",
        "keep.pyc",
        "pkg/b.pyc",
        "build/out.o",
        "pkg/build/x",
        "data/set.csv",
        "secret.txt",
        "pkg/secret.txt",
        "run.log",
        "sub/x.tmp",
        "sub/important.tmp",
        "sub/y.py",
        "x.tmp",
        ".git/config",
        "pkg/.git/HEAD",
        "runs/r1/run.json",
        "pkg/runs/kept.txt",
        "out/result.txt",
        "home/ledger.sqlite",
        ".cloudtrain/manifest.json",
    ]:
        write(work / rel, rel)
    monkeypatch.setenv("CLOUDTRAIN_HOME", str(work / "home"))
    files = collect(work, exclude=[work / "out"])
    assert [f.path for f in files] == [
        ".cloudtrainignore",
        ".gitignore",
        "data/set.csv",  # git-ignored, brought back by .cloudtrainignore's !data/
        "keep.pyc",
        "pkg/runs/kept.txt",  # only the top-level runs/ is the run folders'
        "sub/.gitignore",
        "sub/important.tmp",
        "sub/y.py",
        "train.py",
        "x.tmp",  # sub/.gitignore applies under sub/ only
    ]
    assert collect(work, exclude=["out"]) == files  # relative to the workdir, too


def test_symlinks_and_special_files(tmp_path: Path) -> None:
    work = tmp_path / "work"
    write(work / "real.txt", "real")
    write(tmp_path / "elsewhere" / "f.txt", "outside")
    (work / "link.txt").symlink_to(work / "real.txt")
    (work / "dirlink").symlink_to(tmp_path / "elsewhere")
    (work / "dangling").symlink_to(tmp_path / "nothing")
    os.mkfifo(work / "fifo")
    files = collect(work)
    assert [f.path for f in files] == ["link.txt", "real.txt"]  # a file symlink: its content
    assert any("dirlink" in w and "symlink to a folder" in w for w in files.warnings)
    assert any("fifo" in w for w in files.warnings)


def test_data_sources_land_at_their_dst(session: Session, agent: str, tmp_path: Path) -> None:
    work, remote, cache = tmp_path / "work", tmp_path / "remote", tmp_path / "cache"
    write(work / "train.py", "train")
    write(work / "data" / "set" / "stale.csv", "the data source owns data/set")
    write(work / "s3data" / "local-copy.bin", "fetched on the instance, not synced")
    dataset = tmp_path / "dataset"
    write(dataset / "a.csv", "1,2\n")
    write(dataset / "nested" / "b.csv", "3,4\n")
    write(dataset / ".git" / "HEAD", "ref")
    write(dataset / "ignored-by-nothing.pyc", "data is taken whole")
    write(dataset / ".gitignore", "*.pyc\n")
    single = write(tmp_path / "labels.txt", "cat\ndog\n")
    sources = [
        DataSource(src=str(dataset), dst="data/set/"),
        DataSource(src=str(single), dst="inputs/labels.txt"),
        DataSource(src="s3://my-bucket/prefix/", dst="s3data"),
    ]
    report = do_push(session, agent, work, remote, cache, collect={"data_sources": sources})
    assert tree(remote) == {
        "train.py": b"train",
        "data/set/a.csv": b"1,2\n",
        "data/set/nested/b.csv": b"3,4\n",
        "data/set/ignored-by-nothing.pyc": b"data is taken whole",
        "data/set/.gitignore": b"*.pyc\n",
        "inputs/labels.txt": b"cat\ndog\n",
    }
    assert report.files_sent == 6


def test_large_set_warning(
    session: Session, agent: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    for i in range(4):
        write(work / f"f{i}", str(i))
    monkeypatch.setattr(sync, "LARGE_FILES", 3)
    report = do_push(session, agent, work, tmp_path / "remote", tmp_path / "cache")
    assert any("synced set is large: 4 files" in w for w in report.warnings)


def test_openssh_transport_pins_the_host_key(
    session: Session,
    agent: str,
    tmp_path: Path,
    sshd_server: SshServer,  # noqa: F811
) -> None:
    work, remote, cache = tmp_path / "work", tmp_path / "remote", tmp_path / "cache"
    write(work / "big.bin", os.urandom(3 << 20))
    write(work / "small.txt", "s")
    report = do_push(session, agent, work, remote, cache, transport="openssh")
    assert report.transport == "openssh" and report.files_sent == 2
    assert tree(remote) == tree(work)
    with sync.OpenSSH(session) as ssh:
        argv = ssh.argv("true")
        assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv
        assert ssh.known_hosts.read_text() == session.known_hosts_line()
        # a different host key for the same address is refused, never accepted
        other = tmp_path / "other_host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
        fake = other.with_suffix(".pub").read_text().split()
        ssh.known_hosts.write_text(f"[127.0.0.1]:{sshd_server.port} {fake[0]} {fake[1]}\n")
        refused = subprocess.run(ssh.argv("true"), capture_output=True, stdin=subprocess.DEVNULL)
        assert refused.returncode == 255
        assert b"host key" in refused.stderr.lower() or b"verification failed" in refused.stderr.lower()


# --- the receiver, fed streams by hand --------------------------------------------------


def put(path: str, data: bytes, digest: str | None = None, mode: int = 0o644) -> bytes:
    digest = digest or hashlib.sha256(data).hexdigest()
    return wire.put_header(path, len(data), mode, 1_700_000_000_000_000_000) + data + digest.encode() + b"\n"


def stream(*records: bytes, end: bool = True, files: int | None = None) -> bytes:
    body = wire.MAGIC + b"".join(records)
    if end:
        puts = sum(1 for r in records if r.startswith(b'{"op":"put"'))
        body += wire.end_header(files=puts if files is None else files)
    return body


def receive(session: Session, agent: str, dest: Path, data: bytes) -> tuple[int, dict[str, object], str]:
    command = AgentCli(sys.executable, agent).receive(str(dest))
    result = session.send_stream(command, [data])
    return result.exit_code, json.loads(result.stdout), result.stderr.decode()


def test_a_corrupted_file_is_never_put_in_place(session: Session, agent: str, tmp_path: Path) -> None:
    dest = tmp_path / "remote"
    write(dest / "model.py", "the old, good version")
    data = stream(
        put("good.txt", b"fine"),
        put("model.py", b"flipped bits", digest=hashlib.sha256(b"what was sent").hexdigest()),
        put("new/corrupt.bin", b"x" * 5000, digest="0" * 64),
    )
    code, summary, stderr = receive(session, agent, dest, data)
    assert code == 1 and summary["ok"] is False
    assert "model.py" in stderr and "new/corrupt.bin" in stderr and "sha256 mismatch" in stderr
    assert (dest / "good.txt").read_bytes() == b"fine"
    assert (dest / "model.py").read_text() == "the old, good version"
    assert not (dest / "new" / "corrupt.bin").exists()
    leftovers = [p for p in dest.rglob("*") if p.name.startswith(agent_receive.TMP_PREFIX)]
    assert leftovers == []
    manifest = agent_receive.load_manifest(str(dest))
    assert set(manifest) == {"good.txt"}


def test_a_cut_stream_fails_and_leaves_no_partial_file(session: Session, agent: str, tmp_path: Path) -> None:
    dest = tmp_path / "remote"
    whole = stream(put("a.txt", b"a"), put("big.bin", os.urandom(3 << 20)))
    code, summary, stderr = receive(session, agent, dest, whole[: len(whole) // 2])
    assert code == 1 and "ended before its end record in the middle of big.bin" in str(
        summary["stream_error"]
    )
    assert (dest / "a.txt").read_bytes() == b"a"
    assert sorted(p.name for p in dest.iterdir()) == [".cloudtrain", "a.txt"]
    code, summary, _ = receive(session, agent, dest, b"not a stream at all\n")
    assert code == 1 and "bad magic" in str(summary["stream_error"])


def test_the_receiver_refuses_paths_outside_dest(session: Session, agent: str, tmp_path: Path) -> None:
    dest, outside = tmp_path / "remote", tmp_path / "outside"
    outside.mkdir()
    dest.mkdir()
    (dest / "link").symlink_to(outside)
    write(outside / "victim.txt", "keep me")
    data = stream(
        put("../escape.txt", b"x"),
        put("/tmp/absolute.txt", b"x"),
        put("a/../../escape2.txt", b"x"),
        put("link/through-symlink.txt", b"x"),
        put(".cloudtrain/manifest.json", b"{}"),
        put("fine/ok.txt", b"ok"),
        wire.delete_header("link/victim.txt"),
        wire.delete_header("../outside/victim.txt"),
    )
    code, summary, stderr = receive(session, agent, dest, data)
    assert code == 1
    refused = {path for path, why in summary["errors"]}  # type: ignore[union-attr]
    assert refused == {
        "../escape.txt",
        "/tmp/absolute.txt",
        "a/../../escape2.txt",
        "link/through-symlink.txt",
        ".cloudtrain/manifest.json",
        "../outside/victim.txt",
    }
    assert summary["kept"] == ["link/victim.txt"]  # not in the synced set: never deleted
    assert (dest / "fine" / "ok.txt").read_bytes() == b"ok"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "escape2.txt").exists()


def test_whole_records_and_split_ones_are_received_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record whole in one chunk takes the receiver's fast path; split, the general one: same result."""
    fast: list[str] = []
    put_whole = agent_receive.StreamReceiver._put_whole

    def spy(self: agent_receive.StreamReceiver, path: str, *args: object) -> None:
        fast.append(path)
        put_whole(self, path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(agent_receive.StreamReceiver, "_put_whole", spy)
    outside = tmp_path / "outside"
    outside.mkdir()
    raw_header = b'{"op":"put","path":"raw\xc3\xa9.txt","size":3,"mode":420,"mtime_ns":5}\n'
    records = [
        put("plain.txt", b"plain"),
        put("sub/deeper/x.bin", os.urandom(3000), mode=0o755),
        put("n\u00e9v with space.txt", "\u00fcn\u00efcode".encode()),  # escaped in JSON: the general path
        put('quote"d.txt', b"q"),
        put("empty.txt", b""),
        wire.put_header("no-mtime.txt", 2, 0o600, -1)
        + b"nm"
        + hashlib.sha256(b"nm").hexdigest().encode()
        + b"\n",
        raw_header + b"raw" + hashlib.sha256(b"raw").hexdigest().encode() + b"\n",
        put("../escape.txt", b"x"),
        put("a/./b.txt", b"x"),
        put(".cloudtrain/manifest.json", b"{}"),
        put("link/through.txt", b"x"),
        put("bad.txt", b"flipped", digest="0" * 64),
        wire.put_header("gone.txt", 4, 0o644, 7) + bytes(4) + wire.ABANDONED,
        put("after.txt", b"still fine"),
    ]
    data = stream(*records)
    results = []
    for name, size in (("whole", len(data)), ("by-7", 7), ("by-4k", 4096)):
        dest = tmp_path / name
        dest.mkdir()
        (dest / "link").symlink_to(outside)
        receiver = agent_receive.StreamReceiver(str(dest), manifest={})
        fast.clear()
        for i in range(0, len(data), size):
            receiver.feed(data[i : i + size])
        receiver.finish()
        receiver.close()
        manifest = {path: [e[0], e[1], e[2]] for path, e in (receiver.manifest or {}).items()}
        results.append(
            (tree(dest), manifest, sorted(receiver.errors), receiver.abandoned, receiver.summary())
        )
        assert not [p for p in dest.rglob("*") if p.name.startswith(agent_receive.TMP_PREFIX)]
    assert results[0] == results[1] == results[2]
    files, manifest, errors, abandoned, summary = results[0]
    assert set(files) == {
        "plain.txt",
        "sub/deeper/x.bin",
        "n\u00e9v with space.txt",
        'quote"d.txt',
        "empty.txt",
        "no-mtime.txt",
        "raw\u00e9.txt",
        "after.txt",
    }
    assert manifest["sub/deeper/x.bin"][2] == 0o755 and manifest["no-mtime.txt"][2] == 0o600
    assert [path for path, _ in errors] == [
        "../escape.txt",
        ".cloudtrain/manifest.json",
        "a/./b.txt",
        "bad.txt",
        "link/through.txt",
    ]
    assert abandoned == [("gone.txt", agent_receive.GIVEN_UP)]
    assert summary["written"] == 8 and not list(outside.iterdir())
    mtime = (tmp_path / "whole" / "plain.txt").stat().st_mtime_ns
    assert mtime == 1_700_000_000_000_000_000


def test_a_size_cap_holds_on_the_fast_path(tmp_path: Path) -> None:
    receiver = agent_receive.StreamReceiver(str(tmp_path / "dest"), max_bytes=10)
    with pytest.raises(wire.StreamError, match="size cap"):
        receiver.feed(stream(put("a.txt", b"123456"), put("b.txt", b"123456")))
    assert not (tmp_path / "dest" / "b.txt").exists()


def test_the_manifest_is_reverified_after_a_reboot(tmp_path: Path) -> None:
    dest = tmp_path / "remote"
    write(dest / "a.txt", "as synced")
    write(dest / "b.txt", "lost in a crash")
    entry = lambda data: [hashlib.sha256(data).hexdigest(), len(data), 0o644, 0]  # noqa: E731
    agent_receive.save_manifest(str(dest), {"a.txt": entry(b"as synced"), "b.txt": entry(b"what was sent")})
    path = dest / ".cloudtrain" / "manifest.json"
    header, files = path.read_text().splitlines()
    path.write_text(header.replace(agent_receive.boot_id(), "an-earlier-boot") + "\n" + files + "\n")
    manifest = agent_receive.load_manifest(str(dest))
    assert manifest["a.txt"][0] == hashlib.sha256(b"as synced").hexdigest()
    assert manifest["b.txt"][0] == hashlib.sha256(b"lost in a crash").hexdigest()  # so it is re-sent


def test_a_missing_agent_is_a_remote_error_with_a_hint(session: Session, tmp_path: Path) -> None:
    write(tmp_path / "work" / "a.txt", "a")
    with pytest.raises(RemoteError) as caught:
        push(
            session,
            collect(tmp_path / "work"),
            str(tmp_path / "remote"),
            cache_dir=tmp_path / "cache",
            remote_python=sys.executable,
            remote_agent_path=str(tmp_path / "no-agent-here"),
        )
    assert "manifest" in caught.value.message and "cloudtrain_agent" in caught.value.message
    assert caught.value.hint and "agent" in caught.value.hint


def test_sync_workdir_first_sync_in_one_openssh_connection(
    session: Session, agent: str, tmp_path: Path
) -> None:
    """A first sync opens the OpenSSH client at once; its receiver hands over the manifest itself."""
    work, remote, cache = tmp_path / "work", tmp_path / "remote", tmp_path / "cache"
    old_mtime(write(work / "a.txt", "a"), write(work / "sub" / "b.txt", "b"))
    kw = {
        "cache_dir": cache,
        "remote_python": sys.executable,
        "remote_agent_path": agent,
        "openssh_min_bytes": 1,
    }
    first = sync.sync_workdir(session, work, str(remote), **kw)  # type: ignore[arg-type]
    assert (first.transport, first.files_sent) == ("openssh", 2)
    assert tree(remote) == tree(work)
    # known now: the manifest comes over the open session, and nothing is sent
    again = sync.sync_workdir(session, work, str(remote), **kw)  # type: ignore[arg-type]
    assert (again.transport, again.files_sent) == ("none", 0)
    # the instance lost its copy: the manifest, not the local record, decides
    (remote / "sub" / "b.txt").unlink()
    healed = sync.sync_workdir(session, work, str(remote), **kw)  # type: ignore[arg-type]
    assert healed.sent == ("sub/b.txt",)
    # a synced file the job edited on the instance is sent again
    write(remote / "a.txt", "edited there")
    assert sync.sync_workdir(session, work, str(remote), **kw).sent == ("a.txt",)  # type: ignore[arg-type]
    assert (remote / "a.txt").read_text() == "a"


def test_a_handshake_with_nothing_to_send_changes_nothing(
    session: Session, agent: str, tmp_path: Path
) -> None:
    work, remote, cache = tmp_path / "work", tmp_path / "remote", tmp_path / "cache"
    write(work / "a.txt", "a")
    kw = {"cache_dir": cache, "remote_python": sys.executable, "remote_agent_path": agent}
    sync.sync_workdir(session, work, str(remote), **kw)  # type: ignore[arg-type]
    manifest = (remote / ".cloudtrain" / "manifest.json").read_bytes()
    report = sync.sync_workdir(session, work, str(remote), transport="openssh", **kw)  # type: ignore[arg-type]
    assert (report.files_sent, report.transport) == (0, "none")
    assert (remote / ".cloudtrain" / "manifest.json").read_bytes() == manifest
