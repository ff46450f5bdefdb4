"""The supervisor: run setup, then the training command, detached from the SSH session.

`start()` reads the secrets (already parsed from stdin), double-forks with
`os.setsid()` so that a dropped SSH connection never reaches the job, and returns the
supervisor's pid once it is ready. The supervisor runs each phase with `/bin/sh -c` in
the workdir, in a process group of its own (so `stop` can signal all of it), appends
stdout+stderr to train.log after a `[cloudtrain] <phase>: <cmd>` marker, keeps
state.json current (atomically), and writes exit_code last. A failing setup skips the
run. Secrets exist only in memory and in the job processes' environments: a job with
secrets writes through a pipe that the supervisor copies to train.log through a
``LogRedactor``, so a value the job prints is masked at the source (no copy of the log,
on the instance, in S3 or at home, holds it).

While the phases run, a watcher thread polls IMDS (`imds.py`) every
$CLOUDTRAIN_IMDS_POLL_S seconds (at most 5, AWS's advice) for a spot interruption
notice or a rebalance recommendation. One it sees is written atomically to
RUN_DIR/notice.json (the job finds it through $CLOUDTRAIN_NOTICE_FILE), recorded in
state.json (`notice`), marked in train.log and the supervisor log. An IMDS that does
not answer is recorded as `imds_error`, never taken for "no notice". With
CLOUDTRAIN_TESTING=1 and no $CLOUDTRAIN_IMDS_ENDPOINT there is no watcher, so a test
never dials the link-local address.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import IO, Any

from . import imds, procs, s3_checkpoint
from .environ import job_env
from .errors import USAGE, AgentError
from .redact import LogRedactor, secret_values
from .runfiles import RunPaths, read_json, remove, utc_now, write_atomic, write_json

SUPERVISOR_ERROR = 70
NOTICE_FILE_ENV = "CLOUDTRAIN_NOTICE_FILE"
POLL_ENV = "CLOUDTRAIN_IMDS_POLL_S"
DEFAULT_POLL_S = 5.0  # AWS: check for interruption notices every 5 seconds
MIN_POLL_S = 0.05
TESTING_ENV = "CLOUDTRAIN_TESTING"
COPY_DRAIN_S = 5.0  # after a phase ends, how long its leftover processes may hold its output


class Job:
    """What the supervisor runs: the commands, where, and with which environment."""

    def __init__(
        self,
        paths: RunPaths,
        workdir: str,
        run: str,
        setup: str | None,
        env: dict[str, str],
        secrets: Sequence[str] = (),
    ):
        self.paths = paths
        self.workdir = workdir
        self.run = run
        self.setup = setup
        self.env = env
        self.secrets = secret_values(secrets)  # masked in train.log


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
    # env.json (`backend --notice-file`) may name another file; the job resolves it in workdir
    env[NOTICE_FILE_ENV] = os.path.join(workdir, env.get(NOTICE_FILE_ENV) or paths.notice)
    os.makedirs(paths.run_dir, exist_ok=True)
    other = running_supervisor(paths)
    if other is not None:
        raise AgentError(
            f"a run is already going on in {paths.run_dir} (supervisor pid {other})",
            "Follow it with `tail`, or `stop` it first.",
        )
    for stale in (paths.exit_code, paths.stop, *notice_files(paths, env)):
        remove(stale)
    job = Job(paths, workdir, run, setup or None, env, list((secrets or {}).values()))
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
        self.lock = threading.Lock()  # state.json and train.log markers: main thread and watcher
        self.watcher: NoticeWatcher | None = None
        self.uploader: Any = None  # s3_checkpoint.Uploader, when the job names checkpoint.s3

    def save(self, **changes: Any) -> None:
        with self.lock:
            self.state.update(changes)
            write_json(self.paths.state, self.state)

    def mark(self, text: str) -> None:
        """Append a `[cloudtrain] ...` line to the log, on a line of its own."""
        with self.lock:
            self._mark(text)

    def _mark(self, text: str) -> None:
        for value in self.job.secrets:
            text = text.replace(value, "*" * len(value.encode("utf-8")))
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
        masked = bool(self.job.secrets)  # the output goes through the redactor, not straight in
        try:
            child = subprocess.Popen(
                ["/bin/sh", "-c", command],
                cwd=self.job.workdir,
                env=self.job.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if masked else self.log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            self.mark(f"{phase} could not start: {e}")
            code = 127
            self.save(**{phase + "_exit_code": code, phase + "_started_at": started})
            return code
        self.child = child
        copier = None
        if child.stdout is not None:
            copier = threading.Thread(target=self._copy_masked, args=(child.stdout,), daemon=True)
            copier.start()
        self.save(phase=phase, pid=child.pid, pgid=child.pid, **{phase + "_started_at": started})
        if self.terminated is not None:  # a signal arrived before the child existed
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGTERM)
        returncode = child.wait()
        if copier is not None:  # what the phase printed, before its end is marked
            copier.join(COPY_DRAIN_S)
        code, signame = procs.exit_status(returncode)
        self.mark(f"{phase} exited with code {code}" + (f" ({signame})" if signame else ""))
        self.save(**{phase + "_exit_code": code, phase + "_ended_at": utc_now(), "signal": signame})
        return code

    def _copy_masked(self, stream: IO[bytes]) -> None:
        """The phase's output into train.log, each secret value masked (one `*` per byte).

        Ends at EOF, when every process holding the pipe has closed it. The phase's end is
        marked once its own process has exited and this copy has finished, or COPY_DRAIN_S
        later when a process the phase left behind holds the pipe: what that process prints
        afterwards still lands in the log, after the mark, while the supervisor lives. The
        job's output depends on the supervisor then: were it killed, the job's next write
        fails (SIGPIPE), as the run does anyway without the supervisor's exit code."""
        redactor = LogRedactor(self.job.secrets)
        fd = stream.fileno()
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                masked = redactor.feed(data)
                with self.lock:
                    os.write(self.log_fd, masked)
            with self.lock:
                os.write(self.log_fd, redactor.flush())
        except OSError as e:
            _log(f"copying the job's output to the log stopped: {e}")
        finally:
            stream.close()

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
            notice=None,
            imds_endpoint=None,
            imds_error=None,
        )
        ready()
        self.watcher = NoticeWatcher.start_for(self)
        self.uploader = start_uploader(self)
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
        self.stop_watcher()
        if self.uploader is not None:  # the last checkpoint reaches S3 before the run counts as ended
            self.uploader.finish()
        self.save(phase="done", ended_at=utc_now(), exit_code=code, stopped=self.stop_requested())
        write_atomic(self.paths.exit_code, f"{code}\n".encode("ascii"))
        os.close(self.log_fd)

    def stop_watcher(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()


class NoticeWatcher:
    """The thread that polls IMDS for interruption notices while the job runs."""

    def __init__(self, supervisor: _Supervisor, client: imds.ImdsClient, interval_s: float) -> None:
        self.supervisor = supervisor
        self.client = client
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="imds-watcher", daemon=True)
        self._error: str | None = None

    @classmethod
    def start_for(cls, supervisor: _Supervisor) -> NoticeWatcher | None:
        """A running watcher for this supervisor, or None where IMDS is off (see the docstring)."""
        if os.environ.get(TESTING_ENV) == "1" and not os.environ.get(imds.ENDPOINT_ENV):
            _log(f"no IMDS watcher: {TESTING_ENV}=1 and no {imds.ENDPOINT_ENV}")
            return None
        endpoint = imds.endpoint_from_env()
        if endpoint is None:
            _log(f"no IMDS watcher: {imds.ENDPOINT_ENV}=off")
            return None
        watcher = cls(supervisor, imds.ImdsClient(endpoint), poll_interval())
        supervisor.save(imds_endpoint=endpoint)
        _log(f"watching IMDS at {endpoint} every {watcher.interval_s:g} s")
        watcher.thread.start()
        return watcher

    def stop(self, timeout: float = 1.0) -> None:
        """Stop polling; once this returns the watcher records nothing more."""
        with self.supervisor.lock:  # a record in progress finishes first
            self.stopping.set()
        self.thread.join(timeout)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.check()
            except Exception:  # a bug here must never end the run
                traceback.print_exc()
            if self.stopping.wait(self.interval_s):
                break

    def check(self) -> None:
        """One poll: record a new notice, and IMDS becoming unreachable or reachable again."""
        poll = self.client.poll()
        if poll.error != self._error:
            self._error = poll.error
            _log(f"IMDS: {poll.error}" if poll.error else "IMDS answers")
            self._record(imds_error=poll.error)
        sup = self.supervisor
        notice = imds.notice_from_poll(poll, sup.state.get("notice"), utc_now())
        if notice is None:
            return
        if notice["kind"] == imds.SPOT:
            text = f"spot interruption notice: {notice['action']} at {notice['time']}"
        else:
            text = f"rebalance recommendation at {notice['time']}"
        self._record(notice=notice, text=text)

    def _record(self, notice: dict[str, Any] | None = None, text: str = "", **changes: Any) -> None:
        sup = self.supervisor
        with sup.lock:
            if self.stopping.is_set():
                return
            if notice is not None:
                for path in notice_files(sup.paths, sup.job.env):  # first: the job's hook reads it
                    write_json(path, notice)
                changes["notice"] = notice
            sup.state.update(changes)
            write_json(sup.paths.state, sup.state)
            if text:
                sup._mark(text)
        if text:
            _log(text)


