"""Masking secret values in a byte stream that arrives in pieces (a training log as it is written).

The supervisor writes the job's output to train.log through a ``LogRedactor``, so no
copy of the log (the instance's disk, S3, the run folder at home) ever holds a value
of the job's ``secrets:``. Python 3.7+, standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable

MIN_MASKED_LEN = 4  # shorter values would blot out ids and times, and hide nothing


def secret_values(values: Iterable[str]) -> tuple[str, ...]:
    """The values to mask, longest first (a secret that holds another goes whole)."""
    return tuple(sorted({v for v in values if len(v) >= MIN_MASKED_LEN}, key=lambda v: (-len(v), v)))


class LogRedactor:
    """Masks secret values in bytes that arrive in pieces.

    Each value becomes as many ``*`` as it has bytes: the masked log is exactly as long
    as the job's output, so byte offsets into it stay true. A secret split between two
    pieces is still caught: the end of a piece that could begin one is held back until
    the next piece, or ``flush()`` at the stream's end."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.values = [v.encode("utf-8") for v in secret_values(secrets)]
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        """What of ``pending + data`` can be passed on now, masked."""
        if not self.values:
            return data
        data = self.pending + data
        for value in self.values:
            data = data.replace(value, b"*" * len(value))
        held = 0
        for size in range(min(len(data), max(len(v) for v in self.values) - 1), 0, -1):
            tail = data[-size:]
            if any(v.startswith(tail) for v in self.values):
                held = size
                break
        self.pending = data[len(data) - held :]
        return data[: len(data) - held]

    def flush(self) -> bytes:
        """The bytes held back (a secret's beginning, not a whole one)."""
        data, self.pending = self.pending, b""
        return data
