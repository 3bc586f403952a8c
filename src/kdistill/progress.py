"""A ``rich`` progress bar that shows every loss term of the latest step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

SKIPPED = {"kind", "phase", "epoch", "step", "phase_name"}


def format_terms(record: Mapping[str, Any]) -> str:
    """``name=value`` for each numeric entry of a record except the position fields."""
    return " ".join(f"{k}={v:.4g}" if k != "lr" else f"lr={v:.2e}" for k, v in record.items()
                    if k not in SKIPPED and isinstance(v, int | float))


class TrainingProgress:
    """One bar per phase; disabled (a no-op) on non-main processes or when asked."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.progress: Progress | None = None
        self.task: Any = None

    def start_phase(self, name: str, total: int, completed: int = 0) -> None:
        if not self.enabled:
            return
        self.stop()
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

    def show_eval(self, record: Mapping[str, Any]) -> None:
        if self.progress is not None and any(k.startswith("eval_") for k in record):
            self.progress.console.print(f"epoch {record['epoch']}: {format_terms(record)}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
