"""GRAIN (``grain``): the masks really remove the pruned units (against a copy zeroed by hand,
and pruned weights that no longer matter), the Taylor scores against a backward by hand, the
gradient separation (a change of the distillation terms alone leaves the scores unchanged), the
structure regularisation, the cubic schedule, the global size-weighted ranking, a short fit
reaching the target density with a frozen teacher, and the errors. Tiny BERT classifiers (2
layers of width 16, 2 heads, 24 FFN neurons) are built here."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from pydantic import ValidationError

from kdistill.batch import collate
from kdistill.engine import Distiller
from kdistill.models import deployable
from kdistill.models.hf_text import build_hf_text
from kdistill.models.pruning import MaskedEncoder, encoder_layers
from kdistill.recipes import build_recipe
from kdistill.recipes.grain import (
    GRAIN,
    density_at,
    pruned_masks,
    regularised,
    taylor_importance,
)
from kdistill.schedules import TrainState
from kdistill.taps import TapReader, Taps

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat",
         "play", "##ing", "##ed", "dog", "a", "big", "red", "ran", "to", "it"]
TEXTS = ["the cat sat on the mat", "a dog ran", "it", "the big red dog sat on it", "playing",
         "a cat played on the mat", "red", "the dog ran to it"]
HIDDEN, HEADS, FFN = 16, 2, 24
SETTINGS = {"cpu": True, "progress": False, "batch_size": 4}
PRUNABLE = 2 * (FFN * (2 * HIDDEN + 1) + HIDDEN * (2 * HIDDEN + 2) + HIDDEN * (2 * HIDDEN + 1))


def save_bert(folder: Path, seed: int) -> str:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=0.3)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}).save_pretrained(
        folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("grain")
    return {"teacher": save_bert(root / "teacher", seed=0),
            "student": save_bert(root / "student", seed=1)}


def bert(folders: dict[str, str], role: str) -> torch.nn.Module:
    return build_hf_text((), 3, folders[role])


def samples() -> list[dict[str, Any]]:
    return [{"input": text, "index": torch.tensor(i), "labels": torch.tensor(i % 3)}
            for i, text in enumerate(TEXTS)]


def random_masks(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"ffn": (torch.rand(2, FFN, generator=gen) > 0.4).float(),
            "qk": (torch.rand(2, HIDDEN, generator=gen) > 0.4).float(),
            "vo": (torch.rand(2, HIDDEN, generator=gen) > 0.4).float()}


def zeroed_by_hand(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of a BERT text model with the masked rows and columns zeroed, by module path."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(copied.model.bert.encoder.layer):
            attention = layer.attention.self
            for linear, mask in ((attention.query, masks["qk"][i]),
                                 (attention.key, masks["qk"][i]),
                                 (attention.value, masks["vo"][i])):
                for r in range(HIDDEN):
                    if mask[r] == 0:
                        linear.weight[r] = 0
                        linear.bias[r] = 0
            for r in range(HIDDEN):
                if masks["vo"][i][r] == 0:
                    layer.attention.output.dense.weight[:, r] = 0
            for j in range(FFN):
                if masks["ffn"][i][j] == 0:
                    layer.intermediate.dense.weight[j] = 0
                    layer.intermediate.dense.bias[j] = 0
                    layer.output.dense.weight[:, j] = 0
    return copied


# -- masks ---------------------------------------------------------------------------------------
def test_masks_compute_the_model_without_the_pruned_units(folders: dict[str, str]) -> None:
    model = bert(folders, "student")
    masked = MaskedEncoder(model)
    masks = random_masks(0)
    masked.set_masks(masks)
    masked.eval()
    texts = TEXTS[:4]
    expected = zeroed_by_hand(model, masks).eval()(texts)["logits"]
    torch.testing.assert_close(masked(texts)["logits"], expected)
    shipped = deployable(masked)
    assert not isinstance(shipped, MaskedEncoder)
    torch.testing.assert_close(shipped(texts)["logits"], expected)
    layer = shipped.model.bert.encoder.layer[0]
    pruned_ffn = int((masks["ffn"][0] == 0).nonzero()[0])
    with torch.no_grad():
        assert float(layer.intermediate.dense.weight[pruned_ffn].abs().sum()) == 0.0
        assert float(layer.output.dense.weight[:, pruned_ffn].abs().sum()) == 0.0
    # A pruned unit's weights no longer matter to the masked model (whose hooks outlive the
    # export).
    pruned_q = int((masks["qk"][1] == 0).nonzero()[0])
    with torch.no_grad():
        model.model.bert.encoder.layer[1].attention.self.query.weight[pruned_q] += 5.0
        model.model.bert.encoder.layer[0].intermediate.dense.weight[pruned_ffn] -= 3.0
    torch.testing.assert_close(masked(texts)["logits"], expected)


def test_remaining_parameters_subtract_each_pruned_units_weights(
        folders: dict[str, str]) -> None:
    model = bert(folders, "student")
    masked = MaskedEncoder(model)
    total = sum(p.numel() for p in model.parameters())
    masks = {"ffn": torch.ones(2, FFN), "qk": torch.ones(2, HIDDEN), "vo": torch.ones(2, HIDDEN)}
    masks["ffn"][0, :3] = 0
    masks["qk"][1, [0, 5]] = 0
    masks["vo"][0, 9] = 0
    masked.set_masks(masks)
    # FFN neuron: a row + bias of W1 and a column of W2; q/k dim: rows + biases of Wq and Wk;
    # v/o dim: a row + bias of Wv and a column of Wo.
    removed = 3 * (HIDDEN + 1 + HIDDEN) + 2 * 2 * (HIDDEN + 1) + (HIDDEN + 1 + HIDDEN)
    assert masked.remaining_parameters() == total - removed
    assert masked.density() == pytest.approx(1 - removed / PRUNABLE)


# -- importance ----------------------------------------------------------------------------------
def test_taylor_scores_are_the_absolute_summed_gradient_times_weight(
        folders: dict[str, str]) -> None:
    model = bert(folders, "student")
    labels = torch.tensor([0, 2, 1, 1])
    loss = torch.nn.functional.cross_entropy(model(TEXTS[:4])["logits"], labels)
    scores = taylor_importance(loss, encoder_layers(model))
    loss.backward()
    layer = model.model.bert.encoder.layer[1]
    w2, wq, bq = layer.output.dense.weight, layer.attention.self.query.weight, \
        layer.attention.self.query.bias
    wo = layer.attention.output.dense.weight
    for j in (0, 7, 23):
        by_hand = abs(sum(float(w2.grad[i, j] * w2.detach()[i, j]) for i in range(HIDDEN)))
        assert float(scores["ffn"][1, j]) == pytest.approx(by_hand, rel=1e-4, abs=1e-9)
    for r in (0, 11):
        by_hand = abs(sum(float(wq.grad[r, i] * wq.detach()[r, i]) for i in range(HIDDEN))
                      + float(bq.grad[r] * bq.detach()[r]))
        assert float(scores["qk"][1, r]) == pytest.approx(by_hand, rel=1e-4, abs=1e-9)
        by_hand = abs(sum(float(wo.grad[i, r] * wo.detach()[i, r]) for i in range(HIDDEN)))
        assert float(scores["vo"][1, r]) == pytest.approx(by_hand, rel=1e-4, abs=1e-9)


def read(model: torch.nn.Module, taps: list[str], batch: dict[str, Any]) -> Taps:
    with TapReader(model, taps) as reader:
        return reader(batch)


def accumulated(recipe: GRAIN, student: torch.nn.Module, teacher: Taps,
                batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The importance a recipe adds for one training micro-batch (a fresh student forward)."""
    for kind in ("ffn", "qk", "vo"):
        getattr(recipe, f"{kind}_update").zero_()
    recipe.steps_seen.fill_(1)
    taps = read(student, recipe.student_taps(), batch)
    recipe.terms(taps, teacher, batch, TrainState(step=0, total_steps=10))
    return {k: getattr(recipe, f"{k}_update").clone() for k in ("ffn", "qk", "vo")}


