"""Sentence encoders: pooling against hand computation, hf_embedder, hf_student with pooling,
the static student (its teacher-made start, training by distillation), the
``sentence_embedding`` tap, export round trips and config runs. Tiny BERTs built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from test_hf_text import VOCAB, save_bert

from kdistill.config import ConfigError, parse_config
from kdistill.data import TextDataset, load_dataset
from kdistill.data.base import DataSplits
from kdistill.engine import Distiller
from kdistill.errors import KdistillError
from kdistill.evaluate import eval_batches, predict
from kdistill.models import build_model
from kdistill.models.export import (
    OutputMeaning,
    export_run_student,
    load_exported,
    load_run_student,
)
from kdistill.models.sentence import pool
from kdistill.models.teacher_embeddings import teacher_word_vectors
from kdistill.models.vocabulary import NGramHasher, Vocabulary
from kdistill.predict import predict_texts
from kdistill.recipes import RECIPES, build_recipe
from kdistill.run import check_task, preflight, run
from kdistill.taps import TapError, TapReader

WORDS = VOCAB[5:]
TEXTS = ["the cat sat on the mat", "a dog", "the big red dog ran to it", "it sat"]


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bare BERT (no head) and its tokenizer: a sentence encoder's folder."""
    return save_bert(tmp_path_factory.mktemp("encoder"), layers=2,
                     head=transformers.BertModel)


def hidden_states(folder: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The folder's BertModel's last hidden states of ``texts`` and their attention mask."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    network = transformers.BertModel.from_pretrained(folder).eval()
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return network(**encoded).last_hidden_state, encoded["attention_mask"]


def embed(model: torch.nn.Module, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(texts)["sentence_embedding"]


# --- pooling ----------------------------------------------------------------------------------

def test_pool_means_the_real_tokens_and_cls_takes_the_first() -> None:
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0, 4.0, 5.0],
                                                   [16.0, 17.0, 18.0, 19.0]]
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    with pytest.raises(KdistillError, match="pooling must be one of mean, cls, got 'max'"):
        pool(hidden, mask, "max")  # type: ignore[arg-type]


def test_hf_embedder_mean_pools_over_real_tokens_and_normalises(encoder_folder: Path) -> None:
    hidden, mask = hidden_states(encoder_folder, TEXTS)
    by_hand = torch.stack([hidden[i, :int(mask[i].sum())].mean(dim=0) for i in range(4)])
    raw = build_model("hf_embedder", (), 0, path=str(encoder_folder), normalize=False)
    assert torch.allclose(embed(raw, TEXTS), by_hand, atol=1e-5)
    normalised = embed(build_model("hf_embedder", (), 0, path=str(encoder_folder)), TEXTS)
    assert torch.allclose(normalised, by_hand / by_hand.norm(dim=1, keepdim=True), atol=1e-5)
    # Padding never counts: "a dog" alone gives what it gives in the padded batch.
    assert torch.allclose(embed(raw, ["a dog"])[0], by_hand[1], atol=1e-5)


def test_hf_embedder_cls_pooling_takes_the_first_token(encoder_folder: Path) -> None:
    hidden, _ = hidden_states(encoder_folder, TEXTS)
    model = build_model("hf_embedder", (), 0, path=str(encoder_folder), pooling="cls",
                        normalize=False)
    assert torch.allclose(embed(model, TEXTS), hidden[:, 0], atol=1e-5)


def test_the_sentence_embedding_tap_is_the_output_and_only_sentence_encoders_have_it(
        encoder_folder: Path, tmp_path: Path) -> None:
    model = build_model("hf_embedder", (), 0, path=str(encoder_folder))
    with TapReader(model, ["sentence_embedding", "logits", "hidden.-1"]) as reader:
        taps = reader({"input": TEXTS})
    assert torch.equal(taps["sentence_embedding"], taps["logits"])
    assert taps["hidden.-1"].shape[:2] == (4, 9)  # token-level taps still work
    classifier = build_model("hf_text", (), 2, path=str(save_bert(tmp_path / "cls")))
    with TapReader(classifier, ["sentence_embedding"]) as reader, \
            pytest.raises(TapError, match="tap 'sentence_embedding': the model is not a "
                                          "sentence encoder"):
        reader({"input": TEXTS})


