"""Every recipe's terms pinned to its docstring equation (offline recipes on logits and
features; online and batch-preparing recipes are in ``test_recipe_equations_online.py`` and
``test_recipe_equations_prepared.py``).

Each test builds a recipe through the registry with non-default parameters (every parameter
that enters the equation differs from its default and from the other recipes' defaults, so a
recipe that silently uses a default is caught), feeds hand-made taps and a batch with
labelled and unlabelled rows at training states that move the schedules, and compares every
term's value, weight and unit with the equation written out in ``recipe_maths`` (plain torch,
never ``kdistill.losses``). Phase splits are checked through the terms each phase returns.
"""

from __future__ import annotations

import math

import pytest
import torch
from lm_models import tokenizer_folder
from recipe_maths import (
    ce,
    ce_rows,
    check_terms,
    d,
    hinton_kd_rows,
    kl,
    log_p,
    mean_over,
    p,
    seeded,
)

from kdistill.batch import UNLABELED
from kdistill.recipes import RECIPES, build_recipe
from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.taps import Taps

U = UNLABELED
LABELS = torch.tensor([2, U, 0, 4, U, 1])
Z_S = seeded(6, 5, seed=1, scale=2.0)
Z_T = seeded(6, 5, seed=2, scale=3.0)
LABELLED = LABELS != U

# Token logits [3, 4, 5]: padding (mask 0) holds large finite garbage, so a term that forgets
# the mask changes value; one valid token is unlabelled.
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
TOKEN_LABELS = torch.tensor([[1, 3, U, U], [0, 4, U, U], [2, U, 1, 3]])
TOK_S = torch.where(MASK.bool().unsqueeze(-1), seeded(3, 4, 5, seed=3, scale=2.0),
                    torch.tensor(9.0))
TOK_T = torch.where(MASK.bool().unsqueeze(-1), seeded(3, 4, 5, seed=4, scale=3.0),
                    seeded(3, 4, 5, seed=5, scale=20.0))
VALID = MASK.bool()

# The recipes with an equation test in these modules; a new recipe must join them.
PINNED = {
    "ce", "mse", "hinton", "oracle", "daft", "dkd", "deit", "annealing", "continuation",
    "fitnets", "composite",  # this module
    "dml", "bdkd", "okdhp", "mean_teacher", "atsen",  # test_recipe_equations_online.py
    "regression_kd", "denoise", "adversarial",  # test_recipe_equations_prepared.py
    "tinybert",  # test_recipe_tinybert.py
    "hsk",  # test_recipe_hsk.py
    "msd",  # test_recipe_msd.py
    "grain",  # test_recipe_grain.py
    "embedding_kd", "ckd",  # test_embedding_recipes.py
    "lead", "dcd",  # test_retrieval_recipes.py
    "token_kd",  # test_recipe_token_kd.py
    "gkd",  # test_recipe_gkd.py
    "seqkd",  # test_recipe_seqkd.py
    "ka",  # test_recipe_ka.py
    "span_kd",  # test_recipe_span_kd.py
}  # fmt: skip


def at(epoch: int, batch: int, steps_per_epoch: int, epochs: int) -> TrainState:
    """The engine's state for ``batch`` (0-based) of ``epoch`` in a phase of ``epochs``: the
    fractional epoch counts the step being taken."""
    return TrainState(phase=0, epoch=epoch, step=epoch * steps_per_epoch + batch,
                      epoch_progress=epoch + (batch + 1) / steps_per_epoch,
                      steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * epochs)


def logits_taps(z: torch.Tensor, mask: torch.Tensor | None = None) -> Taps:
    return Taps({"logits": z}, mask)


def test_every_registered_recipe_has_an_equation_test() -> None:
    assert set(RECIPES) == PINNED


@pytest.mark.parametrize("name", sorted(PINNED - {"fitnets", "annealing", "tinybert", "hsk"}))
def test_single_phase_recipes_keep_the_whole_budget(name: str) -> None:
    params = {"composite": {"terms": [{"loss": "ce"}]},
              "lead": {"student_layers": 3, "teacher_layers": 4},
              "span_kd": {"student_tokenizer": tokenizer_folder(),
                          "teacher_tokenizer": tokenizer_folder()}}.get(name, {})
    recipe = build_recipe(name, **params)
    assert recipe.phases(7) == [(recipe, 7)]


