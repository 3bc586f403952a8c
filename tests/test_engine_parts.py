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
from kdistill.engine.phases import Phase, recipe_phases
from kdistill.engine.step import OptimizerStep, StepOutcome, clip_gradients
from kdistill.engine.training_module import TrainingModule
from kdistill.errors import NonFiniteError
from kdistill.recipes import build_recipe
from kdistill.recipes.base import Recipe, Term
from kdistill.schedules import TrainState
from kdistill.settings import TrainerSettings
from kdistill.taps import TapReader


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


# -- optimizers and schedules from settings -------------------------------------------------------
class Mixed(nn.Module):
    """Dense layers, a frozen one, and sparse embeddings (one shared, one frozen)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(3, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.table = nn.Embedding(5, 3, sparse=True)
        self.bag = nn.EmbeddingBag(4, 3, sparse=True)
        self.again = self.table  # the same embedding twice: its weight counts once
        self.fixed = nn.Embedding(3, 3, sparse=True).requires_grad_(False)
        self.plain = nn.Embedding(3, 3)  # dense gradients


def group_ids(optimizer: torch.optim.Optimizer) -> list[int]:
    return [id(p) for g in optimizer.param_groups for p in g["params"]]


def test_dense_optimizers_take_every_trainable_parameter_with_their_settings():
    from kdistill.engine.optim import build_optimizer
    from kdistill.settings import OptimizerSettings

    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2).requires_grad_(False), nn.Linear(2, 1))
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    adamw = build_optimizer(model, OptimizerSettings(lr=0.02, betas=(0.8, 0.9),
                                                     weight_decay=0.3))
    assert type(adamw) is torch.optim.AdamW and group_ids(adamw) == trainable
    group = adamw.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.02, (0.8, 0.9), 0.3)
    sgd = build_optimizer(model, OptimizerSettings(name="sgd", lr=0.5, momentum=0.7,
                                                   weight_decay=0.1, nesterov=True))
    assert type(sgd) is torch.optim.SGD and group_ids(sgd) == trainable
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == \
        (0.5, 0.7, 0.1, True)


def test_sparse_embeddings_get_a_sparse_adam_beside_the_dense_optimizer():
    from kdistill.engine.optim import build_optimizer, sparse_parameters
    from kdistill.settings import OptimizerSettings

    model = Mixed()
    assert [id(p) for p in sparse_parameters(model)] == [
        id(model.table.weight), id(model.bag.weight), id(model.fixed.weight)]
    combined = build_optimizer(model, OptimizerSettings(name="sgd", lr=0.3, weight_decay=0.2,
                                                        betas=(0.7, 0.8)))
    assert isinstance(combined, CombinedOptimizer)
    dense, sparse = combined.optimizers
    assert type(dense) is torch.optim.SGD and type(sparse) is torch.optim.SparseAdam
    assert group_ids(dense) == [id(p) for p in (model.dense.weight, model.dense.bias,
                                                model.plain.weight)]
    assert group_ids(sparse) == [id(model.table.weight), id(model.bag.weight)]
    assert (sparse.param_groups[0]["lr"], sparse.param_groups[0]["betas"]) == (0.3, (0.7, 0.8))
    only_sparse = nn.Embedding(4, 2, sparse=True)
    alone = build_optimizer(only_sparse, OptimizerSettings(lr=0.1))
    assert type(alone) is torch.optim.SparseAdam and group_ids(alone) == [id(only_sparse.weight)]


@pytest.mark.parametrize("settings", [
    {"name": "cosine", "warmup_steps": 3, "min_ratio": 0.1},
    {"name": "step", "warmup_steps": 1, "step_size": 2, "gamma": 0.5},
    {"name": "linear", "min_ratio": 0.2}])
def test_the_schedule_multiplies_the_learning_rate_step_by_step(settings):
    from kdistill.engine.optim import build_scheduler
    from kdistill.schedules import lr_multiplier
    from kdistill.settings import SchedulerSettings

    scheduler_settings = SchedulerSettings(**settings)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = build_scheduler(optimizer, scheduler_settings, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    s = scheduler_settings
    assert lrs == pytest.approx([2.0 * lr_multiplier(s.name, i, 10, s.warmup_steps, s.min_ratio,
                                                     s.step_size, s.gamma) for i in range(10)])
    assert len(set(lrs)) > 2


def test_recipe_phases_are_named_by_position_and_recipe_and_keep_its_best():
    class KeepsBest(type(build_recipe("ce"))):
        keep_best = "accuracy"

    phases = recipe_phases(build_recipe("annealing"), 5)
    assert [p.name for p in phases] == [f"{i}-{p.recipe.name}" for i, p in enumerate(phases)]
    assert [p.name for p in phases][0].startswith("0-") and len(phases) == 2
    assert Phase(KeepsBest(), 1).keep_best == "accuracy"
    assert Phase(KeepsBest(), 1, keep_best="ece").keep_best == "ece"
    assert Phase(build_recipe("ce"), 1).keep_best is None


def test_best_weights_are_restored_only_with_a_record_and_weights():
    phase = Phase(build_recipe("ce"), 1, keep_best="accuracy")
    best = BestWeights()
    best.record = {"phase": 0, "epoch": 1, "score": 1.0}  # e.g. read from a checkpoint
    assert best.restore(0, phase, linear(0), step=3) is None
    best.record, best.weights = None, linear(1).state_dict()
    assert best.restore(0, phase, linear(0), step=3) is None


# -- the end-of-epoch evaluation -----------------------------------------------------------------
class Probe(nn.Module):
    """Records the device of each input and answers zeros on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.device] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.device)
        return torch.zeros(len(x), 3)


