"""``adversarial``: adversarial training of a model on PGD perturbations of its own inputs; and
:class:`AdversarialFinetune`, DAFT's adversarial fine-tuning of a standard-trained model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import Field
from torch import Tensor, nn

from kdistill import losses
from kdistill.adversarial import pgd_perturb
from kdistill.contexts import eval_mode
from kdistill.recipes.base import Recipe, RecipeParams, TapName, Term, ValueRange, register
from kdistill.recipes.shared import ORIGINAL, row_views, stack_views
from kdistill.schedules import TrainState
from kdistill.taps import Taps

# The views Adversarial.prepare stacks (batch[VIEW]): the clean rows (when a term reads them,
# Adversarial.keeps_clean_rows) and their perturbed copies.
CLEAN, ATTACKED = ORIGINAL, 1


class AdversarialParams(RecipeParams):
    epsilon: float = Field(default=0.1, gt=0)
    step_size: float | None = Field(default=None, gt=0)
    steps: int = Field(default=5, ge=1)
    random_start: bool = True
    clean_weight: float = Field(default=0.0, ge=0, le=1)
    value_range: ValueRange | None = (0.0, 1.0)

    @property
    def alpha(self) -> float:
        """The PGD step: ``step_size``, by default 2.5 epsilon / steps (Madry et al.)."""
        return self.step_size if self.step_size is not None else 2.5 * self.epsilon / self.steps


@register
class Adversarial(Recipe):
    """L = (1 - w) CE(y, f(x_adv)) + w CE(y, f(x)), x_adv = PGD(f, x, y) in an L-inf ball.

    Madry, Makelov, Schmidt, Tsipras & Vladu (2018), "Towards Deep Learning Models Resistant to
    Adversarial Attacks". No teacher: this trains a model (for instance the teacher of ``daft``)
    to be robust, on labelled samples only. :meth:`prepare` attacks the model being trained
    with ``steps`` steps of PGD (:func:`kdistill.adversarial.pgd_perturb`, cross-entropy
    against the labels, the model in eval mode) inside ``||x_adv - x||_inf <= epsilon`` and the
    valid ``value_range``; with w > 0 the batch holds the clean rows and their perturbed copies
    (views ``CLEAN`` and ``ATTACKED``), as in Goodfellow, Shlens & Szegedy (2015) with w = 0.5.
    The inputs must be float (``batch["input"]``).

    Defaults: ``epsilon`` = 0.1, ``steps`` = 5, step 2.5 epsilon / steps (``step_size``),
    random start, ``clean_weight`` w = 0 (Madry's objective), ``value_range`` = (0, 1). Our
    choices and measurements: docs/recipes.md.
    """

    name = "adversarial"
    summary = "Adversarial training: CE on PGD (L-inf) perturbations made with the model itself"
    paper = ("Madry, Makelov, Schmidt, Tsipras, Vladu 2018, Towards Deep Learning Models "
             "Resistant to Adversarial Attacks")
    Params = AdversarialParams
    uses_teacher = False
    uses_unlabeled = False

    def prepare(self, batch: dict[str, Any], student: Callable[[Mapping[str, Any]], Taps],
                state: TrainState) -> dict[str, Any]:
        """The batch with PGD-perturbed inputs (after the clean rows when ``clean_weight``)."""
        p = self.params
        inputs = batch.get("input")
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            raise ValueError(f"adversarial: needs float inputs in batch['input'] to perturb; "
                             f"batch keys: {sorted(batch)}")
        model = getattr(student, "model", None)
        if not isinstance(model, nn.Module):
            raise TypeError("adversarial: prepare() needs the student's tap reader (with its "
                            f"model as .model), got {type(student).__name__}")

        def forward(x: Tensor) -> Tensor:
            return student({**batch, "input": x})["logits"]

        with eval_mode(model):
            perturbed = pgd_perturb(forward, inputs, batch["labels"], p.epsilon, p.alpha,
                                    p.steps, random_start=p.random_start,
                                    value_range=p.value_range)
        attacked = {**batch, "input": perturbed}
        if not self.keeps_clean_rows():
            return stack_views({ATTACKED: attacked})
        return stack_views({CLEAN: batch, ATTACKED: attacked})

    def keeps_clean_rows(self) -> bool:
        """Whether :meth:`prepare` keeps the clean rows before the perturbed ones (view
        ``CLEAN``): when a term reads them, here the clean cross-entropy (w > 0)."""
        return self.params.clean_weight > 0

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        views = row_views(batch, self.name)
        attacked, clean = views == ATTACKED, views == CLEAN
        logits, labels = student["logits"], batch["labels"]
        terms = {"adversarial_ce": Term(losses.cross_entropy(logits[attacked], labels[attacked]),
                                        weight=1 - p.clean_weight, unit="labeled")}
        if p.clean_weight > 0:
            terms["clean_ce"] = Term(losses.cross_entropy(logits[clean], labels[clean]),
                                     weight=p.clean_weight, unit="labeled")
        return terms


class AdversarialFinetuneParams(AdversarialParams):
    clean_weight: float = Field(default=0.5, ge=0, le=1)
    anchor_weight: float = Field(default=1.0, ge=0)
    anchor_tap: TapName = "module:features"


class AdversarialFinetune(Adversarial):
    """L = (1 - w) CE(y, f(x_adv)) + w CE(y, f(x)) + lambda ||h(x) - h_0(x)||^2, x_adv = PGD.

    DAFT's teacher fine-tuning (Nasery et al. 2022): the model f starts from a standard-trained
    model f_0 (the frozen teacher source of this objective) and trains on PGD perturbations
    made with itself, as :class:`~kdistill.recipes.adversarial_training.Adversarial` (same
    attack parameters), plus the clean cross-entropy with weight w (``clean_weight``,
    default 0.5) and an anchor that keeps its features h (``anchor_tap``, default
    ``module:features``, the penultimate features) near those of the standard model on the
    clean inputs: lambda (``anchor_weight``, default 1) times their mean squared difference
    over samples and feature entries (:func:`kdistill.losses.hidden_mse`). The anchor is always
    computed (logged as ``anchor``, the features' drift), weighted by lambda (0 turns it off).
    The standard model reads the whole prepared batch, the anchor its clean rows.

    Not registered as a recipe: it only fine-tunes a teacher (``teacher.finetune``), with the
    standard model as its own teacher. The anchor and w are our reading of the paper's
    "features learnt by standard training, combined by adversarial training"; docs/recipes.md.
    """

    name = "daft_finetune"
    summary = "Adversarial fine-tuning of a standard-trained model, features anchored to it"
    paper = ("Nasery, Addepalli, Netrapalli, Jain 2022, DAFT: Distilling Adversarially "
             "Fine-tuned Models for Better OOD Generalization")
    Params = AdversarialFinetuneParams
    uses_teacher = True

    def student_taps(self) -> list[str]:
        return ["logits", self.params.anchor_tap]

    def teacher_taps(self) -> list[str]:
        return [self.params.anchor_tap]

    def keeps_clean_rows(self) -> bool:
        return True  # the anchor reads them

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        if teacher is None:
            raise ValueError(f"{self.name}: needs the standard-trained model as its teacher "
                             "(the features it anchors to)")
        tap = self.params.anchor_tap
        clean = row_views(batch, self.name) == CLEAN
        anchor = losses.hidden_mse(student[tap][clean], teacher[tap][clean])
        return {**super().terms(student, teacher, batch, state),
                "anchor": Term(anchor, weight=self.params.anchor_weight)}
