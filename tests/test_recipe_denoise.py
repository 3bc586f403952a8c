"""denoise: prepare builds clean + two identical augmented copies; the soft term learns the
teacher's outputs on the augmented inputs (never their labels); the consistency term is zero
without dropout and positive with it; CE reads the clean rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.batch import collate
from kdistill.engine import Distiller
from kdistill.recipes.adversarial_training import Adversarial
from kdistill.recipes.denoise import Denoise
from kdistill.recipes.shared import VIEW
from kdistill.schedules import TrainState
from kdistill.taps import TapReader, Taps

STATE = TrainState()


def digits_batch(digits_subset, count: int = 12) -> dict[str, torch.Tensor]:
    data = digits_subset(count)
    return collate([data[i] for i in range(count)])


def prepared(recipe: Denoise, batch: dict, student: nn.Module, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    with TapReader(student, ["logits"]) as reader:
        return recipe.prepare(batch, reader, STATE)


def kl_rows(target_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(softmax(target / t) || softmax(student / t)) per row, written out."""
    p = F.softmax(target_logits / t, dim=-1)
    return (p * (p.log() - F.log_softmax(student_logits / t, dim=-1))).sum(-1)


def test_prepare_gives_clean_rows_and_two_identical_augmented_copies(digits_subset,
                                                                     make_mlp) -> None:
    batch = digits_batch(digits_subset)
    out = prepared(Denoise(), batch, make_mlp())
    rows = len(batch["index"])
    assert out[VIEW].tolist() == [0] * rows + [1] * rows + [2] * rows
    assert out["input"].shape == (3 * rows, 1, 8, 8)
    assert torch.equal(out["input"][:rows], batch["input"])
    first, second = out["input"][rows:2 * rows], out["input"][2 * rows:]
    assert torch.equal(first, second)
    assert not torch.equal(first, batch["input"])
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(out["labels"][:rows], batch["labels"])
    assert (out["labels"][rows:] == -100).all()  # augmented rows carry no hard label
    assert torch.equal(out["index"], batch["index"].repeat(3))


def test_soft_term_uses_teacher_outputs_on_augmented_inputs_not_labels(digits_subset,
                                                                       make_mlp) -> None:
    recipe = Denoise(temperature=2.0)
    student, teacher = make_mlp(seed=1), make_mlp(seed=2, hidden=(32,))
    out = prepared(recipe, digits_batch(digits_subset), student)
    with torch.no_grad():
        s = Taps({"logits": student(out["input"])})
        t = Taps({"logits": teacher(out["input"])})
    terms = recipe.terms(s, t, out, STATE)
    augmented = out[VIEW] > 0
    expected = 4.0 * kl_rows(t["logits"][augmented], s["logits"][augmented], 2.0).mean()
    assert terms["soft"].value.item() == pytest.approx(expected.item(), rel=1e-5)

    scrambled = dict(out)
    scrambled["labels"] = out["labels"].clone()
    scrambled["labels"][augmented] = torch.randint(0, 10, (int(augmented.sum()),))
    assert torch.equal(recipe.terms(s, t, scrambled, STATE)["soft"].value, terms["soft"].value)

    # Teacher outputs on the clean inputs instead of the augmented ones give another term.
    clean = out[VIEW] == 0
    on_clean = t["logits"].clone()
    on_clean[augmented] = t["logits"][clean].repeat(2, 1)
    changed = recipe.terms(s, Taps({"logits": on_clean}), out, STATE)["soft"].value
    assert abs(changed.item() - terms["soft"].value.item()) > 1e-3


def test_ce_reads_only_the_clean_labelled_rows(digits_subset, make_mlp) -> None:
    recipe = Denoise()
    student = make_mlp()
    batch = digits_batch(digits_subset)
    batch["labels"][:4] = -100
    out = prepared(recipe, batch, student)
    with torch.no_grad():
        logits = student(out["input"])
    terms = recipe.terms(Taps({"logits": logits}), Taps({"logits": logits}), out, STATE)
    rows = len(batch["index"])
    expected = F.cross_entropy(logits[4:rows], batch["labels"][4:])
    assert terms["ce"].value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["ce"].unit == "labeled" and terms["soft"].unit == "examples"


def consistency(recipe: Denoise, out: dict, student: nn.Module) -> float:
    with TapReader(student, ["logits"]) as reader:
        s = reader(out)
    return recipe.terms(s, s.detached(), out, STATE)["consistency"].value.item()


