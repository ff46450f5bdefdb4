"""cloudtrain.logbars: progress bars redrawn in place reduced to their final states, on real
Keras logs (tests/data/keras-bars, see its README.txt) and on made-up input."""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudtrain.logbars import BarFilter, collapse_file, final_states

DATA = Path(__file__).parent / "data" / "keras-bars"
KERAS3 = DATA / "keras3-fit.log"
KERAS2 = DATA / "keras2-fit.log"


def losses(log: Path) -> list[str]:
    """The per-epoch losses Keras recorded in its History when the sample was made."""
    recorded: list[str] = json.loads(log.with_suffix(".losses.json").read_text())["loss"]
    return recorded


def reference(data: bytes) -> bytes:
    """The rule, written the plain way: per line, the last segment between carriage returns
    that is not empty once its backspaces are gone; a line's "\\r\\n" is kept."""
    parts = data.split(b"\n")
    out = []
    for i, part in enumerate(parts):
        segments = [s.replace(b"\b", b"") for s in part.split(b"\r")]
        text = next((s for s in reversed(segments) if s), b"")
        ending = b"" if i == len(parts) - 1 else b"\r\n" if part.endswith(b"\r") else b"\n"
        out.append(text + ending)
    return b"".join(out)


def streamed(data: bytes, cuts: list[int]) -> bytes:
    """Everything a BarFilter returns for ``data`` fed in pieces split at ``cuts``."""
    bars = BarFilter()
    bounds = [0, *sorted(cuts), len(data)]
    shown = [bars.feed(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return b"".join(shown) + bars.flush()


def one_byte_at_a_time(data: bytes) -> bytes:
    return streamed(data, list(range(1, len(data))))


# --- The real samples -------------------------------------------------------------------


def test_keras3_sample_is_a_genuine_redrawn_bar() -> None:
    raw = KERAS3.read_bytes()
    lines = raw.split(b"\n")
    assert lines[0] == b"Epoch 1/3"
    # Each epoch's bar is one "line" of several redraws: "\b" * width + "\r" + bar.
    bar_lines = [line for line in lines if b"\r" in line]
    assert len(bar_lines) == 3
    for line in bar_lines:
        assert line.startswith(b"\r")
        assert line.count(b"\r") >= 3
        assert b"\b\r" in line


def test_keras3_sample_collapses_to_one_line_per_epoch() -> None:
    collapsed = final_states(KERAS3.read_bytes())
    assert b"\r" not in collapsed and b"\b" not in collapsed
    text = collapsed.decode("utf-8")
    lines = text.split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert len(lines) == 6
    for epoch, loss in enumerate(losses(KERAS3), start=1):
        header, bar = lines[2 * epoch - 2 : 2 * epoch]
        assert header == f"Epoch {epoch}/3"
        plain = re.sub(r"\x1b\[[0-9;]*m", "", bar)
        assert plain.startswith("25/25 ")
        assert plain.endswith(f" - loss: {loss}")
        assert plain.count("/25") == 1  # one state of the bar, not several
    assert len(collapsed) < len(KERAS3.read_bytes()) / 4


def test_keras2_sample_without_a_tty_has_nothing_to_collapse() -> None:
    """Keras 2 redraws in place only on a tty; into a pipe or file it starts each update
    with "\\n" instead: one line per update (and a blank line after "Epoch i/n")."""
    raw = KERAS2.read_bytes()
    assert b"\r" not in raw and b"\b" not in raw
    assert final_states(raw) == raw
    assert one_byte_at_a_time(raw) == raw
    text = raw.decode("ascii")
    for epoch, loss in enumerate(losses(KERAS2), start=1):
        block = text.split(f"Epoch {epoch}/3\n", 1)[1].split("Epoch", 1)[0]
        updates = block.split("\n")
        assert updates[0] == ""  # the "\n" written before the first update
        assert len(updates) >= 4
        assert updates[-2].startswith("200/200 [==============================]")
        assert updates[-2].endswith(f" - loss: {loss}")


@pytest.mark.parametrize("log", [KERAS3, KERAS2], ids=["keras3", "keras2"])
def test_real_sample_streamed_is_the_same_split_anywhere(log: Path) -> None:
    raw = log.read_bytes()
    expected = final_states(raw)
    for cut in range(len(raw) + 1):
        assert streamed(raw, [cut]) == expected, cut
    assert one_byte_at_a_time(raw) == expected
    assert streamed(raw, list(range(7, len(raw), 7))) == expected


def test_real_sample_pending_shows_the_bar_in_progress() -> None:
    raw = KERAS3.read_bytes()
    second_redraw = raw.index(b"\r", raw.index(b"\r") + 1)
    epoch_end = raw.index(b"\nEpoch 2/3")
    bars = BarFilter()
    assert bars.feed(raw[: second_redraw + 60]) == b"Epoch 1/3\n"
    assert "6/25" in bars.pending  # part of the second redraw, as far as it has come
    assert bars.feed(raw[second_redraw + 60 : epoch_end]) == b""
    final = bars.pending
    plain = re.sub(r"\x1b\[[0-9;]*m", "", final)
    assert plain.startswith("25/25 ") and plain.endswith(f" - loss: {losses(KERAS3)[0]}")
    assert bars.feed(b"\n") == final.encode() + b"\n"
    assert bars.pending == ""


# --- final_states ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", b""),
        (b"plain text\nno bars here\n", b"plain text\nno bars here\n"),
        (b"no newline at the end", b"no newline at the end"),
        (b"\xff\xfe not utf-8 \x00\n", b"\xff\xfe not utf-8 \x00\n"),
        (b"\rbar 1\rbar 2\rbar 3\n", b"bar 3\n"),
        (b"\rbar 1\b\b\b\b\b\rbar 2\n", b"bar 2\n"),
        (b"Epoch 1/3\n\rbar 1\b\b\b\b\b\rbar 2\nEpoch 2/3\n", b"Epoch 1/3\nbar 2\nEpoch 2/3\n"),
        (b"\rbar 1\rbar 2", b"bar 2"),  # a last line without "\n"
        (b"text\rbar", b"bar"),
        (b"text\r", b"text"),  # a "\r" that nothing follows blanks nothing
        (b"text\r\r\r", b"text"),
        (b"text\rbar\r\b\b\b\n", b"bar\n"),
        (b"line one\r\nline two\r\n", b"line one\r\nline two\r\n"),  # CRLF
        (b"\rbar 1\rbar 2\r\n", b"bar 2\r\n"),
        (b"windows\r\nbar\rbar 2\r\nend", b"windows\r\nbar 2\r\nend"),
        (b"\r\n\r\n", b"\r\n\r\n"),
        (b"\r\r\n", b"\r\n"),
        (b"\n\n", b"\n\n"),
        (b"\b\b\n", b"\n"),
        (b"ab\bc\n", b"abc\n"),  # backspaces are removed, not applied
        ("\r5/9 ━━━\r9/9 ━━━━━━ é\n".encode(), "9/9 ━━━━━━ é\n".encode()),
    ],
)
def test_final_states(data: bytes, expected: bytes) -> None:
    assert final_states(data) == expected
    assert reference(data) == expected


