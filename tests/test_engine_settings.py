"""Every trainer setting changes what the engine does: each field of ``TrainerSettings``,
``OptimizerSettings`` and ``SchedulerSettings`` has a test that fails when the engine ignores it.

``PINNED`` names that test for every field (several live in other files); a new setting without
an entry there fails ``test_every_setting_is_pinned_by_a_test``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill import Distiller
from kdistill.batching import epoch_global_batches
from kdistill.data.base import ArrayDataset
from kdistill.metrics_log import read_metrics
from kdistill.settings import OptimizerSettings, SchedulerSettings, TrainerSettings

PINNED = {
    "epochs": "test_engine.py::test_every_term_and_the_total_are_logged_each_step",
    "batch_size": "test_engine.py::test_a_labels_only_recipe_trains_on_labelled_samples_only",
    "accumulation":
        "test_engine.py::test_accumulation_matches_one_big_batch_with_labelled_normalisation",
    "seed": "test_the_seed_draws_the_batches_and_seeds_the_random_draws",
    "clip_grad_norm": "test_clipping_scales_the_gradient_to_the_bound",
    "mixed_precision": "test_engine.py::test_bf16_mixed_precision_trains_after_an_fp32_run",
    "checkpoint_every":
        "test_checkpoint.py::test_the_engine_checkpoints_every_n_steps_and_keeps_the_newest",
    "keep_checkpoints":
        "test_checkpoint.py::test_the_engine_checkpoints_every_n_steps_and_keeps_the_newest",
    "eval_every": "test_eval_every_sets_the_epochs_that_evaluate",
    "log_every": "test_log_every_sets_the_steps_that_are_logged",
    "on_nonfinite": "test_nonfinite.py::test_skip_mode_skips_exactly_the_nonfinite_step",
    "progress": "test_progress_shows_or_hides_the_bar",
    "cpu": "test_cpu_keeps_the_run_off_the_gpu",
    "workers": "test_engine_loader.py::test_workers_load_the_batches_and_never_change_them",
    "prefetch": "test_engine_loader.py::test_prefetch_sets_how_far_workers_load_ahead",
    "shuffle_buffer":
        "test_engine_loader.py::test_the_shuffle_buffer_shuffles_a_stream_locally_by_seed",
    "steps_per_epoch": "test_engine_loader.py::test_steps_per_epoch_sets_a_streams_epoch",
    "optimizer.name": "test_the_update_is_the_optimizer_the_settings_name",
    "optimizer.lr": "test_the_update_is_the_optimizer_the_settings_name",
    "optimizer.weight_decay": "test_the_update_is_the_optimizer_the_settings_name",
    "optimizer.momentum": "test_the_update_is_the_optimizer_the_settings_name",
    "optimizer.betas": "test_the_update_is_the_optimizer_the_settings_name",
    "optimizer.nesterov": "test_the_update_is_the_optimizer_the_settings_name",
    "scheduler.name": "test_schedules.py::test_every_scheduler_setting_reaches_the_run",
    "scheduler.warmup_steps": "test_schedules.py::test_every_scheduler_setting_reaches_the_run",
    "scheduler.min_ratio": "test_schedules.py::test_every_scheduler_setting_reaches_the_run",
    "scheduler.step_size": "test_schedules.py::test_every_scheduler_setting_reaches_the_run",
    "scheduler.gamma": "test_schedules.py::test_every_scheduler_setting_reaches_the_run",
}


def test_every_setting_is_pinned_by_a_test() -> None:
    fields = {name for name in TrainerSettings.model_fields
              if name not in ("optimizer", "scheduler")}
    fields |= {f"optimizer.{name}" for name in OptimizerSettings.model_fields}
    fields |= {f"scheduler.{name}" for name in SchedulerSettings.model_fields}
    assert set(PINNED) == fields
    for where in PINNED.values():  # every named test exists
        file, _, name = where.rpartition("::")
        source = Path(__file__).with_name(file) if file else Path(__file__)
        assert f"def {name}(" in source.read_text(), where


# --------------------------------------------------------------------------- helpers


def full_batch_data(digits_subset: Callable[..., ArrayDataset]) -> ArrayDataset:
    """32 labelled digits: with batch_size 32 every optimizer step sees all of them."""
    return digits_subset(32)


def ce_run(student: nn.Module, data: ArrayDataset, steps: int, **settings: Any) -> None:
    """``steps`` full-batch optimizer steps of the labels-only ``ce`` recipe."""
    result = Distiller(student, None, "ce", epochs=steps, batch_size=len(data), progress=False,
                       **settings).fit(data)
    assert [r["step"] for r in result.history if r["kind"] == "train"] == \
        list(range(1, steps + 1))


def gradients(model: nn.Module, data: ArrayDataset) -> list[torch.Tensor]:
    """The gradient of the mean cross-entropy over ``data``, by hand (autograd, no engine)."""
    model = copy.deepcopy(model)
    loss = F.cross_entropy(model(data.inputs), data.labels)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def reference_run(model: nn.Module, data: ArrayDataset, steps: int,
                  optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
                  ) -> dict[str, torch.Tensor]:
    """``steps`` full-batch steps of a torch optimizer on the mean cross-entropy, no engine."""
    model = copy.deepcopy(model)
    opt = optimizer(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(data.inputs), data.labels).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


# --------------------------------------------------------------------------- clipping


def test_clipping_scales_the_gradient_to_the_bound(digits_subset, make_mlp) -> None:
    # One plain SGD step (no momentum): the weight change is -lr x the gradient the optimizer
    # saw, so it reveals the clipped gradient.
    data, lr = full_batch_data(digits_subset), 0.5
    initial = make_mlp(seed=0)
    grad = flat(gradients(initial, data))
    norm = float(grad.norm())
    sgd = {"name": "sgd", "lr": lr, "momentum": 0.0}

    def applied_gradient(**settings: Any) -> torch.Tensor:
        student = copy.deepcopy(initial)
        ce_run(student, data, 1, optimizer=sgd, **settings)
        return (flat(initial.parameters()) - flat(student.parameters())) / lr

    bound = norm / 4  # a tiny max-norm: the gradient is four times longer
    clipped = applied_gradient(clip_grad_norm=bound)
    assert float(clipped.norm()) == pytest.approx(bound, rel=1e-4)
    torch.testing.assert_close(clipped, grad * bound / norm, rtol=0, atol=1e-5)  # same direction

    unclipped = applied_gradient()
    torch.testing.assert_close(unclipped, grad, rtol=0, atol=1e-5)
    assert float(unclipped.norm()) == pytest.approx(norm, rel=1e-4)
    assert float((unclipped - clipped).norm()) > 0.5 * norm  # a clipped run differs

    # A bound above the gradient's norm leaves it alone.
    torch.testing.assert_close(applied_gradient(clip_grad_norm=2 * norm), grad, rtol=0,
                               atol=1e-5)


# --------------------------------------------------------------------------- optimizer


def sgd(**kwargs: Any) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, **kwargs)


def adamw(**kwargs: Any) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    return lambda params: torch.optim.AdamW(params, **kwargs)


# (settings, the torch optimizer they mean, the one they would give with the field ignored)
OPTIMIZER_CASES = {
    "name=sgd": ({"name": "sgd", "lr": 0.3, "momentum": 0.0}, sgd(lr=0.3),
                 adamw(lr=0.3, weight_decay=0.0)),
    "name=adamw": ({"name": "adamw", "lr": 0.01}, adamw(lr=0.01, weight_decay=0.0),
                   sgd(lr=0.01, momentum=0.9)),
    "lr": ({"name": "sgd", "lr": 0.05, "momentum": 0.0}, sgd(lr=0.05), sgd(lr=1e-3)),
    "momentum": ({"name": "sgd", "lr": 0.3, "momentum": 0.5}, sgd(lr=0.3, momentum=0.5),
                 sgd(lr=0.3, momentum=0.9)),
    "nesterov": ({"name": "sgd", "lr": 0.3, "momentum": 0.5, "nesterov": True},
                 sgd(lr=0.3, momentum=0.5, nesterov=True), sgd(lr=0.3, momentum=0.5)),
    "weight_decay=sgd": ({"name": "sgd", "lr": 0.3, "momentum": 0.0, "weight_decay": 0.2},
                         sgd(lr=0.3, weight_decay=0.2), sgd(lr=0.3)),
    "betas": ({"name": "adamw", "lr": 0.01, "betas": (0.5, 0.6)},
              adamw(lr=0.01, betas=(0.5, 0.6), weight_decay=0.0),
              adamw(lr=0.01, weight_decay=0.0)),
    "weight_decay=adamw": ({"name": "adamw", "lr": 0.01, "weight_decay": 0.5},
                           adamw(lr=0.01, weight_decay=0.5), adamw(lr=0.01, weight_decay=0.0)),
}


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_the_update_is_the_optimizer_the_settings_name(case, digits_subset, make_mlp,
                                                       take_snapshot, weights_diff) -> None:
    # Three full-batch steps (momentum and Adam's moments matter from the second step on)
    # against the torch optimizer the settings describe, run by hand.
    settings, meant, ignored = OPTIMIZER_CASES[case]
    data, steps = full_batch_data(digits_subset), 3
    initial = make_mlp(seed=0)
    expected = reference_run(initial, data, steps, meant)
    # The case is sensitive: the setting ignored would give other weights.
    assert weights_diff(expected, reference_run(initial, data, steps, ignored)) > 1e-4
    student = copy.deepcopy(initial)
    ce_run(student, data, steps, optimizer=settings)
    assert weights_diff(take_snapshot(student), expected) < 1e-6


# --------------------------------------------------------------------------- seed


class MarkerRecorder(nn.Module):
    """Wraps a model; records the marker pixel (the sample index) of every training forward."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.seen += x[:, 0, 0, 0].detach().round().long().tolist()
        return self.inner(x)


