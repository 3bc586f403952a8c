"""Evaluation: what the student keeps of the teacher's quality, and what it saves.

Three tasks are told apart by the shape of a model's output (:func:`task_of`):

* classification, logits [B, C]: accuracy, macro-F1, calibration (ECE) and top-1 agreement with
  the teacher;
* token classification, logits [B, L, C] with labels [B, L]: the same four metrics over tokens;
* regression, scores [B] or [B, 1]: MSE, Pearson and Spearman correlation with the gold scores,
  and the same three against the teacher's scores.

A fourth, CTC sequence recognition, is told by its batches, which carry ``target_lengths``
(:mod:`kdistill.batch`): per-frame logits [B, T, C] against target sequences, read by greedy
CTC decoding; character error rate, line accuracy and agreement with the teacher's readings
(:func:`ctc_metrics`). A fifth, sentence embeddings, is told by the model's output (a sentence
encoder's, :func:`kdistill.taps.is_sentence_embedding`): embeddings [B, D], scored by how
closely their similarities follow the teacher's and by a linear probe on the labels
(:mod:`kdistill.embedding_metrics`). A sixth, retrieval, is told by its batches, which carry
the ``passage`` flag of each row (:mod:`kdistill.batch`): the embeddings of queries and of a
passage collection, scored by how well the queries rank their relevant passages (MRR@10,
recall@k, nDCG@10) and how much of the teacher's ranking they keep
(:mod:`kdistill.retrieval_metrics`).
A seventh, language modelling, is told by its batches, which
carry ``token_mask`` (:mod:`kdistill.batch`): logits [B, L, V] against next-token labels,
scored by held-out perplexity, next-token accuracy and next-token agreement with the teacher
(:func:`lm_metrics`); each batch's logits are reduced to the predicted token and the label's
negative log-likelihood at once, as a vocabulary's logits over a whole test set would not fit
in memory.

Cost is measured by parameter count, size on disk and CPU latency at a stated batch size and
thread count. :func:`benchmark_models` gathers all of it into one row per model, timing the
models in interleaved rounds so that they are compared under the same machine conditions.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NotRequired, TypedDict

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn
from torch.utils.data import DataLoader

from kdistill.batch import (
    PASSAGE_ROW,
    TARGET_LENGTHS,
    TOKEN_MASK,
    UNLABELED,
    Task,
    collate,
    label_mask,
    to_device,
)
from kdistill.contexts import eval_mode, num_threads
from kdistill.data.base import ArrayDataset, IndexedDataset
from kdistill.data.shifts import shifted_dataset, value_range_of
from kdistill.embedding_metrics import EMBEDDING_KEYS, embedding_metrics
from kdistill.losses.ctc import check_ctc_targets
from kdistill.retrieval_metrics import RETRIEVAL_KEYS, retrieval_metrics
from kdistill.settings import Shift
from kdistill.taps import is_sentence_embedding, output_logits, run_model

LATENCY_WARMUP = 3
BYTES_PER_MB = 1_000_000

REGRESSION_KEYS = ("mse", "pearson", "spearman")
REGRESSION_TEACHER_KEYS = ("mse_teacher", "pearson_teacher", "spearman_teacher")
LM_KEYS = ("perplexity", "accuracy", "agreement")


def task_of(outputs: torch.Tensor) -> Task:
    """The task a model's output belongs to, from its shape.

    [B] or [B, 1]: ``regression`` (one score per sample; a single-class classifier would be
    meaningless); [B, C] with C >= 2: ``classification``; [B, L, C]: ``token_classification``.
    """
    if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        return "regression"
    if outputs.dim() == 2:
        return "classification"
    if outputs.dim() == 3:
        return "token_classification"
    raise ValueError(f"model outputs of shape {tuple(outputs.shape)} fit no task: expected "
                     "[batch] or [batch, 1] scores, [batch, classes] or [batch, tokens, classes] "
                     "logits")


@dataclass(frozen=True)
class Predictions:
    """A model's outputs over a data set and the matching labels.

    ``logits`` are the model's outputs: logits [N, C] or [N, L, C], or regression scores [N] or
    [N, 1] as the model returns them. ``labels`` are integer ([N] or [N, L], ``-100`` = no label)
    or, for regression, float [N] (NaN = no label). ``mask`` is the ``attention_mask`` [N, L]
    (bool) of token outputs when every batch carried one, otherwise ``None``. For CTC,
    ``logits`` are per-frame [N, T, C], ``labels`` the target sequences [N, S] (padded with
    ``-100``) and ``target_lengths`` [N] their lengths; ``None`` for every other task.
    ``embedding`` says the outputs are a sentence encoder's embeddings [N, D] (task
    ``embedding``), the labels then classes, ``-100`` = no label. ``passage`` [N] (bool) marks
    the passage rows of a retrieval evaluation (task ``retrieval``, ``None`` for every other
    task): the outputs are then embeddings of queries and passages, and a query's labels [R]
    the numbers of its relevant passages (``-100`` = none). For language modelling
    (task ``lm``), ``logits`` are the predicted next tokens [N, L] (the argmax of each
    position's logits), ``labels`` the next tokens [N, L], ``mask`` the labelled positions
    and ``nll`` [N, L] each label's negative log-likelihood under the model (0 where
    unlabelled); ``None`` for every other task.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor | None = None
    target_lengths: torch.Tensor | None = None
    embedding: bool = False
    passage: torch.Tensor | None = None
    nll: torch.Tensor | None = None

    @property
    def task(self) -> Task:
        if self.passage is not None:
            return "retrieval"
        if self.embedding:
            return "embedding"
        if self.nll is not None:
            return "lm"
        return "ctc" if self.target_lengths is not None else task_of(self.logits)


@dataclass(frozen=True)
class Latency:
    """Median wall-clock time of one forward pass over a batch."""

    median_batch_ms: float
    per_example_ms: float
    batch_size: int
    threads: int


