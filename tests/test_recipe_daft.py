"""PGD, the adversarial recipe and daft: perturbations stay in the epsilon ball and the valid
range and raise a trained model's loss more than random noise of the same size; the attack
runs the model in eval mode and leaves no parameter gradient; daft is Hinton KD on clean
inputs with a teacher trained normally and then fine-tuned adversarially: the fine-tuning
starts from the standard teacher's weights (cached under their own key), its terms are their
equations, and a bad ``teacher.finetune`` is an error naming the field."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill import run as kdrun
from kdistill.adversarial import pgd_perturb
from kdistill.batch import collate
from kdistill.config import (
    ConfigError,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    TeacherConfig,
    parse_config,
)
from kdistill.engine import Distiller
from kdistill.recipes.adversarial_training import (
    ATTACKED,
    CLEAN,
    Adversarial,
    AdversarialFinetune,
)
from kdistill.recipes.base import build_recipe
from kdistill.recipes.daft import DAFT
from kdistill.recipes.hinton import Hinton
from kdistill.recipes.shared import VIEW
from kdistill.schedules import TrainState
from kdistill.settings import OptimizerSettings, SchedulerSettings, TrainerSettings
from kdistill.taps import TapReader, Taps

STATE = TrainState()
EPSILON = 0.1


@pytest.fixture(scope="module")
def trained(digits) -> nn.Module:
    """A small MLP trained (plain CE, 50 full-batch steps) on 400 digits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = digits.train.inputs[:400], digits.train.labels[:400]
    for _ in range(50):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def test_pgd_stays_in_the_ball_and_raises_the_loss_more_than_noise(trained, digits) -> None:
    x, y = digits.test.inputs[:200], digits.test.labels[:200]
    torch.manual_seed(0)
    adversarial = pgd_perturb(trained, x, y, EPSILON, step_size=0.025, steps=10)
    assert adversarial.shape == x.shape and not adversarial.requires_grad
    assert (adversarial - x).abs().max() <= EPSILON + 1e-6
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    noise = (x + EPSILON * torch.randint(0, 2, x.shape).mul(2).sub(1)).clamp(0, 1)
    clean_loss = per_sample_loss(trained, x, y).mean()
    noise_loss = per_sample_loss(trained, noise, y).mean()
    attack_loss = per_sample_loss(trained, adversarial, y).mean()
    assert attack_loss > 2 * noise_loss and attack_loss > 2 * clean_loss
    assert (per_sample_loss(trained, adversarial, y) >= per_sample_loss(trained, x, y)).float() \
        .mean() > 0.95
    assert all(p.grad is None for p in trained.parameters())


def test_pgd_start_steps_and_errors() -> None:
    x = torch.rand(4, 3)
    forward = nn.Linear(3, 2)
    labels = torch.tensor([0, 1, 0, 1])
    assert torch.equal(pgd_perturb(forward, x, labels, 0.2, 0.1, 0, random_start=False), x)
    start = pgd_perturb(forward, x, labels, 0.2, 0.1, 0, random_start=True)
    assert 0 < (start - x).abs().max() <= 0.2 + 1e-6
    with pytest.raises(ValueError, match="floating point"):
        pgd_perturb(forward, torch.ones(4, 3, dtype=torch.long), labels, 0.1, 0.1, 1)
    with pytest.raises(ValueError, match="step_size > 0"):
        pgd_perturb(forward, x, labels, 0.1, 0.0, 1)


def labelled_batch(digits_subset, count: int = 16) -> dict[str, torch.Tensor]:
    data = digits_subset(count)
    return collate([data[i] for i in range(count)])


