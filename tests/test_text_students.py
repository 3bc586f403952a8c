"""Text students of other architectures: tokenisation, vocabularies, hashed n-grams, the four
networks, saving and loading, sparse gradients in the engine's optimizer, init_from a
teacher's embeddings, the build context of build_model, and a short training run."""

from __future__ import annotations

import inspect
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdistill.checkpoint import atomic_save_tensors, join_optimizer_state, split_optimizer_state
from kdistill.config import ModelConfig, _check_model
from kdistill.engine import Distiller
from kdistill.engine.optim import CombinedOptimizer, build_optimizer, build_scheduler
from kdistill.engine.step import clip_gradients, gradient_norm, nonfinite_gradients
from kdistill.models import MODELS, build_model
from kdistill.models.registry import CONTEXT_PARAMETERS
from kdistill.models.text import TextModel
from kdistill.models.text_encoders import NGramEncoder, WordEncoder
from kdistill.models.text_networks import CMOWNet, ordered_product
from kdistill.models.text_students import load_text_student, save_text_student
from kdistill.models.vocabulary import (
    PAD_ID,
    SEPARATOR_ID,
    UNKNOWN_ID,
    NGramHasher,
    TextStudentFileError,
    Vocabulary,
    tokenize,
)
from kdistill.settings import OptimizerSettings, SchedulerSettings

CORPUS = ["A good movie.", "a bad movie", "good, good and good!", "Bad plot; really bad",
          "the actors were fine", "New-York is a city"]
ARCHITECTURES = ["ngram", "bilstm", "textcnn", "cmow"]
TAGGERS = ["bilstm", "textcnn"]


def student(name: str, task: str = "classification", **options: Any) -> TextModel:
    torch.manual_seed(0)
    model = build_model(name, (1,), 3, "tiny", corpus=CORPUS, task=task, **options)
    assert isinstance(model, TextModel)
    return model.eval()


# -- tokenisation and vocabulary ----------------------------------------------------------
def test_tokenize_lower_cases_and_splits_words_from_punctuation() -> None:
    assert tokenize("Don't STOP!  Now,then") == ["don", "'", "t", "stop", "!", "now", ",",
                                                 "then"]
    assert tokenize("Ünïcode café") == ["ünïcode", "café"]


def test_vocabulary_orders_by_count_then_word_and_maps_unknown_words() -> None:
    texts = ["b a a", "c b a", "d"]  # a: 3, b: 2, c: 1, d: 1
    vocabulary = Vocabulary.build(texts)
    assert vocabulary.words == ["<pad>", "<unk>", "<sep>", "a", "b", "c", "d"]
    assert Vocabulary.build(texts, max_size=5).words[3:] == ["a", "b"]
    assert Vocabulary.build(texts, min_count=2).words[3:] == ["a", "b"]
    assert vocabulary.ids(["a", "zebra", "d"]) == [3, UNKNOWN_ID, 6]
    assert (PAD_ID, UNKNOWN_ID, SEPARATOR_ID) == (0, 1, 2)


def test_vocabulary_round_trip_and_digest(tmp_path: Path) -> None:
    vocabulary = Vocabulary.build(CORPUS)
    vocabulary.save(tmp_path)
    loaded = Vocabulary.load(tmp_path)
    assert loaded.words == vocabulary.words
    assert loaded.tokenisation == vocabulary.tokenisation
    assert Vocabulary.build(CORPUS[:2]).tokenisation != vocabulary.tokenisation
    with pytest.raises(TextStudentFileError,
                       match=r"vocabulary.json is missing: the folder holds no saved "
                             r"vocabulary"):
        Vocabulary.load(tmp_path / "elsewhere")


