"""One simulated EC2 instance's host for ``--dry-run``: an SSH server on a loopback address.

A ``SimHost`` is what a launched instance becomes in the simulated cloud: an asyncssh
server on a port of its loopback address (``HostSpec.address``: 127.0.0.1 by default; the
simulator gives each instance its own 127.0.0.N, its private IP, so a cluster's nodes
reach each other by address as on AWS), in its own thread and event loop, with fresh host keys
(ed25519 and ecdsa) whose fingerprints it prints in a cloud-init style console log.
It accepts one user and one public key. Each exec request runs ``/bin/bash -c CMD`` as a
local process in the instance's sandbox folder, in its own session, with a clean
environment (never the simulator's own, which holds AWS keys): HOME and TMPDIR in the
sandbox, PATH = the spec's prefix + the system folders, ``CLOUDTRAIN_SIM_INSTANCE=<id>``
and a power-off hook that only touches a file.

Every process of the host descends from one per-host init (``siminit``: a child
subreaper that starts each command and reaps whatever is orphaned below it), so no
process started on the instance leaves its subtree, whatever session, process group or
environment it makes for itself. ``stop()`` kills that whole tree, as a terminated
instance stops everything on it; if the simulator itself dies, the init sees its socket
close and does the same.

Like OpenSSH's sshd without a pty: a session's channel closes when the command has
exited and its stdout/stderr are closed; a command killed by a signal reports
``exit-signal`` (paramiko then reads exit status -1); when the client goes away the
command's pipes are closed (it sees EOF or SIGPIPE) but it is not killed. A shell
request without a command runs ``/bin/bash`` on the channel's stdin; pty requests are
refused. SFTP is served in-process, relative paths resolving under the sandbox's HOME.

Each host also serves its instance's metadata (``SimImds``: IMDSv2 as EC2 does, token
first, on a port of the host's address) and its commands find it in
``CLOUDTRAIN_IMDS_ENDPOINT``. The simulator schedules spot interruption notices and
rebalance recommendations there (``host.imds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.server
import ipaddress
import json
import logging
import os
import posixpath
import secrets
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import asyncssh

from cloudtrain.cloud import siminit
from cloudtrain.errors import CloudError

log = logging.getLogger(__name__)

MARKER_ENV = "CLOUDTRAIN_SIM_INSTANCE"
HOOK_ENV = "CLOUDTRAIN_POWEROFF_HOOK"
IMDS_ENV = "CLOUDTRAIN_IMDS_ENDPOINT"
SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin")
LOOPBACK = "127.0.0.1"  # a host's address unless its spec names another
HOSTNAME = "ip-127-0-0-1"  # the default host's name (EC2's ip-A-B-C-D of its private IP)
POWEROFF_FLAG = "poweroff-requested"

_CHUNK = 256 * 1024
_WINDOW = 8 * 1024 * 1024
# (asyncssh algorithm, bits, cloud-init's label), in cloud-init's order (key file names).
_HOST_KEY_TYPES = (("ecdsa-sha2-nistp256", 256, "ECDSA"), ("ssh-ed25519", 256, "ED25519"))

_T = TypeVar("_T")


@dataclass(frozen=True)
class HostSpec:
    """What one simulated host needs: who it is, where it lives, whom it lets in."""

    instance_id: str
    sandbox: Path  # created if missing, with sandbox/home and sandbox/tmp
    authorized_key: str  # OpenSSH public key line(s) of the run's key pair
    username: str = "ubuntu"  # the only user accepted
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for every command
    path_prefix: Sequence[str] = ()  # folders put before /usr/local/bin:/usr/bin:/bin in PATH
    address: str = LOOPBACK  # the IPv4 loopback address SSH and IMDS listen on (its private IP)


def hostname(address: str) -> str:
    """EC2's host name for a private IP: ``ip-127-0-0-2`` for 127.0.0.2."""
    return "ip-" + address.replace(".", "-")