def start_uploader(supervisor: _Supervisor) -> Any:
    """The thread that puts each checkpoint to S3, when the run's env names a URL (see
    s3_checkpoint.py); its uploads are recorded in state.json, its failures in the log too."""
    env = supervisor.job.env
    url, directory = env.get(s3_checkpoint.URL_ENV), env.get("CLOUDTRAIN_CHECKPOINT_DIR")
    if not url or not directory:
        return None

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "uploaded":
            first = not supervisor.state.get("checkpoint_s3")
            supervisor.save(checkpoint_s3=dict(info, at=utc_now()), checkpoint_s3_error=None)
            _log(f"checkpoint of epoch {info.get('epoch')} uploaded to {info.get('url')}")
            if first:
                supervisor.mark(f"checkpoints go to {info.get('url')} (epoch {info.get('epoch')} is there)")
        else:
            supervisor.save(checkpoint_s3_error=info.get("error"))
            _log(f"checkpoint upload failed: {info.get('error')}")
            supervisor.mark(f"checkpoint upload to {url} failed (retrying): {info.get('error')}")

    _log(f"uploading checkpoints from {directory} to {url}")
    return s3_checkpoint.Uploader(
        directory, url, env.get(s3_checkpoint.REGION_ENV), on_event=on_event
    ).start()


