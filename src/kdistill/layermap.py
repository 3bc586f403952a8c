"""Automatic layer mapping: which teacher layer each student layer should learn from.

Layer-to-layer distillation (TinyBERT, PKD, MiniLM's hidden-state variants...) needs a map from
student layers to teacher layers; the usual choice is TinyBERT's uniform map. Here the map is
*measured*: every student hidden state is compared with every teacher hidden state on a few
hundred inputs, and the monotone map with the largest total similarity is proposed.

**Similarity: linear CKA** (Kornblith et al. 2019, "Similarity of Neural Network
Representations Revisited"). For features X [n, p] and Y [n, q] of the same n inputs, each
column centred (mean over the inputs subtracted),

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

It lies in [0, 1], compares features of different widths, is unchanged by an orthogonal
transform or an isotropic scaling of either side (not by an arbitrary linear map) and is 1 for
representations equal up to those. It is computed through the centred Gram matrices K = X X^T
and L = Y Y^T of the inputs: ||Y^T X||_F^2 = <K, L>_F and ||X^T X||_F = ||K||_F, so
CKA = <K, L>_F / (||K||_F ||L||_F), the normalised HSIC of the paper. Features that do not
vary over the inputs have no measurable similarity: their CKA is 0.

**Features: one vector per input.** A model's hidden state ``hidden.<i>`` [B, T, D] is pooled
into [B, D] by the mean over the input's real tokens (masked by the model's own attention mask:
a text model tokenises for itself, see :mod:`kdistill.models.text`). Token-by-token features
would need both models to see the same tokens; pooled per-input features compare a teacher and
a student whatever their tokenisers (and 2-D hidden states are taken as they are).

**The map** uses hidden-state indices (``hidden.0`` is the embeddings' output, ``hidden.m``
layer m's): for a student of M layers and a teacher of N, ``map`` has M + 1 entries and
student ``hidden.m`` learns from teacher ``hidden.map[m]``. ``map[0] = 0`` (embeddings to
embeddings) and ``map[1..M]`` are *distinct* teacher layers in increasing order, as in
TinyBERT's uniform map g(m) = m N / M (Jiao et al. 2020). Strictly increasing rather than
non-decreasing because a non-decreasing map may send several student layers to one teacher
layer (often the last, to which many layers are similar), leaving the teacher's intermediate
layers unused and giving different student layers the same target, which pulls them to the
same function; distinct layers keep one target per student layer, in the teacher's order.
This needs N >= M. The map maximises the sum of CKA(student m, teacher map[m]) over m by
dynamic programming in O(M N): ``best[m][n]`` (student layers 0..m placed, m on teacher n) is
``S[m][n] + max(best[m-1][k] for k < n)``, with the running maximum over k carried along n.

**The last layer is pinned: map[M] = N** (the ``proposed`` map, what ``layer_map: auto``
uses). A student that copies the teacher's prediction head, or is scored on its last layer,
needs its last layer to carry the teacher's last-layer features. Left free, the map follows
the untrained student: measured on a student built from teacher layers 3 and 6 of a 6-layer
teacher, the free map was [0, 1, 2] (CKA of the untrained student is highest with the
teacher's early layers), the copied head then read layer-2-like features, and TinyBERT's
accuracy fell from 76.0% (uniform map [0, 3, 6]) to 60.2% (docs/layermap.md). The free map
(``free``, ``layer_map: auto_free``) stays available for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from kdistill.batch import collate, to_device
from kdistill.contexts import eval_mode
from kdistill.errors import KdistillError
from kdistill.taps import TapError, masked_mean, output_hidden_states, output_mask, run_model

DEFAULT_SAMPLES = 256


class LayerMapError(KdistillError):
    """A layer map that cannot be measured or proposed for these models or inputs."""


def _centred_gram(features: Tensor) -> Tensor:
    """The Gram matrix of the column-centred ``features`` [n, p], divided by its Frobenius
    norm (all zeros when the features do not vary over the n inputs), in float64."""
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    gram = centred @ centred.T
    norm = torch.linalg.matrix_norm(gram)
    return gram / norm if norm > 0 else torch.zeros_like(gram)


def _check_features(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise LayerMapError(f"linear CKA compares features [n, p] and [n, q] of the same n "
                            f"inputs; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise LayerMapError(f"linear CKA needs at least 2 inputs (features are centred over "
                            f"them); got {x.shape[0]}")


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between features ``x`` [n, p] and ``y`` [n, q] of the same n inputs:
    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred columns (Kornblith et al. 2019).
    0 when either side does not vary over the inputs."""
    _check_features(x, y)
    return float((_centred_gram(x) * _centred_gram(y)).sum())


