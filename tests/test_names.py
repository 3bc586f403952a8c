"""One way to say "unknown name": the wording of :func:`kdistill.names.unknown_name`, and every
registry and name check suggesting the real name for a one-letter typo."""

from __future__ import annotations

import doctest
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import kdistill.names
from kdistill.config import ConfigError, apply_override, parse_config
from kdistill.data import load_dataset
from kdistill.data.shifts import shift_images
from kdistill.losses.registry import UnknownLossError, check_params, get_loss
from kdistill.models.heads import ExtraHeads
from kdistill.models.oracle import LabelConditioned
from kdistill.models.registry import build_model, model_options
from kdistill.names import unknown_name
from kdistill.recipes import get_recipe
from kdistill.recipes.adapters import make_adapter
from kdistill.taps import TapError, TapReader
from kdistill.teachers import FrozenTeacher


# -- wording ----------------------------------------------------------------------------------
def test_one_close_name() -> None:
    assert unknown_name("model", "mpl", ["mlp", "cnn", "hf"]) == (
        "unknown model 'mpl'; did you mean 'mlp'?")


def test_two_and_three_close_names_are_joined_with_or() -> None:
    recipes = ["ce", "dkd", "fitnets", "hinton"]
    assert unknown_name("recipe", "hintn", recipes) == (
        "unknown recipe 'hintn'; did you mean 'hinton' or 'fitnets'?")
    assert unknown_name("loss", "kdd", ["kd", "dkd", "kld", "cosine"]) == (
        "unknown loss 'kdd'; did you mean 'kd', 'kld' or 'dkd'?")


def test_at_most_three_suggestions() -> None:
    known = ["tiny1", "tiny2", "tiny3", "tiny4"]
    message = unknown_name("size", "tiny", known)
    assert message == "unknown size 'tiny'; did you mean 'tiny4', 'tiny3' or 'tiny2'?"


def test_nothing_close_lists_the_sorted_valid_names_once() -> None:
    assert unknown_name("mlp size", "huge", ["tiny", "small", "base", "tiny"]) == (
        "unknown mlp size 'huge'; valid names: base, small, tiny")


def test_no_valid_names() -> None:
    assert unknown_name("hidden_mse parameter", "mask", []) == (
        "unknown hidden_mse parameter 'mask'; valid names: none")


def test_a_long_list_is_cut_after_twenty_names() -> None:
    known = [f"m{i:02d}" for i in range(23)]
    assert unknown_name("module", "head", known) == (
        "unknown module 'head'; valid names: " + ", ".join(known[:20]) + " and 3 more")
    assert unknown_name("module", "head", known[:20]).endswith("m18, m19")


def test_the_name_is_quoted_as_python_does() -> None:
    assert unknown_name("key", "it's", ["its"]) == (
        "unknown key \"it's\"; did you mean 'its'?")


def test_docstring_examples() -> None:
    result = doctest.testmod(kdistill.names)
    assert result.attempted >= 5 and result.failed == 0


# -- every registry suggests ------------------------------------------------------------------
def _config(*overrides: str) -> None:
    """Validate a small valid config changed by ``--set`` style ``overrides``."""
    raw: dict[str, Any] = {"student": {"name": "mlp", "size": "tiny"}, "recipe": {"name": "ce"}}
    for assignment in overrides:
        apply_override(raw, assignment)
    parse_config(raw)


def _csv_column(tmp_path: Path) -> None:
    path = tmp_path / "points.csv"
    path.write_text("x,labl\n0.5,1\n0.25,0\n")
    _config("data.name=csv", f"data.path={path}")


def _mlp() -> torch.nn.Module:
    return build_model("mlp", (1, 8, 8), 10, size="tiny")


# (registry, error type, the real name, a call with a one-letter typo of it)
CASES: list[tuple[str, type[Exception], str, Callable[[Path], object]]] = [
    ("recipe", ValueError, "hinton", lambda _: get_recipe("hintom")),
    ("loss", UnknownLossError, "forward_kl", lambda _: get_loss("forwad_kl")),
    ("loss parameter", ValueError, "temperature",
     lambda _: check_params("kd", {"temperatur": 2.0})),
    ("model", ValueError, "cnn", lambda _: model_options("cnm", None, {})),
    ("model size", ValueError, "small", lambda _: model_options("mlp", "smal", {})),
    ("data set", ValueError, "digits", lambda _: load_dataset("digita")),
    ("data set option", ValueError, "train_size",
     lambda _: load_dataset("fashion-mnist", train_sise=10)),
    ("shift", ValueError, "noise", lambda _: shift_images(torch.zeros(2, 3), "nose", 1.0)),
    ("adapter", ValueError, "linear",
     lambda _: make_adapter("linea", torch.zeros(2, 3), torch.zeros(2, 4))),  # type: ignore[arg-type]
    ("teacher precision", ValueError, "bf16",
     lambda _: FrozenTeacher(_mlp(), precision="bf17")),  # type: ignore[arg-type]
    ("tap module path", TapError, "features", lambda _: TapReader(_mlp(), ["module:featurs"])),
    ("oracle target module", ValueError, "head",
     lambda _: LabelConditioned(_mlp(), 10, target="haed")),
    ("extra heads features module", ValueError, "features",
     lambda _: ExtraHeads(_mlp(), [], features="feature")),
    ("config recipe", ConfigError, "hinton", lambda _: _config("recipe.name=hintom")),
    ("config model", ConfigError, "cnn", lambda _: _config("student.name=cnm")),
    ("config model size", ConfigError, "small", lambda _: _config("student.size=smal")),
    ("config model option", ConfigError, "hidden",
     lambda _: _config("student.options.hiddem=[8]")),
    ("config data set", ConfigError, "digits", lambda _: _config("data.name=digita")),
    ("config csv column", ConfigError, "labl", _csv_column),
    ("config field", ConfigError, "epochs", lambda _: _config("trainer.epocs=2")),
    ("config recipe parameter", ConfigError, "temperature",
     lambda _: _config("recipe.name=hinton", "recipe.temperatur=2")),
    ("config literal", ConfigError, "cosine", lambda _: _config("trainer.scheduler.name=cosinr")),
    ("config literal in a list", ConfigError, "rotation",
     lambda _: _config("evaluation.shifts=[rotatio]")),
]


@pytest.mark.parametrize(("error", "real", "trigger"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_every_registry_suggests_the_real_name(error: type[Exception], real: str,
                                               trigger: Callable[[Path], object],
                                               tmp_path: Path) -> None:
    with pytest.raises(error) as caught:
        trigger(tmp_path)
    suggestion = re.search(r"unknown [^;]+; did you mean ([^?]+)\?", str(caught.value))
    assert suggestion is not None, str(caught.value)
    assert real in re.findall(r"'([^']*)'", suggestion.group(1)), str(caught.value)