def test_hf_student_with_pooling_is_a_sentence_encoder_of_the_kept_layers(
        encoder_folder: Path) -> None:
    student = build_model("hf_student", (), 0, teacher=str(encoder_folder), layers=[0, 1],
                          pooling="mean")
    teacher = build_model("hf_embedder", (), 0, path=str(encoder_folder))
    assert torch.allclose(embed(student, TEXTS), embed(teacher, TEXTS), atol=1e-6)
    one = build_model("hf_student", (), 0, teacher=str(encoder_folder), layers=[1],
                      pooling="cls", normalize=False)
    assert one.model.network.config.num_hidden_layers == 1
    assert not torch.allclose(embed(one, TEXTS).norm(dim=1), torch.ones(4))
    with pytest.raises(KdistillError, match="normalize applies to sentence embeddings"):
        build_model("hf_student", (), 0, teacher=str(encoder_folder), layers=[1],
                    normalize=True)


# --- the static student -----------------------------------------------------------------------

def static(**options: object) -> torch.nn.Module:
    return build_model("static", (), 0, corpus=TEXTS, task="embedding", **options)


def test_the_static_student_gives_one_normalised_vector_per_text() -> None:
    model = static(embed_dim=8, ngrams=[1, 2], buckets=64)
    out = embed(model, [*TEXTS, ""])
    assert out.shape == (5, 8)
    assert torch.allclose(out[:4].norm(dim=1), torch.ones(4))
    assert torch.equal(out[4], torch.zeros(8))  # no n-gram: the zero vector, not NaN
    rows = model.model.embedding.weight
    unigrams = [model.encoder.hasher.vocabulary.index[w] for w in ("it", "sat")]
    bigram = model.encoder.hasher(["it", "sat"])[-1]
    mean = rows[[*unigrams, bigram]].mean(dim=0).detach()
    assert torch.allclose(out[3], mean / mean.norm(), atol=1e-6)  # "it sat": 2 words, 1 bigram


def test_static_init_from_outputs_takes_each_words_teacher_embedding(
        encoder_folder: Path) -> None:
    model = static(embed_dim=16, ngrams=[1, 3], buckets=8, init_from=str(encoder_folder))
    vocabulary = model.encoder.hasher.vocabulary
    teacher = build_model("hf_embedder", (), 0, path=str(encoder_folder))
    rows = model.model.embedding.weight.detach()
    words = vocabulary.words[3:]
    assert torch.allclose(rows[3:len(vocabulary)], embed(teacher, words), atol=1e-6)
    assert torch.equal(rows[:3], torch.zeros(3, 16))  # reserved tokens
    assert torch.equal(rows[len(vocabulary):], torch.zeros(len(rows) - len(vocabulary), 16))
    # A text of one word starts as the teacher's embedding of that word.
    assert torch.allclose(embed(model, ["dog"]), embed(teacher, ["dog"]), atol=1e-6)


def test_static_init_from_inputs_uses_the_word_piece_vectors(encoder_folder: Path) -> None:
    model = static(embed_dim=16, init_from=str(encoder_folder), init_vectors="input")
    words = model.encoder.hasher.vocabulary.words
    expected = teacher_word_vectors(encoder_folder, words)
    expected[0] = 0.0
    assert torch.allclose(model.model.embedding.weight[:len(words)].detach(), expected)


def corpus_data(texts: list[str], test: int = 8) -> DataSplits:
    unlabeled = torch.full((len(texts),), -100)
    return DataSplits("sentences", TextDataset(texts[test:], unlabeled[test:]),
                      TextDataset(texts[:test], unlabeled[:test]), 0, (), "embedding")


def random_texts(count: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),),
                                                          generator=generator))
            for n in torch.randint(2, 7, (count,), generator=generator)]


