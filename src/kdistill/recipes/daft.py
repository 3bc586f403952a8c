"""``daft``: distil an adversarially trained teacher into a student trained normally."""

from __future__ import annotations

from typing import Any, ClassVar

from kdistill.recipes.base import register
from kdistill.recipes.hinton import Hinton


@register
class DAFT(Hinton):
    """L = (1 - alpha) CE(y, z_s) + alpha T^2 KL(p_t^T || p_s^T) on clean inputs, from a teacher
    trained adversarially.

    Nasery, Addepalli, Netrapalli & Jain (2022), "DAFT: Distilling Adversarially Fine-tuned
    Models for Better OOD Generalization". The student's objective is Hinton KD
    (:class:`~kdistill.recipes.hinton.Hinton`: same parameters and defaults, T = 4,
    alpha = 0.9). The teacher is trained by the ``adversarial`` recipe (:attr:`teacher_recipe`:
    PGD in an L-inf ball of 0.1 on [0, 1] inputs, 5 steps, ``clean_weight`` 0.5) when a config
    run trains it. Judge the result on shifted test data
    (:func:`kdistill.data.shifts.shifted_evaluation`). Our choices and measurements:
    docs/recipes.md.
    """

    name = "daft"
    summary = "KD on clean inputs from an adversarially (PGD) trained teacher, for OOD robustness"
    paper = ("Nasery, Addepalli, Netrapalli, Jain 2022, DAFT: Distilling Adversarially "
             "Fine-tuned Models for Better OOD Generalization")
    teacher_recipe: ClassVar[tuple[str, dict[str, Any]]] = (
        "adversarial", {"epsilon": 0.1, "steps": 5, "clean_weight": 0.5})
