"""``okdhp``: the multi-branch student, the aggregation unit and the detached ensemble target."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from kdistill import Distiller
from kdistill.models.heads import MultiBranchStudent
from kdistill.recipes.okdhp import OKDHP, BranchGate
from kdistill.schedules import TrainState
from kdistill.taps import TapReader, Taps


def built(recipe: OKDHP, student: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The wrapped student and its stacked heads on ``x``, the recipe's gate built from them."""
    wrapped = recipe.wrap_student(student)
    with TapReader(wrapped, recipe.student_taps()) as reader:
        taps = reader({"input": x})
    recipe.build(taps, None)
    return wrapped, taps


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_terms_against_an_independent_computation(make_mlp):
    """With the gate at its zero start the ensemble is the mean of the branch logits; every
    branch's CE (labelled samples), the ensemble's CE and T^2 KL(p_ens || p_j) summed over the
    branches, recomputed in numpy."""
    recipe = OKDHP(branches=3, temperature=2.0, kl_weight=0.5, ensemble_weight=2.5)
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    _, taps = built(recipe, make_mlp(seed=0), x)
    labels = [3, -100, 7, 1]
    terms = recipe.terms(taps, None, {"labels": torch.tensor(labels)}, TrainState())
    z = taps["heads"].detach().double().numpy()  # [3, 4, 10]
    ens = z.mean(axis=0)
    rows = [0, 2, 3]

    def nll(logits: np.ndarray) -> float:
        logp = np_log_softmax(logits)
        return float(np.mean([-logp[i, labels[i]] for i in rows]))

    log_pe = np_log_softmax(ens / 2.0)
    kl = sum(4.0 * float((np.exp(log_pe) * (log_pe - np_log_softmax(z[j] / 2.0))).sum(1).mean())
             for j in range(3))
    assert terms["ce"].value.item() == pytest.approx(sum(nll(z[j]) for j in range(3)), rel=1e-5)
    assert terms["ce_ensemble"].value.item() == pytest.approx(nll(ens), rel=1e-5)
    assert terms["kl"].value.item() == pytest.approx(kl, rel=1e-4)
    assert (terms["ce"].unit, terms["ce_ensemble"].unit, terms["kl"].unit) == \
        ("labeled", "labeled", "examples")
    assert (terms["ce"].weight, terms["ce_ensemble"].weight, terms["kl"].weight) == \
        (1.0, 2.5, 0.5)


def phase_state(share: float, steps: int = 140) -> TrainState:
    """The state of a phase of ``steps`` one-step epochs once ``share`` of it is done."""
    done = round(share * steps)
    return TrainState(epoch=max(done - 1, 0), step=max(done - 1, 0), epoch_progress=float(done),
                      steps_per_epoch=1, total_steps=steps)


@pytest.mark.parametrize(("share", "weight"), [
    (0.0, 5 * math.exp(-5)),                  # the official epoch 0: 5 e^-5
    (15 / 140, 5 * math.exp(-5 * 0.75**2)),   # epoch 15 of the official 60-epoch ramp
    (30 / 140, 5 * math.exp(-5 * 0.25)),
    (60 / 140, 5.0), (100 / 140, 5.0), (1.0, 5.0)])
def test_the_defaults_are_the_official_codes(share, weight):
    """OKDHP's official code (lib/config/default.py, tools/train.py): KD weight 5 ramped by
    exp(-5 (1 - e / 60)^2) over the first 60 of 140 epochs, ensemble weight 6, no temperature
    (T = 1), no stop-gradient on the ensemble."""
    recipe = OKDHP()
    p = recipe.params
    assert (p.temperature, p.ensemble_weight, p.detach_ensemble, p.branches) == \
        (1.0, 6.0, False, 3)
    taps = Taps({"heads": torch.randn(3, 4, 10), recipe.trunk_tap: torch.randn(4, 16)})
    recipe.build(taps, None)
    terms = recipe.terms(taps, None, {"labels": torch.arange(4)}, phase_state(share))
    assert terms["kl"].weight == pytest.approx(weight, rel=1e-9)
    assert terms["ce_ensemble"].weight == 6.0
    assert recipe.trunk_tap == "module:student.features"


def test_the_kl_term_reaches_the_gate_unless_the_ensemble_is_detached(make_mlp):
    """Official: KL(p_ens || p_j) trains the branches directly and through the ensemble, and
    the aggregation unit; detach_ensemble makes the ensemble a fixed target."""
    for detach in (False, True):
        recipe = OKDHP(branches=3, branch_widths=[8, 24], detach_ensemble=detach)
        torch.manual_seed(0)
        wrapped, taps = built(recipe, make_mlp(seed=0), torch.randn(6, 1, 8, 8))
        terms = recipe.terms(taps, None, {"labels": torch.full((6,), -100)}, TrainState())
        terms["kl"].value.backward()
        branches = [wrapped.student.head, *wrapped.extra]
        for j, branch in enumerate(branches):
            grads = [p.grad for p in branch.parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"branch {j}"
        assert wrapped.student.features[1].weight.grad.abs().sum() > 0  # the shared trunk
        gate_grads = [p.grad for p in recipe.gate.parameters()]
        if detach:
            assert all(g is None for g in gate_grads)
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in gate_grads)