def test_attack_runs_in_eval_mode_and_leaves_no_gradient(digits_subset, make_cnn) -> None:
    model = make_cnn().train()
    modes: list[bool] = []
    model.register_forward_hook(lambda module, args, output: modes.append(module.training))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    batch = labelled_batch(digits_subset)
    recipe = Adversarial(epsilon=EPSILON, steps=3)
    torch.manual_seed(0)
    with TapReader(model, ["logits"]) as reader:
        out = recipe.prepare(batch, reader, STATE)
    assert modes == [False, False, False]  # one eval-mode forward per PGD step
    assert all(m.training for m in model.modules())  # modes restored
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())  # BN untouched
    assert (out[VIEW] == ATTACKED).all() and out["input"].shape == batch["input"].shape
    assert (out["input"] - batch["input"]).abs().max() <= EPSILON + 1e-6
    assert not torch.equal(out["input"], batch["input"])
    assert torch.equal(out["labels"], batch["labels"])


def test_adversarial_terms_read_the_perturbed_and_clean_rows(digits_subset, make_mlp) -> None:
    model = make_mlp()
    batch = labelled_batch(digits_subset, 8)
    recipe = Adversarial(epsilon=EPSILON, steps=2, clean_weight=0.25)
    torch.manual_seed(0)
    with TapReader(model, ["logits"]) as reader:
        out = recipe.prepare(batch, reader, STATE)
    assert out[VIEW].tolist() == [CLEAN] * 8 + [ATTACKED] * 8
    assert torch.equal(out["input"][:8], batch["input"])
    with torch.no_grad():
        logits = model(out["input"])
    terms = recipe.terms(Taps({"logits": logits}), None, out, STATE)
    assert terms["adversarial_ce"].value.item() == pytest.approx(
        F.cross_entropy(logits[8:], batch["labels"]).item(), rel=1e-6)
    assert terms["clean_ce"].value.item() == pytest.approx(
        F.cross_entropy(logits[:8], batch["labels"]).item(), rel=1e-6)
    assert (terms["adversarial_ce"].weight, terms["clean_ce"].weight) == (0.75, 0.25)
    assert terms["adversarial_ce"].value > terms["clean_ce"].value
    assert set(Adversarial().terms(Taps({"logits": logits[8:]}), None,
                                   {**batch, VIEW: torch.full((8,), ATTACKED)},
                                   STATE)) == {"adversarial_ce"}


def test_adversarial_training_makes_the_model_more_robust(digits, make_mlp) -> None:
    train, test = digits.train, digits.test
    robust_accuracy = {}
    for name in ("ce", "adversarial"):
        model = make_mlp(seed=0, hidden=(32,))
        recipe = build_recipe(name) if name == "ce" else Adversarial(epsilon=EPSILON, steps=3)
        Distiller(model, None, recipe, epochs=6, batch_size=64, progress=False,
                  optimizer={"lr": 0.01}).fit(train)
        model.eval()
        torch.manual_seed(1)
        attacked = pgd_perturb(model, test.inputs, test.labels, EPSILON, 0.025, 10)
        with torch.no_grad():
            robust_accuracy[name] = (model(attacked).argmax(1) == test.labels).float().mean()
    assert robust_accuracy["adversarial"] > robust_accuracy["ce"] + 0.1


def test_daft_is_hinton_kd_on_clean_inputs_with_a_finetuned_teacher(digits_subset,
                                                                    make_mlp) -> None:
    assert DAFT.teacher_recipe == ("ce", {}) and DAFT.teacher_finetune
    assert not Hinton.teacher_finetune
    batch = labelled_batch(digits_subset, 8)
    daft, hinton = DAFT(temperature=3.0, alpha=0.7), Hinton(temperature=3.0, alpha=0.7)
    assert daft.prepare(batch, make_mlp(), STATE) is batch  # the student sees clean inputs
    student, teacher = make_mlp(seed=1), make_mlp(seed=2)
    with torch.no_grad():
        s, t = Taps({"logits": student(batch["input"])}), Taps({"logits": teacher(batch["input"])})
    ours, reference = daft.terms(s, t, batch, STATE), hinton.terms(s, t, batch, STATE)
    assert set(ours) == set(reference) == {"ce", "kd"}
    for key in ours:
        assert torch.equal(ours[key].value, reference[key].value)
        assert ours[key].weight == reference[key].weight


# -- DAFT's adversarial fine-tuning of the teacher ---------------------------------------------
FEATURES = "module:features"


