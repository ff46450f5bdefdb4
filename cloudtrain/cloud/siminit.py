"""The "init" of one simulated instance: every process started on the instance descends from it.

A simulated host's commands run as local processes. A real instance's termination stops
every process on it; a simulated one must stop every process its commands started too,
whatever they did to get away: a new session or process group (the agent's supervisor
and the job it starts both do), a double fork, a clean environment. So each ``SimHost``
starts one of these, and has it start every command:

- it marks itself a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux 3.4+, no
  root needed): a process that loses its parent is re-parented to the nearest living
  subreaper among its ancestors, so every process of the instance stays in this one's
  subtree for as long as this one lives, and it reaps them;
- it reads requests from a Unix socket (the host keeps the other end): a command line,
  an environment, a working folder, and the command's stdin, stdout and stderr passed
  as file descriptors (SCM_RIGHTS). It spawns the command (``posix_spawn``: vfork and
  exec, no Python in the child) in a new session, with default signal dispositions; it
  answers ``started ID PID`` (or ``failed ID ERRNO MESSAGE``) and later
  ``exit PID CODE`` (CODE as subprocess reports it: -N for signal N);
- ``kill_tree`` finds a subtree by /proc's parent links and kills it: SIGSTOP first, so
  that nothing forks while it is being collected, then SIGKILL, until nothing is left.
  The host calls it with this process as the root when it stops; this process calls it
  itself when the host's end of the socket closes (the simulator exited, however it
  died) or when it gets SIGTERM, SIGINT or SIGHUP; then it reaps and exits.

Standard library only (it runs as ``python -I -S thisfile FD``, importing nothing from
cloudtrain, never from the current folder); Linux only, as the rest of dry-run (/proc).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Iterable

PR_SET_CHILD_SUBREAPER = 36
_HEADER = struct.Struct("!I")  # the length of a request's body
_MAX_FDS = 3
_TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Python ignores SIGPIPE and SIGXFSZ, which exec keeps: a command gets the defaults back.
_DEFAULT_IN_CHILD = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, *_TERMINATING)


# --- the process tree ----------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of a process from /proc/<pid>/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        rest = stat[stat.rindex(b")") + 2 :].split()
        return rest[0].decode(), int(rest[1]), int(rest[19])
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int) -> dict[int, int]:
    """Every live (not zombie) process below ``root``: pid -> its start time."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    for name in names:
        if not name.isdigit():
            continue
        found = _stat(int(name))
        if found is None:
            continue
        state, ppid, started = found
        children.setdefault(ppid, []).append(int(name))
        info[int(name)] = (state, started)
    found_pids: dict[int, int] = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        state, started = info[pid]
        if state not in ("Z", "X", "x"):
            found_pids[pid] = started
        todo.extend(children.get(pid, ()))
    return found_pids


def _signal(pid: int, started: int, sig: int) -> None:
    """Signal ``pid`` if it is still the process that started at ``started`` (never a reused id)."""
    try:
        fd = os.pidfd_open(pid)  # holds the process: its id cannot be reused under us
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfds (Linux < 5.3): the plain way
        found = _stat(pid)
        if found is not None and found[2] == started:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        return
    try:
        found = _stat(pid)
        if found is not None and found[2] == started:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def kill_tree(root: int, grace: float = 0.0, timeout: float = 10.0) -> bool:
    """Kill every process below ``root`` (not ``root`` itself); True once none is left alive.

    With ``grace`` > 0 they get SIGTERM first and up to that many seconds to exit. Then the
    whole subtree is stopped (SIGSTOP, repeated until a scan finds nothing new: a stopped
    process cannot fork) and killed, until a scan finds no live process. Zombies count as
    gone: whoever is their parent (at worst the subreaper above them) reaps them.
    """
    if grace > 0:
        end = time.monotonic() + grace
        while True:
            live = descendants(root)
            if not live:
                return True
            for pid, started in live.items():
                _signal(pid, started, signal.SIGTERM)
            if time.monotonic() >= end:
                break
            time.sleep(0.05)
    end = time.monotonic() + timeout
    while True:
        stopped: dict[int, int] = {}
        while True:
            new = {pid: started for pid, started in descendants(root).items() if pid not in stopped}
            if not new:
                break
            for pid, started in new.items():
                _signal(pid, started, signal.SIGSTOP)
            stopped.update(new)
        if not stopped:
            return True
        for pid, started in stopped.items():
            _signal(pid, started, signal.SIGKILL)
        if time.monotonic() >= end:
            return not descendants(root)
        time.sleep(0.005)


# --- the requests ----------------------------------------------------------------------------


