"""The throughput benchmark compares like with like: every configuration takes the same
training step, and its clock counts training steps only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import throughput as tp  # noqa: E402

from kdistill.cache import CachedTeacher, TeacherCache  # noqa: E402
from kdistill.teachers import FrozenTeacher  # noqa: E402


def small_pair() -> tp.Pair:
    torch.manual_seed(0)
    return tp.Pair("small", tp.mlp(12, 32, 5), tp.seeded(lambda: tp.mlp(12, 8, 5), 1), 16,
                   tp.images((12,), 5))


def one_step(pair: tp.Pair, train) -> dict[str, torch.Tensor]:
    student = pair.make_student()
    train(student, pair.data(pair.batch))  # one batch: every configuration sees the same one
    return student.state_dict()


def test_the_hand_loops_loss_is_kdistills_hinton_with_its_defaults() -> None:
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(6, 5, generator=g), 3 * torch.randn(6, 5, generator=g)
    labels = torch.randint(0, 5, (6,), generator=g)
    p_t, log_p_s = (z_t / 4).softmax(-1), (z_s / 4).log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    ce = -z_s.log_softmax(-1)[torch.arange(6), labels].mean()
    torch.testing.assert_close(tp.hinton_loss(z_s, z_t, labels), 0.1 * ce + 0.9 * 16 * kl)


def test_every_configuration_takes_the_same_training_step(tmp_path: Path) -> None:
    pair = small_pair()
    data = pair.data(pair.batch)
    cache = TeacherCache.build(pair.teacher, data, ["logits"], tmp_path / "c",
                               batch_size=pair.batch, progress=False)
    hand = one_step(pair, lambda s, d: tp.hand_loop(pair, s, d, with_teacher=True))
    alone = one_step(pair, lambda s, d: tp.hand_loop(pair, s, d, with_teacher=False))
    for name, teacher in {"live": pair.teacher, "cached": CachedTeacher(cache),
                          "bf16": FrozenTeacher(pair.teacher, "bf16")}.items():
        stepped = one_step(pair, lambda s, d, t=teacher: tp.distil(pair, s, d, t))
        for key, value in hand.items():
            tolerance = {"rtol": 1e-3, "atol": 1e-4} if name == "bf16" else {}
            torch.testing.assert_close(stepped[key], value, **tolerance, msg=f"{name} {key}")
            assert not torch.equal(value, alone[key]), key  # the teacher changes the step


def test_the_clock_counts_training_forwards_after_the_warmup() -> None:
    student = nn.Linear(3, 2)
    clock = tp.StepClock(student)
    for _ in range(4):
        student(torch.zeros(1, 3))
        with torch.no_grad():
            student(torch.zeros(1, 3))  # an evaluation forward: not a step
    assert len(clock.starts) == 4
    assert clock.steps(warmup=1) == pytest.approx(
        [b - a for a, b in zip(clock.starts[1:], clock.starts[2:], strict=False)])
    student(torch.zeros(1, 3))
    assert len(clock.starts) == 4  # steps() removed the hook


def test_rounds_rotate_the_order() -> None:
    names = ["a", "b", "c"]
    assert [list(tp.rotated(names, r)) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_the_cnn_and_mlp_pairs_have_the_issues_sizes() -> None:
    cnn, mlp = tp.cnn_pair(), tp.mlp_pair()
    assert round(tp.parameters(cnn.teacher), -4) == 1_150_000
    assert round(tp.parameters(cnn.make_student()), -3) == 61_000
    assert [m.out_features for m in mlp.teacher if isinstance(m, nn.Linear)] == [1024, 1024, 10]
    assert [m.out_features for m in mlp.make_student() if isinstance(m, nn.Linear)] == [64, 10]
