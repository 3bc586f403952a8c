"""The ``kdistill`` command: help, recipe listing, config checks with clean errors, a real run,
and errors that only show once models are built (teacher checkpoints, module taps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from kdistill.cli import main
from kdistill.config import ConfigError, parse_config

CLI = Path(sys.executable).with_name("kdistill")


def command(*args: str) -> list[str]:
    """The installed ``kdistill`` script, or ``python -m kdistill.cli`` without it."""
    return [str(CLI), *args] if CLI.is_file() else [sys.executable, "-m", "kdistill.cli", *args]


def run_cli(*args: str, cwd: Path | None = None, cache: Path | None = None,
            timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cache is not None:
        env["KDISTILL_CACHE"] = str(cache)
    return subprocess.run(command(*args), capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout, check=False)


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tiny_config(output: Path, teacher_checkpoint: Path | None = None,
                **changes: Any) -> dict[str, Any]:
    """Hinton KD of a tiny MLP from a teacher checkpoint, one epoch on digits."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(output),
        "data": {"name": "digits", "labeled": 50},
        "student": {"name": "mlp", "size": "tiny"},
        "recipe": {"name": "hinton"},
        "trainer": {"epochs": 1, "batch_size": 64, "progress": False,
                    "optimizer": {"lr": 0.01}},
        "evaluation": {"repeats": 2, "threads": 1},
    }
    if teacher_checkpoint is not None:
        raw["teacher"] = {"model": {"name": "cnn", "size": "tiny"},
                          "checkpoint": str(teacher_checkpoint)}
    raw.update(changes)
    return raw


