"""Tests for the loss registry used by config-built recipes."""

from __future__ import annotations

import inspect

import pytest
import torch

from kdistill import losses as L
from kdistill.losses.registry import ALIASES, LOSSES, LossSpec, UnknownLossError


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _example(spec: LossSpec) -> dict[str, torch.Tensor]:
    """Small inputs of the right kind for a registered loss."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    if spec.name == "attention_mse":
        return {"student": _rand(2, 2, 4, 4), "teacher": _rand(2, 2, 4, 4, seed=1), "mask": mask}
    if spec.name == "attention_transfer":
        return {"student": _rand(2, 3, 4, 4), "teacher": _rand(2, 6, 4, 4, seed=1)}
    if spec.name in ("rkd_distance", "rkd_angle", "pkt"):
        return {"student": _rand(5, 3), "teacher": _rand(5, 8, seed=1)}
    out = {"student": _rand(2, 4, 6), "teacher": _rand(2, 4, 6, seed=1)}
    if spec.inputs == "labels":
        out["labels"] = torch.tensor([[0, 5, 2, 1], [3, 3, 4, 0]])
    if spec.inputs == "mask":
        out["mask"] = mask
    return out


def test_registry_holds_every_loss_under_its_function_name() -> None:
    expected = {
        "kd", "soft_ce", "dkd", "logit_mse", "cross_entropy", "hidden_mse", "cosine",
        "attention_mse", "attention_transfer", "rkd_distance", "rkd_angle", "pkt",
        "forward_kl", "reverse_kl", "generalized_jsd", "tvd",
    }  # fmt: skip
    assert set(LOSSES) == expected | set(ALIASES)
    for key, spec in LOSSES.items():
        assert spec.name == spec.fn.__name__
        assert key == spec.name or ALIASES[key] == spec.name
        assert getattr(L, spec.name) is spec.fn
        assert spec.inputs in ("none", "labels", "mask")
        assert spec.unit in ("examples", "tokens", "token_pairs", "labeled")
        assert spec.summary
    assert LOSSES["ce"] is LOSSES["cross_entropy"]
    assert not LOSSES["ce"].uses_teacher and LOSSES["ce"].unit == "labeled"
    assert LOSSES["dkd"].inputs == "labels" and LOSSES["dkd"].uses_teacher
    assert {n for n, s in LOSSES.items() if s.accepts_normalizer} == {
        "forward_kl", "reverse_kl", "tvd", "generalized_jsd"
    }


MASKED = {"hidden_mse", "cosine", "attention_mse", "forward_kl", "reverse_kl", "tvd",
          "generalized_jsd"}
NORMALIZED = {"forward_kl", "reverse_kl", "tvd", "generalized_jsd"}


def _called_by_hand(name: str, data: dict[str, torch.Tensor], student: torch.Tensor,
                    normalizer: float | None) -> torch.Tensor:
    """The loss function called directly with the arguments its signature documents."""
    fn, teacher = getattr(L, name), data["teacher"]
    if name == "cross_entropy":
        return fn(student, data["labels"])
    if name == "dkd":
        return fn(student, teacher, data["labels"])
    kwargs: dict[str, object] = {}
    if name in MASKED:
        kwargs["mask"] = data["mask"]
    if name in NORMALIZED and normalizer is not None:
        kwargs["normalizer"] = normalizer
    return fn(student, teacher, **kwargs)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_spec_passes_its_loss_the_right_inputs(name: str) -> None:
    """The registry call gives the value and the student gradient of the function called by
    hand: the student, the teacher, the labels, the mask and the normalizer each reach the
    argument they belong to (the losses' values are checked against references in
    test_losses.py)."""
    spec = LOSSES[name]
    data = _example(spec)
    student = data["student"].clone().requires_grad_(True)
    value = spec(student, data["teacher"] if spec.uses_teacher else None,
                 labels=data.get("labels"), mask=data.get("mask"), normalizer=3.0)
    by_hand = data["student"].clone().requires_grad_(True)
    expected = _called_by_hand(spec.name, data, by_hand, 3.0)
    assert value.dim() == 0 and torch.equal(value, expected)
    (grad,) = torch.autograd.grad(value, student)
    (expected_grad,) = torch.autograd.grad(expected, by_hand)
    assert torch.equal(grad, expected_grad) and float(grad.abs().sum()) > 0
    # the example's mask, normalizer and teacher all change the value, so routing shows
    if spec.name in MASKED:
        unmasked = getattr(L, spec.name)(data["student"], data["teacher"])
        if spec.name in NORMALIZED:
            unmasked = unmasked * data["student"].shape[:-1].numel() / 3.0
        assert not torch.allclose(value.detach(), unmasked)
    if spec.uses_teacher:
        assert not torch.allclose(value.detach(), _called_by_hand(
            spec.name, {**data, "teacher": data["teacher"].flip(0)}, data["student"], 3.0))


def test_spec_call_passes_params_mask_and_normalizer() -> None:
    s, t = _rand(2, 4, 6), _rand(2, 4, 6, seed=1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert torch.equal(LOSSES["kd"](s, t, temperature=2.0), L.kd(s, t, 2.0))
    got = LOSSES["forward_kl"](s, t, mask=mask, normalizer=10.0, temperature=2.0)
    assert torch.allclose(got, L.forward_kl(s, t, mask, 2.0) * 5 / 10)
    # a mask handed to a loss that does not take one is ignored
    assert torch.equal(LOSSES["logit_mse"](s, t, mask=mask), L.logit_mse(s, t))
    labels = torch.tensor([[0, 5, 2, 1], [3, 3, 4, -100]])
    assert torch.equal(LOSSES["ce"](s, labels=labels), L.cross_entropy(s, labels))
    with pytest.raises(ValueError, match="needs labels"):
        LOSSES["dkd"](s, t)
    with pytest.raises(ValueError, match="needs a teacher"):
        LOSSES["kd"](s)
    with pytest.raises(ValueError, match="temprature"):
        LOSSES["kd"](s, t, temprature=2.0)


def test_loss_params_lists_hyper_parameters_only() -> None:
    assert list(L.loss_params("kd")) == ["temperature", "reduction"]
    assert list(L.loss_params("dkd")) == ["alpha", "beta", "temperature"]
    assert list(L.loss_params("generalized_jsd")) == ["beta", "temperature"]
    assert list(L.loss_params("forward_kl")) == ["temperature"]
    assert list(L.loss_params("ce")) == ["ignore_index"]
    assert list(L.loss_params("hidden_mse")) == []
    assert list(L.loss_params("attention_mse")) == ["average_heads"]
    param = L.loss_params("kd")["temperature"]
    assert isinstance(param, inspect.Parameter) and param.default == 4.0


def test_check_params_names_the_valid_ones() -> None:
    L.check_params("kd", {"temperature": 2.0, "reduction": "mean"})
    with pytest.raises(ValueError, match=r"^unknown kd parameter 'temprature'; did you mean "
                                         r"'temperature'\?$"):
        L.check_params("kd", {"temprature": 2.0})
    with pytest.raises(ValueError, match=r"^unknown hidden_mse parameter 'mask'; valid names: "
                                         r"none$"):
        L.check_params("hidden_mse", {"mask": 1})


def test_unknown_loss_suggests_close_names() -> None:
    with pytest.raises(UnknownLossError, match=r"unknown loss 'kdd'; did you mean 'kd'") as info:
        L.get_loss("kdd")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith("unknown loss")  # no KeyError quoting
    with pytest.raises(KeyError, match="did you mean 'generalized_jsd'"):
        L.loss_params("generalised_jsd")
    with pytest.raises(ValueError, match="valid names: .*attention_mse"):
        L.get_loss("zzzzzz")
    assert L.get_loss("ce") is LOSSES["cross_entropy"]
