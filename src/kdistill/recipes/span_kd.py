"""``span_kd``: distillation across tokenizers by matching the likelihood of shared text spans."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.batch import TOKEN_MASK, UNLABELED
from kdistill.data.lm import BlockTokenizer, read_tokenizer
from kdistill.models.lm import lm_folder
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import Weight, label_term
from kdistill.schedules import TrainState
from kdistill.taps import Taps
from kdistill.teachers import FrozenTeacher, TeacherSource

TEACHER_IDS = "teacher_input_ids"
TEACHER_MASK = "teacher_attention_mask"
TEACHER_LABELS = "teacher_labels"  # the teacher token each teacher position predicts
STUDENT_SPAN = "student_span"  # [B, L]: the span of the token each student position predicts
TEACHER_SPAN = "teacher_span"  # [B, Lt]: the same for the teacher's positions
SPAN_COUNT = "span_count"  # how many spans the batch uses (ids 0 .. count - 1)
NO_SPAN = -1


def first_visible(text: str, start: int, end: int) -> int | None:
    """The position of the first non-whitespace character of ``text[start:end]`` (None when
    the piece is all whitespace): where a token starts once its leading space is set aside."""
    for position in range(start, end):
        if not text[position].isspace():
            return position
    return None


def shared_spans(text: str, student: Sequence[tuple[int, int]],
                 teacher: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The span of each student and each teacher token of ``text`` (character ``(start,
    end)`` offsets), ``NO_SPAN`` for an all-whitespace token.

    Span boundaries are the characters where a token of each tokenization starts (after
    its leading whitespace); span j runs from boundary j to boundary j + 1 (the last one to
    the end of the text), and a token belongs to the span holding its first visible
    character. Every span is thus a piece of text both tokenizations cut out whole: a word,
    or several words where one tokenizer runs across a word boundary the other keeps."""
    def starts(offsets: Sequence[tuple[int, int]]) -> list[int | None]:
        return [first_visible(text, a, b) for a, b in offsets]

    mine, theirs = starts(student), starts(teacher)
    bounds = sorted({p for p in mine if p is not None} & {p for p in theirs if p is not None})

    def span(start: int | None) -> int:
        return NO_SPAN if start is None or not bounds or start < bounds[0] \
            else bisect.bisect_right(bounds, start) - 1

    return [span(p) for p in mine], [span(p) for p in theirs]


def decoded_offsets(tokenizer: BlockTokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[
        int, int]]]:
    """The text the token ``ids`` decode to and each token's character offsets in it: token
    i spans from the length of the decoded first i tokens to that of the first i + 1. A
    token whose prefix does not decode to a prefix of the text (a character split across
    byte-level tokens) gets an empty span at its end, so it starts no span."""
    text = tokenizer.tokenizer.decode(list(ids), skip_special_tokens=False)
    offsets, previous = [], 0
    for i in range(1, len(ids) + 1):
        prefix = tokenizer.tokenizer.decode(list(ids[:i]), skip_special_tokens=False)
        end = len(prefix) if text.startswith(prefix) else previous
        offsets.append((previous, end) if end >= previous else (previous, previous))
        previous = max(previous, end)
    return text, offsets


@dataclass
class RowSpans:
    """One row's teacher tokens and the span of each token both models predict."""

    teacher_ids: list[int]
    student_span: list[int]  # per student position (the token it predicts)
    teacher_span: list[int]  # per teacher position (the token it predicts)


def row_spans(sequence: Sequence[int], predicted: Sequence[bool], student: BlockTokenizer,
              teacher: BlockTokenizer) -> RowSpans:
    """The spans of one row of student tokens ``sequence`` (its inputs and the last token it
    predicts; ``predicted[i]`` whether token i + 1 carries a label). A span counts only when
    each of its tokens, in both tokenizations, is predicted from the text before it (a
    labelled student token, a teacher token after the first); others get ``NO_SPAN``."""
    text, offsets = decoded_offsets(student, sequence)
    encoding = teacher.tokenizer.encode(text, add_special_tokens=False)
    mine, theirs = shared_spans(text, offsets, encoding.offsets)
    broken = {mine[0], theirs[0] if theirs else NO_SPAN}
    broken |= {mine[i + 1] for i, known in enumerate(predicted) if not known}
    present_s = set(mine[1:])
    present_t = set(theirs[1:])
    usable = (present_s & present_t) - broken - {NO_SPAN}
    return RowSpans(list(encoding.ids),
                    [s if s in usable else NO_SPAN for s in mine[1:]],
                    [s if s in usable else NO_SPAN for s in theirs[1:]])


