"""Where a run stands: the progress math (pure) and the progress line the CLI prints.

On a terminal the line is a rich progress bar that fits the terminal's width; elsewhere (a log
file, a pipe) a plain line every few seconds.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import IO, Any, cast

from rich.console import Console
from rich.progress import BarColumn, TaskID, TextColumn
from rich.progress import Progress as RichProgress


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a run stands. ``done`` counts finished items, failed ones included."""

    total: int
    submitted: int
    done: int
    failed: int
    rate: float
    """Items finished per second since this start of the run."""
    eta_s: float | None
    """Seconds to finish at ``rate``; None while nothing has finished in this start."""
    elapsed_s: float = 0.0
    """Seconds since this start of the run."""

    @property
    def ok(self) -> int:
        return self.done - self.failed

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 1.0


def compute_progress(
    *,
    total: int,
    submitted: int,
    done: int,
    failed: int,
    session_done: int,
    session_elapsed_s: float,
) -> Progress:
    """Rate from what finished in this start of the run; ETA for what remains at that rate."""
    total = max(total, done)
    rate = session_done / session_elapsed_s if session_elapsed_s > 0 and session_done > 0 else 0.0
    remaining = total - done
    eta: float | None
    if remaining <= 0:
        eta = 0.0
    elif rate > 0:
        eta = remaining / rate
    else:
        eta = None
    return Progress(total, submitted, done, failed, rate, eta, max(0.0, session_elapsed_s))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def render_progress(progress: Progress, width: int = 24) -> str:
    """``[#####-----] 120/240 done (50%), 3 failed, 140 submitted, 12.5/s, ETA 0:00:10``."""
    filled = round(progress.fraction * width)
    return (
        f"[{'#' * filled}{'-' * (width - filled)}] {progress.done}/{progress.total} done "
        f"({progress.fraction:.0%}), {progress.failed} failed, {progress.submitted} submitted, "
        f"{progress.rate:.1f}/s, elapsed {format_duration(progress.elapsed_s)}, "
        f"ETA {format_duration(progress.eta_s)}"
    )


def _columns() -> tuple[Any, ...]:
    """The terminal line: bar, done/total, failed, submitted, rate, elapsed, ETA; the bar takes
    what the terminal's width leaves."""
    return (
        BarColumn(bar_width=None),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("[red]{task.fields[failed]} failed[/]"),
        TextColumn("{task.fields[submitted]} sent"),
        TextColumn("{task.fields[rate]:.1f}/s"),
        TextColumn("{task.fields[elapsed]}"),
        TextColumn("ETA {task.fields[eta]}"),
    )


class ProgressLine:
    """Progress on a stream: a rich bar redrawn in place on a terminal (fitted to its width), a
    plain line every few seconds if not. ``console``: where the bar draws (tests give one of a
    fixed width)."""

    def __init__(
        self, out: io.TextIOBase | Any, *, quiet: bool = False, console: Console | None = None
    ) -> None:
        self._out = out
        self._quiet = quiet
        self._tty = console is not None or bool(getattr(out, "isatty", lambda: False)())
        self._every_s = 0.2 if self._tty else 5.0
        self._last = 0.0
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        if self._tty and not quiet:
            self._bar = RichProgress(
                *_columns(),
                console=console or Console(file=cast(IO[str], out)),
                auto_refresh=False,
                expand=True,
            )

    def update(self, progress: Progress, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._quiet or (not force and now - self._last < self._every_s):
            return
        self._last = now
        if self._bar is None:
            self._out.write(f"{render_progress(progress)}\n")
            self._out.flush()
            return
        fields: dict[str, Any] = {
            "failed": progress.failed,
            "submitted": progress.submitted,
            "rate": progress.rate,
            "elapsed": format_duration(progress.elapsed_s),
            "eta": format_duration(progress.eta_s),
        }
        if self._task is None:
            self._bar.start()
            self._task = self._bar.add_task(
                "", total=progress.total, completed=progress.done, **fields
            )
        self._bar.update(
            self._task, total=progress.total, completed=progress.done, refresh=True, **fields
        )

    def end(self, progress: Progress) -> None:
        self.update(progress, force=True)
        if self._bar is not None:
            self._bar.stop()
