"""``okdhp``: online distillation inside one multi-branch network (OKDHP style)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from kdistill import losses
from kdistill.models.heads import MultiBranchStudent
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import StudentHeadParams, Weight, as_schedule
from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.taps import Taps

# OKDHP's official code ramps the KD weight up over the first 60 of its 140 epochs.
OFFICIAL_RAMP = 60 / 140


class OKDHPParams(StudentHeadParams):
    branches: int = Field(default=3, ge=2)
    branch_widths: list[PositiveInt] | None = None
    temperature: float = Field(default=1.0, gt=0)
    kl_weight: Weight | ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(name="gaussian", start=0.0, end=5.0,
                                               length=OFFICIAL_RAMP, unit="phase"),
        description="weight of the KL term (a number or a schedule); default the official "
                    "5 exp(-5 (1 - t)^2) ramp over the first 60/140 of the phase")
    ensemble_weight: float = Field(default=6.0, ge=0,
                                   description="weight of the ensemble's CE (official: 6)")
    detach_ensemble: bool = Field(default=False,
                                  description="stop the KL's gradient at the ensemble target "
                                              "(the official code does not)")

    @model_validator(mode="after")
    def _one_width_per_extra_branch(self) -> OKDHPParams:
        if self.branch_widths is not None and len(self.branch_widths) != self.branches - 1:
            raise ValueError(f"branch_widths needs one hidden width per extra branch "
                             f"({self.branches - 1} for branches={self.branches}), got "
                             f"{self.branch_widths}")
        return self


class BranchGate(nn.Module):
    """The aggregation unit: per-sample, per-class weights over the ``k`` branches, read from
    the trunk's features (the output of the branch point, which every branch reads).

    a = W f + b in R^{k x C}, g_j[c] = softmax_j(a)[j, c], z_ens[c] = sum_j g_j[c] z_j[c]

    for features f [..., F] and branch logits z_j [..., C] of the same leading shape ([B] or
    per token [B, L]). W and b start at zero, so the ensemble starts as the plain mean of the
    branch logits and the gate learns to depart from it.
    """

    def __init__(self, in_features: int, branches: int, num_classes: int):
        super().__init__()
        self.branches, self.num_classes = branches, num_classes
        self.linear = nn.Linear(in_features, branches * num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def weights(self, features: Tensor) -> Tensor:
        """The gate ``[k, ..., C]`` (summing to 1 over the branches) for ``features [..., F]``."""
        scores = self.linear(features).unflatten(-1, (self.branches, self.num_classes))
        return torch.softmax(scores, dim=-2).movedim(-2, 0)

    def forward(self, features: Tensor, heads: Tensor) -> Tensor:
        if (heads.shape[0] != self.branches or features.shape[-1] != self.linear.in_features
                or features.shape[:-1] != heads.shape[1:-1]):
            raise ValueError(f"okdhp: the aggregation unit was built for {self.branches} "
                             f"branches on features [..., {self.linear.in_features}]; got "
                             f"heads {tuple(heads.shape)} and trunk features "
                             f"{tuple(features.shape)} (they need the same leading shape)")
        return (self.weights(features) * heads).sum(dim=0)


@register
class OKDHP(Recipe):
    """Branches of one network learn the labels and a gated ensemble of themselves.

    After Li et al. (2021), "Online Knowledge Distillation for Efficient Pose Estimation"
    (OKDHP), with logits in place of heat maps. The student becomes a
    :class:`~kdistill.models.heads.MultiBranchStudent`: its trunk is shared by ``branches``
    heads, branch 0 being its own head (the deployed model is trunk + branch 0, the student's
    architecture); the other branches are re-initialised copies of its head or, with
    ``branch_widths``, MLP branches of those hidden widths. A learned aggregation unit
    (:class:`BranchGate`) weighs the branches per sample and per class from the trunk's
    features f, z_ens = sum_j g_j(f) * z_j, and

        L = sum_j CE(z_j, y) + w_ens CE(z_ens, y) + w(t) T^2 sum_j KL(p_ens^T || p_j^T)

    The KL terms reach the branches both directly and through the ensemble, and the
    aggregation unit too, as in the official code; with ``detach_ensemble`` the ensemble is a
    fixed target (stop-gradient) and the unit learns from its CE alone. No teacher; labelled
    samples only (``uses_unlabeled = False``). Defaults, as the official code's: 3 branches,
    T = 1, w_ens = 6, w(t) = 5 exp(-5 (1 - t)^2) with t the share of the phase done divided by
    60/140 and clipped to 1, no stop-gradient. Our choices and measurements: docs/recipes.md.
    """

    name = "okdhp"
    summary = "Multi-branch online KD: a gated ensemble of the branches teaches each branch"
    paper = "Li et al. 2021, Online Knowledge Distillation for Efficient Pose Estimation"
    Params = OKDHPParams
    uses_teacher = False
    uses_unlabeled = False

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        self.gate: BranchGate | None = None

    @property
    def trunk_tap(self) -> str:
        """The tap of the trunk's features: the branch point inside the wrapped student."""
        return f"module:student.{self.params.features}"

    def student_taps(self) -> list[str]:
        return ["heads", self.trunk_tap]

    def wrap_student(self, student: nn.Module) -> nn.Module:
        p = self.params
        if isinstance(student, MultiBranchStudent):
            if student.branches != p.branches:
                raise ValueError(f"branches={p.branches} but the student is already wrapped "
                                 f"with {student.branches} branches")
            return student
        return MultiBranchStudent(student, p.branches, p.branch_widths, p.features, p.head,
                                  p.in_features, p.num_classes)

    def build(self, student: Taps, teacher: Taps | None) -> None:
        heads = student["heads"]
        self.gate = BranchGate(student[self.trunk_tap].shape[-1], heads.shape[0],
                               heads.shape[-1])

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        heads = student["heads"]
        labels = batch["labels"]
        ensemble = self.gate(student[self.trunk_tap], heads)
        target = ensemble.detach() if p.detach_ensemble else ensemble
        branches = range(heads.shape[0])
        return {
            "ce": Term(sum(losses.cross_entropy(heads[j], labels) for j in branches),
                       unit="labeled"),
            "ce_ensemble": Term(losses.cross_entropy(ensemble, labels), weight=p.ensemble_weight,
                                unit="labeled"),
            "kl": Term(sum(losses.kd(heads[j], target, p.temperature) for j in branches),
                       weight=as_schedule(p.kl_weight).at(state)),
        }