def padded(rows: Sequence[Sequence[int]], fill: int, width: int) -> Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class OwnTokens(nn.Module):
    """A language model reading the batch's teacher tokens (``teacher_input_ids`` and
    ``teacher_attention_mask``) in place of the student's."""

    batch_inputs = (TEACHER_IDS, TEACHER_MASK)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                *, teacher_input_ids: Tensor, teacher_attention_mask: Tensor,
                **flags: Any) -> Any:
        return self.model(input_ids=teacher_input_ids, attention_mask=teacher_attention_mask,
                          **flags)


class OwnTokensTeacher(FrozenTeacher):
    """A frozen teacher that reads its own tokenization of the batch's text
    (:class:`OwnTokens`), which ``align(batch)`` adds to a batch that lacks it (the engine's
    first forward of a phase, on a batch no recipe prepared). Its predictions are over another
    vocabulary, so it gives no next-token agreement in the end-of-epoch evaluation."""

    def __init__(self, model: nn.Module, align: Callable[[dict[str, Any]], dict[str, Any]]):
        super().__init__(OwnTokens(model))
        self.align = align

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        return super().__call__(batch if TEACHER_IDS in batch else self.align(dict(batch)))

    def evaluation_source(self) -> TeacherSource | None:
        return None


class SpanKDParams(RecipeParams):
    student_tokenizer: str
    teacher_tokenizer: str
    kd_weight: Weight = 1.0
    ce_weight: Weight = 0.0