def finetune_step(recipe: AdversarialFinetune, model: nn.Module, standard: nn.Module,
                  batch: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor,
                                                 torch.Tensor, dict[str, Any]]:
    """The prepared batch, the model's logits and features and the standard model's features
    on it (computed here, not through taps), and the recipe's terms."""
    torch.manual_seed(0)
    with TapReader(model, ["logits"]) as reader:
        out = recipe.prepare(batch, reader, STATE)
    with torch.no_grad():
        features, reference = model.features(out["input"]), standard.features(out["input"])
        logits = model.head(features)
    terms = recipe.terms(Taps({"logits": logits, FEATURES: features}),
                         Taps({FEATURES: reference}), out, STATE)
    return out, logits, features, reference, terms


def test_finetune_terms_are_their_equations(digits_subset, make_mlp) -> None:
    """L = (1 - w) CE(y, f(x_adv)) + w CE(y, f(x)) + lambda mean (h(x) - h_0(x))^2, the anchor
    on the clean rows only; every parameter away from its default."""
    model, standard = make_mlp(seed=1), make_mlp(seed=2)
    batch = labelled_batch(digits_subset, 8)
    recipe = AdversarialFinetune(epsilon=0.2, step_size=0.05, steps=2, clean_weight=0.3,
                                 anchor_weight=2.5, anchor_tap=FEATURES)
    assert recipe.student_taps() == ["logits", FEATURES] and recipe.teacher_taps() == [FEATURES]
    out, logits, features, reference, terms = finetune_step(recipe, model, standard, batch)
    assert out[VIEW].tolist() == [CLEAN] * 8 + [ATTACKED] * 8
    assert torch.equal(out["input"][:8], batch["input"])
    shift = (out["input"][8:] - batch["input"]).abs()
    assert shift.max() <= 0.2 + 1e-6 and shift.max() > 0.05  # two steps of 0.05 and the start
    labels = batch["labels"]
    expected = {"adversarial_ce": (F.cross_entropy(logits[8:], labels), 0.7, "labeled"),
                "clean_ce": (F.cross_entropy(logits[:8], labels), 0.3, "labeled"),
                "anchor": ((features[:8] - reference[:8]).pow(2).mean(), 2.5, "examples")}
    assert set(terms) == set(expected)
    for name, (value, weight, unit) in expected.items():
        assert terms[name].value.item() == pytest.approx(value.item(), rel=1e-6), name
        assert (terms[name].weight, terms[name].unit) == (pytest.approx(weight), unit), name
    all_rows = (features - reference).pow(2).mean()
    assert terms["anchor"].value.item() != pytest.approx(all_rows.item(), rel=1e-3)