# ------------------------------------------------------------------------------------ ce, mse


def test_ce_is_cross_entropy_over_labelled_samples() -> None:
    recipe = build_recipe("ce")
    for state in (at(0, 0, 4, 3), at(2, 3, 4, 3)):
        terms = recipe.terms(logits_taps(Z_S), None, {"labels": LABELS}, state)
        check_terms(terms, {"ce": (ce(Z_S, LABELS), 1.0, "labeled")})


@pytest.mark.parametrize("shape", [(6,), (6, 1)])
def test_mse_is_the_squared_error_over_known_scores(shape: tuple[int, ...]) -> None:
    scores = seeded(6, seed=6).reshape(shape)
    labels = torch.tensor([0.5, float("nan"), -1.0, 2.0, float("nan"), 0.25])
    known = ~labels.isnan()
    expected = float(((d(scores).reshape(-1) - d(labels)) ** 2)[known].mean())
    terms = build_recipe("mse").terms(logits_taps(scores), None, {"labels": labels},
                                      at(1, 0, 2, 3))
    check_terms(terms, {"mse": (expected, 1.0, "labeled")})


# ----------------------------------------------------------------- hinton, oracle, daft (KD)

KD_RECIPES = [("hinton", 2.5, 0.3), ("oracle", 1.7, 0.45), ("daft", 3.2, 0.6)]


@pytest.mark.parametrize(("name", "temperature", "alpha"), KD_RECIPES)
def test_kd_terms_on_sample_logits(name: str, temperature: float, alpha: float) -> None:
    """(1 - a) CE(y, z_s) over labelled samples + a T^2 KL(p_t^T || p_s^T), KL summed over
    classes and averaged over every sample (labelled or not)."""
    recipe = build_recipe(name, temperature=temperature, alpha=alpha)
    kd = float(hinton_kd_rows(Z_S, Z_T, temperature).mean())
    for state in (at(0, 0, 4, 3), at(2, 3, 4, 3)):
        terms = recipe.terms(logits_taps(Z_S), logits_taps(Z_T), {"labels": LABELS}, state)
        check_terms(terms, {"ce": (ce(Z_S, LABELS), 1 - alpha, "labeled"),
                            "kd": (kd, alpha, "examples")})


@pytest.mark.parametrize(("name", "temperature", "alpha"), KD_RECIPES)
def test_kd_terms_on_token_logits(name: str, temperature: float, alpha: float) -> None:
    """Token logits: the KL per token averaged over the valid tokens of the attention mask,
    CE over the labelled tokens; padding never counts."""
    recipe = build_recipe(name, temperature=temperature, alpha=alpha)
    batch = {"labels": TOKEN_LABELS, "attention_mask": MASK}
    terms = recipe.terms(logits_taps(TOK_S, MASK), logits_taps(TOK_T, MASK), batch,
                         at(1, 1, 4, 3))
    kd = mean_over(hinton_kd_rows(TOK_S, TOK_T, temperature), VALID)
    check_terms(terms, {"ce": (ce(TOK_S, TOKEN_LABELS), 1 - alpha, "labeled"),
                        "kd": (kd, alpha, "tokens")})


def test_daft_student_sees_the_clean_batch_and_its_teacher_is_finetuned() -> None:
    recipe = build_recipe("daft", temperature=3.2, alpha=0.6)
    batch = {"input": seeded(6, 4, seed=7), "labels": LABELS}
    prepared = recipe.prepare(batch, lambda b: logits_taps(Z_S), at(0, 0, 4, 3))
    assert prepared.keys() == batch.keys()
    assert all(torch.equal(prepared[k], batch[k]) for k in batch)
    assert recipe.teacher_recipe == ("ce", {}) and recipe.teacher_finetune


# ---------------------------------------------------------------------------------------- dkd


