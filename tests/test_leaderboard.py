"""The leaderboard script's pure parts: setups and their check, data split, configs, aggregation,
verdicts and the markdown tables (no training here; the benchmark itself runs on demand)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from kdistill.config import DataConfig
from kdistill.demo import step_matched_epochs
from kdistill.recipes import RECIPES, Recipe
from kdistill.recipes.base import RecipeEntry
from kdistill.run import build_data

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "leaderboard.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("leaderboard", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["leaderboard"] = module
    spec.loader.exec_module(module)
    return module


lb = _load()


# -- setups -------------------------------------------------------------------------------------
class _Classifier(Recipe):
    name = "made_up_classifier"
    summary = paper = ""


class _Scorer(Recipe):
    name = "made_up_scorer"
    summary = paper = ""
    task: ClassVar[str] = "regression"


def _registry(*classes: type[Recipe]) -> dict[str, RecipeEntry]:
    return {cls.name: RecipeEntry(cls.name, cls) for cls in classes}


def test_every_registered_classification_recipe_has_a_setup() -> None:
    lb.check_setups()  # raises SetupError naming a registered recipe that has no setup
    covered = {setup.recipe for setup in lb.SETUPS.values()}
    assert set(lb.classification_recipes()) <= covered
    assert {"regression_kd", "mse"}.isdisjoint(lb.classification_recipes())


def test_a_classification_recipe_without_setup_fails_loudly() -> None:
    registry = {**RECIPES, **_registry(_Classifier, _Scorer)}
    with pytest.raises(lb.SetupError, match="made_up_classifier") as error:
        lb.check_setups(registry)
    assert "made_up_scorer" not in str(error.value)  # regression recipes need no setup


def test_setups_of_unregistered_recipes_are_skipped_and_reported() -> None:
    registry = _registry(*(RECIPES[n].cls for n in ("ce", "hinton")))
    setups = {k: lb.SETUPS[k] for k in ("ce", "ce-steps", "hinton", "dkd")}
    assert lb.check_setups(registry, setups) == ["dkd"]
    assert lb.select_entries(None, registry, setups) == ["ce", "ce-steps", "hinton"]


def test_selected_rows_keep_the_baselines_and_unknown_rows_are_refused() -> None:
    assert lb.select_entries(["hinton"]) == ["ce", "ce-steps", "hinton"]
    with pytest.raises(lb.SetupError, match="hintn"):
        lb.select_entries(["hintn"])


# -- data and configs ---------------------------------------------------------------------------
def test_validation_split_is_stratified_held_out_and_labels_are_hidden() -> None:
    config = DataConfig(name="digits", labeled=30)
    splits, validation = lb.leaderboard_data(config, validation=100)
    full = build_data(DataConfig(name="digits"))
    assert len(splits.train) + len(validation) == len(full.train)
    assert torch.bincount(validation.labels).tolist() == [10] * 10
    # no validation image is in the training split
    train_rows = {tuple(x.flatten().tolist()) for x in splits.train.inputs}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in validation.inputs)
    known = splits.train.labels[splits.train.labels >= 0]
    assert torch.bincount(known, minlength=10).tolist() == [3] * 10
    assert len(splits.test) == len(full.test)


def test_budgets_are_step_matched_only_for_labels_only_rows() -> None:
    few = {e: lb.run_config(e, "few", 0, False, 3250) for e in ("ce", "ce-steps", "hinton")}
    matched = step_matched_epochs(20, 3250, lb.FEW_LABELS, 64)
    assert matched == 510
    assert few["ce"].trainer.epochs == 20
    assert few["ce-steps"].trainer.epochs == matched
    assert few["ce-steps"].trainer.eval_every == matched // 20
    assert few["hinton"].trainer.epochs == 20
    assert lb.run_config("ce", "all", 1, False, 3250).trainer.epochs == 20
    assert few["hinton"].data.labeled == lb.FEW_LABELS
    assert few["hinton"].trainer.seed == 0 and lb.run_config("hinton", "few", 2, False,
                                                             3250).trainer.seed == 2


def test_teacher_sections_follow_the_recipes_teacher_model() -> None:
    hinton = lb.run_config("hinton", "all", 0, False, 3250)
    assert hinton.teacher.model == lb.TEACHER and hinton.teacher.train is not None
    assert lb.run_config("ce", "all", 0, False, 3250).teacher is None
    if "dml" in RECIPES:  # fresh peers: the same architecture, untrained
        dml = lb.run_config("dml", "all", 0, False, 3250)
        assert dml.teacher.model == lb.TEACHER and dml.teacher.train is None
    if "mean_teacher" in RECIPES:  # the teacher is made from the student
        assert lb.run_config("mean_teacher", "all", 0, False, 3250).teacher is None


# -- aggregation, verdicts, tables --------------------------------------------------------------
def _run(entry: str, seed: int, accuracy: float | None, *, error: str | None = None,
         setting: str = "few") -> dict[str, Any]:
    run = {"setting": setting, "entry": entry, "recipe": entry.split("-")[0], "seed": seed,
           "teacher": "CNN (shared)", "status": "failed" if error else "ok", "seconds": 2.0}
    if error:
        run["error"] = error
    else:
        run.update(accuracy=accuracy, agreement=accuracy, ece=0.05)
    return run


def test_mean_and_sample_std() -> None:
    mean, std = lb.mean_std([0.90, 0.92, 0.97])
    assert mean == pytest.approx(0.93)
    assert std == pytest.approx(((0.03**2 + 0.01**2 + 0.04**2) / 2) ** 0.5)
    assert lb.mean_std([0.5]) == (0.5, None)
    assert lb.mean_std([None, float("nan")]) == (None, None)


def test_summary_averages_successful_seeds_and_keeps_errors() -> None:
    runs = [_run("hinton", 0, 0.80), _run("hinton", 1, 0.90),
            _run("hinton", 2, None, error="RuntimeError: boom"),
            _run("ce", 0, 0.70), _run("ce", 0, 0.99, setting="all")]
    rows = lb.summarise(runs, "few")
    assert [r["entry"] for r in rows] == ["ce", "hinton"]  # SETUPS order
    hinton = rows[1]
    assert (hinton["seeds"], hinton["ok"], hinton["errors"]) == (3, 2, ["RuntimeError: boom"])
    assert hinton["accuracy"] == pytest.approx(0.85)
    assert hinton["accuracy_std"] == pytest.approx(statistics.stdev([0.80, 0.90]))
    assert rows[0]["accuracy"] == pytest.approx(0.70) and rows[0]["accuracy_std"] is None


def test_verdict_says_no_unless_the_mean_exceeds_the_baseline() -> None:
    assert lb.verdict(0.81, 0.80) == "yes"
    assert lb.verdict(0.80, 0.80) == "no"
    assert lb.verdict(0.79, 0.80) == "no"
    assert lb.verdict(None, 0.80) == "n/a" and lb.verdict(0.8, None) == "n/a"


def _table(runs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The rendered table as {row name: cells}, plus the header under 'header'."""
    lines = lb.render_setting(lb.summarise(runs, "few")).splitlines()
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    return {"header": cells[0], **{row[0].strip("`"): row for row in cells[2:]}}


