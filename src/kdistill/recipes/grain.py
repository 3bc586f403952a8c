"""``grain``: distil while pruning inside attention heads and FFNs by gradient-based
importance (GRAIN), the distillation gradients kept out of the importance scores."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from kdistill import losses
from kdistill.models.pruning import (
    UNIT_KINDS,
    EncoderLayer,
    MaskedEncoder,
    encoder_layers,
    unit_sizes,
)
from kdistill.recipes.adapters import make_adapter
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import valid_rows
from kdistill.schedules import TrainState
from kdistill.taps import Taps

logger = logging.getLogger("kdistill")

Importance = Literal["labels", "prediction"]


# -- importance ----------------------------------------------------------------------------------
def taylor_importance(loss: Tensor, layers: Sequence[EncoderLayer]) -> dict[str, Tensor]:
    """First-order Taylor importance of every unit for ``loss``, from its gradient alone:

        I_ffn[l, j] = | sum_i dL/dW2[i, j] W2[i, j] |                 (FFN output layer column j)
        I_qk[l, r]  = | sum_i dL/dWq[r, i] Wq[r, i] + dL/dbq[r] bq[r] |   (query row r)
        I_vo[l, r]  = | sum_i dL/dWo[i, r] Wo[i, r] |                 (attention output column r)

    the estimated change of ``loss`` when the unit is removed (GRAIN's scores, which read the
    query for a query/key dimension). ``torch.autograd.grad`` computes the gradient of ``loss``
    only (the graph is kept for the training backward), so no other loss enters the scores.
    """
    params = [p for layer in layers for p in (layer.ffn_out.weight, layer.query.weight,
                                              layer.query.bias, layer.attention_out.weight)]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    scores: dict[str, list[Tensor]] = {kind: [] for kind in UNIT_KINDS}
    for i in range(len(layers)):
        w2, wq, bq, wo = params[4 * i: 4 * i + 4]
        g2, gq, gbq, go = grads[4 * i: 4 * i + 4]
        scores["ffn"].append((g2 * w2).sum(dim=0).abs())
        scores["qk"].append(((gq * wq).sum(dim=1) + gbq * bq).abs())
        scores["vo"].append((go * wo).sum(dim=0).abs())
    return {kind: torch.stack(values).detach() for kind, values in scores.items()}


def regularised(update: Mapping[str, Tensor], masks: Mapping[str, Tensor], heads: int,
                head_alpha: float, layer_alpha: float) -> dict[str, Tensor]:
    """GRAIN's structure regularisation of an importance update: units in sparse heads and
    layers count less, so whole heads and layers empty out.

        U_vo[l, h, :] *= tanh(density of head h's value dims / alpha_head)
                         * tanh(density of layer l's value dims / alpha_layer)
        U_ffn[l, :]   *= tanh(density of layer l's FFN neurons / alpha_layer)

    (density: the share of the units still kept); query/key updates are unchanged."""
    layers, width = masks["vo"].shape
    vo_mask = masks["vo"].view(layers, heads, -1)
    vo = update["vo"].view(layers, heads, -1) * torch.tanh(
        vo_mask.mean(dim=-1, keepdim=True) / head_alpha)
    vo = vo.view(layers, width) * torch.tanh(masks["vo"].mean(dim=-1, keepdim=True)
                                             / layer_alpha)
    ffn = update["ffn"] * torch.tanh(masks["ffn"].mean(dim=-1, keepdim=True) / layer_alpha)
    return {"ffn": ffn, "qk": update["qk"], "vo": vo}


# -- schedule and masks --------------------------------------------------------------------------
def density_at(done: int, total: int, start: float, end: float, target: float) -> float:
    """The density to reach after ``done`` of ``total`` optimizer steps: 1 until
    s = floor(start total), ``target`` from e = floor(end total), between them GRAIN's cubic
    decay d = D + (1 - D) (1 - (done - s) / (e - s))^3."""
    first, last = int(start * total), int(end * total)
    if done <= first:
        return 1.0
    if done >= last:
        return target
    return target + (1 - target) * (1 - (done - first) / (last - first)) ** 3


def pruned_masks(scores: Mapping[str, Tensor], masks: Mapping[str, Tensor], density: float,
                 hidden: int, heads: int) -> dict[str, Tensor] | None:
    """The masks keeping ``density`` of the prunable parameters, or None when they would prune
    no more units than ``masks`` already do.

    Every unit of every layer is ranked by importance (pruned units at -inf, so masks only
    shrink); units are removed from the least important on while the removed parameters
    (:func:`~kdistill.models.pruning.unit_sizes`) stay below 1 - ``density`` of all (one
    global ranking, as GRAIN's code). Then the query/key dimensions of a head left without
    any value dimension are removed too (the head is gone)."""
    sizes = unit_sizes(hidden)
    flat = torch.cat([scores[kind].reshape(-1) for kind in UNIT_KINDS])
    weight = torch.cat([torch.full((scores[kind].numel(),), float(sizes[kind]))
                        for kind in UNIT_KINDS]).to(flat.device)
    order = torch.argsort(flat, stable=True)
    removed = torch.cumsum(weight[order], dim=0) / weight.sum()
    count = int(torch.searchsorted(removed, torch.tensor(1 - density, device=flat.device)))
    already = sum(int((mask == 0).sum()) for mask in masks.values())
    if count <= already:
        return None
    keep = torch.ones_like(flat)
    keep[order[:count]] = 0
    new = dict(zip(UNIT_KINDS, keep.split([scores[k].numel() for k in UNIT_KINDS]),
                   strict=True))
    new = {kind: new[kind].view_as(masks[kind]) for kind in UNIT_KINDS}
    layers = new["vo"].shape[0]
    alive = new["vo"].view(layers, heads, -1).any(dim=-1, keepdim=True)
    new["qk"] = (new["qk"].view(layers, heads, -1) * alive).view_as(new["qk"])
    return new


# -- the recipe ---------------------------------------------------------------------------------
class GRAINParams(RecipeParams):
    density: float = Field(default=0.05, gt=0, le=1, description="share of the encoder's "
                           "prunable parameters kept at the end")
    start: float = Field(default=0.2, ge=0, lt=1, description="share of the phase's steps "
                         "before pruning starts")
    end: float = Field(default=0.4, gt=0, le=1, description="share of the phase's steps at "
                       "which the target density is reached")
    every: PositiveInt = Field(default=1, description="prune every this many steps")
    beta: float = Field(default=0.998, ge=0, lt=1, description="EMA factor of the scores")
    head_alpha: float = Field(default=0.3, gt=0, description="structure regularisation of "
                              "heads (alpha_head)")
    layer_alpha: float = Field(default=1e-4, gt=0, description="structure regularisation of "
                               "layers (alpha_ffn = alpha_mha)")
    importance: Importance = Field(default="labels", description="the loss whose gradients "
                                   "score units: 'labels' (cross-entropy on the known labels) "
                                   "or 'prediction' (also the prediction-layer KD)")
    temperature: float = Field(default=8.0, gt=0)
    kd_weight: float = Field(default=1.0, ge=0)
    ce_weight: float = Field(default=0.0, ge=0)
    hidden_weight: float = Field(default=1.0, ge=0)
    hidden_layers: list[tuple[int, int]] | None = Field(
        default=None, description="(student, teacher) hidden-state pairs matched by MSE "
        "(default (i, i) for i = 0, 2, 4, ... up to the student's depth)")

    @model_validator(mode="after")
    def _ordered(self) -> GRAINParams:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must come after start ({self.start}): pruning "
                             "runs from start to end (shares of the phase's steps)")
        return self


@register
class GRAIN(Recipe):
    """GRAIN: prune inside attention heads and FFNs by gradient-based importance while
    distilling.

    Liang, Jiang, Yang, Hou, Che, Liu, Chen & Wang (2023), "Gradient-based Intra-attention
    Pruning on Pre-trained Language Models" (ACL). The student (a BERT-style encoder) becomes a
    :class:`~kdistill.models.pruning.MaskedEncoder` with a mask per FFN neuron, query/key
    dimension and value/output dimension (heads end up with different sizes). It trains on

        L = w_kd SCE(z_s / T, z_t / T) + w_ce CE(z_s, y)
            + w_hid sum_(i, j) MSE(P_i h_s^i, h_t^j)

    (SCE = - sum_c p_t log p_s, no T^2, over valid rows; P_i a linear map initialised to the
    identity when the widths agree; MSE over valid tokens). Pruning, every ``every`` steps:

    * importance: the first-order Taylor score I = |sum_w (dL_imp/dw) w| of each unit
      (:func:`taylor_importance`) where L_imp is the cross-entropy on the known labels
      (``importance: labels``) or w_ce CE + w_kd SCE (``prediction``, GRAIN's code: only the
      hidden-state matching is kept out). Gradient separation: L_imp's gradient is computed on
      its own (``torch.autograd.grad``), so no distillation gradient reaches the scores;
    * update: the micro-batches' scores of a step, regularised toward whole heads and layers
      (:func:`regularised`), enter an EMA  S <- beta S + (1 - beta) U;
    * masks: after ``done`` optimizer steps of the phase the kept share of the prunable
      parameters is d(done) (:func:`density_at`: 1, then a cubic decay from ``start`` to
      ``end`` of the phase, then ``density``); units are removed globally, least important
      first, weighted by their parameter count (:func:`pruned_masks`); removed units stay
      removed.

    Defaults, GRAIN's GLUE script: density 0.05, start 0.2, end 0.4, every step, beta 0.998,
    alpha_head 0.3, alpha_layer 1e-4, T = 8, hidden states 0, 2, 4, ... matched. Our choices
    (importance from the labels by default, no embedding factorisation, no physical removal
    of the pruned units): docs/recipes.md. The deployable student is the model with the masks
    baked in (:meth:`MaskedEncoder.export`); :meth:`MaskedEncoder.remaining_parameters`
    counts what removing the pruned units leaves, logged at every mask change.
    """

    name = "grain"
    summary = ("GRAIN: prune FFN neurons and query/key and value/output dimensions inside "
               "heads by Taylor importance of the task loss while distilling")
    paper = ("Liang et al. 2023, Gradient-based Intra-attention Pruning on Pre-trained "
             "Language Models")
    Params = GRAINParams
    architecture = "BERT-style transformer encoders (attention.self, intermediate, output)"

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        self.projections: nn.ModuleList | None = None
        self._pairs: list[tuple[int, int]] | None = (
            None if self.params.hidden_layers is None else list(self.params.hidden_layers))

    # -- the pruned model -------------------------------------------------------------------
    @property
    def encoder(self) -> MaskedEncoder:
        """The student this recipe prunes (set by :meth:`wrap_student`)."""
        encoder = self.__dict__.get("_encoder")  # not a submodule: the student is not ours
        if encoder is None:
            raise RuntimeError("grain: wrap_student must wrap the student before training")
        return encoder

    def wrap_student(self, student: nn.Module) -> nn.Module:
        """The student with unit masks (an already masked one is kept)."""
        encoder = student if isinstance(student, MaskedEncoder) else \
            MaskedEncoder(student, where="grain")
        self.__dict__["_encoder"] = encoder
        if self._pairs is None:
            depth = len(encoder_layers(encoder.model))
            self._pairs = [(i, i) for i in range(0, depth + 1, 2)]
        return encoder

    def _hidden_pairs(self) -> list[tuple[int, int]]:
        if self._pairs is None:
            raise RuntimeError("grain: the hidden-state pairs are known once the student is "
                               "wrapped (or give hidden_layers)")
        return self._pairs if self.params.hidden_weight else []

    def student_taps(self) -> list[str]:
        pairs = self._hidden_pairs()
        return ["logits", *(["token_mask"] if pairs else []),
                *(f"hidden.{s}" for s, _ in pairs)]

    def teacher_taps(self) -> list[str]:
        return ["logits", *(f"hidden.{t}" for _, t in self._hidden_pairs())]

    def build(self, student: Taps, teacher: Taps | None) -> None:
        assert teacher is not None
        self.projections = nn.ModuleList(
            identity_adapter(student[f"hidden.{s}"], teacher[f"hidden.{t}"])
            for s, t in self._hidden_pairs())
        masks = self.encoder.masks()
        for kind in UNIT_KINDS:
            self.register_buffer(f"{kind}_scores", torch.zeros_like(masks[kind]))
            self.register_buffer(f"{kind}_update", torch.zeros_like(masks[kind]))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    # -- terms ------------------------------------------------------------------------------
    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        assert teacher is not None and self.projections is not None
        p = self.params
        z_s, z_t = student["logits"], teacher["logits"]
        rows, unit = valid_rows(z_s, batch)
        kd = losses.soft_ce(z_s[rows], z_t[rows], temperature=p.temperature)
        ce = losses.cross_entropy(z_s, batch["labels"])
        terms = {"kd": Term(kd, p.kd_weight, unit), "ce": Term(ce, p.ce_weight, "labeled")}
        pairs = self._hidden_pairs()
        if pairs:
            mask = student["token_mask"]
            terms["hidden"] = Term(
                sum(losses.hidden_mse(proj(student[f"hidden.{s}"]), teacher[f"hidden.{t}"],
                                      mask)
                    for proj, (s, t) in zip(self.projections, pairs, strict=True)),
                p.hidden_weight, "tokens")
        importance = ce if p.importance == "labels" else p.ce_weight * ce + p.kd_weight * kd
        self.track(importance, state)
        return terms

    def track(self, importance: Tensor, state: TrainState) -> None:
        """Start of a new step: fold the last step's scores into the EMA and prune as the
        schedule asks; then add this micro-batch's scores of ``importance`` (nothing outside a
        training forward, or when it has no gradient, e.g. no known label)."""
        if not torch.is_grad_enabled():
            return
        if state.step + 1 > int(self.steps_seen):
            self._close_step(state)
            self.steps_seen.fill_(state.step + 1)
        if importance.requires_grad:
            update = taylor_importance(importance, encoder_layers(self.encoder.model))
            for kind in UNIT_KINDS:
                getattr(self, f"{kind}_update").add_(update[kind])

    def _close_step(self, state: TrainState) -> None:
        p, encoder = self.params, self.encoder
        masks = encoder.masks()
        update = regularised({k: getattr(self, f"{k}_update") for k in UNIT_KINDS}, masks,
                             encoder.heads, p.head_alpha, p.layer_alpha)
        for kind in UNIT_KINDS:
            scores = getattr(self, f"{kind}_scores")
            scores.mul_(p.beta).add_(update[kind], alpha=1 - p.beta)
            getattr(self, f"{kind}_update").zero_()
        done = state.step
        if done % p.every:
            return
        density = density_at(done, state.total_steps, p.start, p.end, p.density)
        scores = {k: getattr(self, f"{k}_scores") for k in UNIT_KINDS}
        new = pruned_masks(scores, masks, density, encoder.hidden, encoder.heads)
        if new is None:
            return
        encoder.set_masks(new)
        for kind in UNIT_KINDS:
            scores[kind].masked_fill_(new[kind] == 0, -math.inf)
        logger.info("grain: step %d, %.4f of the prunable parameters kept, %d parameters left",
                    done, encoder.density(), encoder.remaining_parameters())


def identity_adapter(student: Tensor, teacher: Tensor) -> nn.Module:
    """A linear map from the student's hidden width to the teacher's, initialised to the
    identity when they are equal (GRAIN's code), as :func:`make_adapter` otherwise."""
    layer = make_adapter("linear", student, teacher, where="grain hidden_layers")
    if student.shape[-1] == teacher.shape[-1]:
        with torch.no_grad():
            layer.weight.copy_(torch.eye(student.shape[-1]))
            layer.bias.zero_()
    return layer