def test_ngram_hashing_is_crc32_of_the_joined_tokens() -> None:
    # The value is fixed here, not computed by the code under test: Python's salted hash()
    # would differ from one process to the next.
    assert zlib.crc32(b"good movie") % 1000 == 503
    vocabulary = Vocabulary.build(["good movie"])  # good: 3, movie: 4
    hasher = NGramHasher(vocabulary, n=(1, 2, 3), buckets=1000)
    tokens = ["good", "movie", "rocks"]
    size = len(vocabulary)
    assert size == 5 and hasher.rows == 1005
    assert hasher(tokens) == [
        3, 4, UNKNOWN_ID,
        size + 503, size + zlib.crc32(b"movie rocks") % 1000,
        size + zlib.crc32(b"good movie rocks") % 1000]


# -- encoders -----------------------------------------------------------------------------
def test_word_encoder_pads_texts_joins_pairs_and_marks_word_starts() -> None:
    vocabulary = Vocabulary.build(["good movie", "new york"])
    good, movie, new, york = vocabulary.ids(["good", "movie", "new", "york"])
    encoder = WordEncoder(vocabulary, max_length=4)
    encoded = encoder(["Good movie", ("movie", "good new york")])
    assert encoded["input_ids"].tolist() == [[good, movie, PAD_ID, PAD_ID],
                                             [movie, SEPARATOR_ID, good, new]]  # cut at 4
    assert encoded["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    words = encoder([["New-York", "movie"], ["good"]])
    assert words["input_ids"].tolist() == [[new, UNKNOWN_ID, york, movie], [good, 0, 0, 0]]
    assert words["word_starts"].tolist() == [[0, 3], [0, 0]]
    assert WordEncoder(vocabulary)([""])["attention_mask"].tolist() == [[0]]


def test_ngram_encoder_gives_embedding_bag_offsets() -> None:
    vocabulary = Vocabulary.build(["good movie"])
    encoder = NGramEncoder(NGramHasher(vocabulary, n=(1, 2), buckets=10))
    encoded = encoder(["good movie", "", ("good", "movie")])
    hasher = encoder.hasher
    expected = hasher(["good", "movie"]) + hasher(["good", "<sep>", "movie"])
    assert encoded["ids"].tolist() == expected
    assert encoded["offsets"].tolist() == [0, 3, 3]
    with pytest.raises(ValueError, match="cannot tag word lists"):
        encoder([["good", "movie"]])


# -- the students -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_students_read_texts_and_pairs(name: str) -> None:
    model = student(name)
    assert model(["good movie", "", "bad, bad plot"])["logits"].shape == (3, 3)
    assert model([("good", "movie"), ("bad", "plot")])["logits"].shape == (2, 3)


@pytest.mark.parametrize("name", TAGGERS)
def test_word_students_tag_every_word(name: str) -> None:
    model = student(name, task="token_classification")
    logits = model([["Good", "New-York", "movie"], ["bad"]])["logits"]
    assert logits.shape == (2, 3, 3)
    alone = model([["bad"]])["logits"]
    torch.testing.assert_close(logits[1, 0], alone[0, 0])  # padding changes nothing


@pytest.mark.parametrize("name", ["ngram", "cmow"])
def test_sentence_level_students_refuse_token_classification(name: str) -> None:
    with pytest.raises(ValueError, match=(
            f"model '{name}' is sentence-level \\(one vector per text\\) and cannot tag words "
            "\\(task token_classification\\); use 'bilstm' or 'textcnn'")):
        student(name, task="token_classification")
    with pytest.raises(ValueError, match="word lists"):
        student(name)([["good", "movie"]])


@pytest.mark.parametrize("name", ["bilstm", "textcnn", "cmow"])
def test_sentence_outputs_do_not_depend_on_the_batchs_padding(name: str) -> None:
    model = student(name)
    together = model(["good", "a good movie and a bad plot"])["logits"]
    torch.testing.assert_close(together[0], model(["good"])["logits"][0])


@pytest.mark.parametrize(("name", "task"), [*((n, "classification") for n in ARCHITECTURES),
                                            ("bilstm", "token_classification")])
def test_save_then_load_predicts_identically(name: str, task: str, tmp_path: Path) -> None:
    model = student(name, task=task)
    save_text_student(model, tmp_path / "student")
    loaded = load_text_student(tmp_path / "student").eval()
    assert loaded.tokenisation == model.tokenisation
    texts: list[Any] = ([["Unseen", "words", "here"], ["bad"]] if task != "classification"
                        else ["unseen words, good ones", ("bad", "movie"), "zzz"])
    torch.testing.assert_close(loaded(texts)["logits"], model(texts)["logits"], rtol=0,
                               atol=0)


def test_loading_names_the_missing_file(tmp_path: Path) -> None:
    folder = tmp_path / "student"
    save_text_student(student("cmow"), folder)
    (folder / "weights.safetensors").unlink()
    with pytest.raises(TextStudentFileError, match="weights.safetensors is missing"):
        load_text_student(folder)
    with pytest.raises(TextStudentFileError,
                       match="student.json is missing: the folder holds no saved text student"):
        load_text_student(tmp_path / "empty")


# -- sparse gradients ---------------------------------------------------------------------
def ngram_backward(model: TextModel, texts: Sequence[str]) -> set[int]:
    """Backward a squared-logit loss; the n-gram ids the texts used."""
    used = set(model.encoder(texts)["ids"].tolist())
    (model(texts)["logits"] ** 2).sum().backward()
    return used


def test_ngram_gradients_are_sparse_and_only_on_the_used_rows() -> None:
    model = student("ngram").train()
    used = ngram_backward(model, ["good movie", "bad plot"])
    grad = model.model.embedding.weight.grad
    assert grad is not None and grad.is_sparse
    grad = grad.coalesce()
    nonzero = {int(i) for i, row in zip(grad.indices()[0], grad.values(), strict=True)
               if row.abs().sum() > 0}
    assert nonzero == used


def test_the_engine_optimizer_moves_only_the_used_rows_and_the_dense_parameters() -> None:
    model = student("ngram").train()
    optimizer = build_optimizer(model, OptimizerSettings(lr=0.1, weight_decay=0.5))
    assert isinstance(optimizer, CombinedOptimizer)
    kinds = [type(o).__name__ for o in optimizer.optimizers]
    assert kinds == ["AdamW", "SparseAdam"]
    table = model.model.embedding.weight
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    used = ngram_backward(model, ["good movie", "bad plot"])
    optimizer.step()
    changed_rows = set(torch.nonzero((table != before["model.embedding.weight"]).any(dim=1))
                       .flatten().tolist())
    assert changed_rows == used
    for name, p in model.named_parameters():
        if name != "model.embedding.weight":
            assert not torch.equal(p, before[name]), name
    optimizer.zero_grad(set_to_none=True)
    assert table.grad is None


def test_combined_optimizer_follows_the_schedule_and_round_trips_its_state(
        tmp_path: Path) -> None:
    def fresh() -> tuple[TextModel, torch.optim.Optimizer]:
        model = student("ngram").train()
        return model, build_optimizer(model, OptimizerSettings(lr=0.1))

    model, optimizer = fresh()
    scheduler = build_scheduler(optimizer, SchedulerSettings(name="linear"), total_steps=4)
    ngram_backward(model, ["good movie"])
    optimizer.step()
    scheduler.step()
    assert all(o.param_groups[0]["lr"] == pytest.approx(0.075)
               for o in optimizer.optimizers)  # type: ignore[attr-defined]
    tensors, meta = split_optimizer_state(optimizer.state_dict())  # as a checkpoint saves it
    atomic_save_tensors(tensors, tmp_path / "optimizer.safetensors")
    copy, restored = fresh()
    copy.load_state_dict(model.state_dict())
    restored.load_state_dict(join_optimizer_state(load_file(tmp_path / "optimizer.safetensors"),
                                                  json.loads(json.dumps(meta))))
    for m, o in ((model, optimizer), (copy, restored)):
        o.zero_grad(set_to_none=True)
        ngram_backward(m, ["bad plot and good movie"])
        o.step()
    for (name, a), b in zip(model.named_parameters(), copy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_clipping_and_checks_work_with_sparse_gradients() -> None:
    model = student("ngram").train()
    ngram_backward(model, ["good good movie", "bad plot"] * 3)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    dense = torch.sqrt(sum((g.to_dense() ** 2).sum() for g in grads))
    torch.testing.assert_close(gradient_norm(grads), dense)
    assert dense > 0.05
    assert nonfinite_gradients(model) == []
    clip_gradients(grads, 0.05)
    assert model.model.embedding.weight.grad.is_sparse
    torch.testing.assert_close(gradient_norm(grads), torch.tensor(0.05), rtol=1e-4, atol=0)
    grad = model.model.embedding.weight.grad
    model.model.embedding.weight.grad = torch.sparse_coo_tensor(
        grad._indices(), torch.full_like(grad._values(), float("nan")), grad.shape,
        check_invariants=True)
    assert nonfinite_gradients(model) == ["model.embedding.weight"]


# -- init_from a teacher's embeddings -----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert")
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "movie",
              "##ness", "plot", "new", "-", "york", "the", "."]
    (folder / "vocab.txt").write_text("\n".join(pieces) + "\n")
    # transformers 5 reads the word pieces from vocab= (a vocab_file= keyword is ignored)
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(pieces), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=37)
    BertModel(config).save_pretrained(folder)
    return folder


