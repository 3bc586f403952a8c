"""PGD, the adversarial recipe and daft: perturbations stay in the epsilon ball and the valid
range and raise a trained model's loss more than random noise of the same size; the attack
runs the model in eval mode and leaves no parameter gradient; daft is Hinton KD on clean
inputs with an adversarially trained teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.adversarial import pgd_perturb
from kdistill.batch import collate
from kdistill.engine import Distiller
from kdistill.recipes.adversarial_training import ATTACKED, CLEAN, Adversarial
from kdistill.recipes.base import build_recipe, get_recipe
from kdistill.recipes.daft import DAFT
from kdistill.recipes.hinton import Hinton
from kdistill.recipes.shared import VIEW
from kdistill.schedules import TrainState
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


def test_daft_is_hinton_kd_on_clean_inputs_with_an_adversarial_teacher(digits_subset,
                                                                       make_mlp) -> None:
    name, params = DAFT.teacher_recipe
    teacher_recipe = build_recipe(name, **params)
    assert isinstance(teacher_recipe, get_recipe("adversarial"))
    assert teacher_recipe.params.epsilon > 0 and not teacher_recipe.uses_teacher
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


def test_adversarial_rejects_bad_parameters_and_token_inputs(make_mlp) -> None:
    with pytest.raises(ValueError, match="epsilon"):
        Adversarial(epsilon=0.0)
    with pytest.raises(ValueError, match="steps"):
        Adversarial(steps=0)
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.zeros(2).long()}
    with pytest.raises(ValueError, match=r"float inputs in batch\['input'\]"):
        Adversarial().prepare(batch, TapReader(make_mlp(), ["logits"]), STATE)
