"""benchmarks/model2vec_encoder.py: a model2vec folder (built here by hand, without the
model2vec package) read and encoded as model2vec's StaticModel.encode does."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model2vec_encoder as m2v  # noqa: E402

from kdistill.errors import KdistillError  # noqa: E402
from kdistill.evaluate import predict  # noqa: E402

# Token lengths 5, 1, 1, 1, 4, 5, 8, 9: median 4.5, so a cut of max_length x 4 characters.
WORDS = ["[UNK]", "a", "b", "c", "good", "movie", "terrible", "wonderful"]
# One row per word, halves and quarters: exact in float16. The [UNK] row is never read.
VECTORS = [[9.0, 9.0, 9.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0],
           [1.5, -0.5, 0.25], [0.5, 0.5, -1.0], [-2.0, 1.0, 0.0], [3.0, 0.0, -0.75]]


def word_tokenizer() -> Tokenizer:
    """A lower-casing WordLevel tokenizer of :data:`WORDS` splitting on spaces and
    punctuation."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                           unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def save_model2vec(folder: Path, normalize: bool = False, max_length: int | None = 512,
                   **tensors: torch.Tensor) -> Path:
    """A folder laid out as model2vec's save_pretrained writes it: float16 ``embeddings`` of
    :data:`VECTORS` (plus ``tensors``), the tokenizer and the config."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": torch.tensor(VECTORS, dtype=torch.float16), **tensors},
              str(folder / "model.safetensors"))
    word_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "model2vec", "normalize": normalize, "max_length": max_length,
         "hidden_dim": 3, "embedding_dtype": "float16"}))
    return folder


def mean(*words: str) -> list[float]:
    """The mean of the words' rows, by hand."""
    rows = [VECTORS[WORDS.index(w)] for w in words]
    return [sum(column) / len(rows) for column in zip(*rows, strict=True)]


def unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector]


TEXTS = ["good movie", "Wonderful, TERRIBLE a", "good zzz movie!", "zzz ???", ""]


def by_hand(normalize: bool) -> torch.Tensor:
    """The embeddings of :data:`TEXTS`: each known word's row averaged (unknown words and
    punctuation dropped), zeros without a known word."""
    means = [mean("good", "movie"), mean("wonderful", "terrible", "a"),
             mean("good", "movie")]
    return torch.tensor([*(unit(v) if normalize else v for v in means), [0.0] * 3, [0.0] * 3])


@pytest.mark.parametrize("normalize", [False, True])
def test_a_text_is_the_mean_of_its_known_tokens_rows_normalised_as_configured(
        tmp_path: Path, normalize: bool) -> None:
    model = m2v.Model2VecEncoder.load(save_model2vec(tmp_path, normalize))
    output = model(TEXTS)
    assert list(output) == ["sentence_embedding"]
    assert output["sentence_embedding"].dtype == torch.float32
    torch.testing.assert_close(output["sentence_embedding"], by_hand(normalize), atol=1e-6,
                               rtol=0)


def test_texts_are_cut_in_characters_then_in_tokens_as_model2vec_cuts_them(
        tmp_path: Path) -> None:
    model = m2v.Model2VecEncoder.load(save_model2vec(tmp_path, max_length=2))
    assert model.max_chars == 8  # 2 tokens x int(median 4.5) characters
    found = model(["a b c", "good wonderful", "zzz a b"])["sentence_embedding"]
    # "a b c": two tokens kept; "good won": the cut word is unknown; "zzz a": the unknown
    # token counts towards the two and is dropped afterwards.
    torch.testing.assert_close(found, torch.tensor([mean("a", "b"), mean("good"), mean("a")]),
                               atol=1e-6, rtol=0)
    uncut = m2v.Model2VecEncoder.load(save_model2vec(tmp_path / "uncut", max_length=None))
    assert uncut.max_chars is None
    torch.testing.assert_close(uncut(["a b c", "good wonderful"])["sentence_embedding"],
                               torch.tensor([mean("a", "b", "c"), mean("good", "wonderful")]),
                               atol=1e-6, rtol=0)