def dkd_parts_by_hand(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor,
                      temperature: float) -> tuple[float, float]:
    """TCKD = T^2 KL(b_t || b_s), b = [p_g, 1 - p_g]; NCKD = T^2 KL(p^_t || p^_s), p^ the
    probabilities renormalised over the non-target classes; both averaged over the rows."""
    parts = []
    for z in (z_s, z_t):
        probs = p(z, temperature)
        p_g = probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        binary = torch.stack([p_g, 1 - p_g], dim=-1)
        rest = probs.scatter(-1, target.unsqueeze(-1), 0.0) / (1 - p_g).unsqueeze(-1)
        parts.append((binary, rest))
    (b_s, hat_s), (b_t, hat_t) = parts
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1)
    non_target = torch.ones_like(hat_t, dtype=torch.bool).scatter(-1, target.unsqueeze(-1),
                                                                  False)
    nckd = torch.where(non_target, hat_t * (hat_t.log() - hat_s.log()), 0.0).sum(-1)
    return float(temperature**2 * tckd.mean()), float(temperature**2 * nckd.mean())


DKD_PARAMS = {"alpha": 1.5, "beta": 3.0, "temperature": 2.0, "ce_weight": 0.4,
              "warmup_epochs": 3.0}


@pytest.mark.parametrize(("state", "warm"), [
    (at(0, 2, 4, 10), 0.75 / 3),   # fractional epoch 0.75 of a 3-epoch warm-up
    (at(2, 1, 5, 10), 2.4 / 3),    # 2.4
    (at(4, 3, 4, 10), 1.0),        # 5.0: past the warm-up
])
def test_dkd_terms_with_warm_up(state: TrainState, warm: float) -> None:
    """L = w_ce CE + min(e / warmup, 1) (alpha TCKD + beta NCKD); the target of an unlabelled
    sample is the teacher's argmax."""
    target = torch.where(LABELLED, LABELS, Z_T.argmax(-1))
    # the teacher's argmax must matter: it differs from the student's on an unlabelled row
    assert (Z_T.argmax(-1) != Z_S.argmax(-1))[~LABELLED].any()
    tckd, nckd = dkd_parts_by_hand(Z_S, Z_T, target, 2.0)
    terms = build_recipe("dkd", **DKD_PARAMS).terms(logits_taps(Z_S), logits_taps(Z_T),
                                                    {"labels": LABELS}, state)
    check_terms(terms, {"ce": (ce(Z_S, LABELS), 0.4, "labeled"),
                        "tckd": (tckd, warm * 1.5, "examples"),
                        "nckd": (nckd, warm * 3.0, "examples")})


def test_dkd_without_warm_up_weighs_fully_from_the_first_step() -> None:
    target = torch.where(LABELLED, LABELS, Z_T.argmax(-1))
    tckd, nckd = dkd_parts_by_hand(Z_S, Z_T, target, 2.0)
    recipe = build_recipe("dkd", **{**DKD_PARAMS, "warmup_epochs": 0.0})
    terms = recipe.terms(logits_taps(Z_S), logits_taps(Z_T), {"labels": LABELS},
                         at(0, 0, 4, 10))
    check_terms(terms, {"ce": (ce(Z_S, LABELS), 0.4, "labeled"),
                        "tckd": (tckd, 1.5, "examples"), "nckd": (nckd, 3.0, "examples")})


# --------------------------------------------------------------------------------------- deit

HEADS = torch.stack([seeded(6, 5, seed=8, scale=2.0), seeded(6, 5, seed=9, scale=2.0)])


@pytest.mark.parametrize("unlabeled", ["teacher", "skip"])
@pytest.mark.parametrize(("mode", "reduction"),
                         [("soft", "mean"), ("soft", "batchmean"), ("hard", "mean")])
