"""Hidden-state knowledge compression (``hsk``): the slice tap's names, the slice (tokens by
[CLS] attention without [SEP] or padding, entries by magnitude) and the term against a hand
computation from the models' weights with every parameter off its default, the stages, the
depth checks, and the teacher cache: the slice stored compactly, answered like the live
teacher, training alike, refused when built with another slice. The tiny BERTs (a 4-layer
teacher of width 32, a 2-layer student of width 16) come from the tinybert tests."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from test_recipe_tinybert import (
    SETTINGS,
    STATE,
    forward,
    hand_scores,
    linear,
    read,
    save_bert,
    snapshot,
    text_data,
)
from torch import Tensor, nn

from kdistill.batch import collate
from kdistill.cache import CachedTeacher, CacheError, CacheMismatch, TeacherCache
from kdistill.engine import Distiller
from kdistill.losses import TokenSlice
from kdistill.models.hf_text import build_hf_text
from kdistill.models.text import TextModel
from kdistill.recipes import build_recipe
from kdistill.recipes.hsk import HSK
from kdistill.taps import SliceTap, TapError, parse_tap, slice_tap
from kdistill.teachers import FrozenTeacher

SEP = 3  # [SEP] in the tinybert tests' vocabulary


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hsk")
    return {"teacher": save_bert(root / "teacher", layers=4, hidden=32, seed=0),
            "student": save_bert(root / "student", layers=2, hidden=16, seed=1)}


@pytest.fixture
def teacher(folders: dict[str, str]) -> TextModel:
    return build_hf_text((), 3, folders["teacher"])


@pytest.fixture
def student(folders: dict[str, str]) -> TextModel:
    return build_hf_text((), 3, folders["student"])


# -- slice tap names ---------------------------------------------------------------------------
def test_a_slice_tap_names_every_parameter_of_its_slice() -> None:
    name = slice_tap("hidden.4", attention=3, tokens=10, width=0.1, sep=102)
    assert name == "slice:hidden.4:attention=3:tokens=10:width=0.1:sep=102"
    assert parse_tap(name) == SliceTap(name, "hidden.4", 3, 10, 0.1, 102)
    every = slice_tap("hidden.0", attention=None, tokens=None, width=1, sep=None)
    assert every == "slice:hidden.0:attention=none:tokens=all:width=1.0:sep=none"
    assert parse_tap(every) == SliceTap(every, "hidden.0", None, None, 1.0, None)


@pytest.mark.parametrize(("name", "message"), [
    ("slice:hidden.4:tokens=10", "malformed slice tap 'slice:hidden.4:tokens=10': use "
     "'slice:hidden.<i>:attention=<j>:tokens=<k>:width=<f>:sep=<id>'"),
    ("slice:hidden.4:attention=3:tokens=10:width=1.5:sep=102",
     "slice tap 'slice:hidden.4:attention=3:tokens=10:width=1.5:sep=102': width must be a "
     "fraction in (0, 1], got 1.5"),
    ("slice:hidden.4:attention=none:tokens=10:width=0.1:sep=102",
     "a number of tokens needs the attention layer that chooses them"),
    ("slice:hidden.4:attention=3:tokens=0:width=0.1:sep=102", "tokens must be at least 1"),
])
def test_malformed_slice_taps_are_refused_saying_why(name: str, message: str) -> None:
    with pytest.raises(TapError, match=re.escape(message)):
        parse_tap(name)


# -- the slice and the term, by hand -------------------------------------------------------------
def hand_slice(hidden: Tensor, scores: Tensor | None, mask: Tensor, ids: Tensor,
               tokens: int | None, width: float, sep: int | None
               ) -> list[tuple[list[int], Tensor]]:
    """Per sample: the kept positions (largest mean-over-heads [CLS] score first; [SEP] and
    padding never) and the [n, d] 0/1 mask of its largest-magnitude entries, in plain loops."""
    out = []
    for b in range(len(hidden)):
        candidates = [j for j in range(hidden.shape[1]) if mask[b, j]
                      and (tokens is None or sep is None or int(ids[b, j]) != sep)]
        if tokens is None:
            positions = candidates
        else:
            cls = scores[b, :, 0, :].mean(dim=0).detach()
            positions = sorted(candidates, key=lambda j: -float(cls[j]))[:tokens]
        entries = hidden[b, positions]  # [n, d]
        n, d = entries.shape
        keep = max(1, math.floor(width * n * d))
        flat = entries.abs().flatten().tolist()
        chosen = sorted(range(n * d), key=lambda i: -flat[i])[:keep]
        kept = torch.zeros(n * d)
        kept[chosen] = 1.0
        out.append((positions, kept.reshape(n, d)))
    return out


def hand_term(student_hidden: Tensor, teacher_hidden: Tensor, cut: list[tuple[list[int], Tensor]],
              w: nn.Linear, dropped: str) -> Tensor:
    """Mean over samples of the per-sample MSE between W h_s and the masked teacher."""
    per_sample = []
    for b, (positions, kept) in enumerate(cut):
        s = linear(w, student_hidden[b, positions])
        t = teacher_hidden[b, positions] * kept
        squared = (s - t) ** 2
        per_sample.append(squared.mean() if dropped == "zero" else squared[kept.bool()].mean())
    return torch.stack(per_sample).mean()


CASES = [
    # uniform token attention (a(m) = m N / M, from 0: 1 and 3), 2 layers, [SEP] excluded
    ({"layers": 2, "tokens": 3, "width": 0.3, "token_attention": "uniform",
      "sep_token_id": SEP, "dropped": "zero", "layer_map": [3, 4]},
     [(1, 3, 1), (2, 4, 3)]),
    # the mapped layer's attention, the embeddings too, only kept entries compared
    ({"layers": 3, "tokens": 2, "width": 0.05, "token_attention": "mapped",
      "sep_token_id": SEP, "dropped": "ignore", "layer_map": [1, 3]},
     [(0, 0, 0), (1, 1, 0), (2, 3, 2)]),
    # every token, [SEP] included, half the entries; no attention read
    ({"layers": 1, "tokens": None, "width": 0.5, "token_attention": "uniform",
      "sep_token_id": None, "dropped": "zero"},
     [(2, 4, 3)]),
]


@pytest.mark.parametrize(("params", "kept_layers"), CASES)
def test_the_term_is_the_mse_on_the_teachers_slice(teacher: TextModel, student: TextModel,
                                                   params: dict[str, Any],
                                                   kept_layers: list[tuple[int, int, int]]
                                                   ) -> None:
    recipe = HSK(stage="hidden", student_layers=2, teacher_layers=4, **params)
    assert recipe.kept_layers() == kept_layers
    assert recipe.student_taps() == [f"hidden.{m}" for m, _, _ in kept_layers]
    batch = collate(text_data()[:6])  # "it" has fewer candidates than 3 tokens
    s, t = read(student, recipe.student_taps(), batch), read(teacher, recipe.teacher_taps(),
                                                              batch)
    recipe.build(s, t)
    terms = recipe.terms(s, t, batch, STATE)
    assert {k: (v.weight, v.unit) for k, v in terms.items()} == {"hidden": (1.0, "examples")}

    texts = [d["input"] for d in text_data()[:6]]
    hs, _, mask = forward(student, texts)
    ht, _, _ = forward(teacher, texts)
    ids = teacher.encode(texts)["input_ids"]
    expected = torch.zeros(())
    for (m, g, a), tap in zip(kept_layers, recipe.teacher_taps(), strict=True):
        scores = hand_scores(teacher, ht, a) if params["tokens"] else None
        cut = hand_slice(ht[g], scores, mask, ids, params["tokens"], params["width"],
                         params["sep_token_id"])
        answer = t[tap]
        assert isinstance(answer, TokenSlice)
        for b, (positions, kept) in enumerate(cut):
            n = len(positions)
            assert answer.positions[b].tolist()[:n] == positions
            assert (answer.positions[b, n:] == -1).all()
            assert torch.equal(answer.kept[b, :n], kept.bool())
            assert not answer.kept[b, n:].any()
        expected = expected + hand_term(hs[m], ht[g], cut, recipe.projection, params["dropped"])
    torch.testing.assert_close(terms["hidden"].value, expected, rtol=1e-5, atol=1e-6)


def test_sep_and_padding_are_never_kept_and_short_rows_keep_every_candidate(
        teacher: TextModel) -> None:
    tap = slice_tap("hidden.4", attention=3, tokens=4, width=1.0, sep=SEP)
    batch = collate(text_data()[:5])
    cut = read(teacher, [tap], batch)[tap]
    ids = teacher.encode(batch["input"])["input_ids"]
    mask = teacher.encode(batch["input"])["attention_mask"]
    for b in range(5):
        kept = [p for p in cut.positions[b].tolist() if p >= 0]
        candidates = [j for j in range(ids.shape[1]) if mask[b, j] and ids[b, j] != SEP]
        assert set(kept) <= set(candidates)
        assert len(kept) == min(4, len(candidates))  # "it": [CLS] and "it" only
    with_sep = slice_tap("hidden.4", attention=3, tokens=4, width=1.0, sep=None)
    positions = read(teacher, [with_sep], batch)[with_sep].positions
    assert any(int(ids[b, p]) == SEP for b in range(5) for p in positions[b].tolist() if p >= 0)


def test_a_slice_needs_token_ids_to_drop_sep(teacher: TextModel) -> None:
    encoded = teacher.encode(["the cat"])
    tap = slice_tap("hidden.2", attention=1, tokens=2, width=0.5, sep=SEP)
    by_ids = read(teacher.model, [tap], dict(encoded))[tap]  # a batch of token ids
    by_text = read(teacher, [tap], {"input": ["the cat"]})[tap]
    assert torch.equal(by_ids.positions, by_text.positions)
    with pytest.raises(TapError, match=re.escape(f"tap '{tap}' excludes token id 3 and neither "
                                                 "the batch nor the model output has "
                                                 "input_ids; give sep=none")):
        read(WithoutIds(teacher), [tap], {"input": ["the cat"]})


class WithoutIds(nn.Module):
    """A text model that does not report its token ids."""

    accepts_output_flags = True

    def __init__(self, model: TextModel):
        super().__init__()
        self.inner = model

    def forward(self, input: list[str], **flags: bool) -> dict[str, Any]:
        output = self.inner(input, **flags)
        del output["input_ids"]
        return output


# -- parameters, stages, models -------------------------------------------------------------------
def test_defaults_are_the_papers_three_dimensional_slice() -> None:
    recipe = HSK(stage="hidden")
    assert (recipe.params.layers, recipe.params.tokens, recipe.params.width) == (1, 10, 0.1)
    assert recipe.kept_layers() == [(4, 12, 11)]  # TinyBERT_4 from BERT_BASE, top layer
    assert recipe.teacher_taps() == [
        "slice:hidden.12:attention=11:tokens=10:width=0.1:sep=102"]
    assert (recipe.params.dropped, recipe.params.token_attention) == ("zero", "uniform")


@pytest.mark.parametrize(("params", "message"), [
    ({"layers": 4, "student_layers": 2, "teacher_layers": 4},
     "layers (4) counts the student's hidden states kept from the top, the embeddings "
     "included: at most student_layers + 1 (3)"),
    ({"student_layers": 4, "teacher_layers": 6, "layer_map": [1, 2, 4, 6]},
     "token_attention 'uniform' reads the attention of teacher layer m N / M, which needs "
     "teacher_layers (6) to be a multiple of student_layers (4); use token_attention 'mapped'"),
    ({"width": 0}, "greater than 0"),
    ({"layer_map": [1, 2]}, "layer_map [1, 2] has 2 entries for 4 student layers"),
])
def test_bad_parameters_are_refused_naming_the_field(params: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        HSK(**params)
    # every token needs no attention layer, so any depths do
    assert HSK(student_layers=4, teacher_layers=6, layer_map=[1, 2, 4, 6], tokens=None)


def test_the_task_stage_runs_the_hidden_phase_then_the_prediction_phase(
        teacher: TextModel, student: TextModel) -> None:
    recipe = HSK(stage="task", student_layers=2, teacher_layers=4, tokens=3, sep_token_id=SEP,
                 intermediate_epochs=2, temperature=2.5)
    (first, n1), (second, n2) = recipe.phases(3)
    assert (first.params.stage, n1, second.params.stage, n2) == ("hidden", 2, "prediction", 1)
    assert [n for _, n in HSK(stage="task").phases(8)] == [6, 2]
    assert second.student_taps() == second.teacher_taps() == ["logits"]
    batch = collate(text_data()[:4])
    s, t = read(student, ["logits"], batch), read(teacher, ["logits"], batch)
    terms = second.terms(s, t, batch, STATE)
    expected = -(torch.softmax(t["logits"] / 2.5, -1)
                 * torch.log_softmax(s["logits"] / 2.5, -1)).sum(-1).mean()
    torch.testing.assert_close(terms["prediction"].value, expected)
    with pytest.raises(ValueError, match="hsk: stage 'task' needs at least 2 epochs"):
        recipe.phases(1)
    with pytest.raises(ValueError, match="in a 'phases' list give a phase with stage 'hidden' "
                                         "and then one with stage 'prediction'"):
        recipe.build(s, t)
    result = Distiller(student, teacher, recipe, epochs=3, **SETTINGS).fit(text_data())
    names = [(r["phase"], "hidden" in r, "prediction" in r) for r in result.history
             if r["kind"] == "train"]
    assert {n for n in names if n[0] == 0} == {(0, True, False)}
    assert {n for n in names if n[0] == 1} == {(1, False, True)}


def test_layer_map_auto_and_the_model_depths(teacher: TextModel, student: TextModel) -> None:
    recipe = HSK(student_layers=2, teacher_layers=4, layer_map="auto", tokens=3)
    assert recipe.layer_map_pending
    assert recipe.with_layer_map([2, 3]).kept_layers() == [(2, 3, 3)]
    with pytest.raises(ValueError, match="hsk: student_layers is 4 but the student has 2 "
                                         "transformer layers; set student_layers: 2"):
        HSK(student_layers=4, teacher_layers=4).wrap_student(student)
    with pytest.raises(ValueError, match="hsk: teacher_layers is 8 but the teacher has 4 "
                                         "transformer layers; set teacher_layers: 4"):
        HSK(student_layers=2, teacher_layers=8).teacher_source(student, teacher)
    assert build_recipe("hsk", stage="hidden", student_layers=2, teacher_layers=4).name == "hsk"
    assert HSK.architecture is not None and HSK().teacher_signal_varies() is None


# -- the teacher cache -----------------------------------------------------------------------------
def test_a_cache_of_the_slices_answers_and_trains_like_the_live_teacher(
        tmp_path: Path, folders: dict[str, str], teacher: TextModel) -> None:
    recipe = HSK(stage="task", student_layers=2, teacher_layers=4, layers=2, tokens=3,
                 width=0.3, sep_token_id=SEP, intermediate_epochs=1)
    taps = [tap for phase, _ in recipe.phases(2) for tap in phase.teacher_taps()]
    data = text_data()
    cache = TeacherCache.build(teacher, data, taps, tmp_path / "slices", batch_size=3,
                               shard_rows=3, progress=False)
    # Stored: the positions and the kept entries only, K = floor(0.3 x 3 x 32) = 28 per row.
    with safe_open(str(tmp_path / "slices" / "shard-00000.safetensors"), "pt") as shard:
        tap = taps[1]
        shapes = {key[len(tap):]: (list(shard.get_slice(key).get_shape()),
                                   shard.get_slice(key).get_dtype())
                  for key in shard.keys() if key.startswith(tap)}  # noqa: SIM118
    assert shapes == {".slice.positions": ([3, 3], "I32"), ".slice.values": ([3, 28], "F32"),
                      ".slice.entries": ([3, 28], "I32")}
    full = TeacherCache.build(teacher, data, ["hidden.2", "hidden.4"], tmp_path / "full",
                              batch_size=3, shard_rows=3, progress=False)
    assert full.nbytes > 2.5 * cache.nbytes

    batch = collate([data[i] for i in (5, 2, 0, 3)])  # lengths unlike the build's batches
    source = CachedTeacher(cache)
    source.bind(taps, torch.device("cpu"))
    answer, live = source(batch), read(teacher, taps, batch)
    for name in taps[:2]:
        assert torch.equal(answer[name].positions, live[name].positions)
        assert torch.equal(answer[name].kept, live[name].kept)
        # float32 rounding of batches padded to other lengths: within 1e-6 (+1e-6 relative)
        torch.testing.assert_close(answer[name].values, live[name].values, rtol=1e-6, atol=1e-6)
    student = build_hf_text((), 3, folders["student"])
    hidden = HSK(recipe.params, stage="hidden")
    s = read(student, hidden.student_taps(), batch)
    hidden.build(s, live)
    torch.testing.assert_close(hidden.terms(s, answer, batch, STATE)["hidden"].value,
                               hidden.terms(s, live, batch, STATE)["hidden"].value,
                               rtol=1e-6, atol=1e-6)

    runs = []
    for teacher_source in (FrozenTeacher(teacher), CachedTeacher(cache)):
        student = build_hf_text((), 3, folders["student"])
        result = Distiller(student, teacher_source, HSK(recipe.params), epochs=2,
                           batch_size=4, cpu=True, progress=False,
                           optimizer={"name": "sgd", "lr": 0.05}).fit(data)
        runs.append((result.history, snapshot(student)))
    (live_history, live_weights), (cached_history, cached_weights) = runs
    for a, b in zip(live_history, cached_history, strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for key, value in live_weights.items():
        torch.testing.assert_close(cached_weights[key], value, rtol=0, atol=1e-6)


def test_a_cache_built_with_another_slice_is_refused_naming_it(tmp_path: Path,
                                                               teacher: TextModel) -> None:
    data = text_data()
    built = HSK(stage="hidden", student_layers=2, teacher_layers=4, tokens=3, sep_token_id=SEP)
    TeacherCache.build(teacher, data, built.teacher_taps(), tmp_path / "cache", batch_size=4,
                       progress=False)
    other = HSK(built.params, tokens=2)
    with pytest.raises(CacheMismatch, match=re.escape(
            "the taps differ (the cache holds ['logits', "
            "'slice:hidden.4:attention=3:tokens=3:width=0.1:sep=3'], not "
            "['slice:hidden.4:attention=3:tokens=2:width=0.1:sep=3'])")):
        TeacherCache.build(teacher, data, other.teacher_taps(), tmp_path / "cache",
                           batch_size=4, progress=False)
    every = HSK(built.params, tokens=None).teacher_taps()
    with pytest.raises(CacheError, match=re.escape(
            f"tap '{every[0]}' keeps every token (tokens=all), as many as each batch has; "
            "cache the hidden state itself ('hidden.4') or a slice of a number of tokens")):
        TeacherCache.build(teacher, data, every, tmp_path / "every", batch_size=4,
                           progress=False)
