"""Tests for the loss registry used by config-built recipes."""

from __future__ import annotations

import inspect
from collections.abc import Callable

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


NORMALIZER = 3.0
VALID = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()  # the example mask: 5 valid tokens


def _valid_sum_over_normalizer(fn: Callable[..., torch.Tensor]
                               ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """A token loss's mean over the valid tokens alone, times their count, over NORMALIZER."""
    return lambda d: fn(d["student"][VALID], d["teacher"][VALID]) * int(VALID.sum()) / NORMALIZER


# What the registry must compute for each loss on ``_example``'s data, written out by hand:
# the function called with the student, the teacher, the labels or mask the spec names, and
# for token losses the sum over the 5 valid tokens divided by the normalizer (3) rather than
# their mean, computed here on the valid tokens alone (no mask involved).
EXPECTED: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {
    "kd": lambda d: L.kd(d["student"], d["teacher"]),
    "soft_ce": lambda d: L.soft_ce(d["student"], d["teacher"]),
    "dkd": lambda d: L.dkd(d["student"], d["teacher"], d["labels"]),
    "logit_mse": lambda d: L.logit_mse(d["student"], d["teacher"]),
    "cross_entropy": lambda d: L.cross_entropy(d["student"], d["labels"]),
    "hidden_mse": lambda d: L.hidden_mse(d["student"][VALID], d["teacher"][VALID]),
    "cosine": lambda d: L.cosine(d["student"][VALID], d["teacher"][VALID]),
    "attention_mse": lambda d: L.attention_mse(d["student"], d["teacher"], mask=d["mask"]),
    "attention_transfer": lambda d: L.attention_transfer(d["student"], d["teacher"]),
    "rkd_distance": lambda d: L.rkd_distance(d["student"], d["teacher"]),
    "rkd_angle": lambda d: L.rkd_angle(d["student"], d["teacher"]),
    "pkt": lambda d: L.pkt(d["student"], d["teacher"]),
    **{name: _valid_sum_over_normalizer(getattr(L, name))
       for name in ("forward_kl", "reverse_kl", "tvd", "generalized_jsd")},
}


def test_every_registered_loss_has_a_written_out_expectation() -> None:
    assert set(EXPECTED) == {spec.name for spec in LOSSES.values()}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_spec_computes_its_loss_on_the_inputs_it_names(name: str) -> None:
    spec = LOSSES[name]
    data = _example(spec)
    student = data["student"].requires_grad_(True)
    value = spec(
        student,
        data["teacher"] if spec.uses_teacher else None,
        labels=data.get("labels"),
        mask=data.get("mask"),
        normalizer=NORMALIZER,
    )
    expected = EXPECTED[spec.name]({**data, "student": student})
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    # The student receives the loss's gradient (the registry keeps it in the graph).
    (grad,) = torch.autograd.grad(value, student, retain_graph=True)
    (reference,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-7)
    assert float(grad.abs().sum()) > 0
    # Labels and masks the spec names change the value: dropping one would be noticed.
    if spec.inputs == "labels":
        other = spec(student, data["teacher"] if spec.uses_teacher else None,
                     labels=data["labels"].flip(-1))
        assert not torch.allclose(value, other)
    if spec.inputs == "mask":
        unmasked = spec(student, data["teacher"], normalizer=NORMALIZER)
        assert not torch.allclose(value, unmasked)


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
    assert list(L.loss_params("ce")) == ["ignore_index", "label_smoothing"]
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