@pytest.mark.parametrize("importance", ["labels", "prediction"])
def test_distillation_gradients_never_reach_the_scores(folders: dict[str, str],
                                                       importance: str) -> None:
    recipe = GRAIN(importance=importance, temperature=2.0, ce_weight=0.5)
    student = recipe.wrap_student(bert(folders, "student"))
    teacher = bert(folders, "teacher").eval()
    batch = collate(samples()[:4])
    with torch.no_grad():
        t_taps = read(teacher, recipe.teacher_taps(), batch)
        recipe.build(read(student, recipe.student_taps(), batch), t_taps)
    base = accumulated(recipe, student, t_taps, batch)
    assert all(float(v.sum()) > 0 for v in base.values())
    other_hidden = t_taps.replace(**{f"hidden.{i}": t_taps[f"hidden.{i}"] * 3 + 1
                                     for i in (0, 2)})
    for kind, value in accumulated(recipe, student, other_hidden, batch).items():
        torch.testing.assert_close(value, base[kind])
    other_logits = t_taps.replace(logits=-t_taps["logits"])
    changed = accumulated(recipe, student, other_logits, batch)
    if importance == "labels":  # the KD term changed, the scores did not
        for kind, value in changed.items():
            torch.testing.assert_close(value, base[kind])
    else:  # GRAIN's code: the prediction-layer KD enters the scores
        assert not torch.allclose(changed["ffn"], base["ffn"])


