"""Reduce progress bars redrawn in place (``\\r``, ``\\b``) to the final state of each bar.

Keras 3 with ``verbose=1`` always redraws its bar in place on posix, even into a pipe or a
file: each update writes ``"\\b" * previous_width + "\\r" + bar``, and the epoch's last update
ends with ``"\\n"``. A pulled log then holds one "line" of thousands of characters per epoch.
This module keeps, in saved logs and in non-terminal output, only what a terminal would
finally show of each such line:

* :func:`final_states` for a whole text;
* :class:`BarFilter` for a live byte stream split at arbitrary points;
* :func:`collapse_file` to rewrite a log file in place, streaming.

The rule, per line (split on ``"\\n"``): the line's text is split on ``"\\r"`` into segments,
backspaces are removed from each, and the line becomes the last segment that is not empty (or
an empty line when none is). So ``"\\rbar 1\\rbar 2\\n"`` becomes ``"bar 2\\n"``, and a
carriage return that nothing follows blanks nothing: a line ending in ``"\\r\\n"`` keeps its
text, and its ``"\\r\\n"``. A line with no ``"\\r"`` or ``"\\b"`` is kept byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["BarFilter", "collapse_file", "final_states"]

_CR = b"\r"
_BS = b"\b"
_NL = b"\n"


def _no_bs(data: bytes) -> bytes:
    return data.replace(_BS, b"") if _BS in data else data


def _whole_utf8(data: bytes) -> bytes:
    """``data`` less an incomplete UTF-8 sequence at its end (a bar caught mid-character)."""
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last sequence's lead byte (or an ASCII byte)
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return data[:-back] if need > back else data
    return data


class BarFilter:
    """Streaming form of :func:`final_states`, for output shown while it arrives.

    :meth:`feed` returns what may be shown now: the text of a line is passed on as soon as it
    arrives while that line has had no ``"\\r"``; once it has, only the text after the last
    ``"\\r"`` is held (each later ``"\\r"`` replaces it, unless nothing follows that one) and is
    passed on with the line's ``"\\n"``. Text before a line's first ``"\\r"`` has already been
    passed on by then, so it stays; Keras writes none (its bars start each line with
    ``"\\r"``), and for such input everything :meth:`feed` and :meth:`flush` return, however
    the input was split, adds up to ``final_states(input)``.

    Memory stays bounded by the length of one bar: a bar redrawn for hours keeps only its
    latest state (and the previous one, while the latest is still empty).
    """

    def __init__(self) -> None:
        self._in_bar = False  # the unfinished line has had a "\r"
        self._lead = 0  # bytes passed on of the unfinished line before its first "\r"
        self._done = b""  # the line's last complete non-empty segment after its first "\r"
        self._cur = bytearray()  # the segment after the line's last "\r", "\b" removed
        self._ends_cr = False  # the last byte of the unfinished line was "\r"

    @property
    def pending(self) -> str:
        """The bar now in progress (what a terminal would show of the unfinished line after its
        last carriage return), ``""`` when there is none."""
        if not self._in_bar:
            return ""
        shown = _whole_utf8(bytes(self._cur)) or self._done
        return shown.decode("utf-8", errors="replace")

    def feed(self, data: bytes) -> bytes:
        """The part of the stream that may be shown now, ``data`` being its next piece."""
        out = bytearray()
        self._feed(data, out)
        return bytes(out)

    def flush(self) -> bytes:
        """What is held at the end of the stream: the final state of an unfinished line."""
        out = bytearray()
        self._finish(out)
        return bytes(out)

    def _finish(self, out: bytearray) -> None:
        if self._in_bar:
            self._end_line(out, b"")
        self._reset()

    def _reset(self) -> None:
        self._in_bar = False
        self._lead = 0
        self._done = b""
        self._cur = bytearray()
        self._ends_cr = False

    def _feed(self, data: bytes, out: bytearray) -> None:
        pos, size = 0, len(data)
        while pos < size:
            if not self._in_bar:
                # Whole lines without "\r" go out in one piece, up to the next "\r".
                cr = data.find(_CR, pos)
                stop = size if cr < 0 else cr
                nl = data.rfind(_NL, pos, stop)
                if nl >= 0:
                    out += _no_bs(data[pos : nl + 1])
                    self._lead = 0
                    pos = nl + 1
                text = _no_bs(data[pos:stop])
                out += text
                self._lead += len(text)
                if cr < 0:
                    return
                self._in_bar = True
                self._ends_cr = True
                pos = cr + 1
            else:
                nl = data.find(_NL, pos)
                stop = size if nl < 0 else nl
                self._take(data[pos:stop])
                if nl < 0:
                    return
                self._end_line(out, b"\r\n" if self._ends_cr else b"\n")
                self._reset()
                pos = nl + 1

    def _take(self, text: bytes) -> None:
        """Takes the next ``text`` (no ``"\\n"``) of a line that has had a ``"\\r"``."""
        if not text:
            return
        self._ends_cr = text.endswith(_CR)
        last = text.rfind(_CR)
        if last < 0:
            self._cur += _no_bs(text)
            return
        # The segments completed here: the current one (continued up to text's first "\r"),
        # then those between text's carriage returns. Keep the last non-empty one.
        end = last
        while True:
            start = text.rfind(_CR, 0, end)
            segment = _no_bs(text[start + 1 : end])
            if start < 0:
                self._cur += segment
                if self._cur:
                    self._done = bytes(self._cur)
                break
            if segment:
                self._done = segment
                break
            end = start
        self._cur = bytearray(_no_bs(text[last + 1 :]))

    def _end_line(self, out: bytearray, ending: bytes) -> None:
        state = bytes(self._cur) or self._done
        if state:
            self._drop_lead(out)
            out += state
        out += ending

    def _drop_lead(self, out: bytearray) -> None:
        """The line's text before its first ``"\\r"`` was passed on; here it stays."""


