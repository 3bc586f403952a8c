"""Students with extra prediction heads on their penultimate features.

Any student can be given extra heads without being rewritten: :class:`ExtraHeads` runs the
student as it is, reads the output of one of its submodules (``features``, the penultimate
features of the reference models) through a forward hook that lives only for that call, and
applies each extra head to it. The student's own output is head 0, so the stacked heads have
shape ``[k, B, ..., C]``.

* :class:`TwoHeadStudent` - a class head (the student's own) and a distillation head on shared
  features: DeiT's (Touvron et al. 2021) fallback for students without a distillation token
  (not the paper's token, which :class:`~kdistill.models.vit.ViT` has). The inference
  prediction averages the two heads' probabilities; :meth:`TwoHeadStudent.export` gives it as
  a plain model.
* :class:`MultiBranchStudent` - a shared trunk and ``k`` branches, as the multi-branch network of
  OKDHP (Li et al. 2021). Branch 0 is the student's own head and the deployed branch;
  :meth:`MultiBranchStudent.export` returns the student itself (trunk + branch 0).

Both return ``{"logits": <inference prediction>, "heads": <[k, B, ..., C] stacked logits>}``,
which the tap names ``logits`` and ``heads`` read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.models.fresh import reinitialised
from kdistill.names import unknown_name
from kdistill.taps import output_logits

__all__ = ["AveragedHeads", "ExtraHeads", "MultiBranchStudent", "TwoHeadStudent",
           "average_probabilities", "head_size", "mlp_branch"]


def head_size(student: nn.Module, head: str = "head", in_features: int | None = None,
              num_classes: int | None = None) -> tuple[int, int]:
    """``(in_features, num_classes)`` of a new head beside the student's own head.

    Read from the submodule ``head`` when it is an ``nn.Linear``; otherwise both must be given.
    Values given explicitly must agree with a linear head.
    """
    module = dict(student.named_modules()).get(head)
    if isinstance(module, nn.Linear):
        found = (module.in_features, module.out_features)
        for name, given, value in (("in_features", in_features, found[0]),
                                   ("num_classes", num_classes, found[1])):
            if given is not None and given != value:
                raise ValueError(f"{name}={given} disagrees with the student's head '{head}' "
                                 f"(Linear {found[0]} -> {found[1]})")
        return found
    if in_features is None or num_classes is None:
        what = "is not an nn.Linear" if module is not None else "does not exist"
        raise ValueError(f"the student's head '{head}' {what}: give in_features and "
                         "num_classes for the new heads")
    return in_features, num_classes


def mlp_branch(in_features: int, width: int, num_classes: int) -> nn.Module:
    """A small branch ``Linear(in, width) -> ReLU -> Linear(width, C)``."""
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def average_probabilities(heads: Tensor) -> Tensor:
    """``log((1/k) sum_j softmax(z_j))`` over the heads ``[k, ..., C]``, in log space
    (logsumexp of the log-probabilities), so the result is a log-probability."""
    log_probs = torch.log_softmax(heads.float(), dim=-1)
    return torch.logsumexp(log_probs, dim=0) - math.log(heads.shape[0])


class ExtraHeads(nn.Module):
    """``student`` plus ``heads`` applied to the output of its submodule ``features``.

    :meth:`head_logits` returns ``stack([student(x), heads[0](f), heads[1](f), ...])`` where
    ``f`` is the output of ``student.<features>`` in the same forward pass. The hook that reads
    ``f`` is registered for that call only, so copies of the model (EMA teachers, DDP) carry no
    hook. A student that declares ``batch_inputs`` keeps them.
    """

    def __init__(self, student: nn.Module, heads: Sequence[nn.Module],
                 features: str = "features"):
        super().__init__()
        paths = [p for p, _ in student.named_modules() if p]
        if features not in paths:
            raise ValueError("features: " + unknown_name(
                f"{type(student).__name__} module", features, paths))
        self.student = student
        self.extra = nn.ModuleList(heads)
        self.features_path = features
        if hasattr(student, "batch_inputs"):
            self.batch_inputs = tuple(student.batch_inputs)

    def head_logits(self, *args: Any, **kwargs: Any) -> Tensor:
        """The stacked logits ``[1 + len(extra), B, ..., C]``; head 0 is the student's."""
        captured: list[Tensor] = []

        def record(_module: nn.Module, _args: Any, output: Any) -> None:
            captured.append(output)

        handle = self.student.get_submodule(self.features_path).register_forward_hook(record)
        try:
            own = output_logits(self.student(*args, **kwargs))
        finally:
            handle.remove()
        if not captured:
            raise ValueError(f"features: module '{self.features_path}' did not run in the "
                             "student's forward pass")
        feats = captured[-1]
        if not isinstance(feats, Tensor):
            raise ValueError(f"features: module '{self.features_path}' returned "
                             f"{type(feats).__name__}, not a tensor")
        return torch.stack([own, *(head(feats) for head in self.extra)])


