"""The ``oracle`` recipe on CTC data, as the Oracle Teacher paper sets it: a teacher that reads
the target sequence, a student that reads the image and learns from CTC and the teacher's
per-frame posteriors (``hinton`` and ``ce`` share the terms on CTC data)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill import Distiller
from kdistill.batch import TARGET_LENGTHS
from kdistill.batching import epoch_global_batches, process_micro_batches
from kdistill.config import ConfigError, load_config
from kdistill.data import DataSplits, load_dataset
from kdistill.models import build_model
from kdistill.recipes import build_recipe
from kdistill.run import check_task, preflight
from kdistill.schedules import TrainState
from kdistill.taps import Taps
from kdistill.teachers import FrozenTeacher

U = -100
STATE = TrainState(0, 0, 0, 0.5, 4, 12)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ctc" / "oracle.yaml"

# Per-frame logits [4, 6, 5] (tokens 0-3, the blank 4); row 2's target is hidden.
torch.manual_seed(11)
Z_S = torch.randn(4, 6, 5) * 2
Z_T = torch.randn(4, 6, 5) * 3
LABELS = torch.tensor([[0, 3, 3], [2, U, U], [U, U, U], [1, 0, U]])
LENGTHS = torch.tensor([3, 1, 0, 2])
BATCH = {"labels": LABELS, TARGET_LENGTHS: LENGTHS}


def ctc_per_token(z: torch.Tensor) -> float:
    """sum over known rows of -log p(y | x) (torch's CTC, one row at a time, float64) per
    target token."""
    total = 0.0
    for row in range(len(z)):
        length = int(LENGTHS[row])
        if length:
            log_probs = z[row].double().log_softmax(-1).unsqueeze(1)  # [T, 1, C]
            total += float(F.ctc_loss(log_probs, LABELS[row, :length].unsqueeze(0),
                                      [z.shape[1]], [length], blank=4, reduction="sum"))
    return total / int(LENGTHS.sum())


def frame_kl(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> float:
    """T^2 KL(p_t^T || p_s^T) per frame, averaged over every frame of every row."""
    log_t = (z_t.double() / temperature).log_softmax(-1)
    log_s = (z_s.double() / temperature).log_softmax(-1)
    return temperature**2 * float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


def check(terms, expected) -> None:
    assert sorted(terms) == sorted(expected)
    for name, (value, weight, unit) in expected.items():
        assert terms[name].value.item() == pytest.approx(value, rel=1e-5), name
        assert terms[name].weight == pytest.approx(weight) and terms[name].unit == unit, name


@pytest.mark.parametrize(("name", "temperature", "alpha"), [("oracle", 1.7, 0.35),
                                                            ("hinton", 3.1, 0.8)])
def test_kd_recipes_on_ctc_data_follow_the_equation(name: str, temperature: float,
                                                     alpha: float) -> None:
    """L = (1 - a) CTC per target token over the known targets + a T^2 KL per frame averaged
    over every frame (the hidden target's frames too)."""
    recipe = build_recipe(name, temperature=temperature, alpha=alpha)
    terms = recipe.terms(Taps({"logits": Z_S}), Taps({"logits": Z_T}), BATCH, STATE)
    check(terms, {"ctc": (ctc_per_token(Z_S), 1 - alpha, "labeled"),
                  "kd": (frame_kl(Z_S, Z_T, temperature), alpha, "tokens")})


def test_ce_on_ctc_data_is_the_ctc_loss() -> None:
    terms = build_recipe("ce").terms(Taps({"logits": Z_S}), None, BATCH, STATE)
    check(terms, {"ctc": (ctc_per_token(Z_S), 1.0, "labeled")})


def test_a_student_without_per_frame_output_is_refused() -> None:
    recipe = build_recipe("oracle")
    with pytest.raises(ValueError, match=r"ctc_loss: CTC needs per-frame logits \[batch, frames, "
                                         r"classes\] with a blank class last, got logits of "
                                         r"shape \(4, 5\)"):
        recipe.terms(Taps({"logits": Z_S[:, 0]}), Taps({"logits": Z_T}), BATCH, STATE)
    bad = {**BATCH, "labels": LABELS.masked_fill(LABELS == 3, 4)}  # the blank as a target
    with pytest.raises(ValueError, match=r"row 0, position 1: token 4 is not in 0 \.\. 3 "
                                         r"\(class 4 is the blank\)"):
        recipe.terms(Taps({"logits": Z_S}), Taps({"logits": Z_T}), bad, STATE)


# --------------------------------------------------------------------------- through the engine


class Columns(nn.Module):
    """Per-frame logits from each column of a line image: a linear map, no batch statistics
    (so micro-batches and one big batch compute the same)."""

    def __init__(self, height: int, classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(height, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images[:, 0].transpose(1, 2))


class CountingOracle(Columns):
    """A teacher that reads the targets: each frame's logits plus 2 x (how often each token
    occurs in the target)."""

    batch_inputs = ("labels",)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        counts = F.one_hot(labels.clamp_min(0), 11) * (labels >= 0).unsqueeze(-1)
        return super().forward(images) + 2.0 * counts.sum(1).unsqueeze(1).float()


@pytest.fixture(scope="module")
def lines() -> DataSplits:
    return load_dataset("digit-lines", train_lines=32, test_lines=8, seed=5)


def test_one_step_of_oracle_is_the_gradient_of_the_equation_over_the_global_batch(lines):
    """Accumulated micro-batches with different numbers of target tokens give the step of the
    whole batch's loss: CTC normalised by all its target tokens, KL by all its frames."""
    temperature, alpha, lr = 2.0, 0.4, 0.5
    data = lines.train
    teacher = CountingOracle(8, 11, seed=1)
    initial = Columns(8, 11, seed=0)
    (batch,) = epoch_global_batches(list(range(32)), 32, 4, 0, 0, 0)
    tokens = [int(data.target_lengths[m].sum()) for m in process_micro_batches(batch, 1, 0, 4)]
    assert len(set(tokens)) > 1, tokens

    def step(accumulation: int) -> nn.Module:
        student = copy.deepcopy(initial)
        Distiller(student, teacher, build_recipe("oracle", temperature=temperature,
                                                 alpha=alpha),
                  epochs=1, batch_size=32 // accumulation, accumulation=accumulation,
                  progress=False, optimizer={"name": "sgd", "lr": lr, "momentum": 0.0}).fit(data)
        return student

    reference = copy.deepcopy(initial)
    z_s = reference(data.inputs)
    with torch.no_grad():
        z_t = teacher(data.inputs, data.labels)
    log_probs = z_s.log_softmax(-1).transpose(0, 1)
    frames = torch.full((32,), z_s.shape[1])
    ctc = F.ctc_loss(log_probs, data.labels.clamp_min(0), frames, data.target_lengths,
                     blank=10, reduction="sum") / data.target_lengths.sum()
    log_t = (z_t / temperature).log_softmax(-1)
    kd = (log_t.exp() * (log_t - (z_s / temperature).log_softmax(-1))).sum(-1).mean()
    ((1 - alpha) * ctc + alpha * temperature**2 * kd).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= lr * p.grad
    for accumulation in (1, 4):
        trained = step(accumulation)
        for mine, theirs in zip(trained.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def test_the_teacher_is_trained_and_teaches_with_the_targets(lines):
    """The oracle teacher trains (``ce`` on CTC data) and teaches with the batch's targets in
    every forward; the student never receives them."""
    torch.manual_seed(0)
    teacher = build_model("oracle_ctc", lines.input_shape, 11, channels=[4, 8], dim=8, hidden=8)
    student = build_model("crnn", lines.input_shape, 11, channels=[4, 8], dim=8, hidden=8)
    seen: dict[str, list] = {"teacher": [], "student": []}
    for name, model in (("teacher", teacher), ("student", student)):
        model.register_forward_pre_hook(
            lambda _m, args, kwargs, name=name: seen[name].append((args[0], kwargs)),
            with_kwargs=True)
    before = [p.detach().clone() for p in teacher.parameters()]
    Distiller(teacher, None, "ce", epochs=1, batch_size=16, progress=False).fit(lines.train)
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    Distiller(student, teacher, "oracle", epochs=1, batch_size=16, progress=False,
              ).fit(lines.train, lines.test)
    targets = {image.numpy().tobytes(): labels for split in (lines.train, lines.test)
               for image, labels in zip(split.inputs, split.labels, strict=True)}
    assert seen["teacher"]
    for images, kwargs in seen["teacher"]:  # training, teaching and evaluation alike
        expected = torch.stack([targets[image.numpy().tobytes()] for image in images])
        assert torch.equal(kwargs["labels"], expected)
    assert seen["student"] and all(kwargs == {} for _, kwargs in seen["student"])
    # Other targets, other soft targets: the frozen teacher reads them.
    source = FrozenTeacher(teacher)
    source.bind(["logits"], torch.device("cpu"))
    batch = {"input": lines.train.inputs[:4], "labels": lines.train.labels[:4],
             TARGET_LENGTHS: lines.train.target_lengths[:4]}
    swapped = {**batch, "labels": lines.train.labels[[1, 2, 3, 0]]}
    assert not torch.allclose(source(batch)["logits"], source(swapped)["logits"], atol=1e-5)


# ----------------------------------------------------------------------------- config runs


def test_recipes_without_ctc_are_refused_on_ctc_data(lines) -> None:
    with pytest.raises(ConfigError, match=r"recipe: 'dkd' does not train CTC models but data set "
                                          r"'digit-lines' is a ctc task; recipes for it: "
                                          r"\['ce', 'daft', 'hinton', 'oracle'\]"):
        check_task(build_recipe("dkd"), lines, "recipe")
    check_task(build_recipe("oracle"), lines, "recipe")


def test_the_example_passes_its_trial_run() -> None:
    """``kdistill check``: the example's teacher and student each make a trial step."""
    config = load_config(EXAMPLE, ["data.options={train_lines: 24, test_lines: 8}",
                                   "teacher.model.size=tiny"])
    assert config.recipe == {"name": "oracle", "temperature": 2.0, "alpha": 0.5}
    assert config.teacher.model.name == "oracle_ctc" and config.student.name == "crnn"
    data = preflight(config)
    assert data.task == "ctc" and len(data.train) == 24
