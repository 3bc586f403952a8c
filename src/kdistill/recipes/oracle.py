"""``oracle``: distil a teacher that also reads the targets (privileged information) into a
student that reads only the input: the Oracle Teacher of CTC models."""

from __future__ import annotations

from kdistill.recipes.base import register
from kdistill.recipes.hinton import Hinton


@register
class Oracle(Hinton):
    """L = (1 - alpha) L_CTC(y, z_s) + alpha T^2 mean_frames KL(p_t^T || p_s^T), p_t from (x, y).

    Yoon, Kim, Lee, Ahn & Kim (2023), "Oracle Teacher: Leveraging Target Information for Better
    Knowledge Distillation of CTC Models". The paper's setting is CTC data (task ``ctc``:
    per-frame logits [B, T, C], target sequences, batches with ``target_lengths``): the teacher
    is a CTC model that also reads the target sequence, such as
    :class:`kdistill.models.ctc.OracleCTC` (model ``oracle_ctc``), trained with CTC on (input,
    target); the student reads the input alone and learns from its CTC loss (per target token,
    :func:`kdistill.losses.ctc_loss`) and from the teacher's per-frame posteriors (the KL of
    each frame, averaged over every frame).

    Outside the paper, on classification data, the terms are Hinton KD's per sample (or per
    token) with cross-entropy in place of CTC, and a teacher such as
    :class:`kdistill.models.oracle.LabelConditioned`, which adds an embedding of the label to
    its head's input.

    A teacher receives the labels when it declares ``batch_inputs = ("labels",)``; the student
    never does. Parameters and defaults (T=4, alpha=0.9) are Hinton KD's
    (:class:`~kdistill.recipes.hinton.Hinton`). Our choices and measurements: docs/recipes.md.
    """

    name = "oracle"
    summary = ("KD from a teacher that also reads the targets (CTC: oracle_ctc): "
               "(1-a) CTC + a T^2 KL per frame")
    paper = ("Yoon, Kim, Lee, Ahn, Kim 2023, Oracle Teacher: Leveraging Target Information for "
             "Better Knowledge Distillation of CTC Models")
