"""`status`: where a run stands, from state.json, exit_code, notice.json and the supervisor's pid."""

from __future__ import annotations

import os
from typing import Any

from . import procs
from .errors import AgentError
from .runfiles import RunPaths, file_size, read_exit_code, read_json


def status(run_dir: str) -> dict[str, Any]:
    """`{phase, running, exit_code, log_bytes, started_at, ended_at, ...}` of a run folder.

    `phase` is null when no run was started there; `running` is whether the supervisor
    is alive. A run that is not running and has no exit code lost its supervisor.
    `notice` is the spot interruption notice or rebalance recommendation the supervisor
    saw in IMDS (notice.json), or null; `imds_error` why IMDS did not answer its last poll.
    """
    paths = RunPaths(run_dir)
    if not os.path.isdir(paths.run_dir):
        raise AgentError(f"run folder {paths.run_dir} does not exist", "Check --run-dir.")
    state = read_json(paths.state) or {}
    pid = state.get("supervisor_pid")
    running = isinstance(pid, int) and procs.pid_alive(pid, state.get("supervisor_ticks"))
    exit_code = read_exit_code(paths)
    try:
        notice = read_json(paths.notice)
    except AgentError:  # written atomically, so only a foreign hand breaks it
        notice = None
    return {
        "phase": state.get("phase"),
        "running": bool(running) and exit_code is None,
        "exit_code": exit_code,
        "log_bytes": file_size(paths.log),
        "started_at": state.get("started_at"),
        "ended_at": state.get("ended_at"),
        "supervisor_pid": pid,
        "pid": state.get("pid"),
        "pgid": state.get("pgid"),
        "setup_exit_code": state.get("setup_exit_code"),
        "run_exit_code": state.get("run_exit_code"),
        "signal": state.get("signal"),
        "stopped": bool(state.get("stopped")) or os.path.exists(paths.stop),
        "lost": bool(state) and not running and exit_code is None,
        "notice": notice or state.get("notice"),
        "imds_error": state.get("imds_error"),
    }