def test_distilling_the_static_student_lowers_its_loss_and_leaves_the_teacher_alone(
        encoder_folder: Path) -> None:
    texts = random_texts(72)
    data = corpus_data(texts)
    teacher = build_model("hf_embedder", (), 0, path=str(encoder_folder))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model("static", (), 0, corpus=texts, task="embedding", embed_dim=16,
                          buckets=64)
    target = embed(teacher, texts)

    def loss() -> float:
        return float((1 - (embed(student, texts) * target).sum(dim=1)).mean())

    start = loss()
    Distiller(student, teacher, build_recipe("embedding_kd", loss="cosine"), epochs=8,
              batch_size=16, optimizer={"lr": 0.05}, progress=False).fit(data.train)
    assert loss() < 0.5 * start
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


# --- export -----------------------------------------------------------------------------------

def test_a_sentence_encoder_round_trips_in_the_sentence_transformers_layout(
        encoder_folder: Path, tmp_path: Path) -> None:
    student = build_model("hf_student", (), 0, teacher=str(encoder_folder), layers=[1],
                          pooling="cls", max_length=20)
    export_run_student(student, tmp_path, OutputMeaning("classification", ["a", "b"]))
    folder = tmp_path / "student"
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"] for m in modules] == [f"sentence_transformers.models.{kind}" for kind in
                                            ("Transformer", "Pooling", "Normalize")]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
    assert pooling["word_embedding_dimension"] == 16
    loaded, meaning = load_run_student(tmp_path)
    assert (meaning.task, meaning.label_names) == ("embedding", None)
    assert loaded.encoder.max_length == 20
    assert torch.allclose(embed(loaded, TEXTS), embed(student, TEXTS), atol=1e-6)
    with pytest.raises(KdistillError, match="this run's student is a sentence encoder"):
        predict_texts(loaded, TEXTS, meaning)


def test_a_static_student_round_trips(tmp_path: Path) -> None:
    model = static(embed_dim=8, buckets=32, normalize=False)
    export_run_student(model, tmp_path, OutputMeaning("embedding"))
    loaded = load_exported(tmp_path / "student")
    assert torch.equal(embed(loaded, TEXTS), embed(model, TEXTS))


# --- evaluation and config runs ---------------------------------------------------------------

def test_predictions_of_a_sentence_encoder_are_embeddings_in_data_order(
        encoder_folder: Path) -> None:
    model = build_model("hf_embedder", (), 0, path=str(encoder_folder))
    data = TextDataset(TEXTS, torch.tensor([0, 1, -100, 1]))
    predictions = predict(model, reversed(eval_batches(data, 2)))
    assert predictions.task == "embedding" and predictions.embedding
    assert torch.allclose(predictions.logits, embed(model, TEXTS), atol=1e-6)
    assert predictions.labels.tolist() == [0, 1, -100, 1]


def test_embedding_recipes_learn_texts_with_or_without_class_labels() -> None:
    texts = TextDataset(["a"], torch.tensor([0]))
    for task in ("embedding", "classification"):
        check_task(build_recipe("ckd"), DataSplits("d", texts, texts, 2, (), task), "recipe")
    for task, recipe in (("regression", "embedding_kd"), ("embedding", "hinton")):
        with pytest.raises(ConfigError, match=f"recipe: '{recipe}' is a"):
            check_task(build_recipe(recipe), DataSplits("d", texts, texts, 2, (), task),
                       "recipe")
    with pytest.raises(ConfigError, match=r"recipes for it: \['ckd', 'embedding_kd'\]"):
        check_task(build_recipe("hinton"), DataSplits("d", texts, texts, 0, (), "embedding"),
                   "recipe")


def embedding_config(tmp_path: Path, corpus: Path, teacher: dict, **student: object):
    return parse_config({
        "name": "emb", "output_dir": str(tmp_path / "runs"),
        "data": {"name": "sentences", "path": str(corpus), "test_fraction": 0.25},
        "teacher": teacher,
        "student": {"name": "static", "options": {"embed_dim": 16, "buckets": 64, **student}},
        "recipe": {"name": "ckd", "queue_size": 16},
        "trainer": {"epochs": 2, "batch_size": 8, "progress": False},
        "evaluation": {"repeats": 1}})