def test_deit_terms(mode: str, reduction: str, unlabeled: str) -> None:
    """soft: (1 - a) CE(z_cls, y) + a T^2 KL(p_t^T || p_dist^T) (batchmean: per sample;
    mean: per sample and class); hard: (1 - a) CE(z_cls, y) + a CE(z_dist, argmax z_t).
    unlabeled=teacher: the class head's target is the teacher's argmax where the label is
    hidden and its CE averages over every sample; skip: over labelled samples only."""
    alpha, temperature = 0.35, 2.5
    recipe = build_recipe("deit", mode=mode, alpha=alpha, temperature=temperature,
                          reduction=reduction, unlabeled=unlabeled,
                          label_smoothing=0.0)  # smoothing: tests/test_recipe_deit.py
    z_cls, z_dist = HEADS
    teacher_top = Z_T.argmax(-1)
    assert (teacher_top != LABELS)[LABELLED].any()  # hard targets are not the labels
    if mode == "soft":
        kl_sum = hinton_kd_rows(z_dist, Z_T, temperature).sum()
        distill = float(kl_sum / (6 if reduction == "batchmean" else 6 * 5))
    else:
        distill = float(ce_rows(z_dist, teacher_top).mean())
    if unlabeled == "teacher":
        cls = (float(ce_rows(z_cls, torch.where(LABELLED, LABELS, teacher_top)).mean()),
               "examples")
    else:
        cls = (ce(z_cls, LABELS), "labeled")
    for state in (at(0, 0, 4, 3), at(2, 3, 4, 3)):
        terms = recipe.terms(Taps({"heads": HEADS}), logits_taps(Z_T), {"labels": LABELS},
                             state)
        check_terms(terms, {"ce": (cls[0], 1 - alpha, cls[1]),
                            "distill": (distill, alpha, "examples")})


# ---------------------------------------------------------------------------------- annealing

ANNEAL_STEPS = 3


def annealing_state(epoch: int, phase_epochs: int) -> TrainState:
    return at(epoch, 1, ANNEAL_STEPS, phase_epochs)


@pytest.mark.parametrize(("epoch", "phase_epochs", "phi"), [
    # t_max 4 over 8 epochs: T = 4, 4, 3, 3, 2, 2, 1, 1 -> phi = 1 - (T - 1) / 4
    (0, 8, 0.25), (3, 8, 0.5), (5, 8, 0.75), (7, 8, 1.0),
    # 3 epochs < t_max: T drops once per epoch and never reaches 1
    (0, 3, 0.25), (2, 3, 0.75),
    # 10 epochs: T drops every 2 epochs and stays at 1 from epoch 6 on
    (5, 10, 0.75), (6, 10, 1.0), (9, 10, 1.0),
])
def test_annealing_phase_one_regresses_on_the_scaled_teacher(epoch: int, phase_epochs: int,
                                                             phi: float) -> None:
    """mean over samples and classes of (z_s - phi(T) z_t)^2, every sample, no label."""
    recipe = build_recipe("annealing", t_max=4, phase1_epochs=3)
    terms = recipe.terms(logits_taps(Z_S), logits_taps(Z_T), {"labels": LABELS},
                         annealing_state(epoch, phase_epochs))
    expected = float(((d(Z_S) - phi * d(Z_T)) ** 2).mean())
    check_terms(terms, {"mse": (expected, 1.0, "examples")})


def test_annealing_phases_are_annealing_then_ce() -> None:
    recipe = build_recipe("annealing", t_max=4, phase1_epochs=3)
    (first, first_epochs), (second, second_epochs) = recipe.phases(8)
    assert first is recipe and (first_epochs, second_epochs) == (3, 5)
    assert first.keep_best == "agreement" and second.keep_best is None
    terms = second.terms(logits_taps(Z_S), None, {"labels": LABELS}, at(1, 0, 4, 5))
    check_terms(terms, {"ce": (ce(Z_S, LABELS), 1.0, "labeled")})
    # default phase 1: two thirds of the budget, rounded, at least 1
    assert [n for _, n in build_recipe("annealing", t_max=4).phases(8)] == [5, 3]
    assert [n for _, n in build_recipe("annealing", t_max=4).phases(2)] == [1, 1]
    with pytest.raises(ValueError, match="phase1_epochs"):
        recipe.phases(3)
    with pytest.raises(ValueError, match="at least 2 epochs"):
        build_recipe("annealing").phases(1)