class BenchmarkRow(TypedDict):
    """One model's line in a comparison, as returned by :func:`benchmark_models`.

    Quality keys depend on the model's task (:func:`task_of`):

    * classification and token classification (per token): ``accuracy``, ``macro_f1``, ``ece``,
      ``agreement`` and ``accuracy_share``; ``agreement`` and ``accuracy_share`` are ``None``
      when no teacher was named; ``accuracy_share`` is this model's accuracy divided by the
      teacher's;
    * regression: ``mse``, ``pearson``, ``spearman`` against the gold scores and
      ``mse_teacher``, ``pearson_teacher``, ``spearman_teacher`` against the teacher's scores
      (``None`` when no teacher was named);
    * CTC: ``cer``, ``accuracy`` (of whole lines), ``agreement`` and ``accuracy_share`` (see
      :func:`ctc_metrics`);
    * embedding: ``similarity_spearman``, ``nn10_overlap`` (against the teacher's embeddings,
      ``None`` when no teacher was named) and ``probe_accuracy`` (see
      :mod:`kdistill.embedding_metrics`);
    * retrieval: ``mrr10``, ``recall10``, ``recall100``, ``ndcg10`` and ``teacher_overlap10``
      (``None`` when no teacher was named; see :mod:`kdistill.retrieval_metrics`).
    * language modelling: ``perplexity``, ``accuracy`` (of the next token) and ``agreement``
      (see :func:`lm_metrics`).

    The cost keys from ``params`` on are in every row, except ``tokens_per_s``: language
    models only, the latency batch's input tokens (its ``attention_mask``'s ones) per second.
    """

    name: str
    perplexity: NotRequired[float]
    cer: NotRequired[float]
    accuracy: NotRequired[float]
    macro_f1: NotRequired[float]
    ece: NotRequired[float]
    agreement: NotRequired[float | None]
    accuracy_share: NotRequired[float | None]
    mse: NotRequired[float]
    pearson: NotRequired[float]
    spearman: NotRequired[float]
    mse_teacher: NotRequired[float | None]
    pearson_teacher: NotRequired[float | None]
    spearman_teacher: NotRequired[float | None]
    similarity_spearman: NotRequired[float | None]
    nn10_overlap: NotRequired[float | None]
    probe_accuracy: NotRequired[float]
    mrr10: NotRequired[float]
    recall10: NotRequired[float]
    recall100: NotRequired[float]
    ndcg10: NotRequired[float]
    teacher_overlap10: NotRequired[float | None]
    params: int
    size_mb: float
    latency_ms: float
    per_example_ms: float
    throughput: float
    tokens_per_s: NotRequired[float]
    speedup: float
    batch_size: int
    threads: int


# --------------------------------------------------------------------------- helpers


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _batch_size(batch: Mapping[str, Any]) -> int:
    key = "input_ids" if "input_ids" in batch else "input"
    if key not in batch:
        raise ValueError(f"batch has neither 'input' nor 'input_ids'; keys: {sorted(batch)}")
    return len(batch[key])  # a tensor's first dimension, or the number of raw texts


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so that a timing covers the whole forward pass."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- predictions


class _Rows(NamedTuple):
    """One batch's outputs, labels and token mask on the CPU, its ``index``, for CTC its
    ``target_lengths``, whether the outputs are sentence embeddings, for retrieval which rows
    are passages and, for language modelling, the labels' negative log-likelihoods (the
    outputs then the predicted tokens)."""

    outputs: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor | None
    index: torch.Tensor | None
    target_lengths: torch.Tensor | None = None
    embedding: bool = False
    passage: torch.Tensor | None = None
    nll: torch.Tensor | None = None


def _ctc_rows(outputs: torch.Tensor, batch: Mapping[str, Any]) -> _Rows:
    """One CTC batch's per-frame outputs and target sequences, checked, on the CPU."""
    if outputs.dim() != 3:
        raise ValueError(f"CTC data (the batch has {TARGET_LENGTHS}) needs per-frame logits "
                         f"[batch, frames, classes], got outputs of shape "
                         f"{tuple(outputs.shape)}")
    if "labels" not in batch:
        raise ValueError(f"a CTC batch needs its target sequences 'labels' beside "
                         f"{TARGET_LENGTHS}; keys: {sorted(batch)}")
    labels, lengths = batch["labels"].cpu().long(), batch[TARGET_LENGTHS].cpu().long()
    check_ctc_targets(labels, lengths, outputs.shape[-1])
    if labels.shape[0] != outputs.shape[0]:
        raise ValueError(f"{labels.shape[0]} target sequences for outputs of shape "
                         f"{tuple(outputs.shape)}")
    return _Rows(outputs, labels, None, batch.get("index"), lengths)


def _retrieval_rows(outputs: torch.Tensor, batch: Mapping[str, Any]) -> _Rows:
    """One retrieval batch's embeddings, relevance labels and passage flags, on the CPU."""
    if outputs.dim() != 2:
        raise ValueError(f"retrieval data (the batch has '{PASSAGE_ROW}') needs one embedding "
                         f"per text [batch, width], got outputs of shape {tuple(outputs.shape)}")
    flags = batch[PASSAGE_ROW].cpu().bool().reshape(-1)
    labels = batch.get("labels")
    labels = torch.full((len(flags), 1), UNLABELED) if labels is None else labels.cpu().long()
    if labels.dim() == 1:
        labels = labels.unsqueeze(1)
    if len(flags) != outputs.shape[0] or labels.shape[0] != outputs.shape[0]:
        raise ValueError(f"{len(flags)} passage flags and {labels.shape[0]} relevance labels "
                         f"for outputs of shape {tuple(outputs.shape)}")
    return _Rows(outputs, labels, None, batch.get("index"), embedding=True, passage=flags)


