"""A terminated simulated instance stops everything on it, as an AWS instance does.

The agent runs the job in a session of its own with a clean environment, and the job may
start helpers of its own in further sessions: none of it may go on running on the user's
machine once the instance is terminated. The job would train for minutes (a plain Python
loop stands in for Keras: this is about processes, not training).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import textwrap
import time
from pathlib import Path

from test_run_e2e import (  # noqa: F401  (sim_image: a fixture)
    cloudtrain,
    live_instances,
    only_run,
    py,
    sim_image,
    status,
    write_job,
)

from cloudtrain.settings import Settings


def processes_of(sandbox: Path, token: str) -> dict[int, str]:
    """Live processes of a simulated instance: run in its sandbox, started from it (its
    environments' Pythons, as the agent's supervisor, whose folder is /), or the job's
    (``token`` in their command line). pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] in "ZX":
            continue
        if token in cmdline or str(sandbox) in cmdline or Path(cwd).is_relative_to(sandbox):
            found[int(entry.name)] = cmdline.strip()
    return found


def test_terminated_instance_leaves_no_process_behind(
    sim_image: Path, tmp_path: Path, settings: Settings
) -> None:
    token = f"longjob-{secrets.token_hex(4)}"
    # Ten minutes of "training", and a helper in a session of its own (as a data loader,
    # or TensorBoard, might be started), both in the job's clean environment.
    program = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)  # {token}-helper"],
                         start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in range(6000):  # {token}
            print("step", i, flush=True)
            time.sleep(0.1)
    """)
    job = write_job(tmp_path / "job", py(program))
    cloudtrain("run", str(job), "--dry-run", "--detach", "--out", str(tmp_path / "runs"), check=True)
    run_id = only_run(tmp_path / "runs").name
    [instance] = status(run_id)["instances"]
    sandbox = settings.home / "sim" / "instances" / instance["id"]
    found: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            found = processes_of(sandbox, token)
            job = {pid: cmd for pid, cmd in found.items() if token in cmd and "cloudtrain_agent" not in cmd}
            if any("range(6000)" not in cmd for cmd in job.values()):  # the helper: the training started it
                break
            assert time.monotonic() < deadline, f"the job did not start: {found}"
            time.sleep(0.2)
        # Out of reach of the marker variable the simulator used to look for: the agent gives
        # the job a clean environment (and a session of its own).
        for pid in job:  # (the agent's supervisor has it: its command line names the job's)
            assert b"CLOUDTRAIN_SIM_INSTANCE" not in Path(f"/proc/{pid}/environ").read_bytes()

        cloudtrain("down", run_id, check=True)
        assert live_instances(settings, run_id) == []
        deadline = time.monotonic() + 5
        while found := processes_of(sandbox, token):
            assert time.monotonic() < deadline, f"alive 5 s after the termination: {found}"
            time.sleep(0.1)
    finally:
        for pid in processes_of(sandbox, token):  # what a failure leaves: never minutes of CPU
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