# ------------------------------------------------------------------------------- continuation

# Rows 0 and 3 are small, so they sit inside the margin m phi at every state below.
CONT_S = Z_S * torch.tensor([0.05, 1, 1, 0.05, 1, 1]).unsqueeze(-1)
CONT_T = Z_T * torch.tensor([0.05, 1, 1, 0.05, 1, 1]).unsqueeze(-1)
CONT_STEPS, CONT_EPOCHS = 2, 12


def continuation_expected(phi: float, margin: float) -> float:
    distance = ((d(CONT_S) - phi * d(CONT_T)) ** 2).mean(-1)
    inside = distance < margin * phi
    assert inside.any() and not inside.all()  # the margin matters at this state
    return float((distance - margin * phi).clamp_min(0).mean())


@pytest.mark.parametrize(("epoch", "batch", "phi", "psi", "default_psi"), [
    # anneal_epochs 9, t_max 3: T drops every 3 epochs -> phi 1/3, 2/3, then 1 from epoch 6
    # (the default span, 8 epochs, would give 2/3, 1, 1 here); psi linear 0.2 -> 0.9 over the
    # first half of the phase's steps; the default psi is the share of the phase done.
    (2, 1, 1 / 3, 0.2 + 0.7 * (6 / 24) / 0.5, 6 / 24),
    (4, 0, 2 / 3, 0.2 + 0.7 * (9 / 24) / 0.5, 9 / 24),
    (10, 1, 1.0, 0.9, 22 / 24),
])
def test_continuation_terms(epoch: int, batch: int, phi: float, psi: float,
                            default_psi: float) -> None:
    """psi CE(y, z_s) + (1 - psi) mean_b max(0, d_b - m phi), d_b = mean over classes of
    (z_s - phi z_t)^2."""
    margin = 0.6
    schedule = ScheduleConfig(name="linear", start=0.2, end=0.9, length=0.5, unit="phase")
    state = at(epoch, batch, CONT_STEPS, CONT_EPOCHS)
    hinge = continuation_expected(phi, margin)
    batch_ = {"labels": LABELS}
    for psi_param, weight in ((schedule, psi), (None, default_psi)):
        params = {"t_max": 3, "anneal_epochs": 9, "margin": margin}
        if psi_param is not None:
            params["psi"] = psi_param
        terms = build_recipe("continuation", **params).terms(
            logits_taps(CONT_S), logits_taps(CONT_T), batch_, state)
        check_terms(terms, {"ce": (ce(CONT_S, LABELS), weight, "labeled"),
                            "hinge": (hinge, 1 - weight, "examples")})


def test_continuation_default_span_is_two_thirds_of_the_phase() -> None:
    """Without anneal_epochs phi anneals over 8 of the 12 epochs: T drops every 2 epochs."""
    recipe = build_recipe("continuation", t_max=3, margin=0.6)
    for epoch, phi in ((1, 1 / 3), (2, 2 / 3), (4, 1.0)):
        terms = recipe.terms(logits_taps(CONT_S), logits_taps(CONT_T), {"labels": LABELS},
                             at(epoch, 0, CONT_STEPS, CONT_EPOCHS))
        assert float(terms["hinge"].value) == pytest.approx(continuation_expected(phi, 0.6),
                                                            rel=1e-5)


# ------------------------------------------------------------------------------------ fitnets


def set_parameters(module: torch.nn.Module, *values: torch.Tensor) -> None:
    """Give ``module``'s parameters ``values``, matched by shape (names left to the recipe)."""
    params = list(module.parameters())
    assert sorted(tuple(q.shape) for q in params) == sorted(tuple(v.shape) for v in values)
    with torch.no_grad():
        for value in values:
            (target,) = [q for q in params if q.shape == value.shape]
            target.copy_(value)


