"""Receive a cloudtrain file stream on stdin and apply it under a folder.

    python3 -m cloudtrain_agent.receive --dest DIR [--manifest NAME] [--fsync] [--handshake]
    python3 -m cloudtrain_agent.receive --dest DIR --print-manifest

Prints a JSON summary on stdout (files written, bytes, deleted, kept, errors); exits
1 if any file failed (the message on stderr names it), 2 on bad usage.
``--print-manifest`` prints ``{"version": 1, "files": {path: [sha256, size, mode,
mtime_ns]}}``; ``--handshake`` prints that first, then reads the stream (an empty
one means "nothing to do"), so a sender plans and sends over one connection.

The stream's format is in ``wire.py``.

Each file is written to a temporary name in its target folder and renamed into
place only when its hash matches, so a partial or corrupted file never sits under
its final name. Paths must be relative, normalised and free of ``..``; no parent
folder may be a symlink (nothing is ever written outside DEST). Deletions apply only
to files in the manifest (the synced set) and only while the file is still as it was
written (same size and mtime): a file the job changed on the instance is kept.

The manifest (``DEST/.cloudtrain/manifest.json``: a header line, then one JSON line
path -> [sha256, size, mode, mtime_ns]) records the synced set; it is replaced
atomically after every stream, under a lock (one receiver per DEST at a time). When
it is read, each file is checked (lstat): a file gone is dropped, one changed on
the instance gets an empty hash, so the sender sends it again.

Durability: files are not fsynced (measured: fsync per file costs ~3 ms, 30 s for
10,000 small files; rsync and tar do not fsync either). Instead the manifest records
the boot id; after a reboot (a crash may have lost unflushed data) the manifest is
trusted only after each file is hashed again, so a lost write is re-sent, never
believed. ``--fsync`` flushes every file and the manifest for those who want it.

Standard library only, Python 3.7+; ``StreamReceiver`` is also used by the
controller to receive pulled-back outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import stat
import sys
from typing import IO, Any, Iterable, Iterator

from .wire import (
    ABANDONED,
    HASH_HEX,
    INT64,
    MAGIC,
    MANIFEST_DIR,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MAX_HEADER,
    MODE_RANGE,
    PLAIN_PUT,
    READ_SIZE,
    SIZE_RANGE,
    TRAILER_LEN,
    PathRefused,
    StreamError,
    check_manifest,
    check_relpath,
    checked_int,
    shown,
)

TMP_PREFIX = ".ct-part."
LIST_LIMIT = 200  # entries per list in the printed summary
MISMATCH = "sha256 mismatch: the bytes received are not the bytes sent"
GIVEN_UP = "the sender gave it up (it changed or could not be read)"
_MAGIC_STATE, _HEADER, _DATA, _TRAILER, _DONE = range(5)
_DECODE = json.JSONDecoder().raw_decode
_UTIME_FD = os.utime in os.supports_fd


# --- receiving --------------------------------------------------------------------------


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def sha256_file(path: str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        while True:
            n = f.readinto(buffer)
            if not n:
                return hasher.hexdigest()
            hasher.update(view[:n])


class StreamReceiver:
    """Applies a stream, fed in chunks of any size, to the folder ``dest``.

    ``manifest``: the synced set to maintain (None: pull-back, no manifest and no
    deletions). ``max_bytes``: a cap on the files' total size; a stream over it is cut
    (StreamError). ``mode_mask``: the permission bits kept from each header. Per-file
    problems (refused path, hash mismatch, a folder in the way) are recorded in
    ``errors`` and the stream goes on; a malformed stream raises StreamError. Call
    ``finish()`` at the stream's end, and ``close()`` in any case.

    One thread: writer threads were measured slower here (creating files is kernel
    work, and a GIL hand-off per small file costs more than it saves).
    """

    def __init__(
        self,
        dest: str,
        manifest: dict[str, list[Any]] | None = None,
        max_bytes: int | None = None,
        mode_mask: int = 0o777,
        fsync: bool = False,
        refuse_symlinked_dest: bool = False,
        only: Iterable[str] | None = None,
    ) -> None:
        self.dest = os.path.abspath(dest).rstrip("/") or "/"
        if refuse_symlinked_dest and os.path.islink(self.dest):
            raise PathRefused(f"{self.dest} is a symlink")
        os.makedirs(self.dest, exist_ok=True)
        if not os.path.isdir(self.dest):
            raise PathRefused(f"{self.dest} is not a folder")
        self.manifest = manifest
        # pull-back: the paths asked for; a put of anything else (say job.yaml beside a
        # pulled checkpoint) is refused, whatever the sender sends
        self.only = None if only is None else tuple(p.rstrip("/") for p in only)
        self.max_bytes = max_bytes
        self.mode_mask = mode_mask
        self.fsync = fsync
        umask = os.umask(0)
        os.umask(umask)
        self.umask = umask
        self.written = 0
        self.bytes = 0
        self.deleted = 0
        self.declared_bytes = 0
        self.puts = 0
        self.paths_written: list[str] = []
        self.kept: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.abandoned: list[tuple[str, str]] = []
        self.errors: list[tuple[str, str]] = []
        self.end: dict[str, Any] | None = None
        self._state = _MAGIC_STATE
        self._pending = bytearray()
        self._dirs: set[str] = set()
        self._mtime_kept = False
        self._tmp_count = 0
        self._tmp_prefix = f"{TMP_PREFIX}{os.getpid()}."
        self._dir = self.dest
        # the file being received
        self._path = ""
        self._final = ""
        self._left = 0
        self._size = 0
        self._mode = 0
        self._mtime_ns = -1
        self._fd = -1
        self._tmp = ""
        self._hasher = hashlib.sha256()
        self._error = ""

    # -- feeding --

    def feed(self, data: bytes) -> None:
        """Consume the next chunk of the stream."""
        view = memoryview(data)
        pos, n = 0, len(data)
        while pos < n:
            state = self._state
            if state == _HEADER and not self._pending:
                newline = data.find(b"\n", pos, pos + MAX_HEADER + 1)
                if newline < 0:
                    self._header_part(view[pos:])
                    return
                plain = PLAIN_PUT(data, pos, newline)
                if plain is not None:  # most files: the whole record in this chunk, one call
                    path, size, mode, mtime_ns = plain.groups()
                    start = newline + 1
                    end = start + int(size)
                    if end + TRAILER_LEN <= n:
                        pos = end + TRAILER_LEN
                        self._put_whole(
                            path.decode("ascii"), int(mode), int(mtime_ns), view[start:end], data[end:pos]
                        )
                        continue
                record = self._record(bytes(view[pos:newline]))
                pos = newline + 1
                if record is not None:  # a put: whole in this chunk, or streamed
                    end = pos + self._size
                    if end + TRAILER_LEN <= n:
                        self._complete(view[pos:end], bytes(view[end : end + TRAILER_LEN]))
                        pos = end + TRAILER_LEN
                    else:
                        self._open()
            elif state == _DATA:
                take = min(self._left, n - pos)
                piece = view[pos : pos + take]
                self._hasher.update(piece)
                if self._fd >= 0:
                    self._write(piece)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _TRAILER
            elif state == _TRAILER:
                take = min(TRAILER_LEN - len(self._pending), n - pos)
                self._pending += view[pos : pos + take]
                pos += take
                if len(self._pending) == TRAILER_LEN:
                    tail = bytes(self._pending)
                    del self._pending[:]
                    self._state = _HEADER
                    self._finish_streamed(tail)
            elif state == _DONE:
                raise StreamError("data after the end record")
            else:  # a header line split across chunks, or the magic line
                newline = data.find(b"\n", pos, pos + MAX_HEADER + 1)
                if newline < 0:
                    self._header_part(view[pos:])
                    return
                self._header_part(view[pos:newline])
                line = bytes(self._pending)
                del self._pending[:]
                pos = newline + 1
                if state == _MAGIC_STATE:
                    if line + b"\n" != MAGIC:
                        raise StreamError("not a cloudtrain stream (bad magic line)")
                    self._state = _HEADER
                elif self._record(line) is not None:
                    self._open()

    def _header_part(self, part: memoryview) -> None:
        self._pending += part
        if len(self._pending) > MAX_HEADER:
            raise StreamError(f"a record header is longer than {MAX_HEADER} bytes")

    def feed_from(self, stream: IO[bytes], size: int = READ_SIZE) -> None:
        """Feed everything readable from a binary file object (until EOF)."""
        read = getattr(stream, "read1", stream.read)
        while True:
            data = read(size)
            if not data:
                return
            self.feed(data)

    def finish(self) -> None:
        """The stream's EOF: StreamError if it was cut short or its totals disagree."""
        if self._state != _DONE:
            self._discard()
            if self._state == _MAGIC_STATE and not self._pending:
                raise StreamError("the stream was empty")
            where = f" in the middle of {self._path}" if self._state in (_DATA, _TRAILER) else ""
            raise StreamError(f"the stream ended before its end record{where}")
        if self.end is not None:
            files, total = self.end.get("files"), self.end.get("bytes")
            if (files is not None and files != self.puts) or (
                total is not None and total != self.declared_bytes
            ):
                raise StreamError(
                    f"the end record announces {files} files ({total} bytes) "
                    f"but the stream had {self.puts} ({self.declared_bytes} bytes)"
                )

    def close(self) -> None:
        """Drop a file in progress (its temporary file is removed)."""
        self._discard()

    # -- records --

    def _record(self, line: bytes) -> dict[str, Any] | None:
        """Apply a header line; a put's header is returned (its bytes follow)."""
        try:
            record = _DECODE(line.decode("utf-8"))[0]
            op = record["op"]
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            raise StreamError(f"a record header is not a JSON object with an op: {shown(line)}") from None
        if op == "put":
            self._begin(record)
            return record  # type: ignore[no-any-return]
        if op == "delete":
            self._delete(record.get("path"))
        elif op == "skip":
            self.skipped.append((shown(record.get("path")), shown(record.get("reason"))))
        elif op == "end":
            self.end = record
            self._state = _DONE
        else:
            raise StreamError(f"unknown record op {op!r}")
        return None

    def _begin(self, record: dict[str, Any]) -> None:
        size = checked_int(record.get("size"), SIZE_RANGE, "a put record's size")
        mode = checked_int(record.get("mode", 0o644), MODE_RANGE, "a put record's mode")
        mtime_ns = checked_int(record.get("mtime_ns", -1), INT64, "a put record's mtime")
        self.puts += 1
        self.declared_bytes += size
        if self.max_bytes is not None and self.declared_bytes > self.max_bytes:
            raise StreamError(
                f"the files are over the size cap of {self.max_bytes} bytes at {record.get('path')!r}"
            )
        raw = record.get("path")
        self._path = path = raw if isinstance(raw, str) else shown(raw)
        self._size = self._left = size
        self._mode = mode & self.mode_mask
        self._mtime_ns = mtime_ns
        self._error = ""
        self._final = ""
        try:
            check_relpath(raw)
            if self.only is not None:
                self._check_asked(path)
            self._dir = self._parent(path, create=True)
            self._final = self._dir + "/" + path.rpartition("/")[2]
        except PathRefused as e:
            self._path = shown(raw)  # reported, never used as a path
            self._error = f"refused: {e}"
        except OSError as e:
            self._error = f"cannot write: {e.strerror or e}"

    def _put_whole(self, path: str, mode: int, mtime_ns: int, data: memoryview, tail: bytes) -> None:
        """A put whose header (a plain one), bytes and trailer are all in hand.

        The same checks, in the same order, as ``_begin`` then ``_complete``, in one call
        (per-file Python is what a receiver of many small files spends its time on).
        """
        size = len(data)
        checked_int(mode, MODE_RANGE, "a put record's mode")  # the plain header's digits are bounded,
        checked_int(mtime_ns, INT64, "a put record's mtime")  # not their values
        self.puts += 1
        self.declared_bytes += size
        if self.max_bytes is not None and self.declared_bytes > self.max_bytes:
            raise StreamError(f"the files are over the size cap of {self.max_bytes} bytes at {path!r}")
        if tail == ABANDONED:
            self.abandoned.append((path, GIVEN_UP))
            return
        digest = hashlib.sha256(data).hexdigest()
        if tail[:HASH_HEX] != digest.encode("ascii") or tail[HASH_HEX:] != b"\n":
            self.errors.append((path, MISMATCH))
            return
        mode &= self.mode_mask
        try:
            check_relpath(path)
            if self.only is not None:
                self._check_asked(path)
            cut = path.rfind("/")
            if cut < 0:
                folder = self.dest
            elif path[:cut] in self._dirs:
                folder = self.dest + "/" + path[:cut]
            else:
                folder = self._parent(path, create=True)
        except PathRefused as e:
            self.errors.append((path, f"refused: {e}"))
            return
        except OSError as e:
            self.errors.append((path, f"cannot write: {e.strerror or e}"))
            return
        self._tmp_count += 1
        tmp = f"{folder}/{self._tmp_prefix}{self._tmp_count}"
        try:
            fd = _create(tmp, mode)
            try:
                while data:
                    data = data[os.write(fd, data) :]
            except BaseException:
                os.close(fd)
                _unlink_quietly(tmp)
                raise
            result = _finalize(
                fd,
                tmp,
                folder + "/" + path[cut + 1 :],
                mode,
                mtime_ns,
                bool(mode & self.umask),
                self.fsync,
                size,
                self._mtime_kept,
            )
        except OSError as e:
            self.errors.append((path, f"cannot put it in place: {e.strerror or e}"))
            return
        if not self._mtime_kept and mtime_ns >= 0 and result == (size, mtime_ns):
            self._mtime_kept = True
        self.written += 1
        self.bytes += size
        self.paths_written.append(path)
        if self.manifest is not None:
            self.manifest[path] = [digest, result[0], mode, result[1]]

    def _complete(self, data: memoryview, tail: bytes) -> None:
        """A put whose bytes and trailer are all in hand: check, then write and rename."""
        self._state = _HEADER
        if tail == ABANDONED:
            self.abandoned.append((self._path, GIVEN_UP))
            return
        digest = hashlib.sha256(data).hexdigest()
        if tail[:HASH_HEX] != digest.encode("ascii") or tail[HASH_HEX:] != b"\n":
            self.errors.append((self._path, MISMATCH))
            return
        if self._error:
            self.errors.append((self._path, self._error))
            return
        tmp = self._tmp_name()
        try:
            fd = _create(tmp, self._mode)
            try:
                while data:
                    data = data[os.write(fd, data) :]
            except BaseException:
                os.close(fd)
                _unlink_quietly(tmp)
                raise
            result = self._finalize(fd, tmp)
        except OSError as e:
            self.errors.append((self._path, f"cannot put it in place: {e.strerror or e}"))
            return
        self._done(digest, result)

    def _open(self) -> None:
        """A put whose bytes arrive over several chunks: written to a temporary file as they come."""
        self._hasher = hashlib.sha256()
        self._fd, self._tmp = -1, ""
        if not self._error:
            try:
                self._tmp = self._tmp_name()
                self._fd = _create(self._tmp, self._mode)
            except OSError as e:
                self._tmp = ""
                self._error = f"cannot write: {e.strerror or e}"
        self._state = _DATA if self._size else _TRAILER

    def _write(self, piece: memoryview) -> None:
        try:
            while piece:
                piece = piece[os.write(self._fd, piece) :]
        except OSError as e:
            self._error = f"write failed: {e.strerror or e}"
            self._discard()

    def _finish_streamed(self, tail: bytes) -> None:
        digest = self._hasher.hexdigest()
        if tail == ABANDONED:
            self._discard()
            self.abandoned.append((self._path, GIVEN_UP))
            return
        if tail[:HASH_HEX] != digest.encode("ascii") or tail[HASH_HEX:] != b"\n":
            self._discard()
            self.errors.append((self._path, MISMATCH))
            return
        if self._error:
            self._discard()
            self.errors.append((self._path, self._error))
            return
        fd, tmp = self._fd, self._tmp
        self._fd, self._tmp = -1, ""
        try:
            result = self._finalize(fd, tmp)
        except OSError as e:
            self.errors.append((self._path, f"cannot put it in place: {e.strerror or e}"))
            return
        self._done(digest, result)

    def _finalize(self, fd: int, tmp: str) -> tuple[int, int]:
        mode, mtime_ns = self._mode, self._mtime_ns
        chmod = bool(mode & self.umask)  # the umask took bits off at creation
        result = _finalize(
            fd, tmp, self._final, mode, mtime_ns, chmod, self.fsync, self._size, self._mtime_kept
        )
        if not self._mtime_kept and mtime_ns >= 0 and result == (self._size, mtime_ns):
            self._mtime_kept = True  # ns timestamps here: no need to read them back
        return result

    def _tmp_name(self) -> str:
        self._tmp_count += 1
        return f"{self._dir}/{self._tmp_prefix}{self._tmp_count}"

    def _done(self, digest: str, result: tuple[int, int]) -> None:
        self.written += 1
        self.bytes += self._size
        self.paths_written.append(self._path)
        if self.manifest is not None:
            self.manifest[self._path] = [digest, result[0], self._mode, result[1]]

    def _discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp:
            _unlink_quietly(self._tmp)
            self._tmp = ""

    def _delete(self, raw_path: Any) -> None:
        path = str(raw_path)
        if self.manifest is None:
            self.errors.append((path, "refused: deletions apply only to a synced folder"))
            return
        try:
            check_relpath(raw_path)
            entry = self.manifest.get(path)
            if entry is None:
                self.kept.append(path)  # not in the synced set: never ours to delete
                return
            parent = self._parent(path, create=False)
            final = os.path.join(parent, path.rsplit("/", 1)[-1])
            try:
                st = os.lstat(final)
            except FileNotFoundError:
                del self.manifest[path]
                return
            if stat.S_ISREG(st.st_mode) and st.st_size == entry[1] and st.st_mtime_ns == entry[3]:
                os.unlink(final)
                self.deleted += 1
                self._prune(path)
            else:
                self.kept.append(path)  # changed on the instance since it was synced
            del self.manifest[path]
        except PathRefused as e:
            self.errors.append((path, f"refused: {e}"))
        except FileNotFoundError:
            self.manifest.pop(path, None)
        except (OSError, IndexError, TypeError) as e:
            self.errors.append((path, f"cannot delete: {e}"))

    def _prune(self, path: str) -> None:
        """Remove the folders a deletion left empty (never DEST or anything above)."""
        parts = path.split("/")[:-1]
        while parts:
            rel = "/".join(parts)
            try:
                os.rmdir(os.path.join(self.dest, rel))
            except OSError:
                return
            self._dirs.discard(rel)
            parts.pop()

    def _check_asked(self, path: str) -> None:
        for asked in self.only or ():
            if path == asked or path.startswith(asked + "/"):
                return
        raise PathRefused("not among the paths asked for")

    def _parent(self, path: str, create: bool) -> str:
        """The real folder that holds ``path``; every part is checked to be a folder, not a link."""
        cut = path.rfind("/")
        if cut < 0:
            return self.dest
        rel = path[:cut]
        if rel in self._dirs:
            return self.dest + "/" + rel
        prefix = ""
        for part in rel.split("/"):
            prefix = part if not prefix else prefix + "/" + part
            if prefix in self._dirs:
                continue
            here = self.dest + "/" + prefix
            try:
                st = os.lstat(here)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(here)
                st = os.lstat(here)
            if stat.S_ISLNK(st.st_mode):
                raise PathRefused(f"{prefix} is a symlink")
            if not stat.S_ISDIR(st.st_mode):
                raise PathRefused(f"{prefix} is not a folder")
            self._dirs.add(prefix)
        return self.dest + "/" + rel

    def summary(self) -> dict[str, Any]:
        return {
            "ok": not self.errors,
            "written": self.written,
            "bytes": self.bytes,
            "deleted": self.deleted,
            "kept": self.kept[:LIST_LIMIT],
            "kept_count": len(self.kept),
            "skipped": [list(s) for s in self.skipped[:LIST_LIMIT]],
            "skipped_count": len(self.skipped),
            "abandoned": [list(a) for a in self.abandoned[:LIST_LIMIT]],
            "abandoned_count": len(self.abandoned),
            "errors": [list(e) for e in self.errors[:LIST_LIMIT]],
            "error_count": len(self.errors),
        }


