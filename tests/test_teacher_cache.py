"""The teacher-signal cache (``kdistill.cache``): a build reads back the teacher's outputs, a
cached run equals a live one, mismatches and damage are refused or repaired, a killed build
resumes to the same bytes, top-k logits with a tail bucket, recipes that cannot use a cache,
and the ``teacher.cache`` config and ``kdistill cache`` command. Tiny models built here."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch import nn

from kdistill import losses
from kdistill.batch import collate
from kdistill.cache import (
    CachedTeacher,
    CacheError,
    CacheMismatch,
    DamagedCache,
    HiddenSlice,
    TeacherCache,
)
from kdistill.cache.format import rank_shards
from kdistill.checkpoint import file_sha256
from kdistill.cli import main
from kdistill.config import (
    CacheConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TeacherConfig,
)
from kdistill.data.base import ArrayDataset
from kdistill.engine import Distiller
from kdistill.losses import TopKLogits, TopKLogitsError
from kdistill.models import build_model
from kdistill.models.hf_student import build_hf_student
from kdistill.models.hf_text import build_hf_text
from kdistill.recipes import build_recipe
from kdistill.run import build_data, train_run
from kdistill.settings import TrainerSettings
from kdistill.taps import TapReader
from kdistill.teachers import FrozenTeacher

CPU = torch.device("cpu")
SETTINGS = {"epochs": 2, "batch_size": 16, "cpu": True, "progress": False}


def mlp(seed: int, hidden: int = 16, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", (1, 8, 8), classes, hidden=[hidden])


@pytest.fixture
def train(digits_subset: Callable[..., ArrayDataset]) -> ArrayDataset:
    return digits_subset(96, labeled=48)


def build(teacher: nn.Module, data: Any, path: Path, taps: list[str] | None = None,
          **options: Any) -> TeacherCache:
    options = {"batch_size": 16, "shard_rows": 32, "progress": False, **options}
    return TeacherCache.build(teacher, data, taps or ["logits"], path, **options)


def cached(cache: TeacherCache, taps: list[str], live: nn.Module | None = None) -> CachedTeacher:
    source = CachedTeacher(cache, live=live)
    source.bind(taps, CPU)
    return source


def live_taps(model: nn.Module, batch: dict[str, Any], taps: list[str]) -> dict[str, Any]:
    with torch.no_grad(), TapReader(model.eval(), taps) as reader:
        return dict(reader(batch))


# --- build, then read ------------------------------------------------------------------------
def test_a_dense_fp32_cache_reads_back_exactly_the_teachers_taps(tmp_path: Path,
                                                                 train: ArrayDataset) -> None:
    teacher = mlp(1)
    cache = build(teacher, train, tmp_path / "cache", ["module:features"])
    assert len(cache.shards) == 3 and cache.taps == ("logits", "module:features")
    rows = torch.tensor([95, 3, 40, 0, 64, 33])  # from every shard, in no order
    taps = cached(cache, ["logits", "module:features"])(
        {"index": rows, "input": train.inputs[rows]})
    expected = live_taps(teacher, {"input": train.inputs[rows]}, ["logits", "module:features"])
    for name in ("logits", "module:features"):
        assert taps[name].dtype == torch.float32
        assert torch.equal(taps[name], expected[name])


@pytest.mark.parametrize(("dtype", "relative"), [("fp16", 2**-10), ("bf16", 2**-7)])
def test_16_bit_caches_round_the_taps_to_their_precision(tmp_path: Path, train: ArrayDataset,
                                                         dtype: str, relative: float) -> None:
    teacher = mlp(1)
    cache = build(teacher, train, tmp_path / dtype, dtype=dtype)
    rows = torch.arange(96)
    answered = cached(cache, ["logits"])({"index": rows})["logits"]
    exact = live_taps(teacher, {"input": train.inputs}, ["logits"])["logits"]
    error = ((answered - exact).abs() / exact.abs().clamp_min(1e-3)).max()
    assert answered.dtype == torch.float32 and 0 < error <= relative
    fp32 = build(teacher, train, tmp_path / "fp32")
    assert cache.nbytes < 0.6 * fp32.nbytes


def test_a_hidden_slice_keeps_the_chosen_positions_and_width(tmp_path: Path) -> None:
    teacher = text_teacher(tmp_path)
    data = text_data()
    cut = HiddenSlice(positions=(0, 1), width=5)
    cache = build(teacher, data, tmp_path / "cache", ["hidden.1"], hidden={"hidden.1": cut})
    rows = torch.tensor([2, 0])
    answer = cached(cache, ["hidden.1"])(collate([data[i] for i in rows]))["hidden.1"]
    full = live_taps(teacher, collate([data[i] for i in rows]), ["hidden.1"])["hidden.1"]
    assert torch.equal(answer, full[:, :2, :5])


# --- text: lengths that vary from batch to batch ---------------------------------------------
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat",
         "a", "dog", "ran", "to", "it", "big", "red"]
TEXTS = ["the cat sat", "a dog", "the big red dog ran to the mat", "it sat on a mat",
         "dog", "the cat ran to it", "red", "a big cat sat on the red mat"]


def save_bert(folder: Path, head: type = transformers.BertForSequenceClassification,
              labels: int = 3, seed: int = 0) -> Path:
    """A tiny BERT (hidden 16, 2 layers, no dropout) and its word-piece tokenizer."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=32, num_labels=labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    head(config).save_pretrained(folder)
    transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}).save_pretrained(
        folder)
    return folder


