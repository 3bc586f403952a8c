"""The oracle teacher: a label-conditioned model that receives the labels, and the ``oracle``
recipe that distils it into a student that sees only the input."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill import Distiller
from kdistill.data.base import ArrayDataset
from kdistill.models import build_model
from kdistill.models.oracle import LabelConditioned
from kdistill.models.registry import build_oracle
from kdistill.recipes.oracle import Oracle
from kdistill.schedules import TrainState
from kdistill.taps import Taps
from kdistill.teachers import FrozenTeacher

SHAPE = (1, 8, 8)
STATE = TrainState(0, 0, 0, 0.0, 1, 1)


def mlp(seed: int, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", SHAPE, 10, hidden=[hidden])


def record_calls(model: nn.Module) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Every forward call of ``model``: its positional and keyword arguments."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((args, dict(kwargs)))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.fixture(scope="module")
def oracle(digits) -> LabelConditioned:
    """An oracle teacher trained the way ``kdistill run`` trains any teacher (``ce`` on every
    label), its forward receiving the labels."""
    data = ArrayDataset(digits.train.inputs[:400], digits.train.labels[:400])
    model = LabelConditioned(mlp(1, hidden=32), 10, label_dropout=0.5)
    calls = record_calls(model)
    Distiller(model, None, "ce", epochs=6, batch_size=32, progress=False,
              optimizer={"lr": 0.01}).fit(data)
    assert calls and all(torch.is_tensor(kw.get("labels")) for _, kw in calls)
    return model


def test_the_label_embedding_is_added_to_the_head_input():
    base = mlp(0)
    model = LabelConditioned(base, 10)
    x = torch.randn(6, *SHAPE)
    labels = torch.tensor([3, -100, 0, 9, -100, 3])
    model.eval()
    with torch.no_grad():
        # Zero-initialised: the untrained wrapper computes what its base computes.
        assert torch.equal(model(x, labels=labels), base(x))
        model.embedding.weight.normal_()
        rows = torch.tensor([3, 10, 0, 9, 10, 3])  # -100 -> the "unknown" row 10
        expected = base.head(base.features(x) + model.embedding.weight[rows])
        torch.testing.assert_close(model(x, labels=labels), expected)
        # Without labels every sample is unknown.
        torch.testing.assert_close(model(x), base.head(base.features(x)
                                                       + model.embedding.weight[10]))


def test_token_labels_condition_each_token():
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x))

    torch.manual_seed(0)
    base = Tagger()
    model = LabelConditioned(base, 5).eval()
    nn.init.normal_(model.embedding.weight)
    tokens = torch.randint(0, 20, (2, 4))
    labels = torch.tensor([[1, 4, -100, -100], [0, 0, 2, -100]])
    rows = torch.where(labels >= 0, labels, 5)
    with torch.no_grad():
        out = model(tokens, labels=labels)
        assert out.shape == (2, 4, 5)
        torch.testing.assert_close(out, base.head(base.embed(tokens) + model.embedding(rows)))


def test_label_dropout_hides_labels_in_training_only():
    model = LabelConditioned(mlp(0), 10, label_dropout=0.5)
    with torch.no_grad():
        model.embedding.weight.normal_()
    x = torch.randn(200, *SHAPE)
    labels = torch.randint(0, 10, (200,))
    labels[:20] = -100

    torch.manual_seed(7)
    keep = torch.rand(200) >= 0.5  # the draw the model makes from the same generator state
    torch.manual_seed(7)
    with torch.no_grad():
        trained = model.train()(x, labels=labels)
        rows = torch.where(keep & (labels >= 0), labels, 10)
        expected = model.base.head(model.base.features(x) + model.embedding.weight[rows])
    torch.testing.assert_close(trained, expected)
    dropped = int(((labels >= 0) & ~keep).sum())
    assert 60 < dropped < 120, dropped  # about half of the 180 known labels
    # In eval mode (a teacher in use) every known label is used.
    with torch.no_grad():
        evaluated = model.eval()(x, labels=labels)
        rows = torch.where(labels >= 0, labels, 10)
        expected = model.base.head(model.base.features(x) + model.embedding.weight[rows])
    torch.testing.assert_close(evaluated, expected)


def test_the_teacher_receives_the_labels_and_the_student_does_not(oracle, digits_subset):
    data = digits_subset(64, labeled=24)
    teacher_calls = record_calls(oracle)
    student = mlp(0)
    student_calls = record_calls(student)
    Distiller(student, oracle, Oracle(), epochs=1, batch_size=16, progress=False).fit(data)

    assert len(teacher_calls) >= 4 and len(student_calls) >= 4
    inputs = data.inputs.flatten(1)
    for args, kwargs in teacher_calls:
        assert set(kwargs) == {"labels"}
        distance, row = torch.cdist(args[0].flatten(1), inputs).min(dim=1)
        assert torch.all(distance == 0)
        assert torch.equal(kwargs["labels"], data.labels[row])  # hidden ones as -100
    assert any(bool((kw["labels"] == -100).any()) for _, kw in teacher_calls)
    assert any(bool((kw["labels"] >= 0).any()) for _, kw in teacher_calls)
    for args, kwargs in student_calls:
        assert kwargs == {} and len(args) == 1
    assert not hasattr(student, "batch_inputs")


def test_the_oracle_soft_targets_depend_on_the_label(oracle, digits):
    x, y = digits.test.inputs[:64], digits.test.labels[:64]
    source = FrozenTeacher(oracle)  # the teacher as the engine runs it
    source.bind(["logits"], torch.device("cpu"))
    try:
        given = source({"input": x, "labels": y})["logits"].softmax(-1)
        other = (y + 1) % 10
        misled = source({"input": x, "labels": other})["logits"].softmax(-1)
        unknown = source({"input": x, "labels": torch.full_like(y, -100)})["logits"].softmax(-1)
    finally:
        source.close()
    assert (given - misled).abs().sum(-1).min() > 1e-3  # every sample's target moved
    rows = torch.arange(len(y))
    # The given label raises its own class's probability above the input-only prediction.
    assert bool((given[rows, y] > unknown[rows, y]).all())
    assert bool((misled[rows, other] > unknown[rows, other]).all())
    # The unknown-label prediction still comes from the input (the reason for label dropout).
    assert float((unknown.argmax(-1) == y).float().mean()) > 0.8


def test_oracle_terms_per_sample():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([1, -100, 3, 0, -100])
    recipe = Oracle(temperature=2.0, alpha=0.7)
    terms = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), {"labels": labels}, STATE)
    p_t, log_p_s = (z_t / 2).softmax(-1), (z_s / 2).log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4
    ce = -z_s.log_softmax(-1)[[0, 2, 3], [1, 3, 0]].mean()
    torch.testing.assert_close(terms["kd"].value, kl)
    torch.testing.assert_close(terms["ce"].value, ce)
    assert (terms["kd"].weight, terms["kd"].unit) == (0.7, "examples")
    assert (terms["ce"].weight, terms["ce"].unit) == (pytest.approx(0.3), "labeled")


def test_oracle_terms_per_token_skip_padding():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    labels = torch.tensor([[2, -100, -100], [1, -100, -100]])
    z_s[mask == 0] = float("nan")  # padding garbage must reach neither value nor gradient
    z_s.requires_grad_(True)
    batch = {"labels": labels, "attention_mask": mask}
    terms = Oracle(temperature=1.0, alpha=0.5).terms(Taps({"logits": z_s}, mask),
                                                     Taps({"logits": z_t}, mask), batch, STATE)
    valid = mask.bool()
    kl = F.kl_div(z_s[valid].log_softmax(-1), z_t[valid].log_softmax(-1), log_target=True,
                  reduction="sum") / 3
    ce = F.cross_entropy(z_s[valid][[0, 2]], torch.tensor([2, 1]))
    torch.testing.assert_close(terms["kd"].value, kl)
    torch.testing.assert_close(terms["ce"].value, ce)
    assert terms["kd"].unit == "tokens" and terms["ce"].unit == "labeled"
    (terms["kd"].value + terms["ce"].value).backward()
    assert torch.isfinite(z_s.grad).all() and torch.all(z_s.grad[~valid] == 0)


def test_label_conditioned_errors_name_what_is_wrong():
    model = LabelConditioned(mlp(0), 10)
    x = torch.randn(3, *SHAPE)
    with pytest.raises(ValueError, match="integer class ids.*float32"):
        model(x, labels=torch.zeros(3))
    with pytest.raises(ValueError, match=r"labels of shape \(2,\).*leading shape \(3,\)"):
        model(x, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 10\) or -100, got 12"):
        model(x, labels=torch.tensor([1, 12, -100]))
    with pytest.raises(ValueError, match=r"^LabelConditioned: unknown MLP module 'haed'; did "
                                         r"you mean 'head'\?$"):
        LabelConditioned(mlp(0), 10, target="haed")
    with pytest.raises(ValueError, match=r"label_dropout must be in \[0, 1\), got 1.0"):
        LabelConditioned(mlp(0), 10, label_dropout=1.0)
    with pytest.raises(ValueError, match="cannot tell the input size of 'features'.*give dim"):
        LabelConditioned(mlp(0), 10, target="features")


def test_build_oracle_wraps_a_registered_model():
    model = build_oracle(SHAPE, 10, base="mlp", base_size="tiny", label_dropout=0.25)
    assert isinstance(model, LabelConditioned) and model.batch_inputs == ("labels",)
    assert model.label_dropout == 0.25 and model.embedding.weight.shape == (11, 16)
    with pytest.raises(ValueError, match="another model than 'oracle'"):
        build_oracle(SHAPE, 10, base="oracle")
