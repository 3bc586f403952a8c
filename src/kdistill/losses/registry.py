"""The loss registry used by config-built ("composite") recipes.

A config names a loss by its registered name and gives keyword hyper-parameters; the registry
says which extra batch data the loss needs, how it normalises, and which hyper-parameters it
accepts, so the config can be validated before anything runs::

    spec = get_loss("kd")
    check_params("kd", {"temperature": 2.0})          # ValueError suggesting valid ones if wrong
    value = spec(student_logits, teacher_logits, temperature=2.0)

Only functions registered here can be named from a config (configs are data, not code).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from kdistill.names import unknown_name

from .features import attention_mse, attention_transfer, cosine, hidden_mse
from .logits import cross_entropy, dkd, kd, logit_mse, soft_ce
from .relations import pkt, rkd_angle, rkd_distance
from .sequence import forward_kl, generalized_jsd, reverse_kl, tvd

__all__ = [
    "ALIASES",
    "LOSSES",
    "LossSpec",
    "UnknownLossError",
    "check_params",
    "get_loss",
    "loss_params",
]

Inputs = Literal["none", "labels", "mask"]
Unit = Literal["examples", "tokens", "token_pairs", "labeled"]

# Arguments supplied at run time by the recipe/engine, never from a config.
_RUNTIME_ARGS = frozenset({"mask", "normalizer"})


class UnknownLossError(KeyError, ValueError):
    """Raised for a loss name that is not registered; the message suggests close names."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class LossSpec:
    """How a registered loss is called and what it needs.

    Attributes:
        name: registered name (the function's name).
        fn: the loss function.
        inputs: extra batch data it needs besides the two tensors: ``"none"``; ``"labels"``
            (class targets, passed positionally after the tensors: DKD's ``target``, CE's
            ``labels``); ``"mask"`` (the valid-token mask, passed as ``mask=``, optional).
        unit: what the loss averages over: ``"examples"`` (rows/samples), ``"tokens"``
            (valid tokens or positions under the mask) or ``"labeled"`` (labelled rows).
        summary: one line for listings.
        uses_teacher: False for losses of the student alone (cross-entropy on labels).
        accepts_normalizer: True if the loss takes ``normalizer=`` (global-batch token count).
    """

    name: str
    fn: Callable[..., Tensor]
    inputs: Inputs
    unit: Unit
    summary: str
    uses_teacher: bool = True
    accepts_normalizer: bool = False

    def params(self) -> dict[str, inspect.Parameter]:
        """Keyword hyper-parameters of the loss (see :func:`loss_params`)."""
        return _hyper_parameters(self.fn)

    def __call__(
        self,
        student: Tensor,
        teacher: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        normalizer: float | Tensor | None = None,
        **params: Any,
    ) -> Tensor:
        """Call the loss with the data its spec asks for plus validated hyper-parameters.

        ``mask`` and ``normalizer`` are passed on only to losses that accept them and are
        otherwise ignored, so a recipe can hand the same batch data to every term.
        """
        check_params(self.name, params)
        if self.uses_teacher and teacher is None:
            raise ValueError(f"loss '{self.name}' needs a teacher tensor")
        args: list[Tensor] = [student, teacher] if self.uses_teacher else [student]
        if self.inputs == "labels":
            if labels is None:
                raise ValueError(f"loss '{self.name}' needs labels")
            args.append(labels)
        kwargs: dict[str, Any] = dict(params)
        if self.inputs == "mask":
            kwargs["mask"] = mask
        if self.accepts_normalizer and normalizer is not None:
            kwargs["normalizer"] = normalizer
        return self.fn(*args, **kwargs)


def _hyper_parameters(fn: Callable[..., Tensor]) -> dict[str, inspect.Parameter]:
    # Tensor arguments have no default; mask/normalizer are run-time data.
    return {
        name: param
        for name, param in inspect.signature(fn).parameters.items()
        if param.default is not inspect.Parameter.empty and name not in _RUNTIME_ARGS
    }


def _spec(
    fn: Callable[..., Tensor],
    inputs: Inputs,
    unit: Unit,
    summary: str,
    uses_teacher: bool = True,
) -> LossSpec:
    accepts = "normalizer" in inspect.signature(fn).parameters
    return LossSpec(fn.__name__, fn, inputs, unit, summary, uses_teacher, accepts)


_SPECS = [
    _spec(kd, "none", "examples", "Hinton KD: T^2 KL(p_t || p_s) at temperature T"),
    _spec(soft_ce, "none", "examples", "soft cross-entropy -sum p_t log p_s (TinyBERT)"),
    _spec(dkd, "labels", "examples", "decoupled KD: alpha TCKD + beta NCKD"),
    _spec(logit_mse, "none", "examples", "mean squared error between logits"),
    _spec(
        cross_entropy,
        "labels",
        "labeled",
        "cross-entropy of the student on hard labels",
        uses_teacher=False,
    ),
    _spec(hidden_mse, "mask", "tokens", "MSE between (projected) features"),
    _spec(cosine, "mask", "tokens", "1 - cosine similarity of feature vectors"),
    _spec(attention_mse, "mask", "token_pairs", "MSE between attention maps (TinyBERT)"),
    _spec(attention_transfer, "none", "examples", "AT on conv feature maps (weight 1000 a pair)"),
    _spec(rkd_distance, "none", "examples", "RKD: Huber on normalised distances (weight 25)"),
    _spec(rkd_angle, "none", "examples", "RKD: Huber on triplet angles (weight 50)"),
    _spec(pkt, "none", "examples", "PKT: KL between cosine-similarity conditionals"),
    _spec(forward_kl, "mask", "tokens", "token-level KL(p_t || p_s)"),
    _spec(reverse_kl, "mask", "tokens", "token-level KL(p_s || p_t)"),
    _spec(generalized_jsd, "mask", "tokens", "token-level generalised JSD(beta) (GKD)"),
    _spec(tvd, "mask", "tokens", "token-level total variation distance"),
]

#: Short names accepted in configs, mapped to registered names.
ALIASES: dict[str, str] = {"ce": "cross_entropy"}

#: Every registered loss by name; aliases point at the same spec object.
LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _SPECS}
LOSSES.update({alias: LOSSES[target] for alias, target in ALIASES.items()})


def get_loss(name: str) -> LossSpec:
    """The spec registered under ``name`` (or an alias).

    Raises:
        UnknownLossError: (a ``KeyError`` and ``ValueError``) with
            ``"unknown loss 'x'; did you mean 'y'?"`` or the list of valid names.
    """
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        pass
    raise UnknownLossError(unknown_name("loss", str(name), LOSSES))


def loss_params(name: str) -> dict[str, inspect.Parameter]:
    """Keyword hyper-parameters the loss accepts, by name, in signature order.

    These are the arguments with defaults after the tensor/target arguments, without the
    run-time ``mask`` and ``normalizer`` (e.g. ``kd`` -> ``temperature``, ``reduction``).
    """
    return get_loss(name).params()


def check_params(name: str, params: Mapping[str, Any]) -> None:
    """Raise ValueError for each key of ``params`` the loss does not accept, with close names."""
    valid = loss_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError("; ".join(unknown_name(f"{name} parameter", key, valid)
                                   for key in unknown))