def _lm_rows(logits: torch.Tensor, batch: Mapping[str, Any]) -> _Rows:
    """One language-modelling batch's logits [B, L, V] reduced to the predicted tokens and
    the labels' negative log-likelihoods, on the CPU."""
    labels, mask = batch.get("labels"), batch[TOKEN_MASK]
    if logits.dim() != 3 or labels is None or labels.shape != logits.shape[:2]:
        raise ValueError(f"language-modelling data (the batch has {TOKEN_MASK}) needs logits "
                         f"[batch, tokens, vocabulary] and labels [batch, tokens], got logits "
                         f"{tuple(logits.shape)} and labels "
                         f"{None if labels is None else tuple(labels.shape)}")
    labels, mask = labels.to(logits.device).long(), mask.to(logits.device).bool()
    if mask.any() and int(labels[mask].max()) >= logits.shape[-1]:
        raise ValueError(f"a label is token {int(labels[mask].max())} but the model predicts "
                         f"{logits.shape[-1]} tokens: the data was tokenised for another model")
    log_probs = logits.float().log_softmax(dim=-1)
    picked = log_probs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    nll = torch.where(mask, -picked, torch.zeros_like(picked))
    return _Rows(logits.argmax(dim=-1).cpu(), labels.cpu(), mask.cpu(), batch.get("index"),
                 nll=nll.cpu())


def _batch_rows(outputs: torch.Tensor, batch: Mapping[str, Any],
                embedding: bool = False) -> _Rows:
    """Check one batch's outputs (sentence embeddings when ``embedding``, else of the task
    their shape says) against its ``labels`` (and ``attention_mask`` for token outputs,
    ``target_lengths`` for CTC) and move them to the CPU; a batch without labels gets ``-100``
    (NaN for regression) for each label. A language-modelling batch is reduced by
    :func:`_lm_rows`."""
    if TOKEN_MASK in batch:
        return _lm_rows(outputs, batch)
    outputs = outputs.float().cpu()
    if TARGET_LENGTHS in batch:
        return _ctc_rows(outputs, batch)
    if PASSAGE_ROW in batch:
        return _retrieval_rows(outputs, batch)
    if embedding and outputs.dim() != 2:
        raise ValueError(f"sentence embeddings must be [batch, width], got outputs of shape "
                         f"{tuple(outputs.shape)}")
    task = "embedding" if embedding else task_of(outputs)
    rows = outputs.shape[0]
    label_shape = (rows,) if task == "regression" else tuple(outputs.shape[:-1])
    labels = batch.get("labels")
    if labels is None:
        fill = math.nan if task == "regression" else UNLABELED
        labels = torch.full(label_shape, fill,
                            dtype=torch.float32 if task == "regression" else torch.long)
    labels = labels.cpu()
    if task == "regression" and labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    if tuple(labels.shape) != label_shape:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match outputs of shape "
                         f"{tuple(outputs.shape)}: expected labels {label_shape}")
    if task == "regression":
        labels = labels.float().masked_fill(~label_mask(labels), math.nan)
    else:
        labels = labels.long()
    mask = batch.get("attention_mask") if task == "token_classification" else None
    if mask is not None:
        mask = mask.cpu().bool()
        if mask.shape != labels.shape:
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not match token "
                             f"logits of shape {tuple(outputs.shape)}")
    return _Rows(outputs, labels, mask, batch.get("index"), embedding=embedding)


def _output_rows(output: Any, batch: Mapping[str, Any]) -> _Rows:
    """:func:`_batch_rows` of a model's whole output (which says whether it is a sentence
    encoder's)."""
    return _batch_rows(output_logits(output), batch, is_sentence_embedding(output))


def _pad_tokens(tensor: torch.Tensor, length: int, value: float | bool) -> torch.Tensor:
    """Pad dim 1 (tokens) of ``tensor`` to ``length`` with ``value``."""
    pad = [0, 0] * (tensor.dim() - 2) + [0, length - tensor.shape[1]]
    return F.pad(tensor, pad, value=value)


def _in_data_order(rows: Sequence[_Rows]) -> Predictions:
    """Concatenate per-batch rows; sorted by ``index`` when every batch carries one.

    Token outputs of batches padded to different lengths are padded to the longest: logits with
    0, labels with ``-100`` and the mask with ``False``, so the added positions count nowhere.
    CTC outputs keep their frames (every batch must give the same number); their target
    sequences are padded with ``-100`` to the longest.
    """
    if not rows:
        raise ValueError("predict received no batches")
    ctc = {r.target_lengths is not None for r in rows}
    if len(ctc) != 1:
        raise ValueError(f"some batches carry {TARGET_LENGTHS} (CTC data) and some do not")
    if True in ctc:
        return _ctc_in_data_order(rows)
    retrieval = {r.passage is not None for r in rows}
    if len(retrieval) != 1:
        raise ValueError(f"some batches carry '{PASSAGE_ROW}' (retrieval data) and some do not")
    if True in retrieval:
        return _retrieval_in_data_order(rows)
    lm = {r.nll is not None for r in rows}
    if len(lm) != 1:
        raise ValueError(f"some batches carry {TOKEN_MASK} (language modelling) and some do not")
    if True in lm:
        return _lm_in_data_order(rows)
    embedding = {r.embedding for r in rows}
    if len(embedding) != 1:
        raise ValueError("some batches gave sentence embeddings and some did not")
    # Per-sample shapes must agree, except for the token count of token outputs.
    shapes = {(r.outputs.dim(), r.outputs.shape[-1] if r.outputs.dim() > 1 else 0)
              for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"batches gave outputs of different shapes: "
                         f"{[tuple(r.outputs.shape) for r in rows]}")
    # Concatenating outside inference mode gives ordinary tensors that autograd code may use.
    outputs, labels = [r.outputs for r in rows], [r.labels for r in rows]
    masks = [r.mask for r in rows]
    if rows[0].outputs.dim() == 3:
        length = max(r.outputs.shape[1] for r in rows)
        outputs = [_pad_tokens(o, length, 0.0) for o in outputs]
        labels = [_pad_tokens(y, length, UNLABELED) for y in labels]
        masks = [None if m is None else _pad_tokens(m, length, False) for m in masks]
    logits, target = torch.cat(outputs), torch.cat(labels)
    mask = torch.cat(masks) if all(m is not None for m in masks) else None
    order = _data_order(rows)
    if order is not None:
        logits, target = logits[order], target[order]
        mask = mask[order] if mask is not None else None
    return Predictions(logits=logits, labels=target, mask=mask, embedding=embedding.pop())