def test_init_from_averages_the_teachers_word_pieces(tiny_bert: Path) -> None:
    from transformers import BertModel

    teacher = BertModel.from_pretrained(tiny_bert).embeddings.word_embeddings.weight.detach()
    model = build_model("bilstm", (1,), 2, "tiny", corpus=["goodness movie zebra"],
                        embed_dim=32, init_from=str(tiny_bert))
    vocabulary = model.encoder.vocabulary
    table = model.model.embedding.weight.detach()
    goodness, movie = vocabulary.ids(["goodness", "movie"])
    torch.testing.assert_close(table[goodness], (teacher[6] + teacher[9]) / 2)
    torch.testing.assert_close(table[movie], teacher[8])
    torch.testing.assert_close(table[UNKNOWN_ID], teacher[1])
    torch.testing.assert_close(table[SEPARATOR_ID], teacher[3])
    assert not table[PAD_ID].any()
    zebra = vocabulary.ids(["zebra"])[0]  # [UNK] for the teacher too
    torch.testing.assert_close(table[zebra], teacher[1])


def test_init_from_projects_to_a_narrower_width_and_refuses_a_wider(tiny_bert: Path) -> None:
    model = build_model("textcnn", (1,), 2, "tiny", corpus=CORPUS, embed_dim=4,
                        init_from=str(tiny_bert))
    table = model.model.embedding.weight.detach()
    assert table.shape[1] == 4 and not table[PAD_ID].any()
    again = build_model("textcnn", (1,), 2, "tiny", corpus=CORPUS, embed_dim=4,
                        init_from=str(tiny_bert))
    torch.testing.assert_close(again.model.embedding.weight, table, rtol=0, atol=0)
    with pytest.raises(ValueError, match="init_from: embed_dim 64 exceeds what the teacher's "
                                         "vectors give \\(width 32"):
        build_model("textcnn", (1,), 2, "tiny", corpus=CORPUS, embed_dim=64,
                    init_from=str(tiny_bert))


