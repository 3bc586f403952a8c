"""Progress display: a redirected output gets a line every interval instead of a bar."""

from __future__ import annotations

import io

from rich.console import Console

from kdistill.progress import TrainingProgress, format_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def redirected() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_redirected_output_gets_a_line_per_interval_and_at_the_end() -> None:
    console, out = redirected()
    clock = Clock()
    progress = TrainingProgress(console=console, every=30.0, clock=clock)
    progress.start_phase("0-hinton", total=10)
    for step in range(10):
        clock.now += 10.0  # 10 s per step: a line at steps 3, 6, 9 and the last (10)
        progress.advance({"step": step, "loss": 1.0 / (step + 1)})
    lines = out.getvalue().splitlines()
    assert lines == [
        "0-hinton: 3/10 (30%) elapsed 0:00:30, eta 0:01:10 loss=0.3333",
        "0-hinton: 6/10 (60%) elapsed 0:01:00, eta 0:00:40 loss=0.1667",
        "0-hinton: 9/10 (90%) elapsed 0:01:30, eta 0:00:10 loss=0.1111",
        "0-hinton: 10/10 (100%) elapsed 0:01:40, eta 0:00:00 loss=0.1",
    ]


def test_a_resumed_phase_counts_its_rate_from_the_resumed_step() -> None:
    console, out = redirected()
    clock = Clock()
    progress = TrainingProgress(console=console, every=5.0, clock=clock)
    progress.start_phase("ce", total=100, completed=90)
    clock.now += 5.0
    progress.advance({"loss": 2.0})
    assert out.getvalue().strip() == "ce: 91/100 (91%) elapsed 0:00:05, eta 0:00:45 loss=2"


def test_evaluations_are_printed_and_a_disabled_progress_prints_nothing() -> None:
    console, out = redirected()
    progress = TrainingProgress(console=console)
    progress.start_phase("ce", total=4)
    progress.show_eval({"epoch": 1, "eval_accuracy": 0.5})
    assert out.getvalue().strip() == "epoch 1: eval_accuracy=0.5"
    silent_console, silent = redirected()
    quiet = TrainingProgress(enabled=False, console=silent_console)
    quiet.start_phase("ce", total=4)
    quiet.advance({"loss": 1.0})
    quiet.show_eval({"epoch": 1, "eval_accuracy": 0.5})
    assert silent.getvalue() == ""


def test_seconds_are_shown_as_hours_minutes_seconds() -> None:
    assert format_seconds(3725.4) == "1:02:05"
    assert format_seconds(59.6) == "0:01:00"