def _parse_authorized(text: str) -> frozenset[bytes]:
    """The public keys (their wire data) in an authorized key line or lines."""
    keys: set[bytes] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.add(asyncssh.import_public_key(line).public_data)
        except (asyncssh.KeyImportError, ValueError) as e:
            raise CloudError(
                f"simulated host: the authorized key {line[:40]!r}... is not an OpenSSH public key: {e}",
                hint="Pass the key pair's public key line, e.g. 'ssh-ed25519 AAAA...'.",
            ) from e
    if not keys:
        raise CloudError(
            "simulated host: no authorized key given", hint="Pass the key pair's public key line."
        )
    return frozenset(keys)


async def _read_pipe(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_CHUNK * 2)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader, transport


async def _write_pipe(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader())  # for its flow control (drain)
    transport, _ = await loop.connect_write_pipe(lambda: protocol, os.fdopen(fd, "wb", buffering=0))
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def _pump_out(reader: asyncio.StreamReader, channel: asyncssh.SSHWriter[bytes]) -> None:
    """Forward a command's stdout or stderr to the channel until EOF, with backpressure."""
    with contextlib.suppress(OSError, asyncssh.Error):
        while data := await reader.read(_CHUNK):
            channel.write(data)
            await channel.drain()


class _SandboxSFTP(asyncssh.SFTPServer):
    """asyncssh's SFTP server over the whole file system; relative paths start at HOME."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], home: bytes) -> None:
        super().__init__(chan)
        self._home = home

    def map_path(self, path: bytes) -> bytes:
        return posixpath.join(self._home, path)


class _Server(asyncssh.SSHServer):
    """Public key authentication only: one user, one key set."""

    def __init__(self, host: SimHost) -> None:
        self._host = host
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._host._connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._host._connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is always required

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == self._host.spec.username and key.public_data in self._host._authorized

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False


# --- the instance metadata service ------------------------------------------------------

IMDS_TOKEN_PATH = "/latest/api/token"
IMDS_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
IMDS_TOKEN_HEADER = "X-aws-ec2-metadata-token"
IMDS_MAX_TTL_S = 21600


def _imds_error_page(code: int, title: str) -> bytes:
    """The small XHTML page IMDS answers an error with."""
    return (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        f" <head>\n  <title>{code} - {title}</title>\n </head>\n"
        f" <body>\n  <h1>{code} - {title}</h1>\n </body>\n</html>\n"
    ).encode()


class _ImdsHandler(http.server.BaseHTTPRequestHandler):
    server_version = "EC2ws"
    sys_version = ""
    imds: SimImds  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("imds %s: " + format, self.imds.instance_id, *args)

    def _send(self, code: int, body: bytes, content_type: str, headers: Mapping[str, str] = {}) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: int, title: str, headers: Mapping[str, str] = {}) -> None:
        self.imds._note(self.command, self.path, code)
        self._send(code, _imds_error_page(code, title), "text/html", headers)

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 1 << 16))
        if self._path().rstrip("/") != IMDS_TOKEN_PATH:
            self._error(405, "Method Not Allowed")
            return
        if self.headers.get("X-Forwarded-For"):  # IMDS refuses tokens to proxied requests
            self._error(403, "Forbidden")
            return
        ttl_text = (self.headers.get(IMDS_TTL_HEADER) or "").strip()
        if not ttl_text.isdigit() or not 1 <= int(ttl_text) <= IMDS_MAX_TTL_S:
            self._error(400, "Bad Request")
            return
        token = self.imds._issue(int(ttl_text))
        self.imds._note("PUT", IMDS_TOKEN_PATH, 200)
        self._send(200, token.encode(), "text/plain", {IMDS_TTL_HEADER: ttl_text})

    def do_GET(self) -> None:
        path = self._path()
        if path.rstrip("/") == IMDS_TOKEN_PATH:
            self._error(405, "Method Not Allowed", {"Allow": "OPTIONS, PUT"})
            return
        if not self.imds._valid(self.headers.get(IMDS_TOKEN_HEADER)):
            self._error(401, "Unauthorized")
            return
        body = self.imds._lookup(path)
        if body is None:
            self._error(404, "Not Found")
            return
        self.imds._note("GET", path, 200)
        self._send(200, body.encode(), "text/plain")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._error(405, "Method Not Allowed")

    do_DELETE = do_POST


class SimImds:
    """One simulated instance's metadata service (IMDSv2, tokens required) on a port of
    ``address`` (its host's loopback address).

    Serves ``PUT /latest/api/token`` (``X-aws-ec2-metadata-token-ttl-seconds`` 1..21600,
    else 400; 403 to a request with X-Forwarded-For), and with a valid token
    ``/latest/meta-data/instance-id``, ``/latest/meta-data/spot/instance-action`` and
    ``.../spot/termination-time`` (404 until an interruption is scheduled), and
    ``/latest/meta-data/events/recommendations/rebalance`` (404 until recommended), as
    text/plain like EC2. A missing, unknown or expired token gets 401; other paths 404.
    """

    def __init__(self, instance_id: str, address: str = LOOPBACK) -> None:
        self.instance_id = instance_id
        self.address = address
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> time.monotonic() it expires
        self._instance_action: dict[str, str] | None = None
        self._rebalance: dict[str, str] | None = None
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status): what it answered

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError(f"the IMDS of {self.instance_id} is not listening")
        return f"http://{self.address}:{self._server.server_address[1]}"

    def start(self) -> None:
        handler = type("_Handler", (_ImdsHandler,), {"imds": self})
        server = http.server.ThreadingHTTPServer((self.address, 0), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=f"imds-{self.instance_id}"
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        if thread.is_alive():
            server.shutdown()
            thread.join(5)
        server.server_close()
        self._thread = None

    # --- what the simulator schedules ------------------------------------------------------

    def schedule_instance_action(self, action: str, at: datetime) -> None:
        """From now on spot/instance-action says ``{"action": action, "time": at}``."""
        if action not in ("terminate", "stop", "hibernate"):
            raise ValueError(f"unknown instance action {action!r}")
        with self._lock:
            self._instance_action = {"action": action, "time": _iso(at)}

    def recommend_rebalance(self, notice_time: datetime) -> None:
        """From now on events/recommendations/rebalance says ``{"noticeTime": notice_time}``."""
        with self._lock:
            self._rebalance = {"noticeTime": _iso(notice_time)}

    def expire_tokens(self) -> None:
        """Every token handed out so far is past its TTL (tests: the client must fetch anew)."""
        with self._lock:
            self._tokens.clear()

    # --- the handler's side ------------------------------------------------------------------

    def _issue(self, ttl_s: int) -> str:
        token = secrets.token_urlsafe(42)
        now = time.monotonic()
        with self._lock:
            self._tokens = {t: end for t, end in self._tokens.items() if end > now}
            self._tokens[token] = now + ttl_s
        return token

    def _valid(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            end = self._tokens.get(token.strip())
        return end is not None and time.monotonic() < end

    def _note(self, method: str, path: str, code: int) -> None:
        with self._lock:
            self.requests.append((method, path, code))
            del self.requests[:-1000]

    def _lookup(self, path: str) -> str | None:
        with self._lock:
            action, rebalance = self._instance_action, self._rebalance
        if path in ("/latest", "/latest/"):
            return "api/\nmeta-data/"
        if path in ("/latest/meta-data", "/latest/meta-data/"):
            return "events/\ninstance-id\nspot/"
        if path == "/latest/meta-data/instance-id":
            return self.instance_id
        if path in ("/latest/meta-data/spot", "/latest/meta-data/spot/"):
            return "instance-action\ntermination-time" if action else None
        if path == "/latest/meta-data/spot/instance-action":
            return json.dumps(action) if action else None
        if path == "/latest/meta-data/spot/termination-time":
            return action["time"] if action and action["action"] == "terminate" else None
        if path in ("/latest/meta-data/events", "/latest/meta-data/events/"):
            return "recommendations/"
        if path in ("/latest/meta-data/events/recommendations", "/latest/meta-data/events/recommendations/"):
            return "rebalance" if rebalance else None
        if path == "/latest/meta-data/events/recommendations/rebalance":
            return json.dumps(rebalance) if rebalance else None
        return None


def _iso(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _HostInit:
    """The host's side of its init (``siminit``): start it, have it run commands, learn their
    exit statuses, kill its whole process tree. Its socket is read in the host's event loop."""

    def __init__(self, instance_id: str, cwd: Path) -> None:
        self.instance_id = instance_id
        self.cwd = cwd
        self.pid = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0
        self._starting: dict[str, asyncio.Future[int]] = {}  # request id -> its pid
        self._exits: dict[int, asyncio.Future[int]] = {}  # pid -> its exit code (-N: signal N)
        self._closing = False

    def start(self, timeout: float = 30) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                # -I: nothing from the environment or the current folder; -S: no site (stdlib only)
                [sys.executable, "-I", "-S", siminit.__file__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                cwd=self.cwd,
                env={},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # no terminal's signals; its end is the host's to decide
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        ours.settimeout(timeout)
        try:
            while b"\n" not in self._buffer:
                data = ours.recv(4096)
                if not data:
                    break
                self._buffer += data
        except OSError as e:
            self._buffer += f"error {e}\n".encode()
        line, _, self._buffer = self._buffer.partition(b"\n")
        kind, _, rest = line.decode("utf-8", "replace").partition(" ")
        if kind != "ready":
            self.close(5)
            raise CloudError(
                f"simulated host {self.instance_id}: its init did not start: {rest or 'it exited'}",
                hint="Dry-run needs Linux (3.4 or later, for PR_SET_CHILD_SUBREAPER).",
            )
        self.pid = int(rest)
        ours.settimeout(None)  # blocking sends (a few kB: the init reads at once); reads never wait
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the init's reports in ``loop`` (call from its thread)."""
        if self._sock is not None:
            loop.add_reader(self._sock.fileno(), self._readable)
            if self._buffer:
                loop.call_soon(self._dispatch_buffer)

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, fds: Sequence[int]) -> int:
        """Start a command in a session of its own, ``fds`` its stdin, stdout and stderr; its pid."""
        if self._sock is None or self._closing:
            raise OSError(errno.ESHUTDOWN, "the instance's init is not running")
        self._next_id += 1
        request_id = str(self._next_id)
        data = siminit.encode_request(self._next_id, argv, dict(env), str(cwd))
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._starting[request_id] = started
        try:
            sent = socket.send_fds(self._sock, [data], list(fds))
            if sent < len(data):
                self._sock.sendall(data[sent:])
        except BaseException:
            self._starting.pop(request_id, None)
            raise
        return await started

    async def wait(self, pid: int) -> int:
        """The exit code of a command this init started (-N: killed by signal N)."""
        done = self._exits[pid]
        code = await asyncio.shield(done)  # a cancelled waiter leaves it for the next one
        self._exits.pop(pid, None)
        return code

    def kill_all(self, grace: float) -> None:
        """Kill every process below the init (SIGTERM and ``grace`` seconds first if > 0)."""
        if self.pid and not siminit.kill_tree(self.pid, grace):
            log.warning("%s: processes of the simulated host outlived SIGKILL", self.instance_id)

    def close(self, timeout: float = 10) -> None:
        """Shut the init down: it kills what is left, reaps it and exits (killed if it does not)."""
        self._closing = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # the init sees EOF
        process = self._process
        if process is not None:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s: the simulated host's init did not exit: killing it", self.instance_id)
                if self.pid:
                    siminit.kill_tree(self.pid)
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
        if self._sock is not None:
            self._sock.close()

    # --- its reports, in the event loop ---------------------------------------------------

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._gone()
            return
        self._buffer += data
        self._dispatch_buffer()

    def _dispatch_buffer(self) -> None:
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            kind, _, rest = line.decode("utf-8", "replace").partition(" ")
            try:
                self._dispatch(kind, rest)
            except (ValueError, KeyError):
                log.warning("%s: the init said %r", self.instance_id, line[:200])

    def _dispatch(self, kind: str, rest: str) -> None:
        loop = asyncio.get_running_loop()
        if kind == "started":
            request_id, pid_text = rest.split()
            pid = int(pid_text)
            self._exits[pid] = loop.create_future()
            started = self._starting.pop(request_id)
            if started.done():  # its waiter went away: nobody will ask for the exit code
                self._exits[pid].add_done_callback(lambda _: self._exits.pop(pid, None))
            else:
                started.set_result(pid)
        elif kind == "failed":
            request_id, code, message = (rest.split(" ", 2) + ["", ""])[:3]
            started = self._starting.pop(request_id)
            if not started.done():
                started.set_exception(OSError(int(code or 0), message))
        elif kind == "exit":
            pid_text, code = rest.split()
            done = self._exits[int(pid_text)]
            if not done.done():
                done.set_result(int(code))
        else:
            raise ValueError(kind)

    def _gone(self) -> None:
        """The init exited: no command starts any more, and no exit code will come."""
        if not self._closing:
            log.error("%s: the simulated host's init exited unexpectedly", self.instance_id)
        for started in self._starting.values():
            if not started.done():
                started.set_exception(OSError(errno.ESHUTDOWN, "the instance's init exited"))
        self._starting.clear()
        for done in self._exits.values():
            if not done.done():
                done.set_result(-signal.SIGKILL)


class SimHost:
    """A simulated instance's SSH host: start() it, connect to host:port, stop() it."""

    def __init__(self, spec: HostSpec) -> None:
        if not spec.instance_id or any(c in spec.instance_id for c in "\0=/ "):
            raise ValueError(f"bad instance id {spec.instance_id!r}")
        if not _is_loopback_ipv4(spec.address):  # a simulated host never listens off loopback
            raise ValueError(f"a simulated host listens on an IPv4 loopback address, not {spec.address!r}")
        self.spec = spec
        self.sandbox = Path(spec.sandbox).absolute()
        self.home = self.sandbox / "home"
        self.tmp = self.sandbox / "tmp"
        self.hook = self.sandbox / "poweroff"
        self._authorized = _parse_authorized(spec.authorized_key)
        self._host_keys = [asyncssh.generate_private_key(alg) for alg, _, _ in _HOST_KEY_TYPES]
        self._booted = datetime.now(timezone.utc).replace(microsecond=0)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._state = "new"  # new -> starting -> running -> stopping -> stopped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._port = 0
        self._init: _HostInit | None = None  # the ancestor of every process of the host
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._background: set[asyncio.Future[Any]] = set()  # exit codes of commands left by their client
        self.imds = SimImds(spec.instance_id, spec.address)

    # --- public API --------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address it listens on (the instance's private IP in the simulator)."""
        return self.spec.address

    @property
    def hostname(self) -> str:
        """Its EC2 host name, ``ip-127-0-0-N`` (the console shows it)."""
        return hostname(self.spec.address)

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"simulated host {self.spec.instance_id} is not listening")
        return self._port

    def environment(self) -> dict[str, str]:
        """The exact environment every command gets (nothing from this process's own)."""
        user = self.spec.username
        env = {
            "HOME": str(self.home),
            "USER": user,
            "LOGNAME": user,
            "PATH": ":".join([*self.spec.path_prefix, *SYSTEM_PATH]),
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.tmp),
            "SHELL": "/bin/bash",
            MARKER_ENV: self.spec.instance_id,
            HOOK_ENV: str(self.hook),
        }
        with contextlib.suppress(RuntimeError):  # not listening (never started, or stopped)
            env[IMDS_ENV] = self.imds.endpoint
        env.update(self.spec.env)
        env[MARKER_ENV] = self.spec.instance_id
        return env

    def start(self) -> None:
        """Listen on a free loopback port, serving from a daemon thread; return once listening."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"simulated host {self.spec.instance_id} was already started")
            self._state = "starting"
        if logging.getLogger("asyncssh").level == logging.NOTSET:
            logging.getLogger("asyncssh").setLevel(logging.WARNING)
        self._prepare_sandbox()
        self.imds.start()
        init = _HostInit(self.spec.instance_id, self.sandbox)
        try:
            init.start()
        except BaseException:
            self.stop()
            raise
        self._init = init
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._serve, args=(loop,), name=f"simhost-{self.spec.instance_id}", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            loop.call_soon_threadsafe(init.attach, loop)
            acceptor = asyncio.run_coroutine_threadsafe(self._listen(), loop).result(timeout=30)
        except BaseException:
            self.stop()
            raise
        self._acceptor = acceptor
        self._port = acceptor.get_port()
        with self._lock:
            if self._state == "starting":
                self._state = "running"
        log.info("%s: simulated SSH host on %s:%d", self.spec.instance_id, self.host, self._port)

    def host_public_keys(self) -> list[str]:
        """The host's public keys as OpenSSH lines ("ssh-ed25519 AAAA..."), console order."""
        return [" ".join(key.export_public_key("openssh").decode().split()[:2]) for key in self._host_keys]

    def host_key_fingerprints(self) -> list[str]:
        """The lines cloud-init prints: "256 SHA256:... root@ip-127-0-0-1 (ED25519)"."""
        return [
            f"{bits} {key.get_fingerprint('sha256')} root@{self.hostname} ({label})"
            for key, (_, bits, label) in zip(self._host_keys, _HOST_KEY_TYPES, strict=True)
        ]

    def console_output(self) -> str:
        """A cloud-init style boot log with the host key fingerprint and key blocks."""
        return _console_log(
            self._booted, self.host_key_fingerprints(), self.host_public_keys(), self.spec.address
        )

    def poweroff_requested(self) -> bool:
        """True once a command ran the power-off hook ($CLOUDTRAIN_POWEROFF_HOOK)."""
        return (self.sandbox / POWEROFF_FLAG).exists()

    def stop(self, grace: float = 0.0) -> None:
        """Stop listening, kill every process the host started, close its connections.

        With ``grace`` > 0 processes get SIGTERM first and up to that many seconds to exit.
        Idempotent (a second call waits for the first); never from the host's own thread.
        """
        if self._thread is not None and threading.current_thread() is self._thread:
            raise RuntimeError("SimHost.stop() called from the host's own event loop")
        with self._lock:
            if self._state in ("stopping", "stopped"):
                busy = True
            else:
                busy = False
                self._state = "stopping"
        if busy:  # stopped, or another thread is stopping it: wait for that
            self._stopped.wait(30)
            return
        self.imds.stop()
        loop, thread = self._loop, self._thread
        alive = loop is not None and thread is not None and thread.is_alive()
        if alive and loop is not None:
            self._call(loop, self._close_listener(), 5)
        self._kill_all(grace)
        if alive and loop is not None and thread is not None:
            self._call(loop, self._close_connections(), 10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        self._kill_all(0)  # anything forked while the connections closed
        if self._init is not None:
            self._init.close()
        with self._lock:
            self._state = "stopped"
        self._stopped.set()
        log.info("%s: simulated host stopped", self.spec.instance_id)

    def __enter__(self) -> SimHost:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- sandbox and console -----------------------------------------------------------

    def _prepare_sandbox(self) -> None:
        for folder in (self.sandbox, self.home, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        (self.sandbox / POWEROFF_FLAG).unlink(missing_ok=True)
        flag = shlex.quote(str(self.sandbox / POWEROFF_FLAG))
        script = (
            "#!/bin/sh\n"
            "# cloudtrain simulated host: the power-off hook. Never a real poweroff: it only\n"
            "# leaves a flag the simulator sees, which then terminates the instance.\n"
            f'printf "%s\\n" "${{CLOUDTRAIN_POWEROFF_REASON:-}}" > {flag}\n'
        )
        for path in (self.hook, self.home / ".cloudtrain" / "poweroff"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(script)
            path.chmod(0o755)

    # --- the event loop thread -----------------------------------------------------------

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                for _ in range(3):  # cancelled tasks may start cleanup tasks of their own
                    pending = asyncio.all_tasks(loop)
                    for task in pending:
                        task.cancel()
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                    # let transports closed meanwhile run their connection_lost (and close sockets)
                    loop.run_until_complete(asyncio.sleep(0.01))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, _T], timeout: float) -> None:
        try:
            asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)
        except Exception:
            log.warning("simulated host shutdown step failed", exc_info=True)

    async def _listen(self) -> asyncssh.SSHAcceptor:
        home = os.fsencode(self.home)
        return await asyncssh.create_server(
            lambda: _Server(self),
            host=self.host,
            port=0,
            server_host_keys=self._host_keys,
            process_factory=self._handle,
            encoding=None,
            sftp_factory=lambda chan: _SandboxSFTP(chan, home),
            allow_scp=False,
            public_key_auth=True,
            password_auth=False,
            kbdint_auth=False,
            host_based_auth=False,
            gss_host=None,
            allow_pty=False,
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            rdns_lookup=False,
            window=_WINDOW,
        )

    async def _close_listener(self) -> None:
        if self._acceptor is None:
            return
        loop = asyncio.get_running_loop()
        for sock in self._acceptor.sockets:  # stop accepting first, then let the connections
            loop.remove_reader(sock.fileno())  # already accepted attach to the server: closing it
        for _ in range(3):  # under a half-made one leaks its socket (asyncio asserts in _attach)
            await asyncio.sleep(0)
        self._acceptor.close()

    async def _close_connections(self) -> None:
        for _ in range(10):
            # first let connections accepted just before the listener closed reach connection_made
            await asyncio.sleep(0.01)
            connections = list(self._connections)
            if not connections:
                break
            for conn in connections:
                conn.close()
            waiters = [asyncio.ensure_future(self._closed(c)) for c in connections]
            await asyncio.wait(waiters, timeout=5)
        if self._acceptor is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._acceptor.wait_closed(), 5)

    @staticmethod
    async def _closed(conn: asyncssh.SSHServerConnection) -> None:
        await conn.wait_closed()

    # --- commands ------------------------------------------------------------------------

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        try:
            if process.subsystem:
                process.stderr.write(f"subsystem {process.subsystem!r} is not supported\n".encode())
                process.exit(1)
                return
            if self._state != "running":
                process.stderr.write(b"the instance is shutting down\n")
                process.exit(255)
                return
            argv = ["/bin/bash"] if process.command is None else ["/bin/bash", "-c", process.command]
            await self._run(process, argv)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: a command failed to run", self.spec.instance_id)
            with contextlib.suppress(Exception):
                process.exit(255)

    async def _run(self, process: asyncssh.SSHServerProcess[bytes], argv: list[str]) -> None:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        init = self._init
        try:
            if init is None:
                raise RuntimeError("the host has no init")
            pid = await init.spawn(argv, self.environment(), self.home, (in_r, out_w, err_w))
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        pgid = pid  # the init started it in a session of its own
        transports: list[asyncio.BaseTransport] = []
        tasks: list[asyncio.Future[Any]] = []
        reaped = False
        try:
            stdin = await _write_pipe(in_w)
            transports.append(stdin.transport)
            out, out_t = await _read_pipe(out_r)
            err, err_t = await _read_pipe(err_r)
            transports += [out_t, err_t]
            feed = asyncio.ensure_future(self._pump_in(process, stdin, pgid))
            finished = asyncio.ensure_future(
                asyncio.gather(init.wait(pid), _pump_out(out, process.stdout), _pump_out(err, process.stderr))
            )
            closed = asyncio.ensure_future(process.channel.wait_closed())
            tasks += [feed, finished, closed]
            either: list[asyncio.Future[Any]] = [finished, closed]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if finished.done() and not closed.done():
                reaped = True
                code = finished.result()[0]  # a failed pump raises: let _handle report it
                if code is not None and code < 0:
                    try:
                        name = signal.Signals(-code).name.removeprefix("SIG")
                    except ValueError:
                        name = str(-code)
                    process.exit_with_signal(name)
                else:
                    process.exit(code or 0)
            # else the client went away: close the pipes (EOF/SIGPIPE), like sshd; keep running.
        finally:
            for task in tasks:
                task.cancel()
            for transport in transports:
                transport.close()
            if not reaped:  # its exit code is still to come: collect it
                reaper = asyncio.ensure_future(init.wait(pid))
                self._background.add(reaper)
                reaper.add_done_callback(self._background.discard)

    async def _pump_in(
        self, process: asyncssh.SSHServerProcess[bytes], stdin: asyncio.StreamWriter, pgid: int
    ) -> None:
        """Forward the channel to the command's stdin; forward signal requests to its group."""
        broken = False
        try:
            while True:
                try:
                    data = await process.stdin.read(_CHUNK)
                except asyncssh.SignalReceived as e:
                    self._signal_group(pgid, e.signal)
                    continue
                except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged):
                    continue
                if not data:
                    break
                if broken:
                    continue  # the command closed its stdin: discard, so the client never blocks
                try:
                    stdin.write(data)
                    await stdin.drain()
                except (ConnectionError, OSError):
                    broken = True
        except (asyncssh.Error, OSError):
            pass
        finally:
            stdin.close()

    @staticmethod
    def _signal_group(pgid: int, name: str) -> None:
        try:
            signum = signal.Signals["SIG" + name.upper()]
        except KeyError:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)

    # --- killing -------------------------------------------------------------------------

    def _kill_all(self, grace: float) -> None:
        """Kill every process of the host: the init's whole subtree, whatever it did to escape."""
        if self._init is not None:
            self._init.kill_all(grace)