def _data_order(rows: Sequence[_Rows]) -> torch.Tensor | None:
    """The permutation sorting the concatenated rows by ``index``; None unless every batch
    carries one."""
    if not all(r.index is not None for r in rows):
        return None
    return torch.argsort(torch.cat([r.index.cpu().reshape(-1) for r in rows]))


def _ctc_in_data_order(rows: Sequence[_Rows]) -> Predictions:
    """:func:`_in_data_order` for CTC rows: per-frame outputs of one shape per sample, target
    sequences padded with ``-100`` to the longest."""
    shapes = {tuple(r.outputs.shape[1:]) for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"CTC batches gave per-frame outputs of different shapes (frames, "
                         f"classes): {sorted(shapes)}")
    width = max(r.labels.shape[1] for r in rows)
    logits = torch.cat([r.outputs for r in rows])
    labels = torch.cat([_pad_tokens(r.labels, width, UNLABELED) for r in rows])
    lengths = torch.cat([r.target_lengths for r in rows])  # type: ignore[misc]
    order = _data_order(rows)
    if order is not None:
        logits, labels, lengths = logits[order], labels[order], lengths[order]
    return Predictions(logits=logits, labels=labels, target_lengths=lengths)


def _retrieval_in_data_order(rows: Sequence[_Rows]) -> Predictions:
    """:func:`_in_data_order` for retrieval rows: embeddings, relevance labels padded with
    ``-100`` to the widest, and the passage flags."""
    width = max(r.labels.shape[1] for r in rows)
    logits = torch.cat([r.outputs for r in rows])
    labels = torch.cat([F.pad(r.labels, (0, width - r.labels.shape[1]), value=UNLABELED)
                        for r in rows])
    passage = torch.cat([r.passage for r in rows])  # type: ignore[misc]
    order = _data_order(rows)
    if order is not None:
        logits, labels, passage = logits[order], labels[order], passage[order]
    return Predictions(logits=logits, labels=labels, embedding=True, passage=passage)


def _lm_in_data_order(rows: Sequence[_Rows]) -> Predictions:
    """:func:`_in_data_order` for language-modelling rows: predicted tokens, labels, mask and
    negative log-likelihoods padded to the longest row (unlabelled, masked out)."""
    length = max(r.outputs.shape[1] for r in rows)

    def joined(values: Sequence[torch.Tensor], fill: float | bool) -> torch.Tensor:
        return torch.cat([_pad_tokens(v, length, fill) for v in values])

    predicted = joined([r.outputs for r in rows], 0)
    labels = joined([r.labels for r in rows], UNLABELED)
    mask = joined([r.mask for r in rows if r.mask is not None], False)
    nll = joined([r.nll for r in rows if r.nll is not None], 0.0)
    order = _data_order(rows)
    if order is not None:
        predicted, labels, mask, nll = predicted[order], labels[order], mask[order], nll[order]
    return Predictions(logits=predicted, labels=labels, mask=mask, nll=nll)