def test_structure_regularisation_follows_the_tanh_factors() -> None:
    gen = torch.Generator().manual_seed(4)
    update = {k: torch.rand(2, n, generator=gen) for k, n in (("ffn", 6), ("qk", 4), ("vo", 4))}
    masks = {"ffn": torch.tensor([[1.0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]]),
             "qk": torch.ones(2, 4),
             "vo": torch.tensor([[1.0, 0, 1, 1], [0, 0, 1, 0]])}
    got = regularised(update, masks, heads=2, head_alpha=0.5, layer_alpha=0.25)
    torch.testing.assert_close(got["qk"], update["qk"])
    t = math.tanh
    head = [[0.5, 1.0], [0.0, 0.5]]  # density of each head's value dims
    layer = [0.75, 0.25]
    for lay in range(2):
        for r in range(4):
            factor = t(head[lay][r // 2] / 0.5) * t(layer[lay] / 0.25)
            assert float(got["vo"][lay, r]) == pytest.approx(float(update["vo"][lay, r]) * factor)
    ffn_density = [4 / 6, 0.0]
    for lay in range(2):
        torch.testing.assert_close(got["ffn"][lay], update["ffn"][lay] * t(ffn_density[lay] / 0.25))


# -- schedule and masks --------------------------------------------------------------------------
def test_density_decays_cubically_between_start_and_end() -> None:
    # 100 steps, start 0.1 -> step 10, end 0.6 -> step 60, target 0.2.
    assert density_at(10, 100, 0.1, 0.6, 0.2) == 1.0
    assert density_at(35, 100, 0.1, 0.6, 0.2) == pytest.approx(0.2 + 0.8 * 0.5**3)
    assert density_at(50, 100, 0.1, 0.6, 0.2) == pytest.approx(0.2 + 0.8 * 0.2**3)
    assert density_at(60, 100, 0.1, 0.6, 0.2) == 0.2
    assert density_at(99, 100, 0.1, 0.6, 0.2) == 0.2


def test_units_are_ranked_globally_and_weighted_by_their_size() -> None:
    # hidden 2: an FFN neuron holds 5 weights, a q/k dim 6, a v/o dim 5; one layer, 2 heads of
    # size 1, 2 FFN neurons: 10 + 12 + 10 = 32 prunable weights.
    scores = {"ffn": torch.tensor([[0.5, 3.0]]), "qk": torch.tensor([[0.1, 2.0]]),
              "vo": torch.tensor([[4.0, 0.2]])}
    masks = {k: torch.ones_like(v) for k, v in scores.items()}
    # Keep 0.55: remove < 14.4 weights -> q/k 0 (6) + v/o 1 (5) = 11; FFN 0 would make 16.
    new = pruned_masks(scores, masks, 0.55, hidden=2, heads=2)
    assert new is not None
    assert new["ffn"].tolist() == [[1.0, 1.0]]
    assert new["vo"].tolist() == [[1.0, 0.0]]
    # Head 1 lost its value dim, so its query/key dim goes too (head 0's q/k dim was ranked out).
    assert new["qk"].tolist() == [[0.0, 0.0]]
    # No further removal asked: nothing changes.
    assert pruned_masks(scores, new, 0.6, hidden=2, heads=2) is None


# -- training -----------------------------------------------------------------------------------
def test_a_fit_reaches_the_target_density_and_the_teacher_never_changes(
        folders: dict[str, str]) -> None:
    teacher = bert(folders, "teacher")
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    recipe = GRAIN(density=0.4, start=0.0, end=0.5, beta=0.5, ce_weight=1.0)
    distiller = Distiller(bert(folders, "student"), teacher, recipe, epochs=3, **SETTINGS)
    student = distiller.fit(samples()).student
    assert isinstance(student, MaskedEncoder)
    # Units go while the removed weights stay below 1 - density: the kept share ends within one
    # unit (at most 2H + 2 weights) above the target (a head's orphaned q/k dims may go too).
    assert 0.4 - 0.05 <= student.density() <= 0.4 + (2 * HIDDEN + 2) / PRUNABLE
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    student.eval()
    shipped = deployable(student)
    torch.testing.assert_close(shipped(TEXTS)["logits"], student(TEXTS)["logits"])
    kept = sum(float(m.sum()) for m in student.masks().values())
    assert kept < sum(m.numel() for m in student.masks().values())


# -- errors -------------------------------------------------------------------------------------
def test_a_student_without_bert_layers_is_refused() -> None:
    with pytest.raises(ValueError, match=r"grain: Linear has no BERT-style encoder layers"):
        GRAIN().wrap_student(torch.nn.Linear(3, 3))


@pytest.mark.parametrize(("params", "field"), [({"density": 0.0}, "density"),
                                               ({"start": 0.5, "end": 0.4}, "end"),
                                               ({"beta": 1.0}, "beta"),
                                               ({"importance": "kd"}, "importance"),
                                               ({"every": 0}, "every")])
def test_bad_parameters_name_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        build_recipe("grain", **params)


def test_the_terms_follow_their_equations_and_leave_padding_out(
        folders: dict[str, str]) -> None:
    recipe = GRAIN(temperature=3.0, kd_weight=0.7, ce_weight=0.2, hidden_weight=0.5,
                   hidden_layers=[[1, 1], [2, 2]])
    student = recipe.wrap_student(bert(folders, "student"))
    teacher = bert(folders, "teacher")
    batch = collate(samples()[:4])  # texts of different lengths: padding
    with TapReader(student, recipe.student_taps()) as reader:
        s = reader(batch)
    with TapReader(teacher, recipe.teacher_taps()) as reader:
        t = reader(batch)
    recipe.build(s, t)
    with torch.no_grad():
        terms = recipe.terms(s, t, batch, TrainState())
    mask = s["token_mask"].bool()
    assert not mask.all()
    z_s, z_t, labels = s["logits"], t["logits"], batch["labels"]
    kd = -(torch.softmax(z_t / 3, -1) * torch.log_softmax(z_s / 3, -1)).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(z_s, labels)
    hidden = sum(((proj(s[f"hidden.{m}"]) - t[f"hidden.{m}"])[mask] ** 2).mean()
                 for proj, m in zip(recipe.projections, (1, 2), strict=True))
    for name, value, weight in (("kd", kd, 0.7), ("ce", ce, 0.2), ("hidden", hidden, 0.5)):
        torch.testing.assert_close(terms[name].value, value, rtol=1e-5, atol=1e-7)
        assert terms[name].weight == weight
    spoiled = t.replace(**{f"hidden.{m}": t[f"hidden.{m}"].masked_fill(~mask[..., None], 1e3)
                           for m in (1, 2)})
    with torch.no_grad():
        again = recipe.terms(s, spoiled, batch, TrainState())["hidden"].value
    torch.testing.assert_close(again, terms["hidden"].value, rtol=0, atol=0)
