"""The supervisor: run setup, then the training command, detached from the SSH session.

`start()` reads the secrets (already parsed from stdin), double-forks with
`os.setsid()` so that a dropped SSH connection never reaches the job, and returns the
supervisor's pid once it is ready. The supervisor runs each phase with `/bin/sh -c` in
the workdir, in a process group of its own (so `stop` can signal all of it), appends
stdout+stderr to train.log after a `[cloudtrain] <phase>: <cmd>` marker, keeps
state.json current (atomically), and writes exit_code last. A failing setup skips the
run. Secrets exist only in memory and in the job processes' environments.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

from . import procs
from .environ import job_env
from .errors import USAGE, AgentError
from .runfiles import RunPaths, read_json, remove, utc_now, write_atomic, write_json

SUPERVISOR_ERROR = 70


class Job:
    """What the supervisor runs: the commands, where, and with which environment."""

    def __init__(self, paths: RunPaths, workdir: str, run: str, setup: str | None, env: dict[str, str]):
        self.paths = paths
        self.workdir = workdir
        self.run = run
        self.setup = setup
        self.env = env


def running_supervisor(paths: RunPaths) -> int | None:
    """The pid of a live supervisor of this run folder, if there is one."""
    state = read_json(paths.state)
    if state is None or state.get("phase") == "done":
        return None
    pid = state.get("supervisor_pid")
    if isinstance(pid, int) and procs.pid_alive(pid, state.get("supervisor_ticks")):
        return pid
    return None


def start(
    run_dir: str,
    workdir: str,
    run: str,
    setup: str | None = None,
    env_file: str | None = None,
    secrets: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start a detached supervisor for `run` (after `setup`); return its pid at once."""
    paths = RunPaths(run_dir)
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise AgentError(f"workdir {workdir} does not exist", "Sync the code before `start`.", USAGE)
    if not run.strip():
        raise AgentError("--run is empty", "Pass the training command.", USAGE)
    env = job_env(env_file, secrets)
    os.makedirs(paths.run_dir, exist_ok=True)
    other = running_supervisor(paths)
    if other is not None:
        raise AgentError(
            f"a run is already going on in {paths.run_dir} (supervisor pid {other})",
            "Follow it with `tail`, or `stop` it first.",
        )
    for stale in (paths.exit_code, paths.stop):
        remove(stale)
    job = Job(paths, workdir, run, setup or None, env)
    pid = detach(lambda ready: supervise(job, ready), paths.supervisor_log)
    return {
        "pid": pid,
        "run_dir": paths.run_dir,
        "log": paths.log,
        "state": paths.state,
        "exit_code_file": paths.exit_code,
    }


# --- detaching ---------------------------------------------------------------------------


def _close_fds(keep: int) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 4096))
    for fd in fds:
        if fd > 2 and fd != keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _become_daemon(keep: int, log_path: str) -> None:
    """Stdin from /dev/null, stdout/stderr to the supervisor log, no other inherited fds."""
    _close_fds(keep)
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in (null, out):
        if fd > 2:
            os.close(fd)
    os.chdir("/")


def detach(target: Callable[[Callable[[], None]], None], log_path: str) -> int:
    """Run `target(ready)` in a double-forked, setsid'd process; return its pid.

    The caller returns when the daemon calls `ready()` (or fails before that).
    """
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # first child: new session, fork again, exit
        code = 0
        try:
            os.close(rfd)
            os.setsid()
            if os.fork() == 0:
                _daemon_main(target, wfd, log_path)  # never returns
        except BaseException:
            traceback.print_exc()
            code = 70
        os._exit(code)
    os.close(wfd)
    os.waitpid(child, 0)
    chunks = []
    while True:
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(rfd)
    message = b"".join(chunks).decode("utf-8", "replace").strip()
    if message.startswith("ok "):
        return int(message[3:])
    raise AgentError(
        "the supervisor did not start: " + (message or "it exited at once"),
        f"See {log_path}.",
    )


def _daemon_main(target: Callable[[Callable[[], None]], None], wfd: int, log_path: str) -> None:
    code = 0
    notified = [False]

    def ready() -> None:
        os.write(wfd, f"ok {os.getpid()}\n".encode("ascii"))
        os.close(wfd)
        notified[0] = True

    try:
        _become_daemon(wfd, log_path)
        target(ready)
    except BaseException as e:
        code = 70
        traceback.print_exc()
        if not notified[0]:
            with contextlib.suppress(OSError):
                os.write(wfd, (f"error {e}\n").encode("utf-8", "replace"))
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# --- supervising -------------------------------------------------------------------------


