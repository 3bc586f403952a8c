"""Automatic layer mapping: linear CKA against the paper's HSIC form, its invariances, the
CKA matrix of tiny BERTs (pooling over real tokens, models with themselves, students copied
from teacher layers), the dynamic programme against brute force, and ``kdistill layermap``.
Tiny BERTs and word-piece vocabularies are built here (see test_hf_text)."""

from __future__ import annotations

import csv
import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.torch import save_file
from test_hf_text import bert_config, save_tokenizer
from torch import nn
from torch.utils.data import IterableDataset

from kdistill import cli, run
from kdistill.cache import CachedTeacher
from kdistill.config import RunConfig, parse_config
from kdistill.data import TextDataset
from kdistill.engine.phases import resolve_layer_maps
from kdistill.errors import KdistillError
from kdistill.layermap import (
    LayerMap,
    LayerMapError,
    auto_layer_map,
    cka_matrix,
    compare_layers,
    linear_cka,
    map_total,
    propose_layer_map,
    sample_batches,
    uniform_layer_map,
)
from kdistill.models import build_model
from kdistill.models.hf_student import student_from_teacher
from kdistill.models.hf_text import HFTextEncoder

TEXTS = ["the cat sat on the mat", "a big red dog ran", "the dog sat", "it ran to a mat",
         "the big cat", "a red mat", "the dog ran to the cat", "it sat on a big red mat",
         "the cat ran", "a dog", "the red cat sat on it", "a big dog ran to the mat"]