def test_consistency_is_zero_without_dropout_and_positive_with_it(digits_subset,
                                                                  make_mlp) -> None:
    recipe = Denoise()
    batch = digits_batch(digits_subset)
    plain = make_mlp(dropout=0.0).train()
    assert consistency(recipe, prepared(recipe, batch, plain), plain) == 0.0
    dropped = make_mlp(dropout=0.5).train()
    out = prepared(recipe, batch, dropped)
    value = consistency(recipe, out, dropped)
    assert value > 1e-3
    with torch.no_grad():
        one, two = (dropped(out["input"][out[VIEW] == v]) for v in (1, 2))
    assert not torch.equal(one, two)
    assert consistency(recipe, out, dropped.eval()) == 0.0  # eval: no dropout, same passes


class TokenTagger(nn.Module):
    """A token classifier for HF-style batches: embedding + linear, logits [B, L, C]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def test_token_batches_are_augmented_and_terms_average_valid_tokens() -> None:
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 2, 0], [1, 10, 11, 12, 2, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.where(mask.bool(), ids % 3, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "index": torch.arange(2)}
    recipe = Denoise(delete_probability=0.3, swap_probability=0.3, replace_probability=0.3)
    tagger = TokenTagger()
    out = prepared(recipe, batch, tagger, seed=3)
    assert out["input_ids"].shape == (6, 8)
    assert torch.equal(out["input_ids"][:2], ids)
    assert torch.equal(out["input_ids"][2:4], out["input_ids"][4:])
    assert not torch.equal(out["input_ids"][2:4], ids)
    assert (out["attention_mask"][2:] <= mask.repeat(2, 1)).all()  # padding stays padding
    with torch.no_grad():
        s = tagger(out["input_ids"], out["attention_mask"])
        t = s.flip(-1)  # any other prediction
    terms = recipe.terms(Taps({"logits": s}), Taps({"logits": t}), out, STATE)
    augmented = out[VIEW] > 0
    valid = out["attention_mask"][augmented].bool()
    expected = kl_rows(t[augmented][valid], s[augmented][valid], 1.0).mean()
    assert terms["soft"].value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["soft"].unit == "tokens"
    garbage = s.clone()
    garbage[out["attention_mask"] == 0] = 1e4  # padding logits never reach the terms
    again = recipe.terms(Taps({"logits": garbage}), Taps({"logits": t}), out, STATE)
    assert again["soft"].value.item() == pytest.approx(terms["soft"].value.item(), rel=1e-6)
    assert again["consistency"].value.item() == pytest.approx(
        terms["consistency"].value.item(), abs=1e-7)


def test_training_logs_every_term_and_keeps_the_teacher_frozen(digits_subset, make_mlp,
                                                               take_snapshot,
                                                               weights_diff) -> None:
    student, teacher = make_mlp(seed=0, dropout=0.3), make_mlp(seed=5, hidden=(32,))
    before = take_snapshot(teacher)
    result = Distiller(student, teacher, Denoise(), epochs=1, batch_size=16,
                       progress=False).fit(digits_subset(64, labeled=10))
    steps = [r for r in result.history if r["kind"] == "train"]
    assert len(steps) == 4
    assert {"ce", "soft", "consistency"} <= set(steps[0])
    assert all(r["consistency"] > 0 and r["soft"] > 0 for r in steps)
    assert weights_diff(before, take_snapshot(teacher)) == 0


def test_bad_parameters_name_the_field() -> None:
    with pytest.raises(ValueError, match="erase_area"):
        Denoise(erase_area=(0.3, 0.1))
    with pytest.raises(ValueError, match="value_range"):
        Denoise(value_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="augmentation"):
        Denoise(augmentation="mixup")


@pytest.mark.parametrize(("recipe", "key"), [(Denoise(), VIEW), (Adversarial(), VIEW)])
def test_terms_of_a_batch_that_skipped_prepare_name_the_missing_marks(recipe, key) -> None:
    logits = torch.zeros(4, 3)
    batch = {"input": torch.zeros(4, 2), "labels": torch.tensor([0, 1, 2, 0])}
    with pytest.raises(ValueError, match=rf"^{recipe.name}: the batch has no '{key}' key"):
        recipe.terms(Taps({"logits": logits}), Taps({"logits": logits}), batch, TrainState())
