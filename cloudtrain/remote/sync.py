"""Ship the workdir and local data to the instance: only what changed, in one verified stream.

``collect`` lists the synced set: the workdir minus what ``.gitignore`` and
``.cloudtrainignore`` files exclude (gitignore rules, nested files too; a
``.cloudtrainignore`` line wins over a ``.gitignore`` one, so ``!data/`` there
brings back a git-ignored folder), never ``.git/``, ``.cloudtrain/``, the run
folders (``runs/`` and whatever ``exclude`` names) or CLOUDTRAIN_HOME; plus each local
``data`` source at its ``dst``. ``push`` asks the instance for its manifest (one round
trip over the open session), sends every new or changed file in ONE stream, and the
deletions of files that left the synced set; ``cloudtrain_agent.receive`` writes each
file under a temporary name, checks the sha256 that follows its bytes, and renames
it into place (see ``cloudtrain/agent/receive.py`` for the format).

Content hashes are cached locally (a JSON file under ``cache_dir``) keyed by path, size,
mtime, ctime and inode, so an unchanged file is never read again. A file the remote
manifest does not have (or has at another size) is hashed while it is sent: one read.

Bulk transport: the OpenSSH client when it is installed and the stream is large
(it is about twice as fast as paramiko and keeps a large window on long links),
with the host key pinned in a known_hosts file written from the verified session,
never auto-accepted; otherwise (or if that client cannot connect) the session's own
channel.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, NamedTuple, cast

import pathspec

from cloudtrain.agent.receive import sha256_file
from cloudtrain.agent.wire import (
    MAGIC,
    MANIFEST_DIR,
    READ_SIZE,
    SMALL_RECORD,
    FileReader,
    PathRefused,
    StreamError,
    check_manifest,
    check_relpath,
    delete_header,
    end_header,
    put_header,
)
from cloudtrain.errors import RemoteError
from cloudtrain.remote.agent import AgentCli, remote_path
from cloudtrain.remote.session import Session
from cloudtrain.spec import DataSource

log = logging.getLogger(__name__)

IGNORE_FILES = (".gitignore", ".cloudtrainignore")  # read in this order: the later wins
ALWAYS_EXCLUDED_NAMES = frozenset({".git"})  # at any depth
ROOT_EXCLUDED = frozenset({MANIFEST_DIR, "runs"})  # at the workdir's top
LARGE_BYTES = 1 << 30
LARGE_FILES = 50_000
OPENSSH_MIN_BYTES = 8 << 20  # smaller streams go over the open session: no new handshake
FLUSH_AT = 1 << 18
RACY_NS = 2_000_000_000  # a file modified this close to its hashing is hashed again next time
CIPHERS = (
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
    "aes128-ctr,aes192-ctr,aes256-ctr"
)

Progress = Callable[[int, int], None]  # (bytes sent so far, bytes to send)


class LocalFile(NamedTuple):
    """One file of the synced set: where it goes (``path``, relative POSIX) and where it is.

    A NamedTuple, not a dataclass: building and replacing 10,000 of them is 5x cheaper.
    """

    path: str
    source: str  # the local file (a plain string: 10,000 Paths cost a third of a walk)
    size: int
    mtime_ns: int
    mode: int  # permission bits
    ctime_ns: int = 0
    inode: int = 0
    sha256: str | None = None

    @classmethod
    def from_stat(cls, path: str, source: str, st: os.stat_result) -> LocalFile:
        return cls(
            path, source, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), st.st_ctime_ns, st.st_ino
        )


class FileList(list[LocalFile]):
    """``collect``'s result: the files, and warnings about what was left out."""

    def __init__(self, files: Iterable[LocalFile] = (), warnings: Iterable[str] = ()) -> None:
        super().__init__(files)
        self.warnings = list(warnings)


@dataclass(frozen=True)
class SyncPlan:
    """What a push does: files to send, synced paths to delete, files already there."""

    send: list[LocalFile]
    delete: list[str]
    unchanged: list[LocalFile]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SyncReport:
    """What a push did."""

    files_total: int
    bytes_total: int
    files_sent: int
    bytes_sent: int
    files_deleted: int
    sent: tuple[str, ...]
    deleted: tuple[str, ...]
    kept: tuple[str, ...]  # synced files left in place: changed on the instance since
    transport: str  # "openssh", "paramiko" or "none" (nothing to send)
    seconds: float
    warnings: tuple[str, ...] = ()


# --- the synced set ---------------------------------------------------------------------


def _default_home() -> Path:
    return Path(os.environ.get("CLOUDTRAIN_HOME") or Path.home() / ".cloudtrain").expanduser()


