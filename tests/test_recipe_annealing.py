"""Annealing-KD: the phi schedule on hand values, the phase split, phase 1 blind to labels, and
phase 2 starting from the best phase-1 student."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdistill.checkpoint import load_checkpoint
from kdistill.data.base import ArrayDataset
from kdistill.engine import Distiller, Phase
from kdistill.recipes.annealing import Annealing
from kdistill.recipes.shared import anneal_factor
from kdistill.schedules import TrainState
from kdistill.taps import Taps

TRAIN = {"batch_size": 32, "progress": False, "seed": 0, "optimizer": {"lr": 0.01}}


@pytest.mark.parametrize(("epochs", "t_max", "expected"), [
    # one temperature per epoch: phi = (e + 1) / 10
    (10, 10, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
    # 25 epochs, T_max 10: T drops every 2 epochs and stays at 1 from epoch 18 on
    (25, 10, [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8, 0.8,
              0.9, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    # fewer epochs than T_max: one step per epoch, phi ends at 4 / 10
    (4, 10, [0.1, 0.2, 0.3, 0.4]),
    (6, 3, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0, 1.0]),
    (3, 1, [1.0, 1.0, 1.0]),
])
def test_phi_schedule_by_hand(epochs: int, t_max: int, expected: list[float]) -> None:
    assert [anneal_factor(e, epochs, t_max) for e in range(epochs)] == pytest.approx(expected)


def test_phi_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="t_max must be >= 1, got 0"):
        anneal_factor(0, 5, 0)
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        anneal_factor(-1, 5, 2)


def test_phase_one_term_regresses_on_scaled_teacher_logits() -> None:
    torch.manual_seed(0)
    z_s, z_t = torch.randn(4, 3), torch.randn(4, 3)
    # epoch 2 of a 6-epoch phase (3 steps per epoch) with t_max 3: T = 2, phi = 2/3
    state = TrainState(0, 2, 7, 2 + 2 / 3, 3, 18)
    terms = Annealing(t_max=3).terms(Taps({"logits": z_s}), Taps({"logits": z_t}), {}, state)
    assert set(terms) == {"mse"} and terms["mse"].weight == 1.0
    assert terms["mse"].unit == "examples"
    expected = ((z_s - 2 / 3 * z_t) ** 2).sum() / 12
    torch.testing.assert_close(terms["mse"].value, expected)


def test_phases_split_the_budget() -> None:
    (first, n1), (second, n2) = Annealing().phases(15)
    assert (first.name, n1, second.name, n2) == ("annealing", 10, "ce", 5)
    assert first.keep_best == "agreement" and second.keep_best is None
    assert not second.uses_teacher and not second.uses_unlabeled and first.uses_unlabeled
    assert [n for _, n in Annealing().phases(2)] == [1, 1]
    assert [n for _, n in Annealing(phase1_epochs=3).phases(5)] == [3, 2]
    with pytest.raises(ValueError, match="at least 2 epochs"):
        Annealing().phases(1)
    with pytest.raises(ValueError, match=r"phase1_epochs \(5\) must be smaller than epochs"):
        Annealing(phase1_epochs=5).phases(5)


def with_labels(data: ArrayDataset, labels: torch.Tensor) -> ArrayDataset:
    return ArrayDataset(data.inputs, labels)


def test_phase_one_ignores_labels(digits_subset: Callable[..., ArrayDataset],
                                  make_mlp: Callable[..., nn.Module],
                                  take_snapshot: Callable, weights_diff: Callable) -> None:
    """Same seed, labels partly hidden / scrambled / all hidden: identical weights."""
    train, evaluation = digits_subset(96, labeled=30), digits_subset(40)
    generator = torch.Generator().manual_seed(1)
    scrambled = torch.randint(0, 10, train.labels.shape, generator=generator)
    variants = [train, with_labels(train, scrambled),
                with_labels(train, torch.full_like(train.labels, -100))]
    assert not torch.equal(scrambled, train.labels)
    teacher = make_mlp(seed=7, hidden=(32,))
    finals = []
    for data in variants:
        student = make_mlp(seed=0)
        start = take_snapshot(student)
        Distiller(student, teacher, phases=[Phase(Annealing(t_max=3), 3, name="anneal")],
                  **TRAIN).fit(data, evaluation)
        assert weights_diff(start, take_snapshot(student)) > 1e-3  # it did train
        finals.append(take_snapshot(student))
    assert weights_diff(finals[0], finals[1]) == 0.0
    assert weights_diff(finals[0], finals[2]) == 0.0


def test_phase_two_starts_from_the_best_phase_one_epoch(
        tmp_path: Path, digits_subset: Callable[..., ArrayDataset],
        make_mlp: Callable[..., nn.Module], take_snapshot: Callable,
        weights_diff: Callable) -> None:
    """An evaluator makes phase-1 epoch 2 of 4 the best; the student that phase 2 first runs
    holds that epoch's checkpointed weights, not the last phase-1 epoch's."""
    scores = iter([0.2, 0.9, 0.5, 0.9, 0.0, 0.0])  # ties do not replace the best
    calls = {"evaluations": 0}

    def evaluator(student: nn.Module, teacher: Any) -> dict[str, float]:
        calls["evaluations"] += 1
        return {"agreement": next(scores)}

    student = make_mlp(seed=0)
    seen: list[dict[str, torch.Tensor]] = []

    def first_forward_after_phase_one(module: nn.Module, args: Any) -> None:
        if calls["evaluations"] == 4 and not seen:
            seen.append(take_snapshot(module))

    student.register_forward_pre_hook(first_forward_after_phase_one)
    recipe = Annealing(t_max=2, phase1_epochs=4)
    result = Distiller(student, make_mlp(seed=7, hidden=(32,)), recipe, epochs=6,
                       run_dir=tmp_path, evaluator=evaluator, keep_checkpoints=20,
                       **TRAIN).fit(digits_subset(96, labeled=60))
    assert calls["evaluations"] == 6 and len(seen) == 1

    def checkpointed(epoch: int) -> dict[str, torch.Tensor]:
        for path in (tmp_path / "checkpoints").glob("step-*"):
            checkpoint = load_checkpoint(path)
            if (checkpoint.trainer["phase"], checkpoint.trainer["epoch"]) == (0, epoch):
                return {k[len("student."):]: v for k, v in checkpoint.weights.items()
                        if k.startswith("student.")}
        raise AssertionError(f"no checkpoint of phase 0 epoch {epoch}")

    assert weights_diff(seen[0], checkpointed(2)) == 0.0
    assert weights_diff(seen[0], checkpointed(4)) > 1e-3  # not simply the last phase-1 weights
    restored = [r for r in result.history if r["kind"] == "restore_best"]
    assert [(r["phase"], r["epoch"], r["metric"]) for r in restored] == [(0, 2, "agreement")]
    assert weights_diff(seen[0], take_snapshot(student)) > 1e-3  # then phase 2 trained on
