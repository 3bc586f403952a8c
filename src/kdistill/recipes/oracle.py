"""``oracle``: distil a teacher that sees the labels (privileged information) into a student that
sees only the input."""

from __future__ import annotations

from kdistill.recipes.base import register
from kdistill.recipes.hinton import Hinton


@register
class Oracle(Hinton):
    """L = (1 - alpha) CE(y, z_s) + alpha T^2 KL(p_t^T || p_s^T), the teacher given the labels.

    Yoon, Kim, Lee, Ahn & Kim (2023), "Oracle Teacher: Leveraging Target Information for Better
    Knowledge Distillation of CTC Models". The teacher is a model that declares
    ``batch_inputs = ("labels",)`` (such as :class:`kdistill.models.oracle.LabelConditioned`),
    so p_t is computed from (x, y); the student sees the input alone. The terms, parameters and
    defaults (T=4, alpha=0.9) are Hinton KD's (:class:`~kdistill.recipes.hinton.Hinton`): per
    sample for logits ``[B, C]``, per valid token for token logits ``[B, L, C]``. Our choices
    and measurements: docs/recipes.md.
    """

    name = "oracle"
    summary = "KD from a teacher that also sees the labels: (1-a) CE + a T^2 KL(p_t || p_s)"
    paper = ("Yoon, Kim, Lee, Ahn, Kim 2023, Oracle Teacher: Leveraging Target Information for "
             "Better Knowledge Distillation of CTC Models")
