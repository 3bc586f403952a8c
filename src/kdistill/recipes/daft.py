"""``daft``: distil an adversarially fine-tuned teacher into a student trained normally."""

from __future__ import annotations

from typing import ClassVar

from kdistill.recipes.adversarial_training import AdversarialFinetune
from kdistill.recipes.base import register
from kdistill.recipes.hinton import Hinton


@register
class DAFT(Hinton):
    """L = (1 - alpha) CE(y, z_s) + alpha T^2 KL(p_t^T || p_s^T) on clean inputs, from a teacher
    trained normally and then fine-tuned adversarially.

    Nasery, Addepalli, Netrapalli & Jain (2022), "DAFT: Distilling Adversarially Fine-tuned
    Models for Better OOD Generalization". The student's objective is Hinton KD
    (:class:`~kdistill.recipes.hinton.Hinton`: same parameters and defaults, T = 4,
    alpha = 0.9). The teacher, when a config run trains it, is trained with cross-entropy
    (:attr:`teacher_recipe`, the standard teacher, cached and shared like any) and then
    fine-tuned by :class:`~kdistill.recipes.adversarial_training.AdversarialFinetune`
    (:attr:`teacher_finetune`: ``teacher.finetune`` with its defaults, see
    :class:`kdistill.config.FinetuneConfig`). ``teacher.recipe`` (e.g. ``adversarial``, trained
    adversarially from scratch) replaces both. Judge the result
    on shifted test data (:func:`kdistill.data.shifts.shifted_evaluation`). What follows the
    paper and what is ours, with measurements: docs/recipes.md.
    """

    name = "daft"
    summary = ("KD on clean inputs from a standard teacher fine-tuned adversarially (PGD), for "
               "OOD robustness")
    paper = AdversarialFinetune.paper  # the paper whose teacher fine-tuning it is
    teacher_finetune: ClassVar[bool] = True
