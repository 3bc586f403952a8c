"""The engine's general mechanisms for methods beyond a frozen teacher: trainable peers,
source groups, fine-grained EMA, batch preparation, student wrappers, models that read more of
the batch, and phases that end with their best weights."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn

from kdistill import Distiller, losses
from kdistill.checkpoint import latest_checkpoint, load_checkpoint
from kdistill.engine import Phase
from kdistill.models import deployable
from kdistill.recipes.base import Recipe, Term
from kdistill.schedules import TrainState
from kdistill.taps import TapReader, Taps
from kdistill.teachers import EMATeacher, FrozenTeacher, PeerTeacher, SourceGroup

CPU = torch.device("cpu")


class PeerCE(Recipe):
    """Test recipe: CE for the student and for every peer (``peer<i>_ce``)."""

    name = "peer-ce-test"
    summary = paper = "test"
    teacher_model = "fresh"

    def teacher_source(self, student: nn.Module, teacher: nn.Module | None) -> PeerTeacher:
        return PeerTeacher([teacher, copy.deepcopy(teacher)])

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        terms = {"ce": Term(losses.cross_entropy(student["logits"], batch["labels"]),
                            unit="labeled")}
        for i, peer in enumerate(teacher.members):
            terms[f"peer{i}_ce"] = Term(losses.cross_entropy(peer["logits"], batch["labels"]),
                                        unit="labeled")
        return terms


def test_peers_train_with_the_student_and_resume_exactly(digits_subset, make_mlp,
                                                         take_snapshot, weights_diff,
                                                         tmp_path) -> None:
    data = digits_subset(64)
    peer = make_mlp(seed=5)
    start = take_snapshot(peer)
    distiller = Distiller(make_mlp(seed=0), peer, PeerCE(), epochs=2, batch_size=32,
                          progress=False, run_dir=tmp_path / "a")
    source = distiller.teacher
    assert isinstance(source, PeerTeacher) and source.peers[0] is peer
    result = distiller.fit(data)
    (first, second) = source.peers
    assert weights_diff(take_snapshot(first), start) > 1e-3  # the peers were optimised
    assert weights_diff(take_snapshot(second), start) > 1e-3
    # Both peers started equal and saw the same batches with the same loss: they stay equal.
    assert weights_diff(take_snapshot(first), take_snapshot(second)) < 1e-6
    assert {"ce", "peer0_ce", "peer1_ce"} <= set(result.history[0])
    weights = load_checkpoint(latest_checkpoint(tmp_path / "a")).weights
    assert torch.equal(weights["teacher.0.head.weight"], first.head.weight)

    # Stop after one epoch, resume: the peers end exactly as in the uninterrupted run.
    class Stopped(Exception):
        """Stands for the process dying."""

    def stop(record: dict) -> None:
        raise Stopped(f"after epoch {record['epoch']}")

    peer_b = make_mlp(seed=5)
    with pytest.raises(Stopped):
        Distiller(make_mlp(seed=0), peer_b, PeerCE(), epochs=2, batch_size=32, progress=False,
                  run_dir=tmp_path / "b").fit(data, callbacks=[stop])
    peer_c = make_mlp(seed=5)
    resumed = Distiller(make_mlp(seed=0), peer_c, PeerCE(), epochs=2, batch_size=32,
                        progress=False, run_dir=tmp_path / "b")
    resumed.fit(data, resume=True)
    assert weights_diff(take_snapshot(resumed.teacher.peers[0]), take_snapshot(first)) < 1e-7


def test_source_group_members_and_trainable_parts(make_mlp) -> None:
    frozen, peer = FrozenTeacher(make_mlp(seed=1)), PeerTeacher(make_mlp(seed=2))
    group = SourceGroup([frozen, peer])
    assert group.trainable_module() is not None
    assert list(group.trainable_module().parameters())[0] is next(peer.peers.parameters())
    group.bind(["logits"], CPU)
    batch = {"input": torch.randn(3, 1, 8, 8)}
    taps = group(batch)
    assert len(taps.members) == 2
    assert torch.equal(taps["logits"], taps.members[0]["logits"])
    assert taps.members[1]["logits"].requires_grad  # the peer's output carries gradients
    assert not taps.members[0]["logits"].requires_grad
    assert SourceGroup([frozen]).trainable_module() is None


def test_fine_grained_ema_updates_exactly_the_drawn_tensors(make_mlp) -> None:
    student = make_mlp(seed=0, hidden=(8, 8))
    ema = EMATeacher(student, momentum=0.5, skip_prob=0.8, seed=8)
    ema.bind(["logits"], CPU)
    before = {k: v.clone() for k, v in ema.model.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.after_step(student, TrainState(step=1))
    names = [n for n, _ in student.named_parameters()]
    draws = torch.rand(len(names), generator=torch.Generator().manual_seed(8))
    expected = [n for n, u in zip(names, draws.tolist(), strict=True) if u >= 0.8]
    assert ema.last_updated == expected and 0 < len(expected) < len(names)
    followed = dict(student.named_parameters())
    for name, value in ema.model.named_parameters():
        if name in expected:
            torch.testing.assert_close(value, 0.5 * before[name] + 0.5 * followed[name])
        else:
            assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="skip_prob"):
        EMATeacher(student, skip_prob=1.0)


class Doubling(Recipe):
    """Test recipe: ``prepare`` appends a negated copy of every row; records what ran."""

    name = "doubling-test"
    summary = paper = "test"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def prepare(self, batch: dict[str, Any], student: Any, state: TrainState) -> dict[str, Any]:
        return {**batch, "input": torch.cat([batch["input"], -batch["input"]]),
                "labels": torch.cat([batch["labels"], batch["labels"]])}

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        self.seen.append((len(student["logits"]), len(teacher["logits"])))
        return {"kd": Term(losses.kd(student["logits"], teacher["logits"]))}


def test_prepare_feeds_both_models_the_prepared_batch(digits_subset, make_mlp) -> None:
    recipe = Doubling()
    Distiller(make_mlp(seed=0), make_mlp(seed=1), recipe, epochs=1, batch_size=16,
              progress=False).fit(digits_subset(32))
    assert recipe.seen == [(32, 32), (32, 32)]


class TwoHeads(nn.Module):
    """Test wrapper: the student and a second linear head on the same input."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base, self.extra = base, nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        heads = torch.stack([self.base(x), self.extra(x.flatten(1))])
        return {"logits": heads.mean(0), "heads": heads}

    def export(self) -> nn.Module:
        return self.base


