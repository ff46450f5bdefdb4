"""The instance guards itself: the watchdog powers it off when nobody else will.

`watchdog` (started by the controller right after `start`, detached like the supervisor,
one per run folder) keeps its settings in RUN_DIR/watchdog.json and, every POLL_S seconds,
powers the instance off through power.py (in a dry-run the simulator's hook, which
terminates the simulated instance) when

- the deadline has passed: budget.max_hours after the run started, else 24 h (the
  controller's choice) or, once a controller has renewed it (`renew`, RUN_DIR/deadline.json:
  while `run`, `attach` or `logs -f` follow a run without budget.max_hours, they move it to
  24 h from then), the renewed one; or the `--keep` deadline `collected --keep-until` set. A job
  still running is first told to save (a notice of kind "deadline" in notice.json: the
  checkpoint hook saves at once), given up to SAVE_WAIT_S for the save to land and to
  reach S3, then stopped (SIGTERM, SIGKILL after a grace);
- the job has ended and nobody has collected it within ``grace_s`` of the later of its
  end and the last collection (`collected`, which the controller runs after each pull),
  unless that collection kept the instance (`--keep`): a controller that crashed or a
  laptop that slept never leaves it billing.

It also stops a stalled job that nobody else stops (the stall guard, budget.max_idle_minutes):
when a hooked Keras call (progress.json `active`) has made no progress, and written no log,
for `max_idle_s` plus IDLE_MARGIN_S (the controller, when it follows the run, acts at
`max_idle_s`), and `on_idle` is "stop": it tells the job to save (a notice of kind "idle"),
then stops it, once. The instance stays up for a controller to collect the run, as after
any end.

Before powering off it puts the outputs and train.log under the run's S3 prefix when it
has one (``<prefix>outputs/<path>``, ``<prefix>logs/train.log``). Each decision is marked
in train.log (`[cloudtrain] watchdog: ...`) and recorded in watchdog.json. Python 3.7+.
"""

from __future__ import annotations

import calendar
import os
import sys
import time
from typing import Any

from . import power, procs, stop
from .errors import USAGE, AgentError
from .runfiles import RunPaths, read_exit_code, read_json, utc_now, write_json

CONFIG = "watchdog.json"
COLLECTED = "collected.json"
RENEWED = "deadline.json"
POLL_S = 5.0
SAVE_WAIT_S = 60.0
STOP_GRACE_S = 20.0
EXIT_WAIT_S = 180.0  # after the stop: the supervisor's last S3 upload may take 120 s
IDLE_MARGIN_S = 60.0  # a following controller stops a stalled run first