def text_teacher(tmp_path: Path) -> nn.Module:
    return build_hf_text((), 3, str(save_bert(tmp_path / "teacher")))


def text_data() -> list[dict[str, Any]]:
    return [{"input": text, "labels": torch.tensor(i % 3), "index": torch.tensor(i)}
            for i, text in enumerate(TEXTS)]


def test_token_taps_of_a_raw_text_teacher_come_back_as_long_as_the_batch_pads(
        tmp_path: Path) -> None:
    teacher = text_teacher(tmp_path)
    data = text_data()
    taps = ["hidden.1", "pooled", "embeddings"]
    cache = build(teacher, data, tmp_path / "cache", taps, batch_size=3, shard_rows=3)
    source = cached(cache, ["logits", *taps])
    for rows in ([1, 4, 6], [2, 0], [7, 3, 5, 1]):  # lengths unlike the build's batches
        batch = collate([data[i] for i in rows])
        answer, expected = source(batch), live_taps(teacher, batch, ["logits", *taps])
        tokens = teacher.encode(batch["input"])["attention_mask"].bool()
        assert answer["hidden.1"].shape == expected["hidden.1"].shape  # padded to the longest
        for name in ("hidden.1", "embeddings"):
            assert torch.allclose(answer[name][tokens], expected[name][tokens], atol=1e-6)
            assert not answer[name][~tokens].any()  # padding positions hold zeros
        for name in ("logits", "pooled"):
            assert torch.allclose(answer[name], expected[name], atol=1e-6)


def test_per_word_logits_follow_the_batchs_word_mask(tmp_path: Path) -> None:
    folder = save_bert(tmp_path / "tagger", transformers.BertForTokenClassification, labels=4)
    teacher = build_hf_text((), 4, str(folder), task="token_classification")
    words = [text.split() for text in TEXTS]
    data = [{"input": w, "labels": torch.zeros(len(w), dtype=torch.long), "index": torch.tensor(i)}
            for i, w in enumerate(words)]
    cache = build(teacher, data, tmp_path / "cache", batch_size=4, top_k=2)
    rows = [6, 4, 1]  # 1, 1 and 2 words
    batch = collate([data[i] for i in rows])
    answer = cached(cache, ["logits"])(batch)["logits"]
    dense = live_taps(teacher, batch, ["logits"])["logits"]
    assert isinstance(answer, TopKLogits) and answer.shape == dense.shape == (3, 2, 4)
    top = dense.topk(2, dim=-1)
    real = batch["attention_mask"].bool()
    assert torch.equal(answer.indices[real], top.indices[real])
    assert torch.allclose(answer.values[real], top.values[real], atol=1e-6)


# --- a cached run equals a live run ----------------------------------------------------------
def fit(teacher: Any, recipe: Any, data: Any, student: nn.Module,
        **settings: Any) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    result = Distiller(student, teacher, recipe, **{**SETTINGS, **settings}).fit(data)
    return result.history, {k: v.detach().clone() for k, v in student.state_dict().items()}


