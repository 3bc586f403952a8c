"""``denoise``: on-the-fly denoising of augmented data with a clean-data teacher's soft labels,
plus dropout self-regularisation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import Tensor

from kdistill import augment, losses
from kdistill.recipes.base import Recipe, RecipeParams, Term, ValueRange, register
from kdistill.recipes.shared import ORIGINAL, row_views, stack_views
from kdistill.schedules import TrainState
from kdistill.taps import Taps

# The views Denoise.prepare stacks (batch[VIEW]): the clean rows, then the two augmented passes.
CLEAN, FIRST, SECOND = ORIGINAL, 1, 2
Augmentation = Literal["auto", "image", "tokens", "noise"]


class DenoiseParams(RecipeParams):
    augmentation: Augmentation = "auto"
    max_shift: int = Field(default=1, ge=0)
    noise_std: float = Field(default=0.1, ge=0)
    erase_probability: float = Field(default=0.5, ge=0, le=1)
    erase_area: tuple[float, float] = (0.02, 0.25)
    value_range: ValueRange | None = (0.0, 1.0)
    replace_probability: float = Field(default=0.1, ge=0, le=1)
    swap_probability: float = Field(default=0.1, ge=0, le=1)
    delete_probability: float = Field(default=0.1, ge=0, le=1)
    keep_token_ids: list[int] = Field(default_factory=list)
    temperature: float = Field(default=1.0, gt=0)
    ce_weight: float = Field(default=1.0, ge=0)
    soft_weight: float = Field(default=1.0, ge=0)
    consistency_weight: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _ranges(self) -> DenoiseParams:
        low, high = self.erase_area
        if not 0 < low <= high <= 1:
            raise ValueError(f"erase_area must satisfy 0 < low <= high <= 1, got {self.erase_area}")
        return self


def augmentation_kind(batch: Mapping[str, Any], asked: Augmentation) -> Augmentation:
    """``asked``, or for ``auto``: ``tokens`` for a batch with ``input_ids``, ``image`` for
    ``[B, C, H, W]`` inputs, ``noise`` for any other float inputs."""
    if asked != "auto":
        return asked
    if "input_ids" in batch:
        return "tokens"
    inputs = batch.get("input")
    return "image" if isinstance(inputs, Tensor) and inputs.dim() == 4 else "noise"


@register
class Denoise(Recipe):
    """L = w_ce CE(y, z_s(x)) + w_soft T^2 KL(p_t^T(x~) || p_s^T(x~))
    + w_cons (KL(p_s1(x~) || p_s2(x~)) + KL(p_s2(x~) || p_s1(x~))) / 2.

    Fang, Zhou, Liu, Zhang, Song & Chen (2024), "On-the-fly Denoising for Data Augmentation in
    Natural Language Understanding" (EACL Findings). Augmented examples ``x~`` may no longer
    match their labels, so the student learns the soft labels that a teacher trained on the
    clean data gives them (never the hard labels), keeps CE on the clean labelled examples, and
    a self-regularisation term makes two dropout passes over the same augmented input agree
    (the symmetric KL of R-Drop, Liang et al. 2021).

    :meth:`prepare` turns a batch of B rows into 3B: the clean rows (view 0), an augmented copy
    (view 1) and the same augmented copy again (view 2). In one training forward every row gets
    its own dropout mask, so views 1 and 2 are two dropout passes over identical inputs; BatchNorm
    normalises both with the same batch statistics, so without dropout the two passes agree
    exactly and the consistency term is 0. The labels of the augmented rows are hidden.
    Augmentation (``augmentation``): ``image`` = random shift by up to ``max_shift`` pixels,
    Gaussian noise ``noise_std``, random erasing, clamped to ``value_range``; ``tokens`` = EDA
    style replacement, swap and deletion of valid tokens (:func:`kdistill.augment.augment_tokens`;
    padding, ``keep_token_ids`` and each row's first and last token are kept); ``noise`` =
    Gaussian noise for any float input; ``auto`` picks by the batch.

    Choices where the paper is unclear: the soft term averages over both augmented passes, with
    Hinton's T^2 factor (default T = 1, the teacher's plain probabilities); the consistency term
    is at T = 1 with gradients through both passes; CE uses the clean rows only (the augmented
    rows carry no hard label). Token-level logits ``[B, L, C]`` average the soft and consistency
    terms over valid tokens (unit ``tokens``), sequence- and image-level logits over examples.
    """

    name = "denoise"
    summary = "Soft labels of a clean-data teacher on augmented inputs + CE + dropout consistency"
    paper = ("Fang, Zhou, Liu, Zhang, Song, Chen 2024, On-the-fly Denoising for Data "
             "Augmentation in Natural Language Understanding")
    Params = DenoiseParams

    def augment(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """One augmented copy of ``batch`` (labels still as they were)."""
        p = self.params
        kind = augmentation_kind(batch, p.augmentation)
        if kind == "tokens":
            return augment.augment_tokens(
                batch, replace_probability=p.replace_probability,
                swap_probability=p.swap_probability, delete_probability=p.delete_probability,
                keep_ids=p.keep_token_ids)
        inputs = batch.get("input")
        if not isinstance(inputs, Tensor):
            raise ValueError(f"denoise: augmentation '{kind}' needs batch['input']; batch keys: "
                             f"{sorted(batch)}")
        if kind == "image":
            changed = augment.augment_images(
                inputs, max_shift=p.max_shift, noise_std=p.noise_std,
                erase_probability=p.erase_probability, erase_area=p.erase_area,
                value_range=p.value_range)
        else:
            changed = augment.gaussian_noise(inputs, p.noise_std, value_range=p.value_range)
        return {**batch, "input": changed}

    def prepare(self, batch: dict[str, Any], student: Callable[[Mapping[str, Any]], Taps],
                state: TrainState) -> dict[str, Any]:
        """Clean rows, an augmented copy and the same copy again (its labels hidden), marked
        by ``batch[VIEW]``: ``CLEAN``, ``FIRST``, ``SECOND``."""
        noisy = self.augment(batch)
        return stack_views({CLEAN: batch, FIRST: noisy, SECOND: noisy},
                           unlabeled=(FIRST, SECOND))

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        view = row_views(batch, self.name)
        logits, target = student["logits"], teacher["logits"]
        per_token = logits.dim() == 3
        mask = batch.get("attention_mask") if per_token else None
        first, second, augmented = view == FIRST, view == SECOND, view != CLEAN

        def part(rows: Tensor) -> Tensor | None:
            return mask[rows] if mask is not None else None

        # forward_kl: mean over rows, or over the valid tokens of the mask for token logits
        soft = losses.forward_kl(logits[augmented], target[augmented], part(augmented),
                                 p.temperature)
        one, two, pair_mask = logits[first], logits[second], part(first)
        symmetric = (losses.forward_kl(one, two, pair_mask)
                     + losses.forward_kl(two, one, pair_mask)) / 2
        unit = "tokens" if per_token else "examples"
        clean = view == CLEAN
        return {
            "ce": Term(losses.cross_entropy(logits[clean], batch["labels"][clean]),
                       weight=p.ce_weight, unit="labeled"),
            "soft": Term(p.temperature**2 * soft, weight=p.soft_weight, unit=unit),
            "consistency": Term(symmetric, weight=p.consistency_weight, unit=unit),
        }