def random_features(seed: int, rows: int, columns: int) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA as the paper first writes it: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with
    HSIC(K, L) = tr(K H L H) / (n - 1)^2, H = I - 11^T / n, K = X X^T, L = Y Y^T."""
    n = x.shape[0]
    centring = np.eye(n) - np.ones((n, n)) / n

    def hsic(k: np.ndarray, m: np.ndarray) -> float:
        return float(np.trace(k @ centring @ m @ centring)) / (n - 1) ** 2

    k, m = x @ x.T, y @ y.T
    return hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m))


# --- linear CKA -------------------------------------------------------------------------------

def test_linear_cka_equals_the_hsic_form_with_centring_matrices() -> None:
    x = random_features(0, 30, 5) + 3.0  # uncentred on purpose
    y = x @ random_features(1, 5, 7) + 0.5 * random_features(2, 30, 7)
    expected = hsic_cka(x.numpy(), y.numpy())
    assert 0.3 < expected < 0.99
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    assert linear_cka(y, x) == pytest.approx(expected, rel=1e-10)


def test_orthogonal_transforms_isotropic_scaling_and_shifts_leave_cka_unchanged() -> None:
    x, y = random_features(0, 40, 6), random_features(1, 40, 6) + random_features(0, 40, 6)
    orthogonal, _ = torch.linalg.qr(random_features(2, 6, 6))
    before = linear_cka(x, y)
    assert linear_cka(x @ orthogonal * 3.5 + 2.0, y) == pytest.approx(before, rel=1e-10)
    assert linear_cka(x, y @ orthogonal * 0.01) == pytest.approx(before, rel=1e-10)
    assert linear_cka(x, x @ orthogonal * 7.0) == pytest.approx(1.0, abs=1e-12)
    stretched = x * torch.tensor([10.0, 1, 1, 1, 1, 1], dtype=torch.float64)  # not isotropic
    assert abs(linear_cka(stretched, x) - 1.0) > 0.05


def test_independent_random_features_are_far_from_alike() -> None:
    assert linear_cka(random_features(0, 200, 5), random_features(1, 200, 5)) < 0.1


def test_features_that_do_not_vary_have_cka_zero() -> None:
    x = random_features(0, 10, 3)
    assert linear_cka(x, torch.ones(10, 4)) == 0.0


def test_cka_refuses_features_of_different_inputs_or_a_single_input() -> None:
    with pytest.raises(LayerMapError, match=r"^linear CKA compares features \[n, p\] and "
                                            r"\[n, q\] of the same n inputs; got \(10, 3\) "
                                            r"and \(9, 3\)$"):
        linear_cka(random_features(0, 10, 3), random_features(1, 9, 3))
    with pytest.raises(LayerMapError, match=r"needs at least 2 inputs .*; got 1$"):
        linear_cka(random_features(0, 1, 3), random_features(1, 1, 3))


# --- the map ----------------------------------------------------------------------------------

def brute_force(matrix: torch.Tensor, pin_last: bool) -> tuple[float, list[int]]:
    """The best total over every map [0, strictly increasing teacher layers 1..N], ending on
    teacher layer N when ``pin_last``."""
    rows, columns = matrix.shape
    maps = [[0, *chosen] for chosen in itertools.combinations(range(1, columns), rows - 1)
            if not (pin_last and chosen and chosen[-1] != columns - 1)]
    totals = [sum(float(matrix[m, n]) for m, n in enumerate(mapping)) for mapping in maps]
    best = max(range(len(maps)), key=totals.__getitem__)
    return totals[best], maps[best]


@pytest.mark.parametrize(("rows", "columns"), [(1, 1), (1, 4), (2, 2), (2, 5), (3, 4), (3, 7),
                                               (4, 6), (5, 7), (4, 4)])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("pin_last", [True, False])
def test_the_dynamic_programme_finds_the_best_monotone_map(rows: int, columns: int,
                                                           seed: int, pin_last: bool) -> None:
    matrix = torch.rand(rows, columns, generator=torch.Generator().manual_seed(seed))
    total, best = brute_force(matrix, pin_last)
    proposed = propose_layer_map(matrix, pin_last)
    assert proposed == best
    assert map_total(matrix, proposed) == pytest.approx(total)


def test_the_map_is_monotone_where_each_row_s_best_column_is_not() -> None:
    matrix = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                           [0.0, 0.1, 0.9, 0.0],   # alone, student 1 would take teacher 2
                           [0.0, 0.0, 1.0, 0.2]])  # but student 2 loses more without it
    assert propose_layer_map(matrix, pin_last=False) == [0, 1, 2]
    assert map_total(matrix, [0, 1, 2]) == pytest.approx(2.1)
    # pinned to teacher 3, student 1 is free to take teacher 2 (2.1 against [0, 1, 3]'s 1.3)
    assert propose_layer_map(matrix) == [0, 2, 3]
    assert map_total(matrix, [0, 2, 3]) == pytest.approx(2.1)


def test_the_pinned_map_ends_on_the_teacher_s_last_layer_at_a_cost() -> None:
    matrix = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                           [0.0, 0.9, 0.1, 0.0],
                           [0.0, 0.0, 1.0, 0.1]])   # free: [0, 1, 2], 2.9
    assert propose_layer_map(matrix, pin_last=False) == [0, 1, 2]
    assert propose_layer_map(matrix) == [0, 1, 3]
    assert map_total(matrix, [0, 1, 3]) == pytest.approx(2.0)


def test_embeddings_map_to_embeddings_whatever_the_scores() -> None:
    matrix = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    assert propose_layer_map(matrix) == [0, 2]


def test_a_student_deeper_than_its_teacher_has_no_map() -> None:
    with pytest.raises(LayerMapError, match=r"^layermap: the student has 3 layers and the "
                                            r"teacher 2; a map to distinct teacher layers in "
                                            r"order needs a teacher at least as deep as the "
                                            r"student$"):
        propose_layer_map(torch.rand(4, 3))


@pytest.mark.parametrize(("student", "teacher", "expected"),
                         [(4, 12, [0, 3, 6, 9, 12]), (6, 12, [0, 2, 4, 6, 8, 10, 12]),
                          (2, 3, [0, 1, 3]), (3, 3, [0, 1, 2, 3]), (2, 5, [0, 2, 5]),
                          (0, 4, [0])])
def test_the_uniform_map_is_tinybert_s(student: int, teacher: int, expected: list[int]) -> None:
    assert uniform_layer_map(student, teacher) == expected


def test_a_layer_map_holds_the_three_maps_and_their_totals() -> None:
    matrix = torch.tensor([[1.0, 0.2, 0.1, 0.0],
                           [0.3, 0.2, 0.9, 0.1],
                           [0.1, 0.2, 0.8, 0.0]])
    result = LayerMap.from_matrix(matrix, samples=7)
    assert (result.proposed, result.free, result.uniform) == ([0, 2, 3], [0, 1, 2], [0, 1, 3])
    assert result.proposed_total == pytest.approx(1.9)
    assert result.free_total == pytest.approx(2.0)
    assert result.uniform_total == pytest.approx(1.2)
    assert (result.chosen(True), result.chosen(False)) == ([0, 2, 3], [0, 1, 2])
    assert result.samples == 7


# --- CKA between models -----------------------------------------------------------------------

def tiny_bert(layers: int, seed: int = 0,
              dropout: float = 0.0) -> transformers.BertForSequenceClassification:
    """A tiny BERT whose layers differ: with BERT's usual initialisation (std 0.02) a random
    layer barely changes its input and every pair of layers has CKA 0.9999."""
    torch.manual_seed(seed)
    config = bert_config(layers, hidden=32)
    config.initializer_range = 0.3
    config.hidden_dropout_prob = dropout
    return transformers.BertForSequenceClassification(config).eval()


def save_bert(folder: Path, layers: int) -> Path:
    """A :func:`tiny_bert` with its tokenizer, saved together in ``folder``."""
    tiny_bert(layers).save_pretrained(folder)
    return save_tokenizer(folder)


def token_batches(folder: Path, texts: list[str], size: int = 4,
                  max_length: int = 32) -> list[dict[str, Any]]:
    """Hugging Face style batches (input_ids, attention_mask, ...) of ``texts``."""
    encoder = HFTextEncoder.from_folder(folder, max_length=max_length)
    return [encoder(texts[i:i + size]) for i in range(0, len(texts), size)]


@pytest.fixture
def tokenizer(tmp_path: Path) -> Path:
    return save_tokenizer(tmp_path / "tokenizer")


def hand_pooled(model: nn.Module, batches: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Each hidden state's mean over the real tokens, computed here independently."""
    per_batch = []
    with torch.no_grad():
        for batch in batches:
            states = model(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].unsqueeze(-1).float()
            per_batch.append([(h * mask).sum(1) / mask.sum(1) for h in states])
    return [torch.cat(layer) for layer in zip(*per_batch, strict=True)]


