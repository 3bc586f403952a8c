"""What a fit does about training steps whose loss or gradients went non-finite, and the
check that no non-finite weight is ever saved (``TrainerSettings.on_nonfinite``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kdistill.engine.phases import Phase
from kdistill.engine.step import StepOutcome
from kdistill.errors import NonFiniteError
from kdistill.schedules import TrainState

MAX_CONSECUTIVE_SKIPS = 10  # on_nonfinite "skip": this many non-finite steps in a row stop a run
NAMED_PARAMETERS = 3  # parameters with non-finite gradients named in a record or a message


@dataclass
class NonFiniteSteps:
    """The ``on_nonfinite`` policy and the run of non-finite steps up to the last step.

    ``"stop"``: the first non-finite step stops the run. ``"skip"``: such a step is skipped
    (the step itself applied no update) and logged; the :data:`MAX_CONSECUTIVE_SKIPS`-th in a
    row stops the run all the same.
    """

    policy: Literal["stop", "skip"]
    consecutive: int = 0

    def applied(self) -> None:
        """A step was applied: the run of non-finite steps ends."""
        self.consecutive = 0

    def resume(self, history: Sequence[Mapping[str, Any]], step: int) -> None:
        """Go on counting where a resumed run stopped."""
        self.consecutive = trailing_skips(history, step)

    def handle(self, index: int, phase: Phase, steps_per_epoch: int, state: TrainState,
               step: int, outcome: StepOutcome,
               write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Log (``write``) a non-finite step as ``skipped_step`` and return the record, or,
        when the run must stop, as ``nonfinite_stop`` and raise :class:`NonFiniteError`
        (nothing of this step is saved)."""
        self.consecutive += 1
        record: dict[str, Any] = {
            "kind": "skipped_step", "phase": state.phase, "epoch": state.epoch, "step": step,
            "terms": outcome.nonfinite_terms, "gradients": outcome.nonfinite_gradients,
            "parameters": outcome.nonfinite_parameters[:NAMED_PARAMETERS]}
        skip = self.policy == "skip"
        if skip and self.consecutive < MAX_CONSECUTIVE_SKIPS:
            write(record)
            return record
        write({**record, "kind": "nonfinite_stop"})
        raise NonFiniteError(nonfinite_message(index, phase, steps_per_epoch, state, step,
                                               outcome, self.consecutive if skip else 0))


def check_finite_weights(tensors: Mapping[str, torch.Tensor], step: int, what: str) -> None:
    """Raise :class:`NonFiniteError` rather than save non-finite weights. Every step checks
    its loss and gradients, but finite gradients times a huge learning rate can still make a
    weight infinite; this check (on every process, whose weights agree) runs only when weights
    are about to be written."""
    weights = {k: v for k, v in tensors.items() if v.is_floating_point()}
    if not weights:
        return
    finite = torch.stack([torch.isfinite(v).all() for v in weights.values()]).tolist()
    if all(finite):
        return
    names = [k for k, ok in zip(weights, finite, strict=True) if not ok]
    more = f" and {len(names) - NAMED_PARAMETERS} more" if len(names) > NAMED_PARAMETERS else ""
    raise NonFiniteError(
        f"the weights after training step {step} are non-finite "
        f"({', '.join(names[:NAMED_PARAMETERS])}{more}), so {what} was not saved; "
        "checkpoints already written hold the last good weights. Finite gradients times a "
        "large learning rate can overflow: try a lower learning rate (trainer.optimizer.lr) "
        "or gradient clipping (trainer.clip_grad_norm)")


def nonfinite_message(index: int, phase: Phase, steps_per_epoch: int, state: TrainState,
                      step: int, outcome: StepOutcome, consecutive: int) -> str:
    """One line: where training went non-finite, what did, and what to try."""
    name = phase.name or phase.recipe.name
    where = (f"training step {step} (phase {index} '{name}', epoch {state.epoch + 1} "
             f"of {phase.epochs}, batch {state.step % steps_per_epoch + 1} "
             f"of {steps_per_epoch})")
    parts = []
    if outcome.nonfinite_terms:
        values = ", ".join(f"{n}={outcome.terms[n]}" for n in outcome.nonfinite_terms)
        parts.append(f"non-finite loss terms {values}")
    if outcome.nonfinite_gradients:
        names = outcome.nonfinite_parameters
        if names:
            more = f" and {len(names) - NAMED_PARAMETERS} more" \
                if len(names) > NAMED_PARAMETERS else ""
            parts.append(f"non-finite gradients of {', '.join(names[:NAMED_PARAMETERS])}{more}")
        else:
            parts.append("a gradient norm that overflowed (finite but huge gradients)")
    streak = (f"; {consecutive} steps in a row were non-finite, so on_nonfinite 'skip' gives up"
              if consecutive else "")
    return (f"{where}: {' and '.join(parts)}{streak}. The run stopped without applying this "
            "step; checkpoints already written hold the last good weights. Try a lower learning "
            "rate (trainer.optimizer.lr) or gradient clipping (trainer.clip_grad_norm), check "
            "the training data for NaN or infinite values, or set trainer.on_nonfinite: skip "
            "to skip such steps")


def trailing_skips(history: Sequence[Mapping[str, Any]], step: int) -> int:
    """How many steps in a row up to ``step`` were skipped as non-finite, from the history's
    ``skipped_step`` records (a resumed run goes on counting where it stopped)."""
    count = 0
    for record in reversed(history):
        if record.get("kind") != "skipped_step":
            continue
        if record["step"] != step - count:
            break
        count += 1
    return count
