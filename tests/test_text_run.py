"""Text runs end to end: a YAML-style config on a CSV file, the exported student read back by
``kdistill predict`` and by plain transformers, a distilled student beating its
cross-entropy twin, augmented transfer text, and token-level terms refused across
tokenisers."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_hf_text import save_bert

from kdistill import cli
from kdistill.config import ConfigError, parse_config
from kdistill.data.base import labeled_indices
from kdistill.evaluate import eval_batches, predict
from kdistill.models import deployable
from kdistill.models.export import load_run_student
from kdistill.models.hf import missing_head
from kdistill.predict import predict_texts
from kdistill.run import build_data, run, train_run

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "movie", "was", "plot", "actors", "story", "and", "very", "it", "a"]


def review(rng: random.Random, label: str) -> str:
    words = rng.choices(FILLER, k=5) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def write_reviews(path: Path, count: int, seed: int = 0) -> Path:
    """A CSV of ``count`` synthetic reviews: one sentiment word decides the label."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(count):
            label = "pos" if i % 2 else "neg"
            writer.writerow([review(rng, label), label])
    return path


def write_transfer(path: Path, count: int, seed: int = 1) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(review(rng, rng.choice(["pos", "neg"])) for _ in range(count)))
    return path


def text_config(tmp_path: Path, *, data: dict[str, Any], student: dict[str, Any],
                recipe: dict[str, Any], teacher: dict[str, Any] | None = None,
                epochs: int = 3, name: str = "text") -> Any:
    raw = {"name": name, "output_dir": str(tmp_path / "runs"), "data": data,
           "student": student, "recipe": recipe,
           "trainer": {"epochs": epochs, "batch_size": 16, "optimizer": {"lr": 0.01},
                       "progress": False},
           "evaluation": {"repeats": 1}}
    if teacher is not None:
        raw["teacher"] = teacher
    return parse_config(raw)


BILSTM_TEACHER = {"model": {"name": "bilstm", "size": "tiny"},
                  "train": {"epochs": 4, "batch_size": 16, "optimizer": {"lr": 0.01},
                            "progress": False}}


def test_a_text_run_exports_a_student_that_predict_reads_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = text_config(
        tmp_path, data={"name": "text", "path": str(write_reviews(tmp_path / "r.csv", 160))},
        teacher=BILSTM_TEACHER, student={"name": "ngram", "size": "tiny"},
        recipe={"name": "hinton", "temperature": 2.0, "alpha": 0.5})
    outcome = run(config)
    run_dir = tmp_path / "runs" / "text"
    model, meaning = load_run_student(run_dir)
    assert (meaning.task, meaning.label_names) == ("classification", ["neg", "pos"])

    data = build_data(config.data)
    trained = predict(deployable(outcome.fit.student), eval_batches(data.test, 16))
    loaded = predict_texts(model, data.test.raw, meaning)
    assert [p.label for p in loaded] == [["neg", "pos"][int(i)]
                                         for i in trained.logits.argmax(-1)]
    student_row = next(r for r in outcome.rows if r["name"] == "student")
    assert student_row["accuracy"] > 0.6  # learnt something: the split is balanced

    assert cli.main(["predict", str(run_dir), "a superb story", "--json"]) == 0
    line = capsys.readouterr().out.strip()
    assert '"label": "pos"' in line and '"text": "a superb story"' in line


def test_the_predict_command_names_a_folder_that_is_not_a_text_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["predict", str(tmp_path), "some text"]) == 2
    assert "not a finished text run (expected student/ and labels.json" in \
        capsys.readouterr().err


ANIMALS = ["cat", "dog"]


