"""Continuation-KD: the hinge on hand values, the psi/phi schedules, and Annealing-KD's losses
reproduced exactly with margin 0 and a step psi."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from kdistill import losses
from kdistill.recipes.annealing import Annealing
from kdistill.recipes.continuation import Continuation, hinge_mse
from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.taps import Taps

STEPS_PER_EPOCH = 3


def state_at(epoch: int, batch: int, epochs: int) -> TrainState:
    """The engine's state at ``batch`` (0-based) of ``epoch`` in a phase of ``epochs``."""
    return TrainState(0, epoch, epoch * STEPS_PER_EPOCH + batch,
                      epoch + (batch + 1) / STEPS_PER_EPOCH, STEPS_PER_EPOCH,
                      STEPS_PER_EPOCH * epochs)


def weighted_sum(terms: dict) -> torch.Tensor:
    return sum(t.weight * t.value for t in terms.values())


def test_hinge_against_hand_values() -> None:
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # d_b = mean over classes of squared differences: (0 + 4)/2 = 2, (1 + 1)/2 = 1, (9 + 4)/2
    # = 6.5; margin 1.5 keeps max(0, d - 1.5) = 0.5, 0, 5.0 -> mean 5.5 / 3.
    assert hinge_mse(student, target, 1.5).item() == pytest.approx(5.5 / 3)
    assert hinge_mse(student, target, 0.0).item() == pytest.approx(9.5 / 3)


def test_hinge_gives_no_gradient_inside_the_margin() -> None:
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # d = 2 and 1
    hinge_mse(student, target, 1.5).backward()
    assert torch.all(student.grad[1] == 0)  # d = 1 < 1.5: inside the margin
    # row 0: d_0 = sum_c (z - t)^2 / 2 classes, so d d_0 / dz = z - t = (0, 2); the mean over
    # the 2 rows halves it
    assert student.grad[0].tolist() == pytest.approx([0.0, 1.0])


def test_hinge_names_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"student \(2, 3\) and target \(2, 4\)"):
        hinge_mse(torch.zeros(2, 3), torch.zeros(2, 4), 0.0)


def test_default_psi_and_phi_schedules() -> None:
    """9 epochs: psi = e / 9 over the whole phase; phi anneals over 6 epochs (two thirds), T
    stepping down every 2 epochs from t_max = 3."""
    recipe = Continuation(t_max=3)
    psi, phi = recipe.schedules(state_at(0, 0, 9))  # after the first step: e = 1/3
    assert psi == pytest.approx(1 / 27) and phi == pytest.approx(1 / 3)
    psi, phi = recipe.schedules(state_at(2, 2, 9))  # end of the third epoch: e = 3
    assert psi == pytest.approx(3 / 9) and phi == pytest.approx(2 / 3)
    psi, phi = recipe.schedules(state_at(5, 2, 9))  # end of the annealing span
    assert psi == pytest.approx(6 / 9) and phi == pytest.approx(1.0)
    psi, phi = recipe.schedules(state_at(8, 2, 9))  # last step: pure CE, phi stays 1
    assert psi == pytest.approx(1.0) and phi == pytest.approx(1.0)


def test_terms_are_named_and_weighted_by_psi() -> None:
    torch.manual_seed(0)
    z_s, z_t = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([1, -100, 3, 0])
    recipe = Continuation(t_max=4, anneal_epochs=4, margin=0.25,
                          psi=ScheduleConfig(name="constant", start=0.3))
    terms = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), {"labels": labels},
                         state_at(1, 0, 6))
    assert set(terms) == {"ce", "hinge"}
    assert terms["ce"].weight == pytest.approx(0.3) and terms["ce"].unit == "labeled"
    assert terms["hinge"].weight == pytest.approx(0.7) and terms["hinge"].unit == "examples"
    phi = 0.5  # epoch 1 of a 4-epoch span with t_max 4: T = 3
    distance = ((z_s - phi * z_t) ** 2).mean(dim=1)
    expected = torch.clamp(distance - 0.25 * phi, min=0).mean()
    torch.testing.assert_close(terms["hinge"].value, expected)
    torch.testing.assert_close(terms["ce"].value, losses.cross_entropy(z_s, labels))


def test_margin_zero_and_step_psi_reproduce_annealing() -> None:
    """Same taps, same states: before the step the weighted sum is Annealing-KD's phase-1 MSE,
    from the step on it is its phase-2 cross-entropy."""
    epochs, anneal = 9, 6
    step = ScheduleConfig(name="step", unit="steps", boundaries=[anneal * STEPS_PER_EPOCH],
                          values=[0.0, 1.0])
    continuation = Continuation(t_max=3, anneal_epochs=anneal, margin=0.0, psi=step)
    phase1, phase2 = (recipe for recipe, _ in Annealing(t_max=3).phases(epochs))
    assert [n for _, n in Annealing(t_max=3).phases(epochs)] == [anneal, epochs - anneal]
    torch.manual_seed(0)
    labels = torch.tensor([2, -100, 0, 4, -100, 1])
    for epoch in range(epochs):
        for batch in range(STEPS_PER_EPOCH):
            student = Taps({"logits": torch.randn(6, 5) * 3})
            teacher = Taps({"logits": torch.randn(6, 5) * 3})
            mixed = weighted_sum(continuation.terms(student, teacher, {"labels": labels},
                                                    state_at(epoch, batch, epochs)))
            if epoch < anneal:
                reference = phase1.terms(student, teacher, {"labels": labels},
                                         state_at(epoch, batch, anneal))
                assert set(reference) == {"mse"}
            else:
                reference = phase2.terms(student, None, {"labels": labels},
                                         state_at(epoch - anneal, batch, epochs - anneal))
                assert set(reference) == {"ce"}
            torch.testing.assert_close(mixed, weighted_sum(reference), rtol=1e-6, atol=0)


def test_margin_changes_the_loss_where_annealing_would_not() -> None:
    """The control for the test above: with a margin the hinge is below the MSE."""
    torch.manual_seed(1)
    student, teacher = Taps({"logits": torch.randn(8, 5)}), Taps({"logits": torch.randn(8, 5)})
    psi = ScheduleConfig(name="constant", start=0.0)
    batch, state = {"labels": torch.zeros(8, dtype=torch.long)}, state_at(0, 0, 6)
    plain = Continuation(margin=0.0, psi=psi).terms(student, teacher, batch, state)["hinge"]
    wide = Continuation(margin=1.0, psi=psi).terms(student, teacher, batch, state)["hinge"]
    assert wide.value < plain.value - 0.05


def test_psi_outside_the_unit_interval_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"psi[\s\S]*within \[0, 1\]"):
        Continuation(psi=ScheduleConfig(name="linear", start=0.0, end=2.0))
    with pytest.raises(ValidationError, match="margin"):
        Continuation(margin=-1.0)