class _Collapser(BarFilter):
    """:class:`BarFilter` that takes back the text before a line's first ``"\\r"`` when a later
    segment replaces it (exactly :func:`final_states`). The text taken back is the last
    ``_lead`` bytes passed on; those no longer in ``out`` (passed on by an earlier call) are
    counted in ``taken_back`` for the caller to remove."""

    def __init__(self) -> None:
        super().__init__()
        self.taken_back = 0

    def _drop_lead(self, out: bytearray) -> None:
        if self._lead <= len(out):
            del out[len(out) - self._lead :]
        else:
            self.taken_back += self._lead - len(out)
            out.clear()
        self._lead = 0


def final_states(data: bytes) -> bytes:
    """``data`` with each line reduced to the final state of the bar drawn on it (see the module
    docstring); lines with no ``"\\r"`` or ``"\\b"`` are kept byte for byte."""
    if _CR not in data and _BS not in data:
        return data
    collapser = _Collapser()
    out = bytearray()
    collapser._feed(data, out)
    collapser._finish(out)
    return bytes(out)


def collapse_file(path: Path, chunk: int = 1 << 20) -> None:
    """Rewrites the log file at ``path`` in place with :func:`final_states`, reading ``chunk``
    bytes at a time (the whole file is never in memory) into a temporary file in the same
    folder that then replaces it, with the same mode. A file with no ``"\\r"`` or ``"\\b"`` is
    left untouched (not rewritten), as is one the rule leaves as it is; a missing file is a
    no-op."""
    path = Path(path)
    try:
        src = path.open("rb")
    except FileNotFoundError:
        return
    with src:
        while True:
            block = src.read(chunk)
            if not block:
                return  # nothing to collapse
            if _CR in block or _BS in block:
                break
        src.seek(0)
        mode = stat.S_IMODE(os.fstat(src.fileno()).st_mode)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".collapse", dir=path.parent)
        try:
            with os.fdopen(fd, "w+b") as dst:
                collapser = _Collapser()
                read = 0
                while True:
                    block = src.read(chunk)
                    read += len(block)
                    out = bytearray()
                    if block:
                        collapser._feed(block, out)
                    else:
                        collapser._finish(out)
                    if collapser.taken_back:  # text of a line written by an earlier chunk
                        dst.truncate(dst.tell() - collapser.taken_back)
                        dst.seek(0, os.SEEK_END)
                        collapser.taken_back = 0
                    dst.write(out)
                    if not block:
                        break
                # The result only ever drops bytes: the same length means the same content.
                unchanged = dst.tell() == read
            if unchanged:
                os.unlink(tmp)
                return
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
