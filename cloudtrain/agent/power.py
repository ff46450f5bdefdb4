"""`poweroff`: the single way the agent powers the instance off.

A hook wins over the real thing: `$CLOUDTRAIN_POWEROFF_HOOK`, else an executable
`~/.cloudtrain/poweroff` (the simulator installs one that terminates the simulated
instance). Without a hook, `shutdown -h now` (through `sudo -n` unless root); with
CLOUDTRAIN_TESTING=1 and no hook the agent refuses, so a test can never power off
the machine it runs on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from .errors import AgentError

HOOK_ENV = "CLOUDTRAIN_POWEROFF_HOOK"
TESTING_ENV = "CLOUDTRAIN_TESTING"


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_hook() -> str | None:
    """The configured hook, or None; a hook named by the variable but unusable is an error."""
    named = os.environ.get(HOOK_ENV)
    if named:
        if not _executable(named):
            raise AgentError(
                f"{HOOK_ENV}={named} is not an executable file",
                f"Fix the hook, or unset {HOOK_ENV} to power off for real.",
            )
        return named
    default = os.path.join(os.path.expanduser("~"), ".cloudtrain", "poweroff")
    return default if _executable(default) else None


def shutdown_command() -> list[str]:
    exe = shutil.which("shutdown") or next(
        (p for p in ("/sbin/shutdown", "/usr/sbin/shutdown") if _executable(p)), None
    )
    if exe is None:
        raise AgentError("no shutdown command on this machine", "Install systemd/sysvinit, or set a hook.")
    command = [exe, "-h", "now"]
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None:
            raise AgentError("not root and no sudo to run shutdown", "Give the user passwordless sudo.")
        command = [sudo, "-n"] + command
    return command


def poweroff(reason: str = "") -> dict[str, Any]:
    hook = find_hook()
    if hook is not None:
        env = dict(os.environ)
        env["CLOUDTRAIN_POWEROFF_REASON"] = reason
        command = [hook] + ([reason] if reason else [])
        action = "hook"
    else:
        if os.environ.get(TESTING_ENV) == "1":
            raise AgentError(
                f"refusing to power off: {TESTING_ENV}=1 and no power-off hook is configured",
                f"Set {HOOK_ENV} to a script in tests.",
            )
        env = None
        command = shutdown_command()
        action = "shutdown"
    try:
        proc = subprocess.run(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise AgentError("power-off ({}) failed: {}".format(" ".join(command), e), "") from None
    output = proc.stdout.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        raise AgentError(
            f"power-off ({' '.join(command)}) exited with {proc.returncode}: {output[-2000:]}",
            "Terminate the instance from the controller instead.",
        )
    return {"action": action, "command": command, "reason": reason, "exit_code": 0, "output": output[-2000:]}
