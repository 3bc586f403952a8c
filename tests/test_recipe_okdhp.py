"""``okdhp``: the multi-branch student, the aggregation unit and the detached ensemble target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from kdistill import Distiller
from kdistill.models.heads import MultiBranchStudent
from kdistill.recipes.okdhp import OKDHP, BranchGate
from kdistill.schedules import TrainState
from kdistill.taps import TapReader


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
    recipe = OKDHP(branches=3, temperature=2.0, kl_weight=0.5)
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
    assert terms["kl"].weight == 0.5


def test_the_kl_term_reaches_every_branch_and_not_the_gate(make_mlp):
    recipe = OKDHP(branches=3, branch_widths=[8, 24])
    torch.manual_seed(0)
    wrapped, taps = built(recipe, make_mlp(seed=0), torch.randn(6, 1, 8, 8))
    with torch.no_grad():  # a gate away from its zero start, so it would pass gradients on
        recipe.gate.linear.weight.normal_()
    terms = recipe.terms(taps, None, {"labels": torch.full((6,), -100)}, TrainState())
    terms["kl"].value.backward()
    branches = [wrapped.student.head, *wrapped.extra]
    for j, branch in enumerate(branches):
        grads = [p.grad for p in branch.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), f"branch {j}"
    assert wrapped.student.features[1].weight.grad.abs().sum() > 0  # the shared trunk
    assert all(p.grad is None for p in recipe.gate.parameters())


def test_the_ensemble_ce_trains_the_gate(make_mlp):
    recipe = OKDHP()
    torch.manual_seed(0)
    _, taps = built(recipe, make_mlp(seed=0), torch.randn(6, 1, 8, 8))
    terms = recipe.terms(taps, None, {"labels": torch.arange(6)}, TrainState())
    terms["ce_ensemble"].value.backward()
    assert recipe.gate.linear.weight.grad.abs().sum() > 0
    assert recipe.gate.linear.bias.grad.abs().sum() > 0


def test_the_gate_weighs_branches_per_sample():
    gate = BranchGate(branches=2, num_classes=3)
    heads = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
                          [[0.0, 0.0, 3.0], [4.0, 0.0, 0.0]]])  # [k=2, B=2, C=3]
    torch.testing.assert_close(gate(heads), heads.mean(0))  # zero start: the plain mean
    with torch.no_grad():
        # Gate logit of branch 0 = 5 * z_0[class 0]: sample 0 leans to branch 0, sample 1 not.
        gate.linear.weight.zero_()
        gate.linear.weight[0, 0] = 5.0
    g0 = torch.softmax(torch.tensor([[5.0, 0.0], [0.0, 0.0]]), -1)  # per sample
    expected = g0[:, :1] * heads[0] + g0[:, 1:] * heads[1]
    torch.testing.assert_close(gate(heads), expected)
    torch.testing.assert_close(gate.weights(heads).sum(0), torch.ones(2))


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