_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _create(tmp: str, mode: int) -> int:
    try:
        return os.open(tmp, _OPEN_FLAGS, mode)
    except FileExistsError:  # left by a killed receiver that had the same pid
        _unlink_quietly(tmp)
        return os.open(tmp, _OPEN_FLAGS, mode)


def _finalize(
    fd: int, tmp: str, final: str, mode: int, mtime_ns: int, chmod: bool, fsync: bool, size: int, trust: bool
) -> tuple[int, int]:
    """Set mode and mtime, close, rename into place; (size, mtime_ns) as on disk. Closes ``fd``.

    ``trust``: the filesystem keeps the mtime as set (checked on the first file), so
    the fstat that would read it back is skipped.
    """
    try:
        try:
            if chmod:
                os.fchmod(fd, mode)
            if mtime_ns >= 0:
                if _UTIME_FD:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
                else:
                    os.utime(tmp, ns=(mtime_ns, mtime_ns))
            if fsync:
                os.fsync(fd)
            if trust and mtime_ns >= 0:
                result = (size, mtime_ns)
            else:
                st = os.fstat(fd)
                result = (st.st_size, st.st_mtime_ns)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return result


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# --- the manifest -----------------------------------------------------------------------


def manifest_path(dest: str, name: str = MANIFEST_NAME) -> str:
    return os.path.join(dest, MANIFEST_DIR, name)