def assert_same_training(live: tuple[list, dict], from_cache: tuple[list, dict]) -> None:
    (live_history, live_weights), (cache_history, cache_weights) = live, from_cache
    for a, b in zip(live_history, cache_history, strict=True):
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    difference = max(float((live_weights[k] - cache_weights[k]).abs().max())
                     for k in live_weights)
    assert difference <= 1e-6


@pytest.mark.parametrize("recipe", [{"name": "hinton", "temperature": 2.0},
                                    {"name": "fitnets", "hint_epochs": 1}])
def test_a_dense_cache_trains_the_same_student_as_the_live_teacher(
        tmp_path: Path, train: ArrayDataset, recipe: dict[str, Any]) -> None:
    teacher = mlp(1, hidden=24)
    spec = dict(recipe)
    name = spec.pop("name")
    taps = build_recipe(name, **spec).teacher_taps()
    cache = build(teacher, train, tmp_path / "cache", taps)
    live = fit(FrozenTeacher(teacher), build_recipe(name, **spec), train, mlp(2))
    from_cache = fit(CachedTeacher(cache), build_recipe(name, **spec), train, mlp(2))
    assert any(record.get("kd", 0) > 0 or record.get("hint", 0) > 0 for record in live[0])
    assert_same_training(live, from_cache)


def test_a_text_student_learns_pooled_states_from_the_cache_as_from_the_live_teacher(
        tmp_path: Path) -> None:
    folder = save_bert(tmp_path / "teacher")
    teacher = build_hf_text((), 3, str(folder))
    data = text_data()
    recipe = {"terms": [{"loss": "forward_kl", "params": {"temperature": 2.0}},
                        {"loss": "cosine", "student": "pooled", "teacher": "pooled"}]}
    cache = build(teacher, data, tmp_path / "cache", ["pooled"], batch_size=3, shard_rows=3)

    def student() -> nn.Module:
        torch.manual_seed(5)
        return build_hf_student((), 3, str(folder), layers=[1])

    settings = {"batch_size": 4, "epochs": 2}
    live = fit(FrozenTeacher(teacher), build_recipe("composite", **recipe), data, student(),
               **settings)
    from_cache = fit(CachedTeacher(cache), build_recipe("composite", **recipe), data, student(),
                     **settings)
    assert live[0][0]["cosine"] > 0
    assert_same_training(live, from_cache)


def test_evaluation_asks_the_live_teacher_and_needs_one_for_agreement(
        tmp_path: Path, train: ArrayDataset, digits_subset: Callable[..., ArrayDataset]) -> None:
    teacher = mlp(1)
    cache = build(teacher, train, tmp_path / "cache")
    test = digits_subset(130)  # more samples than the cache holds: indices past its rows
    with_live = Distiller(mlp(2), CachedTeacher(cache, live=teacher), "hinton",
                          **SETTINGS).fit(train, test).evaluations()
    without = Distiller(mlp(2), CachedTeacher(cache), "hinton",
                        **SETTINGS).fit(train, test).evaluations()
    live = Distiller(mlp(2), teacher, "hinton", **SETTINGS).fit(train, test).evaluations()
    assert with_live[-1]["eval_agreement"] == live[-1]["eval_agreement"]
    assert "eval_agreement" not in without[-1]
    assert without[-1]["eval_accuracy"] == live[-1]["eval_accuracy"]


# --- what a cache refuses --------------------------------------------------------------------
def test_a_cache_for_another_teacher_data_taps_or_storage_is_refused_naming_it(
        tmp_path: Path, train: ArrayDataset) -> None:
    path = tmp_path / "cache"
    teacher = mlp(1)
    build(teacher, train, path)
    other_data = ArrayDataset(train.inputs.clone(), train.labels)
    other_data.inputs[7, 0, 0, 0] += 1
    cases = {"the teacher differs": (mlp(9), train, {}),
             "the data differ (96 samples": (teacher, other_data, {}),
             "the taps differ (the cache holds ['logits'], not ['module:features'])":
                 (teacher, train, {"taps": ["module:features"]}),
             "the storage differs (fp32, dense logits in the cache, fp16, top-3 logits asked)":
                 (teacher, train, {"dtype": "fp16", "top_k": 3})}
    for phrase, (model, data, options) in cases.items():
        with pytest.raises(CacheMismatch) as error:
            build(model, data, path, **options)
        message = str(error.value)
        assert phrase in message and str(path) in message
        assert message.endswith("delete the folder to build it anew, or point the cache to "
                                "another folder")
        assert message.count(" differ") == 1
    # Hidden labels are not part of what the teacher reads: the cache still fits.
    relabelled = ArrayDataset(train.inputs, torch.full_like(train.labels, -100))
    assert build(teacher, relabelled, path).build_seconds is None


