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
from kdistill.recipes.shared import StudentHeadParams
from kdistill.schedules import TrainState
from kdistill.taps import Taps


class OKDHPParams(StudentHeadParams):
    branches: int = Field(default=3, ge=2)
    branch_widths: list[PositiveInt] | None = None
    temperature: float = Field(default=3.0, gt=0)
    kl_weight: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _one_width_per_extra_branch(self) -> OKDHPParams:
        if self.branch_widths is not None and len(self.branch_widths) != self.branches - 1:
            raise ValueError(f"branch_widths needs one hidden width per extra branch "
                             f"({self.branches - 1} for branches={self.branches}), got "
                             f"{self.branch_widths}")
        return self


class BranchGate(nn.Module):
    """The aggregation unit: per-sample weights over the ``k`` branches from their logits.

    g = softmax(W [z_0; ...; z_{k-1}] + b) in R^k and z_ens = sum_j g_j z_j, for logits of any
    leading shape ([B, C] or per token [B, L, C]). W and b start at zero, so the ensemble starts
    as the plain mean of the branch logits and the gate learns to depart from it.
    """

    def __init__(self, branches: int, num_classes: int):
        super().__init__()
        self.branches = branches
        self.linear = nn.Linear(branches * num_classes, branches)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def weights(self, heads: Tensor) -> Tensor:
        """The gate ``[k, ...]`` (summing to 1 over the branches) for heads ``[k, ..., C]``."""
        if heads.shape[0] != self.branches:
            raise ValueError(f"okdhp: tap 'heads' stacks {heads.shape[0]} branches, the "
                             f"aggregation unit was built for {self.branches}")
        stacked = heads.movedim(0, -2).flatten(-2)  # [..., k * C]
        return torch.softmax(self.linear(stacked), dim=-1).movedim(-1, 0)

    def forward(self, heads: Tensor) -> Tensor:
        return (self.weights(heads).unsqueeze(-1) * heads).sum(dim=0)


@register
class OKDHP(Recipe):
    """Branches of one network learn the labels and a gated ensemble of themselves.

    After Li et al. (2021), "Online Knowledge Distillation for Efficient Pose Estimation"
    (OKDHP), with logits in place of heat maps. The student becomes a
    :class:`~kdistill.models.heads.MultiBranchStudent`: its trunk is shared by ``branches``
    heads, branch 0 being its own head (the deployed model is trunk + branch 0, the student's
    architecture); the other branches are re-initialised copies of its head or, with
    ``branch_widths``, MLP branches of those hidden widths. A learned aggregation unit
    (:class:`BranchGate`) builds z_ens = sum_j g_j(z) z_j and

        L = sum_j CE(z_j, y) + CE(z_ens, y) + w T^2 sum_j KL(sg(p_ens^T) || p_j^T)

    with ``sg`` stop-gradient: the KL terms train the trunk and the branches but never the
    aggregation unit. No teacher; labelled samples only (``uses_unlabeled = False``).
    Defaults: 3 branches, T = 3, w = 1. Our choices and measurements: docs/recipes.md.
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

    def student_taps(self) -> list[str]:
        return ["heads"]

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
        self.gate = BranchGate(heads.shape[0], heads.shape[-1])

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        heads = student["heads"]
        labels = batch["labels"]
        ensemble = self.gate(heads)
        target = ensemble.detach()
        branches = range(heads.shape[0])
        return {
            "ce": Term(sum(losses.cross_entropy(heads[j], labels) for j in branches),
                       unit="labeled"),
            "ce_ensemble": Term(losses.cross_entropy(ensemble, labels), unit="labeled"),
            "kl": Term(sum(losses.kd(heads[j], target, p.temperature) for j in branches),
                       weight=p.kl_weight),
        }
