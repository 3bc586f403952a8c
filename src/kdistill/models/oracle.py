"""A label-conditioned classifier: an oracle teacher, which sees the labels as well as the input.

Yoon, Kim, Lee, Ahn & Kim (2023), *Oracle Teacher: Leveraging Target Information for Better
Knowledge Distillation of CTC Models* (IEEE/ACM TASLP), give a CTC teacher the target sequence
as a second input (:class:`kdistill.models.ctc.OracleCTC`, the paper's setting). Outside the
paper, any classifier becomes such a teacher here: :class:`LabelConditioned` adds a learned
embedding of the label to the input of one of its modules (by default ``head``, the classifier
of the reference MLP and CNN), so the head predicts from ``features + E[y]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from kdistill.batch import UNLABELED
from kdistill.names import unknown_name

LabelDropout = Annotated[float, Field(ge=0.0, lt=1.0)]


class LabelConditioned(nn.Module):
    """``base`` with a label embedding added to the input of its module ``target``.

    Forward: ``base(x)`` where the input ``h`` of ``target`` becomes ``h + E[y]``. ``E`` has
    ``num_classes + 1`` rows of size ``dim``: one per class and a last, learned, *unknown* row
    used for a hidden label (``-100``), for padding tokens and when no labels are given. Labels
    have the leading shape of ``h``: ``[B]`` for a classifier head on ``[B, D]`` features,
    ``[B, L]`` for a token classifier on ``[B, L, D]``. ``E`` starts at zero, so the untrained
    wrapper computes exactly what ``base`` computes.

    Label dropout: in training mode each known label is replaced by *unknown* with probability
    ``label_dropout`` (drawn from torch's global generator, which checkpoints keep). Without it
    the cheapest solution is to copy the label (the paper's "trivial solution"): once the head
    reads the class from ``E[y]`` the loss is near zero and the input path stops learning, while
    the unknown row is never trained at all, so unlabelled samples get a poor target. Dropping
    labels makes the network solve the task from the input alone part of the time; with the
    label present it then sharpens an input-based prediction rather than replacing it. (Digits,
    CNN teacher: 93.6% accuracy from the input alone with no dropout, 98.0% with 0.5; a student
    distilled on 50 labels: 84.4% against 92.2%.) The paper prevents copying through a property
    of CTC instead; dropout is our choice for general classifiers.

    Calling ``base`` on its own (not through this wrapper) computes the base model unchanged.
    ``batch_inputs = ("labels",)`` makes :func:`kdistill.taps.run_model` pass the batch's
    labels; a student without the attribute never receives them.
    """

    batch_inputs = ("labels",)

    def __init__(self, base: nn.Module, num_classes: int, *, target: str = "head",
                 dim: int | None = None, label_dropout: float = 0.5):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelConditioned: num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"LabelConditioned: label_dropout must be in [0, 1), got "
                             f"{label_dropout}")
        modules = dict(base.named_modules())
        if not target or target not in modules:
            raise ValueError("LabelConditioned: " + unknown_name(
                f"{type(base).__name__} module", target, [p for p in modules if p]))
        module = modules[target]
        if dim is None:
            dim = getattr(module, "in_features", None)
            if not isinstance(dim, int):
                raise ValueError(f"LabelConditioned: cannot tell the input size of "
                                 f"'{target}' ({type(module).__name__}); give dim")
        self.base = base
        self.num_classes = num_classes
        self.target = target
        self.label_dropout = label_dropout
        self.embedding = nn.Embedding(num_classes + 1, dim)
        nn.init.zeros_(self.embedding.weight)
        self._active = False  # the hook acts only inside this wrapper's forward
        self._labels: Tensor | None = None
        module.register_forward_pre_hook(self._add_label)

    @property
    def unknown(self) -> int:
        """The embedding row of an unknown label."""
        return self.num_classes

    def label_rows(self, labels: Tensor | None, shape: Sequence[int]) -> Tensor:
        """The embedding row of each label: the class, or :attr:`unknown` for a hidden label,
        a missing ``labels`` and (in training mode) a dropped label."""
        if labels is None:
            return torch.full(tuple(shape), self.unknown, dtype=torch.long,
                              device=self.embedding.weight.device)
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"LabelConditioned: labels must be integer class ids (-100 = "
                             f"unknown), got dtype {labels.dtype}")
        if tuple(labels.shape) != tuple(shape):
            raise ValueError(f"LabelConditioned: labels of shape {tuple(labels.shape)} do not "
                             f"match the leading shape {tuple(shape)} of the input of "
                             f"'{self.target}'")
        known = labels != UNLABELED
        bad = known & ((labels < 0) | (labels >= self.num_classes))
        if bad.any():
            raise ValueError(f"LabelConditioned: labels must be in [0, {self.num_classes}) or "
                             f"{UNLABELED}, got {int(labels[bad][0])}")
        if self.training and self.label_dropout > 0:
            known = known & (torch.rand(labels.shape, device=labels.device) >= self.label_dropout)
        return torch.where(known, labels.long(), torch.full_like(labels, self.unknown).long())

    def _add_label(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not self._active:
            return None
        if not args or not isinstance(args[0], Tensor):
            raise ValueError(f"LabelConditioned: '{self.target}' was called without a tensor "
                             "input")
        hidden = args[0]
        rows = self.label_rows(self._labels, hidden.shape[:-1])
        return (hidden + self.embedding(rows.to(hidden.device)).to(hidden.dtype), *args[1:])

    def forward(self, *args: Any, labels: Tensor | None = None, **kwargs: Any) -> Any:
        """``base(*args, **kwargs)`` with the label embedding added at ``target``."""
        self._active, self._labels = True, labels
        try:
            return self.base(*args, **kwargs)
        finally:
            self._active, self._labels = False, None