def write_animals(path: Path, count: int) -> Path:
    """Sentences of the tiny word-piece vocabulary of test_hf_text; the animal is the label."""
    rng = random.Random(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(count):
            animal = ANIMALS[i % 2]
            words = ["the", animal, rng.choice(["sat", "ran"]), "on", "the",
                     rng.choice(["mat", "red mat", "big mat"])]
            writer.writerow([" ".join(words), animal])
    return path


def test_a_transformer_student_exports_a_folder_plain_transformers_loads(
        tmp_path: Path) -> None:
    folder = save_bert(tmp_path / "bert", layers=2, labels=2)
    config = text_config(
        tmp_path, data={"name": "text", "path": str(write_animals(tmp_path / "a.csv", 48))},
        teacher={"model": {"name": "hf_text", "options": {"path": str(folder)}},
                 "train": {"epochs": 1, "batch_size": 16, "progress": False}},
        student={"name": "hf_student", "options": {"teacher": str(folder), "layers": [1]}},
        recipe={"name": "hinton"}, epochs=1)
    run(config)
    exported = tmp_path / "runs" / "text" / "student"
    network = transformers.AutoModelForSequenceClassification.from_pretrained(exported)
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert network.config.num_hidden_layers == 1
    assert network.config.id2label == {0: "cat", 1: "dog"}
    texts = ["the dog sat on the mat", "the cat ran"]
    model, _ = load_run_student(tmp_path / "runs" / "text")
    with torch.inference_mode():
        plain = network.eval()(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        ours = model.eval()(texts)["logits"]
    torch.testing.assert_close(ours, plain)


def test_a_distilled_text_student_beats_its_cross_entropy_twin(tmp_path: Path) -> None:
    """16 labels and 400 unlabelled transfer texts: cross-entropy learns from the labels
    alone, hinton also from the teacher's answers on the transfer texts (fixed seeds)."""
    data = {"name": "text", "path": str(write_reviews(tmp_path / "r.csv", 240)), "labeled": 16,
            "unlabeled": str(write_transfer(tmp_path / "t.txt", 400))}
    accuracy = {}
    for recipe in ({"name": "ce"}, {"name": "hinton", "temperature": 2.0, "alpha": 0.1}):
        config = text_config(tmp_path, data=data, teacher=BILSTM_TEACHER,
                             student={"name": "ngram", "size": "tiny"}, recipe=recipe)
        splits = build_data(config.data)
        _, fit = train_run(config, splits)
        logits = predict(deployable(fit.student), eval_batches(splits.test, 32)).logits
        accuracy[recipe["name"]] = float((logits.argmax(-1) == splits.test.labels)
                                         .float().mean())
    assert accuracy["hinton"] > accuracy["ce"] + 0.1, accuracy


def test_augmented_copies_join_the_transfer_set_without_labels(tmp_path: Path) -> None:
    data = {"name": "text", "path": str(write_reviews(tmp_path / "r.csv", 40)),
            "augment": {"method": "none", "copies": 3, "p_dropout": 0.3, "n_swaps": 1}}
    config = text_config(tmp_path, data=data, student={"name": "ngram", "size": "tiny"},
                         recipe={"name": "ce"})
    plain = build_data(config.data.model_copy(update={"augment": None}))
    augmented = build_data(config.data)
    originals = len(plain.train)
    added = augmented.train.raw[originals:]
    assert augmented.train.raw[:originals] == plain.train.raw
    assert originals < len(augmented.train) <= 4 * originals
    assert labeled_indices(augmented.train) == list(range(originals))
    known = {" ".join(sorted(text.split())) for text in plain.train.raw}
    for text in added:  # each copy drops or swaps words of one original: same words or fewer
        assert text not in plain.train.raw
        assert any(set(text.split()) <= set(original.split()) for original in known)


def test_token_level_terms_between_different_tokenisers_are_refused(tmp_path: Path) -> None:
    folder = save_bert(tmp_path / "bert", layers=2, labels=2)
    config = text_config(
        tmp_path, data={"name": "text", "path": str(write_animals(tmp_path / "a.csv", 24))},
        teacher={"model": {"name": "hf_text", "options": {"path": str(folder)}},
                 "checkpoint": None, "train": {"epochs": 1, "progress": False}},
        student={"name": "bilstm", "size": "tiny"},
        recipe={"name": "composite", "terms": [
            {"loss": "hidden_mse", "student": "hidden.0", "teacher": "hidden.1",
             "adapter": "linear"}]}, epochs=1)
    with pytest.raises(ConfigError, match=r"recipe: taps \['hidden.0', 'hidden.1'\] compare "
                                          r"the student's and the teacher's tokens"):
        train_run(config, build_data(config.data))


# --- a fine-tuned teacher folder used as it is --------------------------------------------------

def folder_teacher_config(tmp_path: Path, folder: Path, recipe: dict[str, Any]) -> Any:
    return text_config(
        tmp_path, data={"name": "text", "path": str(write_reviews(tmp_path / "r.csv", 24))},
        teacher={"model": {"name": "hf_text", "options": {"path": str(folder)}}},
        student={"name": "ngram", "size": "tiny"}, recipe=recipe, epochs=1)


def test_a_fine_tuned_teacher_folder_is_distilled_as_it_is_without_train(tmp_path: Path) -> None:
    folder = save_bert(tmp_path / "bert", layers=2, labels=2, seed=3)
    config = folder_teacher_config(tmp_path, folder, {"name": "hinton", "temperature": 2.0})
    splits = build_data(config.data)
    teacher, _ = train_run(config, splits)
    texts = splits.test.raw
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    network = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        plain = network(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        ours = teacher.eval()(texts)["logits"]
    torch.testing.assert_close(ours, plain)  # the folder's weights, head included, untouched


@pytest.mark.parametrize(("head", "labels", "problem"), [
    (transformers.BertModel, 2, "its config.json names BertModel, no *ForSequenceClassification "
                                "head"),
    (transformers.BertForSequenceClassification, 3, "its head has 3 outputs, the data 2")])
def test_a_teacher_folder_without_the_datas_head_is_refused_for_logit_recipes(
        tmp_path: Path, head: type, labels: int, problem: str) -> None:
    folder = save_bert(tmp_path / "bert", labels=labels, head=head)
    config = folder_teacher_config(tmp_path, folder, {"name": "hinton"})
    with pytest.raises(ConfigError) as error:
        train_run(config, build_data(config.data))
    assert str(error.value) == (
        f"teacher.model.options.path: '{folder}' is used as it is (no teacher.train or "
        f"teacher.checkpoint), but {problem}, so its classification head would start "
        "untrained; give a folder fine-tuned for this data, or train the teacher here with "
        "teacher.train")


def test_a_bare_encoder_folder_teaches_terms_that_do_not_read_its_logits(tmp_path: Path) -> None:
    folder = save_bert(tmp_path / "bert", layers=2, head=transformers.BertModel, seed=4)
    config = text_config(
        tmp_path, data={"name": "text", "path": str(write_reviews(tmp_path / "r.csv", 24))},
        teacher={"model": {"name": "hf_text", "options": {"path": str(folder)}}},
        student={"name": "hf_student", "options": {"teacher": str(folder), "layers": [1]}},
        recipe={"name": "tinybert", "stage": "general", "student_layers": 1,
                "teacher_layers": 2}, epochs=1)
    splits = build_data(config.data)
    teacher, _ = train_run(config, splits)
    encoder = transformers.BertModel.from_pretrained(folder).state_dict()
    loaded = {name.removeprefix("bert."): value
              for name, value in teacher.model.state_dict().items() if name.startswith("bert.")}
    assert loaded.keys() == encoder.keys()
    assert all(torch.equal(value, encoder[name]) for name, value in loaded.items())


def test_missing_head_reads_the_folders_architecture_and_label_count(tmp_path: Path) -> None:
    folder = save_bert(tmp_path / "one", labels=1)
    assert missing_head(folder, "regression", 5) is None  # one output whatever the classes
    assert missing_head(folder, "classification", 1) is None
    assert missing_head(folder, "token_classification", 1) == (
        "its config.json names BertForSequenceClassification, no *ForTokenClassification head")
    assert missing_head(folder, "encoder", 7) is None