def _is_loopback_ipv4(address: str) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return parsed.version == 4 and parsed.is_loopback


def _console_log(booted: datetime, fingerprints: list[str], keys: list[str], address: str = LOOPBACK) -> str:
    def at(seconds: float) -> str:
        return (booted + timedelta(seconds=seconds)).strftime("%a, %d %b %Y %H:%M:%S +0000")

    name = hostname(address)
    hostkeys = "\n".join(f"{key} root@{name}" for key in keys)
    generated = "\n".join(
        f"Generating public/private {label.lower()} key pair.\n"
        f"Your identification has been saved in /etc/ssh/ssh_host_{label.lower()}_key\n"
        f"Your public key has been saved in /etc/ssh/ssh_host_{label.lower()}_key.pub\n"
        f"The key fingerprint is:\n{line.split(' ', 1)[1].rsplit(' ', 1)[0]}"
        for line, (_, _, label) in zip(fingerprints, _HOST_KEY_TYPES, strict=True)
    )
    return (
        "[    0.000000] Linux version 6.8.0-1021-aws (buildd@lcy02-amd64-031) "
        "(x86_64-linux-gnu-gcc-12 (Ubuntu 12.3.0-1ubuntu1~22.04) 12.3.0) #23~22.04.1-Ubuntu SMP\n"
        "[    0.000000] Command line: BOOT_IMAGE=/boot/vmlinuz-6.8.0-1021-aws root=PARTUUID=1 ro "
        "console=tty1 console=ttyS0 nvme_core.io_timeout=4294967295 panic=-1\n"
        "[    0.000000] DMI: Amazon EC2 g4dn.xlarge/, BIOS 1.0 10/16/2017\n"
        "[    2.113742] EXT4-fs (nvme0n1p1): mounted filesystem with ordered data mode.\n"
        f"Cloud-init v. 24.4-0ubuntu1~22.04.1 running 'init-local' at {at(3)}. Up 4.02 seconds.\n"
        f"Cloud-init v. 24.4-0ubuntu1~22.04.1 running 'init' at {at(5)}. Up 5.87 seconds.\n"
        "ci-info: ++++++++++++++++++++++++++++++++Net device info++++++++++++++++++++++++++++++++\n"
        "ci-info: | Device |  Up  |    Address    |    Mask   | Scope  |     Hw-Address    |\n"
        f"ci-info: |  ens5  | True | {address:^13} | 255.0.0.0 | global | 02:00:00:00:00:01 |\n"
        f"ci-info: |   lo   | True | {LOOPBACK:^13} | 255.0.0.0 |  host  |         .         |\n"
        "ci-info: +--------+------+---------------+-----------+--------+-------------------+\n"
        f"{generated}\n"
        f"Cloud-init v. 24.4-0ubuntu1~22.04.1 running 'modules:config' at {at(8)}. Up 8.41 seconds.\n"
        "#############################################################\n"
        "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
        + "\n".join(fingerprints)
        + "\n-----END SSH HOST KEY FINGERPRINTS-----\n"
        "#############################################################\n"
        "-----BEGIN SSH HOST KEY KEYS-----\n"
        f"{hostkeys}\n"
        "-----END SSH HOST KEY KEYS-----\n"
        f"Cloud-init v. 24.4-0ubuntu1~22.04.1 running 'modules:final' at {at(9)}. Up 9.12 seconds.\n"
        f"Cloud-init v. 24.4-0ubuntu1~22.04.1 finished at {at(9)}. Datasource DataSourceEc2Local.  "
        "Up 9.30 seconds\n"
        f"\nUbuntu 22.04.5 LTS {name} ttyS0\n"
    )