def test_finetune_keeps_the_clean_rows_for_the_anchor_without_clean_loss(digits_subset,
                                                                       make_mlp) -> None:
    model, standard = make_mlp(seed=1), make_mlp(seed=2)
    batch = labelled_batch(digits_subset, 6)
    recipe = AdversarialFinetune(clean_weight=0.0, anchor_weight=0.0, steps=1)
    out, logits, features, reference, terms = finetune_step(recipe, model, standard, batch)
    assert out[VIEW].tolist() == [CLEAN] * 6 + [ATTACKED] * 6
    assert set(terms) == {"adversarial_ce", "anchor"}  # the drift is logged even unweighted
    assert (terms["adversarial_ce"].weight, terms["anchor"].weight) == (1.0, 0.0)
    assert terms["anchor"].value.item() == pytest.approx(
        (features[:6] - reference[:6]).pow(2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs the standard-trained model as its teacher"):
        recipe.terms(Taps({"logits": logits, FEATURES: features}), None, out, STATE)


def test_finetune_settings_scale_the_teachers_learning_rate() -> None:
    train = TrainerSettings(epochs=20, batch_size=32, seed=3,
                            optimizer=OptimizerSettings(lr=0.02, weight_decay=1e-4),
                            scheduler=SchedulerSettings(name="cosine"))
    tuned = FinetuneConfig(epochs=4, lr_factor=0.25).settings(train)
    assert (tuned.epochs, tuned.optimizer.lr) == (4, pytest.approx(0.005))
    assert tuned.model_dump(exclude={"epochs", "optimizer"}) == train.model_dump(
        exclude={"epochs", "optimizer"})
    assert tuned.optimizer.weight_decay == 1e-4 and train.optimizer.lr == 0.02
    objective = FinetuneConfig(epsilon=0.3, steps=2, clean_weight=0.2, anchor_weight=4.0,
                               epochs=4).objective()
    assert isinstance(objective, AdversarialFinetune)
    assert objective.params.model_dump() == {
        "epsilon": 0.3, "step_size": None, "steps": 2, "random_start": True,
        "clean_weight": 0.2, "value_range": (0.0, 1.0), "anchor_weight": 4.0,
        "anchor_tap": FEATURES}


DIGITS = DataConfig(name="digits")
SMALL_TEACHER = TeacherConfig(model=ModelConfig(name="mlp", options={"hidden": [16]}),
                              train=TrainerSettings(epochs=1, optimizer=OptimizerSettings(lr=0.01),
                                                    progress=False))


def test_daft_teacher_is_the_standard_one_then_finetuned() -> None:
    """Which fine-tuning a config run uses (daft's default, an explicit one, none with a
    teacher recipe) and that each has its own cache key, the standard teacher's unchanged."""
    tuned = FinetuneConfig(epochs=2)
    explicit = SMALL_TEACHER.model_copy(update={"finetune": tuned})
    scratch = SMALL_TEACHER.model_copy(update={"recipe": {"name": "adversarial"}})
    assert kdrun.teacher_finetuning(SMALL_TEACHER, DAFT()) == FinetuneConfig()
    assert kdrun.teacher_training(SMALL_TEACHER, DAFT()) == {"name": "ce"}
    assert kdrun.teacher_finetuning(explicit, DAFT()) is tuned
    assert kdrun.teacher_finetuning(scratch, DAFT()) is None
    assert kdrun.teacher_finetuning(SMALL_TEACHER, Hinton()) is None
    assert kdrun.teacher_finetuning(explicit, Hinton()) is tuned
    loaded = TeacherConfig(model=SMALL_TEACHER.model, checkpoint="teacher.safetensors")
    assert kdrun.teacher_finetuning(loaded, DAFT()) is None  # used as it is
    standard = kdrun.teacher_key(SMALL_TEACHER, DIGITS)
    assert kdrun.teacher_key(SMALL_TEACHER, DIGITS, {"name": "ce"}, None) == standard
    keys = {kdrun.teacher_key(SMALL_TEACHER, DIGITS, {"name": "ce"}, finetune)
            for finetune in (FinetuneConfig(), tuned, FinetuneConfig(anchor_weight=0.0))}
    assert len(keys) == 3 and standard not in keys


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_finetuned_teacher_starts_from_the_standard_teacher(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path, digits) -> None:
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path))
    finetune = FinetuneConfig(epochs=1, lr_factor=0.5, steps=1, anchor_weight=0.5)
    standard, info = kdrun.obtain_teacher(SMALL_TEACHER, DIGITS, digits, progress=False)
    started: dict[str, torch.Tensor] = {}
    finetune_teacher = kdrun.finetune_teacher

    def spy(model: nn.Module, *args: Any) -> None:
        started.update(snapshot(model))
        finetune_teacher(model, *args)

    monkeypatch.setattr(kdrun, "finetune_teacher", spy)
    tuned, tuned_info = kdrun.obtain_teacher(SMALL_TEACHER, DIGITS, digits, progress=False,
                                             finetune=finetune)
    key = kdrun.teacher_key(SMALL_TEACHER, DIGITS, None, finetune)
    assert tuned_info == {"source": str(tmp_path / "teachers" / f"{key}.safetensors"),
                          "cached": False, "finetuned_from": info["source"]}
    weights = snapshot(standard)
    assert started.keys() == weights.keys()
    assert all(torch.equal(started[k], weights[k]) for k in weights)  # starts as the standard
    changed = snapshot(tuned)
    assert all(p.requires_grad for p in tuned.parameters())
    assert all(not torch.equal(changed[k], weights[k]) for k in weights)  # every tensor moved
    assert max((changed[k] - weights[k]).abs().max().item() for k in weights) < 0.5
    again, again_info = kdrun.obtain_teacher(SMALL_TEACHER, DIGITS, digits, progress=False,
                                             finetune=finetune)
    assert again_info == {"source": tuned_info["source"], "cached": True}
    assert all(torch.equal(v, changed[k]) for k, v in snapshot(again).items())
    unchanged, standard_info = kdrun.obtain_teacher(SMALL_TEACHER, DIGITS, digits,
                                                    progress=False)
    assert standard_info == {"source": info["source"], "cached": True}
    assert all(torch.equal(v, weights[k]) for k, v in snapshot(unchanged).items())


