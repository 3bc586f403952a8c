"""The run folder of ``kdistill run``: a new run refuses an earlier run's folder unless
``--overwrite``, writes nothing when it fails at start-up, and ``--resume`` refuses settings
that cannot change mid-run and records the ones it applies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

import kdistill.engine.state as engine_state
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.metrics_log import read_metrics


class Stopped(RuntimeError):
    """Stands for the process dying."""


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kdistill.models import build_model

    torch.manual_seed(5)
    teacher = build_model("cnn", (1, 8, 8), 10, size="tiny")
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(teacher.state_dict(), str(path))
    return path


def write_config(tmp_path: Path, teacher: Path, name: str = "tiny") -> Path:
    """Hinton KD of a tiny MLP from a teacher checkpoint: one epoch of 22 steps on digits,
    checkpoints every 8 steps."""
    raw: dict[str, Any] = {
        "name": name, "output_dir": str(tmp_path / "out"), "cpu_threads": 1,
        "data": {"name": "digits", "labeled": 50},
        "student": {"name": "mlp", "size": "tiny"},
        "teacher": {"model": {"name": "cnn", "size": "tiny"}, "checkpoint": str(teacher)},
        "recipe": {"name": "hinton"},
        "trainer": {"epochs": 1, "batch_size": 64, "progress": False, "checkpoint_every": 8,
                    "optimizer": {"lr": 0.01}},
        "evaluation": {"repeats": 2, "threads": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def stop_after_checkpoints(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Make the run die right after its ``count``-th checkpoint."""
    real, saved = engine_state.save_checkpoint, []

    def saving(*args: Any, **kwargs: Any) -> Path:
        path = real(*args, **kwargs)
        saved.append(path)
        if len(saved) == count:
            raise Stopped(path.name)
        return path

    monkeypatch.setattr(engine_state, "save_checkpoint", saving)


