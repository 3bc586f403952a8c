"""Every shipped example config runs end to end in a reduced form (2 epochs, 2-epoch teacher),
plus whole runs on user data files (CSV and npz) written here.

The teacher is trained once through ``kdistill.run`` and cached in the session's temporary
``KDISTILL_CACHE`` (see conftest.py); every example names the same teacher, so the others load it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from kdistill.config import RunConfig, load_config, parse_config
from kdistill.recipes import build_recipe
from kdistill.run import (
    RunOutcome,
    cache_dir,
    run,
    teacher_finetuning,
    teacher_key,
    teacher_training,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# Per example: extra overrides and the loss terms logged in each phase.
CASES: dict[str, tuple[list[str], list[set[str]]]] = {
    "ce": (["trainer.epochs=10", "trainer.eval_every=1"], [{"ce"}]),
    "hinton": (["trainer.epochs=2"], [{"ce", "kd"}]),
    "dkd": (["trainer.epochs=2"], [{"ce", "tckd", "nckd"}]),
    "fitnets": (["trainer.epochs=2", "recipe.hint_epochs=1"], [{"hint"}, {"ce", "kd"}]),
    "composite": (["trainer.epochs=2"], [{"ce", "kd", "hint"}]),
    "phases": (["phases.0.epochs=1", "phases.1.epochs=1"], [{"kd"}, {"ce", "kd"}]),
    "annealing": (["trainer.epochs=2", "recipe.phase1_epochs=1", "recipe.t_max=1"],
                  [{"mse"}, {"ce"}]),
    "continuation": (["trainer.epochs=2", "recipe.anneal_epochs=1", "recipe.t_max=1"],
                     [{"ce", "hinge"}]),
    "deit": (["trainer.epochs=2"], [{"ce", "distill"}]),
    "deit_vit": (["trainer.epochs=2"], [{"ce", "distill"}]),
    "okdhp": (["trainer.epochs=10", "trainer.eval_every=1"], [{"ce", "ce_ensemble", "kl"}]),
    "dml": (["trainer.epochs=10", "trainer.eval_every=1"],
            [{"ce", "kl", "peer1_ce", "peer1_kl"}]),
    "bdkd": (["trainer.epochs=10", "trainer.eval_every=1"],
             [{"ce", "forward_kl", "reverse_kl", "teacher_ce", "teacher_kl"}]),
    "mean_teacher": (["trainer.epochs=2", "trainer.eval_every=1", "data.labeled=300"],
                     [{"ce", "consistency"}]),
    "atsen": (["trainer.epochs=2", "trainer.eval_every=1", "data.labeled=300",
               "recipe.warmup_epochs=1"],
              [{"ce", "pseudo", "kd", "peer_ce", "peer_pseudo", "peer_kd"}]),
    "oracle": (["trainer.epochs=2"], [{"ce", "kd"}]),
    "mse": (["trainer.epochs=2"], [{"mse"}]),
    "regression_kd": (["trainer.epochs=2"], [{"kd", "kd_augmented", "gold"}]),
    "denoise": (["trainer.epochs=2"], [{"ce", "soft", "consistency"}]),
    "daft": (["trainer.epochs=2"], [{"ce", "kd"}]),
    "adversarial": (["trainer.epochs=2"], [{"adversarial_ce"}]),
}
RECORD_KEYS = {"kind", "phase", "epoch", "step", "lr", "loss"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reduced(name: str, output: Path) -> RunConfig:
    """The example ``name`` with a 2-epoch teacher, a short budget and quick timing."""
    overrides = [f"output_dir={output}", "trainer.progress=false", "trainer.batch_size=32",
                 "evaluation.repeats=2", *CASES[name][0]]
    raw = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    if "train" in (raw.get("teacher") or {}):
        overrides.append("teacher.train.epochs=2")
    return load_config(EXAMPLES / f"{name}.yaml", overrides)


def check_outcome(outcome: RunOutcome, config: RunConfig) -> list[dict[str, Any]]:
    """Checks shared by every run; returns the evaluation records."""
    run_dir = Path(config.output_dir) / config.name
    assert outcome.report == run_dir / "report.md"
    assert outcome.report.is_file()
    assert (run_dir / "student.safetensors").is_file()
    history = outcome.fit.history
    evals = [r for r in history if r["kind"] == "eval"]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in logged if r["kind"] == "eval"] == evals
    rows = {row["name"]: row for row in outcome.rows}
    if "eval_pearson" in evals[-1]:
        final = evals[-1]["eval_pearson"]
        assert rows["student"]["pearson"] == pytest.approx(final)
        assert final > 0.2, f"{config.name}: student scores do not follow the gold ({final})"
    else:
        final = evals[-1]["eval_accuracy"]
        assert rows["student"]["accuracy"] == pytest.approx(final)
        assert final > 0.2, f"{config.name}: student accuracy {final} is no better than chance"
    return evals


def recipes_of(path: Path) -> set[str]:
    """The recipe names an example config uses (its recipe, or each phase's; none for an L2KD
    config, examples/lm/l2kd.yaml, whose stages always use token_kd)."""
    raw = yaml.safe_load(path.read_text())
    sections = ([raw["recipe"]] if "recipe" in raw else
                [p["recipe"] for p in raw.get("phases", [])])
    return {section if isinstance(section, str) else section["name"] for section in sections}


def test_every_recipe_has_an_example() -> None:
    from kdistill.recipes import RECIPES

    # Image recipes have one example each in examples/ (run below); text, sentence-embedding
    # and CTC recipes have theirs in examples/text/, examples/embeddings/, examples/ctc/.
    used = set().union(*(recipes_of(path) for path in EXAMPLES.rglob("*.yaml")))
    assert set(RECIPES) <= used, f"recipes without an example: {set(RECIPES) - used}"
    assert set(CASES) == {p.stem for p in EXAMPLES.glob("*.yaml")}


@pytest.mark.parametrize("name", list(CASES))
def test_example_runs(name: str, tmp_path: Path) -> None:
    config = reduced(name, tmp_path)
    outcome = run(config)
    evals = check_outcome(outcome, config)
    phase_terms = CASES[name][1]
    epochs = ([p.epochs for p in config.phases] if config.phases is not None else
              [e for _, e in _recipe_split(config)])
    assert len(evals) == sum(epochs)
    assert [r["phase"] for r in evals] == [i for i, n in enumerate(epochs) for _ in range(n)]
    train = [r for r in outcome.fit.history if r["kind"] == "train"]
    for index, terms in enumerate(phase_terms):
        records = [r for r in train if r["phase"] == index]
        assert records, f"phase {index} logged no steps"
        assert {frozenset(set(r) - RECORD_KEYS) for r in records} == {frozenset(terms)}
        assert all(math.isfinite(r["loss"]) for r in records)
    for row in outcome.rows:  # accuracy under the shifts the config asks for, and their mean
        shifted = [row[f"accuracy_{shift}"] for shift in config.evaluation.shifts]
        assert all(0.0 <= a <= 1.0 for a in shifted)
        if shifted:
            assert row["accuracy_shifted"] == pytest.approx(sum(shifted) / len(shifted))
    recipe = build_recipe(**config.recipe) if config.recipe else None
    if config.teacher is None or (recipe is not None and recipe.teacher_model == "none"):
        assert [row["name"] for row in outcome.rows] == ["student"]
    else:
        assert [row["name"] for row in outcome.rows] == ["teacher", "student"]
    if config.teacher is not None and (recipe is None or recipe.teacher_model == "trained"):
        assert config.teacher.train is not None
        key = teacher_key(config.teacher, config.data, teacher_training(config.teacher, recipe),
                          teacher_finetuning(config.teacher, recipe))
        assert (cache_dir() / "teachers" / f"{key}.safetensors").is_file()


def _recipe_split(config: RunConfig) -> list[tuple[Any, int]]:
    spec = dict(config.recipe or {})
    return build_recipe(spec.pop("name"), **spec).phases(config.trainer.epochs)


def test_composite_weight_schedule_reaches_the_loss(tmp_path: Path) -> None:
    """The YAML's hint weight (linear 1 -> 0 over 10 epochs) is applied at every step:
    loss = 0.1 ce + 0.9 kd + w(t) hint with t = step / steps_per_epoch."""
    config = reduced("composite", tmp_path)
    outcome = run(config)
    train = [r for r in outcome.fit.history if r["kind"] == "train"]
    per_epoch = sum(1 for r in train if r["epoch"] == 0)
    assert per_epoch > 1
    for record in train:
        weight = 1.0 - (record["step"] / per_epoch) / 10.0
        expected = 0.1 * record["ce"] + 0.9 * record["kd"] + weight * record["hint"]
        assert record["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def test_run_on_a_csv_file(tmp_path: Path) -> None:
    """Digits written as a CSV (64 pixel columns and a label column), distilled from an MLP."""
    images, labels = digits_arrays()
    flat = images.reshape(len(images), -1)
    path = tmp_path / "digits.csv"
    header = [f"p{i}" for i in range(64)] + ["digit"]
    lines = [",".join(header)] + [",".join([*(f"{v:.4f}" for v in row), str(t)])
                                  for row, t in zip(flat, labels, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    raw = {
        "name": "csv-run", "output_dir": str(tmp_path / "out"),
        "data": {"name": "csv", "path": str(path), "label_column": "digit", "labeled": 200},
        "student": {"name": "mlp", "size": "tiny"},
        "teacher": {"model": {"name": "mlp", "size": "small"},
                    "train": {"epochs": 3, "batch_size": 32, "progress": False,
                              "optimizer": {"lr": 0.01}}},
        "recipe": {"name": "hinton"},
        "trainer": {"epochs": 2, "batch_size": 32, "progress": False,
                    "optimizer": {"lr": 0.01}},
        "evaluation": {"repeats": 2, "threads": 1},
    }
    config = parse_config(raw)
    outcome = run(config)
    check_outcome(outcome, config)
    assert outcome.fit.student.features[1].in_features == 64  # type: ignore[index,union-attr]
    teacher_row = next(r for r in outcome.rows if r["name"] == "teacher")
    assert teacher_row["accuracy"] > 0.5


def test_run_on_an_npz_file(tmp_path: Path) -> None:
    """Digit images in an npz with given splits, a CNN student trained on its labels."""
    images, labels = digits_arrays()
    images = images[:, None]
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=images[:1200], y_train=labels[:1200], x_test=images[1200:],
             y_test=labels[1200:])
    raw = {
        "name": "npz-run", "output_dir": str(tmp_path / "out"),
        "data": {"name": "npz", "path": str(path)},
        "student": {"name": "cnn", "size": "tiny"},
        "recipe": {"name": "ce"},
        "trainer": {"epochs": 2, "batch_size": 32, "progress": False,
                    "optimizer": {"lr": 0.01}},
        "evaluation": {"repeats": 2, "threads": 1},
    }
    config = parse_config(raw)
    outcome = run(config)
    evals = check_outcome(outcome, config)
    assert len(evals) == 2
    assert len(outcome.fit.history) > 2
    saved = yaml.safe_load((Path(config.output_dir) / "npz-run" / "config.json").read_text())
    assert saved["data"]["path"] == str(path)


def test_teacher_precision_reaches_the_teacher_source(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import kdistill.run

    used: list[str] = []

    class RecordingTeacher(kdistill.run.FrozenTeacher):
        def __init__(self, model: Any, precision: Any = "fp32", compile: bool = False) -> None:
            used.append(precision)
            super().__init__(model, precision, compile)

    monkeypatch.setattr(kdistill.run, "FrozenTeacher", RecordingTeacher)
    config = reduced("hinton", tmp_path)
    config.teacher.precision = "bf16"
    outcome = run(config)
    assert used == ["bf16"]
    assert all(np.isfinite(r["kd"]) for r in outcome.fit.history if r["kind"] == "train")