def _read_manifest(dest: str, name: str) -> tuple[dict[str, Any], bytes] | None:
    """The manifest's header (version, boot id) and its files line, unparsed."""
    try:
        with open(manifest_path(dest, name), "rb") as f:
            header_line = f.readline()
            files_line = f.read().strip()
        header = json.loads(header_line.decode("utf-8"))
        if not isinstance(header, dict) or header.get("version") != MANIFEST_VERSION:
            return None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return header, files_line


def load_manifest(dest: str, name: str = MANIFEST_NAME) -> dict[str, list[Any]]:
    """The synced set recorded in DEST, checked against the files (see ``current_manifest``)."""
    return current_manifest(dest, name)[0]


def current_manifest(dest: str, name: str = MANIFEST_NAME) -> tuple[dict[str, list[Any]], bytes | None]:
    """The synced set as it is now, and the stored files line when that is still exact.

    Empty if there is none (or it is unreadable). A file that is gone is dropped; one
    whose size or mtime changed since it was written (the job edited it) gets an empty
    hash, so the controller sends it again. After a reboot every file is hashed again
    (writes are not fsynced, so a crash may have lost some).
    """
    raw = _read_manifest(dest, name)
    if raw is None:
        return {}, None
    header, files_line = raw
    try:
        files = check_manifest(json.loads(files_line))
    except (ValueError, StreamError, RecursionError):  # damaged: everything is sent again
        return {}, None
    if header.get("boot_id") != boot_id():
        files = _reverify(dest, files)
        save_manifest(dest, files, name)
        return files, None
    exact = True
    for path in list(files):
        entry = files[path]
        try:
            st = os.lstat(os.path.join(dest, path))
        except OSError:
            del files[path]
            exact = False
            continue
        try:
            if not stat.S_ISREG(st.st_mode) or st.st_size != entry[1] or st.st_mtime_ns != entry[3]:
                entry[0] = ""
                exact = False
        except (IndexError, TypeError):
            del files[path]
            exact = False
    return files, (files_line if exact else None)


