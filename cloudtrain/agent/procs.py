"""Process checks that tolerate zombies and reused pids: is a process, or a group, alive?

A detached supervisor is reaped by whatever adopts it; where that is a container's
bare PID 1 its zombie lingers, and `kill(pid, 0)` alone would call it alive.
"""

from __future__ import annotations

import os
import signal


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (field 3 is index 0), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    return raw[raw.rfind(")") + 2 :].split()


def start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), to detect pid reuse."""
    fields = _proc_stat(pid)
    if fields is None or len(fields) < 20:
        return None
    return fields[19]


def pid_alive(pid: int | None, ticks: str | None = None) -> bool:
    """True when `pid` runs (not a zombie) and, if `ticks` is known, is the same process."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return not os.path.isdir("/proc/self")  # no /proc: trust kill(pid, 0)
    if fields[0] in ("Z", "X"):
        return False
    return ticks is None or len(fields) < 20 or fields[19] == ticks


def group_alive(pgid: int | None) -> bool:
    """True when some process of group `pgid` runs (zombies do not count)."""
    if not pgid or pgid <= 0:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for name in entries:
        if not name.isdigit():
            continue
        fields = _proc_stat(int(name))
        if fields is None or len(fields) < 3:
            continue
        if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def exit_status(returncode: int) -> tuple[int, str | None]:
    """A Popen return code as a shell exit status (128+N for signal N) and the signal name."""
    if returncode >= 0:
        return returncode, None
    signum = -returncode
    try:
        name: str | None = signal.Signals(signum).name
    except ValueError:
        name = f"SIG{signum}"
    return 128 + signum, name