def predict(model: nn.Module, batches: Iterable[Mapping[str, Any]],
            device: torch.device | str | None = None) -> Predictions:
    """Run ``model`` over ``batches`` and collect its outputs and the labels.

    The model runs in eval mode under ``torch.inference_mode``; each submodule's train/eval mode
    is restored afterwards. Batch tensors are moved to ``device`` (default: the model's device);
    the model itself is not moved. When every batch carries ``index``, the rows (samples) are
    returned sorted by it (data-set order, whatever the loader's shuffling); otherwise in
    iteration order. Outputs keep their per-sample dims ([C], [L, C] or a score). A batch
    without ``labels`` gets ``-100`` (NaN for regression) for each label.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    with eval_mode(model), torch.inference_mode():
        rows = [_output_rows(run_model(model, moved), moved)
                for moved in (to_device(batch, device) for batch in batches)]
    return _in_data_order(rows)


def predict_source(source: Any, batches: Iterable[Mapping[str, Any]],
                   device: torch.device) -> Predictions:
    """Like :func:`predict` for a teacher source (``source(batch)["logits"]``); same row order.

    Runs under ``torch.inference_mode``. A trainable source (``source.trainable_module()`` not
    ``None``, e.g. online peers) has that module put in eval mode for the prediction and each of
    its submodules' modes restored afterwards; a frozen source runs its model as it always does.
    """
    module = getattr(source, "trainable_module", lambda: None)()
    with ExitStack() as stack:
        if module is not None:
            stack.enter_context(eval_mode(module))
        stack.enter_context(torch.inference_mode())
        rows = [_batch_rows(source(moved)["logits"], moved)
                for moved in (to_device(batch, device) for batch in batches)]
    return _in_data_order(rows)


# --------------------------------------------------------------------------- quality metrics


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor,
                               n_bins: int = 15) -> float:
    r"""Expected calibration error of class probabilities (Guo et al., 2017).

    With confidence :math:`\hat p_i = \max_c p_{ic}`, prediction :math:`\hat y_i = \arg\max_c
    p_{ic}` and :math:`M` equal-width bins :math:`B_m = \{i : \hat p_i \in ((m-1)/M, m/M]\}`,

    .. math::

        \mathrm{ECE} = \sum_{m=1}^{M} \frac{|B_m|}{N}
                       \left| \mathrm{acc}(B_m) - \mathrm{conf}(B_m) \right|,

    where :math:`\mathrm{acc}(B_m)` is the fraction of :math:`B_m` with :math:`\hat y_i = y_i` and
    :math:`\mathrm{conf}(B_m)` the mean of :math:`\hat p_i` over :math:`B_m`. Empty bins add
    nothing. Since :math:`|B_m| \cdot |\mathrm{acc} - \mathrm{conf}|` equals
    :math:`|\sum_{B_m} (\mathbb 1[\hat y_i = y_i] - \hat p_i)|`, each bin needs only two sums.

    Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017.

    Args:
        probs: [N, C] class probabilities (rows sum to one).
        labels: [N] integer class labels (all valid; filter ``-100`` rows beforehand).
        n_bins: number of bins M.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"expected probs [N, C] and labels [N], got probs {tuple(probs.shape)} "
                         f"and labels {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    confidence, predicted = probs.max(dim=1)
    # Inner edges in the probabilities' own dtype, so a confidence equal to an edge, e.g. 0.2,
    # falls into the bin that ends there: bucketize gives edges[i-1] < x <= edges[i].
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=confidence.dtype,
                           device=confidence.device)[1:-1]
    bins = torch.bucketize(confidence, edges)
    gap = (predicted == labels).double() - confidence.double()
    per_bin = torch.zeros(n_bins, dtype=torch.float64, device=gap.device).index_add_(0, bins, gap)
    return float(per_bin.abs().sum() / probs.shape[0])


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor,
                  teacher_logits: torch.Tensor | None, mask: torch.Tensor | None) -> None:
    if logits.dim() not in (2, 3) or labels.shape != logits.shape[:-1]:
        raise ValueError(f"expected logits [N, C] and labels [N], or token logits [N, L, C] and "
                         f"labels [N, L], got logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)}")
    if teacher_logits is not None and teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match student "
                         f"logits {tuple(logits.shape)}")
    if mask is not None and (logits.dim() != 3 or mask.shape != labels.shape):
        raise ValueError(f"mask of shape {tuple(mask.shape)} needs token logits [N, L, C] with "
                         f"labels [N, L], got logits {tuple(logits.shape)}")


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor,
                           teacher_logits: torch.Tensor | None = None,
                           n_bins: int = 15, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 and ECE against the labels, and agreement with a teacher.

    * ``accuracy``: fraction of labelled rows whose argmax equals the label;
    * ``macro_f1``: unweighted mean of per-class F1 (scikit-learn ``average="macro"``, over the
      classes that occur in the labels or the predictions);
    * ``ece``: :func:`expected_calibration_error` of the softmax probabilities;
    * ``agreement`` (only with ``teacher_logits``): fraction of rows where the argmax equals the
      teacher's argmax (Stanton et al., "Does Knowledge Distillation Really Work?", 2021).

    Rows labelled ``-100`` are left out of accuracy, macro-F1 and ECE but count for agreement,
    which needs no label. With no labelled row at all, the three label metrics are NaN.

    Token classification (``logits`` [N, L, C], ``labels`` [N, L]): every metric is computed
    over tokens, all sentences pooled. The tokens that count are those where ``mask`` (the
    ``attention_mask``) is true, or, without a mask, those whose label is not ``-100``; all
    other positions (padding) are ignored whatever their logits and labels. Within the mask,
    tokens labelled ``-100`` (special tokens, continued sub-words) count for agreement only.
    """
    _check_shapes(logits, labels, teacher_logits, mask)
    logits, labels = logits.detach().float().cpu(), labels.detach().cpu().long()
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach().cpu()
    if logits.dim() == 3:
        tokens = mask.detach().cpu().bool() if mask is not None else labels != UNLABELED
        logits, labels = logits[tokens], labels[tokens]
        teacher_logits = teacher_logits[tokens] if teacher_logits is not None else None
    predicted = logits.argmax(dim=1)
    metrics = _label_metrics(logits, predicted, labels, n_bins)
    if teacher_logits is not None:
        metrics["agreement"] = float((predicted == teacher_logits.argmax(dim=1)).double().mean())
    return metrics


def _label_metrics(logits: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor,
                   n_bins: int) -> dict[str, float]:
    labelled = labels != UNLABELED
    if not labelled.any():
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "ece": float("nan")}
    # Deferred: scikit-learn takes about two seconds to import; only metrics need it.
    from sklearn.metrics import f1_score

    logits, predicted, labels = logits[labelled], predicted[labelled], labels[labelled]
    return {
        "accuracy": float((predicted == labels).double().mean()),
        "macro_f1": float(f1_score(labels.numpy(), predicted.numpy(), average="macro",
                                   zero_division=0.0)),
        "ece": expected_calibration_error(logits.softmax(dim=1), labels, n_bins),
    }


def lm_metrics(predictions: Predictions,
               teacher_tokens: torch.Tensor | None = None) -> dict[str, float]:
    """Language-modelling quality over the labelled positions of ``predictions`` (task ``lm``),
    all rows pooled:

    * ``perplexity``: exp of the mean negative log-likelihood of the next token,
      exp(-(1/N) sum log p(y_t | x_<t)), the held-out perplexity;
    * ``accuracy``: fraction of positions whose most likely token is the next token;
    * ``agreement`` (only with ``teacher_tokens``, the teacher's predicted tokens on the same
      rows): fraction of positions where the model's most likely token is the teacher's
      (next-token agreement; Stanton et al. 2021 measure it for classifiers).

    With no labelled position every metric is NaN."""
    if predictions.nll is None or predictions.mask is None:
        raise ValueError("lm_metrics needs language-modelling predictions (with nll and mask)")
    mask = predictions.mask
    if not mask.any():
        nan = float("nan")
        return {"perplexity": nan, "accuracy": nan, **({"agreement": nan}
                                                        if teacher_tokens is not None else {})}
    predicted = predictions.logits[mask]
    metrics = {"perplexity": math.exp(float(predictions.nll[mask].double().mean())),
               "accuracy": float((predicted == predictions.labels[mask]).double().mean())}
    if teacher_tokens is not None:
        if teacher_tokens.shape != mask.shape:
            raise ValueError(f"teacher tokens {tuple(teacher_tokens.shape)} do not match the "
                             f"student's {tuple(mask.shape)}")
        metrics["agreement"] = float((predicted == teacher_tokens[mask]).double().mean())
    return metrics


def greedy_decode(logits: torch.Tensor) -> list[list[int]]:
    """Greedy (best path) CTC decoding of per-frame logits [N, T, C], the blank last: each
    frame's most likely class, repeats merged, blanks removed; one token list per row."""
    if logits.dim() != 3:
        raise ValueError(f"greedy_decode needs per-frame logits [N, T, C], got "
                         f"{tuple(logits.shape)}")
    blank = logits.shape[-1] - 1
    readings = []
    for path in logits.argmax(dim=-1).tolist():
        merged = [c for t, c in enumerate(path) if t == 0 or c != path[t - 1]]
        readings.append([c for c in merged if c != blank])
    return readings


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning ``a``
    into ``b``."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def ctc_metrics(logits: torch.Tensor, labels: torch.Tensor, target_lengths: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> dict[str, float]:
    r"""Character error rate, line accuracy and agreement of a CTC model's greedy readings.

    With :math:`\hat y_i` the greedy reading of row i (:func:`greedy_decode`), :math:`y_i` its
    target and K the rows with a known target (length > 0):

    * ``cer`` = :math:`\sum_{i \in K} \mathrm{ed}(\hat y_i, y_i) / \sum_{i \in K} |y_i|`, the
      edit distance (:func:`edit_distance`) per target token;
    * ``accuracy``: the fraction of rows of K read exactly (line accuracy);
    * ``agreement`` (only with ``teacher_logits``): the fraction of all rows read exactly as
      the teacher reads them.

    ``cer`` and ``accuracy`` are NaN without a known target.

    Args:
        logits: per-frame logits [N, T, C], the blank last.
        labels: target sequences [N, S] padded with ``-100``.
        target_lengths: [N] tokens per target (0: hidden).
        teacher_logits: the teacher's per-frame logits [N, T', C] on the same rows.
    """
    check_ctc_targets(labels, target_lengths, logits.shape[-1])
    readings = greedy_decode(logits.detach().cpu())
    targets = [row[:length] for row, length in zip(labels.tolist(), target_lengths.tolist(),
                                                    strict=True)]
    known = [i for i, target in enumerate(targets) if target]
    metrics = {"cer": math.nan, "accuracy": math.nan}
    if known:
        errors = sum(edit_distance(readings[i], targets[i]) for i in known)
        metrics["cer"] = errors / sum(len(targets[i]) for i in known)
        metrics["accuracy"] = sum(readings[i] == targets[i] for i in known) / len(known)
    if teacher_logits is not None:
        if teacher_logits.shape[0] != logits.shape[0]:
            raise ValueError(f"teacher logits for {teacher_logits.shape[0]} rows, student "
                             f"logits for {logits.shape[0]}")
        teacher = greedy_decode(teacher_logits.detach().cpu())
        metrics["agreement"] = sum(a == b for a, b in zip(readings, teacher, strict=True)) \
            / len(readings)
    return metrics


