"""What the layer-to-layer recipes of transformer encoders (``tinybert``, ``hsk``) share:
the layer map, the depth check of a model, the prediction-layer term and the split of stage
``task`` into an intermediate phase and a prediction phase."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kdistill import losses
from kdistill.recipes.base import Term
from kdistill.recipes.shared import valid_rows
from kdistill.taps import Taps, self_attention_layers


def resolve_layer_map(layer_map: Sequence[int] | None, student_layers: int,
                      teacher_layers: int) -> tuple[int, ...]:
    """g(1), ..., g(M): the teacher layer (1..N) each student layer m = 1..M learns from (the
    embeddings, layer 0, always learn from the teacher's embeddings).

    ``None`` gives the paper's uniform map g(m) = m N / M, which needs N to be a multiple of M
    (the official code asserts it); a list is taken as it is, one teacher layer per student
    layer. ``ValueError`` names the field at fault.
    """
    if layer_map is None:
        if teacher_layers % student_layers:
            raise ValueError(f"the uniform layer map g(m) = m N / M needs teacher_layers "
                             f"({teacher_layers}) to be a multiple of student_layers "
                             f"({student_layers}); give layer_map, one teacher layer per "
                             "student layer")
        step = teacher_layers // student_layers
        return tuple(m * step for m in range(1, student_layers + 1))
    if len(layer_map) != student_layers:
        raise ValueError(f"layer_map {list(layer_map)} has {len(layer_map)} entries for "
                         f"{student_layers} student layers (student_layers): give one teacher "
                         f"layer (1-{teacher_layers}) per student layer")
    outside = [g for g in layer_map if not 1 <= g <= teacher_layers]
    if outside:
        raise ValueError(f"layer_map {list(layer_map)}: teacher layer(s) {outside} outside "
                         f"1-{teacher_layers} (teacher_layers: {teacher_layers}); the "
                         "embeddings (layer 0) are always mapped to the student's embeddings")
    return tuple(layer_map)


def check_depth(recipe: str, model: nn.Module, role: str, field: str, expected: int) -> None:
    """Refuse (``ValueError``) a ``model`` without BERT-style self-attention layers, or with
    another number of them than ``expected`` (the recipe's ``field``)."""
    found = len(self_attention_layers(model))
    if not found:
        raise ValueError(f"{recipe}: the {role} ({type(model).__name__}) has no BERT-style "
                         "self-attention layers (modules with 'query' and 'key' linear "
                         f"layers); {recipe} distils transformer encoders")
    if found != expected:
        raise ValueError(f"{recipe}: {field} is {expected} but the {role} has {found} "
                         f"transformer layers; set {field}: {found}")


def prediction_term(student: Taps, teacher: Taps, batch: Mapping[str, Any],
                    temperature: float) -> dict[str, Term]:
    """The prediction layer's term, soft cross-entropy at ``temperature`` T:
    - sum_c softmax(z_t / T)_c log softmax(z_s / T)_c (unit: examples)."""
    z_s, z_t = student["logits"], teacher["logits"]
    rows, unit = valid_rows(z_s, batch)
    return {"prediction": Term(losses.soft_ce(z_s[rows], z_t[rows], temperature=temperature),
                               1.0, unit)}


def split_budget(recipe: str, epochs: int, intermediate_epochs: int | None) -> tuple[int, int]:
    """Stage ``task``'s epochs for the intermediate phase and for the prediction phase:
    ``intermediate_epochs``, by default all but the last quarter of ``epochs``."""
    if epochs < 2:
        raise ValueError(f"{recipe}: stage 'task' needs at least 2 epochs: one for the "
                         "intermediate layers and one for the prediction layer")
    first = intermediate_epochs or epochs - max(1, epochs // 4)
    if first >= epochs:
        raise ValueError(f"{recipe}: intermediate_epochs ({first}) must be smaller than "
                         f"epochs ({epochs})")
    return first, epochs - first


def refuse_task_stage(recipe: str, intermediate: str) -> None:
    """Stage ``task`` reached :meth:`Recipe.build` as one phase: say how to split it."""
    raise ValueError(f"{recipe}: stage 'task' runs as two phases (the intermediate layers, then "
                     f"the prediction layer); in a 'phases' list give a phase with stage "
                     f"'{intermediate}' and then one with stage 'prediction'")
