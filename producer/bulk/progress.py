"""Where a run stands: the progress math (pure) and the progress line the CLI prints."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any


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
    return Progress(total, submitted, done, failed, rate, eta)


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
        f"{progress.rate:.1f}/s, ETA {format_duration(progress.eta_s)}"
    )


class ProgressLine:
    """Progress on a stream: rewritten in place on a terminal, a line every few seconds if not."""

    def __init__(self, out: io.TextIOBase | Any, *, quiet: bool = False) -> None:
        self._out = out
        self._quiet = quiet
        self._tty = bool(getattr(out, "isatty", lambda: False)())
        self._every_s = 0.2 if self._tty else 5.0
        self._last = 0.0

    def update(self, progress: Progress, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._quiet or (not force and now - self._last < self._every_s):
            return
        self._last = now
        line = render_progress(progress)
        self._out.write(f"\r{line}\x1b[K" if self._tty else f"{line}\n")
        self._out.flush()

    def end(self, progress: Progress) -> None:
        self.update(progress, force=True)
        if self._tty and not self._quiet:
            self._out.write("\n")