def test_fitnets_hint_through_a_conv1x1_adapter() -> None:
    """hint = mean over entries of (r(f_s) - f_t)^2, r a 1x1 convolution C_s -> C_t."""
    recipe = build_recipe("fitnets", student_tap="module:body.1", teacher_tap="hidden.-2",
                          adapter="conv1x1", hint_epochs=2, temperature=2.5, alpha=0.35)
    f_s, f_t = seeded(3, 2, 2, 3, seed=10), seeded(3, 4, 2, 3, seed=11)
    student, teacher = Taps({"module:body.1": f_s}), Taps({"hidden.-2": f_t})
    recipe.build(student, teacher)
    weight, bias = seeded(4, 2, 1, 1, seed=12), seeded(4, seed=13)
    set_parameters(recipe, weight, bias)
    adapted = torch.einsum("oi,bihw->bohw", d(weight[:, :, 0, 0]), d(f_s)) \
        + d(bias).view(1, 4, 1, 1)
    expected = float(((adapted - d(f_t)) ** 2).mean())
    for state in (at(0, 0, 4, 2), at(1, 3, 4, 2)):
        check_terms(recipe.terms(student, teacher, {"labels": LABELS[:3]}, state),
                    {"hint": (expected, 1.0, "examples")})


def test_fitnets_hint_through_linear_and_identity_adapters() -> None:
    f_s, f_t = seeded(3, 4, 3, seed=14), seeded(3, 4, 5, seed=15)
    recipe = build_recipe("fitnets", student_tap="hidden.1", teacher_tap="module:enc.3",
                          hint_epochs=2, temperature=2.5, alpha=0.35)
    student, teacher = Taps({"hidden.1": f_s}), Taps({"module:enc.3": f_t})
    recipe.build(student, teacher)
    weight, bias = seeded(5, 3, seed=16), seeded(5, seed=17)
    set_parameters(recipe, weight, bias)
    expected = float(((d(f_s) @ d(weight).T + d(bias) - d(f_t)) ** 2).mean())
    check_terms(recipe.terms(student, teacher, {"labels": LABELS[:3]}, at(0, 1, 4, 2)),
                {"hint": (expected, 1.0, "examples")})

    same = seeded(3, 4, 3, seed=18)
    recipe = build_recipe("fitnets", student_tap="hidden.1", teacher_tap="module:enc.3",
                          adapter="none")
    student, teacher = Taps({"hidden.1": f_s}), Taps({"module:enc.3": same})
    recipe.build(student, teacher)
    assert not list(recipe.parameters())
    check_terms(recipe.terms(student, teacher, {"labels": LABELS[:3]}, at(0, 1, 4, 2)),
                {"hint": (float(((d(f_s) - d(same)) ** 2).mean()), 1.0, "examples")})


def test_fitnets_kd_phase_carries_its_own_temperature_and_alpha() -> None:
    recipe = build_recipe("fitnets", hint_epochs=2, temperature=2.5, alpha=0.35)
    (hint, hint_epochs), (kd, kd_epochs) = recipe.phases(7)
    assert hint is recipe and (hint_epochs, kd_epochs) == (2, 5)
    assert kd.name == "hinton"
    terms = kd.terms(logits_taps(Z_S), logits_taps(Z_T), {"labels": LABELS}, at(1, 0, 4, 5))
    check_terms(terms, {"ce": (ce(Z_S, LABELS), 0.65, "labeled"),
                        "kd": (float(hinton_kd_rows(Z_S, Z_T, 2.5).mean()), 0.35, "examples")})
    # the default hint phase is a third of the budget, at least one epoch
    assert [n for _, n in build_recipe("fitnets").phases(10)] == [3, 7]
    assert [n for _, n in build_recipe("fitnets").phases(2)] == [1, 1]
    with pytest.raises(ValueError, match="hint_epochs"):
        build_recipe("fitnets", hint_epochs=7).phases(7)
    with pytest.raises(ValueError, match="at least 2 epochs"):
        recipe.phases(1)


# ---------------------------------------------------------------------------------- composite

