"""The leaderboard's pure parts: rows read from the examples, the run configs built from them,
the data split, and the page (aggregation, verdicts, markdown). No training here; the benchmark
itself runs on demand."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from kdistill.config import DataConfig, check_registered, load_config
from kdistill.demo import step_matched_epochs
from kdistill.recipes import RECIPES, Recipe
from kdistill.recipes.base import RecipeEntry
from kdistill.run import build_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import leaderboard as lb  # noqa: E402
import leaderboard_report as lbr  # noqa: E402

TRAIN = 3250  # mnist5k training images after the validation split


def config(row: str, setting: str = "all", seed: int = 0, quick: bool = False) -> Any:
    rows = {r.name: r for r in lb.leaderboard_rows()}
    return lb.run_config(rows[row], setting, seed, quick, TRAIN)


# -- rows and their examples --------------------------------------------------------------------
class _Classifier(Recipe):
    name = "made_up_classifier"
    summary = paper = ""


class _Scorer(Recipe):
    name = "made_up_scorer"
    summary = paper = ""
    task: ClassVar[str] = "regression"


def _registry(*classes: type[Recipe]) -> dict[str, RecipeEntry]:
    return {cls.name: RecipeEntry(cls.name, cls) for cls in classes}


def test_every_registered_classification_recipe_is_a_row_that_can_run() -> None:
    rows = lb.leaderboard_rows()
    classification = {n for n, e in RECIPES.items()
                      if e.cls.task == "classification" and e.cls.architecture is None}
    assert "tinybert" in RECIPES and "tinybert" not in classification  # transformers only
    assert {row.recipe for row in rows} == classification
    assert [row.name for row in rows][:2] == ["ce", "ce-steps"]
    for row in rows:
        for setting in row.settings:
            for quick in (False, True):  # the quick budget fits every example's phases too
                built = config(row.name, setting, quick=quick)
                assert check_registered(built) == [], built.name


def test_a_classification_recipe_without_an_example_fails_loudly() -> None:
    registry = {**RECIPES, **_registry(_Classifier, _Scorer)}
    with pytest.raises(lb.SetupError, match="made_up_classifier") as error:
        lb.leaderboard_rows(registry=registry)
    assert "made_up_scorer" not in str(error.value)  # regression recipes need no row


def test_selected_rows_keep_the_baselines_and_unknown_rows_are_refused() -> None:
    assert [r.name for r in lb.leaderboard_rows(["hinton"])] == ["ce", "ce-steps", "hinton"]
    with pytest.raises(lb.SetupError, match="hintn"):
        lb.leaderboard_rows(["hintn"])


def test_every_row_runs_its_examples_recipe_and_student_options() -> None:
    for row in lb.leaderboard_rows():
        example = load_config(lb.EXAMPLES / f"{row.recipe}.yaml")
        for setting in row.settings:
            built = config(row.name, setting)
            assert built.recipe == example.recipe  # no recipe setting declared twice
            assert built.student.options == example.student.options
            assert (built.student.name, built.student.size) == ("mlp", "tiny")
            if built.teacher is not None and built.teacher.recipe is not None:
                assert built.teacher.recipe == example.teacher.recipe
    assert config("denoise").student.options == {"dropout": 0.1}


def test_teachers_are_the_protocol_cnn_as_each_recipe_needs_it() -> None:
    hinton = config("hinton").teacher
    assert hinton.model == lb.TEACHER and hinton.train.epochs == 20
    assert hinton.train.optimizer.weight_decay == 1e-4 and hinton.recipe is None
    assert config("ce").teacher is None and config("mean_teacher").teacher is None
    dml = config("dml").teacher  # online peers: the same architecture, untrained
    assert dml.model == lb.TEACHER and dml.train is None
    oracle = config("oracle").teacher.model  # the label-conditioned model wraps the CNN
    assert oracle.name == "oracle" and oracle.options["base_options"] == lb.TEACHER.options
    assert oracle.options["base"] == "cnn" and oracle.options["base_size"] is None
    daft = config("daft").teacher  # from examples/daft.yaml: the standard CNN, fine-tuned
    assert daft.recipe is None and daft.finetune is not None and daft.finetune.epochs == 3


def test_budgets_are_step_matched_only_for_labels_only_rows() -> None:
    matched = step_matched_epochs(20, TRAIN, lb.FEW_LABELS, 64)
    assert matched == 510
    assert config("ce", "few").trainer.epochs == 20 == config("ce", "all", 1).trainer.epochs
    steps = config("ce-steps", "few").trainer
    assert (steps.epochs, steps.eval_every) == (matched, matched // 20)
    assert config("hinton", "few").trainer.epochs == 20
    assert config("dml", "few").trainer.epochs == matched  # labelled samples only
    assert config("hinton", "few").data.labeled == lb.FEW_LABELS
    assert config("hinton", "few", 2).trainer.seed == 2 and config("hinton").trainer.seed == 0
    assert config("annealing", quick=True).trainer.epochs == 11  # its phase 1 is 10 epochs


def test_plan_shares_one_teacher_and_records_each_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # The plan needs only the training split's size (for step matching), not MNIST itself,
    # which needs a package CI does not install.
    monkeypatch.setattr(lb, "leaderboard_data",
                        lambda config: (SimpleNamespace(train=range(3250)), None))
    args = argparse.Namespace(quick=False, seeds=[0, 1], settings=["all", "few"])
    rows = lb.leaderboard_rows(["hinton", "dkd", "oracle", "dml"])
    runs, teachers, setups = lb.plan(rows, args)
    assert len(runs) == 2 * (2 + 1 + 2 * 4)  # seeds * (ce, ce-steps, 4 rows in 2 settings)
    shared, oracle = teachers  # the shared CNN first, then the oracle's own
    assert teachers[shared].record["name"] == "shared CNN"
    assert {run.teacher_key for run in runs if run.record["entry"] in ("hinton", "dkd")} == {
        shared}
    assert {run.teacher_key for run in runs if run.record["entry"] == "dml"} == {None}
    assert setups["oracle"]["teacher"] == "oracle" and setups["dml"]["epochs"] == {
        "all": 20, "few": 510}
    assert setups["dml"]["note"] == "step-matched in `few`" and setups["hinton"]["note"] == ""
    assert setups["hinton"]["params"] == {"temperature": 4.0, "alpha": 0.9}


def test_the_daft_teacher_is_the_shared_cnn_finetuned(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdistill.run import teacher_key

    monkeypatch.setattr(lb, "leaderboard_data",
                        lambda config: (SimpleNamespace(train=range(3250)), None))
    args = argparse.Namespace(quick=False, seeds=[0], settings=["all"])
    runs, teachers, setups = lb.plan(lb.leaderboard_rows(["daft"]), args)
    shared, daft = teachers.values()
    assert shared.finetune is None and daft.finetune is not None
    assert teacher_key(daft.teacher, lb.data_config("all"), daft.recipe) == shared.key
    assert daft.key != shared.key and daft.recipe == {"name": "ce"}
    assert daft.record["name"] == setups["daft"]["teacher"] == "cnn (ce, adversarially fine-tuned)"
    assert daft.record["finetune"]["epochs"] == 3
    assert {run.teacher_key for run in runs if run.record["entry"] == "daft"} == {daft.key}


def test_daft_shift_benchmark_compares_the_teachers(monkeypatch: pytest.MonkeyPatch) -> None:
    import daft_shifts

    monkeypatch.setattr(lb, "leaderboard_data",
                        lambda config: (SimpleNamespace(train=range(3250)), None))
    made = daft_shifts.configs(1)
    assert list(made) == ["ce", "hinton", "daft", "daft-scratch"]
    assert {c.trainer.seed for c in made.values()} == {1}
    scratch, daft = made["daft-scratch"].teacher, made["daft"].teacher
    assert scratch.recipe == daft_shifts.SCRATCH and scratch.finetune is None
    assert daft.recipe is None and daft.finetune is not None
    assert scratch.model_dump(exclude={"recipe", "finetune"}) == daft.model_dump(
        exclude={"recipe", "finetune"})
    assert made["daft-scratch"].recipe == made["daft"].recipe
    assert [daft_shifts.teacher_name(c) for c in made.values()] == [
        "none", "cnn", "cnn (ce, adversarially fine-tuned)", "cnn (adversarial)"]


def test_validation_split_is_stratified_held_out_and_labels_are_hidden() -> None:
    splits, validation = lb.leaderboard_data(DataConfig(name="digits", labeled=30),
                                             validation=100)
    full = build_data(DataConfig(name="digits"))
    assert len(splits.train) + len(validation) == len(full.train)
    assert torch.bincount(validation.labels).tolist() == [10] * 10
    train_rows = {tuple(x.flatten().tolist()) for x in splits.train.inputs}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in validation.inputs)
    known = splits.train.labels[splits.train.labels >= 0]
    assert torch.bincount(known, minlength=10).tolist() == [3] * 10
    assert len(splits.test) == len(full.test)


# -- the page: aggregation, verdicts, tables ----------------------------------------------------
def _run(entry: str, seed: int, accuracy: float | None, *, error: str | None = None,
         setting: str = "few") -> dict[str, Any]:
    run = {"setting": setting, "entry": entry, "recipe": entry.split("-")[0], "seed": seed,
           "teacher": "shared CNN", "status": "failed" if error else "ok", "seconds": 2.0}
    if error:
        run["error"] = error
    else:
        run.update(accuracy=accuracy, agreement=accuracy, ece=0.05)
    return run


ORDER = ["ce", "ce-steps", "dkd", "hinton"]


def test_summary_averages_successful_seeds_keeps_errors_and_follows_the_row_order() -> None:
    runs = [_run("hinton", 0, 0.80), _run("hinton", 1, 0.90),
            _run("hinton", 2, None, error="RuntimeError: boom"),
            _run("ce", 0, 0.70), _run("ce", 0, 0.99, setting="all")]
    rows = lbr.summarise(runs, "few", ORDER)
    assert [r["entry"] for r in rows] == ["ce", "hinton"]
    hinton = rows[1]
    assert (hinton["seeds"], hinton["ok"], hinton["errors"]) == (3, 2, ["RuntimeError: boom"])
    assert hinton["accuracy"] == pytest.approx(0.85)
    assert hinton["accuracy_std"] == pytest.approx(statistics.stdev([0.80, 0.90]))
    assert (hinton["recipe"], hinton["teacher"]) == ("hinton", "shared CNN")
    assert rows[0]["accuracy"] == pytest.approx(0.70) and rows[0]["accuracy_std"] is None


def test_verdict_says_no_unless_the_mean_exceeds_the_baseline() -> None:
    assert lbr.verdict(0.81, 0.80) == "yes"
    assert lbr.verdict(0.80, 0.80) == "no"
    assert lbr.verdict(0.79, 0.80) == "no"
    assert lbr.verdict(None, 0.80) == "n/a" and lbr.verdict(0.8, None) == "n/a"


def _table(runs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The rendered table as {row name: cells}, plus the header under 'header'."""
    lines = lbr.render_setting(lbr.summarise(runs, "few", ORDER)).splitlines()
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