def test_the_seed_draws_the_batches_and_seeds_the_random_draws(digits_subset, make_mlp,
                                                                take_snapshot,
                                                                weights_diff) -> None:
    data = digits_subset(64)
    data.inputs[:, 0, 0, 0] = torch.arange(64, dtype=torch.float32)  # marker = sample index
    orders = {}
    for seed in (0, 3):
        student = MarkerRecorder(make_mlp(seed=0))
        Distiller(student, None, "ce", epochs=2, batch_size=16, seed=seed,
                  progress=False).fit(data)
        expected = [i for epoch in (0, 1)
                    for batch in epoch_global_batches(list(range(64)), 16, 1, seed, 0, epoch)
                    for i in batch]
        assert student.seen == expected
        orders[seed] = student.seen
    assert orders[0] != orders[3]

    # Dropout draws from the run's seed, not from whatever the global generator holds.
    def dropout_run(seed: int, scramble: int) -> dict[str, torch.Tensor]:
        student = make_mlp(seed=0, dropout=0.5)
        torch.manual_seed(scramble)
        Distiller(student, None, "ce", epochs=1, batch_size=32, seed=seed,
                  progress=False).fit(data)
        return take_snapshot(student)

    first = dropout_run(seed=3, scramble=100)
    assert weights_diff(first, dropout_run(seed=3, scramble=200)) == 0
    assert weights_diff(first, dropout_run(seed=4, scramble=100)) > 1e-4