def daft_config(**finetune: Any) -> dict[str, Any]:
    return {"name": "unit", "data": {"name": "digits", "labeled": 100},
            "student": {"name": "mlp", "size": "tiny"},
            "teacher": {"model": {"name": "cnn", "size": "tiny"},
                        "train": {"epochs": 2, "optimizer": {"lr": 0.01}},
                        "finetune": finetune},
            "recipe": {"name": "daft"}, "trainer": {"epochs": 2}}


@pytest.mark.parametrize(("finetune", "problem"), [
    ({"anchor_weight": -1}, "teacher.finetune.anchor_weight: Input should be greater than or "
                            "equal to 0 (got -1)"),
    ({"lr_factor": 2}, "teacher.finetune.lr_factor: Input should be less than or equal to 1 "
                       "(got 2)"),
    ({"epochs": 1.5}, "teacher.finetune.epochs: Input should be a valid integer (got 1.5)"),
    ({"epsilom": 0.1}, "teacher.finetune.epsilom: unknown key 'epsilom'; did you mean "
                       "'epsilon', 'steps' or 'step_size'?"),
    ({"anchor_tap": "module:"}, "teacher.finetune.anchor_tap: "),
])
def test_bad_finetune_config_names_the_field(finetune: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(daft_config(**finetune), "cfg.yaml")
    assert f"cfg.yaml: {problem}" in str(caught.value)


def test_finetune_needs_a_trained_teacher(tmp_path: Path) -> None:
    raw = daft_config(epochs=2)
    del raw["teacher"]["train"]
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"")
    raw["teacher"]["checkpoint"] = str(weights)
    with pytest.raises(ConfigError, match="teacher: 'finetune' fine-tunes the teacher that "
                                          "'train' trains and needs 'train'"):
        parse_config(raw, "cfg.yaml")


def test_finetune_problems_are_found_before_any_training(make_mlp) -> None:
    """A missing anchor module or inputs PGD cannot perturb fail before the teacher trains;
    ``kdistill check`` tries a step of the fine-tuning."""
    config = parse_config(daft_config(anchor_tap="module:blocks.9"))
    with pytest.raises(ConfigError, match=r"^teacher\.finetune\.anchor_tap: .*blocks\.9"):
        kdrun.preflight(config)
    kdrun.preflight(parse_config(daft_config(steps=1)))  # the trial of the fine-tuning runs
    tokens = SimpleNamespace(name="tokens", train=SimpleNamespace(
        inputs=torch.ones(4, 64, dtype=torch.long)))
    with pytest.raises(ConfigError) as caught:
        kdrun.check_finetune(FinetuneConfig(), make_mlp(), tokens)  # type: ignore[arg-type]
    assert str(caught.value) == ("teacher.finetune: adversarial fine-tuning perturbs float "
                                 "inputs (images, feature vectors); data set 'tokens' has none")


def test_adversarial_rejects_bad_parameters_and_token_inputs(make_mlp) -> None:
    with pytest.raises(ValueError, match="epsilon"):
        Adversarial(epsilon=0.0)
    with pytest.raises(ValueError, match="steps"):
        Adversarial(steps=0)
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.zeros(2).long()}
    with pytest.raises(ValueError, match=r"float inputs in batch\['input'\]"):
        Adversarial().prepare(batch, TapReader(make_mlp(), ["logits"]), STATE)