def parse_utc(text: str | None) -> float | None:
    """``2026-11-28T12:00:00Z`` as seconds since the epoch; None for anything else."""
    if not text:
        return None
    try:
        return float(calendar.timegm(time.strptime(str(text).replace("+00:00", "Z"), "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def collected(run_dir: str, keep_until: str | None = None) -> dict[str, Any]:
    """Record that a controller has collected the outputs now (and, with ``keep_until``,
    that the instance is kept until then)."""
    if keep_until is not None and parse_utc(keep_until) is None:
        raise AgentError(f"--keep-until {keep_until!r} is not like 2026-11-28T12:00:00Z", "", USAGE)
    record = {"at": utc_now(), "keep_until": keep_until}
    write_json(os.path.join(RunPaths(run_dir).run_dir, COLLECTED), record)
    return record


def decide(config: dict[str, Any], run_dir: str, now: float) -> str | None:
    """Why the instance must power off now ("deadline", "uncollected"), or None."""
    paths = RunPaths(run_dir)
    got = read_json(os.path.join(paths.run_dir, COLLECTED)) or {}
    renewed = read_json(os.path.join(paths.run_dir, RENEWED)) or {}
    deadline = (
        parse_utc(got.get("keep_until"))
        or parse_utc(renewed.get("deadline"))
        or parse_utc(config.get("deadline"))
    )
    if deadline is not None and now >= deadline:
        return "deadline"
    if read_exit_code(paths) is None or got.get("keep_until"):
        return None
    try:
        ended = os.path.getmtime(paths.exit_code)
    except OSError:
        return None
    last = max(ended, parse_utc(got.get("at")) or 0.0)
    return "uncollected" if now - last >= float(config.get("grace_s", 1800)) else None


def idle_inside_call(config: dict[str, Any], run_dir: str, now: float) -> float | None:
    """The seconds a running job has been stalled inside a hooked Keras call, once that is
    past the stall guard's limit (and it is told to stop, and has not been stopped yet)."""
    limit = config.get("max_idle_s")
    if not limit or config.get("on_idle") != "stop" or config.get("idle_stopped_at"):
        return None
    paths = RunPaths(run_dir)
    if read_exit_code(paths) is not None:
        return None
    try:
        progress = read_json(paths.progress) or {}
    except AgentError:  # replaced as it was read: the next poll sees it
        return None
    changes = [t for t in (_mtime(paths.log), _mtime(paths.progress)) if t is not None]
    if not progress.get("active") or not changes:
        return None
    idle = now - max(changes)
    return idle if idle >= float(limit) + IDLE_MARGIN_S else None


def renew(run_dir: str, deadline: str) -> dict[str, Any]:
    """Move the run's deadline to ``deadline`` (a controller follows the run)."""
    if parse_utc(deadline) is None:
        raise AgentError(f"--deadline {deadline!r} is not like 2026-11-28T12:00:00Z", "", USAGE)
    record = {"deadline": deadline, "at": utc_now()}
    write_json(os.path.join(RunPaths(run_dir).run_dir, RENEWED), record)
    return record


class Watchdog:
    def __init__(self, run_dir: str) -> None:
        self.paths = RunPaths(run_dir)
        self.config_path = os.path.join(self.paths.run_dir, CONFIG)
        self.config: dict[str, Any] = read_json(self.config_path) or {}

    def record(self, **changes: Any) -> None:
        self.config.update(changes)
        write_json(self.config_path, self.config)

    def mark(self, text: str) -> None:
        """A `[cloudtrain] watchdog: ...` line in train.log (on a line of its own)."""
        line = f"[cloudtrain] watchdog: {text}\n".encode("utf-8", "replace")
        with open(self.paths.log, "ab") as f:
            if f.tell() and not _ends_with_newline(self.paths.log):
                line = b"\n" + line
            f.write(line)
        sys.stderr.write(f"{utc_now()} {text}\n")
        sys.stderr.flush()

    def run(self) -> str:
        """Poll until it is time; then act and power off. Returns the reason."""
        while True:
            reason = decide(self.config, self.paths.run_dir, time.time())
            if reason is not None:
                break
            idle = idle_inside_call(self.config, self.paths.run_dir, time.time())
            if idle is not None:
                self.record(idle_stopped_at=utc_now())
                self.mark(
                    f"no progress for {idle:.0f} s inside a Keras call (budget.max_idle_minutes), and no "
                    "controller stopped it: saving a checkpoint, then stopping the job"
                )
                self.save_then_stop("idle")
                continue
            time.sleep(float(self.config.get("poll_s", POLL_S)))
        self.record(reason=reason, acting_at=utc_now())
        if reason == "deadline" and read_exit_code(self.paths) is None:
            self.mark("the run's deadline has passed: saving a checkpoint, then stopping the job")
            self.save_then_stop()
        else:
            self.mark(
                "the deadline has passed"
                if reason == "deadline"
                else f"nobody collected the outputs within {self.config.get('grace_s')} s of the end"
            )
        self.upload_outputs()
        self.mark("powering the instance off")
        self.record(powered_off_at=utc_now())
        power.poweroff(f"watchdog-{reason}")
        return reason

    def save_then_stop(self, kind: str = "deadline") -> None:
        notice = {
            "kind": kind,
            "action": "stop",
            "time": self.config.get("deadline"),
            "seen_at": utc_now(),
        }
        env = read_json(self.paths.env) or {}
        targets = {
            self.paths.notice,
            os.path.normpath(env.get("CLOUDTRAIN_NOTICE_FILE") or self.paths.notice),
        }
        manifest = os.path.join(env.get("CLOUDTRAIN_CHECKPOINT_DIR", ""), "manifest.json")
        before = _mtime(manifest)
        for path in targets:
            write_json(path, notice)
        end = time.monotonic() + SAVE_WAIT_S
        while time.monotonic() < end and env.get("CLOUDTRAIN_CHECKPOINT_DIR"):
            if _mtime(manifest) != before and _settled(self.paths, env, manifest):
                break
            time.sleep(1.0)
        stop.stop(self.paths.run_dir, STOP_GRACE_S)
        end = time.monotonic() + EXIT_WAIT_S  # the supervisor uploads the last checkpoint, then ends
        while read_exit_code(self.paths) is None and time.monotonic() < end:
            time.sleep(1.0)

    def upload_outputs(self) -> None:
        url = self.config.get("s3")
        if not url:
            return
        from .s3_checkpoint import put_files

        files = {"logs/train.log": self.paths.log}
        workdir = str(self.config.get("workdir") or "")
        for rel in self.config.get("outputs") or []:
            root = os.path.join(workdir, rel)
            for path in _files_under(root):
                files["outputs/" + os.path.relpath(path, workdir).replace(os.sep, "/")] = path
        try:
            count = put_files(url, files, self.config.get("region"))
        except Exception as e:  # powering off matters more than this upload
            self.mark(f"putting the outputs to {url} failed: {type(e).__name__}: {e}")
            return
        self.mark(f"put {count} files (outputs, train.log) under {url}")


def _files_under(root: str) -> list[str]:
    if os.path.isfile(root) and not os.path.islink(root):
        return [root]
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    return [p for p in sorted(found) if not os.path.islink(p)]


def _mtime(path: str) -> float | None:
    try:
        return os.path.getmtime(path)
    except OSError:
        return None


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _settled(paths: RunPaths, env: dict[str, Any], manifest: str) -> bool:
    """The new checkpoint is in S3 too, when the run keeps it there."""
    if not env.get("CLOUDTRAIN_CHECKPOINT_S3"):
        return True
    state = read_json(paths.state) or {}
    uploaded = state.get("checkpoint_s3") or {}
    manifest_data = read_json(manifest) or {}
    return uploaded.get("epoch") == manifest_data.get("epoch") and uploaded.get("fit") == manifest_data.get(
        "fit"
    )


def start(
    run_dir: str,
    deadline: str,
    grace_s: float,
    workdir: str,
    outputs: list[str],
    s3: str | None = None,
    region: str | None = None,
    poll_s: float = POLL_S,
    max_idle_s: float | None = None,
    on_idle: str = "stop",
) -> dict[str, Any]:
    """Write the settings and start the detached watchdog (one per run folder)."""
    from .supervisor import detach

    paths = RunPaths(run_dir)
    if parse_utc(deadline) is None:
        raise AgentError(f"--deadline {deadline!r} is not like 2026-11-28T12:00:00Z", "", USAGE)
    if grace_s <= 0:
        raise AgentError("--grace must be more than 0 seconds", "", USAGE)
    config_path = os.path.join(paths.run_dir, CONFIG)
    old = read_json(config_path) or {}
    if procs.pid_alive(old.get("pid"), old.get("ticks")):
        return {"pid": old["pid"], "already": True, "deadline": old.get("deadline")}
    config = {
        "schema": 1,
        "deadline": deadline,
        "grace_s": grace_s,
        "workdir": os.path.abspath(workdir),
        "outputs": outputs,
        "s3": s3,
        "region": region,
        "poll_s": poll_s,
        "max_idle_s": max_idle_s,
        "on_idle": on_idle,
        "started_at": utc_now(),
    }
    write_json(config_path, config)
    log = os.path.join(paths.run_dir, "watchdog.log")

    def body(ready: Any) -> None:
        dog = Watchdog(paths.run_dir)
        dog.record(pid=os.getpid(), ticks=procs.start_ticks(os.getpid()))
        ready()
        dog.run()

    pid = detach(body, log)
    return {"pid": pid, "already": False, "deadline": deadline, "grace_s": grace_s}
