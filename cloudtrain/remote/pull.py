"""Bring a run's outputs back: ``outputs/<path relative to the workdir>`` in the run folder.

``cloudtrain_agent.pack`` streams the listed paths from the instance (each file's
sha256 after its bytes); the same ``StreamReceiver`` that applies a sync on the
instance writes them here: each file under a temporary name, renamed into place
only when its hash matches. Nothing can land outside ``<dest>/outputs``, nor beside the
paths asked for (whatever the instance sends): paths with ``..``, absolute paths, paths
not asked for and symlinked local parent folders are refused here, and pack
leaves out symlinks pointing outside the workdir, devices, pipes and sockets. The
total size is capped on both sides (``max_bytes``); a stream over the cap is cut.
A checkpoint comes from a snapshot of its latest save on the instance (``checkpoint=True``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudtrain.agent.receive import StreamReceiver
from cloudtrain.agent.wire import PathRefused, StreamError, check_relpath
from cloudtrain.errors import RemoteError
from cloudtrain.remote.agent import AgentCli
from cloudtrain.remote.session import Session
from cloudtrain.remote.sync import ConnectFailed, OpenSSH, read_stream

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 16 << 30
OUTPUTS = "outputs"


@dataclass(frozen=True)
class PullReport:
    """What a pull brought back (paths relative to ``dest``) and what it left out, and why."""

    dest: Path
    files: tuple[str, ...]
    bytes: int
    skipped: tuple[str, ...]  # "path: reason"
    transport: str
    seconds: float

    @property
    def files_written(self) -> int:
        return len(self.files)


def pull(
    session: Session,
    remote_workdir: str,
    paths: Sequence[str],
    dest_dir: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    remote_python: str = "python3",
    remote_agent_path: str | None = None,
    transport: str = "auto",
    into: str = OUTPUTS,
    checkpoint: bool = False,
    progress: Callable[[int], Any] | None = None,
) -> PullReport:
    """Copy ``paths`` (relative to ``remote_workdir``) into ``dest_dir/<into>`` (``outputs``);
    verified, atomic, capped.

    ``checkpoint``: the paths are checkpoint folders, of which only the latest save comes,
    whole, from a snapshot the instance takes at the start (``pack --checkpoint``), however
    often the training saves meanwhile.

    ``transport``: "auto" (the OpenSSH client when installed, else the session),
    "openssh" or "paramiko". Raises RemoteError if a file arrived corrupted or the
    stream broke; what was verified before that stays in place. ``progress`` hears the
    bytes received so far as they come (the total is not known ahead).
    """
    started = time.monotonic()
    skipped: list[str] = []
    wanted: list[str] = []
    for raw in paths:
        try:
            wanted.append(check_relpath(raw.strip().rstrip("/")))
        except PathRefused as e:
            skipped.append(f"{raw}: refused: {e}")
    dest = Path(dest_dir) / into if into else Path(dest_dir)
    if not wanted:
        return PullReport(dest, (), 0, tuple(skipped), "none", time.monotonic() - started)
    try:
        receiver = StreamReceiver(
            str(dest), max_bytes=max_bytes, mode_mask=0o755, refuse_symlinked_dest=True, only=wanted
        )
    except (PathRefused, OSError) as e:
        raise RemoteError(f"cannot pull outputs into {dest}: {e}") from e
    feed = receiver.feed if progress is None else _counted(receiver.feed, progress)
    command = AgentCli(remote_python, remote_agent_path).pack(
        remote_workdir, wanted, max_bytes=max_bytes, checkpoint=checkpoint
    )
    where = f"{session.endpoint.label}:{remote_workdir}"
    used = "paramiko"
    code, err = -1, b""
    try:
        if transport == "openssh" or (transport == "auto" and OpenSSH.available()):
            try:
                code, err = _pull_openssh(session, command, feed)
                used = "openssh"
            except ConnectFailed as e:
                if transport == "openssh":
                    raise RemoteError(
                        f"the OpenSSH client cannot reach {session.endpoint.label}: {e}",
                        hint="Use transport='auto' to fall back to the SSH session.",
                    ) from e
                log.warning("ssh client cannot connect (%s); pulling over the session instead", e)
        if used == "paramiko":
            errors = bytearray()
            code = session.stream(command, feed, errors=errors.extend)
            err = bytes(errors)
        if code == 0:
            receiver.finish()
    except StreamError as e:
        raise RemoteError(
            f"pulling outputs from {where} failed: {e}",
            hint=f"What arrived intact is in {dest}; raise max_bytes if the outputs are that large.",
        ) from e
    finally:
        receiver.close()
    if code != 0:
        detail = err.decode("utf-8", "replace").strip()[-2000:]
        raise RemoteError(
            f"pack on {where} exited with {code}" + (f": {detail}" if detail else ""),
            hint="Is the agent uploaded and the remote workdir there? Verified files are in place.",
        )
    skipped += [f"{path}: {why}" for path, why in receiver.skipped]
    skipped += [f"{path}: {why}" for path, why in receiver.abandoned]
    if receiver.errors:
        listing = "; ".join(f"{path}: {why}" for path, why in receiver.errors[:20])
        raise RemoteError(
            f"{len(receiver.errors)} output file(s) from {where} were not written: {listing}",
            hint=f"Nothing unverified was put in place; the others are in {dest}. Pull again to retry.",
        )
    return PullReport(
        dest, tuple(receiver.paths_written), receiver.bytes, tuple(skipped), used, time.monotonic() - started
    )


def _counted(feed: Callable[[bytes], None], progress: Callable[[int], Any]) -> Callable[[bytes], None]:
    """``feed``, telling ``progress`` the bytes fed so far after each chunk."""
    received = 0

    def counting(data: bytes) -> None:
        nonlocal received
        feed(data)
        received += len(data)
        progress(received)

    return counting


def _pull_openssh(session: Session, command: str, feed: Callable[[bytes], None]) -> tuple[int, bytes]:
    with OpenSSH(session) as ssh, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            ssh.argv(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
        )
        assert proc.stdout is not None
        received = 0
        try:
            for chunk in read_stream(proc.stdout):
                received += len(chunk)
                feed(chunk)
            code = proc.wait()
        except BaseException:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        err.seek(0)
        stderr = err.read()
    if code == 255 and not received:
        raise ConnectFailed(stderr.decode("utf-8", "replace").strip()[-2000:])
    return code, stderr