def test_table_marks_rows_that_do_not_beat_each_baseline() -> None:
    runs = [_run("ce", s, a) for s, a in enumerate([0.70, 0.72])]
    runs += [_run("ce-steps", s, a) for s, a in enumerate([0.80, 0.82])]
    runs += [_run("hinton", s, a) for s, a in enumerate([0.75, 0.77])]
    runs += [_run("dkd", s, a) for s, a in enumerate([0.70, 0.72])]
    table = _table(runs)
    header = table["header"]
    beats_ce, beats_steps = header.index("beats ce?"), header.index("beats ce-steps?")
    assert table["hinton"][beats_ce] == "yes" and table["hinton"][beats_steps] == "no"
    assert table["dkd"][beats_ce] == "no"  # a tie is not a win
    assert table["ce"][beats_ce] == "–" and table["ce-steps"][beats_steps] == "–"
    assert table["hinton"][header.index("accuracy %")] == "76.00 ± 1.41"
    assert table["hinton"][header.index("Δ acc vs ce (pts)")] == "+5.00"
    assert table["hinton"][header.index("time/run (s)")] == "2.0"


def test_table_reports_failures_instead_of_numbers() -> None:
    runs = [_run("ce", 0, 0.70), _run("hinton", 0, None, error="ValueError: bad | shape"),
            _run("dkd", 0, 0.75), _run("dkd", 1, None, error="KeyError: x")]
    table = _table(runs)
    assert "beats ce-steps?" not in table["header"]  # no ce-steps row in this setting
    hinton = table["hinton"]
    assert hinton[2] == "failed: ValueError: bad \\| shape"  # the pipe cannot break the table
    assert hinton[table["header"].index("beats ce?")] == "n/a"
    assert table["dkd"][2] == "75.00 (1 of 2 seeds failed: KeyError: x)"


def test_markdown_has_a_table_per_setting_the_teachers_and_the_machine() -> None:
    runs = [_run("ce", 0, 0.70), _run("hinton", 0, 0.75), _run("ce", 0, 0.9, setting="all")]
    report = {
        "protocol": {"quick": False, "train": 3250, "validation": 500, "test": 1250,
                     "student_params": 12730, "epochs": 20, "batch_size": 64, "lr": 0.01,
                     "seeds": [0]},
        "finished": "2026-01-01 00:00 UTC", "started": "", "command": "python leaderboard.py",
        "summary": {s: lb.summarise(runs, s) for s in lb.SETTINGS},
        "teachers": {"k": {"name": "shared CNN", "model": "cnn", "recipe": "ce",
                           "status": "ok", "cached": False, "seconds": 30.2, "params": 61050,
                           "accuracy": 0.9736, "ece": 0.0091}},
        "setups": {}, "skipped": ["atsen"], "runs": runs, "workers": 2, "total_seconds": 600,
        "machine": {"cpus": 2, "torch": "2", "python": "3", "load_start": [1.0, 2.0, 3.0],
                    "load_mean": 1.5},
    }
    text = lb.render_markdown(report)
    assert "## All labels" in text and "## Few labels (100)" in text
    assert "| shared CNN | cnn | ce | 61,050 | 97.36 | 0.91 | 30 |" in text
    assert "Reproduce: `python leaderboard.py`" in text
    assert "1.00, 2.00, 3.00" in text and "10.0 min for 3 runs" in text
    assert "(skipped): `atsen`" in text
    assert "quick smoke budget" not in text