def test_final_states_keeps_clean_text_the_same_object() -> None:
    data = b"no bars\n" * 1000
    assert final_states(data) is data


BYTES = st.lists(
    st.sampled_from([b"a", b"b", b" ", b"\r", b"\b", b"\n", b"\r\n", "\u2501".encode()]), max_size=60
)


@given(BYTES)
def test_final_states_is_the_rule(parts: list[bytes]) -> None:
    data = b"".join(parts)
    collapsed = final_states(data)
    assert collapsed == reference(data)
    assert final_states(collapsed) == collapsed


# --- BarFilter ------------------------------------------------------------------------

SEGMENT = st.lists(
    st.sampled_from([b"x", b"7", b"/", b" ", b"\b", "\u2501".encode(), b"\xe9"]), max_size=8
).map(b"".join)


@st.composite
def keras_like(draw: st.DrawFn) -> bytes:
    """Lines of plain text (no "\\r") and bar lines with no text before their first "\\r"
    (backspaces at most), each redraw "\\b" * n + "\\r" + state; the last line may lack its "\\n"."""
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            line = draw(SEGMENT)
        else:
            line = b"\b" * draw(st.integers(0, 3)) + b"\r" + b"\r".join(draw(st.lists(SEGMENT, max_size=5)))
        lines.append(line + draw(st.sampled_from([b"\n", b"\r\n"])))
    if draw(st.booleans()) and lines:
        lines[-1] = lines[-1].rstrip(b"\n")  # a last line without "\n" (or with a "\r" only)
    return b"".join(lines)