def test_a_teacher_input_the_data_lacks_leaves_the_cache_fitting(
        tmp_path: Path, train: ArrayDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cache"
    teacher = mlp(1)
    assert build(teacher, train, path).build_seconds is not None
    # kdistill learns to pass a new Hugging Face input (as decoder_input_ids once came): the
    # samples have no such key, so what the teacher reads of them, and the cache, are the same.
    monkeypatch.setattr("kdistill.cache.format.HF_INPUT_KEYS", ("input_ids", "new_input"))
    assert build(teacher, train, path).build_seconds is None
    teacher.batch_inputs = ("labels",)  # a teacher that reads the labels reads other data
    with pytest.raises(CacheMismatch, match="the data differ"):
        build(teacher, train, path)


def test_opening_checks_what_it_is_given_and_binding_checks_the_taps(
        tmp_path: Path, train: ArrayDataset) -> None:
    path = tmp_path / "cache"
    build(mlp(1), train, path)
    with pytest.raises(CacheMismatch, match="the teacher differs"):
        TeacherCache.open(path, teacher=mlp(9))
    with pytest.raises(CacheMismatch, match="the teacher differs"):
        CachedTeacher(path, live=mlp(9))
    with pytest.raises(CacheMismatch, match="the data differ"):
        TeacherCache.open(path, data=ArrayDataset(train.inputs[:95], train.labels[:95]))
    source = CachedTeacher(path)
    with pytest.raises(CacheMismatch, match=r"holds the taps \['logits'\], not \['pooled'\], "
                                            "which the recipe reads"):
        source.bind(["pooled", "logits"], CPU)
    source.bind(["logits"], CPU)
    with pytest.raises(CacheError, match="sample index 96 is outside the 96 samples"):
        source({"index": torch.tensor([3, 96])})
    with pytest.raises(CacheError, match="the batch has none"):
        source({"input": train.inputs[:2]})
    with pytest.raises(CacheError, match="no teacher cache in"):
        TeacherCache.open(tmp_path / "nothing")


@pytest.mark.parametrize(("recipe", "reason"), [
    ("denoise", "its teacher reads augmented copies of each batch"),
    ("mean_teacher", "its teacher is made from the student and changes with every step"),
    ("dml", "its teachers are peers that train with the student"),
    ("bdkd", "its teachers are peers that train with the student"),
    ("atsen", "its teachers are peers that train with the student"),
])
def test_recipes_whose_teacher_signal_changes_are_refused_with_the_reason(
        tmp_path: Path, train: ArrayDataset, recipe: str, reason: str) -> None:
    cache = build(mlp(1), train, tmp_path / "cache")
    with pytest.raises(ValueError) as error:
        Distiller(mlp(2), CachedTeacher(cache), recipe, **SETTINGS)
    assert str(error.value) == (f"recipe '{recipe}' cannot read a teacher cache: {reason}, so "
                                "the teacher must run live")


def test_which_recipes_a_cache_serves() -> None:
    fixed = ["hinton", "dkd", "fitnets", "annealing", "continuation", "daft", "oracle", "deit",
             "ce", "okdhp", "adversarial"]
    assert all(build_recipe(name).teacher_signal_varies() is None for name in fixed)
    assert build_recipe("regression_kd").teacher_signal_varies() == \
        "its teacher reads noisy copies of each input"
    assert build_recipe("regression_kd", copies=0).teacher_signal_varies() is None


# --- damage and interruption -----------------------------------------------------------------
def shard_hashes(path: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(path.glob("shard-*.safetensors"))}


class Failure(RuntimeError):
    pass


def test_a_build_killed_midway_resumes_to_the_bytes_of_an_uninterrupted_one(
        tmp_path: Path, train: ArrayDataset) -> None:
    teacher = mlp(1)
    whole = tmp_path / "whole"
    build(teacher, train, whole, ["module:features"], dtype="bf16")
    calls = []

    def count(*_: Any) -> None:
        calls.append(1)
        if len(calls) == 5:  # the 5th batch: shards 0 and 1 (2 batches each) are done
            raise Failure("killed")

    path = tmp_path / "resumed"
    hook = teacher.register_forward_hook(count)
    with pytest.raises(Failure):
        build(teacher, train, path, ["module:features"], dtype="bf16")
    assert sorted(p.name for p in path.glob("shard-*")) == [
        "shard-00000.json", "shard-00000.safetensors", "shard-00001.json",
        "shard-00001.safetensors"]
    assert not (path / "manifest.json").exists()
    with pytest.raises(CacheError, match="is an unfinished build"):
        TeacherCache.open(path)
    # A kill -9 can also leave a shard's temporary file, or a shard renamed into place whose
    # record was not yet written: both count as not built.
    (path / ".shard-00002.safetensors.tmp-99999").write_bytes(b"half a shard")
    (path / "shard-00001.json").unlink()
    calls.clear()
    resumed = build(teacher, train, path, ["module:features"], dtype="bf16", batch_size=8)
    hook.remove()
    assert len(calls) == 4  # shards 1 and 2 ran, in the plan's batches of 16 (not 8)
    assert not list(path.glob(".*tmp*"))
    assert resumed.build_seconds is not None
    assert shard_hashes(path) == shard_hashes(whole) and len(shard_hashes(path)) == 3
    assert (path / "manifest.json").read_text() == (whole / "manifest.json").read_text()


def test_a_damaged_shard_is_refused_by_name_and_rebuilt_by_the_next_build(
        tmp_path: Path, train: ArrayDataset, caplog: pytest.LogCaptureFixture) -> None:
    teacher = mlp(1)
    path = tmp_path / "cache"
    build(teacher, train, path)
    before = shard_hashes(path)
    shard = path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedCache) as error:
        TeacherCache.open(path)
    assert f"{shard} fails its SHA-256 check; run the build again to rebuild that shard" in \
        str(error.value)
    rebuilt = build(teacher, train, path)
    assert rebuilt.build_seconds is not None and shard_hashes(path) == before
    assert f"shard 1 is damaged ({shard} fails its SHA-256 check); building it again" in \
        caplog.text
    TeacherCache.open(path)  # verifies every checksum