def print_manifest(dest: str, name: str, out: IO[bytes]) -> dict[str, list[Any]]:
    """Write ``{"version": 1, "files": {...}}`` and a newline; return the files."""
    files, line = current_manifest(dest, name) if os.path.isdir(dest) else ({}, None)
    if line is None:
        line = json.dumps(files, separators=(",", ":")).encode("utf-8")
    out.write(b'{"version":%d,"files":' % MANIFEST_VERSION + line + b"}\n")
    out.flush()
    return files


def _reverify(dest: str, files: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """After a reboot writes may have been lost: describe each file as it is now."""
    checked: dict[str, list[Any]] = {}
    for path, entry in files.items():
        full = os.path.join(dest, path)
        try:
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                continue
            checked[path] = [sha256_file(full), st.st_size, entry[2], st.st_mtime_ns]
        except (OSError, IndexError, TypeError):
            continue
    return checked


def save_manifest(
    dest: str, files: dict[str, list[Any]], name: str = MANIFEST_NAME, fsync: bool = False
) -> None:
    """Replace the manifest atomically (temporary file, then rename).

    Two JSON lines: a header (version, the boot id it was written under) and the files
    (path -> [sha256, size, mode, mtime_ns]), so that ``--print-manifest`` can send the
    files line without parsing it.
    """
    folder = os.path.join(dest, MANIFEST_DIR)
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, name)
    tmp = f"{final}.{os.getpid()}.tmp"
    header = json.dumps({"version": MANIFEST_VERSION, "boot_id": boot_id()}, separators=(",", ":"))
    body = json.dumps(files, separators=(",", ":"))
    with open(tmp, "wb") as f:
        f.write(header.encode("utf-8") + b"\n" + body.encode("utf-8") + b"\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.rename(tmp, final)


# --- the command ------------------------------------------------------------------------


def _stdin_pipe_bigger(fd: int) -> None:
    """A 1 MiB stdin pipe means fewer, larger reads (Linux; harmless elsewhere)."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), READ_SIZE)
    except (ImportError, OSError, ValueError):
        pass


@contextlib.contextmanager
def _locked(dest: str) -> Iterator[None]:
    """One receiver at a time per DEST (its manifest is read, then replaced)."""
    folder = os.path.join(dest, MANIFEST_DIR)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:
            pass
        yield
    finally:
        os.close(fd)


def receive(
    dest: str,
    manifest_name: str,
    fsync: bool,
    handshake: bool = False,
    stdin_fd: int = 0,
    out: IO[bytes] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Apply the stream on ``stdin_fd`` to ``dest``; (exit status, summary).

    ``handshake``: first write the manifest on ``out`` (so the sender plans without
    another round trip); a stream that is then empty means "nothing to do".
    """
    os.makedirs(dest, exist_ok=True)
    with _locked(dest):
        if handshake:
            manifest = print_manifest(dest, manifest_name, out or sys.stdout.buffer)
        else:
            manifest = load_manifest(dest, manifest_name)
        receiver = StreamReceiver(dest, manifest=manifest, fsync=fsync)
        stream_error = ""
        received = 0
        try:
            _stdin_pipe_bigger(stdin_fd)
            while True:
                data = os.read(stdin_fd, READ_SIZE)
                if not data:
                    break
                received += len(data)
                receiver.feed(data)
            if handshake and received == 0:
                return 0, dict(receiver.summary(), cancelled=True)
            receiver.finish()
        except StreamError as e:
            stream_error = str(e)
        finally:
            receiver.close()
            if received:
                save_manifest(dest, manifest, manifest_name, fsync=fsync)
    summary = receiver.summary()
    if stream_error:
        summary["ok"] = False
        summary["stream_error"] = stream_error
    summary["manifest_files"] = len(manifest)
    return (0 if summary["ok"] else 1), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloudtrain_agent.receive", description=__doc__.split("\n")[0])
    parser.add_argument("--dest", required=True, help="the folder to apply the stream to")
    parser.add_argument("--manifest", default=MANIFEST_NAME, help="manifest file name under DEST/.cloudtrain")
    parser.add_argument("--print-manifest", action="store_true", help="print the manifest and exit")
    parser.add_argument("--fsync", action="store_true", help="fsync every file and the manifest")
    parser.add_argument("--handshake", action="store_true", help="print the manifest, then receive")
    args = parser.parse_args(argv)
    if "/" in args.manifest or args.manifest in ("", ".", ".."):
        parser.error("--manifest is a file name, not a path")
    out = sys.stdout
    if args.print_manifest:
        print_manifest(args.dest, args.manifest, out.buffer)
        return 0
    try:
        code, summary = receive(args.dest, args.manifest, args.fsync, args.handshake, out=out.buffer)
    except (OSError, PathRefused) as e:
        code, summary = 1, {"ok": False, "stream_error": f"cannot receive into {args.dest}: {e}"}
    out.write(json.dumps(summary, separators=(",", ":")))
    out.write("\n")
    if code:
        problems = [f"{p}: {why}" for p, why in summary.get("errors", [])]
        if summary.get("stream_error"):
            problems.insert(0, str(summary["stream_error"]))
        sys.stderr.write("cloudtrain receive failed: {}\n".format("; ".join(problems)[:4000]))
    return code


if __name__ == "__main__":
    sys.exit(main())
