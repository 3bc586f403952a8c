"""Pinned behaviour of kdistill.losses: the details a refactoring could silently change.

Found by mutation testing (``make mutate``): every test here fails on some changed line of
``src/kdistill/losses/`` that the broader tests in ``test_losses.py`` did not notice. Values are
compared with references written here in numpy from the docstrings' equations:

* default hyper-parameters are the documented ones (the call without the argument against the
  reference at the documented value), on ``[B, T, C]`` token logits so that a softmax over the
  wrong dimension shows;
* every error message, exactly: it names the loss, the argument at fault and the shapes;
* edge cases the docstrings promise: classes with zero probability, two-class DKD, a single
  valid position (nothing is divided by a clamped count), normalisers below 1, tiny feature
  norms, 1-D features, the eps guard of PKT's normalisation, float32 accuracy far from the
  origin, non-finite teachers surfacing at the smallest batch with a relation;
* results follow the inputs' device and dtype, not torch's defaults;
* the registry's table, rebuilt from a fresh import, has the documented flags.

Mutants of ``src/kdistill/losses/`` that no input can tell apart from the original are listed,
with the reason, in ``benchmarks/mutation_equivalent.toml``.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from kdistill import losses as L
from kdistill.losses.registry import LOSSES, UnknownLossError

DT = torch.float64


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT) * scale


# ---------------------------------------------------------------------------------------------
# numpy references (last axis = classes; 0 log 0 = 0)
# ---------------------------------------------------------------------------------------------
def softmax(z: torch.Tensor | np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(axis=-1)


def jsd(pt: np.ndarray, ps: np.ndarray, beta: float) -> np.ndarray:
    m = beta * pt + (1 - beta) * ps
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


def token_divergence(kind: str, s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0,
                     beta: float = 0.5) -> np.ndarray:
    """Unreduced ``[...]`` divergence of each position."""
    ps, pt = softmax(s, temperature), softmax(t, temperature)
    if kind == "forward_kl":
        return kl(pt, ps)
    if kind == "reverse_kl":
        return kl(ps, pt)
    if kind == "tvd":
        return 0.5 * np.abs(pt - ps).sum(axis=-1)
    return jsd(pt, ps, beta)


def dkd_terms(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
              temperature: float) -> tuple[float, float]:
    """``(TCKD, NCKD)``, each ``T^2`` times the row mean of its KL."""
    classes = s.shape[-1]
    ps = softmax(s, temperature).reshape(-1, classes)
    pt = softmax(t, temperature).reshape(-1, classes)
    gt = np.eye(classes, dtype=bool)[target.reshape(-1).numpy()]
    b_s = np.stack([ps[gt], 1 - ps[gt]], axis=-1)
    b_t = np.stack([pt[gt], 1 - pt[gt]], axis=-1)
    hat_s = ps[~gt].reshape(-1, classes - 1) / b_s[:, 1:]
    hat_t = pt[~gt].reshape(-1, classes - 1) / b_t[:, 1:]
    scale = temperature**2
    return scale * kl(b_t, b_s).mean(), scale * kl(hat_t, hat_s).mean()


def cosine_distance(u: np.ndarray, v: np.ndarray) -> float:
    return 1.0 - float(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v))


def pkt_reference(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7,
                  exclude_self: bool = False) -> np.ndarray:
    """The ``[B, B]`` KL terms of PKT, with eps guarding the norms, the row sums and the log."""

    def conditionals(x: torch.Tensor) -> np.ndarray:
        x = x.reshape(x.shape[0], -1).numpy()
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        kernel = (x @ x.T + 1.0) / 2.0
        if exclude_self:
            np.fill_diagonal(kernel, 0.0)
        return kernel / np.maximum(kernel.sum(axis=1, keepdims=True), eps)

    q_s, q_t = conditionals(s), conditionals(t)
    return q_t * np.log((q_t + eps) / (q_s + eps))


def close(value: torch.Tensor, expected: float | np.ndarray, rtol: float = 1e-10,
          atol: float = 1e-13) -> None:
    np.testing.assert_allclose(value.detach().numpy(), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# default hyper-parameters, on [B, T, C] token logits
# ---------------------------------------------------------------------------------------------
S3, T3 = rand(2, 3, 5, seed=1), rand(2, 3, 5, seed=2, scale=2.0)
TARGET = torch.tensor([[0, 4, 2], [1, 3, 0]])
TOKEN_LOSSES = ("forward_kl", "reverse_kl", "tvd", "generalized_jsd")

# name: (the call without the hyper-parameter, the reference at its documented value)
DEFAULTS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    # Hinton KD at T = 4: T^2 KL(p_t || p_s), averaged over the B * T rows
    "kd": (lambda: L.kd(S3, T3), lambda: 16.0 * kl(softmax(T3, 4), softmax(S3, 4)).mean()),
    # TinyBERT's soft cross-entropy at T = 1
    "soft_ce": (lambda: L.soft_ce(S3, T3),
                lambda: -(softmax(T3) * np.log(softmax(S3))).sum(-1).mean()),
    # DKD's CIFAR-100 values: alpha = 1, beta = 8, T = 4
    "dkd_parts": (lambda: L.dkd_parts(S3, T3, TARGET), lambda: dkd_terms(S3, T3, TARGET, 4.0)),
    "dkd": (lambda: L.dkd(S3, T3, TARGET),
            lambda: float(np.dot([1.0, 8.0], dkd_terms(S3, T3, TARGET, 4.0)))),
    # token losses at T = 1, the generalised JSD at beta = 0.5 (symmetric JSD)
    **{name: (lambda name=name: getattr(L, name)(S3, T3),
              lambda name=name: token_divergence(name, S3, T3).mean())
       for name in TOKEN_LOSSES},
    **{f"per_token_{name}": (lambda name=name: getattr(L, f"per_token_{name}")(S3, T3),
                             lambda name=name: token_divergence(name, S3, T3))
       for name in TOKEN_LOSSES},
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_default_hyper_parameters_are_the_documented_ones(name: str) -> None:
    call, reference = DEFAULTS[name]
    got, expected = call(), reference()
    if isinstance(got, tuple):
        for part, part_expected in zip(got, expected, strict=True):
            close(part, part_expected)
    else:
        close(got, expected)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_soft_ce_softmax_is_over_the_classes_of_token_logits(temperature: float) -> None:
    # With [B, T, C] logits, a softmax over any other dimension gives another value.
    per_row = -(softmax(T3, temperature) * np.log(softmax(S3, temperature))).sum(-1)
    close(L.soft_ce(S3, T3, temperature), per_row.mean())
    close(L.soft_ce(S3, T3, temperature, reduction="mean"), per_row.mean() / 5)


def test_soft_ce_classes_with_zero_probability_add_nothing() -> None:
    # A vocabulary slot ruled out (-inf) by both models: p_t = 0 there and log p_s = -inf, and
    # 0 * log 0 counts as 0, as in the KL losses; the gradient stays finite.
    s, t = S3.clone(), T3.clone()
    s[..., 2] = float("-inf")
    t[..., 2] = float("-inf")
    keep = [0, 1, 3, 4]
    expected = -(softmax(T3[..., keep]) * np.log(softmax(S3[..., keep]))).sum(-1).mean()
    s.requires_grad_(True)
    value = L.soft_ce(s, t)
    value.backward()
    close(value, expected)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_with_two_classes_is_kd(temperature: float) -> None:
    # Two classes: the only non-target class has p_hat = 1 for both models, so NCKD = 0 and
    # TCKD is the whole KL: dkd = alpha * kd whatever beta.
    s, t = rand(4, 2, seed=3), rand(4, 2, seed=4, scale=3.0)
    target = torch.tensor([0, 1, 1, 0])
    tckd, nckd = L.dkd_parts(s, t, target, temperature)
    kd = temperature**2 * kl(softmax(t, temperature), softmax(s, temperature)).mean()
    close(tckd, kd)
    assert abs(float(nckd)) < 1e-12
    close(L.dkd(s, t, target, alpha=0.5, beta=8.0, temperature=temperature), 0.5 * kd)


# ---------------------------------------------------------------------------------------------
# error messages, exactly
# ---------------------------------------------------------------------------------------------
S = rand(2, 3, 4)
LABELS = torch.tensor([[0, 1, 2], [3, 0, 1]])
ZERO_D = torch.tensor(1.0, dtype=DT)

ERRORS: dict[str, tuple[Callable[[], Any], str]] = {
    "kd-reduction": (lambda: L.kd(S, S, reduction="sum"),
                     "kd: reduction must be one of ('batchmean', 'mean'), got 'sum'"),
    "kd-temperature": (lambda: L.kd(S, S, temperature=0.0),
                       "kd: temperature must be > 0, got 0.0"),
    "soft_ce-reduction": (lambda: L.soft_ce(S, S, reduction="sum"),
                          "soft_ce: reduction must be one of ('batchmean', 'mean'), got 'sum'"),
    "soft_ce-temperature": (lambda: L.soft_ce(S, S, temperature=-1.0),
                            "soft_ce: temperature must be > 0, got -1.0"),
    "dkd-shapes": (lambda: L.dkd(rand(2, 5), rand(2, 6), torch.tensor([0, 1])),
                   "dkd: student and teacher shapes must match, got student (2, 5) and teacher "
                   "(2, 6)"),
    "dkd-temperature": (lambda: L.dkd_parts(S, S, LABELS, temperature=0.0),
                        "dkd: temperature must be > 0, got 0.0"),
    "dkd-classes": (lambda: L.dkd(rand(2, 1), rand(2, 1), torch.tensor([0, 0])),
                    "dkd: needs at least 2 classes, got logits (2, 1)"),
    "dkd-target": (lambda: L.dkd(S, S, LABELS.reshape(6)),
                   "dkd: target shape (6,) does not match the logits' leading shape (2, 3) "
                   "(logits (2, 3, 4))"),
    "cross_entropy-labels": (lambda: L.cross_entropy(S, LABELS.reshape(6)),
                             "cross_entropy: labels shape (6,) does not match the logits' "
                             "leading shape (2, 3) (logits (2, 3, 4))"),
    **{f"{name}-{how}": (
        lambda name=name, how=how: getattr(L, name if how == "temperature" else
                                           f"per_token_{name}")(S, S, temperature=0.0),
        f"{name}: temperature must be > 0, got 0.0",
    ) for name in TOKEN_LOSSES for how in ("temperature", "per-token-temperature")},
    **{f"{name}-{how}": (
        lambda name=name, how=how: getattr(L, name if how == "shapes" else
                                           f"per_token_{name}")(S, rand(2, 3, 5)),
        f"{name}: student and teacher shapes must match, got student (2, 3, 4) and teacher "
        "(2, 3, 5)",
    ) for name in TOKEN_LOSSES for how in ("shapes", "per-token-shapes")},
    **{f"{name}-mask": (lambda name=name: getattr(L, name)(S, S, mask=torch.ones(2, 4)),
                        f"{name}: mask shape (2, 4) does not match the logits's leading shape "
                        "(2, 3)") for name in TOKEN_LOSSES},
    **{f"{name}-normalizer": (lambda name=name: getattr(L, name)(S, S, normalizer=0.0),
                              f"{name}: normalizer must be > 0, got 0.0")
       for name in TOKEN_LOSSES},
    "generalized_jsd-beta": (lambda: L.generalized_jsd(S, S, beta=1.5),
                             "generalized_jsd: beta must be in [0, 1], got 1.5"),
    "per_token_generalized_jsd-beta": (lambda: L.per_token_generalized_jsd(S, S, beta=-0.5),
                                       "generalized_jsd: beta must be in [0, 1], got -0.5"),
    **{f"{name}-mask": (lambda name=name: getattr(L, name)(S, S, mask=torch.ones(2, 4)),
                        f"{name}: mask shape (2, 4) does not match the features's leading "
                        "shape (2, 3)") for name in ("hidden_mse", "cosine")},
    "attention_mse-mask": (lambda: L.attention_mse(rand(2, 4, 4), rand(2, 4, 4), torch.ones(2, 5)),
                           "attention_mse: mask shape (2, 5) does not match the maps's leading "
                           "shape (2, 4)"),
    "attention_mse-student": (lambda: L.attention_mse(rand(2, 4), rand(2, 4, 4)),
                              "attention_mse: student scores must be [B, H, L, L] or [B, L, L], "
                              "got (2, 4)"),
    "attention_mse-teacher": (lambda: L.attention_mse(rand(2, 4, 4), rand(2, 4)),
                              "attention_mse: teacher scores must be [B, H, L, L] or [B, L, L], "
                              "got (2, 4)"),
    "attention_mse-square": (lambda: L.attention_mse(rand(2, 3, 4), rand(2, 3, 4),
                                                     torch.ones(2, 4)),
                             "attention_mse: a token mask needs square [.., L, L] maps, got "
                             "(2, 3, 4)"),
    "attention_transfer-student": (lambda: L.attention_transfer(rand(2, 3), rand(2, 3, 4, 4)),
                                   "attention_transfer: student map must be [B, C, *spatial], "
                                   "got (2, 3)"),
    "attention_transfer-teacher": (lambda: L.attention_transfer(rand(2, 3, 4, 4), rand(2, 3)),
                                   "attention_transfer: teacher map must be [B, C, *spatial], "
                                   "got (2, 3)"),
    "attention_transfer-sizes": (lambda: L.attention_transfer(rand(2, 3, 4, 4), rand(3, 3, 4, 4)),
                                 "attention_transfer: batch and spatial sizes must match, got "
                                 "student (2, 3, 4, 4) and teacher (3, 3, 4, 4)"),
    **{f"{name}-student": (lambda name=name: getattr(L, name)(ZERO_D, rand(3, 2)),
                           f"{name}: student features need a batch dimension, got ()")
       for name in ("rkd_distance", "rkd_angle", "pkt")},
    **{f"{name}-teacher": (lambda name=name: getattr(L, name)(rand(3, 2), ZERO_D),
                           f"{name}: teacher features need a batch dimension, got ()")
       for name in ("rkd_distance", "rkd_angle", "pkt")},
    **{f"{name}-batch": (lambda name=name: getattr(L, name)(rand(4, 3), rand(5, 3)),
                         f"{name}: student and teacher batch sizes must match, got student "
                         "(4, 3) and teacher (5, 3)")
       for name in ("rkd_distance", "rkd_angle", "pkt")},
    "check_params-several": (lambda: L.check_params("kd", {"temprature": 2.0, "reductoin": "x"}),
                             "unknown kd parameter 'reductoin'; did you mean 'reduction'?; "
                             "unknown kd parameter 'temprature'; did you mean 'temperature'?"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_messages_name_the_loss_the_argument_and_the_shapes(case: str) -> None:
    call, message = ERRORS[case]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def test_unknown_loss_error_prints_its_message_without_quotes() -> None:
    assert str(UnknownLossError("unknown loss 'x'")) == "unknown loss 'x'"
    assert str(UnknownLossError()) == ""


# ---------------------------------------------------------------------------------------------
# masks, counts and normalisers
# ---------------------------------------------------------------------------------------------
ONE_VALID = torch.zeros(2, 3, dtype=torch.long)
ONE_VALID[1, 2] = 1


def test_one_valid_position_is_the_loss_itself() -> None:
    # One valid position: the loss is that position's value (a count of 1 is not clamped up).
    s1, t1 = rand(2, 3, 1, seed=5), rand(2, 3, 1, seed=6)  # one feature: n_valid * D = 1
    close(L.hidden_mse(s1, t1, ONE_VALID), float((s1[1, 2, 0] - t1[1, 2, 0]) ** 2))
    close(L.cosine(S3, T3, ONE_VALID), cosine_distance(S3[1, 2].numpy(), T3[1, 2].numpy()))
    maps_s, maps_t = rand(2, 3, 3, seed=7), rand(2, 3, 3, seed=8)  # head-less: one valid pair
    close(L.attention_mse(maps_s, maps_t, ONE_VALID),
          float((maps_s[1, 2, 2] - maps_t[1, 2, 2]) ** 2))
    for name in TOKEN_LOSSES:
        close(getattr(L, name)(S3, T3, mask=ONE_VALID), token_divergence(name, S3, T3)[1, 2])


@pytest.mark.parametrize("normalizer", [0.5, 2, torch.tensor(0.25, dtype=DT)])
def test_the_normalizer_replaces_the_count_whatever_its_size(normalizer: float) -> None:
    # The engine's global-batch token count can be any positive number (a float below 1 too).
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for name in TOKEN_LOSSES:
        total = token_divergence(name, S3, T3)[mask.bool().numpy()].sum()
        close(getattr(L, name)(S3, T3, mask=mask, normalizer=normalizer), total / float(normalizer))


def test_cosine_is_scale_free_down_to_tiny_norms() -> None:
    # Norms are clamped at 1e-8 only: features of norm ~1e-4 give the same distances, and
    # zero vectors a distance of exactly 1.
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    rows = mask.bool().numpy()
    expected = np.mean([cosine_distance(u, v) for u, v in
                        zip(S3.numpy()[rows], T3.numpy()[rows], strict=True)])
    close(L.cosine(1e-4 * S3, 1e-4 * T3, mask), expected, rtol=1e-9)
    close(L.cosine(1e-4 * S3, 1e-4 * T3), np.mean([
        cosine_distance(u, v) for u, v in
        zip(S3.reshape(-1, 5).numpy(), T3.reshape(-1, 5).numpy(), strict=True)]), rtol=1e-9)
    zeros = torch.zeros_like(S3)
    assert float(L.cosine(zeros, T3, mask)) == 1.0
    assert float(L.cosine(zeros, T3)) == 1.0


def test_attention_mse_averages_the_heads_of_a_4d_student_against_a_3d_teacher() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    s, t = rand(2, 3, 4, 4, seed=9), rand(2, 4, 4, seed=10)
    pairs = (mask[:, :, None] * mask[:, None, :]).bool().numpy()
    diff = (s.mean(1) - t).numpy()
    close(L.attention_mse(s, t, mask), (diff[pairs] ** 2).mean())
    close(L.attention_mse(t, s, mask), (diff[pairs] ** 2).mean())  # and the other way round


# ---------------------------------------------------------------------------------------------
# relational losses
# ---------------------------------------------------------------------------------------------
def test_relations_take_1d_features_as_one_feature_per_sample() -> None:
    # [B] -> [B, 1] (module docstring); PKT with one feature per sample is not a small batch.
    s, t = rand(5, seed=11), rand(5, 3, seed=12)
    for name in ("rkd_distance", "rkd_angle", "pkt"):
        fn = getattr(L, name)
        assert torch.equal(fn(s, t), fn(s[:, None], t))
        assert torch.equal(fn(t, s), fn(t, s[:, None]))
    close(L.pkt(s, t), pkt_reference(s, t).mean())
    assert float(L.pkt(s, t)) > 1e-3


def test_rkd_distance_centres_each_feature_for_float32_accuracy() -> None:
    # A translation by a different offset per feature (up to 1.5e4) changes no distance; the
    # batch is centred feature by feature, so float32 stays close to the float64 value.
    s, t = rand(6, 16, seed=13), rand(6, 8, seed=14)
    offset = 1e3 * torch.arange(16, dtype=DT)
    exact = L.rkd_distance(s, t, reduction="distinct")
    shifted = L.rkd_distance((s + offset).float(), t.float(), reduction="distinct")
    np.testing.assert_allclose(float(shifted), float(exact), rtol=1e-4)


def test_a_non_finite_teacher_surfaces_from_the_smallest_batch_with_a_relation() -> None:
    # Two samples (three for angles) have a relation, so the loss is computed, not replaced by
    # the small-batch zero: with a finite teacher it is 0 (psi_D = 1 for both models), with a
    # NaN teacher it is NaN, so the engine's non-finite guard sees a broken teacher.
    for name, batch in (("rkd_distance", 2), ("rkd_angle", 3), ("pkt", 2)):
        fn = getattr(L, name)
        s, t = rand(batch, 3, seed=15), rand(batch, 4, seed=16)
        assert math.isnan(float(fn(s, torch.full_like(t, math.nan)))), name
    assert abs(float(L.rkd_distance(rand(2, 3, seed=15), rand(2, 4, seed=16)))) < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_pkt_eps_guards_the_normalisation_of_a_near_zero_row(reduction: str) -> None:
    # Without the self-pairs, two opposite samples have a kernel row sum ~1e-10 < eps: the
    # conditionals are K / max(sum K, eps), so they stay small instead of being blown up to 1.
    s, t = torch.tensor([[1e3, 0.0], [-1e3, 0.0]], dtype=DT), rand(2, 3, seed=17)
    terms = pkt_reference(s, t, exclude_self=True)
    expected = terms.mean() if reduction == "mean" else terms.sum(1).mean()
    close(L.pkt(s, t, exclude_self=True, reduction=reduction), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# device and dtype follow the inputs
# ---------------------------------------------------------------------------------------------
def example(name: str) -> dict[str, Any]:
    """Small float32 inputs of the right kind for a registered loss."""
    s = rand(2, 4, 6, seed=18).float()
    t = rand(2, 4, 6, seed=19).float()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    if name == "attention_mse":
        return {"student": rand(2, 2, 4, 4).float(), "teacher": rand(2, 4, 4, seed=1).float(),
                "mask": mask}
    if name == "attention_transfer":
        return {"student": rand(2, 3, 4, 4).float(), "teacher": rand(2, 6, 4, 4, seed=1).float()}
    if name in ("rkd_distance", "rkd_angle", "pkt"):
        return {"student": rand(5, 3).float(), "teacher": rand(5, 8, seed=1).float()}
    if LOSSES[name].inputs == "labels":
        return {"student": s, "teacher": t, "labels": torch.tensor([[0, 5, 2, 1], [3, 3, 4, 0]])}
    return {"student": s, "teacher": t, "mask": mask}


VARIANTS = {
    **{name: {} for name in sorted({spec.name for spec in LOSSES.values()})},
    "pkt-exclude_self": {"exclude_self": True},
    "rkd_angle-distinct": {"reduction": "distinct"},
    "rkd_distance-distinct": {"reduction": "distinct"},
}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_results_follow_the_inputs_device_and_dtype_not_the_defaults(variant: str) -> None:
    # Every tensor a loss makes (masks, identity matrices) is made on its inputs' device with
    # their dtype: changing torch's default device or dtype changes nothing.
    name = variant.split("-")[0]
    spec, data = LOSSES[name], example(name)

    def call() -> torch.Tensor:
        return spec(data["student"], data["teacher"] if spec.uses_teacher else None,
                    labels=data.get("labels"), mask=data.get("mask"), normalizer=3.0,
                    **VARIANTS[variant])

    reference = call()
    assert reference.dtype == torch.float32
    with torch.device("meta"):
        on_meta_default = call()
    with default_dtype(torch.float64):
        in_float64_default = call()
    for value in (on_meta_default, in_float64_default):
        assert value.device == reference.device and value.dtype == torch.float32
        assert torch.equal(value, reference)


# ---------------------------------------------------------------------------------------------
# the registry's table
# ---------------------------------------------------------------------------------------------
def test_a_fresh_import_builds_the_documented_registry() -> None:
    """The table is built at import time: run the module again in a fresh module object (the
    imported one stays in place) so that the building code itself is checked."""
    found = importlib.util.find_spec("kdistill.losses.registry")
    assert found is not None and found.loader is not None
    fresh = importlib.util.module_from_spec(found)
    found.loader.exec_module(fresh)

    def fields(spec: Any) -> tuple[Any, ...]:
        return (spec.name, spec.fn, spec.inputs, spec.unit, spec.summary, spec.uses_teacher,
                spec.accepts_normalizer)

    assert {key: fields(spec) for key, spec in fresh.LOSSES.items()} == {
        key: fields(spec) for key, spec in LOSSES.items()
    }
    for key, spec in fresh.LOSSES.items():
        assert spec.name == spec.fn.__name__ == fresh.ALIASES.get(key, key)
        assert spec.uses_teacher is (spec.name != "cross_entropy")
        assert spec.accepts_normalizer is (spec.name in TOKEN_LOSSES)
        assert spec.inputs in ("none", "labels", "mask") and spec.summary
        assert spec.unit in ("examples", "tokens", "token_pairs", "labeled")