class ProbeSource:
    """A teacher source answering zeros; counts its calls."""

    def __init__(self, static: bool) -> None:
        self.static, self.model = static, Probe()

    def trainable_module(self) -> None:
        return None

    def evaluation_source(self) -> ProbeSource:
        return self

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"logits": self.model(batch["input"])}


def test_the_epoch_evaluation_batches_the_data_with_the_fits_collate_on_its_device():
    from kdistill.engine.evaluation import EpochEvaluation

    collated: list[int] = []

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        collated.append(len(items))  # keeps only the inputs: nothing else goes to the device
        return {"input": torch.stack([item["input"] for item in items])}

    data = [torch.zeros(4)] * 5
    for static, calls in ((True, 3), (False, 6)):
        student, teacher = Probe(), ProbeSource(static)
        evaluation = EpochEvaluation(student, teacher, data, None, 2, collate,
                                     torch.device("meta"))
        assert evaluation.available
        first, second = evaluation(), evaluation()
        assert set(first) == {"accuracy", "macro_f1", "ece", "agreement"}  # no labels: NaN
        assert first["agreement"] == second["agreement"] == 1.0
        assert student.seen == [torch.device("meta")] * 6  # 3 batches, twice
        assert teacher.model.seen == [torch.device("meta")] * calls  # a static one once per fit
    assert collated == [2, 2, 1, 2, 2, 1]  # batches made once per fit
    assert not EpochEvaluation(Probe(), None, None, None, 2, collate, torch.device("cpu")).available


# -- the training module -------------------------------------------------------------------------
class FixedTerms(Recipe):
    """Terms with hand-set values, weights and units (the student's logits keep them in the
    graph)."""

    name = "fixed-terms"
    uses_teacher = False

    def __init__(self, terms: dict[str, tuple[float, float, str]]) -> None:
        super().__init__()
        self.fixed = terms
        self.seen_states: list[TrainState] = []

    def terms(self, student, teacher, batch, state):
        self.seen_states.append(state)
        anchor = student["logits"].sum() * 0
        return {name: Term(anchor + value, weight=weight, unit=unit)
                for name, (value, weight, unit) in self.fixed.items()}


def training_module(terms: dict[str, tuple[float, float, str]]) -> TrainingModule:
    student = linear(0)
    return TrainingModule(student, FixedTerms(terms), TapReader(student, ["logits"]))


BATCH = {"input": torch.ones(4, 3)}


def test_the_training_module_weighs_and_scales_each_term():
    module = training_module({"ce": (2.0, 0.25, "labeled"), "kd": (3.0, 0.5, "examples")})
    state = TrainState(epoch=1, step=5)
    total, reported = module(BATCH, None, state, {"labeled": 0.5, "examples": 2.0})
    assert total.item() == 2.0 * 0.25 * 0.5 + 3.0 * 0.5 * 2.0
    assert {k: v.item() for k, v in reported.items()} == {"ce": 1.0, "kd": 6.0}
    assert module.recipe.seen_states == [state]
    total, reported = module(BATCH, None, state, {"labeled": 0.0, "examples": 2.0})
    assert total.item() == 3.0
    assert {k: v.item() for k, v in reported.items()} == {"ce": 0.0, "kd": 6.0}


def test_a_micro_batch_without_any_unit_gives_a_zero_loss_with_zero_gradients():
    module = training_module({"ce": (2.0, 1.0, "labeled")})
    total, reported = module(BATCH, None, TrainState(), {"labeled": 0.0})
    assert total.item() == 0.0 and reported["ce"].item() == 0.0
    total.backward()
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())