def _cka_between(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Linear CKA of every feature of ``student`` with every feature of ``teacher``:
    [len(student), len(teacher)], each Gram matrix computed once."""
    _check_features(student[0], teacher[0])
    left = torch.stack([_centred_gram(f).flatten() for f in student])
    right = torch.stack([_centred_gram(f).flatten() for f in teacher])
    return left @ right.T


def _pooled_states(model: nn.Module, batch: Mapping[str, Any], role: str) -> list[Tensor]:
    """Each hidden state of ``model`` on ``batch``, pooled to one vector per input (the mean
    over the input's real tokens): a list of [B, D]."""
    parameter = next(model.parameters(), None)
    if parameter is not None:
        batch = to_device(batch, parameter.device)
    output = run_model(model, batch, hidden=True)
    try:
        states = output_hidden_states(output)
    except TapError as error:
        raise LayerMapError(f"layermap: the {role} ({type(model).__name__}) gives no hidden "
                            f"states ({error}); layer mapping compares the hidden states "
                            "(hidden.<i>) of transformer-like models") from None
    mask = output_mask(output, batch)
    pooled = [state if state.dim() == 2 else masked_mean(state, mask).flatten(1)
              for state in states]
    for i, features in enumerate(pooled):
        if not torch.isfinite(features).all():
            raise LayerMapError(f"layermap: the {role}'s hidden.{i} holds non-finite values")
    return [features.float().cpu() for features in pooled]


def pooled_features(student: nn.Module, teacher: nn.Module,
                    batches: Iterable[Mapping[str, Any]]) -> tuple[list[Tensor], list[Tensor]]:
    """Per-input features of every hidden state of ``student`` and of ``teacher`` over
    ``batches`` (one pass, both models in eval mode, no gradients): two lists of [n, D]."""
    student_rows: list[list[Tensor]] = []
    teacher_rows: list[list[Tensor]] = []
    with eval_mode(student, teacher), torch.inference_mode():
        for batch in batches:
            student_rows.append(_pooled_states(student, batch, "student"))
            teacher_rows.append(_pooled_states(teacher, batch, "teacher"))
    if not student_rows:
        raise LayerMapError("layermap: no inputs to compare the models on")
    return ([torch.cat(layer) for layer in zip(*student_rows, strict=True)],
            [torch.cat(layer) for layer in zip(*teacher_rows, strict=True)])


def cka_matrix(student: nn.Module, teacher: nn.Module,
               batches: Iterable[Mapping[str, Any]]) -> Tensor:
    """Linear CKA between every student hidden state (rows, ``hidden.0`` .. ``hidden.M``) and
    every teacher hidden state (columns, ``hidden.0`` .. ``hidden.N``) on the inputs of
    ``batches``, each pooled to one vector per input: [M + 1, N + 1], float64."""
    return _cka_between(*pooled_features(student, teacher, batches))


def propose_layer_map(matrix: Tensor, pin_last: bool = True) -> list[int]:
    """The map (hidden-state indices, see the module docstring) maximising the total of
    ``matrix[m, map[m]]`` [M + 1, N + 1] among maps with ``map[0] = 0``, strictly
    increasing ``map[1..M]`` and, with ``pin_last``, ``map[M] = N`` (the student's last layer
    learns the teacher's last, whose features the prediction head reads): dynamic programming
    in O(M N). Among equal totals, the map whose choices are the earliest teacher layers."""
    rows, columns = matrix.shape
    if rows > columns:
        raise LayerMapError(
            f"layermap: the student has {rows - 1} layers and the teacher {columns - 1}; a map "
            "to distinct teacher layers in order needs a teacher at least as deep as the "
            "student")
    scores = matrix.tolist()
    best = [[-math.inf] * columns for _ in range(rows)]
    previous = [[0] * columns for _ in range(rows)]
    best[0][0] = scores[0][0]
    for m in range(1, rows):
        running, arg = -math.inf, 0
        for n in range(1, columns):
            if best[m - 1][n - 1] > running:
                running, arg = best[m - 1][n - 1], n - 1
            best[m][n] = running + scores[m][n]
            previous[m][n] = arg
    mapping = [columns - 1 if pin_last and rows > 1
               else max(range(columns), key=lambda n: best[rows - 1][n])]
    for m in range(rows - 1, 0, -1):
        mapping.append(previous[m][mapping[-1]])
    return mapping[::-1]


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's uniform map g(m) = m N / M (rounded down) for M ``student_layers`` and N
    ``teacher_layers``, in hidden-state indices: ``[0, N/M, 2N/M, ..., N]``."""
    return [m * teacher_layers // max(student_layers, 1) for m in range(student_layers + 1)]


def map_total(matrix: Tensor, mapping: Sequence[int]) -> float:
    """The total similarity of ``mapping``: the sum of ``matrix[m, mapping[m]]``."""
    return float(sum(matrix[m, n] for m, n in enumerate(mapping)))


@dataclass(frozen=True)
class LayerMap:
    """CKA between the hidden states of a student and a teacher, and the maps it suggests:
    ``proposed`` (:func:`propose_layer_map`, the last layer pinned to the teacher's: what
    ``layer_map: auto`` uses), ``free`` (the same without the pin: ``layer_map: auto_free``)
    and, for comparison, TinyBERT's ``uniform`` map, each with its total similarity;
    ``samples`` is the number of inputs measured."""

    matrix: Tensor  # [M + 1, N + 1]: student hidden.m (rows) against teacher hidden.n
    proposed: list[int]
    proposed_total: float
    free: list[int]
    free_total: float
    uniform: list[int]
    uniform_total: float
    samples: int

    @classmethod
    def from_matrix(cls, matrix: Tensor, samples: int) -> LayerMap:
        """The maps and totals of a CKA ``matrix`` measured on ``samples`` inputs."""
        proposed = propose_layer_map(matrix)
        free = propose_layer_map(matrix, pin_last=False)
        uniform = uniform_layer_map(matrix.shape[0] - 1, matrix.shape[1] - 1)
        return cls(matrix, proposed, map_total(matrix, proposed), free, map_total(matrix, free),
                   uniform, map_total(matrix, uniform), samples)

    def chosen(self, pin_last: bool) -> list[int]:
        """``proposed`` with ``pin_last``, else ``free``."""
        return self.proposed if pin_last else self.free


def compare_layers(student: nn.Module, teacher: nn.Module,
                   batches: Iterable[Mapping[str, Any]]) -> LayerMap:
    """The CKA matrix of ``student`` and ``teacher`` on ``batches`` (see :func:`cka_matrix`)
    with the proposed and the uniform maps."""
    student_features, teacher_features = pooled_features(student, teacher, batches)
    return LayerMap.from_matrix(_cka_between(student_features, teacher_features),
                                student_features[0].shape[0])


def sample_batches(data: Dataset, samples: int = DEFAULT_SAMPLES, *, batch_size: int = 32,
                   seed: int = 0) -> DataLoader:
    """Batches of ``samples`` inputs of ``data`` (all of them when it has fewer) drawn at
    random without replacement (``seed``), in their order in ``data``, collated by
    :func:`kdistill.batch.collate`."""
    if samples < 2:
        raise LayerMapError(f"layermap: samples must be at least 2 (CKA centres features over "
                            f"the inputs); got {samples}")
    try:
        count = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise LayerMapError(f"layermap: the data ({type(data).__name__}) has no length; give "
                            "a data set with samples to draw from, not a stream") from None
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(count, generator=generator)[:samples].sort().values
    return DataLoader(Subset(data, chosen.tolist()), batch_size=batch_size, collate_fn=collate)


def compare_layers_on_data(student: nn.Module, teacher: nn.Module, data: Dataset,
                           samples: int = DEFAULT_SAMPLES, *, batch_size: int = 32,
                           seed: int = 0) -> LayerMap:
    """CKA between ``student``'s and ``teacher``'s hidden states (nn.Modules: a frozen
    teacher's ``.model``) on ``samples`` inputs of ``data`` drawn with ``seed``
    (:func:`sample_batches`), with the maps it proposes (:class:`LayerMap`). Raises
    :class:`LayerMapError` (a :class:`KdistillError`) for a model without hidden states or a
    teacher shallower than the student."""
    batches = sample_batches(data, samples, batch_size=batch_size, seed=seed)
    return compare_layers(student, teacher, batches)


def auto_layer_map(student: nn.Module, teacher: nn.Module, data: Dataset,
                   samples: int = DEFAULT_SAMPLES, *, batch_size: int = 32, seed: int = 0,
                   pin_last: bool = True) -> list[int]:
    """The map of ``layer_map: auto`` (``auto_free`` without ``pin_last``), measured by
    :func:`compare_layers_on_data`: M + 1 hidden-state indices, student ``hidden.m`` learning
    from teacher ``hidden.map[m]``; ``map[0]`` is 0 (embeddings), the rest distinct increasing
    teacher layers, the last the teacher's last when ``pin_last``."""
    return compare_layers_on_data(student, teacher, data, samples, batch_size=batch_size,
                                  seed=seed).chosen(pin_last)