def test_markdown_has_a_table_per_setting_the_teachers_the_setups_and_the_machine() -> None:
    runs = [_run("ce", 0, 0.70), _run("hinton", 0, 0.75), _run("ce", 0, 0.9, setting="all")]
    report = {
        "protocol": {"quick": False, "data": "mnist5k", "train": 3250, "validation": 500,
                     "test": 1250, "few_labels": 100, "student": {"name": "mlp", "size": "tiny"},
                     "student_params": 12730, "epochs": 20, "batch_size": 64, "lr": 0.01,
                     "seeds": [0]},
        "finished": "2026-01-01 00:00 UTC", "started": "", "command": "python leaderboard.py",
        "summary": {s: lbr.summarise(runs, s, ORDER) for s in ("all", "few")},
        "teachers": {"k": {"name": "shared CNN", "model": "cnn", "recipe": "ce",
                           "status": "ok", "cached": False, "seconds": 30.2, "params": 61050,
                           "accuracy": 0.9736, "ece": 0.0091}},
        "setups": {"hinton": {"recipe": "hinton", "teacher": "shared CNN", "note": "",
                              "params": {"temperature": 4.0}, "epochs": {"all": 20, "few": 20}},
                   "ce-steps": {"recipe": "ce", "teacher": "none", "params": {},
                                "epochs": {"few": 510}, "note": "step-matched in `few`"}},
        "runs": runs, "workers": 2, "total_seconds": 600,
        "machine": {"cpus": 2, "torch": "2", "python": "3", "load_start": [1.0, 2.0, 3.0],
                    "load_mean": 1.5},
    }
    text = lbr.render_markdown(report)
    assert "## All labels" in text and "## Few labels (100)" in text
    assert "The student sees 100 labels (10 per class) + 3,150 unlabelled images" in text
    assert "| shared CNN | cnn | ce | 61,050 | 97.36 | 0.91 | 30 |" in text
    assert '| `hinton` | `hinton` | shared CNN | `{"temperature": 4.0}` | 20 / 20 |  |' in text
    assert "| `ce-steps` | `ce` | none | `–` | – / 510 | step-matched in `few` |" in text
    assert "Reproduce: `python leaderboard.py`" in text
    assert "1.00, 2.00, 3.00" in text and "10.0 min for 3 runs" in text
    assert "quick smoke budget" not in text and "{" not in text.split("## Setups")[0]