def save_model(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# -- fast commands ----------------------------------------------------------------------------
def test_help_exits_zero_and_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in ("demo", "run", "check", "recipes"):
        assert name in result.stdout
    assert result.stderr == ""


def test_cli_import_and_help_do_not_import_heavy_packages() -> None:
    code = (
        "import sys\n"
        "import kdistill.cli as cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'transformers', 'accelerate', 'matplotlib', 'sklearn')\n"
        "print('LOADED', sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "LOADED []"


def test_recipes_lists_every_registered_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    from kdistill.recipes import RECIPES

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for entry in RECIPES.values():
        row = [line for line in lines if line.startswith(f"│ {entry.name} ")]
        assert len(row) == 1, f"no single row for {entry.name}"
        assert entry.summary in row[0]
        assert entry.paper in row[0]


def test_check_on_a_bad_config_exits_2_with_the_field_path(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path / "out", recipe={"name": "hinton"})
    raw["trainer"]["epochz"] = 3
    raw["teacher"] = {"model": {"name": "cnn", "size": "tiny"}, "train": {"epochs": 1}}
    path = write_config(tmp_path / "bad.yaml", raw)
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (f"kdistill: error: {path}: trainer.epochz: unknown key 'epochz'; "
                             "did you mean 'epochs'?\n")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_check_on_a_good_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_config(tmp_path / "out", recipe={"name": "ce"})
    path = write_config(tmp_path / "good.yaml", raw)
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: valid\n"
    assert main(["check", str(path), "--set", "recipe.name=hintn"]) == 2
    err = capsys.readouterr().err
    assert "recipe.name: unknown recipe 'hintn'; did you mean 'hinton'" in err
    assert main(["check", str(path), "--set", "trainer"]) == 2
    assert capsys.readouterr().err == ("kdistill: error: --set trainer: expected KEY=VALUE, e.g. "
                                       "trainer.epochs=3\n")
    assert not (tmp_path / "out").exists()


def test_check_on_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err == (f"kdistill: error: config file not found: "
                                       f"{tmp_path / 'none.yaml'}\n")


# -- a real run -------------------------------------------------------------------------------
def test_run_writes_report_and_student(tmp_path: Path) -> None:
    from kdistill.data import load_dataset
    from kdistill.models import build_model

    torch.manual_seed(5)
    teacher = build_model("cnn", (1, 8, 8), 10, size="tiny")
    checkpoint = save_model(teacher, tmp_path / "teacher.safetensors")
    path = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "out", checkpoint))
    result = run_cli("run", str(path), "--set", "trainer.seed=1", cwd=tmp_path,
                     cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "out" / "tiny"
    assert f"report: {run_dir / 'report.md'}" in result.stdout
    report = (run_dir / "report.md").read_text()

    # The student's weights fit the configured student exactly.
    student = build_model("mlp", (1, 8, 8), 10, size="tiny")
    state = load_file(str(run_dir / "student.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == \
        {k: tuple(v.shape) for k, v in student.state_dict().items()}
    student.load_state_dict(state)

    # The report's accuracies match the ones measured here, independently, on the test split.
    test = load_dataset("digits").test
    teacher.eval()
    with torch.no_grad():
        teacher_accuracy = (teacher(test.inputs).argmax(1) == test.labels).double().mean()
        student_accuracy = (student(test.inputs).argmax(1) == test.labels).double().mean()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines()
            if line.startswith("| teacher") or line.startswith("| student")}
    assert f"{100 * float(teacher_accuracy):.2f}%" in rows["teacher"]
    assert f"{100 * float(student_accuracy):.2f}%" in rows["student"]

    # One evaluation per epoch was logged, with the seed override applied.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1
    assert evals[0]["eval_accuracy"] == pytest.approx(float(student_accuracy))
    assert json.loads((run_dir / "config.json").read_text())["trainer"]["seed"] == 1
    assert not (tmp_path / "cache").exists()  # a checkpoint teacher is never cached


# -- errors found once models exist -----------------------------------------------------------
@pytest.mark.parametrize(("model", "size", "problem"), [
    ("cnn", "small", "has tensors of other shapes"),  # same names, wider layers
    ("mlp", "tiny", "does not fit the model: missing"),  # other layer names
])
def test_teacher_checkpoint_of_the_wrong_shape(tmp_path: Path, model: str, size: str,
                                               problem: str) -> None:
    from kdistill.models import build_model
    from kdistill.run import run

    checkpoint = save_model(build_model(model, (1, 8, 8), 10, size=size),
                            tmp_path / "other.safetensors")
    config = parse_config(tiny_config(tmp_path / "out", checkpoint))
    with pytest.raises(ConfigError) as caught:
        run(config)
    message = str(caught.value)
    assert message.startswith(f"teacher.checkpoint: {checkpoint}")
    assert problem in message


def test_teacher_checkpoint_that_is_not_safetensors(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "teacher.safetensors"
    checkpoint.write_bytes(b"\x00garbage")
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "out", checkpoint))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kdistill: error: teacher.checkpoint: cannot read {checkpoint}")


def test_missing_module_tap_fails_before_the_teacher_is_trained(tmp_path: Path) -> None:
    from kdistill.run import run

    cache = Path(os.environ["KDISTILL_CACHE"])
    before = sorted(cache.rglob("*")) if cache.exists() else []
    raw = tiny_config(tmp_path / "out", recipe={"name": "fitnets",
                                                "student_tap": "module:featurez"})
    raw["trainer"]["epochs"] = 2
    raw["teacher"] = {"model": {"name": "cnn", "size": "tiny"}, "train": {"epochs": 1}}
    with pytest.raises(ConfigError) as caught:
        run(parse_config(raw))
    assert str(caught.value).startswith(
        "recipe: phase '0-fitnets': tap 'module:featurez': unknown MLP module 'featurez'; "
        "did you mean 'features'")
    assert not (tmp_path / "out").exists()
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before


@pytest.mark.parametrize(("data", "recipe", "message"), [
    ("diabetes", "hinton", "recipe: 'hinton' is a classification recipe but data set 'diabetes' "
                           "is a regression task; recipes for it: ['mse', 'regression_kd']"),
    ("digits", "mse", "recipe: 'mse' is a regression recipe but data set 'digits' is a "
                      "classification task; recipes for it: ['adversarial', "),
])
def test_recipe_of_another_task_fails_before_training(tmp_path: Path, data: str, recipe: str,
                                                      message: str) -> None:
    from kdistill.run import run

    raw = tiny_config(tmp_path / "out", recipe={"name": recipe}, data={"name": data})
    raw["teacher"] = {"model": {"name": "mlp", "size": "tiny"}, "train": {"epochs": 1}}
    with pytest.raises(ConfigError) as caught:
        run(parse_config(raw))
    assert str(caught.value).startswith(message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("data", "student", "message"), [
    ("diabetes", "mlp", "evaluation.shifts: shifts apply to image classification data, not to "
                        "'diabetes' (regression)"),
    ("csv", "mlp", "evaluation.shifts: data set 'digits-rows': shift 'blur' needs inputs shaped "
                   "[N, C, H, W], got (2, 3)"),
])
def test_shifts_the_test_data_cannot_take_fail_before_training(tmp_path: Path, data: str,
                                                               student: str,
                                                               message: str) -> None:
    from kdistill.run import run

    data_config: dict[str, Any] = {"name": data}
    if data == "csv":
        rows = tmp_path / "digits-rows.csv"
        rows.write_text("a,b,c,label\n" + "".join(f"{i},{i % 5},{i % 7},{i % 2}\n"
                                                    for i in range(40)))
        data_config["path"] = str(rows)
    raw = tiny_config(tmp_path / "out", recipe={"name": "mse" if data == "diabetes" else "ce"},
                      data=data_config, student={"name": student, "size": "tiny"})
    raw["evaluation"]["shifts"] = ["noise", "blur"]
    with pytest.raises(ConfigError) as caught:
        run(parse_config(raw))
    assert str(caught.value).startswith(message)
    assert not (tmp_path / "out").exists()


def test_bad_data_file_is_a_clean_cli_error(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "rows.csv"
    data.write_text("a,b,label\n" + "".join(f"{i},{i % 5},{i % 3 + 1}\n" for i in range(30)))
    raw = tiny_config(tmp_path / "out", recipe={"name": "ce"},
                      data={"name": "csv", "path": str(data)})
    path = write_config(tmp_path / "c.yaml", raw)
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"kdistill: error: data.path: data set '{data}': labels must be the integers 0..C-1 "
        "with every class present, got [1, 2, 3]\n")
    assert not (tmp_path / "out").exists()
