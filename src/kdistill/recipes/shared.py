"""What several recipes use, in one module: recipes import these pieces from here and import
one another only to subclass (or to run another recipe as a phase).

* Rows of logits: :func:`valid_rows` (which rows count, and in which engine unit) and
  :func:`labels_or_teacher_argmax` (a target for every row, labelled or not).
* The label term: :func:`label_term` (cross-entropy, or CTC on a CTC batch).
* Stacked views of a batch: :func:`stack_views` puts several versions of the same samples
  (clean, augmented, noisy, perturbed...) one after the other in one batch and marks every row
  with the id of its view in ``batch[VIEW]``; :func:`row_views` reads the marks back and
  :func:`select_rows` takes some rows of a batch.
* Weights given as a number or a schedule: :data:`Weight`, :func:`as_schedule`.
* Online peers: :func:`distinct_from` (a peer must not start as an exact copy of the student).
* New heads on the student: :class:`StudentHeadParams`.
* Annealing-KD's teacher scaling, shared by ``annealing`` and ``continuation``:
  :func:`anneal_factor`, :func:`default_anneal_epochs`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from kdistill import losses
from kdistill.batch import TARGET_LENGTHS, TOKEN_MASK, hidden_like
from kdistill.losses.registry import Unit
from kdistill.models.fresh import reinitialise_
from kdistill.recipes.base import RecipeParams, Term
from kdistill.schedules import ScheduleConfig, constant

# ------------------------------------------------------------------------------- rows of logits


def valid_rows(logits: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, Unit]:
    """Which rows (distributions) of ``logits`` count, and the engine unit they are counted in.

    Logits [B, C]: every sample, unit ``examples``. Token logits [B, L, C]: the tokens where the
    batch's ``attention_mask`` is set (every token without a mask), unit ``tokens``.
    """
    if logits.dim() == 2:
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device), "examples"
    if logits.dim() != 3:
        raise ValueError(f"expected logits [B, C] or token logits [B, L, C], got "
                         f"{tuple(logits.shape)}")
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device), "tokens"
    if mask.shape != logits.shape[:2]:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match token logits "
                         f"{tuple(logits.shape)}")
    return mask.to(logits.device).bool(), "tokens"


def labels_or_teacher_argmax(batch: Mapping[str, Any], teacher_logits: Tensor) -> Tensor:
    """The batch's labels where known; the teacher's top-1 class where the label is hidden."""
    labels = batch.get("labels")
    guess = teacher_logits.argmax(dim=-1)
    if labels is None:
        return guess
    labels = labels.to(guess.device)
    return torch.where(labels >= 0, labels, guess)


def label_term(logits: Tensor, batch: Mapping[str, Any], weight: float = 1.0) -> dict[str, Term]:
    """The student's loss on the batch's labels, a mean per known label (unit ``labeled``), as
    a one-term dict: ``ctc``, :func:`kdistill.losses.ctc_loss` per target token, when the
    batch is a CTC batch (it has ``target_lengths``, see :mod:`kdistill.batch`); ``ce``,
    :func:`kdistill.losses.cross_entropy` per labelled row, otherwise."""
    if TARGET_LENGTHS in batch:
        value = losses.ctc_loss(logits, batch["labels"], batch[TARGET_LENGTHS])
        return {"ctc": Term(value, weight=weight, unit="labeled")}
    return {"ce": Term(losses.cross_entropy(logits, batch["labels"]), weight=weight,
                       unit="labeled")}


def check_token_logits(recipe: str, z_s: Tensor, z_t: Tensor, batch: Mapping[str, Any]) -> None:
    """Refuse a batch that is not language modelling, or two models that predict over
    different vocabularies (token-level KD compares distributions over one)."""
    if TOKEN_MASK not in batch:
        raise ValueError(f"{recipe}: the batch has no '{TOKEN_MASK}'; it distils language "
                         "models on language-modelling data (lm_text, lm_hf_dataset)")
    if z_s.shape[-1] != z_t.shape[-1]:
        raise ValueError(f"{recipe}: the student predicts {z_s.shape[-1]} tokens and the "
                         f"teacher {z_t.shape[-1]}; token-level KD compares distributions "
                         "over one vocabulary, so the student must share the teacher's "
                         "tokenizer (lm_student); to distil across tokenizers use span_kd "
                         "(likelihoods of word-aligned text spans) or seqkd (sequence-level "
                         "KD on the teacher's generated text)")



# -------------------------------------------------------------------- stacked views of a batch

VIEW = "view"
"""The batch key :func:`stack_views` adds: a long tensor giving each row the id of its view."""

ORIGINAL = 0
"""The view id of the rows as they came, in a stack that keeps them (its first view)."""

_ROW_KEYS = ("index", "labels", "input", "input_ids")


def _rows(batch: Mapping[str, Any]) -> Tensor:
    """The per-sample tensor that tells how many samples ``batch`` holds."""
    for key in _ROW_KEYS:
        value = batch.get(key)
        if isinstance(value, Tensor) and value.dim() > 0:
            return value
    raise ValueError(f"cannot tell how many samples the batch holds: it has none of "
                     f"{list(_ROW_KEYS)}; keys: {sorted(batch)}")


def stack_views(views: Mapping[int, Mapping[str, Any]], *,
                unlabeled: Collection[int] = ()) -> dict[str, Any]:
    """One batch holding the rows of every view in turn, each row marked with its view's id.

    ``views`` maps a view id (an int the recipe names, :data:`ORIGINAL` = 0 for the rows as
    they came) to a batch of the same B samples with the same keys, e.g.
    ``{ORIGINAL: batch, AUGMENTED: copy}``. The result holds the views' rows in the mapping's
    order (row ``v * B + i`` is sample i of the v-th view); ``result[VIEW]`` (long, one id per
    row) marks them. Per-sample tensors (leading dimension B, counted on ``index``, ``labels``,
    ``input`` or ``input_ids``) are concatenated; any other value is taken from the first view.
    The labels of the views listed in ``unlabeled`` are hidden (``UNLABELED``, NaN for scores):
    copies whose label may no longer fit, or that only a teacher labels.

    A one-view stack is allowed: it marks a batch whose rows were all changed (e.g. all
    perturbed) with that view's id.
    """
    if not views:
        raise ValueError("stack_views: needs at least one view")
    unknown = sorted(set(unlabeled) - set(views))
    if unknown:
        raise ValueError(f"stack_views: unlabeled names views {unknown} that are not among "
                         f"the views {list(views)}")
    parts = [{**part, "labels": hidden_like(part["labels"])}
             if view in unlabeled and "labels" in part else part
             for view, part in views.items()]
    first = _rows(parts[0])
    rows = len(first)
    stacked = {key: torch.cat([part[key] for part in parts])
               if isinstance(value, Tensor) and value.dim() > 0 and len(value) == rows else value
               for key, value in parts[0].items()}
    ids = torch.tensor(list(views), dtype=torch.long, device=first.device)
    stacked[VIEW] = ids.repeat_interleave(rows)
    return stacked


def row_views(batch: Mapping[str, Any], recipe: str) -> Tensor:
    """``batch[VIEW]``, the view id of every row that ``recipe``'s ``prepare`` stacked, with a
    clear error when the batch did not go through it."""
    if VIEW not in batch:
        raise ValueError(f"{recipe}: the batch has no '{VIEW}' key marking its rows; it must "
                         f"come from the recipe's prepare()")
    return batch[VIEW]


def select_rows(batch: Mapping[str, Any], rows: Tensor) -> dict[str, Any]:
    """The batch restricted to ``rows`` (a boolean mask over its samples): every per-sample
    tensor indexed by it, every other value kept."""
    return {key: value[rows] if isinstance(value, Tensor) and value.shape[:1] == rows.shape
            else value for key, value in batch.items()}


# ---------------------------------------------------------------------------------- weights

Weight = Annotated[float, Field(ge=0.0)]
"""A non-negative loss weight in recipe parameters (often ``Weight | ScheduleConfig``)."""


def as_schedule(value: float | ScheduleConfig) -> ScheduleConfig:
    """A weight or momentum given as a number or a schedule, as a schedule."""
    return value if isinstance(value, ScheduleConfig) else constant(value)


# ------------------------------------------------------------------------------------ peers


def distinct_from(student: nn.Module, model: nn.Module) -> nn.Module:
    """``model``, its weights re-drawn in place (:func:`reinitialise_`) when it holds exactly
    the student's (same architecture built from the same seed). Two identical peers receive
    identical gradients (every divergence between them is at its minimum) and would stay
    identical for the whole run, teaching each other nothing."""
    mine, theirs = student.state_dict(), model.state_dict()
    same = mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]) for k in mine)
    return reinitialise_(model) if same else model


# ---------------------------------------------------------------------------- student heads


class StudentHeadParams(RecipeParams):
    """Where new heads attach to the student: the submodule giving its penultimate features
    and its own head (whose shape the new heads copy when it is an ``nn.Linear``)."""

    features: str = Field(default="features", min_length=1)
    head: str = Field(default="head", min_length=1)
    in_features: int | None = Field(default=None, ge=1)
    num_classes: int | None = Field(default=None, ge=2)


# -------------------------------------------------------------------------------- annealing


def anneal_factor(epoch: int, epochs: int, t_max: int) -> float:
    """phi(T) = 1 - (T - 1) / T_max at 0-based ``epoch`` of an annealing span of ``epochs``.

    The temperature starts at T = T_max and drops by one every max(1, floor(epochs / T_max))
    epochs until it reaches 1, where it stays; so phi rises from 1/T_max to 1 in T_max equal
    steps. With ``epochs`` < ``t_max`` one step per epoch leaves phi at ``epochs / t_max`` in
    the span's last epoch: the student never sees the full teacher logits. The official code
    (which asserts ``epochs >= t_max``) keeps raising T past T_max when ``epochs`` is not a
    multiple of T_max; here T stops at 1 (phi at 1).
    """
    if t_max < 1:
        raise ValueError(f"anneal_factor: t_max must be >= 1, got {t_max}")
    if epochs < 1:
        raise ValueError(f"anneal_factor: epochs must be >= 1, got {epochs}")
    if epoch < 0:
        raise ValueError(f"anneal_factor: epoch must be >= 0, got {epoch}")
    every = max(1, epochs // t_max)
    temperature = max(1, t_max - epoch // every)
    return 1.0 - (temperature - 1) / t_max


def default_anneal_epochs(epochs: int) -> int:
    """Two thirds of a budget of ``epochs`` (rounded to the nearest epoch, at least 1): the
    official Annealing-KD code trains 200 epochs in phase 1 and 100 in phase 2."""
    return max(1, (2 * epochs + 1) // 3)