H_S, H_T = seeded(3, 4, 3, seed=19), seeded(3, 4, 2, seed=20)
H_S = torch.where(VALID.unsqueeze(-1), H_S, torch.tensor(7.0))  # padding garbage
COMPOSITE_TERMS = [
    {"loss": "ce", "weight": 0.3},
    {"loss": "kd", "params": {"temperature": 2.0, "reduction": "mean"},
     "weight": {"name": "linear", "start": 0.5, "end": 2.0, "length": 4, "unit": "epochs"}},
    {"loss": "kd", "params": {"temperature": 3.0},
     "weight": {"name": "step", "boundaries": [3, 6], "values": [0.0, 0.25, 1.5],
                "unit": "steps"}},
    {"loss": "dkd", "name": "decoupled", "params": {"alpha": 0.5, "beta": 2.0,
                                                     "temperature": 1.5},
     "weight": {"name": "cosine", "start": 0.0, "end": 1.0, "length": 0.5, "unit": "phase"}},
    {"loss": "hidden_mse", "name": "hint", "student": "hidden.1", "teacher": "hidden.2",
     "adapter": "linear", "weight": 0.7},
    {"loss": "forward_kl", "student": "module:lm_head", "teacher": "module:lm_head",
     "params": {"temperature": 2.0}, "weight": 0.9},
]


def cosine_ramp(fraction: float) -> float:
    return 1 - (1 + math.cos(math.pi * min(fraction, 1.0))) / 2


@pytest.mark.parametrize(("state", "weights"), [
    # (kd: 0.5 + 1.5 min(e / 4, 1), kd_2: step at steps 3 and 6, decoupled: cosine 0 -> 1
    # over the first half of the phase's steps)
    (at(0, 0, 4, 3), (0.5 + 1.5 * 0.25 / 4, 0.0, cosine_ramp((1 / 12) / 0.5))),
    (at(1, 0, 4, 3), (0.5 + 1.5 * 1.25 / 4, 0.25, cosine_ramp((5 / 12) / 0.5))),
    (at(2, 3, 4, 3), (0.5 + 1.5 * 3.0 / 4, 1.5, 1.0)),
])
def test_composite_terms(state: TrainState, weights: tuple[float, float, float]) -> None:
    """sum_k w_k(step) loss_k(a_k(s[tap_k]), t[tap_k]); duplicate names get _2; token losses
    read the taps' attention mask."""
    recipe = build_recipe("composite", terms=COMPOSITE_TERMS)
    student = Taps({"logits": Z_S, "hidden.1": H_S, "module:lm_head": TOK_S[:, :, :4]}, MASK)
    teacher = Taps({"logits": Z_T, "hidden.2": H_T, "module:lm_head": TOK_T[:, :, :4]}, MASK)
    recipe.build(student, teacher)
    weight, bias = seeded(2, 3, seed=21), seeded(2, seed=22)
    set_parameters(recipe, weight, bias)  # the hint's linear adapter is the only one

    kd_mean = float(hinton_kd_rows(Z_S, Z_T, 2.0).sum() / (6 * 5))
    kd_batchmean = float(hinton_kd_rows(Z_S, Z_T, 3.0).mean())
    target = torch.where(LABELLED, LABELS, Z_T.argmax(-1))
    tckd, nckd = dkd_parts_by_hand(Z_S, Z_T, target, 1.5)
    squared = (d(H_S) @ d(weight).T + d(bias) - d(H_T)) ** 2
    hint = float(squared[VALID].sum() / (VALID.sum() * 2))
    token_kl = kl(log_p(TOK_T[:, :, :4], 2.0), log_p(TOK_S[:, :, :4], 2.0))  # no T^2
    kd_w, kd2_w, dkd_w = weights
    terms = recipe.terms(student, teacher, {"labels": LABELS, "attention_mask": MASK}, state)
    check_terms(terms, {
        "ce": (ce(Z_S, LABELS), 0.3, "labeled"),
        "kd": (kd_mean, kd_w, "examples"),
        "kd_2": (kd_batchmean, kd2_w, "examples"),
        "decoupled": (0.5 * tckd + 2.0 * nckd, dkd_w, "examples"),
        "hint": (hint, 0.7, "tokens"),
        "forward_kl": (mean_over(token_kl, VALID), 0.9, "tokens"),
    })
