"""Inputs that used to run silently into nonsense or end in a traceback (issue "Reliability and
safety", item 6, and the data half of item 2). Each now ends before any work in one line that
names the field, file, row or column at fault; ``kdistill check`` finds every one of them.

One test per case, through ``kdistill check`` in-process (``main``) unless the case is about
another command; the exact message is asserted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kdistill.cli import main
from kdistill.config import ConfigError, parse_config
from kdistill.data import load_dataset


def write_config(path: Path, **changes: Any) -> Path:
    """A valid config (labels-only ``ce`` on digits, one epoch) with top-level ``changes``."""
    raw: dict[str, Any] = {
        "name": "bad",
        "output_dir": str(path.parent / "out"),
        "data": {"name": "digits"},
        "student": {"name": "mlp", "size": "tiny"},
        "recipe": {"name": "ce"},
        "trainer": {"epochs": 1, "progress": False},
    }
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def check(capsys: pytest.CaptureFixture[str], config: Path, *overrides: str) -> str:
    """Run ``kdistill check`` in-process; assert it fails with one line on stderr and nothing
    on stdout, and return that line without the ``kdistill: error:`` prefix."""
    args = ["check", str(config)]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("kdistill: error: ")
    return err.removeprefix("kdistill: error: ").rstrip("\n")


def csv_file(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(row + "\n" for row in rows))
    return path


def two_class_rows(count: int = 40) -> list[str]:
    return [f"{i / 10},{i % 7},{i % 2}" for i in range(count)]


# -- one class in the labels ------------------------------------------------------------------
def test_one_class_in_a_csv_is_refused_not_trained_as_a_regressor(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = csv_file(tmp_path / "one.csv", "a,b,label", [f"{i / 10},{i % 7},0" for i in range(40)])
    config = write_config(tmp_path / "c.yaml", data={"name": "csv", "path": str(data)})
    assert check(capsys, config) == (
        f"data.path: {data}: column 'label': all 40 labels are class 0; classification needs at "
        "least 2 classes (one would train a 1-output model whose score is not an accuracy)")


def test_one_class_in_an_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.npz"
    np.savez(path, x=np.ones((20, 3)), y=np.full(20, 4))
    with pytest.raises(ValueError) as caught:
        load_dataset("npz", path=path)
    assert str(caught.value) == (
        f"data set '{path}': all 20 labels are class 4; classification needs at least 2 classes "
        "(one would train a 1-output model whose score is not an accuracy)")


@pytest.mark.parametrize(("label", "problem"), [
    ("1e30", "column 'label' must be integers 0..C-1, got [1e+30]"),  # not cast to int64
    ("2.5", "column 'label' must be integers 0..C-1, got [2.5]"),
    ("-1", "labels must be the integers 0..C-1 with every class present, got [-1, 0, 1]"),
])
def test_csv_labels_that_are_not_classes(tmp_path: Path, label: str, problem: str) -> None:
    rows = two_class_rows()
    rows[3] = f"0.3,3,{label}"
    data = csv_file(tmp_path / "labels.csv", "a,b,label", rows)
    with pytest.raises(ValueError) as caught:
        load_dataset("csv", path=data)
    assert str(caught.value) == f"data set '{data}': {problem}"


# -- duplicate column names -------------------------------------------------------------------
def test_duplicate_csv_column_names_are_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = csv_file(tmp_path / "dup.csv", "a,a,label", two_class_rows())
    config = write_config(tmp_path / "c.yaml", data={"name": "csv", "path": str(data)})
    assert check(capsys, config) == (
        f"{config}: data.path: {data}, line 1: column 'a' appears twice (columns 1 and 2); "
        "column names must be unique")
    with pytest.raises(ValueError, match=r"dup.csv, line 1: column 'a' appears twice"):
        load_dataset("csv", path=data)


# -- strict types and ranges in the config ----------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("trainer.epochs=true", "trainer.epochs: Input should be a valid integer (got True)"),
    ("trainer.epochs=2.0", "trainer.epochs: Input should be a valid integer (got 2.0)"),
    ("trainer.progress=1", "trainer.progress: Input should be a valid boolean (got 1)"),
    ("trainer.optimizer.lr=.nan", "trainer.optimizer.lr: Input should be a finite number "
                                  "(got nan)"),
    ("trainer.optimizer.betas=[0.9, true]", "trainer.optimizer.betas.1: Input should be a "
                                            "valid number (got True)"),
])
def test_a_boolean_or_float_is_not_an_epoch_count(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  override: str, message: str) -> None:
    config = write_config(tmp_path / "c.yaml")
    assert check(capsys, config, override) == f"{config}: {message}"


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.seed=100000000000000000000", "trainer.seed: Input should be less than or equal "
                                           "to 4294967295 (got 100000000000000000000)"),
    ("trainer.seed=-1", "trainer.seed: Input should be greater than or equal to 0 (got -1)"),
    ("data.seed=4294967296", "data.seed: Input should be less than or equal to 4294967295 "
                             "(got 4294967296)"),
])
def test_a_seed_numpy_and_torch_cannot_take_is_refused(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       override: str, message: str) -> None:
    config = write_config(tmp_path / "c.yaml")
    assert check(capsys, config, override) == f"{config}: {message}"


@pytest.mark.parametrize("field", ["cpu_threads", "evaluation.threads"])
def test_a_thread_count_beyond_the_limit_is_refused(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    field: str) -> None:
    config = write_config(tmp_path / "c.yaml")
    assert check(capsys, config, f"{field}=100000") == (
        f"{config}: {field}: Input should be less than or equal to 1024 (got 100000)")


# -- data.options -----------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "message"), [
    ({"name": "digits", "options": {"bogus": 1}},
     "data.options.bogus: data set 'digits' takes no options"),
    ({"name": "tagging", "options": {"sampels": 100}},
     "data.options.sampels: unknown tagging option 'sampels'; did you mean 'samples'?"),
    ({"name": "tagging", "options": {"samples": True}},
     "data.options.samples: Input should be a valid integer (got True)"),
    ({"name": "tagging", "options": {"seed": 3}},
     "data.options.seed: give it as data.seed, not as an option"),
    ({"name": "fashion-mnist", "test_fraction": 0.3},
     "data.test_fraction: data set 'fashion-mnist' has its own test split; remove "
     "test_fraction"),
    ({"name": "digits", "label_column": "y"},
     "data.label_column: only the data sets csv, text, hf_dataset have named columns, not "
     "'digits'; remove label_column"),
])
def test_data_options_are_checked_against_the_loader(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     data: dict[str, Any], message: str) -> None:
    config = write_config(tmp_path / "c.yaml", data=data)
    assert check(capsys, config) == f"{config}: {message}"


# -- check loads the data ---------------------------------------------------------------------
def test_check_refuses_a_csv_with_a_text_column(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = csv_file(tmp_path / "text.csv", "a,b,label",
                    [f"{i / 10},x{i},{i % 2}" for i in range(40)])
    config = write_config(tmp_path / "c.yaml", data={"name": "csv", "path": str(data)})
    assert check(capsys, config) == (f"data.path: {data}, line 2, column 'b': 'x0' is not a "
                                     "number (every column must be numeric)")


@pytest.mark.parametrize(("cell", "problem"), [
    ("nan", "'nan': nan is not a finite number (NaN and infinities cannot be trained on)"),
    ("-inf", "'-inf': -inf is not a finite number (NaN and infinities cannot be trained on)"),
    ("1e400", "'1e400': inf is not a finite number (NaN and infinities cannot be trained on)"),
    ("1e39", "'1e39': 1e+39 is beyond the float32 range of the inputs (±3.403e+38)"),
])
def test_nan_inf_and_huge_csv_cells_name_file_line_and_column(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cell: str, problem: str) -> None:
    rows = two_class_rows()
    rows[6] = f"0.6,{cell},0"
    data = csv_file(tmp_path / "values.csv", "a,b,label", rows)
    config = write_config(tmp_path / "c.yaml", data={"name": "csv", "path": str(data)})
    assert check(capsys, config) == f"data.path: {data}, line 8, column 'b': {problem}"


@pytest.mark.parametrize(("x", "y", "problem"), [
    (np.where(np.arange(60).reshape(20, 3) == 7, np.nan, 0.5), np.arange(20) % 2,
     "array 'x', row 2, column 1: nan is not a finite number (NaN and infinities cannot be "
     "trained on)"),
    (np.where(np.arange(80).reshape(20, 1, 2, 2) == 13, np.inf, 0.5), np.arange(20) % 2,
     "array 'x', row 3, position (0, 0, 1): inf is not a finite number (NaN and infinities "
     "cannot be trained on)"),
    (np.where(np.arange(60).reshape(20, 3) == 4, 1e300, 0.5), np.arange(20) % 2,
     "array 'x', row 1, column 1: 1e+300 is beyond the float32 range of the inputs "
     "(±3.403e+38)"),
    (np.ones((20, 3)), np.where(np.arange(20) == 5, np.nan, np.arange(20) % 2),
     "array 'y', row 5: nan is not a class label (labels must be integers 0..C-1)"),
])
def test_nan_inf_and_huge_npz_values_name_file_array_row_and_column(
        tmp_path: Path, x: np.ndarray, y: np.ndarray, problem: str) -> None:
    path = tmp_path / "values.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(ValueError) as caught:
        load_dataset("npz", path=path)
    assert str(caught.value) == f"{path}: {problem}"


# -- the run folder ---------------------------------------------------------------------------
def test_an_output_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdistill.run import run

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path / "c.yaml", output_dir=str(blocker))
    assert check(capsys, config) == f"{config}: output_dir: {blocker} is a file, not a folder"
    config = write_config(tmp_path / "c.yaml", output_dir=str(blocker / "runs"))
    assert check(capsys, config) == (
        f"{config}: output_dir: {blocker} is a file, so {blocker / 'runs'} cannot be a folder")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "bad").write_text("where the run folder would go")
    config = write_config(tmp_path / "c.yaml")
    assert check(capsys, config) == (f"{config}: name: {tmp_path / 'out' / 'bad'} is a file, "
                                     "not a folder (a run writes into <output_dir>/<name>)")
    # A RunConfig made in Python (never through load_config) is checked by run() too.
    valid = parse_config(yaml.safe_load(write_config(tmp_path / "c.yaml",
                                                     output_dir=str(tmp_path)).read_text()))
    with pytest.raises(ConfigError) as caught:
        run(valid.model_copy(update={"output_dir": str(blocker)}))
    assert str(caught.value) == f"output_dir: {blocker} is a file, not a folder"


# -- the demo's arguments ---------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["--labeled", "-5"], "argument --labeled: must be at least 1, got -5"),
    (["--labeled", "five"], "argument --labeled: expected a whole number, got 'five'"),
    (["--seed", "-1"], "argument --seed: must be between 0 and 4294967295, got -1"),
    (["--threads", "0"], "argument --threads: must be between 1 and 1024, got 0"),
    (["--name", "../up"], "argument --name: '../up' is not a folder name: use letters, "
                          "digits, '.', '_' and '-', starting with a letter or digit"),
])
def test_demo_arguments_are_checked_by_the_parser(capsys: pytest.CaptureFixture[str],
                                                  args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["demo", *args])
    assert caught.value.code == 2
    assert capsys.readouterr().err == (f"kdistill demo: error: {message} (see 'kdistill demo "
                                       "--help')\n")


def test_demo_output_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["demo", "--output", str(blocker)]) == 2
    assert capsys.readouterr().err == (f"kdistill: error: --output: {blocker} is a file, not a "
                                       "folder\n")


def test_demo_with_more_labels_than_samples(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--labeled", "5000", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("kdistill: error: --labeled: 5000 labels asked, the "
                                       "training split has 1347 samples\n")
    assert list(tmp_path.iterdir()) == []


# -- what only models show, found by check without training ----------------------------------
def composite_config(path: Path, **term: Any) -> Path:
    """Composite KD of a tiny MLP from a tiny CNN teacher the run would train."""
    return write_config(
        path, data={"name": "digits", "labeled": 50},
        teacher={"model": {"name": "cnn", "size": "tiny"},
                 "train": {"epochs": 1, "progress": False}},
        recipe={"name": "composite", "terms": [{"loss": "hidden_mse", **term}]})


@pytest.mark.parametrize(("term", "message"), [
    ({"student": "hidden.3", "teacher": "logits"},
     "recipe: a trial step on 16 training samples failed: tap 'hidden.3': the model output "
     "has no hidden_states"),
    ({"student": "module:features", "teacher": "module:featurez"},
     "recipe: phase '0-composite': tap 'module:featurez': unknown CNN module 'featurez'; did "
     "you mean 'features', 'features.2' or 'features.1'?"),
    ({"student": "logits", "teacher": "module:features", "adapter": "none"},
     "recipe: a trial step on 16 training samples failed: term 'hidden_mse': adapter 'none' "
     "needs equal shapes, student (8, 10) vs teacher (8, 16); use adapter 'linear' or "
     "'conv1x1'"),
])
def test_check_finds_teacher_and_student_taps_without_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], term: dict[str, str],
        message: str) -> None:
    cache = tmp_path / "cache"
    config = composite_config(tmp_path / "c.yaml", **term)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDISTILL_CACHE", str(cache))
        assert check(capsys, config) == message
    assert not cache.exists()  # no teacher was trained
    assert not (tmp_path / "out").exists()


def test_check_passes_a_config_that_runs(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = composite_config(tmp_path / "c.yaml", student="module:features",
                              teacher="module:features", adapter="linear")
    assert main(["check", str(config)]) == 0
    assert capsys.readouterr() == (f"{config}: valid\n", "")
    assert not (tmp_path / "out").exists()


def test_fp16_without_a_gpu_is_refused_before_any_work(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.yaml")
    assert check(capsys, config, "trainer.mixed_precision=fp16", "trainer.cpu=true") == (
        "trainer.mixed_precision: 'fp16' needs a GPU (on CPU it would silently train in fp32); "
        "use 'bf16' on CPU")
    assert main(["run", str(config), "--set", "trainer.mixed_precision=fp16", "--set",
                 "trainer.cpu=true"]) == 2
    assert "trainer.mixed_precision: 'fp16' needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- messages stay on one line ----------------------------------------------------------------
def test_a_control_character_in_the_yaml_is_one_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("name: bell\x07\n")
    assert check(capsys, config) == (f"{config}: not valid YAML: unacceptable character #x0007 "
                                     "at position 10 (YAML allows no control characters)")


def test_a_line_break_in_an_override_or_key_stays_escaped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.yaml")
    assert check(capsys, config, "trainer\nepochs") == (
        "--set trainer\\nepochs: expected KEY=VALUE, e.g. trainer.epochs=3")
    config.write_text(config.read_text() + '"bad\\nkey": 1\n')
    assert check(capsys, config) == (
        f"{config}: bad\\nkey: unknown key 'bad\\nkey'; valid names: cpu_threads, data, "
        "evaluation, name, output_dir, phases, recipe, student, teacher, trainer")


def test_check_does_not_build_models_that_run_their_folders_code() -> None:
    """A model with trust_remote_code: true runs its folder's code when built: check (which
    must run no code, tests/test_hostile_files.py) leaves it, and so the trial, out."""
    from kdistill.config import RunConfig
    from kdistill.run import code_running_models

    def config(student: dict[str, Any], teacher: dict[str, Any]) -> RunConfig:
        return RunConfig.model_validate({"student": student, "teacher": {"model": teacher},
                                         "recipe": {"name": "hinton"}})

    remote = {"name": "hf", "options": {"path": "m", "trust_remote_code": True}}
    local = {"name": "hf", "options": {"path": "m"}}
    oracle = {"name": "oracle", "options": {"base": "hf", "base_options": remote["options"]}}
    mlp = {"name": "mlp", "size": "tiny"}
    assert code_running_models(config(remote, mlp)) == ["student"]
    assert code_running_models(config(mlp, oracle)) == ["teacher.model"]
    assert code_running_models(config(local, mlp)) == []
    assert code_running_models(config(mlp, {"name": "oracle", "options": {"base": "mlp"}})) == []