def test_a_config_run_distils_a_pretrained_encoder_from_a_plain_corpus(
        encoder_folder: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(random_texts(48)) + "\n")
    teacher = {"model": {"name": "hf_embedder", "options": {"path": str(encoder_folder)}}}
    assert preflight(embedding_config(tmp_path, corpus, teacher)).task == "embedding"
    assert not (tmp_path / "runs").exists()  # the check wrote nothing
    outcome = run(embedding_config(tmp_path, corpus, teacher))
    rows = {row["name"]: row for row in outcome.rows}
    assert rows["teacher"]["similarity_spearman"] == pytest.approx(1.0)
    assert rows["teacher"]["nn10_overlap"] == pytest.approx(1.0)
    assert -1.0 <= rows["student"]["similarity_spearman"] < 1.0
    report = (tmp_path / "runs" / "emb" / "report.md").read_text()
    assert "| Sim. Spearman | NN@10 |" in report
    loaded, meaning = load_run_student(tmp_path / "runs" / "emb")
    assert meaning.task == "embedding" and loaded(["a dog"])["sentence_embedding"].shape == (1, 16)
    trained = dict(teacher, train={"epochs": 1})
    with pytest.raises(ConfigError, match="teacher.train: recipe 'ckd' distils a pretrained "
                                          "teacher as it is"):
        embedding_config(tmp_path, corpus, trained)


def test_sentences_are_plain_lines_without_labels_split_with_a_seed(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"text {i}" for i in range(10)) + "\n\n")
    data = load_dataset("sentences", path=corpus, test_fraction=0.3, seed=1)
    assert (data.task, data.num_classes, len(data.train), len(data.test)) == \
        ("embedding", 0, 7, 3)
    assert sorted(data.train.raw + data.test.raw) == sorted(f"text {i}" for i in range(10))
    assert (data.train.labels == -100).all() and (data.test.labels == -100).all()
    assert load_dataset("sentences", path=corpus, test_fraction=0.3, seed=1).test.raw == \
        data.test.raw


def test_unigrams_alone_need_no_buckets_but_longer_n_grams_do() -> None:
    vocabulary = Vocabulary.build(TEXTS)
    assert NGramHasher(vocabulary, (1,), 0).rows == len(vocabulary)
    assert NGramHasher(vocabulary, (1,), 0)(["the", "cat"]) == vocabulary.ids(["the", "cat"])
    with pytest.raises(ValueError, match=r"buckets must be positive for n-grams longer than 1 "
                                         r"\(0 is for unigrams alone\), got 0 for n-grams "
                                         r"\[1, 2\]"):
        NGramHasher(vocabulary, (1, 2), 0)


def test_through_the_engine_the_ckd_queue_holds_the_teachers_embeddings_of_its_texts(
        encoder_folder: Path) -> None:
    texts = random_texts(40, seed=3)
    data = corpus_data(texts, test=8)
    teacher = build_model("hf_embedder", (), 0, path=str(encoder_folder))
    student = build_model("hf_student", (), 0, teacher=str(encoder_folder), layers=[1],
                          pooling="mean")
    recipe = build_recipe("ckd", queue_size=12, scale=5.0)
    Distiller(student, teacher, recipe, epochs=2, batch_size=8, optimizer={"lr": 1e-3},
              progress=False).fit(data.train)
    index = recipe.queue_index.tolist()
    assert len(set(index)) == 12 and all(0 <= i < 32 for i in index)
    expected = embed(teacher, [data.train.raw[i] for i in index])
    assert torch.allclose(recipe.queue, expected, atol=1e-5)
    assert not recipe.queue.requires_grad
    assert float(recipe.logit_scale().detach()) != pytest.approx(5.0)  # the scale learnt


@pytest.mark.parametrize("name", sorted(n for n, e in RECIPES.items() if e.cls.task == "embedding"))
def test_embedding_recipes_train_the_student_and_leave_the_teacher_frozen(
        name: str, encoder_folder: Path) -> None:
    data = corpus_data(random_texts(24, seed=4), test=8)
    teacher = build_model("hf_embedder", (), 0, path=str(encoder_folder)).train()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model("hf_student", (), 0, teacher=str(encoder_folder), layers=[0],
                          pooling="mean")
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    Distiller(student, teacher, build_recipe(name, head="linear"), epochs=1, batch_size=8,
              optimizer={"lr": 1e-2}, progress=False).fit(data.train)
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