# -- CMOW ---------------------------------------------------------------------------------
def test_cmow_is_the_ordered_product_of_word_matrices() -> None:
    torch.manual_seed(0)
    net = CMOWNet(vocab_size=6, num_classes=2, cbow_dim=3, matrix_dim=2)
    weights = net.matrices.weight.detach()
    m = {i: weights[i].view(2, 2) for i in range(6)}
    ids = torch.tensor([[3, 4, 5], [5, 3, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    cbow, product = net.embed(ids, mask)
    torch.testing.assert_close(product[0], m[3] @ m[4] @ m[5])
    torch.testing.assert_close(product[1], m[5] @ m[3])
    vectors = net.vectors.weight.detach()
    torch.testing.assert_close(cbow[1], (vectors[5] + vectors[3]) / 2)
    chain = torch.randn(1, 5, 2, 2)
    expected = chain[0, 0] @ chain[0, 1] @ chain[0, 2] @ chain[0, 3] @ chain[0, 4]
    torch.testing.assert_close(ordered_product(chain)[0], expected)
    assert torch.equal(ordered_product(torch.empty(1, 0, 2, 2))[0], torch.eye(2))
    assert (weights - torch.eye(2).flatten()).std() < 0.2  # near the identity


# -- the build context --------------------------------------------------------------------
def test_build_model_passes_the_context_only_to_builders_that_declare_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    received: dict[str, dict[str, Any]] = {}

    def with_corpus(input_shape: Sequence[int], num_classes: int, *,
                    corpus: Sequence[str] | None = None) -> nn.Module:
        received["with_corpus"] = {"corpus": corpus}
        return nn.Identity()

    def with_task(input_shape: Sequence[int], num_classes: int, width: int = 1, *,
                  task: str = "classification") -> nn.Module:
        received["with_task"] = {"task": task, "width": width}
        return nn.Identity()

    for builder in (with_corpus, with_task):
        monkeypatch.setitem(MODELS, builder.__name__, builder)
    for name in ("with_corpus", "with_task", "mlp"):
        build_model(name, (4,), 2, corpus=["some text"], task="regression",
                    **({"hidden": [3]} if name == "mlp" else {}))
    assert received == {"with_corpus": {"corpus": ["some text"]},
                        "with_task": {"task": "regression", "width": 1}}
    assert CONTEXT_PARAMETERS == ("corpus", "task")
    with pytest.raises(ValueError, match="model 'textcnn' builds its vocabulary from the "
                                         "training texts: pass corpus="):
        build_model("textcnn", (1,), 2, "tiny")


def test_config_validation_leaves_the_context_out_of_the_options() -> None:
    assert _check_model(ModelConfig(name="ngram", size="tiny"), "student") == []
    assert _check_model(ModelConfig(name="bilstm", options={"embed_dim": 8, "hidden": 8}),
                        "student") == []
    problems = _check_model(ModelConfig(name="cmow", options={"corpus": ["x"]}), "student")
    assert problems == ["student.options.corpus: unknown cmow option 'corpus'; valid names: "
                        + ", ".join(sorted(p for p in inspect.signature(MODELS["cmow"])
                                           .parameters if p not in
                                           ("input_shape", "num_classes", "corpus",
                                            "task")))]
    assert _check_model(ModelConfig(name="bilstm", size="tiny",
                                    options={"init_from": "/nowhere"}), "student") == [
        "student.options.init_from: no Hugging Face model folder at /nowhere (config.json "
        "missing); kdistill loads local folders only, never from a hub"]


# -- training -----------------------------------------------------------------------------
def test_an_ngram_student_learns_sentiment_through_the_engine() -> None:
    good, bad, topics = ["good", "great", "fine"], ["bad", "awful", "poor"], ["plot", "cast"]
    texts = [f"the {topics[i % 2]} was {(good if i % 2 else bad)[i % 3]}" for i in range(40)]
    data = [{"input": text, "labels": torch.tensor(i % 2), "index": torch.tensor(i)}
            for i, text in enumerate(texts)]
    torch.manual_seed(0)
    model = build_model("ngram", (1,), 2, "tiny", corpus=texts)
    result = Distiller(model, None, "ce", epochs=4, batch_size=10, progress=False, cpu=True,
                       clip_grad_norm=1.0, optimizer={"lr": 0.05}).fit(data)
    losses = [r["loss"] for r in result.history if r.get("kind") == "train"]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    assert model(["the cast was great", "the plot was awful"])["logits"].argmax(1).tolist() \
        == [1, 0]