def test_a_config_without_normalize_or_max_length_takes_model2vecs_defaults(
        tmp_path: Path) -> None:
    folder = save_model2vec(tmp_path, normalize=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "model2vec"}))
    model = m2v.Model2VecEncoder.load(folder)
    assert (model.normalize, model.max_length, model.max_chars) == (False, 512, 2048)


def test_the_unknown_token_is_the_models_own_whatever_the_tokenizer() -> None:
    assert m2v.unknown_id(word_tokenizer()) == 0
    unigram = Tokenizer(models.Unigram([("good", -1.0), ("<unk>", -5.0)], unk_id=1))
    assert m2v.unknown_id(unigram) == 1
    assert m2v.unknown_id(Tokenizer(models.BPE())) is None


def test_the_evaluation_reads_it_as_a_sentence_encoder_with_its_stored_size(
        tmp_path: Path) -> None:
    model = m2v.Model2VecEncoder.load(save_model2vec(tmp_path, normalize=True))
    batches = [{"input": TEXTS[:3], "index": torch.tensor([2, 0, 1])},
               {"input": TEXTS[3:], "index": torch.tensor([3, 4])}]
    predictions = predict(model, batches)
    assert predictions.embedding
    expected = by_hand(True)
    torch.testing.assert_close(predictions.logits, expected[[1, 2, 0, 3, 4]], atol=1e-6,
                               rtol=0)
    assert sum(p.numel() for p in model.parameters()) == 8 * 3
    assert model.vectors.dtype == torch.float16 and not model.vectors.requires_grad


def test_a_pair_of_texts_is_refused_by_name(tmp_path: Path) -> None:
    model = m2v.Model2VecEncoder.load(save_model2vec(tmp_path))
    with pytest.raises(KdistillError, match="model2vec encodes single texts; input 1 is a tuple"):
        model(["good", ("good", "movie")])


def test_unusable_folders_are_refused_with_the_file_at_fault(tmp_path: Path) -> None:
    folder = save_model2vec(tmp_path / "no-tokenizer")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(KdistillError, match=f"{folder}: no tokenizer.json; not a folder saved"):
        m2v.Model2VecEncoder.load(folder)
    quantized = save_model2vec(tmp_path / "quantized", mapping=torch.zeros(8, dtype=torch.long))
    with pytest.raises(KdistillError, match=r"model.safetensors: holds \['mapping'\], written by "
                                            "model2vec's vocabulary quantization"):
        m2v.Model2VecEncoder.load(quantized)
    with pytest.raises(KdistillError, match=r"vectors of shape \(7, 3\) do not fit a tokenizer "
                                            r"of 8 tokens: expected \[8, width\]"):
        m2v.Model2VecEncoder(torch.zeros(7, 3), word_tokenizer(), True)


def write_check(folder: Path, float32: torch.Tensor, float16: torch.Tensor) -> None:
    (folder / m2v.CHECK_FILE).write_text(json.dumps(
        {"texts": TEXTS, "encode_float32": float32.tolist(), "encode": float16.tolist()}))


def test_the_check_compares_with_model2vecs_float32_encoding(tmp_path: Path) -> None:
    folder = save_model2vec(tmp_path, normalize=True)
    model = m2v.Model2VecEncoder.load(folder)
    expected = by_hand(True)
    write_check(folder, expected, expected.half().float())
    check = m2v.check_encoding(model, folder)
    assert check["texts"] == 5 and check["max_abs_difference"] < 1e-6
    assert check["max_abs_difference_float16"] == pytest.approx(
        float((expected - expected.half().float()).abs().max()), abs=1e-6)
    write_check(folder, expected + torch.tensor([0.0, 0.0, 1e-3]), expected)
    with pytest.raises(KdistillError, match=r"encode_check.json: embeddings differ from "
                                            r"model2vec's by up to 1.00e-03 \(more than 1e-05\)"):
        m2v.check_encoding(model, folder)
