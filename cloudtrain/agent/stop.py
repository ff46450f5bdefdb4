"""`stop`: end a run. SIGTERM to the supervisor and the running phase's process group,
SIGKILL to the group after a grace period; no further phase starts."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from . import procs
from .errors import AgentError
from .runfiles import RunPaths, read_exit_code, read_json, write_atomic


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _live_group(paths: RunPaths) -> int | None:
    """The process group of the phase running now, if any of it is alive."""
    state = read_json(paths.state) or {}
    pgid = state.get("pgid")
    if state.get("phase") in ("setup", "run") and isinstance(pgid, int) and procs.group_alive(pgid):
        return pgid
    return None


def _signal_group(pgid: int | None, signum: int) -> bool:
    if pgid is None:
        return False
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def stop(run_dir: str, grace: float = 10.0) -> dict[str, Any]:
    """Stop the run and wait until the supervisor has recorded its exit code."""
    paths = RunPaths(run_dir)
    state = read_json(paths.state)
    if state is None:
        raise AgentError(f"no run was started in {paths.run_dir}", "Check --run-dir.")
    write_atomic(paths.stop, b"stop\n")  # read by the supervisor before each phase
    supervisor = state.get("supervisor_pid")
    ticks = state.get("supervisor_ticks")
    supervisor_alive = isinstance(supervisor, int) and procs.pid_alive(supervisor, ticks)

    def supervisor_done() -> bool:
        return read_exit_code(paths) is not None or not (
            isinstance(supervisor, int) and procs.pid_alive(supervisor, ticks)
        )

    first_group = _live_group(paths)
    result: dict[str, Any] = {
        "was_running": bool(supervisor_alive and read_exit_code(paths) is None) or first_group is not None,
        "pgid": first_group if first_group is not None else state.get("pgid"),
        "signal": None,
    }
    if supervisor_alive and isinstance(supervisor, int):
        # The supervisor passes SIGTERM on to the group it runs now, even one it is just starting.
        os.kill(supervisor, signal.SIGTERM)
        result["signal"] = "SIGTERM"
    if _signal_group(first_group, signal.SIGTERM):
        result["signal"] = "SIGTERM"
    if not _wait(lambda: _live_group(paths) is None and supervisor_done(), grace):
        if _signal_group(_live_group(paths), signal.SIGKILL):
            result["signal"] = "SIGKILL"
        _wait(lambda: _live_group(paths) is None and supervisor_done(), 5.0)
    left = _live_group(paths)
    if left is not None:
        raise AgentError(
            f"process group {left} survived SIGKILL", "A process is stuck in the kernel (D state)."
        )
    result["stopped"] = True
    result["exit_code"] = read_exit_code(paths)
    return result
