"""``dml``: deep mutual learning, k peers (the student among them) that teach each other."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from kdistill import losses
from kdistill.models.fresh import reinitialised
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import distinct_from
from kdistill.schedules import TrainState
from kdistill.taps import Taps
from kdistill.teachers import PeerTeacher, TeacherSource


class MutualParams(RecipeParams):
    peers: int = Field(default=2, ge=2, description="k: the student plus k - 1 peer models")
    temperature: float = Field(default=1.0, gt=0)


def peer_name(index: int, term: str) -> str:
    """Log name of a peer's term: the student (index 0) keeps the plain name (``ce``, ``kl``),
    peer i >= 1 gets ``peer<i>_<term>``."""
    return term if index == 0 else f"peer{index}_{term}"


def mutual_terms(logits: Sequence[torch.Tensor], labels: torch.Tensor,
                 temperature: float = 1.0) -> dict[str, Term]:
    """The DML terms of k >= 2 peers' logits ``[B, C]`` (index 0 the student).

    For peer i: ``ce`` = CE(y, z_i) over labelled samples, and
    ``kl`` = 1/(k-1) sum_{j != i} T^2 KL(p_j^T || p_i^T) over all samples, with p_j detached,
    so each KL term only trains peer i. Summing every term (all weights 1) gives
    L = sum_i (CE_i + KL_i), whose single backward trains every peer on its own loss.
    """
    if len(logits) < 2:
        raise ValueError(f"mutual learning needs at least 2 peers' logits, got {len(logits)}")
    for i, z in enumerate(logits):
        if z.dim() != 2:
            raise ValueError(f"dml: peer {i}'s logits have shape {tuple(z.shape)}; expected "
                             "[batch, classes] (per-token logits are not supported)")
    k = len(logits)
    detached = [z.detach() for z in logits]
    terms: dict[str, Term] = {}
    for i, z in enumerate(logits):
        kl = sum(losses.kd(z, detached[j], temperature) for j in range(k) if j != i)
        terms[peer_name(i, "ce")] = Term(losses.cross_entropy(z, labels), unit="labeled")
        terms[peer_name(i, "kl")] = Term(kl / (k - 1))
    return terms


@register
class DeepMutualLearning(Recipe):
    """Deep mutual learning: k peers train together, each on CE plus KL to the others.

    Zhang, Xiang, Hospedales & Lu (2018), "Deep Mutual Learning". With peers z_0 (the student),
    z_1 .. z_{k-1}::

        L_i = CE(y, z_i) + 1/(k-1) sum_{j != i} T^2 KL(p_j^T || p_i^T)      (p_j detached)
        L   = sum_i L_i

    trained on labelled samples only (``uses_unlabeled = False``), all k by one backward and
    one optimizer step. Peers (``teacher_model = "fresh"``): peer 1 is the untrained teacher
    model of a config run (re-drawn if it copies the student exactly, see
    :func:`~kdistill.recipes.shared.distinct_from`), peers 2 .. k-1 re-initialised copies of it
    (:func:`reinitialised`); without a teacher model every peer is a re-initialised copy of the
    student. Terms per peer: ``ce``, ``kl`` (the student), ``peer<i>_ce``, ``peer<i>_kl``.
    Defaults k = 2, T = 1 (the paper's plain softmax). Our choices and measurements:
    docs/recipes.md.
    """

    name = "dml"
    summary = "Deep mutual learning: k peers, each CE + mean KL to the other peers"
    paper = "Zhang, Xiang, Hospedales, Lu 2018, Deep Mutual Learning"
    Params = MutualParams
    teacher_model = "fresh"
    uses_unlabeled = False

    def teacher_source(self, student: nn.Module,
                       teacher: nn.Module | None) -> TeacherSource | None:
        count = self.params.peers - 1
        first = distinct_from(student, teacher) if teacher is not None \
            else reinitialised(student)
        return PeerTeacher([first, *(reinitialised(first) for _ in range(count - 1))])

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        members = teacher.members if teacher is not None else ()
        if len(members) != self.params.peers - 1:
            raise ValueError(f"dml: peers={self.params.peers} needs {self.params.peers - 1} "
                             f"trainable peer model(s) from the teacher source, got "
                             f"{len(members)} (use a PeerTeacher, see teacher_source)")
        logits = [student["logits"], *(m["logits"] for m in members)]
        return mutual_terms(logits, batch["labels"], self.params.temperature)
