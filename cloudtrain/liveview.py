"""The live view of a training run on a terminal: a few lines kept at the bottom, redrawn
as the heartbeats come (rich's ``Live``), the training log scrolling above them.

    ▸ running mnist-cnn-20261206-170000-b7c1 · 12 min · g4dn.xlarge in us-east-1a, spot $0.1578/h
      epoch 7/20 ━━━━━━━━━━━━━━━━━━──────────── 112/469 · loss 0.1234, accuracy 0.95
      ETA 4 min · $0.0312 so far · projected $0.0421 · $0.9688 left
      <the Keras progress bar being drawn, or the log's unfinished line>

The log above gets whole lines only, each Keras bar as its final state (logbars.py); the
line still being written is the view's last line, so a bar is redrawn in place, as Keras
draws it. ``lines`` is the text, for tests; ``LiveLog`` drives the display.

``TransferBar``: the progress bar of a sync, pull-back or checkpoint restore (bytes, rate,
time left), shown once it has taken a second. ``StepBar``: steps of long work (the image
recipe, an image being created) and the time it has taken.
"""

from __future__ import annotations

import codecs
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from cloudtrain.metrics import describe
from cloudtrain.progress import LiveStatus
from cloudtrain.tables import duration

BAR_WIDTH = 30
PENDING_MAX = 4096  # characters of an unfinished line kept for the view


def epoch_bar(step: int, steps: int, width: int = BAR_WIDTH) -> str:
    """``━━━━━━━━━━─────`` with ``step``/``steps`` of it drawn."""
    done = round(width * min(max(step / steps, 0.0), 1.0)) if steps > 0 else 0
    return "━" * done + "─" * (width - done)


def lines(status: LiveStatus, since_s: float = 0.0) -> list[str]:
    """The view's lines for ``status``, ``since_s`` seconds after it came."""
    head = [f"▸ {status.state.value} {status.run_id}", duration(status.elapsed_s + since_s)]
    if status.instance:
        head.append(status.instance)
    out = [" · ".join(head)]
    progress = status.progress or {}
    if progress.get("active"):
        epoch, epochs = progress.get("epoch"), progress.get("epochs")
        fit = progress.get("fit")
        training = [f"{f'fit {fit} ' if isinstance(fit, int) and fit else ''}epoch {epoch}/{epochs}"]
        step, steps = progress.get("step"), progress.get("steps")
        if progress.get("call") != "fit":
            training.append(f"{progress.get('call')}")
        if isinstance(step, int) and isinstance(steps, int) and steps > 0:
            training[-1] += f" {epoch_bar(step, steps)} {step}/{steps}"
        elif isinstance(step, int):
            training[-1] += f" step {step}"
        if status.metrics:
            training.append(describe(status.metrics))
        out.append("  " + " · ".join(training))
    idle = f" · idle {duration(status.idle_s + since_s)}" if status.idle_s and status.idle_s >= 60 else ""
    out.append(f"  {status.money(since_s)}{idle}")
    return out


class LiveLog:
    """The training log and the live view on one terminal (``console``, stderr's).

    ``log`` takes the log's bytes: whole lines are printed above the view, bars as their
    final state; ``show`` redraws the view with a new status; ``stop`` takes the view off
    the screen (a stage that is not training); ``flush`` also prints the unfinished line."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # the unfinished line, as a terminal would show it
        self.status: LiveStatus | None = None
        self.received = time.monotonic()
        self.live: Live | None = None

    def __rich__(self) -> Group:
        since = time.monotonic() - self.received
        rows = [
            Text(line, style="bold cyan" if i == 0 else "", no_wrap=True, overflow="ellipsis")
            for i, line in enumerate(lines(self.status, since) if self.status else [])
        ]
        if self.pending:
            rows.append(Text.from_ansi(self.pending, no_wrap=True, overflow="ellipsis"))
        return Group(*rows)

    def log(self, data: bytes) -> None:
        from cloudtrain.logbars import final_states

        text = self.pending + self.decoder.decode(data)
        whole, newline, rest = text.rpartition("\n")
        if newline:
            final = final_states((whole + "\n").encode()).decode("utf-8", "replace")
            self.console.print(Text.from_ansi(final.rstrip("\n")), highlight=False, soft_wrap=True)
        self.pending = _redrawn(rest)
        self._refresh()

    def show(self, status: LiveStatus) -> None:
        self.status, self.received = status, time.monotonic()
        if self.live is None:
            self.live = Live(self, console=self.console, refresh_per_second=2, transient=True)
            self.live.start()
        self._refresh()

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.refresh()

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        self.status = None

    def flush(self) -> None:
        self.stop()
        if self.pending:
            self.console.print(Text.from_ansi(self.pending), highlight=False, soft_wrap=True)
            self.pending = ""


def _redrawn(line: str) -> str:
    """An unfinished line as a terminal shows it: what follows its last carriage return,
    backspaces dropped; bounded."""
    return line.rpartition("\r")[2].replace("\b", "")[-PENDING_MAX:]


class TransferBar:
    """One transfer's progress bar on ``console``, drawn once it has taken SHOW_AFTER_S."""

    SHOW_AFTER_S = 1.0

    def __init__(self, console: Console, what: str) -> None:
        self.console, self.what = console, what
        self.started = time.monotonic()
        self.progress: Any = None
        self.task: Any = None

    def update(self, done: int, total: int | None) -> None:
        if self.progress is None:
            if time.monotonic() - self.started < self.SHOW_AFTER_S:
                return
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.what, total=total)
        self.progress.update(self.task, completed=done, total=total)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class StepBar:
    """Steps of long work on ``console``, with the time taken: ``image recipe ━━━── 3/7 steps 0:02:15``,
    or a pulsing bar while the number of steps is unknown. Drawn at once, and gone when it
    stops; lines printed to ``console`` meanwhile go above it."""

    def __init__(self, console: Console, what: str) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.what = what
        self.progress = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.task = self.progress.add_task(what, total=None, count="")
        self.progress.start()

    def update(self, done: int, total: int | None) -> None:
        count = "" if total is None else f"{done}/{total} steps"
        self.progress.update(self.task, completed=done, total=total, count=count)

    def stop(self) -> None:
        self.progress.stop()
