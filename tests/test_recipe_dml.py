"""Deep mutual learning (``dml``): the loss of k peers against a hand computation, each peer's
gradient from its own loss only, the peers the recipe builds, and a short fit through
``Distiller`` that trains every peer."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from kdistill import Distiller
from kdistill.models.fresh import reinitialised
from kdistill.recipes.mutual import DeepMutualLearning, mutual_terms
from kdistill.recipes.shared import distinct_from
from kdistill.taps import Taps
from kdistill.teachers import FrozenTeacher, PeerTeacher

LABELS = torch.tensor([2, -100, 0, 1])  # one hidden label: CE averages over the other three


def fixed_logits(k: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(4, 3, generator=g, dtype=torch.float64)).requires_grad_()
            for _ in range(k)]


def hand_loss(z: list[torch.Tensor], i: int, labels: torch.Tensor, t: float,
              detach_others: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CE_i and KL_i written out with plain tensor arithmetic (no library loss)."""

    def log_p(x: torch.Tensor, temp: float) -> torch.Tensor:
        return x / temp - torch.logsumexp(x / temp, dim=1, keepdim=True)

    known = labels != -100
    ce = -log_p(z[i], 1.0)[known, labels[known]].mean()
    kls = []
    for j in range(len(z)):
        if j == i:
            continue
        target = z[j].detach() if detach_others else z[j]
        lp_j, lp_i = log_p(target, t), log_p(z[i], t)
        kls.append((lp_j.exp() * (lp_j - lp_i)).sum(1).mean())
    return ce, t * t * sum(kls) / (len(z) - 1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_three_peers_match_a_hand_computation(temperature: float) -> None:
    z = fixed_logits(3)
    terms = mutual_terms(z, LABELS, temperature)
    assert set(terms) == {"ce", "kl", "peer1_ce", "peer1_kl", "peer2_ce", "peer2_kl"}
    for i, prefix in enumerate(["", "peer1_", "peer2_"]):
        ce, kl = hand_loss(z, i, LABELS, temperature)
        assert terms[f"{prefix}ce"].value.item() == pytest.approx(ce.item(), rel=1e-10)
        assert terms[f"{prefix}kl"].value.item() == pytest.approx(kl.item(), rel=1e-10)
        assert terms[f"{prefix}ce"].unit == "labeled"
        assert terms[f"{prefix}kl"].unit == "examples"
        assert terms[f"{prefix}ce"].weight == terms[f"{prefix}kl"].weight == 1.0
    # One concrete number so that a change in the formula cannot hide behind the helper.
    p = torch.softmax(torch.tensor([[0.0, math.log(3.0)]]), 1)  # [1/4, 3/4]
    q = torch.softmax(torch.tensor([[0.0, 0.0]]), 1)            # [1/2, 1/2]
    two = mutual_terms([torch.log(q), torch.log(p)], torch.tensor([1]))
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(p || q)
    assert two["kl"].value.item() == pytest.approx(expected, rel=1e-6)
    assert two["ce"].value.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_each_peer_is_trained_by_its_own_loss_only() -> None:
    """One backward through the sum of all terms gives peer i the gradient of L_i alone: the
    other peers' predictions are constants in L_i."""
    z = fixed_logits(3, seed=1)
    total = sum(t.value * t.weight for t in mutual_terms(z, LABELS, 2.0).values())
    total.backward()
    for i in range(3):
        ref = [x.detach().clone().requires_grad_() for x in z]
        ce, kl = hand_loss(ref, i, LABELS, 2.0, detach_others=False)
        (ce + kl).backward()
        assert torch.allclose(z[i].grad, ref[i].grad, atol=1e-12)
        # ... and L_i would move the other peers if it were not detached:
        other = (i + 1) % 3
        assert ref[other].grad is not None and ref[other].grad.abs().max() > 1e-3


def test_peers_parameter_is_validated() -> None:
    with pytest.raises(ValidationError, match="peers"):
        DeepMutualLearning(peers=1)
    with pytest.raises(ValidationError, match="temperature"):
        DeepMutualLearning(temperature=0)
    with pytest.raises(ValueError, match="at least 2 peers"):
        mutual_terms(fixed_logits(1), LABELS)


def test_the_source_holds_the_teacher_model_and_reinitialised_copies(make_mlp) -> None:
    student, teacher = make_mlp(seed=0), make_mlp(seed=1, hidden=(24,))
    torch.manual_seed(5)
    source = DeepMutualLearning(peers=4).teacher_source(student, teacher)
    assert isinstance(source, PeerTeacher)
    peers = list(source.peers)
    assert len(peers) == 3 and peers[0] is teacher
    shapes = {k: v.shape for k, v in teacher.state_dict().items()}
    for a in range(3):
        assert {k: v.shape for k, v in peers[a].state_dict().items()} == shapes
        for b in range(a):
            weights_a, weights_b = peers[a].state_dict(), peers[b].state_dict()
            assert all(not torch.equal(weights_a[k], weights_b[k]) for k in weights_a
                       if k.endswith("weight"))
    # Without a teacher model the peers are re-initialised copies of the student.
    alone = DeepMutualLearning(peers=2).teacher_source(student, None)
    (peer,) = list(alone.peers)
    assert peer is not student
    for name, value in student.state_dict().items():
        assert peer.state_dict()[name].shape == value.shape
        assert not torch.equal(peer.state_dict()[name], value), name


def test_reinitialised_resets_batchnorm_statistics(make_cnn) -> None:
    model = make_cnn(seed=0)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.fill_(3.0)
    fresh = next(m for m in reinitialised(model).modules()
                 if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(fresh.running_mean, torch.zeros_like(fresh.running_mean))
    assert torch.equal(bn.running_mean, torch.full_like(bn.running_mean, 3.0))  # original kept


def test_a_frozen_teacher_is_refused_with_the_count_needed(make_mlp) -> None:
    teacher = FrozenTeacher(make_mlp(seed=1))
    teacher.bind(["logits"], torch.device("cpu"))
    batch = {"input": torch.randn(4, 1, 8, 8), "labels": LABELS}
    student = Taps({"logits": torch.randn(4, 10)})
    with pytest.raises(ValueError, match=r"peers=3 needs 2 trainable peer model\(s\).*got 0"):
        DeepMutualLearning(peers=3).terms(student, teacher(batch), batch, None)  # type: ignore


def test_a_fit_trains_the_student_and_every_peer(digits_subset, make_mlp, take_snapshot,
                                                 weights_diff) -> None:
    """k = 3 through Distiller: the student and both peers move, every peer's terms are
    logged at each step and the logged total is their sum."""
    student, teacher = make_mlp(seed=0), make_mlp(seed=1, hidden=(24,))
    recipe = DeepMutualLearning(peers=3)
    torch.manual_seed(7)
    distiller = Distiller(student, teacher, recipe, epochs=2, batch_size=16, progress=False,
                          optimizer={"name": "sgd", "lr": 0.1})
    source = distiller.teacher
    assert isinstance(source, PeerTeacher)
    models = [student, *source.peers]
    assert len(models) == 3 and models[1] is teacher
    before = [take_snapshot(m) for m in models]
    result = distiller.fit(digits_subset(64, labeled=32), digits_subset(32))
    for i, (model, old) in enumerate(zip(models, before, strict=True)):
        after = take_snapshot(model)
        assert all(not torch.equal(after[k], old[k]) for k in after), f"peer {i} not trained"
        assert weights_diff(after, old) > 1e-3
    steps = [r for r in result.history if r["kind"] == "train"]
    names = {"ce", "kl", "peer1_ce", "peer1_kl", "peer2_ce", "peer2_kl"}
    assert len(steps) == 4  # 2 epochs of the 32 labelled samples only (all 64: 8 steps)
    for record in steps:
        assert names <= set(record)
        assert record["loss"] == pytest.approx(sum(record[n] for n in names), rel=1e-5)
        assert all(record[n] > 0 for n in names)
    evaluation = result.evaluations()[-1]
    assert {"eval_accuracy", "eval_ece"} <= set(evaluation)


def test_a_peer_identical_to_the_student_is_redrawn_in_place(make_mlp) -> None:
    """Same architecture and seed: the two would get the same gradients forever."""
    student, twin, other = make_mlp(seed=0), make_mlp(seed=0), make_mlp(seed=1)
    other_before = {k: v.clone() for k, v in other.state_dict().items()}
    assert distinct_from(student, twin) is twin
    assert all(not torch.equal(twin.state_dict()[k], v) for k, v in student.state_dict().items())
    assert distinct_from(student, other) is other
    assert all(torch.equal(other.state_dict()[k], v) for k, v in other_before.items())
    source = DeepMutualLearning().teacher_source(student, make_mlp(seed=0))
    (peer,) = list(source.peers)
    assert not torch.equal(peer.state_dict()["head.weight"], student.state_dict()["head.weight"])


def test_per_token_logits_are_refused_by_shape() -> None:
    logits = [torch.randn(4, 3), torch.randn(4, 2, 3)]
    with pytest.raises(ValueError, match=r"peer 1's logits have shape \(4, 2, 3\)"):
        mutual_terms(logits, LABELS)