# --------------------------------------------------------------------------- logging


def test_log_every_sets_the_steps_that_are_logged(tmp_path, digits_subset, make_mlp) -> None:
    # 64 samples in batches of 16 for 2 epochs: steps 1..8; every third step is logged.
    result = Distiller(make_mlp(seed=0), None, "ce", epochs=2, batch_size=16, log_every=3,
                       progress=False, run_dir=tmp_path).fit(digits_subset(64))
    assert [r["step"] for r in result.history if r["kind"] == "train"] == [3, 6]
    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged if r["kind"] == "train"] == [3, 6]
    assert [(r["epoch"], r["step"]) for r in logged if r["kind"] == "eval"] == [(1, 4), (2, 8)]


def test_eval_every_sets_the_epochs_that_evaluate(digits_subset, make_mlp) -> None:
    # 2 steps per epoch, 5 epochs, evaluation every 2 epochs and at the end of the phase.
    seen: list[dict[str, Any]] = []
    result = Distiller(make_mlp(seed=0), None, "ce", epochs=5, batch_size=32, eval_every=2,
                       progress=False).fit(digits_subset(64), digits_subset(32),
                                           callbacks=[seen.append])
    evaluations = [r for r in result.history if r["kind"] == "eval"]
    assert [(r["epoch"], r["step"]) for r in evaluations] == [(2, 4), (4, 8), (5, 10)]
    assert all("eval_accuracy" in r for r in evaluations)
    assert seen == evaluations


@pytest.mark.parametrize("progress", [True, False])
def test_progress_shows_or_hides_the_bar(capsys, digits_subset, make_mlp, progress) -> None:
    data = digits_subset(64)
    result = Distiller(make_mlp(seed=0), None, "ce", epochs=2, batch_size=16,
                       progress=progress).fit(data, data)
    shown = capsys.readouterr().err
    accuracy = result.evaluations()[-1]["eval_accuracy"]
    if progress:
        assert "8/8" in shown  # the bar ends with every step done
        assert f"epoch 2: eval_accuracy={accuracy:.4g}" in shown
    else:
        assert "8/8" not in shown and "epoch" not in shown


# --------------------------------------------------------------------------- devices


def test_cpu_keeps_the_run_off_the_gpu(monkeypatch) -> None:
    # No GPU here: pretend there is one and read what the engine asks Accelerate for.
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from kdistill.engine import loop

    asked: list[dict[str, Any]] = []

    def accelerator(**kwargs: Any) -> SimpleNamespace:
        asked.append(kwargs)
        return SimpleNamespace(distributed_type=DistributedType.NO)

    monkeypatch.setattr(loop, "Accelerator", accelerator)
    monkeypatch.setattr(loop.torch.cuda, "is_available", lambda: True)
    loop.make_accelerator(TrainerSettings(cpu=True))
    loop.make_accelerator(TrainerSettings(cpu=False))
    monkeypatch.setattr(loop.torch.cuda, "is_available", lambda: False)
    loop.make_accelerator(TrainerSettings(cpu=False))
    assert [a["cpu"] for a in asked] == [True, False, True]