def test_report_rewrites_its_json_after_each_job_and_renders_the_page_at_the_end(
        tmp_path: Path) -> None:
    protocol = {"quick": True, "data": "mnist5k", "train": 3250, "validation": 500,
                "test": 1250, "few_labels": 100, "student": {"name": "mlp", "size": "tiny"},
                "student_params": 12730, "epochs": 2, "batch_size": 64, "lr": 0.01,
                "seeds": [0]}
    setups = {"ce": {"recipe": "ce", "teacher": "none", "params": {}, "note": "",
                     "epochs": {"all": 2, "few": 2}}}
    saved = lbr.Report(tmp_path / "r.json", tmp_path / "r.md", 2, protocol, setups)
    saved.add(_run("ce", 0, 0.7))
    saved.save()
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["summary"]["few"][0]["accuracy"] == pytest.approx(0.7)
    assert written["finished"] is None and not (tmp_path / "r.md").exists()
    saved.add({"name": "shared CNN", "status": "failed", "error": "OSError: disk",
               "seconds": 1.0}, teacher="key")
    saved.save(final=True)
    assert json.loads((tmp_path / "r.json").read_text())["teachers"]["key"]["status"] == "failed"
    page = (tmp_path / "r.md").read_text()
    assert "quick smoke budget" in page and "| shared CNN | – | – | – | failed: OSError: disk |" \
        in page
    assert lbr.previous_seconds(tmp_path / "r.json") == {"ce": 2.0}
    assert lbr.previous_seconds(tmp_path / "missing.json") == {}