def _clean_dst(dst: str) -> str:
    path = PurePosixPath(dst.strip().rstrip("/"))
    text = str(path)
    try:
        return check_relpath(text)
    except PathRefused as e:
        raise RemoteError(f"data dst '{dst}' cannot be synced: {e}") from e


class _Rules:
    """The ignore files of one folder, as one gitignore spec relative to that folder."""

    def __init__(self, base: str, spec: pathspec.GitIgnoreSpec) -> None:
        self.base = base  # "" for the workdir, else "sub/dir/"
        self.spec = spec


def _read_rules(folder: str, base: str) -> _Rules | None:
    lines: list[str] = []
    for name in IGNORE_FILES:
        try:
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                lines += f.read().splitlines()
        except OSError:
            continue
    if not any(line.strip() and not line.startswith("#") for line in lines):
        return None
    return _Rules(base, pathspec.GitIgnoreSpec.from_lines(lines))


def _ignored(rules: list[_Rules], rel: str, is_dir: bool) -> bool:
    """gitignore semantics: the deepest folder whose rules match (or negate) the path decides."""
    for rule in reversed(rules):
        sub = rel[len(rule.base) :]
        result = rule.spec.check_file(sub + "/" if is_dir else sub)
        if result.include is not None:
            return bool(result.include)
    return False


def _walk(
    root: str,
    prefix: str,
    *,
    use_rules: bool,
    skip_rel: set[str],
    skip_real: Mapping[str, str],
    warnings: list[str],
) -> Iterator[LocalFile]:
    """Files under ``root`` (paths ``prefix`` + relative path), honouring ignore files if asked.

    ``skip_real``: real paths left out (files, or folders with all they hold, through a
    symlink too), each with the warning to give when it is met ("": none)."""
    stack: list[tuple[str, str, list[_Rules]]] = [(root, "", [])]
    while stack:
        folder, rel_folder, rules = stack.pop()
        if use_rules:
            own = _read_rules(folder, rel_folder)
            if own is not None:
                rules = [*rules, own]
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            warnings.append(f"cannot read folder {folder}: {e.strerror or e}")
            continue
        subfolders: list[tuple[str, str, list[_Rules]]] = []
        for entry in entries:
            name = entry.name
            rel = rel_folder + name
            if name in ALWAYS_EXCLUDED_NAMES or rel in skip_rel:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            full = entry.path
            if stat.S_ISLNK(st.st_mode):
                try:
                    st = entry.stat(follow_symlinks=True)
                except OSError:
                    warnings.append(f"skipped {full}: a dangling symlink")
                    continue
                if _left_out(os.path.realpath(full), full, skip_real, warnings):
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if not (use_rules and _ignored(rules, rel, True)):
                        warnings.append(
                            f"skipped {full}: a symlink to a folder (name it in `data:` to sync it)"
                        )
                    continue
            if stat.S_ISDIR(st.st_mode):
                if full in skip_real:
                    _left_out(full, full, skip_real, warnings)
                    continue
                if use_rules and _ignored(rules, rel, True):
                    continue
                subfolders.append((full, rel + "/", rules))
            elif stat.S_ISREG(st.st_mode):
                if use_rules and _ignored(rules, rel, False):
                    continue
                if full in skip_real:
                    _left_out(full, full, skip_real, warnings)
                    continue
                yield LocalFile.from_stat(prefix + rel, full, st)
            elif not (use_rules and _ignored(rules, rel, False)):
                warnings.append(f"skipped {full}: not a regular file")
        stack.extend(reversed(subfolders))


def _left_out(real: str, shown: str, skip_real: Mapping[str, str], warnings: list[str]) -> bool:
    """Whether ``real`` is, or is inside, a path left out; its warning is noted if it has one."""
    for path, why in skip_real.items():
        if real == path or real.startswith(path.rstrip("/") + "/"):
            if why:
                warnings.append(f"left out {shown}: {why}")
            return True
    return False


def aws_credential_paths() -> list[Path]:
    """Where this machine keeps AWS credentials and tokens: ~/.aws (credentials, config,
    the SSO and CLI caches) and the files AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE and
    AWS_WEB_IDENTITY_TOKEN_FILE name. Never synced: the instance reaches AWS with its
    instance profile."""
    paths = [Path.home() / ".aws"]
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(name):
            paths.append(Path(os.environ[name]).expanduser())
    return paths


CREDENTIALS_LEFT_OUT = "AWS credentials never go to the instance (it uses its instance profile)"


