"""CTC: the loss of sequence recognisers trained on unaligned target sequences.

Graves, Fernández, Gomez & Schmidhuber (2006), "Connectionist Temporal Classification:
Labelling Unsegmented Sequence Data with Recurrent Neural Networks". A model gives per-frame
logits ``z`` [B, T, C]; the last class, C - 1, is the blank. A path pi (one class per frame)
reads as the sequence B(pi): repeated classes merged, then blanks removed (many paths map to
one sequence). Targets follow :mod:`kdistill.batch`: ``labels`` [B, S] of token ids 0 .. C - 2
padded with ``UNLABELED`` (-100), and ``target_lengths`` [B] (0: the target is hidden).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_ctc_targets", "ctc_loss", "frames_needed"]

PADDING = -100  # kdistill.batch.UNLABELED, like cross_entropy's ignore_index (losses stand alone)


def frames_needed(target: Tensor) -> int:
    """The fewest frames a CTC path for ``target`` (1-D token ids) has: one per token, plus a
    blank between each pair of equal neighbours (the merge would join them otherwise)."""
    repeats = int((target[1:] == target[:-1]).sum()) if len(target) > 1 else 0
    return len(target) + repeats


def check_ctc_targets(labels: Tensor, target_lengths: Tensor, num_classes: int,
                      frames: int | None = None) -> None:
    """Raise a ``ValueError`` naming the row at fault unless ``labels`` [B, S] and
    ``target_lengths`` [B] are CTC targets for ``num_classes`` output classes (blank included):
    lengths in 0 .. S, the first ``length`` entries of a row token ids 0 .. C - 2, the rest
    ``-100`` padding, and (given the model's ``frames``) each target short enough for a
    path over ``frames`` frames (:func:`frames_needed`)."""
    if labels.dim() != 2 or labels.is_floating_point():
        raise ValueError(f"CTC targets: labels must be integer token ids [batch, tokens], got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    rows, width = labels.shape
    if tuple(target_lengths.shape) != (rows,) or target_lengths.is_floating_point():
        raise ValueError(f"CTC targets: target_lengths must be one integer per row ([{rows}]), "
                         f"got {target_lengths.dtype} of shape {tuple(target_lengths.shape)}")
    labels, lengths = labels.cpu(), target_lengths.cpu().tolist()
    for row, length in enumerate(lengths):
        if not 0 <= length <= width:
            raise ValueError(f"CTC targets: row {row}: target length {length} is not in "
                             f"0 .. {width} (the padded width of the labels)")
        target, padding = labels[row, :length], labels[row, length:]
        bad = (target < 0) | (target >= num_classes - 1)
        if bad.any():
            position = int(bad.nonzero()[0])
            raise ValueError(f"CTC targets: row {row}, position {position}: token "
                             f"{int(target[position])} is not in 0 .. {num_classes - 2} (class "
                             f"{num_classes - 1} is the blank)")
        if (padding != PADDING).any():
            position = length + int((padding != PADDING).nonzero()[0])
            raise ValueError(f"CTC targets: row {row}: after its {length} tokens the labels "
                             f"must be {PADDING} (padding), got {int(labels[row, position])} "
                             f"at position {position}")
        if frames is not None and frames_needed(target) > frames:
            raise ValueError(f"CTC targets: row {row}: a target of {length} tokens needs at "
                             f"least {frames_needed(target)} frames, the model gives {frames}")


def ctc_loss(logits: Tensor, labels: Tensor, target_lengths: Tensor) -> Tensor:
    """CTC loss per target token over the rows whose target is known.

    Equation::

        L = sum_{b in K} -log p(y_b | x_b) / sum_{b in K} |y_b|,    K = {b : |y_b| > 0}
        p(y | x) = sum over paths pi with B(pi) = y of prod_t softmax(z_t)[pi_t]

    (Graves et al. 2006), computed by ``torch.nn.functional.ctc_loss`` with blank C - 1 over
    every frame. Dividing by the number of target tokens makes the value a mean over the
    engine's ``labeled`` unit (known labels: here target tokens). With no known target the
    result is a zero still connected to ``logits``.

    Args:
        logits: per-frame logits [B, T, C], blank last.
        labels: token ids [B, S] padded with -100 (see :func:`check_ctc_targets`).
        target_lengths: tokens per row [B].
    """
    if logits.dim() != 3 or logits.shape[-1] < 2:
        raise ValueError(f"ctc_loss: CTC needs per-frame logits [batch, frames, classes] with "
                         f"a blank class last, got logits of shape {tuple(logits.shape)}; the "
                         f"model must give one distribution per frame (e.g. model 'crnn')")
    batch, frames, classes = logits.shape
    if labels.shape[:1] != (batch,):
        raise ValueError(f"ctc_loss: labels of shape {tuple(labels.shape)} for {batch} rows of "
                         "logits")
    check_ctc_targets(labels, target_lengths, classes, frames)
    known = target_lengths > 0
    if not known.any():
        return logits.sum() * 0.0
    log_probs = logits[known].float().log_softmax(dim=-1).transpose(0, 1)  # [T, K, C]
    lengths = target_lengths[known].long()
    targets = labels[known].clamp_min(0).long()  # valid ids; none past a length is read
    inputs = torch.full((len(lengths),), frames, dtype=torch.long, device=logits.device)
    total = F.ctc_loss(log_probs, targets, inputs, lengths, blank=classes - 1,
                       reduction="sum")
    return total / lengths.sum()