def test_the_cka_matrix_compares_mean_pooled_real_tokens(tokenizer: Path) -> None:
    student, teacher = tiny_bert(2, seed=1), tiny_bert(3, seed=2)
    batches = token_batches(tokenizer, TEXTS)
    matrix = cka_matrix(student, teacher, batches)
    assert matrix.shape == (3, 4)
    pooled_student, pooled_teacher = hand_pooled(student, batches), hand_pooled(teacher, batches)
    expected = torch.tensor([[linear_cka(s, t) for t in pooled_teacher]
                             for s in pooled_student], dtype=torch.float64)
    torch.testing.assert_close(matrix, expected, atol=1e-6, rtol=0)


def test_padding_does_not_change_the_matrix(tokenizer: Path) -> None:
    student, teacher = tiny_bert(2, seed=1), tiny_bert(3, seed=2)
    tight = cka_matrix(student, teacher, token_batches(tokenizer, TEXTS, size=4))
    padded = [{**b, **{k: torch.nn.functional.pad(b[k], (0, 5)) for k in b}}
              for b in token_batches(tokenizer, TEXTS, size=4)]
    assert padded[0]["attention_mask"].shape[1] > 9
    torch.testing.assert_close(cka_matrix(student, teacher, padded), tight, atol=1e-6,
                               rtol=0)