@given(keras_like(), st.data())
def test_streamed_equals_final_states_for_keras_like_input(data: bytes, draw: st.DataObject) -> None:
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=10))
    assert streamed(data, cuts) == final_states(data)


@given(BYTES, st.data())
def test_streamed_output_does_not_depend_on_the_split(parts: list[bytes], draw: st.DataObject) -> None:
    data = b"".join(parts)
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=10))
    assert streamed(data, cuts) == streamed(data, [])
    assert one_byte_at_a_time(data) == streamed(data, [])


def test_text_before_a_lines_first_cr_is_shown_at_once() -> None:
    """What a live display cannot take back: it stays, followed by the bar's final state."""
    bars = BarFilter()
    assert bars.feed(b"loading") == b"loading"
    assert bars.feed(b"\r50%\r100%") == b""
    assert bars.feed(b"\n") == b"100%\n"
    assert final_states(b"loading\r50%\r100%\n") == b"100%\n"


def test_plain_text_is_shown_as_it_arrives() -> None:
    bars = BarFilter()
    assert bars.feed(b"Epoch 1/3\nhalf a li") == b"Epoch 1/3\nhalf a li"
    assert bars.pending == ""
    assert bars.feed(b"ne\n") == b"ne\n"
    assert bars.flush() == b""


def test_bar_split_inside_its_backspaces() -> None:
    bars = BarFilter()
    assert bars.feed(b"\r1/2 loss: 0.5\b\b\b") == b""
    assert bars.pending == "1/2 loss: 0.5"
    assert bars.feed(b"\b\b\b\b\b\b\b\b\b\b") == b""
    assert bars.pending == "1/2 loss: 0.5"
    assert bars.feed(b"\b\r2/2 loss: 0.4\n") == b"2/2 loss: 0.4\n"
    data = b"\r1/2 loss: 0.5" + b"\b" * 13 + b"\r2/2 loss: 0.4\n"
    for cut in range(len(data) + 1):
        assert streamed(data, [cut]) == b"2/2 loss: 0.4\n"


def test_crlf_split_between_its_bytes() -> None:
    for data in (b"line\r\nnext\r\n", b"\rbar 1\rbar 2\r\nnext\r\n"):
        for cut in range(len(data) + 1):
            assert streamed(data, [cut]) == final_states(data), (data, cut)
    bars = BarFilter()
    assert bars.feed(b"\rbar\r") == b""
    assert bars.pending == "bar"  # a "\r" that nothing follows yet blanks nothing
    assert bars.feed(b"\n") == b"bar\r\n"


def test_line_without_newline_is_flushed() -> None:
    bars = BarFilter()
    assert bars.feed(b"done\n\r1/5\r2/5") == b"done\n"
    assert bars.pending == "2/5"
    assert bars.flush() == b"2/5"
    assert bars.pending == ""
    assert bars.flush() == b""


