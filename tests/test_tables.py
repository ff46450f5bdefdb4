"""Tables that fit the terminal, and the times they show."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from cloudtrain.tables import Column, Row, ago, duration, fit, folded, render

COLUMNS = [
    Column("run", fold=True),
    Column("type", drop=2),
    Column("zone", drop=1),
    Column("cost", right=True),
]
ROWS = [Row(["job-20261202-113000-b7c1", "g4dn.xlarge", "us-east-1a", "$0.20"])]  # 24 + 11 + 10 + 5


@pytest.mark.parametrize(
    ("width", "shown", "run_width"),
    [
        (60, [0, 1, 2, 3], 24),  # 24 + 11 + 10 + 5 + 3 gaps of 2 = 56
        (55, [0, 2, 3], 24),  # the highest drop goes first: type (2), before zone (1)
        (43, [0, 2, 3], 24),  # 24 + 10 + 5 + 2 gaps
        (42, [0, 3], 24),
        (30, [0, 3], 23),  # both gone, then the run column folds: 30 - 2 - 5
        (10, [0, 3], 8),  # never below MIN_FOLD; the line is then longer than the console
    ],
)
def test_columns_are_dropped_highest_first_then_the_run_folds(
    width: int, shown: list[int], run_width: int
) -> None:
    got_shown, widths = fit(COLUMNS, ROWS, width)
    assert got_shown == shown and widths[0] == run_width


def test_every_line_fits_and_the_run_id_is_whole_when_folded() -> None:
    text = render(COLUMNS, ROWS, 30).plain
    lines = text.splitlines()
    assert all(len(line) <= 30 for line in lines), text
    assert lines[0].split() == ["run", "cost"] and set(lines[1]) == {"─"}
    assert "".join(line[:23].strip() for line in lines[2:]) == "job-20261202-113000-b7c1"
    assert lines[2].endswith("$0.20")  # numbers right-justified, on the row's first line


def test_a_fold_breaks_after_a_dash_when_one_is_near() -> None:
    assert folded("job-20261202-113000-b7c1", 14) == ["job-20261202-", "113000-b7c1"]
    assert folded("abcdefghijkl", 5) == ["abcde", "fghij", "kl"]  # no dash: cut at the width


def test_styles_are_kept_per_row() -> None:
    text = render(COLUMNS, [Row(ROWS[0].cells, "dim")], 80)
    assert [span.style for span in text.spans] == ["bold", "dim"]


NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("before", "said"),
    [
        (timedelta(seconds=45), "45 s ago"),
        (timedelta(minutes=12, seconds=59), "12 min ago"),
        (timedelta(hours=5, minutes=30), "5 h ago"),
        (timedelta(days=3), "2026-11-29"),
    ],
)
def test_times_read_as_a_while_ago(before: timedelta, said: str) -> None:
    assert ago(NOW - before, NOW) == said


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(45, "45 s"), (720, "12 min"), (3900, "1 h 05 min"), (3 * 86400 + 4 * 3600, "3 d 04 h")],
)
def test_durations_read_in_units(seconds: float, said: str) -> None:
    assert duration(seconds) == said