def _scores(values: torch.Tensor, what: str, rows: int | None = None) -> torch.Tensor:
    """``values`` of shape [N] or [N, 1] (N = ``rows`` when given) as a float64 CPU vector."""
    if (values.dim() not in (1, 2) or values.numel() != values.shape[0]
            or (rows is not None and values.shape[0] != rows)):
        expected = "N" if rows is None else rows
        raise ValueError(f"{what} of shape {tuple(values.shape)}: expected [{expected}] or "
                         f"[{expected}, 1]")
    return values.detach().cpu().double().reshape(-1)


def _agreement_of_scores(predicted: torch.Tensor, target: torch.Tensor) -> tuple[float, ...]:
    """(MSE, Pearson r, Spearman rho) of two score vectors; NaN correlations for fewer than two
    pairs or a constant vector (where correlation is undefined)."""
    if predicted.numel() == 0:
        return math.nan, math.nan, math.nan
    mse = float(((predicted - target) ** 2).mean())
    if predicted.numel() < 2:
        return mse, math.nan, math.nan
    # Deferred like scikit-learn: only regression metrics need SciPy.
    from scipy import stats

    x, y = predicted.numpy(), target.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return mse, float(stats.pearsonr(x, y).statistic), float(stats.spearmanr(x, y).statistic)


def regression_metrics(outputs: torch.Tensor, labels: torch.Tensor,
                       teacher_outputs: torch.Tensor | None = None) -> dict[str, float]:
    r"""MSE, Pearson and Spearman correlation of predicted scores with the gold scores and,
    given ``teacher_outputs``, with the teacher's scores.

    With student scores :math:`s`, gold scores :math:`y` and teacher scores :math:`t`:

    * ``mse`` = :math:`\frac1N \sum_i (s_i - y_i)^2`, ``pearson`` = Pearson's r of (s, y),
      ``spearman`` = Spearman's rho (Pearson's r of the ranks, ties averaged) of (s, y), over the
      samples whose label is known (NaN labels are skipped);
    * ``mse_teacher``, ``pearson_teacher``, ``spearman_teacher``: the same for (s, t) over all
      samples, labelled or not (the teacher's scores need no label), as in quality-estimation
      distillation where the student is judged by how closely it follows the teacher.

    Correlations come from ``scipy.stats.pearsonr``/``spearmanr``; they are NaN when fewer than
    two pairs count or one side is constant; all three are NaN with no pair at all.

    Args:
        outputs: [N] or [N, 1] predicted scores.
        labels: [N] or [N, 1] float gold scores, NaN where unknown.
        teacher_outputs: [N] or [N, 1] teacher scores in the same order.
    """
    predicted = _scores(outputs, "outputs")
    gold = _scores(labels, "labels", len(predicted))
    known = ~torch.isnan(gold)
    metrics = dict(zip(REGRESSION_KEYS, _agreement_of_scores(predicted[known], gold[known]),
                       strict=True))
    if teacher_outputs is not None:
        teacher = _scores(teacher_outputs, "teacher outputs", len(predicted))
        metrics.update(zip(REGRESSION_TEACHER_KEYS, _agreement_of_scores(predicted, teacher),
                           strict=True))
    return metrics