class WrappingRecipe(Recipe):
    name = "wrapping-test"
    summary = paper = "test"
    uses_teacher = False

    def wrap_student(self, student: nn.Module) -> nn.Module:
        return student if isinstance(student, TwoHeads) else TwoHeads(student)

    def student_taps(self) -> list[str]:
        return ["heads"]

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        return {f"ce{i}": Term(losses.cross_entropy(z, batch["labels"]), unit="labeled")
                for i, z in enumerate(student["heads"])}


def test_recipes_wrap_the_student_once_and_export_the_deployable_model(digits_subset,
                                                                        make_mlp) -> None:
    base = make_mlp(seed=0)
    recipe = WrappingRecipe()
    phases = [Phase(recipe, 1), Phase(recipe, 1)]
    distiller = Distiller(base, None, phases=phases, batch_size=32, progress=False)
    assert isinstance(distiller.student, TwoHeads) and distiller.student.base is base
    result = distiller.fit(digits_subset(64))
    assert result.student is distiller.student
    assert deployable(result.student) is base
    assert deployable(base) is base
    assert {"ce0", "ce1"} <= set(result.history[0])


class Privileged(nn.Module):
    """A model that declares it also reads the batch's labels."""

    batch_inputs = ("labels",)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append({"labels": labels.clone()})
        return self.linear(x.flatten(1)) + nn.functional.one_hot(labels.clamp_min(0), 10)


def test_declared_batch_inputs_reach_only_the_model_that_declares_them() -> None:
    batch = {"input": torch.randn(4, 1, 8, 8), "labels": torch.tensor([1, 2, -100, 3])}
    teacher = Privileged()
    with TapReader(teacher, ["logits"]) as reader:
        reader(batch)
    assert torch.equal(teacher.calls[0]["labels"], batch["labels"])
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with TapReader(plain, ["logits"]) as reader:
        assert reader(batch)["logits"].shape == (4, 10)  # called with the input alone
    with pytest.raises(ValueError, match=r"batch_inputs \['labels'\].*lacks \['labels'\]"):
        TapReader(teacher, ["logits"])({"input": batch["input"]})


class KeepBest(Recipe):
    name = "keep-best-test"
    summary = paper = "test"
    uses_teacher = False
    keep_best = "accuracy"

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        return {"ce": Term(losses.cross_entropy(student["logits"], batch["labels"]),
                           unit="labeled")}


def test_a_keep_best_phase_ends_with_its_best_evaluation(digits_subset, make_mlp,
                                                         take_snapshot, weights_diff) -> None:
    scores = iter([0.2, 0.9, 0.5, 0.7])  # epoch 2 is the best
    snapshots: list[dict[str, torch.Tensor]] = []

    def evaluator(student: nn.Module, teacher: Any) -> dict[str, float]:
        snapshots.append(take_snapshot(student))
        return {"accuracy": next(scores)}

    student = make_mlp(seed=0)
    result = Distiller(student, None, KeepBest(), epochs=4, batch_size=32, progress=False,
                       evaluator=evaluator).fit(digits_subset(64))
    assert weights_diff(take_snapshot(student), snapshots[1]) == 0
    assert weights_diff(snapshots[3], snapshots[1]) > 1e-4
    (restored,) = [r for r in result.history if r["kind"] == "restore_best"]
    assert (restored["epoch"], restored["score"], restored["metric"]) == (2, 0.9, "accuracy")
    with pytest.raises(ValueError, match="keeps its best weights by 'accuracy' and needs "
                                         "evaluation data"):
        Distiller(make_mlp(seed=0), None, KeepBest(), epochs=1, progress=False).fit(
            digits_subset(32))
    assert Phase(KeepBest(), 1, keep_best="ece").improves(0.1, 0.2)
    assert not Phase(KeepBest(), 1).improves(0.1, 0.2)