def test_a_term_may_not_be_named_like_the_total():
    module = training_module({"loss": (1.0, 1.0, "examples")})
    with pytest.raises(ValueError) as error:
        module(BATCH, None, TrainState(), {"examples": 1.0})
    assert str(error.value) == ("recipe 'fixed-terms': a loss term cannot be named 'loss', the "
                                "engine logs the weighted total under that name")


def test_a_trainable_source_joins_the_module_only_for_a_recipe_that_uses_a_teacher():
    from kdistill.teachers import PeerTeacher

    student, peer = linear(0), linear(1)
    source = PeerTeacher([peer])
    without = TrainingModule(student, build_recipe("ce"), TapReader(student, ["logits"]),
                             source)
    assert without.source is None and without.peers is None
    assert [id(p) for p in without.parameters()] == [id(p) for p in student.parameters()]
    with_peers = TrainingModule(student, build_recipe("hinton"), TapReader(student, ["logits"]),
                                source)
    assert with_peers.source is source and with_peers.peers is source.trainable_module()
    assert {id(p) for p in with_peers.parameters()} >= {id(p) for p in peer.parameters()}
    alone = TrainingModule(student, build_recipe("hinton"), TapReader(student, ["logits"]))
    assert alone.source is None and alone.peers is None


def test_a_model_that_cannot_take_the_batch_is_named_with_the_batch_shapes():
    from kdistill.engine.training_module import call_model
    from kdistill.errors import ModelCallError

    def failing(batch):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    batch = {"input": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(ModelCallError) as error:
        call_model("teacher", failing, batch)
    assert str(error.value) == ("the teacher cannot run on a training batch (input [2, 5] "
                                "float32, labels [2] int64): RuntimeError: mat1 and mat2 "
                                "shapes cannot be multiplied")


def test_recipe_modules_are_built_in_eval_mode_and_moved_to_the_device():
    from kdistill.engine.training_module import build_recipe_modules

    class Adapter(Recipe):
        name = "adapter"

        def build(self, student, teacher):
            self.modes = (student["logits"].requires_grad, teacher["logits"].shape)
            self.adapter = nn.Linear(student["logits"].shape[1], 3)

    student, recipe = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).train(), Adapter()

    def teacher(batch):
        return {"logits": torch.zeros(len(batch["input"]), 5)}

    build_recipe_modules(recipe, TapReader(student, ["logits"]), teacher, BATCH, [student],
                         torch.device("meta"))
    assert recipe.modes == (False, (4, 5))  # no gradients, the teacher's taps
    assert recipe.adapter.weight.device == torch.device("meta")
    assert student.training and student[1].training  # modes restored


# -- the run folder ------------------------------------------------------------------------------
def test_a_new_run_takes_an_empty_folder_once_it_starts(tmp_path):
    from kdistill.checkpoint import RunFolderError
    from kdistill.engine.run_folder import RunOpening
    from kdistill.metrics_log import read_metrics

    started: list[int] = []
    history = [{"kind": "train", "step": 1, "loss": 0.5}]
    opening = RunOpening(tmp_path / "run", True, on_start=started.append)
    log = opening.begin(history, 7)
    assert opening.started and started == [7]
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == history
    log.write({"kind": "train", "step": 2, "loss": 0.25})
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "other.txt").write_text("another run")
    with pytest.raises(RunFolderError) as error:
        RunOpening(tmp_path / "taken", True).begin([], 0)
    assert str(error.value) == (f"run folder {tmp_path / 'taken'} already holds a run "
                                "(other.txt); pass resume=True to continue it or "
                                "overwrite=True to replace it")
    replaced = RunOpening(tmp_path / "taken", True, overwrite=True)
    replaced.begin(history, 1)
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["metrics.jsonl"]


def test_only_the_main_process_takes_the_folder(tmp_path):
    from kdistill.engine.run_folder import RunOpening

    started: list[int] = []
    other = RunOpening(tmp_path / "run", False, on_start=started.append)
    assert other.begin([], 3) is None and other.started
    no_folder = RunOpening(None, True, on_start=started.append)
    assert no_folder.begin([], 3) is None
    assert not (tmp_path / "run").exists() and started == []


def test_a_resumed_run_tidies_its_folder_and_keeps_the_history(tmp_path):
    from kdistill.engine.run_folder import RunOpening
    from kdistill.metrics_log import read_metrics

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "tr')
    (tmp_path / ".metrics.jsonl.tmp-99").write_text("{")  # a kill while replacing the log
    history = [{"kind": "train", "step": 1}]
    RunOpening(tmp_path, True, resume=True).begin(history, 1)
    assert read_metrics(tmp_path / "metrics.jsonl") == history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "metrics.jsonl"]
