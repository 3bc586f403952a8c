"""In-memory data sets (``kdistill.data.base``): the items of an :class:`ArrayDataset`, what
:class:`IndexedDataset` makes of any data set's items, and the errors of label subsets."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

from kdistill.batch import UNLABELED, collate
from kdistill.data.base import (
    ArrayDataset,
    IndexedDataset,
    RowReadable,
    keep_labels,
    labeled_indices,
)
from kdistill.data.sequences import SequenceDataset
from kdistill.data.tagging import TokenDataset


def test_array_items_are_input_label_and_index():
    inputs = torch.arange(6.0).reshape(3, 2)
    data = ArrayDataset(inputs, torch.tensor([2, 0, 1], dtype=torch.int32))
    assert len(data) == 3 and data.labels.dtype == torch.long
    item = data[2]
    assert set(item) == {"input", "labels", "index"}
    assert torch.equal(item["input"], inputs[2]) and item["labels"].item() == 1
    assert item["index"].item() == 2 and item["index"].dtype == torch.long
    regression = ArrayDataset(inputs, torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64))
    assert regression.labels.dtype == torch.float32
    relabelled = data.with_labels(torch.tensor([UNLABELED, 1, UNLABELED]))
    assert isinstance(relabelled, ArrayDataset) and relabelled.inputs is inputs
    assert relabelled.labels.tolist() == [UNLABELED, 1, UNLABELED]
    with pytest.raises(ValueError) as error:
        ArrayDataset(inputs, torch.zeros(2))
    assert str(error.value) == "inputs have 3 rows but labels have 2"


def test_array_rows_are_the_collated_items_read_at_once():
    data = ArrayDataset(torch.randn(7, 2, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    picked = [5, 0, 3, 3]
    rows, items = data.rows(picked), collate([data[i] for i in picked])
    assert set(rows) == set(items) == {"input", "labels", "index"}
    for key in items:
        assert rows[key].dtype == items[key].dtype and torch.equal(rows[key], items[key])
    assert isinstance(data, RowReadable) and not isinstance(Items([1]), RowReadable)


@pytest.mark.parametrize("data", [
    TokenDataset(torch.randint(1, 9, (5, 4)), torch.randint(0, 3, (5, 4)),
                 torch.tensor([[1, 1, 0, 0]] * 5)),
    SequenceDataset(torch.randn(5, 3), torch.tensor([[1, 2, UNLABELED]] * 4 + [[3, 3, 3]]))])
def test_the_rows_of_arrays_with_more_columns_carry_them(data: ArrayDataset) -> None:
    picked = [4, 1, 1]
    rows, items = data.rows(picked), collate([data[i] for i in picked])
    assert data.reads_rows and set(rows) == set(items) and len(rows) == 4
    for key in items:
        assert rows[key].dtype == items[key].dtype and torch.equal(rows[key], items[key])


class Items(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_indexed_items_are_dicts_carrying_their_index():
    x = torch.ones(2)
    given = {"input": x, "labels": torch.tensor(1)}
    data = IndexedDataset(Items([given, (x, 3), [x, 0.5], x, {"input": x,
                                                                "index": torch.tensor(7)}]))
    assert len(data) == 5
    first = data[0]
    assert set(first) == {"input", "labels", "index"} and first["index"].item() == 0
    assert "index" not in given  # the data set's own item is left alone
    pair = data[1]
    assert set(pair) == {"input", "labels", "index"}
    assert pair["input"] is x and pair["labels"].item() == 3 and pair["index"].item() == 1
    assert isinstance(pair["labels"], torch.Tensor)
    assert data[2]["labels"].item() == 0.5 and data[2]["input"] is x
    lone = data[3]
    assert set(lone) == {"input", "index"} and lone["input"] is x and lone["index"].item() == 3
    assert data[4]["index"].item() == 7  # an item's own index is kept


@pytest.mark.parametrize(("item", "kind"), [("text", "str"), ((1, 2, 3), "tuple"),
                                            (None, "NoneType")])
def test_an_item_of_no_known_kind_is_an_error_naming_it(item, kind):
    with pytest.raises(TypeError) as error:
        IndexedDataset(Items([1, item]))[1]
    assert str(error.value) == (f"data set item 1 is a {kind}; expected a dict, an (input, "
                                "label) pair or a tensor")


class LabelsOnly(ArrayDataset):
    """A data set whose samples are costly to load: only its ``labels`` may be read."""

    def __getitem__(self, i: int):
        raise AssertionError("a sample was loaded")


def test_labelled_positions_come_from_the_labels_without_loading_samples():
    tokens = torch.tensor([[UNLABELED, UNLABELED, UNLABELED], [UNLABELED, 2, UNLABELED],
                           [0, 1, 1], [UNLABELED, UNLABELED, UNLABELED]])
    assert labeled_indices(LabelsOnly(torch.zeros(4, 3), tokens)) == [1, 2]
    classes = torch.tensor([UNLABELED, 4, UNLABELED, 0])
    assert labeled_indices(LabelsOnly(torch.zeros(4, 3), classes)) == [1, 3]


@pytest.mark.parametrize(("labels", "count", "message"), [
    (torch.zeros(3, 2, dtype=torch.long), 1,
     "labels must be one per sample (1-D), got shape (3, 2)"),
    (torch.tensor([0, 1, UNLABELED]), 0,
     "labeled count must be between 1 and 2 (the known labels), got 0"),
    (torch.tensor([0, 1, UNLABELED]), 3,
     "labeled count must be between 1 and 2 (the known labels), got 3"),
])
def test_keep_labels_errors(labels, count, message):
    with pytest.raises(ValueError) as error:
        keep_labels(labels, count, seed=0)
    assert str(error.value) == message


def test_keeping_every_known_target_keeps_each_once():
    labels = torch.arange(50, dtype=torch.float32)
    labels[7] = math.nan
    kept = keep_labels(labels, 49, seed=3)
    assert torch.equal(kept.nan_to_num(-1.0), labels.nan_to_num(-1.0))
    assert kept is not labels