def task_metrics(predictions: Predictions, teacher_outputs: torch.Tensor | None = None,
                 n_bins: int = 15) -> dict[str, float]:
    """The metrics of ``predictions``' task: :func:`regression_metrics` for scores,
    :func:`ctc_metrics` for CTC, :func:`~kdistill.embedding_metrics.embedding_metrics` for
    sentence embeddings, :func:`~kdistill.retrieval_metrics.retrieval_metrics` for retrieval
    (against the teacher's top 10 when no row has a relevance label), :func:`lm_metrics` for
    language modelling (the teacher's outputs then its predicted tokens),
    :func:`classification_metrics` (per token, with ``predictions.mask``) for other logits.
    ``teacher_outputs`` are the teacher's outputs on the same rows (``Predictions.logits`` of
    :func:`predict_source`)."""
    if predictions.target_lengths is not None:
        return ctc_metrics(predictions.logits, predictions.labels, predictions.target_lengths,
                           teacher_outputs)
    if predictions.passage is not None:
        labelled = bool((predictions.labels != UNLABELED).any())
        return retrieval_metrics(predictions.logits, predictions.passage,
                                 predictions.labels if labelled else None, teacher_outputs)
    if predictions.embedding:
        return embedding_metrics(predictions.logits, predictions.labels, teacher_outputs)
    if predictions.task == "lm":
        return lm_metrics(predictions, teacher_outputs)
    if predictions.task == "regression":
        return regression_metrics(predictions.logits, predictions.labels, teacher_outputs)
    return classification_metrics(predictions.logits, predictions.labels, teacher_outputs,
                                  n_bins, mask=predictions.mask)


# --------------------------------------------------------------------------- cost


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, trainable or not; a parameter shared by two modules counts once."""
    return sum(p.numel() for p in model.parameters())


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's state dict (parameters and buffers) saved as safetensors.

    Tied tensors are stored once (``safetensors.torch.save_model``), as they would be in a saved
    checkpoint; the file is written to a temporary directory and removed.
    """
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


# --------------------------------------------------------------------------- latency


MIN_SAMPLE_MS = 5.0


def _time_forward_ms(model: nn.Module, batch: Mapping[str, Any], device: torch.device,
                     loops: int = 1) -> float:
    """Mean time of one forward pass over ``loops`` back-to-back passes."""
    start = time.perf_counter()
    for _ in range(loops):
        run_model(model, batch)
    _synchronize(device)
    return (time.perf_counter() - start) * 1000.0 / loops


