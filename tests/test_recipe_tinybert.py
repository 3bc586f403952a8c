"""TinyBERT (``tinybert``): the layer map, the query/key taps and the pre-softmax scores
against a hand computation on a padded batch, every term against its equation, the two
projections, the stages and their phases, the frozen teacher, the teacher cache, and the
errors. Tiny BERTs (a 4-layer teacher of width 32, a 2-layer student of width 16, 2 heads)
and their word-piece tokenizer are built here."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from pydantic import ValidationError
from torch import Tensor, nn

from kdistill.batch import UNLABELED, collate
from kdistill.cache import CachedTeacher, TeacherCache
from kdistill.engine import Distiller, Phase
from kdistill.layermap import auto_layer_map
from kdistill.models.hf_text import build_hf_text
from kdistill.models.text import TextModel, token_level_taps
from kdistill.recipes import build_recipe
from kdistill.recipes.layer_stages import resolve_layer_map
from kdistill.recipes.tinybert import TinyBERT, attention_scores
from kdistill.schedules import TrainState
from kdistill.taps import TapError, TapReader, Taps
from kdistill.teachers import FrozenTeacher

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat",
         "play", "##ing", "##ed", "dog", "a", "big", "red", "ran", "to", "it"]
TEXTS = ["the cat sat on the mat", "a dog ran", "it", "the big red dog sat on it", "playing",
         "a cat played on the mat", "red", "the dog ran to it"]
HEADS = 2
SETTINGS = {"cpu": True, "progress": False, "batch_size": 3}


def save_bert(folder: Path, layers: int, hidden: int, seed: int) -> str:
    """A tiny BERT classifier (no dropout, weights drawn wider than BERT's 0.02 so attention
    scores are far from 0) and the shared tokenizer, saved in ``folder``."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=HEADS, intermediate_size=24, max_position_embeddings=32,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.3)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}).save_pretrained(
        folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tinybert")
    return {"teacher": save_bert(root / "teacher", layers=4, hidden=32, seed=0),
            "student": save_bert(root / "student", layers=2, hidden=16, seed=1)}


@pytest.fixture
def teacher(folders: dict[str, str]) -> TextModel:
    return build_hf_text((), 3, folders["teacher"])


@pytest.fixture
def student(folders: dict[str, str]) -> TextModel:
    return build_hf_text((), 3, folders["student"])


def text_data(labels: bool = True) -> list[dict[str, Any]]:
    return [{"input": text, "index": torch.tensor(i),
             "labels": torch.tensor(i % 3 if labels else UNLABELED)}
            for i, text in enumerate(TEXTS)]


def read(model: nn.Module, taps: list[str], batch: dict[str, Any]) -> Taps:
    with TapReader(model, taps) as reader:
        return reader(batch)


# -- hand computations, from the models' weights ---------------------------------------------
def forward(model: TextModel, texts: list[str]) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """Every hidden state (0: embeddings), the logits and the token mask of a plain forward."""
    encoded = model.encode(texts)
    output = model.model(**encoded, output_hidden_states=True)
    return output.hidden_states, output.logits, encoded["attention_mask"]


def hand_scores(model: TextModel, hidden_states: tuple[Tensor, ...], layer: int) -> Tensor:
    """Q_h K_h^T / sqrt(d) of self-attention ``layer`` (from 0), from the layer's input and its
    query and key weights: [B, H, L, L]."""
    attention = model.model.bert.encoder.layer[layer].attention.self
    x = hidden_states[layer]
    q = x @ attention.query.weight.T + attention.query.bias
    k = x @ attention.key.weight.T + attention.key.bias
    b, length, width = q.shape
    d = width // HEADS
    q = q.reshape(b, length, HEADS, d).permute(0, 2, 1, 3)
    k = k.reshape(b, length, HEADS, d).permute(0, 2, 1, 3)
    return q @ k.transpose(-1, -2) / math.sqrt(d)


