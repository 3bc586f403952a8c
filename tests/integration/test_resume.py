"""Exact resume: a run stopped after a checkpoint and resumed on fresh objects ends with the
same weights, history and metrics log as a run that never stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdistill import Distiller
from kdistill.checkpoint import RunFolderError, latest_checkpoint, load_checkpoint
from kdistill.metrics_log import read_metrics
from kdistill.recipes import build_recipe


class Killed(RuntimeError):
    """Stands for the process dying."""


def kill_after(phase: int, epoch: int) -> Callable[[dict[str, Any]], None]:
    """A callback that dies after the end-of-epoch record of ``epoch`` (1-based) in ``phase``.

    Callbacks run after the epoch's checkpoint is written, like a kill right after it."""

    def callback(record: dict[str, Any]) -> None:
        if record["phase"] == phase and record["epoch"] == epoch:
            raise Killed(f"phase {phase} epoch {epoch}")

    return callback


def kill_on_forward(model: nn.Module, count: int) -> None:
    """Make the ``count``-th training forward of ``model`` die (a kill in the middle of a step)."""
    seen = [0]

    def hook(_module: nn.Module, _inputs: object) -> None:
        if torch.is_grad_enabled():
            seen[0] += 1
            if seen[0] == count:
                raise Killed(f"forward {count}")

    model.register_forward_pre_hook(hook)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert different == [], f"tensors differ after resume: {different}"


def assert_log_matches(resumed: Path, uninterrupted: Path) -> None:
    """The resumed run's metrics.jsonl has no duplicated step and equals the other run's."""
    records = read_metrics(resumed / "metrics.jsonl")
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps == list(range(1, len(steps) + 1))
    evals = [(r["phase"], r["epoch"]) for r in records if r["kind"] == "eval"]
    assert len(evals) == len(set(evals))
    assert records == read_metrics(uninterrupted / "metrics.jsonl")


@pytest.fixture
def data(digits_subset):
    return digits_subset(96, labeled=30)


@pytest.fixture
def eval_data(digits):
    from kdistill.data.base import ArrayDataset

    return ArrayDataset(digits.test.inputs[:64], digits.test.labels[:64])


def hinton_run(student: nn.Module, teacher: nn.Module, run_dir: Path,
               **overrides: Any) -> Distiller:
    settings = {"epochs": 3, "batch_size": 16, "scheduler": {"name": "cosine",
                                                             "warmup_steps": 2},
                "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
                "progress": False, **overrides}
    return Distiller(student, teacher, build_recipe("hinton"), run_dir=run_dir, **settings)


def test_resume_after_an_epoch_is_exact(tmp_path, data, eval_data, make_mlp):
    teacher = make_mlp(seed=1, hidden=(32,))
    full = make_mlp(seed=0, hidden=(32,), dropout=0.3)  # dropout: the RNG state matters
    expected = hinton_run(full, teacher, tmp_path / "full").fit(data, eval_data)

    stopped = make_mlp(seed=0, hidden=(32,), dropout=0.3)
    with pytest.raises(Killed):
        hinton_run(stopped, teacher, tmp_path / "run").fit(data, eval_data,
                                                          callbacks=[kill_after(0, 1)])
    assert load_checkpoint(latest_checkpoint(tmp_path / "run")).trainer["epoch"] == 1
    torch.manual_seed(12345)  # whatever the global RNG holds now must not matter

    fresh = make_mlp(seed=7, hidden=(32,), dropout=0.3)  # other weights: all come from disk
    resumed = hinton_run(fresh, teacher, tmp_path / "run").fit(data, eval_data, resume=True)
    assert_same_state(fresh, full)
    assert resumed.history == expected.history
    assert [r["epoch"] for r in resumed.evaluations()] == [1, 2, 3]
    assert_log_matches(tmp_path / "run", tmp_path / "full")
    saved = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in full.state_dict().items())