def _loops_for(model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> int:
    """Passes per timing sample so that one sample lasts at least ``MIN_SAMPLE_MS``: a forward
    of a few microseconds is otherwise below the timer's and the scheduler's noise."""
    once = max(_time_forward_ms(model, batch, device), 1e-3)
    return max(1, math.ceil(MIN_SAMPLE_MS / once))


def _interleaved_latency(models: Mapping[str, nn.Module], batch: Mapping[str, Any], *,
                         threads: int, repeats: int, warmup: int) -> dict[str, Latency]:
    """Median forward time of each model, timed in interleaved rounds.

    Every round times each model once, starting one model later than the previous round
    (round r runs models r, r+1, ... cyclically), so slow drifts in machine load and any effect
    of running right after a particular model fall on all models alike. Each model runs
    ``warmup`` untimed rounds first, then is calibrated: one timing sample is the mean of as many
    back-to-back passes as fill ``MIN_SAMPLE_MS`` (like ``timeit``'s autorange). Batch tensors
    are moved to each model's device beforehand so that copies are not timed.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(models)
    devices = {name: _model_device(models[name]) for name in names}
    batches = {name: to_device(batch, devices[name]) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    with ExitStack() as stack:
        stack.enter_context(num_threads(threads))
        for model in models.values():
            stack.enter_context(eval_mode(model))
        stack.enter_context(torch.inference_mode())
        for _ in range(warmup):
            for name in names:
                _time_forward_ms(models[name], batches[name], devices[name])
        loops = {name: _loops_for(models[name], batches[name], devices[name]) for name in names}
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(_time_forward_ms(models[name], batches[name],
                                                    devices[name], loops[name]))
    size = _batch_size(batch)
    return {name: _latency(times[name], size, threads) for name in names}


def _latency(times_ms: Sequence[float], batch_size: int, threads: int) -> Latency:
    median = statistics.median(times_ms)
    return Latency(median_batch_ms=median, per_example_ms=median / batch_size,
                   batch_size=batch_size, threads=threads)


def measure_latency(model: nn.Module, batch: Mapping[str, Any], *, threads: int = 2,
                    repeats: int = 20, warmup: int = LATENCY_WARMUP) -> Latency:
    """Median wall-clock time (``time.perf_counter``) of one forward pass over ``batch``.

    The model runs in eval mode under ``torch.inference_mode`` with ``torch.set_num_threads(
    threads)``; the thread count and each submodule's mode are restored afterwards. ``warmup``
    untimed passes come first; the median of ``repeats`` timed passes resists outliers.
    """
    return _interleaved_latency({"model": model}, batch, threads=threads, repeats=repeats,
                                warmup=warmup)["model"]


# --------------------------------------------------------------------------- comparison


def benchmark_models(models: Mapping[str, nn.Module], eval_batches: list[dict[str, Any]], *,
                     reference: str, teacher_logits_from: str | None = None,
                     latency_batch: dict[str, Any], threads: int = 2,
                     repeats: int = 20) -> list[BenchmarkRow]:
    """Quality and cost of several models, one :class:`BenchmarkRow` per model, in input order.

    Every model is evaluated on ``eval_batches`` with the metrics of its task
    (:func:`task_metrics`); the teacher metrics (agreement, or ``*_teacher`` for regression) are
    measured against model ``teacher_logits_from`` (whose own agreement is therefore 1.0).
    Latency is timed on ``latency_batch`` for all models in this one call, in interleaved rounds
    (see :func:`_interleaved_latency`), and ``speedup`` is the ``reference`` model's median batch
    latency divided by this model's (1.0 for the reference itself). ``throughput`` is examples
    per second at the stated batch size and thread count, and for language models
    ``tokens_per_s`` is input tokens per second (:func:`input_tokens` of ``latency_batch`` over
    the median batch time: teacher and student timed in the same rounds, so comparable);
    ``size_mb`` is in 10^6 bytes.
    """
    for role, name in (("reference", reference), ("teacher_logits_from", teacher_logits_from)):
        if name is not None and name not in models:
            raise ValueError(f"{role} '{name}' is not among the models: {sorted(models)}")
    predictions = {name: predict(model, eval_batches) for name, model in models.items()}
    teacher_outputs = (predictions[teacher_logits_from].logits
                       if teacher_logits_from is not None else None)
    metrics = {name: task_metrics(p, teacher_outputs) for name, p in predictions.items()}
    latency = _interleaved_latency(models, latency_batch, threads=threads, repeats=repeats,
                                   warmup=LATENCY_WARMUP)
    teacher_metrics = metrics[teacher_logits_from] if teacher_logits_from is not None else None
    tokens = input_tokens(latency_batch)
    return [
        _row(name, model, _quality(predictions[name].task, metrics[name], teacher_metrics),
             latency[name], latency[reference],
             tokens if predictions[name].task == "lm" else None)
        for name, model in models.items()
    ]


def input_tokens(batch: Mapping[str, Any]) -> int | None:
    """The input tokens a language-modelling batch feeds its model (the ones of its
    ``attention_mask``, padding left out); ``None`` for a batch of another task."""
    if TOKEN_MASK not in batch or "attention_mask" not in batch:
        return None
    return int(batch["attention_mask"].sum())


def _quality(task: Task, metrics: Mapping[str, float],
             teacher_metrics: Mapping[str, float] | None) -> dict[str, float | None]:
    """A row's quality entries: the task's metrics, ``None`` for the teacher ones without a
    teacher."""
    if task == "regression":
        return {key: metrics.get(key) for key in REGRESSION_KEYS + REGRESSION_TEACHER_KEYS}
    if task == "embedding":
        return {key: metrics.get(key) for key in EMBEDDING_KEYS}
    if task == "retrieval":
        return {key: metrics.get(key) for key in RETRIEVAL_KEYS}
    if task == "lm":
        return {key: metrics.get(key) for key in LM_KEYS}
    teacher_accuracy = teacher_metrics["accuracy"] if teacher_metrics is not None else None
    label_metrics = ("cer", "accuracy") if task == "ctc" else ("accuracy", "macro_f1", "ece")
    return {
        **{key: metrics[key] for key in label_metrics},
        "agreement": metrics.get("agreement"),
        "accuracy_share": (metrics["accuracy"] / teacher_accuracy if teacher_accuracy else None),
    }


def _row(name: str, model: nn.Module, quality: Mapping[str, float | None], latency: Latency,
         reference: Latency, tokens: int | None = None) -> BenchmarkRow:
    row = BenchmarkRow(
        name=name,
        **quality,  # type: ignore[typeddict-item]
        params=count_parameters(model),
        size_mb=size_on_disk(model) / BYTES_PER_MB,
        latency_ms=latency.median_batch_ms,
        per_example_ms=latency.per_example_ms,
        throughput=1000.0 / latency.per_example_ms,
        speedup=reference.median_batch_ms / latency.median_batch_ms,
        batch_size=latency.batch_size,
        threads=latency.threads,
    )
    if tokens is not None:
        row["tokens_per_s"] = tokens * 1000.0 / latency.median_batch_ms
    return row


def eval_batches(data: Any, batch_size: int,
                 collate_fn: Any = None) -> list[dict[str, Any]]:
    """Batches of an evaluation set in order: a ``DataLoader`` is iterated as it is; a
    ``Dataset`` is cut into consecutive batches of ``batch_size`` samples, each carrying its
    ``index``."""
    if isinstance(data, DataLoader):
        return list(data)
    dataset = IndexedDataset(data)
    collate_fn = collate_fn or collate
    return [collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            for start in range(0, len(dataset), batch_size)]


def evaluate_model(student: nn.Module, batches: Sequence[Mapping[str, Any]],
                   device: torch.device | str | None,
                   teacher_outputs: torch.Tensor | None = None) -> dict[str, float]:
    """The engine's end-of-epoch evaluation: :func:`task_metrics` of ``student`` on ``batches``.

    Classification and token classification give ``accuracy``, ``macro_f1``, ``ece`` and, with
    ``teacher_outputs``, ``agreement``; CTC gives ``cer``, ``accuracy`` and ``agreement``;
    regression gives ``mse``, ``pearson``, ``spearman`` and,
    with ``teacher_outputs``, ``mse_teacher``, ``pearson_teacher``, ``spearman_teacher``;
    sentence embeddings give ``probe_accuracy`` and, with ``teacher_outputs``,
    ``similarity_spearman`` and ``nn10_overlap``; retrieval gives ``mrr10``, ``recall10``,
    ``recall100``, ``ndcg10`` and, with ``teacher_outputs``, ``teacher_overlap10``; language
    modelling gives ``perplexity``, ``accuracy`` and, with ``teacher_outputs``, ``agreement``.
    ``teacher_outputs`` are the teacher's outputs in data order (:func:`predict_source`).
    """
    return task_metrics(predict(student, batches, device), teacher_outputs)


def shifted_evaluation(models: Mapping[str, nn.Module], test: ArrayDataset,
                       shifts: Sequence[Shift], severity: float, batch_size: int,
                       device: torch.device | str | None = None, seed: int = 0,
                       value_range: tuple[float, float] | None = None
                       ) -> dict[str, dict[str, float]]:
    """Accuracy of each of ``models`` under each shift of the test set.

    Returns ``{name: {"<shift>": a, ...}}``; every model sees the very same shifted images, on
    ``device`` (default: each model's own). ``value_range`` defaults to the clean test inputs'
    own range. Clean accuracy is not repeated here: the run's comparison already has it.
    """
    value_range = value_range or value_range_of(test.inputs)
    results: dict[str, dict[str, float]] = {name: {} for name in models}
    for shift in shifts:
        data = shifted_dataset(test, shift, severity, seed, value_range)
        batches = eval_batches(data, batch_size)
        for name, net in models.items():
            predictions = predict(net, batches, device)
            results[name][shift] = classification_metrics(predictions.logits,
                                                          predictions.labels)["accuracy"]
    return results
