"""``msd``: mixture of short-channel distillers - token classifiers on intermediate layers,
mixed by learnt weights, distilled channel by channel, with MMD alignment of the domains."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from kdistill import losses
from kdistill.batch import label_mask
from kdistill.models.channels import ChannelModel, default_channel_layers, transformer_sizes
from kdistill.recipes.adapters import make_adapter
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import valid_rows
from kdistill.schedules import TrainState
from kdistill.taps import Taps
from kdistill.teachers import TeacherSource

Stage = Literal["teacher", "student"]
DOMAIN = "domain"  # optional batch key: 0 = source domain, 1 = target domain, per sample
CLS_TAP = "hidden.-1"  # the last hidden state; its first position is the [CLS] token
# The official code's MMD weights: 1/20 while the teacher trains, 1/1000 per MMD term after.
MMD_WEIGHTS = {"teacher": 1 / 20, "student": 1 / 1000}


def target_rows(batch: Mapping[str, Any], size: int) -> Tensor:
    """Which samples of a batch of ``size`` come from the target domain: ``batch["domain"] ==
    1`` when the batch marks each sample's domain (0 source, 1 target), otherwise the samples
    without any known label (unlabelled transfer text, ``data.unlabeled``)."""
    if DOMAIN in batch:
        domain = torch.as_tensor(batch[DOMAIN]).reshape(-1)
        if len(domain) != size or not bool(((domain == 0) | (domain == 1)).all()):
            raise ValueError(f"msd: batch['{DOMAIN}'] must hold 0 (source) or 1 (target) per "
                             f"sample ({size} samples), got {domain.tolist()}")
        return domain == 1
    return ~label_mask(batch["labels"]).reshape(size, -1).any(dim=1)


def domain_mmd(source: Tensor, target: Tensor, kernels: int, multiplier: float) -> Tensor:
    """:func:`~kdistill.losses.mmd_rbf` of two feature sets, or a zero attached to the graph
    when either set is empty (a micro-batch from one domain only)."""
    if not len(source) or not len(target):
        return (source.sum() + target.sum()) * 0.0
    return losses.mmd_rbf(source, target, kernels, multiplier)


def probability_mse(student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
    """MSE(softmax(z_s), softmax(z_t)): the mean over valid words x classes of the squared
    difference of the two probability vectors (MSD's distillation loss)."""
    return losses.hidden_mse(student.float().softmax(dim=-1), teacher.float().softmax(dim=-1),
                             valid)


class MSDParams(RecipeParams):
    stage: Stage = Field(default="student", description="'teacher' trains the teacher with its "
                         "channels; 'student' distils a teacher trained so")
    channel_layers: list[PositiveInt] | None = Field(
        default=None, description="hidden states with a channel (default: layers round(L/3) "
        ".. L-1, MSD's 4-11 of 12)")
    channel_weight: float = Field(default=0.1, ge=0, description="w, the weight of the "
                                  "channel mixture")
    mmd_weight: float | None = Field(default=None, ge=0, description="weight of the MMD term "
                                     "(default 1/20 for the teacher, 1/1000 for the student)")
    kernels: PositiveInt = Field(default=5, description="RBF kernels of the MMD")
    kernel_multiplier: float = Field(default=2.0, gt=1, description="ratio of successive "
                                     "kernel bandwidths")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="dropout before the channel "
                           "classifiers")


