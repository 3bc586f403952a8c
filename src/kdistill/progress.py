"""Progress of long passes: a ``rich`` bar showing every loss term of the latest step on a
terminal, and a plain line every :data:`LOG_EVERY_SECONDS` when the output is redirected (a
log file or a pipe shows how far a run is instead of nothing)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

SKIPPED = {"kind", "phase", "epoch", "step", "phase_name"}
LOG_EVERY_SECONDS = 30.0


def format_terms(record: Mapping[str, Any]) -> str:
    """``name=value`` for each numeric entry of a record except the position fields."""
    return " ".join(f"{k}={v:.4g}" if k != "lr" else f"lr={v:.2e}" for k, v in record.items()
                    if k not in SKIPPED and isinstance(v, int | float))


def format_seconds(seconds: float) -> str:
    """``h:mm:ss``."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class _LogLines:
    """Progress as periodic lines: ``name: done/total (pct) elapsed, eta, terms``."""

    def __init__(self, console: Console, name: str, total: int, completed: int,
                 every: float, clock: Callable[[], float]):
        self.console, self.name, self.total, self.every, self.clock = (console, name, total,
                                                                      every, clock)
        self.done = self.first = completed
        self.started = self.last = clock()
        self.terms = ""

    def update(self, terms: str) -> None:
        self.done += 1
        self.terms = terms
        now = self.clock()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            self.console.print(self.line(now), highlight=False, soft_wrap=True)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (f"{self.name}: {self.done}/{self.total}{share} elapsed "
                f"{format_seconds(elapsed)}, eta {eta} {self.terms}").rstrip()


class TrainingProgress:
    """One bar (or periodic log line) per phase; a no-op on non-main processes or when
    disabled. ``console`` and ``clock`` are for tests."""

    def __init__(self, enabled: bool = True, console: Console | None = None,
                 every: float = LOG_EVERY_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.every, self.clock = every, clock
        self.progress: Progress | None = None
        self.lines: _LogLines | None = None
        self.task: Any = None

    def start_phase(self, name: str, total: int, completed: int = 0) -> None:
        if not self.enabled:
            return
        self.stop()
        if not self.console.is_terminal:
            self.lines = _LogLines(self.console, name, total, completed, self.every,
                                   self.clock)
            return
        self.progress = Progress(
            TextColumn(f"[bold]{name}[/bold]"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[terms]}"),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(name, total=total, completed=completed, terms="")

    def advance(self, record: Mapping[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, terms=format_terms(record))
        elif self.lines is not None:
            self.lines.update(format_terms(record))

    def show_eval(self, record: Mapping[str, Any]) -> None:
        if (self.progress is not None or self.lines is not None) and any(
                k.startswith("eval_") for k in record):
            self.console.print(f"epoch {record['epoch']}: {format_terms(record)}",
                               highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.lines = None
