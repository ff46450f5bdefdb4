"""`tail`: copy the run log's bytes from an offset to stdout, optionally following it;
`metrics`: the metrics file's (runfiles.py), from an offset, once.

The controller counts the bytes it received and, after a dropped connection, asks
again from that offset. With `follow`, polling ends once exit_code exists and the
log has been read to its end (the supervisor writes exit_code after the last line).
With `--progress`, a following tail also writes a heartbeat line on stderr every BEAT_S:
`{"idle_s": ..., "progress": ...}`, the seconds since the log or progress.json last changed
(measured here, on one clock) and progress.json's content (null before a hooked call).
"""

from __future__ import annotations

import json
import os
import time
from typing import BinaryIO, TextIO

from . import procs
from .errors import AgentError
from .runfiles import RunPaths, read_exit_code, read_json

CHUNK = 64 * 1024
BEAT_S = 2.0


def _copy(path: str, offset: int, out: BinaryIO) -> int:
    """Write the bytes of `path` from `offset` to its current end; return the new offset."""
    if not os.path.exists(path):
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            data = f.read(CHUNK)
            if not data:
                break
            out.write(data)
            offset += len(data)
        out.flush()
    return offset


def _supervisor_alive(paths: RunPaths) -> bool:
    state = read_json(paths.state) or {}
    pid = state.get("supervisor_pid")
    return isinstance(pid, int) and procs.pid_alive(pid, state.get("supervisor_ticks"))


def tail(
    run_dir: str,
    out: BinaryIO,
    offset: int = 0,
    follow: bool = False,
    poll: float = 0.2,
    for_s: float | None = None,
    beats: TextIO | None = None,
) -> int:
    """Stream the log from `offset`; return the offset reached (the log size). Following
    stops after `for_s` seconds too (the caller checks on the run and follows again); with
    `beats`, it writes a heartbeat line there every BEAT_S."""
    paths = RunPaths(run_dir)
    if offset < 0:
        raise AgentError("--offset must be >= 0", "", 2)
    if not os.path.exists(paths.log) and not os.path.exists(paths.state):
        raise AgentError(f"no run log in {paths.run_dir}", "Start the run first, or check --run-dir.")
    poll = min(max(poll, 0.01), 0.2)
    end = None if for_s is None else time.monotonic() + for_s
    next_beat = 0.0
    while True:
        done = read_exit_code(paths) is not None
        offset = _copy(paths.log, offset, out)
        if follow and beats is not None and time.monotonic() >= next_beat:
            next_beat = time.monotonic() + BEAT_S
            beat(paths, beats)
        if not follow or done or (end is not None and time.monotonic() >= end):
            return offset
        if not _supervisor_alive(paths) and read_exit_code(paths) is None:
            offset = _copy(paths.log, offset, out)
            raise AgentError(
                f"the supervisor of {paths.run_dir} is gone and recorded no exit code",
                "The instance may have rebooted or run out of memory; see supervisor.log.",
            )
        time.sleep(poll)


def metrics(run_dir: str, out: BinaryIO, offset: int = 0) -> int:
    """The metrics lines from byte `offset` (none yet: nothing); the offset reached."""
    if offset < 0:
        raise AgentError("--offset must be >= 0", "", 2)
    return _copy(RunPaths(run_dir).metrics, offset, out)


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def beat(paths: RunPaths, out: TextIO) -> None:
    """One heartbeat line: the run's idle seconds and where its Keras call stands."""
    changes = [t for t in (_mtime(paths.log), _mtime(paths.progress)) if t is not None]
    idle_s = round(max(0.0, time.time() - max(changes)), 1) if changes else None
    try:
        with open(paths.progress, encoding="utf-8") as f:
            progress = json.load(f)
    except (OSError, ValueError):  # none yet, or replaced as it was read: the next beat has it
        progress = None
    out.write(json.dumps({"idle_s": idle_s, "progress": progress}) + "\n")
    out.flush()
