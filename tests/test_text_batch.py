"""Raw-text batches: collation of texts, pairs and word lists; per-word gathering."""

import torch

from kdistill.batch import UNLABELED, collate
from kdistill.models.text import per_word


def test_texts_and_pairs_stay_lists_and_labels_stack():
    batch = collate([{"input": "a b", "labels": torch.tensor(1), "index": torch.tensor(0)},
                     {"input": ("c", "d"), "labels": torch.tensor(0), "index": torch.tensor(4)}])
    assert batch["input"] == ["a b", ("c", "d")]
    assert batch["labels"].tolist() == [1, 0] and batch["index"].tolist() == [0, 4]


def test_word_lists_pad_labels_with_unlabeled_and_mask_the_real_words():
    batch = collate([{"input": ["x", "y", "z"], "labels": torch.tensor([1, 2, 3]),
                      "index": torch.tensor(0)},
                     {"input": ["w"], "labels": torch.tensor([2]), "index": torch.tensor(1)}])
    assert batch["input"] == [["x", "y", "z"], ["w"]]
    assert batch["labels"].tolist() == [[1, 2, 3], [2, UNLABELED, UNLABELED]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_per_word_takes_the_row_of_each_words_first_token():
    values = torch.arange(2 * 5 * 3).reshape(2, 5, 3).float()
    starts = torch.tensor([[1, 3], [0, 0]])
    picked = per_word(values, starts)
    assert torch.equal(picked[0, 0], values[0, 1]) and torch.equal(picked[0, 1], values[0, 3])
    assert torch.equal(picked[1, 1], values[1, 0])