def test_resume_would_differ_without_the_saved_random_state(tmp_path, data, make_mlp,
                                                            monkeypatch):
    # The control for the test above: with RNG restoring disabled, dropout masks differ.
    import kdistill.engine.state as engine_state

    teacher = make_mlp(seed=1, hidden=(32,))
    full = make_mlp(seed=0, hidden=(32,), dropout=0.3)
    hinton_run(full, teacher, tmp_path / "full", epochs=2).fit(data)
    with pytest.raises(Killed):
        hinton_run(make_mlp(seed=0, hidden=(32,), dropout=0.3), teacher, tmp_path / "run",
                   epochs=2).fit(data, callbacks=[kill_after(0, 1)])
    monkeypatch.setattr(engine_state, "restore_rng", lambda *args: None)
    fresh = make_mlp(seed=0, hidden=(32,), dropout=0.3)
    hinton_run(fresh, teacher, tmp_path / "run", epochs=2).fit(data, resume=True)
    assert any(not torch.equal(a, b) for a, b in
               zip(fresh.state_dict().values(), full.state_dict().values(), strict=True))


@pytest.mark.parametrize(("phase", "epoch"), [(0, 1), (0, 2), (1, 1)])
def test_multi_phase_resume_is_exact(tmp_path, data, make_mlp, phase, epoch):
    # fitnets with 4 epochs: 2 hint epochs (phase 0, with a linear adapter), then 2 KD epochs.
    teacher = make_mlp(seed=1, hidden=(32,))

    def run(student: nn.Module, run_dir: Path) -> Distiller:
        recipe = build_recipe("fitnets", hint_epochs=2)
        return Distiller(student, teacher, recipe, epochs=4, batch_size=32, run_dir=run_dir,
                         progress=False, scheduler={"name": "linear"})

    full = make_mlp(seed=0, hidden=(16,), dropout=0.2)
    expected = run(full, tmp_path / "full").fit(data)
    with pytest.raises(Killed):
        run(make_mlp(seed=0, hidden=(16,), dropout=0.2), tmp_path / "run").fit(
            data, callbacks=[kill_after(phase, epoch)])
    fresh = make_mlp(seed=3, hidden=(16,), dropout=0.2)
    resumed = run(fresh, tmp_path / "run").fit(data, resume=True)
    assert_same_state(fresh, full)
    assert_same_state(resumed.phases[0].recipe, expected.phases[0].recipe)  # the hint adapter
    assert resumed.history == expected.history
    assert [r["phase"] for r in resumed.history if r["kind"] == "train"] == [0] * 6 + [1] * 6
    assert_log_matches(tmp_path / "run", tmp_path / "full")


def test_resume_from_a_checkpoint_inside_an_epoch(tmp_path, data, make_mlp):
    # 96 samples, micro-batches of 8, accumulation 2: 6 steps per epoch, 2 forwards per step.
    # Checkpoints every 4 steps; the run dies in step 6's first forward, so the newest
    # checkpoint is step 4, two thirds into the first epoch.
    teacher = make_mlp(seed=1, hidden=(32,))
    settings = {"epochs": 2, "batch_size": 8, "accumulation": 2, "checkpoint_every": 4}
    full = make_mlp(seed=0, hidden=(32,), dropout=0.3)
    expected = hinton_run(full, teacher, tmp_path / "full", **settings).fit(data)

    stopped = make_mlp(seed=0, hidden=(32,), dropout=0.3)
    kill_on_forward(stopped, 11)
    with pytest.raises(Killed):
        hinton_run(stopped, teacher, tmp_path / "run", **settings).fit(data)
    position = load_checkpoint(latest_checkpoint(tmp_path / "run")).trainer
    assert (position["global_step"], position["epoch"], position["batch"]) == (4, 0, 4)
    logged = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4, 5]  # step 5 was logged after the checkpoint

    fresh = make_mlp(seed=5, hidden=(32,), dropout=0.3)
    resumed = hinton_run(fresh, teacher, tmp_path / "run", **settings).fit(data, resume=True)
    assert_same_state(fresh, full)
    assert resumed.history == expected.history
    assert_log_matches(tmp_path / "run", tmp_path / "full")


