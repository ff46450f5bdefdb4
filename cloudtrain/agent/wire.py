"""The cloudtrain file stream's wire format, shared by both ends: the senders (the
controller's sync, the agent's ``pack`` for pull-back) and the receivers (the agent's
``receive``, the controller's pull).

The stream (written by the controller's sync, and by ``pack`` for pull-back) is:

    MAGIC                                  b"CLOUDTRAIN-STREAM 1\\n"
    then records, each a JSON header line:
      {"op":"put","path":P,"size":N,"mode":M,"mtime_ns":T}\\n  N raw bytes, then a
          65-byte trailer: the sha256 of those bytes in hex and "\\n" (64 "-" instead:
          the sender gave the file up, e.g. it shrank while being read)
      {"op":"delete","path":P}\\n          remove P if it is in the synced set
      {"op":"skip","path":P,"reason":R}\\n  the sender left P out (pack only)
      {"op":"end","files":N,"bytes":B,...}\\n  the last record; without it the stream
          was cut short

The hash follows the bytes so that the sender reads each file once, hashing as it
sends; the receiver hashes as it writes and checks the trailer: no second pass.

Every number and path read off the wire is checked here before use. Standard library
only, Python 3.7+.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Iterator

MAGIC = b"CLOUDTRAIN-STREAM 1\n"
HASH_HEX = 64
TRAILER_LEN = HASH_HEX + 1
ABANDONED = b"-" * HASH_HEX + b"\n"
MAX_HEADER = 1 << 16
MANIFEST_DIR = ".cloudtrain"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
READ_SIZE = 1 << 20
SMALL_RECORD = 1 << 16  # a file up to this size goes out as one piece


class StreamError(Exception):
    """The stream is malformed, over its size cap, or cut short: nothing more can be read."""


class PathRefused(Exception):
    """A path that must not be written or deleted (escapes DEST, symlinked parent, ...)."""


# Every number read off the wire is checked against its range before use: os.utime of an
# mtime past 64 bits overflows, a mode is permission bits.
INT64 = (-(2**63), 2**63 - 1)
SIZE_RANGE = (0, 2**63 - 1)
MODE_RANGE = (0, 0o7777)
HEX64 = re.compile(r"[0-9a-f]{64}").fullmatch


def checked_int(value: Any, bounds: tuple[int, int], what: str) -> int:
    """``value`` if it is a whole number (not a bool) within ``bounds``, else StreamError."""
    if type(value) is not int or not bounds[0] <= value <= bounds[1]:
        raise StreamError(f"{what} {shown(value)} is not a whole number from {bounds[0]} to {bounds[1]}")
    return value


def shown(value: Any, limit: int = 300) -> str:
    """A value from the wire, safe to print: text as it is (a lone surrogate escaped), anything
    else as its ASCII repr; cut short."""
    if isinstance(value, str):
        text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    else:
        text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_manifest(files: Any) -> dict[str, list[Any]]:
    """A manifest's files as read from the wire (or a disk the job can write): a mapping of
    clean relative paths to [sha256 hex or "", size, mode, mtime_ns]; else StreamError."""
    if not isinstance(files, dict):
        raise StreamError(f"the manifest's files are not a mapping: {shown(files)}")
    for path, entry in files.items():
        try:
            check_relpath(path)
        except PathRefused as e:
            raise StreamError(f"the manifest names {shown(path)}: {e}") from None
        if not isinstance(entry, list) or len(entry) != 4:
            raise StreamError(f"the manifest's entry for {shown(path)} is not [sha256, size, mode, mtime]")
        digest, size, mode, mtime_ns = entry
        if not isinstance(digest, str) or not (digest == "" or HEX64(digest)):
            raise StreamError(f"the manifest's sha256 for {shown(path)} is {shown(digest)}")
        checked_int(size, SIZE_RANGE, f"the manifest's size for {shown(path)}")
        checked_int(mode, MODE_RANGE, f"the manifest's mode for {shown(path)}")
        checked_int(mtime_ns, INT64, f"the manifest's mtime for {shown(path)}")
    return files


# --- encoding (used by the senders: the controller's sync and pack) ------------------------


_json_str = json.encoder.encode_basestring_ascii
# a put header exactly as put_header writes it, with a plain path (printable ASCII, no
# quote or backslash: the same text as JSON would decode); any other header is parsed as JSON
PLAIN_PUT = re.compile(
    rb'\{"op":"put","path":"([\x20\x21\x23-\x5b\x5d-\x7e]+)","size":(\d{1,18}),"mode":(\d{1,9}),"mtime_ns":(-?\d{1,19})\}'
).fullmatch  # bounded numbers: int() of a huge digit string is slow, or refused


def _header(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


def put_header(path: str, size: int, mode: int, mtime_ns: int) -> bytes:
    # formatted by hand: json.dumps of a dict costs more than reading a small file
    return b'{"op":"put","path":%s,"size":%d,"mode":%d,"mtime_ns":%d}\n' % (
        _json_str(path).encode("ascii"),
        size,
        mode,
        mtime_ns,
    )


def delete_header(path: str) -> bytes:
    return _header({"op": "delete", "path": path})


def skip_header(path: str, reason: str) -> bytes:
    return _header({"op": "skip", "path": path, "reason": reason})


def end_header(**totals: Any) -> bytes:
    record = {"op": "end"}
    record.update(totals)
    return _header(record)


def trailer(hex_digest: str) -> bytes:
    return hex_digest.encode("ascii") + b"\n"


def check_relpath(path: Any) -> str:
    """``path`` if it is a clean relative POSIX path (no '', '.', '..' parts); else PathRefused."""
    if not isinstance(path, str) or not path:
        raise PathRefused("empty or non-text path")
    if "\x00" in path:
        raise PathRefused("path contains a NUL byte")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise PathRefused("path is not valid UTF-8 text (a lone surrogate)") from None
    if path.startswith("/"):
        raise PathRefused("absolute path")
    parts = path.split("/")
    if "" in parts or "." in parts or ".." in parts:
        raise PathRefused("'..', '.' or an empty part in the path")
    if parts[0] == MANIFEST_DIR:
        raise PathRefused(f"{MANIFEST_DIR} is cloudtrain's own folder")
    return path


class FileReader:
    """Reads one file for a put record, hashing as it goes.

    ``chunks()`` yields exactly ``size`` bytes (zero-padded if the file shrank, in which
    case ``abandoned`` is set and the trailer says so); afterwards ``trailer()`` is the
    record's last 65 bytes, ``sha256`` the digest (None if abandoned) and ``changed``
    whether the file changed while it was read (size or mtime differ from ``size`` and
    ``mtime_ns``). The yielded views share one buffer: use each before the next.
    """

    def __init__(self, source: str, size: int, mtime_ns: int, buffer: bytearray | None = None) -> None:
        self.source = source
        self.size = size
        self.mtime_ns = mtime_ns
        self.buffer = buffer if buffer is not None else bytearray(READ_SIZE)
        self.sha256: str | None = None
        self.changed = False
        self.abandoned = ""  # why the sender gave the file up

    def chunks(self) -> Iterator[bytes | memoryview]:
        hasher = hashlib.sha256()
        left = self.size
        try:
            fd = os.open(self.source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            self.abandoned = f"cannot open: {e.strerror or e}"
            yield from _zeros(left, self.buffer)
            return
        try:
            if left <= len(self.buffer):
                data = os.read(fd, left + 1)  # one read (and one more byte: did it grow?)
                if len(data) == left:
                    hasher.update(data)
                    left = 0
                    yield data
                elif len(data) > left:
                    self.changed = True
                    piece = data[:left]
                    hasher.update(piece)
                    left = 0
                    yield piece
                else:
                    hasher.update(data)
                    yield data
                    left -= len(data)
            view = memoryview(self.buffer)
            while left > 0:
                n = os.readv(fd, [view[: min(left, len(view))]])
                if n == 0:
                    break
                hasher.update(view[:n])
                left -= n
                yield view[:n]
            if left > 0:
                self.abandoned = "shrank while being read"
                yield from _zeros(left, self.buffer)
                return
            after = os.fstat(fd)
            if after.st_size != self.size or after.st_mtime_ns != self.mtime_ns:
                self.changed = True
        except OSError as e:
            self.abandoned = f"read failed: {e.strerror or e}"
            yield from _zeros(left, self.buffer)
            return
        finally:
            os.close(fd)
        self.sha256 = hasher.hexdigest()

    def trailer(self) -> bytes:
        return ABANDONED if self.abandoned or self.sha256 is None else trailer(self.sha256)

    def record(self, path: str, mode: int) -> Iterator[bytes | memoryview]:
        """The whole put record; a small file's as one piece (header, bytes and trailer)."""
        header = put_header(path, self.size, mode, self.mtime_ns)
        if self.size > SMALL_RECORD:
            yield header
            yield from self.chunks()
            yield self.trailer()
            return
        body = b"".join(self.chunks())
        yield header + body + self.trailer()


def _zeros(count: int, buffer: bytearray) -> Iterator[memoryview]:
    view = memoryview(buffer)
    clear = min(count, len(view))
    view[:clear] = bytes(clear)  # the buffer may hold file data
    while count > 0:
        n = min(count, len(view))
        yield view[:n]
        count -= n
