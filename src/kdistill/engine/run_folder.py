"""How a fit takes its run folder: once, when training really starts, never before."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdistill.checkpoint import check_fresh_run_folder, replace_run_folder, tidy_run_folder
from kdistill.metrics_log import MetricsLog

StartHook = Callable[[int], None]  # called with the step training starts from
FRESH_HINT = "pass resume=True to continue it or overwrite=True to replace it"


@dataclass
class RunOpening:
    """A fit's claim on ``run_dir``: a fresh run takes an empty folder (an earlier run's is
    replaced only with ``overwrite``); a resumed one first clears what a kill left (temporary
    files, a checkpoint folder moved aside). Only the main process touches the folder."""

    run_dir: Path | None
    main: bool
    resume: bool = False
    overwrite: bool = False
    on_start: StartHook | None = None
    started: bool = False

    def begin(self, history: Sequence[Mapping[str, Any]], step: int) -> MetricsLog | None:
        """Take the folder (once) and return its metrics log holding ``history`` (None on the
        other processes or without a folder); ``on_start`` hears the step training starts
        from."""
        self.started = True
        if self.run_dir is None or not self.main:
            return None
        if self.resume:
            tidy_run_folder(self.run_dir)
        elif self.overwrite:
            replace_run_folder(self.run_dir)
        else:
            check_fresh_run_folder(self.run_dir, overwrite=False, hint=FRESH_HINT)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.run_dir / "metrics.jsonl")
        log.replace(history)
        if self.on_start is not None:
            self.on_start(step)
        return log