@register
class MSD(Recipe):
    """MSD: token classifiers on intermediate layers, mixed by learnt weights, distilled.

    Ma, Chen, Gu, Ling, Guo, Liu, Chen & Liu (2022), "Wider & Closer: Mixture of Short-channel
    Distillers for Zero-shot Cross-lingual Named Entity Recognition" (EMNLP). The model (the
    teacher, then the student) becomes a :class:`~kdistill.models.channels.ChannelModel`: its
    own final classifier z^0 plus one linear classifier z^l per hidden state of
    ``channel_layers`` (K channels), each read at a word's first token. With omega in R^K
    learnt (initialised uniformly in [-1, 1], optimised with the model), a = softmax(omega),
    w = ``channel_weight``:

    stage ``teacher``, on labelled source text (per known word label y):

        L_T = CE(z^0, y) + w sum_l a_l CE(z^l, y) + lambda MMD^2(c(src), c(tgt))

    stage ``student``, on the training text (unlabelled target text, and any source text),
    with p = softmax(z), the student's channel l paired with the teacher's channel l:

        L_S = MSE(p_s^0, p_t^0) + w sum_l a_l MSE(p_s^l, p_t^l)
              + lambda [MMD^2(c_t(src), P c_s(tgt)) + MMD^2(c_t(src), P c_s(src))]

    MSE is the mean over valid words x classes (:func:`probability_mse`); c is the last
    hidden state at the first token ([CLS]), c_t the frozen teacher's; P is a learnt linear
    map from the student's width to the teacher's when they differ (identity otherwise);
    MMD^2 is :func:`~kdistill.losses.mmd_rbf` with ``kernels`` RBF kernels whose bandwidths
    are the mean pairwise distance times ``kernel_multiplier`` ^ (k - floor(K/2)). A sample's
    domain: ``batch["domain"]`` (0 source, 1 target) when the data gives it, otherwise target
    iff none of its words has a label (:func:`target_rows`); an MMD term is 0 in a micro-batch
    lacking either domain. Terms: ``ce`` (unit labeled), ``channels`` (labeled, then tokens),
    ``mmd`` (examples), ``final`` (tokens).

    Defaults, the paper's and its code's: channels on layers 4-11 of a 12-layer model
    (:func:`~kdistill.models.channels.default_channel_layers`), w = 0.1, five kernels with
    multiplier 2, lambda = 1/20 (teacher) and 1/1000 (student), dropout 0.1 before each
    channel. The teacher's recipe is this one at stage ``teacher``
    (:attr:`teacher_recipe`); the deployed student is its final classifier alone (the
    channels are dropped, :meth:`ChannelModel.export`). Our choices: docs/recipes.md.
    """

    name = "msd"
    summary = ("MSD: channel classifiers on intermediate layers mixed by learnt weights, "
               "per-channel probability MSE, multi-kernel MMD between domains")
    paper = ("Ma et al. 2022, Wider & Closer: Mixture of Short-channel Distillers for "
             "Zero-shot Cross-lingual Named Entity Recognition")
    Params = MSDParams
    teacher_recipe = ("msd", {"stage": "teacher"})
    architecture = "transformers token classifiers (hf_text, hf_student) on word lists"

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        self.uses_teacher = self.params.stage == "student"
        self.omega: nn.Parameter | None = None
        self.projection: nn.Module | None = None

    @property
    def mmd_weight(self) -> float:
        """lambda: ``mmd_weight``, or the official code's for the stage."""
        given = self.params.mmd_weight
        return MMD_WEIGHTS[self.params.stage] if given is None else given

    # -- taps and models --------------------------------------------------------------------
    def student_taps(self) -> list[str]:
        return ["heads", CLS_TAP]

    def teacher_taps(self) -> list[str]:
        return ["heads", CLS_TAP] if self.uses_teacher else []

    def wrap_student(self, student: nn.Module) -> nn.Module:
        """The model with channel classifiers (an already wrapped one is checked and kept)."""
        if isinstance(student, ChannelModel):
            wanted = self.params.channel_layers
            if wanted is not None and list(wanted) != student.layers:
                raise ValueError(f"msd: channel_layers is {list(wanted)} but the model already "
                                 f"has channels on layers {student.layers}")
            return student
        layers = self.params.channel_layers
        if layers is None:
            layers = default_channel_layers(transformer_sizes(student, "msd")[1])
        return ChannelModel(student, layers, self.params.dropout,
                            where="msd: channel_layers")

    def teacher_source(self, student: nn.Module,
                       teacher: nn.Module | None) -> TeacherSource | None:
        """The frozen teacher, once it is known to have as many channels as the student."""
        if teacher is None:
            return None
        if not isinstance(teacher, ChannelModel):
            raise ValueError(f"msd: the teacher ({type(teacher).__name__}) has no channels; "
                             "train it with recipe msd at stage 'teacher' (a config run does "
                             "so by default: teacher.train without teacher.recipe)")
        if isinstance(student, ChannelModel) and len(student.layers) != len(teacher.layers):
            raise ValueError(f"msd: channel_layers gives the student {len(student.layers)} "
                             f"channels (layers {student.layers}) but the teacher has "
                             f"{len(teacher.layers)} (layers {teacher.layers}); give "
                             f"channel_layers {len(teacher.layers)} student layers")
        return super().teacher_source(student, teacher)

    def build(self, student: Taps, teacher: Taps | None) -> None:
        heads = student["heads"]
        self.omega = nn.Parameter(torch.empty(heads.shape[0] - 1, device=heads.device)
                                  .uniform_(-1.0, 1.0))
        if teacher is not None:
            s, t = student[CLS_TAP][:, 0], teacher[CLS_TAP][:, 0]
            self.projection = nn.Identity() if s.shape == t.shape else \
                make_adapter("linear", s, t, where="msd projection")

    def mixture(self) -> Tensor:
        """a = softmax(omega), the channels' weights."""
        if self.omega is None:
            raise RuntimeError("msd: build() creates omega on the first batch")
        return self.omega.softmax(dim=0)

    # -- terms ------------------------------------------------------------------------------
    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        heads = student["heads"]
        if heads.dim() != 4:
            raise ValueError(f"msd: expected channel logits [1 + K, B, W, C] per word, got "
                             f"{tuple(heads.shape)}")
        target = target_rows(batch, heads.shape[1]).to(heads.device)
        if teacher is None:
            return self._teacher_terms(heads, student[CLS_TAP][:, 0], target, batch)
        return self._student_terms(heads, student[CLS_TAP][:, 0], teacher, target, batch)

    def _teacher_terms(self, heads: Tensor, cls: Tensor, target: Tensor,
                       batch: Mapping[str, Any]) -> dict[str, Term]:
        p, labels = self.params, batch["labels"]
        channels = torch.stack([losses.cross_entropy(z, labels) for z in heads[1:]])
        mmd = domain_mmd(cls[~target], cls[target], p.kernels, p.kernel_multiplier)
        return {"ce": Term(losses.cross_entropy(heads[0], labels), 1.0, "labeled"),
                "channels": Term(self.mixture() @ channels, p.channel_weight, "labeled"),
                "mmd": Term(mmd, self.mmd_weight, "examples")}

    def _student_terms(self, heads: Tensor, cls: Tensor, teacher: Taps, target: Tensor,
                       batch: Mapping[str, Any]) -> dict[str, Term]:
        p, teacher_heads = self.params, teacher["heads"]
        if teacher_heads.shape != heads.shape:
            raise ValueError(f"msd: the teacher's channel logits {tuple(teacher_heads.shape)} "
                             f"do not match the student's {tuple(heads.shape)}: both need the "
                             "same number of channels and classes")
        valid, _ = valid_rows(heads[0], batch)
        mse = [probability_mse(s, t, valid) for s, t in zip(heads, teacher_heads, strict=True)]
        assert self.projection is not None
        source = teacher[CLS_TAP][:, 0][~target]
        own = self.projection(cls)
        mmd = (domain_mmd(source, own[target], p.kernels, p.kernel_multiplier)
               + domain_mmd(source, own[~target], p.kernels, p.kernel_multiplier))
        return {"final": Term(mse[0], 1.0, "tokens"),
                "channels": Term(self.mixture() @ torch.stack(mse[1:]), p.channel_weight,
                                 "tokens"),
                "mmd": Term(mmd, self.mmd_weight, "examples")}