def notice_files(paths: RunPaths, env: dict[str, str]) -> list[str]:
    """RUN_DIR/notice.json, and the job's $CLOUDTRAIN_NOTICE_FILE where that is another file."""
    files = [paths.notice]
    other = env.get(NOTICE_FILE_ENV)
    if other and os.path.normpath(other) != paths.notice:
        files.append(os.path.normpath(other))
    return files


def poll_interval() -> float:
    """Seconds between IMDS polls: $CLOUDTRAIN_IMDS_POLL_S within [0.05, 5], default 5."""
    try:
        value = float(os.environ.get(POLL_ENV, "") or DEFAULT_POLL_S)
    except ValueError:
        value = DEFAULT_POLL_S
    if value != value:  # NaN
        value = DEFAULT_POLL_S
    return min(DEFAULT_POLL_S, max(MIN_POLL_S, value))


def _log(text: str) -> None:
    """A line in the supervisor log (the daemon's stderr)."""
    sys.stderr.write(f"{utc_now()} {text}\n")
    sys.stderr.flush()


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
        with contextlib.suppress(Exception):
            supervisor.stop_watcher()
        child = supervisor.child
        if child is not None and child.returncode is None:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            supervisor.mark(f"supervisor error: {type(e).__name__}: {e}")
        supervisor.save(phase="done", ended_at=utc_now(), exit_code=SUPERVISOR_ERROR)
        write_atomic(job.paths.exit_code, f"{SUPERVISOR_ERROR}\n".encode("ascii"))
        raise