def span_log_likelihoods(logits: Tensor, targets: Tensor, spans: Tensor,
                         count: int) -> Tensor:
    """Per span id 0 .. count - 1 the summed log-probability of its tokens: position (b, t)
    predicts ``targets[b, t]`` and adds to span ``spans[b, t]`` (``NO_SPAN``: nowhere)."""
    keep = spans != NO_SPAN
    log_p = logits.log_softmax(-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.zeros(count, dtype=log_p.dtype, device=log_p.device).index_add(
        0, spans[keep], log_p[keep])


def bernoulli_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(Bern(p) || Bern(q)) from log p and log q, element-wise, with log(1 - p) computed as
    log(-expm1(log p)) (accurate near p = 1; clamped away from log 0)."""
    tiny = torch.finfo(log_p.dtype).tiny
    log_not_p = torch.log((-torch.expm1(log_p)).clamp_min(tiny))
    log_not_q = torch.log((-torch.expm1(log_q)).clamp_min(tiny))
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)


@register
class SpanKD(Recipe):
    """Distillation between language models whose tokenizers differ, on the text spans that
    both tokenizations cut out whole (word-aligned span matching).

    **Alignment.** Each row of student tokens is decoded to its text; the teacher tokenises
    that text itself and runs on its own tokens. Every token gets character offsets (the
    student's from the decoded lengths of its prefixes, the teacher's from its tokenizer);
    the characters where a token of *both* tokenizations starts (leading whitespace set
    aside) cut the text into spans (:func:`shared_spans`): words, or runs of words where one
    tokenizer crosses a boundary the other keeps. A span is used when every one of its
    tokens, in both tokenizations, is predicted from the text before it (labelled for the
    student; not the text's first token).

    **Loss.** By the chain rule each model gives the probability of a span w given the text
    before it, P(w | prefix) = prod over its tokens of p(token | earlier tokens), both models
    conditioning on the same characters (the probability of w's own tokenization, the usual
    canonical-tokenization approximation). Coarsening each model's prediction to the event
    {the continuation is w} gives two Bernoulli distributions, and the term is the KL between
    them::

        D(w) = P_t log(P_t / P_s) + (1 - P_t) log((1 - P_t) / (1 - P_s)),
        P_m = P_m(w | prefix) = exp(sum_{tokens i of w in m's tokenization} log p_m(i | <i))
        L = kd_weight (1/N) sum_{used spans w} D(w) + ce_weight CE(student, its labels)

    with N the student's labelled tokens of the global batch (the engine's ``tokens`` unit,
    exact under gradient accumulation: a rate per student token). D(w) is 0 exactly when the
    two models give the span the same probability; it needs no shared vocabulary and no
    projection between vocabularies. The teacher reads its own tokens, so it gives no
    next-token agreement, and a teacher cache cannot serve it.

    **Papers.** Aligning two tokenizations of one text by the characters they share follows
    the token alignment of Wan et al. (2024), "Knowledge Fusion of Large Language Models"
    (FuseLLM, which matches tokens by minimum edit distance) kept here to exact shared
    boundaries; matching probabilities of text rather than of tokens is the idea of
    sequence-level KD (Kim & Rush 2016) applied per span. The alternative that needs no
    alignment at all is the Universal Logit Distillation loss of Boizard et al. (2024),
    "Towards Cross-Tokenizer Distillation", which compares sorted probability vectors; the
    Bernoulli form above is our formulation, chosen because it compares the same event under
    both models. ``student_tokenizer`` and ``teacher_tokenizer`` are the folders (or GGUF
    files, or installed names) of the two tokenizers; the data is tokenised with the
    student's. Defaults: weight 1, no CE.
    """

    name = "span_kd"
    summary = ("Cross-tokenizer KD: Bernoulli KL of each shared text span's likelihood "
               "under teacher and student (word-aligned spans)")
    paper = ("Wan et al. 2024, Knowledge Fusion of LLMs (token alignment); Kim & Rush 2016, "
             "Sequence-Level KD; Boizard et al. 2024, Universal Logit Distillation")
    Params = SpanKDParams
    teacher_model = "pretrained"
    task = "lm"
    builds_teacher_source = True
    own_teacher_tokens = True
    teacher_input_change = "its own tokenization of each row's text"

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        self.tokenizers = {role: self.read(getattr(self.params, f"{role}_tokenizer"), role)
                           for role in ("student", "teacher")}

    @staticmethod
    def read(path: str, role: str) -> BlockTokenizer:
        try:
            return read_tokenizer(lm_folder(path))
        except (ValueError, OSError) as error:
            raise ValueError(f"{role}_tokenizer: {error}") from None

    def teacher_source(self, student: nn.Module,
                       teacher: nn.Module | None) -> TeacherSource | None:
        return None if teacher is None else OwnTokensTeacher(teacher, self.aligned)

    def prepare(self, batch: dict[str, Any], student: Callable[[Mapping[str, Any]], Taps],
                state: TrainState) -> dict[str, Any]:
        return self.aligned(batch)

    def aligned(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with the teacher's tokens of each row's text and the spans both models
        predict (see the class docstring)."""
        if TOKEN_MASK not in batch:
            raise ValueError(f"span_kd: the batch has no '{TOKEN_MASK}'; it distils language "
                             "models on language-modelling data (lm_text, lm_hf_dataset)")
        rows = []
        spans = 0
        for ids, mask, labels in zip(batch["input_ids"].tolist(),
                                     batch["attention_mask"].tolist(),
                                     batch["labels"].tolist(), strict=True):
            length = sum(mask)
            last = [labels[length - 1]] if labels[length - 1] != UNLABELED else []
            predicted = [label != UNLABELED for label in labels[:length]]
            row = row_spans(ids[:length] + last, predicted[:length - 1 + len(last)],
                            self.tokenizers["student"], self.tokenizers["teacher"])
            used = sorted({s for s in row.student_span if s != NO_SPAN})
            number = {s: spans + i for i, s in enumerate(used)}  # ids unique in the batch
            row.student_span = [number.get(s, NO_SPAN) for s in row.student_span]
            row.teacher_span = [number.get(s, NO_SPAN) for s in row.teacher_span]
            spans += len(used)
            rows.append(row)
        width = max(max(len(r.teacher_ids) for r in rows), 1)
        device = batch["input_ids"].device
        teacher_ids = padded([r.teacher_ids for r in rows], self.tokenizers["teacher"].pad_id,
                             width)
        return {**batch,
                TEACHER_IDS: teacher_ids.to(device),
                TEACHER_MASK: padded([[1] * len(r.teacher_ids) for r in rows], 0,
                                     width).to(device),
                TEACHER_LABELS: padded([r.teacher_ids[1:] for r in rows], UNLABELED,
                                       width).to(device),
                STUDENT_SPAN: padded([r.student_span for r in rows], NO_SPAN,
                                     batch["input_ids"].shape[1]).to(device),
                TEACHER_SPAN: padded([r.teacher_span for r in rows], NO_SPAN, width).to(device),
                SPAN_COUNT: spans}

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        if STUDENT_SPAN not in batch or teacher is None:
            raise ValueError("span_kd: the batch lacks the span alignment; the recipe's "
                             "prepare makes it (train through the engine)")
        p = self.params
        z_s = student["logits"]
        count = int(batch[SPAN_COUNT])
        log_s = span_log_likelihoods(z_s, batch["labels"], batch[STUDENT_SPAN], count)
        log_t = span_log_likelihoods(teacher["logits"], batch[TEACHER_LABELS],
                                     batch[TEACHER_SPAN], count)
        tokens = batch[TOKEN_MASK].sum().clamp_min(1)
        kd = bernoulli_kl(log_t, log_s).sum() / tokens
        terms = {"span": Term(kd, weight=p.kd_weight, unit="tokens")}
        if p.ce_weight > 0:
            terms.update(label_term(z_s, batch, weight=p.ce_weight))
        return terms
