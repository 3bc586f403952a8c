"""How closely a student's sentence embeddings follow a teacher's, and what they are worth.

For N held-out texts with student embeddings ``s_i`` and teacher embeddings ``t_i``:

* ``similarity_spearman``: Spearman's rho between the student's and the teacher's cosine
  similarities over every pair of texts, ``rho({cos(s_i, s_j)}, {cos(t_i, t_j)})`` for
  i < j: 1 when the student orders every pair as the teacher does, whatever its space;
* ``nn10_overlap`` (NN@10): the mean over texts of ``|N_s(i) ∩ N_t(i)| / 10``, where ``N(i)``
  is the set of the 10 texts nearest to i by cosine similarity (i itself left out): 1 when
  every text keeps its teacher's neighbours;
* ``probe_accuracy``: the test accuracy of a linear probe, a logistic regression (scikit-learn,
  fixed seed) on standardised embeddings, trained on one split of labelled texts and tested on
  another; it says how much of a labelled task (sentiment, say) the embeddings keep.

Both similarity metrics use at most ``MAX_ROWS`` texts (a seeded sample of larger sets: the
pairs grow as N^2). scikit-learn and SciPy are imported in the functions that use them (they
take seconds to import and only evaluations need them).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.batch import UNLABELED

NEIGHBOURS = 10
MAX_ROWS = 2000
PROBE_TEST_FRACTION = 0.5
EMBEDDING_KEYS = ("similarity_spearman", "nn10_overlap", "probe_accuracy")


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"expected embeddings [N, D] of the same N texts, got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")


def cosine_matrix(embeddings: Tensor) -> Tensor:
    """The [N, N] cosine similarities of the rows of ``embeddings`` [N, D], in float64."""
    unit = F.normalize(embeddings.detach().double().cpu(), dim=-1)
    return unit @ unit.T


def sample_rows(count: int, limit: int = MAX_ROWS, seed: int = 0) -> Tensor:
    """The rows the similarity metrics use: all ``count`` rows, or ``limit`` of them drawn
    without replacement with ``seed`` (in increasing order)."""
    if count <= limit:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:limit].sort().values


def similarity_spearman(student: Tensor, teacher: Tensor) -> float:
    """Spearman's rho between the student's and the teacher's cosine similarities of every
    pair of rows (see the module doc); NaN for fewer than 3 rows or constant similarities."""
    _check_pair(student, teacher)
    count = student.shape[0]
    if count < 3:
        return math.nan
    upper = torch.triu_indices(count, count, offset=1)
    pairs_s = cosine_matrix(student)[upper[0], upper[1]]
    pairs_t = cosine_matrix(teacher)[upper[0], upper[1]]
    from scipy import stats  # deferred: see the module doc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(pairs_s.numpy(), pairs_t.numpy()).statistic)


def neighbour_overlap(student: Tensor, teacher: Tensor, k: int = NEIGHBOURS) -> float:
    """The mean share of each row's ``k`` nearest rows (cosine, the row itself left out) that
    the student and the teacher agree on (see the module doc); with fewer than ``k + 1`` rows,
    the ``N - 1`` others (every row then agrees: 1.0); NaN for fewer than 2 rows."""
    _check_pair(student, teacher)
    count = student.shape[0]
    if count < 2:
        return math.nan
    k = min(k, count - 1)
    eye = torch.eye(count, dtype=torch.bool)
    nearest = [cosine_matrix(x).masked_fill(eye, -math.inf).topk(k, dim=1).indices
               for x in (student, teacher)]
    shared = (nearest[0].unsqueeze(2) == nearest[1].unsqueeze(1)).any(dim=2).sum(dim=1)
    return float(shared.double().mean() / k)


def linear_probe(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor,
                 seed: int = 0) -> float:
    """Test accuracy of a logistic regression (scikit-learn's ``LogisticRegression``,
    ``random_state=seed``, L2 penalty C = 1) trained on ``train`` [N, D] with
    ``train_labels`` [N], each feature standardised by the training rows' mean and std."""
    from sklearn.linear_model import LogisticRegression  # deferred: see the module doc
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(),
                          LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train.detach().double().cpu().numpy(), train_labels.cpu().numpy())
    predicted = probe.predict(test.detach().double().cpu().numpy())
    return float((torch.as_tensor(predicted) == test_labels.cpu()).double().mean())


def probe_accuracy(embeddings: Tensor, labels: Tensor, seed: int = 0,
                   test_fraction: float = PROBE_TEST_FRACTION) -> float:
    """:func:`linear_probe` on a stratified split (``seed``) of the labelled rows (labels
    other than ``UNLABELED``): ``test_fraction`` of them tested, the rest trained on. NaN
    when the labelled rows are too few to split (each class needs two) or hold one class."""
    from sklearn.model_selection import train_test_split  # deferred: see the module doc

    known = torch.nonzero(labels != UNLABELED).flatten()
    classes, counts = labels[known].unique(return_counts=True)
    if len(classes) < 2 or int(counts.min()) < 2:
        return math.nan
    try:
        train, test = train_test_split(known.numpy(), test_size=test_fraction,
                                       random_state=seed, stratify=labels[known].numpy())
    except ValueError:  # a split too small to hold every class on both sides
        return math.nan
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    return linear_probe(embeddings[train], labels[train], embeddings[test], labels[test], seed)


def embedding_metrics(embeddings: Tensor, labels: Tensor,
                      teacher_embeddings: Tensor | None = None, seed: int = 0
                      ) -> dict[str, float]:
    """The embedding task's metrics of ``embeddings`` [N, D] (the rows of an evaluation set in
    data order): ``probe_accuracy`` on its ``labels`` [N] (:func:`probe_accuracy`) and, given
    the teacher's embeddings of the same texts, ``similarity_spearman`` and ``nn10_overlap``
    over at most :data:`MAX_ROWS` of them (:func:`sample_rows` with ``seed``)."""
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"expected embeddings [N, D] and labels [N], got embeddings "
                         f"{tuple(embeddings.shape)} and labels {tuple(labels.shape)}")
    metrics = {"probe_accuracy": probe_accuracy(embeddings, labels.long(), seed)}
    if teacher_embeddings is not None:
        _check_pair(embeddings, teacher_embeddings)
        rows = sample_rows(len(embeddings), seed=seed)
        student, teacher = embeddings[rows], teacher_embeddings[rows]
        metrics["similarity_spearman"] = similarity_spearman(student, teacher)
        metrics["nn10_overlap"] = neighbour_overlap(student, teacher)
    return metrics