def collect(
    workdir: str | os.PathLike[str],
    *,
    data_sources: Sequence[DataSource] = (),
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> FileList:
    """The synced set: the workdir's files (ignore rules applied) and each local data source at its dst.

    ``exclude``: more paths to leave out (absolute, or relative to the workdir), e.g. the
    run folder and CLOUDTRAIN_HOME. S3 data sources are fetched on the instance: their
    ``dst`` is left out of the workdir's files too.
    """
    root = Path(workdir).resolve()
    if not root.is_dir():
        raise RemoteError(f"workdir {root} is not a folder", hint="Check `workdir:` in the job file.")
    warnings: list[str] = []
    skip_real = {str(_default_home().resolve()): ""}
    for excluded in exclude:
        path = Path(excluded)
        skip_real[str((path if path.is_absolute() else root / path).resolve())] = ""
    for credentials in aws_credential_paths():
        skip_real[str(credentials.resolve())] = CREDENTIALS_LEFT_OUT
    skip_rel = set(ROOT_EXCLUDED)
    for source in data_sources:
        skip_rel.add(_clean_dst(source.dst))
    files: dict[str, LocalFile] = {}
    for found in _walk(
        str(root), "", use_rules=True, skip_rel=skip_rel, skip_real=skip_real, warnings=warnings
    ):
        files[found.path] = found
    for source in data_sources:
        if source.is_s3:
            continue
        dst = _clean_dst(source.dst)
        src = Path(source.src)
        src = (src if src.is_absolute() else root / src).resolve()
        if _left_out(str(src), source.src, {p: w for p, w in skip_real.items() if w}, []):
            raise RemoteError(
                f"data source {source.src} holds AWS credentials: {CREDENTIALS_LEFT_OUT}",
                hint="Remove it from `data:`; S3 data is read on the instance with its instance profile.",
            )
        try:
            st = src.stat()
        except OSError as e:
            raise RemoteError(
                f"data source {source.src} cannot be read: {e.strerror or e}", hint="Check `data:`."
            ) from e
        if stat.S_ISDIR(st.st_mode):
            for found in _walk(
                str(src), dst + "/", use_rules=False, skip_rel=set(), skip_real=skip_real, warnings=warnings
            ):
                files[found.path] = found
        elif stat.S_ISREG(st.st_mode):
            files[dst] = LocalFile.from_stat(dst, str(src), st)
        else:
            warnings.append(f"skipped data source {src}: not a file or folder")
    return FileList(sorted(files.values(), key=lambda f: f.path), warnings)


# --- the local hash cache ---------------------------------------------------------------


class HashCache:
    """sha256 of local files, valid while (size, mtime, ctime, inode) are unchanged.

    One JSON file per folder the files share (``cache_dir/hashes/<digest>.json``):
    loading 10,000 entries takes milliseconds (SQLite lookups were measured 5x slower),
    and it is replaced atomically. Two runs writing at once lose some entries, which
    only costs a re-hash.
    """

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.folder = Path(cache_dir) / "hashes"
        self._entries: dict[str, list[Any]] = {}
        self._path: Path | None = None

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def _load(self, files: Sequence[LocalFile]) -> None:
        if not files:
            return
        root = os.path.commonpath([files[0].source, files[-1].source, *(f.source for f in files[::97])])
        key = hashlib.sha256(os.fsencode(root)).hexdigest()[:24]
        self._path = self.folder / f"{key}.json"
        try:
            entries = json.loads(self._path.read_bytes())
            self._entries = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            self._entries = {}

    def fill(self, files: Sequence[LocalFile]) -> list[LocalFile]:
        """The files, with ``sha256`` set where the cache knows the file as it is now."""
        self._load(files)
        entries = self._entries
        out = []
        for f in files:
            hit = entries.get(f.source)
            if (
                f.sha256 is None
                and hit is not None
                and hit[0] == f.size
                and hit[1] == f.mtime_ns
                and hit[2] == f.ctime_ns
                and hit[3] == f.inode
            ):
                f = f._replace(sha256=hit[4])
            out.append(f)
        return out

    def store(self, files: Iterable[LocalFile], *, hashed_at_ns: int) -> None:
        """Remember the hashes; not for files modified within RACY_NS of their hashing."""
        fresh = {
            f.source: [f.size, f.mtime_ns, f.ctime_ns, f.inode, f.sha256]
            for f in files
            if f.sha256 is not None and f.mtime_ns < hashed_at_ns - RACY_NS
        }
        if not fresh or self._path is None:
            return
        self._entries.update(fresh)
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            # one per thread too: a run's nodes are synced in parallel
            tmp = self._path.with_name(f"{self._path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self._entries, separators=(",", ":")))
            os.replace(tmp, self._path)


# --- planning ---------------------------------------------------------------------------


def plan_sync(local: Sequence[LocalFile], remote_manifest: dict[str, list[Any]]) -> SyncPlan:
    """Compare the synced set with the instance's manifest (path -> [sha256, size, mode, mtime_ns]).

    A file is sent when the instance lacks it or has other content or permissions. A
    file whose hash is unknown is hashed here only when the sizes agree (otherwise it
    is plainly changed, and is hashed while it is sent). Paths in the manifest that left
    the synced set are deleted (the manifest only ever holds synced files).
    """
    send: list[LocalFile] = []
    unchanged: list[LocalFile] = []
    warnings: list[str] = []
    unreadable: set[str] = set()
    for f in local:
        entry = remote_manifest.get(f.path)
        if entry is None or len(entry) < 3 or entry[1] != f.size:
            send.append(f)
            continue
        if f.sha256 is None:
            try:
                f = f._replace(sha256=sha256_file(f.source))
            except OSError as e:
                warnings.append(f"skipped {f.source}: {e.strerror or e}")
                unreadable.add(f.path)
                continue
        if entry[0] == f.sha256 and entry[2] == f.mode:
            unchanged.append(f)
        else:
            send.append(f)
    present = {f.path for f in local}
    delete = sorted(p for p in remote_manifest if p not in present and p not in unreadable)
    return SyncPlan(send, delete, unchanged, warnings)


# --- the stream -------------------------------------------------------------------------


class _Sender:
    """Yields the stream for a plan, hashing each file as it is read; records what it saw."""

    def __init__(self, plan: SyncPlan, progress: Progress | None) -> None:
        self.plan = plan
        self.progress = progress
        self.total = sum(f.size for f in plan.send)
        self._sent: list[tuple[LocalFile, str]] = []
        self.warnings: list[str] = []
        self.buffer = bytearray(READ_SIZE)

    @property
    def sent(self) -> list[LocalFile]:
        """The files sent, each with the hash of the bytes sent."""
        return [f._replace(sha256=digest) for f, digest in self._sent]

    def chunks(self) -> Iterator[bytes | bytearray | memoryview]:
        """The stream: records gathered into chunks of about FLUSH_AT bytes; big files' pieces as read."""
        pending = bytearray(MAGIC)
        for path in self.plan.delete:
            pending += delete_header(path)
        done = 0
        progress, total = self.progress, self.total
        for f in self.plan.send:
            if f.size <= SMALL_RECORD and self._small(f, pending):
                if len(pending) >= FLUSH_AT:
                    yield pending
                    pending = bytearray()
            else:
                if pending:
                    yield pending
                    pending = bytearray()
                yield from self._large(f, done)
            done += f.size
            if progress is not None:
                progress(done, total)
        pending += end_header(files=len(self.plan.send), bytes=total, deletes=len(self.plan.delete))
        yield pending

    def _small(self, f: LocalFile, out: bytearray) -> bool:
        """Append a small file's whole record, read in one call; False if anything is odd."""
        try:
            fd = os.open(f.source, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, f.size + 1)
            finally:
                os.close(fd)
        except OSError:
            return False
        if len(data) != f.size:
            return False  # it changed since it was listed: FileReader copes
        digest = hashlib.sha256(data).hexdigest()
        out += put_header(f.path, f.size, f.mode, f.mtime_ns)
        out += data
        out += digest.encode()
        out += b"\n"
        self._sent.append((f, digest))
        return True

    def _large(self, f: LocalFile, before: int) -> Iterator[bytes | memoryview]:
        """A big file's record in pieces (the progress hears each piece: ``before`` bytes of
        the stream's files went ahead of it)."""
        reader = FileReader(f.source, f.size, f.mtime_ns, self.buffer)
        sent = 0
        for piece in reader.record(f.path, f.mode):
            yield piece
            if self.progress is not None:
                sent += len(piece)
                self.progress(before + min(sent, f.size), self.total)
        if reader.abandoned:
            self.warnings.append(f"not sent: {f.source} {reader.abandoned}")
        elif reader.changed:
            self.warnings.append(f"{f.source} changed while it was sent; the instance has a torn copy")
        elif reader.sha256 is not None:
            self._sent.append((f, reader.sha256))


# --- transports -------------------------------------------------------------------------


class OpenSSH:
    """The OpenSSH client pointed at a session's endpoint, trusting only its verified host key."""

    def __init__(self, session: Session, *, connect_timeout: float = 30) -> None:
        if not session.connected:
            session.connect()
        self.session = session
        self.connect_timeout = connect_timeout
        self._folder = Path(tempfile.mkdtemp(prefix="cloudtrain-ssh-"))
        self.known_hosts = self._folder / "known_hosts"
        self.known_hosts.write_text(session.known_hosts_line())

    @staticmethod
    def available() -> bool:
        return shutil.which("ssh") is not None

    def argv(self, command: str) -> list[str]:
        """The client's command line running ``command`` on the instance."""
        return [*self.client_argv(), "--", self.session.endpoint.host, command]

    def client_argv(self) -> list[str]:
        """The client and its options, without the host (e.g. for ``rsync -e``)."""
        endpoint = self.session.endpoint
        options = {
            "BatchMode": "yes",
            "IdentitiesOnly": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(self.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "UpdateHostKeys": "no",
            "CheckHostIP": "no",
            "ConnectTimeout": str(int(self.connect_timeout)),
            "ServerAliveInterval": "15",
            "ServerAliveCountMax": "4",
            "Compression": "no",
            "Ciphers": CIPHERS,
            "LogLevel": "ERROR",
        }
        argv = ["ssh", "-F", "/dev/null", "-T", "-x", "-a", "-i", str(endpoint.key_path)]
        argv += ["-p", str(endpoint.port), "-l", endpoint.user]
        for key, value in options.items():
            argv += ["-o", f"{key}={value}"]
        return argv

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> OpenSSH:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class ConnectFailed(Exception):
    """The OpenSSH client could not reach the host (exit 255, nothing came back)."""


def _pipe_bigger(fd: int) -> None:
    with contextlib.suppress(ImportError, OSError, AttributeError):
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, READ_SIZE)


class _OpenSSHReceiver:
    """``receive`` run through the OpenSSH client: optionally the manifest first, then the stream."""

    def __init__(self, ssh: OpenSSH, command: str) -> None:
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            ssh.argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        _pipe_bigger(self.stdin.fileno())

    def _stderr(self) -> bytes:
        self._err.seek(0)
        return self._err.read()

    def manifest(self) -> dict[str, list[Any]]:
        """The handshake's first line: the manifest (ConnectFailed if ssh could not connect)."""
        line = self.stdout.readline()
        try:
            return check_manifest(json.loads(line)["files"])
        except StreamError as e:  # it answered, with something no agent writes
            self.stdin.close()
            self.proc.wait()
            raise _bad_manifest(e) from None
        except (ValueError, KeyError, TypeError, RecursionError):
            pass
        self.stdin.close()
        code = self.proc.wait()
        stderr = self._stderr()
        if code == 255 and not line:
            raise ConnectFailed(stderr.decode("utf-8", "replace").strip())
        detail = (line + stderr).decode("utf-8", "replace").strip()[-2000:]
        raise RemoteError(
            f"the instance's receiver did not send its manifest (exit {code}): {detail}",
            hint="Is the agent uploaded and the remote Python 3.7+ there?",
        )

    def send(
        self, chunks: Iterable[bytes | bytearray | memoryview], meanwhile: Callable[[], None] | None = None
    ) -> tuple[int, bytes, bytes]:
        """Write the stream (nothing: cancel), then the exit status, stdout and stderr.

        ``meanwhile`` runs after the stream is written, while the receiver finishes.
        """
        with contextlib.suppress(BrokenPipeError):  # the receiver ended early: its output says why
            for chunk in chunks:
                self.stdin.write(chunk)
        with contextlib.suppress(BrokenPipeError):
            self.stdin.close()
        if meanwhile is not None:
            meanwhile()
        out = self.stdout.read()
        code = self.proc.wait()
        stderr = self._stderr()
        if code == 255 and not out:
            raise ConnectFailed(stderr.decode("utf-8", "replace").strip())
        return code, out, stderr

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.stdin, self.stdout, self._err):
            with contextlib.suppress(OSError):
                stream.close()


def _summary(code: int, stdout: bytes, stderr: bytes, where: str) -> dict[str, Any]:
    try:
        summary = json.loads(stdout.decode("utf-8").strip().splitlines()[-1])
        if not isinstance(summary, dict):
            raise ValueError
    except (ValueError, IndexError, UnicodeDecodeError):
        detail = (stderr or stdout).decode("utf-8", "replace").strip()[-2000:]
        raise RemoteError(
            f"the instance's receiver at {where} failed (exit {code}) without a report: {detail}",
            hint="Is the agent uploaded and the remote Python 3.7+ there? See the output above.",
        ) from None
    return summary


# --- push -------------------------------------------------------------------------------


def remote_manifest(
    session: Session, remote_dir: str, *, remote_python: str = "python3", remote_agent_path: str | None = None
) -> dict[str, list[Any]]:
    """The instance's manifest of the synced set in ``remote_dir`` (empty if none yet)."""
    command = AgentCli(remote_python, remote_agent_path).receive(remote_dir, print_manifest=True)
    # stream(), not run(): run() polls for the exit status; stderr joins stdout for the error text
    output = bytearray()
    code = session.stream(command + " 2>&1", output.extend)
    try:
        files = json.loads(bytes(output).strip().rsplit(b"\n", 1)[-1])["files"]
        if code != 0:
            raise ValueError
        files = check_manifest(files)
    except StreamError as e:
        raise _bad_manifest(e) from None
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        detail = bytes(output).decode("utf-8", "replace").strip()[-2000:]
        raise RemoteError(
            f"cannot read the synced set's manifest on {session.endpoint.label} (exit {code}): {detail}",
            hint="Is the agent uploaded and the remote Python 3.7+ there?",
        ) from None
    return files


def _bad_manifest(error: StreamError) -> RemoteError:
    return RemoteError(
        f"the instance sent a malformed manifest of the synced set: {error}",
        hint="The agent on the instance does not answer as cloudtrain's does; the run stops here.",
    )


class _LastPush:
    """What the last push to this instance's folder left there: a guess to pick the transport by.

    Keyed by the instance's verified host key and the remote folder, so a new instance
    starts with no guess. Never trusted for what to send: the manifest decides that.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], session: Session, remote_dir: str) -> None:
        key = hashlib.sha256(f"{session.known_hosts_line()}\0{remote_dir}".encode()).hexdigest()[:24]
        self.path = Path(cache_dir) / "pushes" / f"{key}.json"
        try:
            files = json.loads(self.path.read_bytes())
            self.files: dict[str, str] | None = files if isinstance(files, dict) else None
        except (OSError, ValueError):
            self.files = None

    def bytes_to_send(self, local: Sequence[LocalFile]) -> int:
        if self.files is None:
            return sum(f.size for f in local)
        last = self.files
        return sum(f.size for f in local if f.sha256 is None or last.get(f.path) != f.sha256)

    def forget(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()

    def save(self, local: Iterable[LocalFile]) -> None:
        files = {f.path: f.sha256 for f in local if f.sha256 is not None}
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(files, separators=(",", ":")))
            os.replace(tmp, self.path)


class _ManifestFetch(threading.Thread):
    """The manifest fetched over the session while this side hashes and plans."""

    def __init__(self, session: Session, remote_dir: str, remote_python: str, agent: str | None) -> None:
        super().__init__(name="cloudtrain-manifest", daemon=True)
        self.args = (session, remote_dir)
        self.kwargs = {"remote_python": remote_python, "remote_agent_path": agent}
        self.files: dict[str, list[Any]] | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.files = remote_manifest(*self.args, **self.kwargs)  # type: ignore[arg-type]
        except BaseException as e:  # handed to the caller by result()
            self.error = e

    def result(self) -> dict[str, list[Any]]:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.files is not None
        return self.files


def push(
    session: Session,
    files: Sequence[LocalFile],
    remote_dir: str,
    *,
    cache_dir: str | os.PathLike[str],
    remote_python: str = "python3",
    remote_agent_path: str | None = None,
    progress: Progress | None = None,
    transport: str = "auto",
    fsync: bool = False,
    openssh_min_bytes: int = OPENSSH_MIN_BYTES,
) -> SyncReport:
    """Make ``remote_dir`` on the instance hold ``files`` (only the synced set is touched).

    ``remote_python`` and ``remote_agent_path`` are shell words used as given (so
    ``$HOME/...`` expands remotely). ``transport``: "auto" (the OpenSSH client for
    streams of ``openssh_min_bytes`` or more when it is installed, else the session),
    "openssh" or "paramiko". With no record of an earlier push to this instance's
    folder (a first sync), a large set goes straight to the OpenSSH client, whose
    receiver sends its manifest first: one connection for the whole sync. Otherwise
    the manifest comes over the open session while the local hashes are looked up.

    Raises RemoteError when any file failed to arrive intact; the files that did are
    in place and recorded in the instance's manifest. ``sync_workdir`` does
    ``collect`` and this in one call, reaching the instance while the workdir is walked.
    """
    return _push(
        session,
        lambda: files,
        remote_dir,
        cache_dir=cache_dir,
        remote_python=remote_python,
        remote_agent_path=remote_agent_path,
        progress=progress,
        transport=transport,
        fsync=fsync,
        openssh_min_bytes=openssh_min_bytes,
        size_hint=sum(f.size for f in files),
    )


def sync_workdir(
    session: Session,
    workdir: str | os.PathLike[str],
    remote_dir: str,
    *,
    data_sources: Sequence[DataSource] = (),
    exclude: Iterable[str | os.PathLike[str]] = (),
    cache_dir: str | os.PathLike[str],
    remote_python: str = "python3",
    remote_agent_path: str | None = None,
    progress: Progress | None = None,
    transport: str = "auto",
    fsync: bool = False,
    openssh_min_bytes: int = OPENSSH_MIN_BYTES,
) -> SyncReport:
    """``collect`` then ``push``, with the instance reached while the workdir is walked.

    A re-sync fetches the instance's manifest meanwhile; a first sync (no record of an
    earlier push to this instance's folder) opens the OpenSSH client meanwhile.
    """
    return _push(
        session,
        lambda: collect(workdir, data_sources=data_sources, exclude=exclude),
        remote_dir,
        cache_dir=cache_dir,
        remote_python=remote_python,
        remote_agent_path=remote_agent_path,
        progress=progress,
        transport=transport,
        fsync=fsync,
        openssh_min_bytes=openssh_min_bytes,
        size_hint=None,
    )


def _push(
    session: Session,
    list_files: Callable[[], Sequence[LocalFile]],
    remote_dir: str,
    *,
    cache_dir: str | os.PathLike[str],
    remote_python: str,
    remote_agent_path: str | None,
    progress: Progress | None,
    transport: str,
    fsync: bool,
    openssh_min_bytes: int,
    size_hint: int | None,
) -> SyncReport:
    started = time.monotonic()
    hashed_at = time.time_ns()
    if transport not in ("auto", "openssh", "paramiko"):
        raise ValueError(f"transport must be auto, openssh or paramiko, not {transport!r}")
    if not session.connected:
        session.connect()
    where = f"{session.endpoint.label}:{remote_dir}"
    last = _LastPush(cache_dir, session, remote_dir)
    agent = AgentCli(remote_python, remote_agent_path)
    command = agent.receive(remote_dir, fsync=fsync)
    openssh_ok = transport == "openssh" or (transport == "auto" and OpenSSH.available())
    first = last.files is None and (size_hint is None or size_hint >= openssh_min_bytes)
    ssh: OpenSSH | None = None
    receiver: _OpenSSHReceiver | None = None
    fetch: _ManifestFetch | None = None
    if openssh_ok and (transport == "openssh" or first):
        ssh = OpenSSH(session)
        # connects while we walk and hash
        receiver = _OpenSSHReceiver(ssh, agent.receive(remote_dir, fsync=fsync, handshake=True))
    else:
        fetch = _ManifestFetch(session, remote_dir, remote_python, remote_agent_path)
    try:
        files = list_files()
    except BaseException:
        if receiver is not None:
            receiver.close()
        if ssh is not None:
            ssh.close()
        if fetch is not None:
            fetch.join()
        raise
    warnings = list(getattr(files, "warnings", ()))
    bytes_total = sum(f.size for f in files)
    if bytes_total > LARGE_BYTES or len(files) > LARGE_FILES:
        warnings.append(
            f"the synced set is large: {len(files)} files, {bytes_total / 2**30:.1f} GiB; "
            "list what the job does not need in .cloudtrainignore, or fetch big data from S3 with `data:`"
        )
    cache = HashCache(cache_dir)
    sender: _Sender | None = None
    plan: SyncPlan | None = None
    used = "none"
    known: dict[str, str | None] = {}
    remembered = False

    def remember() -> None:
        """Keep the hashes learnt, and this push as the guess for the next one (once; undone on failure)."""
        nonlocal remembered
        if remembered or plan is None or sender is None:
            return
        remembered = True
        sent = sender.sent
        cache.store(
            [f for f in (*plan.unchanged, *sent) if known.get(f.path) != f.sha256], hashed_at_ns=hashed_at
        )
        last.save([*plan.unchanged, *sent])

    try:
        local = cache.fill(files)
        known = {f.path: f.sha256 for f in local if f.sha256 is not None}
        log.debug("push: %d cached hashes of %d files at %.3f s", len(known), len(files), _since(started))
        if receiver is not None:
            try:
                manifest = receiver.manifest()
            except ConnectFailed as e:
                if transport == "openssh":
                    raise _unreachable(session, e) from e
                log.warning("the ssh client cannot connect (%s); syncing over the session instead", e)
                receiver.close()
                receiver = None
                manifest = remote_manifest(
                    session, remote_dir, remote_python=remote_python, remote_agent_path=remote_agent_path
                )
        else:
            assert fetch is not None
            manifest = fetch.result()
        log.debug("push: manifest of %d files at %.3f s", len(manifest), _since(started))
        plan = plan_sync(local, manifest)
        warnings += plan.warnings
        log.debug(
            "push: %d to send, %d to delete at %.3f s", len(plan.send), len(plan.delete), _since(started)
        )
        sender = _Sender(plan, progress)
        if not plan.send and not plan.delete:
            if receiver is not None:
                receiver.send(())  # an empty stream: nothing to do
            summary: dict[str, Any] = {"ok": True}
        else:
            bytes_to_send = sum(f.size for f in plan.send)
            if receiver is None and openssh_ok and bytes_to_send >= openssh_min_bytes:
                ssh = ssh or OpenSSH(session)
                receiver = _OpenSSHReceiver(ssh, command)
            code, out, err = -1, b"", b""
            if receiver is not None:
                try:
                    code, out, err = receiver.send(sender.chunks(), meanwhile=remember)
                    used = "openssh"
                except ConnectFailed as e:
                    if transport == "openssh":
                        raise _unreachable(session, e) from e
                    log.warning("the ssh client cannot connect (%s); sending over the session instead", e)
                    sender = _Sender(plan, progress)
            if used == "none":
                # paramiko sends any bytes-like chunk as it is
                result = session.send_stream(command, cast(Iterable[bytes], sender.chunks()))
                code, out, err = result.exit_code, result.stdout, result.stderr
                used = "paramiko"
            log.debug("push: sent over %s at %.3f s", used, _since(started))
            summary = _summary(code, out, err, where)
            if code != 0 and summary.get("ok"):
                summary["ok"] = False
    except BaseException:
        remember()
        last.forget()
        raise
    finally:
        if receiver is not None:
            receiver.close()
        if ssh is not None:
            ssh.close()
    remember()
    assert sender is not None
    warnings += sender.warnings
    if not summary.get("ok"):
        last.forget()
        problems = [f"{path}: {why}" for path, why in summary.get("errors", [])]
        if summary.get("stream_error"):
            problems.insert(0, str(summary["stream_error"]))
        raise RemoteError(
            f"sync to {where} failed ({summary.get('error_count', len(problems))} problem(s)): "
            + "; ".join(problems[:20]),
            hint="Nothing partial or corrupted was put in place; run again to resend what is missing.",
        )
    kept = tuple(summary.get("kept", ()))
    return SyncReport(
        files_total=len(files),
        bytes_total=bytes_total,
        files_sent=int(summary.get("written", 0)),
        bytes_sent=int(summary.get("bytes", 0)),
        files_deleted=int(summary.get("deleted", 0)),
        sent=tuple(f.path for f in plan.send),
        deleted=tuple(p for p in plan.delete if p not in kept),
        kept=kept,
        transport=used,
        seconds=time.monotonic() - started,
        warnings=tuple(warnings),
    )


def _since(start: float) -> float:
    return time.monotonic() - start


def _unreachable(session: Session, e: Exception) -> RemoteError:
    return RemoteError(
        f"the OpenSSH client cannot reach {session.endpoint.label}: {e}",
        hint="Use transport='auto' to fall back to the SSH session.",
    )


# --- the agent itself -------------------------------------------------------------------


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = info.name.rsplit("/", 1)[-1]
    if name == "__pycache__" or name.endswith((".pyc", ".pyo")):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def upload_tree(
    session: Session, local_dir: str | os.PathLike[str], remote_dir: str, progress: Progress | None = None
) -> int:
    """Replace ``remote_dir`` with a copy of ``local_dir`` in one tar stream (the agent); bytes
    sent (``progress`` hears them as they go)."""
    source = Path(local_dir)
    if not source.is_dir():
        raise RemoteError(f"{source} is not a folder")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for child in sorted(source.iterdir()):
            tar.add(child, arcname=child.name, filter=_tar_filter)
    data = buffer.getvalue()
    target = remote_path(remote_dir)
    staging = remote_path(remote_dir.rstrip("/") + ".new")

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), FLUSH_AT):
            yield data[start : start + FLUSH_AT]
            if progress is not None:
                progress(min(start + FLUSH_AT, len(data)), len(data))

    result = session.send_stream(
        f"rm -rf {staging} && mkdir -p {staging} && tar xzf - -C {staging} && "
        f"rm -rf {target} && mv {staging} {target}",
        chunks(),
    )
    if result.exit_code != 0:
        detail = (result.stderr or result.stdout).decode("utf-8", "replace").strip()[-2000:]
        raise RemoteError(f"copying {source} to {session.endpoint.label}:{remote_dir} failed: {detail}")
    return len(data)


def read_stream(stream: IO[bytes]) -> Iterator[bytes]:
    """Chunks from a binary stream until EOF (for feeding a StreamReceiver)."""
    read = getattr(stream, "read1", stream.read)
    while True:
        data = read(READ_SIZE)
        if not data:
            return
        yield data