def test_pending() -> None:
    bars = BarFilter()
    assert bars.pending == ""
    bars.feed(b"Epoch 1/2\n\r")
    assert bars.pending == ""
    bars.feed("1/9 \u2501".encode()[:-1])  # mid-character: the character is not shown yet
    assert bars.pending == "1/9 "
    bars.feed("\u2501".encode()[-1:] + b" - loss: 0.1\b\b\b\b\r2/9 \xff")
    assert bars.pending == "2/9 \ufffd"
    bars.feed(b"\r")
    assert bars.pending == "2/9 \ufffd"
    bars.feed(b"9/9\n")
    assert bars.pending == ""


def test_bar_redrawn_for_hours_keeps_memory_bounded() -> None:
    redraw = b"\b" * 120 + b"\r" + "12345/99999 \u2501\u2501\u2501 - loss: 0.1234".encode() + b" " * 60
    block = redraw * 200  # about 70 KB a feed
    bars = BarFilter()
    tracemalloc.start()
    try:
        bars.feed(b"\r")
        for _ in range(300):  # about 20 MB in all
            assert bars.feed(block) == b""
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(block)
    assert bars.pending.startswith("12345/99999")
    assert bars.feed(b"\n") == redraw.split(b"\r")[1] + b"\n"


# --- collapse_file --------------------------------------------------------------------


def old_mtime(path: Path) -> int:
    """Sets ``path``'s mtime well in the past (so a rewrite would show) and returns it."""
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return path.stat().st_mtime_ns


def test_collapse_file_in_place(tmp_path: Path) -> None:
    log = tmp_path / "stdout.log"
    log.write_bytes(KERAS3.read_bytes())
    log.chmod(0o640)
    collapse_file(log)
    assert log.read_bytes() == final_states(KERAS3.read_bytes())
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["stdout.log"]  # no temporary file left
    mtime = old_mtime(log)
    collapse_file(log)  # now clean: left alone
    assert log.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "content",
    [b"", b"plain\nlog\n", b"no newline", b"windows\r\nlines\r\n", KERAS2.read_bytes()],
    ids=["empty", "plain", "no-newline", "crlf", "keras2"],
)
def test_collapse_file_leaves_clean_file_untouched(tmp_path: Path, content: bytes) -> None:
    log = tmp_path / "stdout.log"
    log.write_bytes(content)
    log.chmod(0o600)
    inode, mtime = log.stat().st_ino, old_mtime(log)
    collapse_file(log, chunk=5)
    assert log.read_bytes() == content
    assert log.stat().st_mtime_ns == mtime
    assert log.stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["stdout.log"]


def test_collapse_file_missing_is_a_no_op(tmp_path: Path) -> None:
    collapse_file(tmp_path / "absent.log")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_collapse_file_streams_a_large_file_in_small_chunks(tmp_path: Path, chunk: int) -> None:
    sample = KERAS3.read_bytes()
    content = b"text\rreplaced across chunks\n" + sample * (20 if chunk == 1 else 400) + b"\r1/5\r2/5"
    log = tmp_path / "big.log"
    log.write_bytes(content)
    log.chmod(0o755)
    collapse_file(log, chunk=chunk)
    assert log.read_bytes() == final_states(content)
    assert log.read_bytes().startswith(b"replaced across chunks\nEpoch 1/3\n")
    assert log.read_bytes().endswith(b"\n2/5")
    assert stat.S_IMODE(log.stat().st_mode) == 0o755


def test_collapse_file_memory_stays_bounded(tmp_path: Path) -> None:
    log = tmp_path / "long.log"
    sample = KERAS3.read_bytes()
    with log.open("wb") as f:
        for _ in range(3000):  # about 9 MB
            f.write(sample)
    chunk = 1 << 16
    tracemalloc.start()
    try:
        collapse_file(log, chunk=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * chunk
    assert log.read_bytes() == final_states(sample) * 3000


@settings(max_examples=60)
@given(BYTES, st.integers(1, 9))
def test_collapse_file_is_final_states(parts: list[bytes], chunk: int) -> None:
    data = b"".join(parts)
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "stdout.log"
        log.write_bytes(data)
        collapse_file(log, chunk=chunk)
        assert log.read_bytes() == final_states(data)
        assert os.listdir(folder) == ["stdout.log"]