def masked_mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Mean of (a - b)^2 over the valid tokens and every feature."""
    return ((a - b)[mask.bool()] ** 2).mean()


def zeroed_mse(s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
    """Scores with every (query, key) pair touching padding set to 0, as TinyBERT's code does,
    the squared difference summed and divided by the valid pairs x heads."""
    valid = mask.bool()
    pairs = (valid[:, None, :, None] & valid[:, None, None, :]).expand_as(s)
    diff = torch.where(pairs, s, 0.0) - torch.where(pairs, t, 0.0)
    return (diff ** 2).sum() / pairs.sum()


def linear(layer: nn.Linear, x: Tensor) -> Tensor:
    return x @ layer.weight.T + layer.bias


STATE = TrainState(phase=0, epoch=0, step=0, epoch_progress=0.5, steps_per_epoch=2,
                   total_steps=4)


# -- the layer map -----------------------------------------------------------------------------
def test_the_uniform_map_takes_every_kth_teacher_layer() -> None:
    assert resolve_layer_map(None, 2, 4) == (2, 4)
    assert resolve_layer_map(None, 4, 12) == (3, 6, 9, 12)  # TinyBERT_4 from BERT_BASE
    assert resolve_layer_map([4, 1], 2, 4) == (4, 1)  # a list is taken as given
    recipe = TinyBERT(stage="general", student_layers=2, teacher_layers=4)
    assert recipe.student_taps() == ["token_mask", "embeddings", "hidden.1", "hidden.2",
                                     "query.0", "key.0", "query.1", "key.1"]
    assert recipe.teacher_taps() == ["embeddings", "hidden.2", "hidden.4",
                                     "query.1", "key.1", "query.3", "key.3"]
    assert TinyBERT().layer_map == (3, 6, 9, 12)


@pytest.mark.parametrize(("params", "message"), [
    ({"layer_map": [1, 2, 3]},
     "layer_map [1, 2, 3] has 3 entries for 2 student layers (student_layers): give one "
     "teacher layer (1-4) per student layer"),
    ({"layer_map": [0, 5]},
     "layer_map [0, 5]: teacher layer(s) [0, 5] outside 1-4 (teacher_layers: 4); the "
     "embeddings (layer 0) are always mapped to the student's embeddings"),
    ({"teacher_layers": 5},
     "the uniform layer map g(m) = m N / M needs teacher_layers (5) to be a multiple of "
     "student_layers (2); give layer_map, one teacher layer per student layer"),
])
def test_bad_layer_maps_are_refused_naming_the_field(params: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TinyBERT(**{"student_layers": 2, "teacher_layers": 4, **params})
    assert message in str(caught.value)
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_layer_map(params.get("layer_map"), 2, params.get("teacher_layers", 4))


# -- the query/key taps and the pre-softmax scores ---------------------------------------------
def test_query_and_key_taps_give_the_pre_softmax_scores_of_a_padded_batch(
        teacher: TextModel) -> None:
    texts = ["the big red dog sat on it", "it", "a dog ran"]  # 9, 3 and 5 tokens
    batch = collate([{"input": t} for t in texts])
    taps = read(teacher, ["query.1", "key.1", "token_mask"], batch)
    hidden, _, mask = forward(teacher, texts)
    assert torch.equal(taps["token_mask"], mask) and mask.sum(1).tolist() == [9, 3, 5]
    assert taps["query.1"].shape == (3, 9, HEADS, 16)  # [B, L, H, d]
    scores = attention_scores(taps["query.1"], taps["key.1"])
    expected = hand_scores(teacher, hidden, 1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().mean() > 0.5  # far from 0: the comparison means something
    # They are the scores the model's own softmax reads: softmax(A + padding mask) is the
    # attention map Hugging Face's eager implementation returns.
    teacher.model.set_attn_implementation("eager")  # the query/key taps need no such switch
    with TapReader(teacher, ["attention.1"]) as reader:
        probabilities = reader(batch)["attention.1"]
    padding = (1 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    torch.testing.assert_close(torch.softmax(scores + padding, -1), probabilities,
                               rtol=1e-5, atol=1e-6)


def test_padding_contributes_nothing_to_the_attention_term(teacher: TextModel,
                                                           student: TextModel) -> None:
    recipe = TinyBERT(stage="general", student_layers=2, teacher_layers=4)
    batch = collate(text_data()[:4])
    s, t = read(student, recipe.student_taps(), batch), read(teacher, recipe.teacher_taps(),
                                                              batch)
    recipe.build(s, t)
    mask = s["token_mask"].bool()
    assert not mask.all()  # the batch is padded
    value = recipe.terms(s, t, batch, STATE)["attention"].value
    noise = {name: torch.where(mask[:, :, None, None], s[name], torch.randn_like(s[name]) * 50)
             for name in ("query.0", "key.0", "query.1", "key.1")}
    noisy = recipe.terms(s.replace(**noise), t, batch, STATE)["attention"].value
    assert torch.equal(value, noisy)
    by_hand = sum(zeroed_mse(attention_scores(s[f"query.{m}"], s[f"key.{m}"]),
                             attention_scores(t[f"query.{g}"], t[f"key.{g}"]), mask)
                  for m, g in ((0, 1), (1, 3)))
    torch.testing.assert_close(value, by_hand)


def test_projection_taps_need_bert_style_attention_and_an_existing_layer(
        teacher: TextModel) -> None:
    with pytest.raises(TapError, match=r"tap 'query.0': Sequential has no BERT-style "
                                       r"self-attention module \(one with 'query' and 'key' "
                                       r"linear layers and an 'attention_head_size'\)"):
        TapReader(nn.Sequential(nn.Linear(2, 2)), ["query.0"])
    with pytest.raises(TapError, match="tap 'key.4': layer 4 out of range, TextModel has 4 "
                                       "self-attention layers"):
        TapReader(teacher, ["key.-1", "key.4"])
    # compared position by position: refused between models that tokenise differently
    assert token_level_taps(["logits", "query.0", "key.1", "token_mask"]) == ["query.0",
                                                                                "key.1"]


def test_token_mask_is_the_batchs_for_a_model_fed_token_ids(teacher: TextModel) -> None:
    encoded = teacher.encode(["the cat sat", "it"])
    taps = read(teacher.model, ["token_mask", "query.0"], encoded)
    assert torch.equal(taps["token_mask"], encoded["attention_mask"])
    assert taps["query.0"].shape == (2, 5, HEADS, 16)
    with pytest.raises(TapError, match="tap 'token_mask': neither the model output nor the "
                                       "batch has an attention_mask"):
        read(teacher.model, ["token_mask"], {"input_ids": encoded["input_ids"]})


# -- every term against its equation ------------------------------------------------------------
@pytest.mark.parametrize("projection", ["shared", "per_layer"])
def test_intermediate_terms_follow_their_equations(teacher: TextModel, student: TextModel,
                                                   projection: str) -> None:
    recipe = TinyBERT(stage="general", student_layers=2, teacher_layers=4, layer_map=[3, 4],
                      projection=projection, embedding_weight=0.3, hidden_weight=0.7,
                      attention_weight=1.9)
    data = text_data()
    batch = collate(data[:5])
    s, t = read(student, recipe.student_taps(), batch), read(teacher, recipe.teacher_taps(),
                                                              batch)
    recipe.build(s, t)
    terms = recipe.terms(s, t, batch, STATE)
    assert {k: (v.weight, v.unit) for k, v in terms.items()} == {
        "embeddings": (0.3, "tokens"), "hidden": (0.7, "tokens"),
        "attention": (1.9, "token_pairs")}

    texts = [d["input"] for d in data[:5]]
    hs, _, mask = forward(student, texts)
    ht, _, _ = forward(teacher, texts)
    w = list(recipe.projections) * (3 if projection == "shared" else 1)
    assert len(w) == 3
    torch.testing.assert_close(terms["embeddings"].value,
                               masked_mse(linear(w[0], hs[0]), ht[0], mask))
    torch.testing.assert_close(terms["hidden"].value,
                               masked_mse(linear(w[1], hs[1]), ht[3], mask)
                               + masked_mse(linear(w[2], hs[2]), ht[4], mask))
    attention = sum(zeroed_mse(hand_scores(student, hs, m), hand_scores(teacher, ht, g - 1),
                               mask) for m, g in ((0, 3), (1, 4)))
    torch.testing.assert_close(terms["attention"].value, attention, rtol=1e-5, atol=1e-6)


def test_the_prediction_term_is_soft_cross_entropy_at_temperature_t(
        teacher: TextModel, student: TextModel) -> None:
    recipe = TinyBERT(stage="prediction", temperature=2.5)
    assert recipe.student_taps() == recipe.teacher_taps() == ["logits"]
    batch = collate(text_data()[:4])
    s, t = read(student, ["logits"], batch), read(teacher, ["logits"], batch)
    recipe.build(s, t)
    terms = recipe.terms(s, t, batch, STATE)
    z_s, z_t = s["logits"], t["logits"]
    expected = -(F.softmax(z_t / 2.5, -1) * F.log_softmax(z_s / 2.5, -1)).sum(-1).mean()
    assert set(terms) == {"prediction"}
    assert (terms["prediction"].weight, terms["prediction"].unit) == (1.0, "examples")
    torch.testing.assert_close(terms["prediction"].value, expected)
    assert list(recipe.parameters()) == []


def test_one_shared_projection_or_one_per_mapped_layer(teacher: TextModel,
                                                       student: TextModel) -> None:
    batch = collate(text_data()[:2])
    counts = {}
    for projection in ("shared", "per_layer"):
        recipe = TinyBERT(stage="general", student_layers=2, teacher_layers=4,
                          projection=projection)
        assert list(recipe.parameters()) == []  # built on the first batch
        recipe.build(read(student, recipe.student_taps(), batch),
                     read(teacher, recipe.teacher_taps(), batch))
        counts[projection] = sum(p.numel() for p in recipe.parameters())
    one = 16 * 32 + 32  # W: 16 -> 32, and its bias
    assert counts == {"shared": one, "per_layer": 3 * one}  # embeddings + 2 hidden layers


# -- stages and phases -----------------------------------------------------------------------
def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def term_names(history: list[dict[str, Any]], phase: int) -> set[str]:
    names = set()
    for record in history:
        if record["kind"] == "train" and record["phase"] == phase:
            names |= {k for k in ("embeddings", "hidden", "attention", "prediction")
                      if k in record}
    return names


def test_the_general_stage_trains_without_labels_or_a_prediction_term(
        folders: dict[str, str], teacher: TextModel) -> None:
    before = snapshot(teacher)
    weights = []
    for labels in (True, False):
        student = build_hf_text((), 3, folders["student"])
        start = snapshot(student)
        recipe = TinyBERT(stage="general", student_layers=2, teacher_layers=4)
        result = Distiller(student, teacher, recipe, epochs=2, seed=3, **SETTINGS).fit(
            text_data(labels))
        assert [p.epochs for p in result.phases] == [2]
        assert term_names(result.history, 0) == {"embeddings", "hidden", "attention"}
        weights.append(snapshot(student))
        assert any(not torch.equal(weights[-1][k], start[k]) for k in start)
    for key, value in weights[0].items():  # the labels were never read
        assert torch.equal(value, weights[1][key]), key
    for key, value in snapshot(teacher).items():  # the teacher never changes
        assert torch.equal(value, before[key]), key


def test_the_task_stage_runs_the_intermediate_phase_then_the_prediction_phase(
        teacher: TextModel, student: TextModel) -> None:
    recipe = TinyBERT(stage="task", student_layers=2, teacher_layers=4, intermediate_epochs=2)
    (first, n1), (second, n2) = recipe.phases(3)
    assert (first.params.stage, n1, second.params.stage, n2) == ("general", 2, "prediction", 1)
    assert [n for _, n in TinyBERT(stage="task").phases(8)] == [6, 2]  # default: last quarter
    assert [n for _, n in TinyBERT(stage="task").phases(2)] == [1, 1]
    before = snapshot(teacher)
    result = Distiller(student, teacher, recipe, epochs=3, **SETTINGS).fit(text_data())
    assert [(p.name, p.epochs) for p in result.phases] == [("0-tinybert", 2), ("1-tinybert", 1)]
    phases = [r["phase"] for r in result.history if r["kind"] == "train"]
    assert phases == sorted(phases) and set(phases) == {0, 1}
    assert term_names(result.history, 0) == {"embeddings", "hidden", "attention"}
    assert term_names(result.history, 1) == {"prediction"}
    for key, value in snapshot(teacher).items():
        assert torch.equal(value, before[key]), key


def test_the_distiller_measures_layer_map_auto_on_its_training_data(
        teacher: TextModel, student: TextModel) -> None:
    expected = auto_layer_map(student, teacher, text_data())[1:]
    recipe = TinyBERT(stage="task", student_layers=2, teacher_layers=4, layer_map="auto")
    assert recipe.layer_map_pending and recipe.with_layer_map([1, 3]).layer_map == (1, 3)
    result = Distiller(student, teacher, recipe, epochs=2, **SETTINGS).fit(text_data())
    assert [p.recipe.layer_map for p in result.phases] == [tuple(expected)] * 2
    assert not any(p.recipe.layer_map_pending for p in result.phases)


def test_stage_task_splits_only_a_budget_it_can_split() -> None:
    with pytest.raises(ValueError, match="tinybert: stage 'task' needs at least 2 epochs"):
        TinyBERT(stage="task").phases(1)
    with pytest.raises(ValueError, match=r"tinybert: intermediate_epochs \(3\) must be smaller "
                                         r"than epochs \(3\)"):
        TinyBERT(stage="task", intermediate_epochs=3).phases(3)
    assert TinyBERT(stage="general").phases(5)[0][1] == 5


def test_stage_task_as_one_phase_of_a_list_says_how_to_split_it(teacher: TextModel,
                                                                student: TextModel) -> None:
    recipe = TinyBERT(stage="task", student_layers=2, teacher_layers=4)
    phase = Phase(recipe, 1)
    message = ("tinybert: stage 'task' runs as two phases (the intermediate layers, then the "
               "prediction layer); in a 'phases' list give a phase with stage 'general' and "
               "then one with stage 'prediction'")
    with pytest.raises(ValueError, match=re.escape(message)):
        Distiller(student, teacher, phases=[phase], epochs=1, **SETTINGS).fit(text_data())


def test_model_depths_are_checked_against_the_declared_layers(teacher: TextModel,
                                                              student: TextModel) -> None:
    assert TinyBERT(student_layers=2, teacher_layers=4).wrap_student(student) is student
    with pytest.raises(ValueError, match="tinybert: student_layers is 4 but the student has 2 "
                                         "transformer layers; set student_layers: 2"):
        TinyBERT(student_layers=4, teacher_layers=4).wrap_student(student)
    with pytest.raises(ValueError, match="tinybert: teacher_layers is 2 but the teacher has 4 "
                                         "transformer layers; set teacher_layers: 4"):
        TinyBERT(student_layers=2, teacher_layers=2).teacher_source(student, teacher)
    with pytest.raises(ValueError, match=r"tinybert: the student \(Linear\) has no BERT-style "
                                         r"self-attention layers"):
        TinyBERT().wrap_student(nn.Linear(2, 2))
    assert TinyBERT(stage="prediction").wrap_student(nn.Linear(2, 2)) is not None


# -- the teacher cache ------------------------------------------------------------------------
def test_a_cache_of_the_hidden_states_and_projections_trains_like_the_live_teacher(
        tmp_path: Path, folders: dict[str, str], teacher: TextModel) -> None:
    recipe = TinyBERT(stage="task", student_layers=2, teacher_layers=4, intermediate_epochs=1)
    assert recipe.teacher_signal_varies() is None
    taps = [tap for phase, _ in recipe.phases(2) for tap in phase.teacher_taps()]
    data = text_data()
    cache = TeacherCache.build(teacher, data, taps, tmp_path / "cache", batch_size=3,
                               shard_rows=3, progress=False)
    assert set(taps) <= set(cache.taps)
    batch = collate([data[i] for i in (5, 2, 0)])  # lengths unlike the build's batches
    source = CachedTeacher(cache)
    source.bind(taps, torch.device("cpu"))
    answer, live = source(batch), read(teacher, taps, batch)
    valid = read(teacher, ["token_mask"], batch)["token_mask"].bool()
    for name in ("embeddings", "hidden.4", "query.3", "key.1"):
        assert answer[name].shape == live[name].shape
        torch.testing.assert_close(answer[name][valid], live[name][valid], rtol=1e-5, atol=1e-6)
        assert not answer[name][~valid].any()  # padding holds zeros, which the mask drops
    # Training: SGD, so the float noise of the teacher's batch composition stays noise (Adam
    # would turn it into full-size steps for the weights with a near-zero gradient).
    runs = []
    for teacher_source in (FrozenTeacher(teacher), CachedTeacher(cache)):
        student = build_hf_text((), 3, folders["student"])
        result = Distiller(student, teacher_source, TinyBERT(recipe.params), epochs=2,
                           batch_size=4, cpu=True, progress=False,
                           optimizer={"name": "sgd", "lr": 0.05}).fit(data)
        runs.append((result.history, snapshot(student)))
    (live_history, live_weights), (cached_history, cached_weights) = runs
    assert term_names(live_history, 0) == {"embeddings", "hidden", "attention"}
    assert term_names(live_history, 1) == {"prediction"}
    for a, b in zip(live_history, cached_history, strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for key, value in live_weights.items():
        torch.testing.assert_close(cached_weights[key], value, rtol=0, atol=1e-6)


def test_the_recipe_is_registered_for_transformers_only() -> None:
    recipe = build_recipe("tinybert", stage="general", student_layers=2, teacher_layers=4)
    assert isinstance(recipe, TinyBERT) and recipe.uses_unlabeled and recipe.uses_teacher
    assert TinyBERT.architecture is not None  # the leaderboard's MLP/CNN protocol skips it