def encode_request(request_id: int, argv: Iterable[str], env: dict[str, str], cwd: str) -> bytes:
    """One request as sent: a length, then NUL-separated fields (no field can hold a NUL)."""
    args = [os.fsencode(a) for a in argv]
    fields = [
        b"run",
        str(request_id).encode(),
        os.fsencode(cwd),
        str(len(args)).encode(),
        *args,
        *(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()),
    ]
    if any(b"\0" in field for field in fields):
        raise ValueError("a command line, folder or environment variable holds a NUL byte")
    body = b"\0".join(fields)
    return _HEADER.pack(len(body)) + body


def _decode_request(body: bytes) -> tuple[str, list[bytes], dict[bytes, bytes], bytes]:
    """(request id, argv, environment, cwd) of a request's body."""
    fields = body.split(b"\0")
    if fields[0] != b"run":
        raise ValueError(f"unknown request {fields[0][:20]!r}")
    request_id, cwd, argc = fields[1].decode(), fields[2], int(fields[3])
    argv = fields[4 : 4 + argc]
    env = dict(item.partition(b"=")[::2] for item in fields[4 + argc :])
    return request_id, argv, env, cwd


class _Init:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.fds: deque[int] = deque()  # received, not yet claimed by a request
        self.commands: set[int] = set()  # pids of the commands started (their exit is reported)
        self.cwd = os.getcwdb()
        self.done = False

    def send(self, line: str) -> None:
        try:
            self.sock.sendall(line.encode("utf-8", "replace") + b"\n")
        except OSError:
            self.done = True  # the host is gone: nobody to report to

    def receive(self) -> None:
        try:
            data, ancdata, _, _ = self.sock.recvmsg(
                1 << 16, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                count = len(payload) // 4
                self.fds.extend(struct.unpack(f"{count}i", payload[: count * 4]))
        if not data:
            self.done = True  # the host's end closed: the instance is terminated
            return
        self.buffer += data
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            if len(self.buffer) < _HEADER.size + size:
                break
            body = self.buffer[_HEADER.size : _HEADER.size + size]
            self.buffer = self.buffer[_HEADER.size + size :]
            fds = [self.fds.popleft() for _ in range(min(_MAX_FDS, len(self.fds)))]
            try:
                self.spawn(body, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def spawn(self, body: bytes, fds: list[int]) -> None:
        try:
            request_id, argv, env, cwd = _decode_request(body)
        except (ValueError, IndexError) as e:
            self.send(f"failed ? {errno.EINVAL} bad request: {e}")
            return
        if len(fds) != _MAX_FDS:
            self.send(f"failed {request_id} {errno.EBADF} expected {_MAX_FDS} file descriptors")
            return
        try:
            if cwd != self.cwd:
                os.chdir(cwd)  # posix_spawn has no chdir: the child starts where this process is
                self.cwd = cwd
            pid = os.posix_spawn(
                argv[0],
                argv,
                env,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)],
                setsid=True,
                setsigmask=(),
                setsigdef=_DEFAULT_IN_CHILD,
            )
        except (OSError, NotImplementedError) as e:
            code = e.errno if isinstance(e, OSError) and e.errno else errno.ENOSYS
            self.send(f"failed {request_id} {code} {e}".replace("\n", " "))
            return
        self.commands.add(pid)
        self.send(f"started {request_id} {pid}")

    def reap(self) -> bool:
        """Reap every child that has exited, reporting the commands'; False once none is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid in self.commands:
                self.commands.discard(pid)
                self.send(f"exit {pid} {os.waitstatus_to_exitcode(status)}")

    def serve(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, *_TERMINATING):
            signal.signal(sig, self.on_signal)
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        while not self.done:
            for key, _ in selector.select():
                if key.fileobj == wake_r:
                    with contextlib.suppress(OSError):
                        os.read(wake_r, 4096)
                else:
                    self.receive()
            self.reap()
        self.shut_down()

    def on_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGCHLD:
            self.done = True

    def shut_down(self) -> None:
        """The instance is terminated: kill everything below, reap it all, exit."""
        end = time.monotonic() + 30
        while time.monotonic() < end:
            kill_tree(os.getpid(), timeout=5)
            if not self.reap():
                return
            time.sleep(0.01)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -I -S siminit.py FD  (FD: the host's end of a Unix socket)", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(argv[1]))
    sock.set_inheritable(False)  # pass_fds made it inheritable: no command may read or forge its traffic
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        sock.sendall(f"error cannot become a child subreaper: {os.strerror(err)}\n".encode())
        return 1
    sock.sendall(f"ready {os.getpid()}\n".encode())
    _Init(sock).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