class _Supervisor:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.paths = job.paths
        self.log_fd = -1
        self.child: subprocess.Popen[bytes] | None = None
        self.terminated: str | None = None
        self.state: dict[str, Any] = {}

    def save(self, **changes: Any) -> None:
        self.state.update(changes)
        write_json(self.paths.state, self.state)

    def mark(self, text: str) -> None:
        """Append a `[cloudtrain] ...` line to the log, on a line of its own."""
        prefix = b""
        size = os.fstat(self.log_fd).st_size
        if size and os.pread(self.log_fd, 1, size - 1) != b"\n":
            prefix = b"\n"
        os.write(self.log_fd, prefix + (f"[cloudtrain] {text}\n").encode("utf-8", "replace"))

    def on_signal(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT to the supervisor: pass it on to the job's group, start nothing new."""
        self.terminated = signal.Signals(signum).name
        child = self.child
        if child is not None and child.returncode is None:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signum)

    def stop_requested(self) -> bool:
        return self.terminated is not None or os.path.exists(self.paths.stop)

    def run_phase(self, phase: str, command: str) -> int:
        self.mark(f"{phase}: {command}")
        started = utc_now()
        try:
            child = subprocess.Popen(
                ["/bin/sh", "-c", command],
                cwd=self.job.workdir,
                env=self.job.env,
                stdin=subprocess.DEVNULL,
                stdout=self.log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            self.mark(f"{phase} could not start: {e}")
            code = 127
            self.save(**{phase + "_exit_code": code, phase + "_started_at": started})
            return code
        self.child = child
        self.save(phase=phase, pid=child.pid, pgid=child.pid, **{phase + "_started_at": started})
        if self.terminated is not None:  # a signal arrived before the child existed
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGTERM)
        returncode = child.wait()
        code, signame = procs.exit_status(returncode)
        self.mark(f"{phase} exited with code {code}" + (f" ({signame})" if signame else ""))
        self.save(**{phase + "_exit_code": code, phase + "_ended_at": utc_now(), "signal": signame})
        return code

    def main(self, ready: Callable[[], None]) -> None:
        job = self.job
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGHUP, lambda signum, frame: None)  # a handler, not SIG_IGN: not inherited
        self.log_fd = os.open(self.paths.log, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self.save(
            schema=1,
            phase="starting",
            supervisor_pid=os.getpid(),
            supervisor_ticks=procs.start_ticks(os.getpid()),
            pid=None,
            pgid=None,
            started_at=utc_now(),
            ended_at=None,
            exit_code=None,
            signal=None,
            stopped=False,
            workdir=job.workdir,
            setup=job.setup,
            run=job.run,
            setup_exit_code=None,
            run_exit_code=None,
        )
        ready()
        code = 0
        for phase, command in (("setup", job.setup), ("run", job.run)):
            if not command:
                continue
            if self.stop_requested():
                self.mark(f"{phase} skipped: stop requested")
                code = 143
                break
            code = self.run_phase(phase, command)
            if code != 0:
                if phase == "setup":
                    self.mark(f"run skipped: setup failed with code {code}")
                break
        self.child = None
        self.save(phase="done", ended_at=utc_now(), exit_code=code, stopped=self.stop_requested())
        write_atomic(self.paths.exit_code, f"{code}\n".encode("ascii"))
        os.close(self.log_fd)


def supervise(job: Job, ready: Callable[[], None]) -> None:
    """The supervisor's body (in the detached process).

    If the supervisor itself fails after starting, it kills the job's group and records
    exit code 70, so that the controller sees an ending rather than a lost run.
    """
    supervisor = _Supervisor(job)
    try:
        supervisor.main(ready)
    except Exception as e:
        if not supervisor.state:
            raise  # before ready(): start() reports it
        traceback.print_exc()
        child = supervisor.child
        if child is not None and child.returncode is None:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            supervisor.mark(f"supervisor error: {type(e).__name__}: {e}")
        supervisor.save(phase="done", ended_at=utc_now(), exit_code=SUPERVISOR_ERROR)
        write_atomic(job.paths.exit_code, f"{SUPERVISOR_ERROR}\n".encode("ascii"))
        raise
