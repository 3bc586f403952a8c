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
    Natural Language Understanding" (EACL Findings). The student learns the soft labels that a
    teacher trained on the clean data gives augmented examples ``x~`` (never their hard
    labels), keeps CE on the clean labelled examples, and two dropout passes p_s1, p_s2 over
    the same augmented input are made to agree (the symmetric KL of R-Drop, Liang et al. 2021).
    :meth:`prepare` stacks the clean rows, an augmented copy and the same copy again (views
    ``CLEAN``, ``FIRST``, ``SECOND``; the copies' labels hidden).

    Defaults: T = 1, all three weights 1, ``augmentation`` ``auto`` (``image``: shift by up to
    ``max_shift`` = 1 pixel, Gaussian noise ``noise_std`` = 0.1, random erasing with
    ``erase_probability`` = 0.5, clamped to ``value_range`` = (0, 1); ``tokens``: replacement,
    swap and deletion with probability 0.1 each; ``noise``: Gaussian noise). Our choices and
    measurements: docs/recipes.md.
    """

    name = "denoise"
    summary = "Soft labels of a clean-data teacher on augmented inputs + CE + dropout consistency"
    paper = ("Fang, Zhou, Liu, Zhang, Song, Chen 2024, On-the-fly Denoising for Data "
             "Augmentation in Natural Language Understanding")
    Params = DenoiseParams
    teacher_input_change = "augmented copies of each batch"

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