def test_a_new_run_refuses_an_earlier_runs_folder(tmp_path, teacher_file, capsys):
    config = write_config(tmp_path, teacher_file)
    run_dir = tmp_path / "out" / "tiny"
    assert main(["run", str(config)]) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints", "comparison.png", "config.json", "metrics.jsonl", "report.md",
        "run.json", "student.safetensors"]
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["run", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"kdistill: error: run folder {run_dir} already holds a run (checkpoints, "
        "comparison.png, config.json, metrics.jsonl, report.md, run.json, ...); continue it "
        "with --resume or replace it with --overwrite\n")
    assert snapshot(run_dir) == before
    with pytest.raises(SystemExit):
        main(["run", str(config), "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_overwrite_replaces_the_earlier_run_once_the_new_one_has_started(
        tmp_path, teacher_file, capsys):
    config = write_config(tmp_path, teacher_file)
    run_dir = tmp_path / "out" / "tiny"
    assert main(["run", str(config)]) == 0
    (run_dir / "notes.txt").write_text("the earlier run's")
    before = snapshot(run_dir)
    # A start-up failure (the teacher file does not fit a small CNN) changes nothing.
    assert main(["run", str(config), "--overwrite", "--set", "teacher.model.size=small"]) == 2
    assert "teacher.checkpoint" in capsys.readouterr().err
    assert snapshot(run_dir) == before
    assert main(["run", str(config), "--overwrite", "--set", "trainer.seed=3"]) == 0
    assert not (run_dir / "notes.txt").exists()
    assert json.loads((run_dir / "config.json").read_text())["trainer"]["seed"] == 3
    assert json.loads((run_dir / "run.json").read_text())["resumes"] == []
    assert [p.name for p in run_dir.parent.iterdir()] == ["tiny"]  # nothing left aside
    assert snapshot(run_dir)["student.safetensors"] != before["student.safetensors"]


@pytest.mark.parametrize(("changes", "problem"), [
    (["data.labeled=5000"], "data.labeled: 5000 labels asked"),  # bad data
    (["teacher.model.size=small"], "teacher.checkpoint"),  # the teacher cannot be loaded
    (["recipe.name=fitnets", "recipe.adapter=none", "recipe.teacher_tap=logits",
      "trainer.epochs=2"],  # the engine builds the adapter on a first batch
     "fitnets: adapter 'none' needs equal shapes"),
])
def test_a_run_that_fails_at_start_up_writes_nothing(tmp_path, teacher_file, capsys, changes,
                                                     problem):
    config = write_config(tmp_path, teacher_file)
    try:
        assert main(["run", str(config), *(a for c in changes for a in ("--set", c))]) == 2
        message = capsys.readouterr().err
    except ValueError as error:  # not a KdistillError: the command shows a traceback
        message = str(error)
    assert problem in message
    assert not (tmp_path / "out").exists()


def test_resume_refuses_settings_that_cannot_change_and_writes_nothing(
        tmp_path, teacher_file, capsys):
    config = write_config(tmp_path, teacher_file)
    run_dir = tmp_path / "out" / "tiny"
    assert main(["run", str(config)]) == 0
    before = snapshot(run_dir)
    capsys.readouterr()
    changes = ["trainer.optimizer.lr=0.5", "student.size=small", "data.labeled=60",
               "recipe.temperature=2", "trainer.log_every=2"]
    assert main(["run", str(config), "--resume", *(a for c in changes for a in ("--set", c))]) \
        == 2
    assert capsys.readouterr().err == (
        f"kdistill: error: cannot resume {run_dir}: settings differ from the run's config.json "
        "and cannot change mid-run (data.labeled: 50 → 60; recipe.temperature: (none) → 2; "
        "student.size: \"tiny\" → \"small\"; trainer.optimizer.lr: 0.01 → 0.5); restore them, "
        "or start a new run with another name or --overwrite\n")
    # A changed teacher file is refused too, even under the same name.
    torch.manual_seed(6)
    from kdistill.models import build_model

    other = tmp_path / "other-teacher.safetensors"
    save_file(build_model("cnn", (1, 8, 8), 10, size="tiny").state_dict(), str(other))
    original = teacher_file.read_bytes()
    try:
        teacher_file.write_bytes(other.read_bytes())
        assert main(["run", str(config), "--resume"]) == 2
        assert "(teacher.checkpoint (file content): \"sha256:" in capsys.readouterr().err
    finally:
        teacher_file.write_bytes(original)
    assert snapshot(run_dir) == before


def test_resume_applies_and_records_the_settings_it_may_change(tmp_path, teacher_file, capsys,
                                                               monkeypatch):
    config = write_config(tmp_path, teacher_file)
    run_dir = tmp_path / "out" / "tiny"
    with monkeypatch.context() as patch:
        stop_after_checkpoints(patch, 2)
        with pytest.raises(Stopped, match="step-00000016"):
            main(["run", str(config)])
    capsys.readouterr()
    assert main(["run", str(config), "--resume", "--set", "trainer.log_every=3",
                 "--set", "evaluation.repeats=1"]) == 0
    assert (f"kdistill: resuming {run_dir} at step 16 with changed settings: "
            "evaluation.repeats: 2 → 1; trainer.log_every: 1 → 3 (recorded in run.json; "
            "config.json holds the new values)\n") in capsys.readouterr().err
    assert json.loads((run_dir / "run.json").read_text())["resumes"] == [
        {"step": 16, "changed": {"evaluation.repeats": [2, 1], "trainer.log_every": [1, 3]}}]
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["trainer"]["log_every"], saved["evaluation"]["repeats"]) == (3, 1)
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [*range(1, 17), 18, 21]
    # A second resume starts from the end and records itself, with nothing changed.
    assert main(["run", str(config), "--resume", "--set", "trainer.log_every=3",
                 "--set", "evaluation.repeats=1"]) == 0
    assert json.loads((run_dir / "run.json").read_text())["resumes"][1] == \
        {"step": 22, "changed": {}}


def test_resume_without_a_run(tmp_path, teacher_file, capsys):
    config = write_config(tmp_path, teacher_file)
    run_dir = tmp_path / "out" / "tiny"
    assert main(["run", str(config), "--resume"]) == 2
    assert capsys.readouterr().err == \
        f"kdistill: error: nothing to resume: run folder {run_dir} does not exist\n"
    # A run that died before its first checkpoint.
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(load_config(config).model_dump_json())
    assert main(["run", str(config), "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"kdistill: error: nothing to resume: no checkpoint in {run_dir / 'checkpoints'} (the "
        "run stopped before its first); start it again with --overwrite\n")
    assert [p.name for p in run_dir.iterdir()] == ["config.json"]
