"""Keep-best tracking: a phase that ends with the student weights of its best evaluation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdistill.engine.phases import Phase


class BestWeights:
    """The best evaluation of the current ``keep_best`` phase and the student's weights then.

    ``record`` (``{"phase", "epoch", "score"}``) goes into a checkpoint's JSON and ``weights``
    into its tensors, so a resumed phase still ends with the weights of its best evaluation.
    """

    def __init__(self) -> None:
        self.record: dict[str, Any] | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget the best of an earlier phase."""
        self.record, self.weights = None, None

    def track(self, index: int, phase: Phase, evaluation: Mapping[str, Any],
              student: nn.Module) -> None:
        """Remember the student's weights when ``evaluation`` is the phase's best so far."""
        key = f"eval_{phase.keep_best}"
        if key not in evaluation:
            metrics = sorted(k[len("eval_"):] for k in evaluation if k.startswith("eval_"))
            raise ValueError(f"phase '{phase.name}': keep_best '{phase.keep_best}' is not an "
                             f"evaluation metric; the evaluation gives {metrics}")
        score = float(evaluation[key])
        if phase.improves(score, self.record["score"] if self.record else None):
            self.record = {"phase": index, "epoch": evaluation["epoch"], "score": score}
            self.weights = {k: v.detach().clone() for k, v in student.state_dict().items()}

    def restore(self, index: int, phase: Phase, student: nn.Module,
                step: int) -> dict[str, Any] | None:
        """Load the best weights into ``student`` at the end of a ``keep_best`` phase; returns
        the ``restore_best`` record to log (None when there is nothing to restore)."""
        if not phase.keep_best or self.record is None or self.weights is None:
            return None
        student.load_state_dict(self.weights)
        record = {"kind": "restore_best", "phase": index, "phase_name": phase.name,
                  "metric": phase.keep_best, **self.record, "step": step}
        self.reset()
        return record