def test_the_ensemble_ce_trains_the_gate(make_mlp):
    recipe = OKDHP(detach_ensemble=True)
    torch.manual_seed(0)
    _, taps = built(recipe, make_mlp(seed=0), torch.randn(6, 1, 8, 8))
    terms = recipe.terms(taps, None, {"labels": torch.arange(6)}, TrainState())
    terms["ce_ensemble"].value.backward()
    assert recipe.gate.linear.weight.grad.abs().sum() > 0
    assert recipe.gate.linear.bias.grad.abs().sum() > 0


def test_the_gate_weighs_branches_per_sample_and_class_from_the_features():
    gate = BranchGate(in_features=2, branches=2, num_classes=3)
    heads = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
                          [[0.0, 0.0, 3.0], [4.0, 0.0, 0.0]]])  # [k=2, B=2, C=3]
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # [B=2, F=2]
    torch.testing.assert_close(gate(features, heads), heads.mean(0))  # zero start: the mean
    with torch.no_grad():
        # Score of (branch 0, class 1) = 4 * f[0]; of (branch 1, class 2) = -2 * f[1].
        gate.linear.weight.zero_()
        gate.linear.weight[1, 0] = 4.0       # row j * C + c = 0 * 3 + 1
        gate.linear.weight[5, 1] = -2.0      # row 1 * 3 + 2
    g0 = torch.full((2, 3), 0.5)  # the weight of branch 0 per sample and class
    g0[0, 1] = math.exp(4) / (math.exp(4) + 1)   # sample 0, class 1 leans to branch 0
    g0[1, 2] = 1 / (1 + math.exp(-2))            # sample 1, class 2 leans to branch 0 too
    torch.testing.assert_close(gate(features, heads), g0 * heads[0] + (1 - g0) * heads[1])
    torch.testing.assert_close(gate.weights(features).sum(0), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"built for 2 branches on features \[\.\.\., 2\]; "
                                         r"got heads \(2, 2, 3\) and trunk features \(2, 5\)"):
        gate(torch.ones(2, 5), heads)
    with pytest.raises(ValueError, match=r"got heads \(3, 2, 3\)"):
        gate(features, torch.ones(3, 2, 3))


def test_the_aggregation_unit_changes_through_distiller(digits_subset, make_mlp):
    recipe = OKDHP(branches=3)
    result = Distiller(make_mlp(seed=0, hidden=(16,)), None, recipe, epochs=3, batch_size=8,
                       progress=False, optimizer={"lr": 0.01}).fit(digits_subset(48, labeled=24))
    assert isinstance(result.student, MultiBranchStudent)
    # The gate starts at exactly zero; a few steps of its CE move it.
    assert recipe.gate.linear.weight.abs().max() > 1e-4
    assert recipe.gate.linear.bias.abs().max() > 1e-4
    train = [r for r in result.history if r["kind"] == "train"]
    assert {"ce", "ce_ensemble", "kl"} <= set(train[0])


def test_export_keeps_exactly_the_trunk_and_branch_zero(make_mlp):
    student = make_mlp(seed=0, hidden=(16,))
    names = {n for n, _ in student.named_parameters()}
    wrapped = OKDHP(branches=4).wrap_student(student)
    exported = wrapped.export()
    assert {n for n, _ in exported.named_parameters()} == names
    assert sum(p.numel() for p in wrapped.parameters()) == \
        sum(p.numel() for p in student.parameters()) + 3 * (16 * 10 + 10)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out = wrapped(x)
        torch.testing.assert_close(exported(x), out["logits"])
        torch.testing.assert_close(out["heads"][0], out["logits"])
        assert out["heads"].shape == (4, 3, 10)
        # The copies of the head are re-initialised, not clones of branch 0.
        assert not torch.allclose(out["heads"][1], out["heads"][0])


def test_branch_widths_and_wrapping():
    with pytest.raises(ValidationError, match="branch_widths needs one hidden width per extra"):
        OKDHP(branches=3, branch_widths=[8])
    with pytest.raises(ValidationError, match="branches"):
        OKDHP(branches=1)


def test_unequal_branches_and_idempotent_wrapping(make_mlp):
    recipe = OKDHP(branches=3, branch_widths=[8, 32])
    wrapped = recipe.wrap_student(make_mlp(seed=0, hidden=(16,)))
    assert [b[0].out_features for b in wrapped.extra] == [8, 32]
    assert recipe.wrap_student(wrapped) is wrapped
    with pytest.raises(ValueError, match="branches=2 but the student is already wrapped with 3"):
        OKDHP(branches=2).wrap_student(wrapped)


class Body(nn.Module):
    """A student whose branch point is called ``body``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU())
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_the_gate_reads_the_features_of_the_branch_point_it_is_given():
    recipe = OKDHP(features="body")
    assert recipe.trunk_tap == "module:student.body"
    torch.manual_seed(0)
    x = torch.randn(5, 1, 8, 8)
    wrapped, taps = built(recipe, Body(), x)
    with torch.no_grad():
        torch.testing.assert_close(taps[recipe.trunk_tap], wrapped.student.body(x))
    assert recipe.gate.linear.in_features == 12
    terms = recipe.terms(taps, None, {"labels": torch.arange(5)}, TrainState())
    assert torch.isfinite(terms["kl"].value)