def test_a_model_against_itself_has_ones_on_the_diagonal(tokenizer: Path) -> None:
    model = tiny_bert(3, dropout=0.5)
    model.train()  # compared in eval mode (no dropout) and left as it was
    matrix = cka_matrix(model, model, token_batches(tokenizer, TEXTS))
    torch.testing.assert_close(matrix.diagonal(), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(matrix, matrix.T)
    assert matrix.min() > 0 and (matrix - torch.eye(4)).max() < 0.95
    assert model.training
    assert propose_layer_map(matrix) == [0, 1, 2, 3]


def test_a_student_of_the_teacher_s_first_layers_maps_onto_them(tokenizer: Path) -> None:
    teacher = tiny_bert(4)
    student = student_from_teacher(teacher, layers=[0, 1])  # hidden.1, .2 are the teacher's
    result = compare_layers(student, teacher, token_batches(tokenizer, TEXTS))
    assert result.samples == len(TEXTS)
    assert result.free == [0, 1, 2]
    assert result.free_total == pytest.approx(3.0, abs=1e-6)
    assert result.proposed == [0, 1, 4]  # pinned: the last layer learns the teacher's last
    assert result.proposed_total == pytest.approx(2.0 + float(result.matrix[2, 4]), abs=1e-6)
    assert result.proposed_total < result.free_total - 0.01
    assert result.uniform == [0, 2, 4]
    assert result.uniform_total < result.proposed_total - 0.01


def pass_through(layer: nn.Module) -> None:
    """Make a BERT layer (almost exactly) the identity: with its two output projections zero,
    each sub-layer gives LayerNorm(x) = x for its already normalised input x."""
    for dense in (layer.attention.output.dense, layer.output.dense):
        nn.init.zeros_(dense.weight)
        nn.init.zeros_(dense.bias)


def test_a_student_of_later_teacher_layers_skips_the_first(tokenizer: Path) -> None:
    teacher = tiny_bert(3)
    pass_through(teacher.bert.encoder.layer[0])
    # Student layers 0 and 1 are teacher layers 1 and 2; as teacher layer 0 passes its input
    # through, they see the inputs they see in the teacher: student hidden.1, .2 are teacher
    # hidden.2, .3.
    student = student_from_teacher(teacher, layers=[1, 2])
    result = compare_layers(student, teacher, token_batches(tokenizer, TEXTS))
    assert result.proposed == [0, 2, 3]
    assert result.uniform == [0, 1, 3]
    assert result.matrix[1, 2] == pytest.approx(1.0, abs=1e-5)
    assert result.matrix[2, 3] == pytest.approx(1.0, abs=1e-5)
    assert result.matrix[1, 1] < 0.999


def text_dataset(texts: list[str] = TEXTS) -> TextDataset:
    return TextDataset(texts, torch.arange(len(texts)) % 2)


def test_text_models_tokenising_for_themselves_pool_their_own_tokens(tmp_path: Path) -> None:
    folder = save_bert(tmp_path / "bert", layers=2)
    text_model = build_model("hf_text", (), 3, path=str(folder))
    network = text_model.model
    raw = cka_matrix(text_model, text_model, sample_batches(text_dataset(), 12, batch_size=5))
    ids = cka_matrix(network, network, token_batches(folder, TEXTS, size=5))
    torch.testing.assert_close(raw, ids, atol=1e-6, rtol=0)


def test_auto_layer_map_on_text_models_built_from_a_folder(tmp_path: Path) -> None:
    folder = save_bert(tmp_path / "bert", layers=4)
    teacher = build_model("hf_text", (), 3, path=str(folder))
    student = build_model("hf_student", (), 3, teacher=str(folder), layers=[0, 1])
    assert auto_layer_map(student, teacher, text_dataset(), samples=10) == [0, 1, 4]
    assert auto_layer_map(student, teacher, text_dataset(), samples=10,
                          pin_last=False) == [0, 1, 2]


def test_a_model_without_hidden_states_is_refused() -> None:
    batch = {"input": torch.randn(4, 3), "labels": torch.zeros(4, dtype=torch.long)}
    with pytest.raises(LayerMapError, match=r"^layermap: the student \(Linear\) gives no hidden "
                                            r"states \(the model output \(Tensor\) has no "
                                            r"hidden_states\); layer mapping compares the "
                                            r"hidden states \(hidden.<i>\) of transformer-like "
                                            r"models$"):
        cka_matrix(nn.Linear(3, 2), nn.Linear(3, 2), [batch])


def test_no_inputs_is_refused() -> None:
    with pytest.raises(LayerMapError, match="^layermap: no inputs to compare the models on$"):
        cka_matrix(nn.Linear(3, 2), nn.Linear(3, 2), [])


# --- drawing the inputs -----------------------------------------------------------------------

def test_samples_are_drawn_once_each_in_data_order_and_reproducibly() -> None:
    data = text_dataset([f"text {i}" for i in range(50)])
    drawn = [i for batch in sample_batches(data, 20, batch_size=8, seed=3)
             for i in batch["index"].tolist()]
    assert len(drawn) == len(set(drawn)) == 20
    assert drawn == sorted(drawn) and drawn != list(range(20))
    again = [i for batch in sample_batches(data, 20, batch_size=8, seed=3)
             for i in batch["index"].tolist()]
    other = [i for batch in sample_batches(data, 20, batch_size=8, seed=4)
             for i in batch["index"].tolist()]
    assert again == drawn and other != drawn
    everything = sample_batches(data, 500, batch_size=64)
    assert [b["index"].tolist() for b in everything] == [list(range(50))]


class Stream(IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield {"input": "the cat", "labels": torch.tensor(0)}


def test_drawing_needs_two_samples_and_a_data_set_with_a_length() -> None:
    with pytest.raises(LayerMapError, match=r"^layermap: samples must be at least 2 .*got 1$"):
        sample_batches(text_dataset(), 1)
    with pytest.raises(LayerMapError, match=r"^layermap: the data \(Stream\) has no length"):
        sample_batches(Stream(), 10)


# --- the command ------------------------------------------------------------------------------

@pytest.fixture
def bert_folder(tmp_path: Path) -> Path:
    return save_bert(tmp_path / "bert", layers=3)


def layermap_config(tmp_path: Path, teacher: dict[str, Any]) -> Path:
    """A text config: the 3-layer BERT teacher of :func:`bert_folder`, a student of its first
    two layers."""
    folder = tmp_path / "bert"
    data = tmp_path / "texts.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([text, ("cat" in text) + 0] for text in TEXTS * 3)
    raw = {"name": "layers", "output_dir": str(tmp_path / "runs"),
           "data": {"name": "text", "path": str(data)},
           "teacher": {"model": {"name": "hf_text", "options": {"path": str(folder)}},
                       **teacher},
           "student": {"name": "hf_student", "options": {"teacher": str(folder),
                                                         "layers": [0, 1]}},
           "recipe": {"name": "hinton"}, "trainer": {"epochs": 1, "progress": False}}
    path = tmp_path / "layers.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def teacher_checkpoint(tmp_path: Path) -> Path:
    """The weights of the teacher folder (of :func:`layermap_config`) as the run builds it
    (2 classes), as safetensors."""
    model = build_model("hf_text", (), 2, path=str(tmp_path / "bert"))
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_layermap_prints_the_matrix_and_the_maps_and_writes_a_heat_map(
        tmp_path: Path, bert_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = layermap_config(tmp_path, {"checkpoint": str(teacher_checkpoint(tmp_path))})
    png = tmp_path / "map.png"
    capsys.readouterr()
    assert cli.main(["layermap", str(config), "--samples", "20", "--output", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("linear CKA on 20 training inputs, each model's hidden states "
                          "mean-pooled over the input's real tokens")
    assert "┃    ┃     t0 ┃     t1 ┃     t2 ┃     t3 ┃" in out
    rows = [line for line in out.splitlines() if line.startswith("│ s")]
    assert len(rows) == 3
    assert rows[0].count("*") == 1 and "1.000*" in rows[0]
    assert "1.000*" in rows[1] and rows[1].count("*") == 1
    assert "1.000 " in rows[2] and rows[2].rstrip(" │").endswith("*")  # pinned on t3
    assert "proposed map: [0, 1, 3]  total similarity " in out
    assert ("free map:     [0, 1, 2]  total similarity 3.000  (layer_map: auto_free)"
            in out)
    assert "uniform map:  [0, 1, 3]  total similarity " in out
    assert f"heat map: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layermap_trains_and_caches_a_teacher_as_a_run_does(
        tmp_path: Path, bert_folder: Path, kdistill_cache_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    train = {"epochs": 1, "batch_size": 12, "progress": False}
    config = layermap_config(tmp_path, {"train": train})
    cached = set((kdistill_cache_dir / "teachers").glob("*.safetensors"))
    assert cli.main(["layermap", str(config), "--samples", "12"]) == 0
    first = capsys.readouterr().out
    assert "proposed map: [0, " in first and "heat map" not in first
    trained = set((kdistill_cache_dir / "teachers").glob("*.safetensors")) - cached
    assert len(trained) == 1
    parsed = parse_config(yaml.safe_load(config.read_text()))
    key = run.teacher_key(parsed.teacher, parsed.data)  # hinton's teacher trains by ce
    assert trained == {kdistill_cache_dir / "teachers" / f"{key}.safetensors"}
    assert cli.main(["layermap", str(config), "--samples", "12"]) == 0  # from the cache
    assert capsys.readouterr().out == first


def test_layermap_needs_a_trained_teacher(tmp_path: Path, bert_folder: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = layermap_config(tmp_path, {})
    raw = yaml.safe_load(config.read_text())
    raw["recipe"] = {"name": "dml"}
    raw["teacher"]["model"] = {"name": "ngram", "size": "tiny"}  # not read from a folder
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert cli.main(["layermap", str(config)]) == 2
    assert capsys.readouterr().err == (
        "kdistill: error: teacher: layermap compares the student with a trained teacher; give "
        "teacher.checkpoint or teacher.train (or a fine-tuned model folder: hf, hf_text)\n")


def test_layermap_checks_the_output_folder_before_any_work(
        tmp_path: Path, bert_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = layermap_config(tmp_path, {"train": {"epochs": 1, "progress": False}})
    capsys.readouterr()
    assert cli.main(["layermap", str(config), "--output", str(tmp_path / "no" / "m.png")]) == 2
    assert capsys.readouterr().err == \
        f"kdistill: error: --output: folder {tmp_path / 'no'} does not exist\n"


def test_layermap_refuses_fewer_than_two_samples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["layermap", "config.yaml", "--samples", "1"])
    assert "argument --samples: must be at least 2, got 1" in capsys.readouterr().err


def tinybert_auto_config(tmp_path: Path, layer_map: Any) -> RunConfig:
    """:func:`layermap_config` distilling by TinyBERT's general stage with ``layer_map``; the
    uniform map does not exist for 2 student layers of 3 teacher layers."""
    raw = yaml.safe_load(layermap_config(
        tmp_path, {"checkpoint": str(teacher_checkpoint(tmp_path))}).read_text())
    raw["recipe"] = {"name": "tinybert", "stage": "general", "student_layers": 2,
                     "teacher_layers": 3, "layer_map": layer_map}
    raw["trainer"].update({"epochs": 2, "batch_size": 4})
    raw["name"] = f"tinybert-{layer_map}" if isinstance(layer_map, str) else "tinybert-given"
    return parse_config(raw)


@pytest.mark.parametrize(("layer_map", "expected", "note"),
                         [("auto", [1, 3], ""), ("auto_free", [1, 2], ", last layer free")])
def test_layer_map_auto_trains_as_the_map_kdistill_layermap_proposes(
        tmp_path: Path, bert_folder: Path, caplog: pytest.LogCaptureFixture, layer_map: str,
        expected: list[int], note: str) -> None:
    auto = tinybert_auto_config(tmp_path, layer_map)
    run.preflight(auto)  # kdistill check measures the map on its trial teacher
    with caplog.at_level(logging.INFO, logger="kdistill"):
        measured = run.run(auto)
    maps = run.measure_layer_map(auto)
    # the student's two layers are the teacher's first two; pinned, the last learns t3
    assert (maps.proposed, maps.free) == ([0, 1, 3], [0, 1, 2])
    assert [p.recipe.layer_map for p in measured.fit.phases] == [tuple(expected)]
    assert (f"layer_map of 0-tinybert: student layers 1-2 learn from teacher layers {expected} "
            f"(linear CKA on up to 256 training inputs{note})") in caplog.text
    given = run.run(tinybert_auto_config(tmp_path, expected))
    trained, expected = measured.fit.student.state_dict(), given.fit.student.state_dict()
    for key, value in expected.items():
        assert torch.equal(trained[key], value), key


def test_layer_map_auto_needs_a_teacher_model(tmp_path: Path, bert_folder: Path) -> None:
    config = tinybert_auto_config(tmp_path, "auto")
    data = run.build_data(config.data)
    phases = run.build_phases(config)
    student = run.build_student(config, data, phases, ["recipe"])
    with pytest.raises(KdistillError) as error:
        resolve_layer_maps(phases, student, CachedTeacher.__new__(CachedTeacher), data.train,
                           seed=0)
    assert str(error.value) == (
        "layer_map 'auto' compares the student's hidden states with the teacher model's, and "
        "a CachedTeacher teacher has no model at hand: give layer_map (kdistill layermap "
        "proposes one)")
    with pytest.raises(KdistillError, match="tinybert: layer_map 'auto' is measured on the "):
        phases[0].recipe.student_taps()