class AveragedHeads(ExtraHeads):
    """A plain model predicting ``log((1/k) sum_j softmax(z_j))`` over the student's head and
    the extra heads: the deployable form of :class:`TwoHeadStudent`."""

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return average_probabilities(self.head_logits(*args, **kwargs))


class TwoHeadStudent(AveragedHeads):
    """A student with a distillation head on shared features (not the paper's token).

    Touvron et al. (2021), "Training data-efficient image transformers & distillation through
    attention", distil through a separate distillation token
    (:class:`~kdistill.models.vit.ViT`); this wrapper is the fallback that fits any student.
    The class head is the student's own ``head``; the distillation head is a new layer of the
    same shape on the penultimate features (``features``), so for a transformer it reads the
    same token as the class head rather than a separate distillation token.
    ``forward`` returns ``{"logits": log((softmax(z_cls) + softmax(z_dist)) / 2), "heads":
    stack([z_cls, z_dist])}``; :meth:`export` returns the averaged prediction as a plain model.
    """

    def __init__(self, student: nn.Module, features: str = "features", head: str = "head",
                 in_features: int | None = None, num_classes: int | None = None):
        width, classes = head_size(student, head, in_features, num_classes)
        super().__init__(student, [nn.Linear(width, classes)], features)

    @property
    def dist_head(self) -> nn.Module:
        return self.extra[0]

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        heads = self.head_logits(*args, **kwargs)
        return {"logits": average_probabilities(heads), "heads": heads}

    def export(self) -> nn.Module:
        """The deployable model: an :class:`AveragedHeads` sharing this model's student and
        distillation head (no copy), returning the averaged prediction as a tensor."""
        return AveragedHeads(self.student, list(self.extra), self.features_path)


class MultiBranchStudent(ExtraHeads):
    """A shared trunk with ``branches`` classifier branches; branch 0 is the deployed one.

    The trunk is the student up to its penultimate features (``features``); branch 0 is the
    student's own head, so trunk + branch 0 is exactly the student. The other ``branches - 1``
    branches are re-initialised copies of the student's head (equal widths; a new linear layer
    when the student has no module ``head``) or, with
    ``branch_widths`` (one hidden width per extra branch), :func:`mlp_branch` branches of those
    widths (unequal widths). ``forward`` returns ``{"logits": z_0, "heads": stack([z_0, ...,
    z_{k-1}])}``.
    """

    def __init__(self, student: nn.Module, branches: int = 3,
                 branch_widths: Sequence[int] | None = None, features: str = "features",
                 head: str = "head", in_features: int | None = None,
                 num_classes: int | None = None):
        if branches < 2:
            raise ValueError(f"branches must be at least 2, got {branches}")
        width, classes = head_size(student, head, in_features, num_classes)
        if branch_widths is None:
            own = dict(student.named_modules()).get(head)
            own = nn.Linear(width, classes) if own is None else own
            extra = [reinitialised(own) for _ in range(branches - 1)]
        elif len(branch_widths) != branches - 1:
            raise ValueError(f"branch_widths needs one width per extra branch ({branches - 1} "
                             f"for branches={branches}), got {list(branch_widths)}")
        else:
            extra = [mlp_branch(width, w, classes) for w in branch_widths]
        super().__init__(student, extra, features)

    @property
    def branches(self) -> int:
        return 1 + len(self.extra)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        heads = self.head_logits(*args, **kwargs)
        return {"logits": heads[0], "heads": heads}

    def export(self) -> nn.Module:
        """The deployable model: the student itself (shared trunk + branch 0)."""
        return self.student