def test_ema_teacher_state_is_resumed(tmp_path, data, make_mlp):
    from kdistill.teachers import EMATeacher

    def run(student: nn.Module, run_dir: Path) -> tuple[Distiller, EMATeacher]:
        ema = EMATeacher(student, momentum=0.9)
        return Distiller(student, ema, "hinton", epochs=2, batch_size=32, run_dir=run_dir,
                         progress=False), ema

    full = make_mlp(seed=0, dropout=0.2)
    distiller, full_ema = run(full, tmp_path / "full")
    distiller.fit(data)
    stopped = make_mlp(seed=0, dropout=0.2)
    distiller, _ = run(stopped, tmp_path / "run")
    with pytest.raises(Killed):
        distiller.fit(data, callbacks=[kill_after(0, 1)])
    fresh = make_mlp(seed=9, dropout=0.2)  # the EMA copy must come from the checkpoint too
    distiller, fresh_ema = run(fresh, tmp_path / "run")
    distiller.fit(data, resume=True)
    assert_same_state(fresh, full)
    assert_same_state(fresh_ema.model, full_ema.model)


def test_resume_errors(tmp_path, data, make_mlp):
    with pytest.raises(ValueError, match="^resume needs a run directory$"):
        Distiller(make_mlp(), make_mlp(seed=1), "hinton", epochs=1,
                  progress=False).fit(data, resume=True)
    with pytest.raises(RunFolderError, match="nothing to resume: no checkpoint in"):
        Distiller(make_mlp(), make_mlp(seed=1), "hinton", epochs=1, run_dir=tmp_path,
                  progress=False).fit(data, resume=True)
    with pytest.raises(ValueError, match="^resume continues the run in run_dir and overwrite "
                                         "replaces it: give one of them$"):
        Distiller(make_mlp(), make_mlp(seed=1), "hinton", epochs=1, run_dir=tmp_path,
                  progress=False).fit(data, resume=True, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def folder_snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` and its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file()}


def test_a_fresh_run_refuses_an_earlier_runs_folder(tmp_path, data, make_mlp):
    teacher = make_mlp(seed=1)
    hinton_run(make_mlp(seed=0), teacher, tmp_path, epochs=3).fit(data)  # 18 steps
    before = folder_snapshot(tmp_path)
    assert "student.safetensors" in before and "checkpoints/step-00000018/manifest.json" in before
    with pytest.raises(RunFolderError, match=f"run folder {tmp_path} already holds a run "
                       r"\(checkpoints, metrics.jsonl, student.safetensors\); pass "
                       "resume=True to continue it or overwrite=True"):
        hinton_run(make_mlp(seed=0), teacher, tmp_path, epochs=2).fit(data)
    # The folder is checked before any start-up work (which here would fail differently).
    from kdistill.data.base import ArrayDataset

    unlabeled = ArrayDataset(data.inputs, torch.full_like(data.labels, -100))
    with pytest.raises(RunFolderError, match="already holds a run"):
        Distiller(make_mlp(seed=0), None, "ce", run_dir=tmp_path, epochs=2,
                  progress=False).fit(unlabeled)
    assert folder_snapshot(tmp_path) == before  # nothing removed, nothing added


def test_overwrite_replaces_an_earlier_run_only_once_the_new_one_has_started(
        tmp_path, data, make_mlp):
    teacher = make_mlp(seed=1)
    hinton_run(make_mlp(seed=0), teacher, tmp_path, epochs=3).fit(data)  # 18 steps
    (tmp_path / "report.md").write_text("the earlier run's report")
    before = folder_snapshot(tmp_path)
    # A run that fails at start-up (here: a labels-only recipe on data without labels) leaves
    # the earlier run alone, even with overwrite.
    from kdistill.data.base import ArrayDataset

    unlabeled = ArrayDataset(data.inputs, torch.full_like(data.labels, -100))
    with pytest.raises(ValueError, match="trains on labelled samples only"):
        Distiller(make_mlp(seed=0), None, "ce", run_dir=tmp_path, epochs=2,
                  progress=False).fit(unlabeled, overwrite=True)
    assert folder_snapshot(tmp_path) == before
    with pytest.raises(Killed):
        hinton_run(make_mlp(seed=0), teacher, tmp_path, epochs=2).fit(
            data, overwrite=True, callbacks=[kill_after(0, 1)])
    # Only the second run's files: no old report or student beside its partial results, and
    # resuming continues the second run.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert [p.name for p in tmp_path.parent.iterdir() if ".replaced-" in p.name] == []
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 7))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == \
        ["step-00000006"]
    resumed = hinton_run(make_mlp(seed=0), teacher, tmp_path, epochs=2).fit(data, resume=True)
    assert [r["step"] for r in resumed.history if r["kind"] == "train"] == list(range(1, 13))


# -- damaged checkpoints and changed settings -----------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


NEWEST = "step-00000006"
HARMS: dict[str, Callable[[Path], Any]] = {  # done to the checkpoints folder after the kill
    "truncated weights.safetensors": lambda root: truncate(root / NEWEST / "weights.safetensors"),
    "truncated state.json": lambda root: truncate(root / NEWEST / "state.json"),
    "newest folder deleted": lambda root: shutil.rmtree(root / NEWEST),
    "latest pointer deleted": lambda root: (root / "latest").unlink(),
    "pointer to another run": lambda root: (root / "latest").write_text(
        "../../full/checkpoints/step-00000012"),
}
RESUMED_FROM = {"truncated weights.safetensors": 4, "truncated state.json": 4,
                "newest folder deleted": 4, "latest pointer deleted": 6,
                "pointer to another run": 6}


@pytest.mark.parametrize("harm", HARMS)
def test_resume_uses_the_newest_intact_checkpoint(tmp_path, data, make_mlp, harm, caplog):
    # 96 samples in batches of 16: 6 steps per epoch; checkpoints at steps 2, 4 and 6.
    teacher = make_mlp(seed=1, hidden=(32,))
    settings = {"epochs": 2, "checkpoint_every": 2, "keep_checkpoints": 3}
    full = make_mlp(seed=0, hidden=(32,), dropout=0.3)
    hinton_run(full, teacher, tmp_path / "full", **settings).fit(data)
    with pytest.raises(Killed):
        hinton_run(make_mlp(seed=0, hidden=(32,), dropout=0.3), teacher, tmp_path / "run",
                   **settings).fit(data, callbacks=[kill_after(0, 1)])
    HARMS[harm](tmp_path / "run" / "checkpoints")
    others = folder_snapshot(tmp_path / "full")

    fresh, started = make_mlp(seed=5, hidden=(32,), dropout=0.3), []
    with caplog.at_level("WARNING", logger="kdistill"):
        hinton_run(fresh, teacher, tmp_path / "run", **settings).fit(
            data, resume=True, on_start=started.append)
    assert started == [RESUMED_FROM[harm]]
    warnings = [r.getMessage() for r in caplog.records]
    if harm.startswith("truncated"):
        assert len(warnings) == 1
        assert re.fullmatch(rf"checkpoint step-00000006 is damaged \({harm.split()[1]} has \d+ "
                            r"bytes, \d+ were written\); resuming from step-00000004",
                            warnings[0]), warnings
    else:
        assert warnings == []
    assert_same_state(fresh, full)
    assert_log_matches(tmp_path / "run", tmp_path / "full")
    assert folder_snapshot(tmp_path / "full") == others  # the other run is untouched


def test_resume_tidies_what_a_kill_left_and_counts_a_folder_moved_aside(tmp_path, data,
                                                                        make_mlp):
    teacher = make_mlp(seed=1, hidden=(32,))
    settings = {"epochs": 2, "checkpoint_every": 4}
    full = make_mlp(seed=0, hidden=(32,), dropout=0.3)
    hinton_run(full, teacher, tmp_path / "full", **settings).fit(data)
    with pytest.raises(Killed):
        hinton_run(make_mlp(seed=0, hidden=(32,), dropout=0.3), teacher, tmp_path / "run",
                   **settings).fit(data, callbacks=[kill_after(0, 1)])
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # A kill while re-saving step 6 (between its two renames), while writing step 8, while
    # replacing the metrics log and while writing the student.
    os.replace(root / "step-00000006", root / ".stale-step-00000006-999")
    (root / ".step-00000008.tmp-999").mkdir()
    (run_dir / ".metrics.jsonl.tmp-999").write_text("{")
    (run_dir / ".student.safetensors.tmp-999").write_bytes(b"")
    fresh, started = make_mlp(seed=5, hidden=(32,), dropout=0.3), []
    hinton_run(fresh, teacher, run_dir, **settings).fit(data, resume=True,
                                                        on_start=started.append)
    assert started == [6]
    assert_same_state(fresh, full)
    assert_log_matches(run_dir, tmp_path / "full")
    assert [p.name for p in run_dir.rglob(".*")] == []


def test_a_new_fit_checks_its_folder_again_when_it_starts(tmp_path, data, make_mlp):
    from kdistill.teachers import FrozenTeacher

    class Intruder(FrozenTeacher):
        """Another run's file appears while this one starts up (the teacher is bound)."""

        def bind(self, *args: Any, **kwargs: Any) -> None:
            (tmp_path / "intruder.txt").write_text("another run")
            super().bind(*args, **kwargs)

    with pytest.raises(RunFolderError, match=r"already holds a run \(intruder.txt\)"):
        Distiller(make_mlp(), Intruder(make_mlp(seed=1)), "hinton", epochs=1,
                  run_dir=tmp_path, progress=False).fit(data)
    assert [p.name for p in tmp_path.iterdir()] == ["intruder.txt"]


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path, data, make_mlp):
    teacher = make_mlp(seed=1)
    with pytest.raises(Killed):
        hinton_run(make_mlp(seed=0), teacher, tmp_path, checkpoint_every=4).fit(
            data, callbacks=[kill_after(0, 1)])
    for path in (tmp_path / "checkpoints").glob("step-*"):
        truncate(path / "weights.safetensors")
    before = folder_snapshot(tmp_path)
    with pytest.raises(RunFolderError, match=(
            f"nothing to resume in {tmp_path / 'checkpoints'}: every checkpoint is damaged "
            r"\(step-00000006: weights.safetensors has \d+ bytes, \d+ were written; "
            r"step-00000004: weights.safetensors has")):
        hinton_run(make_mlp(seed=0), teacher, tmp_path, checkpoint_every=4).fit(data,
                                                                               resume=True)
    assert folder_snapshot(tmp_path) == before


def test_resume_refuses_other_settings_or_models_and_writes_nothing(tmp_path, data, make_mlp):
    teacher = make_mlp(seed=1)
    with pytest.raises(Killed):
        hinton_run(make_mlp(seed=0, hidden=(32,)), teacher, tmp_path).fit(
            data, callbacks=[kill_after(0, 1)])
    before = folder_snapshot(tmp_path)
    with pytest.raises(RunFolderError, match=(
            f"cannot resume {tmp_path}: step-00000006 was made by a fit with other settings "
            r"\(trainer.optimizer.lr: 0.01 → 0.5\); a resume continues the same run")):
        hinton_run(make_mlp(seed=0, hidden=(32,)), teacher, tmp_path,
                   optimizer={"name": "adamw", "lr": 0.5, "weight_decay": 0.01}).fit(
            data, resume=True)
    with pytest.raises(RunFolderError, match=(
            r"\(phases.0.epochs: 3 → 4; trainer.epochs: 3 → 4\)")):
        hinton_run(make_mlp(seed=0, hidden=(32,)), teacher, tmp_path, epochs=4).fit(
            data, resume=True)
    with pytest.raises(RunFolderError, match=(
            r"\(phases.0.params.temperature: 4.0 → 2.0\)")):
        Distiller(make_mlp(seed=0, hidden=(32,)), teacher, build_recipe("hinton", temperature=2),
                  run_dir=tmp_path, epochs=3, batch_size=16, progress=False,
                  scheduler={"name": "cosine", "warmup_steps": 2},
                  optimizer={"name": "adamw", "lr": 0.01, "weight_decay": 0.01}).fit(
            data, resume=True)
    with pytest.raises(RunFolderError, match=r"\(global_batch: 16 → 32; train_samples: 96 → "):
        hinton_run(make_mlp(seed=0, hidden=(32,)), teacher, tmp_path, batch_size=32).fit(
            data + data, resume=True)
    with pytest.raises(RunFolderError, match=(
            f"cannot resume {tmp_path}: step-00000006 holds other models than this run "
            r"\(student.features.1.bias has shape \[32\] there, \[16\] here; ")):
        hinton_run(make_mlp(seed=0, hidden=(16,)), teacher, tmp_path).fit(data, resume=True)
    assert folder_snapshot(tmp_path) == before


def test_resume_applies_logging_and_checkpoint_settings(tmp_path, data, make_mlp):
    teacher = make_mlp(seed=1)
    with pytest.raises(Killed):
        hinton_run(make_mlp(seed=0), teacher, tmp_path).fit(data, callbacks=[kill_after(0, 1)])
    resumed = hinton_run(make_mlp(seed=0), teacher, tmp_path, log_every=4, checkpoint_every=5,
                         keep_checkpoints=5).fit(data, resume=True)
    steps = [r["step"] for r in resumed.history if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 8, 12, 16]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-00000006", "step-00000010", "step-00000012", "step-00000015", "step-00000018"]
    fit = load_checkpoint(tmp_path / "checkpoints" / "step-00000018").trainer["fit"]
    assert "log_every" not in fit["trainer"] and fit["trainer"]["epochs"] == 3


# -- a real kill of the command-line program ----------------------------------------------------
CONFIG = """\
name: {name}
output_dir: {output}
data: {{name: digits, labeled: 200, seed: 0}}
student: {{name: mlp, options: {{hidden: [32], dropout: 0.2}}}}
teacher:
  model: {{name: mlp, options: {{hidden: [64]}}}}
  checkpoint: {teacher}
recipe: {{name: hinton, temperature: 4.0, alpha: 0.9}}
trainer:
  epochs: 3
  batch_size: 32
  seed: 0
  checkpoint_every: 4
  progress: false
  optimizer: {{name: adamw, lr: 0.01}}
  scheduler: {{name: cosine, warmup_steps: 5}}
evaluation: {{batch_size: 64, repeats: 1, threads: 1}}
"""


def kdistill_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from kdistill.cli import main; sys.exit(main())",
            *args]


@pytest.mark.slow
def test_resume_after_a_real_sigkill(tmp_path, digits):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDISTILL_CACHE": str(tmp_path / "cache")}
    torch.manual_seed(0)
    from kdistill.models import build_model

    teacher = build_model("mlp", digits.input_shape, digits.num_classes, hidden=[64])
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    configs = {}
    for name in ("full", "killed"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(CONFIG.format(name=name, output=tmp_path / "runs",
                                               teacher=tmp_path / "teacher.safetensors"))

    # The uninterrupted run goes alongside the one to be killed and then resumed.
    logs = {name: (tmp_path / f"{name}.err").open("w") for name in ("full", "killed")}
    full = subprocess.Popen(kdistill_command("run", str(configs["full"])), env=env,
                            stdout=subprocess.DEVNULL, stderr=logs["full"])
    process = subprocess.Popen(kdistill_command("run", str(configs["killed"])), env=env,
                               stdout=subprocess.DEVNULL, stderr=logs["killed"])
    run_dir = tmp_path / "runs" / "killed"
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(run_dir) is None and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared within 120 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if process.returncode != -signal.SIGKILL:
            pytest.skip(f"the run ended before the kill (exit {process.returncode}): "
                        f"{(tmp_path / 'killed.err').read_text()[-500:]}")
        assert not (run_dir / "student.safetensors").exists()
        killed_at = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
        assert 4 <= killed_at["trainer"]["global_step"] < 3 * 43  # 43 steps per epoch

        resumed = subprocess.run(kdistill_command("run", str(configs["killed"]), "--resume"),
                                 env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        full.wait(timeout=300)
        assert full.returncode == 0, (tmp_path / "full.err").read_text()[-3000:]
    finally:
        for child in (process, full):
            if child.poll() is None:
                child.kill()
                child.wait()
        for handle in logs.values():
            handle.close()
    a = load_file(str(tmp_path / "runs" / "full" / "student.safetensors"))
    b = load_file(str(run_dir / "student.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert_log_matches(run_dir, tmp_path / "runs" / "full")
