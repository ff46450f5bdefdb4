"""The run folder's layout and its files: atomic writes, JSON reads, UTC time stamps.

A run folder holds:
    env.json         the environment the run gets (written by `backend`)
    site/            sitecustomize.py seeding / checkpointing the run (written by `backend
                     --seed` / `--checkpoint-dir`; see runsite.py)
    train.log        setup's and run's output, with `[cloudtrain] ...` marker lines
    state.json       the supervisor's state (phase, pids, times, exit codes)
    exit_code        the run's exit code, written last: its presence means "finished"
    stop_requested   written by `stop`, so the supervisor starts no further phase
    supervisor.log   the supervisor's own stdout/stderr (tracebacks, if any)
    notice.json      a spot interruption notice or rebalance recommendation the supervisor
                     saw in IMDS (`{kind, action, time, seen_at}`), for the job's checkpoint hook
    metrics.jsonl    one JSON line per epoch `fit` finished, from the job's checkpoint hook
                     (`{fit, epoch, epochs, epoch_s, at, logs}`; checkpoint.py); the
                     controller reads it with `metrics` as the run goes
    progress.json    where the job's hooked Keras call (fit, evaluate, predict) stands, rewritten
                     at most every 2 s while it steps (checkpoint.py); `tail --progress`
                     reports it, and the run's idle time, on stderr
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from typing import Any

from .errors import AgentError

ENV_FILE = "env.json"
SITE_DIR = "site"
LOG_FILE = "train.log"
STATE_FILE = "state.json"
EXIT_CODE_FILE = "exit_code"
STOP_FILE = "stop_requested"
SUPERVISOR_LOG = "supervisor.log"
NOTICE_FILE = "notice.json"
METRICS_FILE = "metrics.jsonl"
PROGRESS_FILE = "progress.json"


class RunPaths:
    """The paths of one run folder."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.env = os.path.join(self.run_dir, ENV_FILE)
        self.site_dir = os.path.join(self.run_dir, SITE_DIR)
        self.log = os.path.join(self.run_dir, LOG_FILE)
        self.state = os.path.join(self.run_dir, STATE_FILE)
        self.exit_code = os.path.join(self.run_dir, EXIT_CODE_FILE)
        self.stop = os.path.join(self.run_dir, STOP_FILE)
        self.supervisor_log = os.path.join(self.run_dir, SUPERVISOR_LOG)
        self.notice = os.path.join(self.run_dir, NOTICE_FILE)
        self.metrics = os.path.join(self.run_dir, METRICS_FILE)
        self.progress = os.path.join(self.run_dir, PROGRESS_FILE)


def utc_now() -> str:
    """The current time as ISO 8601 UTC, e.g. 2026-11-28T12:00:00Z."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: object, mode: int = 0o644) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_atomic(path, text.encode("utf-8"), mode)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise AgentError(f"{path} is not valid JSON: {e}", "Remove the file and run again.") from e
    if not isinstance(obj, dict):
        raise AgentError(f"{path} does not hold a JSON object", "Remove the file and run again.")
    return obj


def read_exit_code(paths: RunPaths) -> int | None:
    """The run's recorded exit code, or None while it has not finished."""
    try:
        with open(paths.exit_code, encoding="ascii") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