def test_a_build_shows_its_progress_with_an_eta(tmp_path: Path, train: ArrayDataset,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    build(mlp(1), train, tmp_path / "cache", progress=True)
    assert re.search(r"teacher cache: 6/6 \(100%\) elapsed \d+:\d\d:\d\d, eta \d+:\d\d:\d\d",
                     capsys.readouterr().err)


def test_processes_build_striped_shards_that_cover_every_shard_once() -> None:
    assert rank_shards(7, 0, 3) == [0, 3, 6]
    assert rank_shards(7, 2, 3) == [2, 5]
    shares = [rank_shards(10, rank, 4) for rank in range(4)]
    assert sorted(s for share in shares for s in share) == list(range(10))
    assert rank_shards(2, 3, 4) == []


# --- top-k logits ----------------------------------------------------------------------------
def topk_of(logits: torch.Tensor, k: int) -> TopKLogits:
    values, indices = logits.topk(k, dim=-1)
    tail = logits.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return TopKLogits(values, indices, tail, logits.shape[-1])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_bucket_kl_matches_a_hand_computation(temperature: float) -> None:
    teacher = [3.0, 1.0, 0.5, -1.0, 2.0]  # kept: classes 0 and 4
    student = [1.0, 0.0, 1.5, 0.5, 0.2]
    t = temperature
    tail_classes = [1, 2, 3]
    # The teacher's tail logit: log sum exp over the tail; tempered as if spread evenly.
    tail = math.log(sum(math.exp(teacher[j]) for j in tail_classes))
    weights = [math.exp(teacher[0] / t), math.exp(teacher[4] / t),
               3 * math.exp((tail - math.log(3)) / t)]
    p = [w / sum(weights) for w in weights]
    q_all = [math.exp(s / t) for s in student]
    q = [q_all[0] / sum(q_all), q_all[4] / sum(q_all),
         sum(q_all[j] for j in tail_classes) / sum(q_all)]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    z_t, z_s = torch.tensor([teacher]), torch.tensor([student])
    got = losses.topk_kl(z_s, topk_of(z_t, 2), t)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(losses.kd(z_s, topk_of(z_t, 2), t)) == pytest.approx(t * t * expected, rel=1e-6)
    if t == 1.0:  # exact at T = 1: the tail bucket's mass is 1 - sum of the kept ones
        p_dense = F.softmax(z_t, -1)[0]
        assert p[2] == pytest.approx(1 - float(p_dense[0] + p_dense[4]), rel=1e-6)


def test_top_k_equals_dense_when_the_tail_is_negligible_or_flat() -> None:
    torch.manual_seed(0)
    student = torch.randn(6, 5, 50)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[2, 3:] = False
    negligible = torch.full((6, 5, 50), -40.0) + torch.randn(6, 5, 50)
    negligible[..., :8] = torch.randn(6, 5, 8) * 2
    dense = losses.forward_kl(student, negligible, mask)
    assert float(losses.forward_kl(student, topk_of(negligible, 8), mask)) == \
        pytest.approx(float(dense), abs=1e-6)
    # A flat tail is what the tempered tail assumes: the teacher's tempered buckets are exact
    # at any temperature, and so is the KL when the student's tail is flat too (nothing
    # diverges inside the tail).
    flat = torch.full((6, 5, 50), -1.5)
    flat[..., :8] = torch.randn(6, 5, 8) + 6  # the top 8, above the flat tail
    flat_student = torch.full((6, 5, 50), 0.3)
    flat_student[..., :8] = torch.randn(6, 5, 8)
    top = topk_of(flat, 8)
    for temperature in (0.5, 4.0):
        p = F.softmax(flat / temperature, dim=-1)
        buckets = torch.cat([p.gather(-1, top.indices), p[..., 8:].sum(-1, keepdim=True)], -1)
        assert torch.allclose(top.bucket_log_probs(temperature).exp(), buckets, atol=1e-6)
        assert float(losses.kd(flat_student, top, temperature)) == pytest.approx(
            float(losses.kd(flat_student, flat, temperature)), rel=1e-5)


def test_padding_rows_of_top_k_logits_give_no_nan_gradient() -> None:
    student = torch.randn(2, 3, 6, requires_grad=True)
    teacher = topk_of(torch.randn(2, 3, 6), 2)
    zeros = TopKLogits(teacher.values.clone(), teacher.indices.clone(), teacher.tail.clone(), 6)
    zeros.values[1, 2], zeros.indices[1, 2], zeros.tail[1, 2] = 0, 0, 0  # a cache's padding
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    losses.forward_kl(student, zeros, mask).backward()
    assert torch.isfinite(student.grad).all() and not student.grad[1, 2].any()


def test_losses_that_need_dense_logits_say_so_for_top_k() -> None:
    z = torch.randn(4, 10)
    message = (r"is not available: the teacher's logits are top-k logits \(k=3 of 10 classes, "
               r"from a teacher cache\) and only the KL losses kd and forward_kl \(and the "
               r"token-level tvd and generalized_jsd\) read them; build the cache with dense "
               r"logits \(no top_k\) for this recipe")
    with pytest.raises(TopKLogitsError, match=message):
        losses.dkd(z, topk_of(z, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TopKLogitsError, match="'argmax' " + message):  # deit's hard targets
        topk_of(z, 3).argmax(dim=-1)


def test_a_top_k_cache_trains_hinton_like_dense_logits_when_the_tail_is_negligible(
        tmp_path: Path, train: ArrayDataset) -> None:
    class Sharp(nn.Module):  # a teacher whose logits leave almost nothing outside its top 4
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.net(x)
            return torch.where(torch.arange(10) < 4, z, torch.full_like(z, -30.0))

    teacher = Sharp()
    top = build(teacher, train, tmp_path / "top", top_k=4)
    recipe = {"name": "hinton", "temperature": 1.0}
    live = fit(FrozenTeacher(teacher), build_recipe(**recipe), train, mlp(2))
    from_cache = fit(CachedTeacher(top), build_recipe(**recipe), train, mlp(2))
    assert_same_training(live, from_cache)


def test_top_k_logits_of_a_large_vocabulary_take_a_fraction_of_the_space(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(8, 2000)
    data = [{"input": torch.randn(8), "index": torch.tensor(i)} for i in range(64)]
    dense = build(teacher, data, tmp_path / "dense")
    top = build(teacher, data, tmp_path / "top", top_k=16, dtype="fp16")
    assert dense.nbytes / top.nbytes > 60  # 8000 bytes a row against 16 x (2 + 4) + 4


# --- config and command line -----------------------------------------------------------------
def digits_config(tmp_path: Path, recipe: dict[str, Any], cache: str | None) -> RunConfig:
    checkpoint = tmp_path / "teacher.safetensors"
    if not checkpoint.exists():
        torch.manual_seed(0)
        teacher = build_model("mlp", (1, 8, 8), 10, size="tiny")
        save_file(teacher.state_dict(), str(checkpoint))
    return RunConfig(
        data=DataConfig(name="digits"), student=ModelConfig(name="mlp", size="tiny"),
        teacher=TeacherConfig(model=ModelConfig(name="mlp", size="tiny"),
                              checkpoint=str(checkpoint), cache=cache),
        recipe=recipe, trainer=TrainerSettings(epochs=1, progress=False))


def test_teacher_cache_is_built_on_first_use_then_reused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows: list[int] = []
    forward = FrozenTeacher.__call__

    def counting(self: FrozenTeacher, batch: dict[str, Any]) -> Any:
        rows.append(len(batch["index"]))
        return forward(self, batch)

    monkeypatch.setattr(FrozenTeacher, "__call__", counting)
    config = digits_config(tmp_path, {"name": "hinton"}, str(tmp_path / "cache"))
    data = build_data(config.data)
    _, first = train_run(config, data)
    built = sum(rows)
    rows.clear()
    _, second = train_run(config, data)
    assert built == len(data.train) + len(data.test)  # the cache's build and the evaluation
    assert sum(rows) == len(data.test)  # the evaluation only: the cache was reused
    steps = [[r for r in fit.history if r["kind"] == "train"] for fit in (first, second)]
    assert steps[0] == steps[1]
    assert first.evaluations()[-1]["eval_agreement"] == \
        second.evaluations()[-1]["eval_agreement"]


def test_teacher_cache_config_refuses_recipes_it_cannot_serve(tmp_path: Path) -> None:
    data = build_data(DataConfig(name="digits"))
    config = digits_config(tmp_path, {"name": "denoise"}, "somewhere")
    with pytest.raises(ConfigError) as error:
        train_run(config, data)
    assert str(error.value) == (
        "teacher.cache: recipe 'denoise' cannot read a teacher cache: its teacher reads "
        "augmented copies of each batch, so the teacher must run live; remove teacher.cache")
    config = digits_config(tmp_path, {"name": "okdhp"}, "somewhere")
    with pytest.raises(ConfigError, match="teacher.cache: no phase reads a teacher"):
        train_run(config, data)
    assert not Path("somewhere").exists()
    assert CacheConfig.model_validate("x").path == "x"


def test_kdistill_cache_prints_the_size_then_reuses_the_cache(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = digits_config(tmp_path, {"name": "dkd"}, None)
    assert config.teacher is not None
    raw = {"output_dir": str(tmp_path / "runs"), "data": {"name": "digits"},
           "student": {"name": "mlp", "size": "tiny"}, "recipe": {"name": "dkd"},
           "teacher": {"model": {"name": "mlp", "size": "tiny"},
                       "checkpoint": config.teacher.checkpoint}}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw))  # YAML reads JSON
    target = tmp_path / "cache"
    overrides = ["--set", f"teacher.cache.path={target}", "--set", "teacher.cache.top_k=4"]
    assert main(["cache", str(path)]) == 2
    assert "teacher.cache: not set" in capsys.readouterr().err
    assert main(["cache", str(path), *overrides[:2]]) == 0
    size = sum(p.stat().st_size for p in target.glob("shard-*.safetensors"))
    out = capsys.readouterr().out
    assert out.startswith(f"teacher cache {target}: 1347 samples, {size / 1e6:.2f} MB ({size} "
                          "bytes) in 1 shard(s), fp32, dense logits; built in ")
    assert main(["cache", str(path), *overrides[:2]]) == 0
    assert capsys.readouterr().out.endswith("reused: it matches the teacher, data and taps\n")
    assert main(["cache", str(path), *overrides]) == 2
    assert "the storage differs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no student was trained
