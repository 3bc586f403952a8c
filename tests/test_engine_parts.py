"""The engine's parts on their own, against hand values: keep-best tracking, what counts as an
improvement, the combined optimizer, dropping a non-finite step, gradient clipping, the buffer
broadcast of data-parallel runs, the non-finite messages and the one-call ``distill``."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from kdistill import Distiller, distill
from kdistill.data.base import ArrayDataset
from kdistill.engine.best import BestWeights
from kdistill.engine.loop import broadcast_buffers
from kdistill.engine.nonfinite import check_finite_weights, nonfinite_message
from kdistill.engine.optim import CombinedOptimizer
from kdistill.engine.phases import Phase
from kdistill.engine.step import OptimizerStep, StepOutcome, clip_gradients
from kdistill.errors import NonFiniteError
from kdistill.recipes import build_recipe
from kdistill.schedules import TrainState
from kdistill.settings import TrainerSettings


def linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


# -- keep-best ---------------------------------------------------------------------------------
def test_keep_best_remembers_a_copy_of_the_best_weights_and_restores_them():
    phase = Phase(build_recipe("ce"), 3, name="0-ce", keep_best="accuracy")
    best, model = BestWeights(), linear(0)
    best.track(0, phase, {"epoch": 1, "eval_accuracy": 0.5, "eval_ece": 0.1}, model)
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight += 1  # training goes on; the remembered weights must not follow
    best.track(0, phase, {"epoch": 2, "eval_accuracy": 0.5}, model)  # a tie is no improvement
    assert best.record == {"phase": 0, "epoch": 1, "score": 0.5}
    record = best.restore(2, phase, model, step=12)
    assert record == {"kind": "restore_best", "phase": 0, "phase_name": "0-ce",
                      "metric": "accuracy", "epoch": 1, "score": 0.5, "step": 12}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best_state.items())
    assert best.record is None and best.weights is None
    assert best.restore(2, phase, model, step=12) is None  # nothing left to restore


def test_keep_best_of_a_metric_the_evaluation_lacks_is_an_error_naming_both():
    phase = Phase(build_recipe("ce"), 3, name="0-ce", keep_best="f1")
    with pytest.raises(ValueError) as error:
        BestWeights().track(0, phase, {"epoch": 1, "eval_accuracy": 0.5, "eval_ece": 0.1,
                                       "step": 4}, linear(0))
    assert str(error.value) == ("phase '0-ce': keep_best 'f1' is not an evaluation metric; the "
                                "evaluation gives ['accuracy', 'ece']")


def test_a_phase_without_keep_best_restores_nothing():
    best, model = BestWeights(), linear(0)
    best.record, best.weights = {"phase": 0, "epoch": 1, "score": 1.0}, {"weight": None}
    assert best.restore(0, Phase(build_recipe("ce"), 1), model, step=3) is None
    assert best.record is not None  # kept for the phase that tracked it


@pytest.mark.parametrize(("metric", "better", "worse"), [
    ("accuracy", 0.6, 0.4), ("macro_f1", 0.6, 0.4), ("loss", 0.4, 0.6), ("ece", 0.4, 0.6),
    ("mse", 0.4, 0.6), ("mse_teacher", 0.4, 0.6)])
def test_an_improvement_beats_the_best_strictly(metric, better, worse):
    phase = Phase(build_recipe("ce"), 1, keep_best=metric)
    assert phase.improves(better, 0.5) and not phase.improves(worse, 0.5)
    assert not phase.improves(0.5, 0.5)  # a tie keeps the earlier epoch
    assert phase.improves(worse, None)


# -- the combined optimizer ----------------------------------------------------------------------
def test_a_combined_optimizer_steps_each_inner_optimizer_on_its_own_groups():
    params = [nn.Parameter(torch.ones(2)) for _ in range(4)]
    inner = [torch.optim.SGD([params[0]], lr=0.1),
             torch.optim.SGD([{"params": [params[1]], "lr": 0.2},
                              {"params": [params[2]], "lr": 0.3}]),
             torch.optim.SGD([params[3]], lr=0.4)]
    combined = CombinedOptimizer(inner)
    assert [[g["lr"] for g in o.param_groups] for o in inner] == [[0.1], [0.2, 0.3], [0.4]]
    for group in combined.param_groups:
        group["lr"] *= 10  # as an LR schedule does: it must reach the inner optimizers
    for p in params:
        p.grad = torch.ones(2)
    combined.step()
    assert [p.detach().tolist() for p in params] == [[0.0, 0.0], [-1.0, -1.0], [-2.0, -2.0],
                                                     [-3.0, -3.0]]
    combined.load_state_dict(combined.state_dict())
    assert [[g["lr"] for g in o.param_groups] for o in inner] == [[1.0], [2.0, 3.0], [4.0]]


def test_a_combined_optimizer_needs_two_optimizers_and_no_closure():
    one = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError) as error:
        CombinedOptimizer([one])
    assert str(error.value) == "CombinedOptimizer joins at least two optimizers"
    two = CombinedOptimizer([one, torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)])
    with pytest.raises(ValueError) as error:
        two.step(lambda: 0.0)
    assert str(error.value) == "CombinedOptimizer.step takes no closure"


# -- a dropped step and clipping ------------------------------------------------------------------
class Scaler:
    def __init__(self) -> None:
        self.updates = 0

    def update(self) -> None:
        self.updates += 1


class Accelerator:
    def __init__(self, scaler: Scaler | None = None) -> None:
        self.scaler = scaler


def optimizer_step(scaler: Scaler | None = None) -> OptimizerStep:
    return OptimizerStep(Accelerator(scaler), None, TrainerSettings(progress=False))


def test_a_dropped_step_leaves_no_gradient_and_puts_the_buffers_back():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    saved = [b.detach().clone() for b in model.buffers()]
    model(torch.randn(4, 3)).sum().backward()  # the step's forward moved the statistics
    optimizer, scaler = torch.optim.SGD(model.parameters(), lr=0.1), Scaler()
    optimizer_step(scaler).discard(model, optimizer, saved)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), saved, strict=True))
    assert scaler.updates == 1
    model(torch.randn(4, 3)).sum().backward()
    moved = [b.detach().clone() for b in model.buffers()]
    optimizer_step().discard(model, optimizer, None)  # on_nonfinite "stop": buffers not kept
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), moved, strict=True))


@pytest.mark.parametrize(("max_norm", "factor"), [(1.0, 1 / (5 + 1e-6)), (10.0, 1.0)])
def test_clipping_scales_the_gradients_to_the_largest_norm_allowed(max_norm, factor):
    grads = [torch.tensor([3.0], dtype=torch.float64), torch.tensor([[4.0, 0.0]],
                                                                     dtype=torch.float64)]
    norm = clip_gradients(grads, max_norm)
    assert norm.item() == 5.0
    assert grads[0].item() == pytest.approx(3 * factor, rel=1e-12, abs=0)
    assert grads[1][0].tolist() == pytest.approx([4 * factor, 0.0], rel=1e-12, abs=0)


# -- data parallelism ----------------------------------------------------------------------------
def test_buffers_are_broadcast_from_the_main_process(monkeypatch):
    sent: list[tuple[torch.Tensor, int]] = []

    def broadcast(tensor: torch.Tensor, src: int) -> None:
        sent.append((tensor, src))

    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    models = [nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), nn.BatchNorm1d(4)]
    broadcast_buffers(models)
    buffers = [b for m in models for b in m.buffers()]
    assert len(sent) == len(buffers) == 6
    assert all(t.data_ptr() == b.data_ptr() and src == 0
               for (t, src), b in zip(sent, buffers, strict=True))


# -- non-finite messages -------------------------------------------------------------------------
ADVICE = ("The run stopped without applying this step; checkpoints already written hold the "
          "last good weights. Try a lower learning rate (trainer.optimizer.lr) or gradient "
          "clipping (trainer.clip_grad_norm), check the training data for NaN or infinite "
          "values, or set trainer.on_nonfinite: skip to skip such steps")
WHERE = "training step 7 (phase 1 'second', epoch 2 of 3, batch 3 of 4)"


@pytest.mark.parametrize(("outcome", "consecutive", "what"), [
    (StepOutcome({"ce": math.nan, "kd": 1.0, "loss": math.inf}, 0.1, ["ce", "loss"]), 0,
     "non-finite loss terms ce=nan, loss=inf"),
    (StepOutcome({"ce": 1.0}, 0.1, [], True, ["a.weight", "b.bias", "c.weight"]), 0,
     "non-finite gradients of a.weight, b.bias, c.weight"),
    (StepOutcome({"ce": 1.0}, 0.1, [], True, ["a", "b", "c", "d", "e"]), 0,
     "non-finite gradients of a, b, c and 2 more"),
    (StepOutcome({"ce": 1.0}, 0.1, [], True, []), 0,
     "a gradient norm that overflowed (finite but huge gradients)"),
    (StepOutcome({"ce": math.inf, "loss": math.inf}, 0.1, ["ce", "loss"], True, ["w"]), 10,
     "non-finite loss terms ce=inf, loss=inf and non-finite gradients of w; 10 steps in a row "
     "were non-finite, so on_nonfinite 'skip' gives up"),
])
def test_the_non_finite_message_says_where_what_and_what_to_try(outcome, consecutive, what):
    phase = Phase(build_recipe("ce"), 3, name="second")
    state = TrainState(phase=1, epoch=1, step=6, steps_per_epoch=4, total_steps=12)
    assert nonfinite_message(1, phase, 4, state, 7, outcome, consecutive) == \
        f"{WHERE}: {what}. {ADVICE}"


@pytest.mark.parametrize(("bad", "named"), [
    (["a"], "a"), (["a", "b", "c"], "a, b, c"), (["a", "b", "c", "d", "e"], "a, b, c and 2 more")])
def test_non_finite_weights_are_named_when_refused(bad, named):
    tensors = {name: torch.tensor([1.0, math.nan]) for name in bad}
    tensors.update({"fine": torch.ones(2), "count": torch.tensor([3])})
    with pytest.raises(NonFiniteError) as error:
        check_finite_weights(tensors, 9, "a checkpoint")
    assert str(error.value) == (
        f"the weights after training step 9 are non-finite ({named}), so a checkpoint was not "
        "saved; checkpoints already written hold the last good weights. Finite gradients times "
        "a large learning rate can overflow: try a lower learning rate (trainer.optimizer.lr) "
        "or gradient clipping (trainer.clip_grad_norm)")
    check_finite_weights({"fine": torch.ones(2), "count": torch.tensor([3])}, 9, "x")
    check_finite_weights({}, 9, "x")


# -- the one-call form ---------------------------------------------------------------------------
def test_distill_is_one_call_of_the_distiller(digits_subset, make_mlp):
    data, teacher = digits_subset(32), make_mlp(seed=1)
    settings: dict[str, Any] = {"epochs": 1, "batch_size": 16, "progress": False}
    expected = Distiller(make_mlp(seed=0), teacher, "hinton", **settings).fit(data, data)
    result = distill(make_mlp(seed=0), teacher, data, data, **settings)
    assert result.history == expected.history
    assert [r["kind"] for r in result.history] == ["train", "train", "eval"]
    assert {"kd", "ce", "eval_accuracy", "eval_agreement"} <= set(result.history[0]) | set(
        result.history[-1])
    ce = distill(make_mlp(seed=0), None, data, recipe="ce", **settings)
    assert set(ce.history[0]) == {"kind", "phase", "epoch", "step", "lr", "ce", "loss"}
    assert all(torch.equal(a, b) for a, b in zip(result.student.state_dict().values(),
                                                 expected.student.state_dict().values(),
                                                 strict=True))


def test_select_of_no_sample_is_an_empty_data_set():
    data = ArrayDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 2]))
    empty = data.select([])
    assert len(empty) == 0 and empty.inputs.shape == (0, 2) and empty.labels.dtype == torch.long
    assert data.select([2, 0]).labels.tolist() == [2, 0]


def test_an_evaluator_is_given_the_student_and_the_teacher_source(digits_subset, make_mlp):
    seen: list[tuple[nn.Module, Any]] = []

    def evaluator(student: nn.Module, teacher: Any) -> dict[str, float]:
        seen.append((student, teacher))
        return {"accuracy": 0.5}

    distiller = Distiller(make_mlp(seed=0), make_mlp(seed=1), "hinton", epochs=2, batch_size=16,
                          progress=False, evaluator=evaluator)
    result = distiller.fit(digits_subset(32))
    assert seen == [(distiller.student, distiller.teacher)] * 2
    assert distiller.teacher is not None
    assert [r["eval_accuracy"] for r in result.evaluations()] == [0.5, 0.5]
