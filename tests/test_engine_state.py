"""What a checkpoint holds and how a resume reads it (``kdistill.engine.state``), on tiny
models without a training loop: exact round trips of every part, the newest intact checkpoint
(damaged newer ones named in a warning), and the refusals of another fit's checkpoint with
their exact messages."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdistill.checkpoint import RunFolderError
from kdistill.engine.phases import Phase
from kdistill.engine.state import (
    RunState,
    changed_fields,
    fit_description,
    format_changes,
)
from kdistill.errors import NonFiniteError
from kdistill.recipes import build_recipe
from kdistill.recipes.base import Recipe
from kdistill.settings import TrainerSettings
from kdistill.teachers import TeacherSource


class FakeScaler:
    """A gradient scaler's checkpoint interface, remembering what it was given."""

    def __init__(self, scale: float):
        self.scale, self.loaded = scale, []

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_tracker": 3}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loaded.append(dict(state))


class FakeAccelerator:
    """The single-process accelerator interface :class:`RunState` uses."""

    def __init__(self, main: bool = True, scaler: FakeScaler | None = None):
        self.is_main_process, self.scaler, self.waits = main, scaler, 0

    def wait_for_everyone(self) -> None:
        self.waits += 1


class WithAdapter(Recipe):
    """A recipe with trainable state of its own (like an adapter built on a first batch)."""

    name = "adapter-test"

    def __init__(self, width: int = 3):
        super().__init__()
        self.adapter = nn.Linear(width, 2)


class CountingTeacher(TeacherSource):
    """A teacher source with state to checkpoint."""

    def __init__(self, value: float):
        self.counter = torch.tensor([value])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counter": self.counter}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.counter = state["counter"].clone()


def student(seed: int = 0, *sizes: int) -> nn.Module:
    torch.manual_seed(seed)
    sizes = sizes or (4, 3)
    return nn.Sequential(*(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False)))


def settings(**changes: Any) -> TrainerSettings:
    return TrainerSettings(**{"epochs": 2, "batch_size": 8, "progress": False, **changes})


def make_state(run_dir: Path | None, model: nn.Module | None = None, *,
               phases: list[Phase] | None = None, teacher: TeacherSource | None = None,
               accelerator: FakeAccelerator | None = None, describe: bool = True,
               **changes: Any) -> RunState:
    trainer = settings(**changes)
    phases = phases if phases is not None else [Phase(build_recipe("ce"), 2, name="0-ce")]
    state = RunState(model if model is not None else student(), phases, teacher, trainer,
                     run_dir, accelerator or FakeAccelerator())
    if describe:
        state.description = fit_description(trainer, phases, 8, 40)
    return state


def optimizer_pair(model: nn.Module) -> tuple[torch.optim.Optimizer,
                                              torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()


def save(state: RunState, step: int, position: tuple[int, int, int] = (0, 1, 2)) -> None:
    optimizer, scheduler = optimizer_pair(state.student)
    state.global_step = step
    state.save(dict(zip(("phase", "epoch", "batch"), position, strict=True)), optimizer,
               scheduler)


def same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# -- describing a fit and its changes -----------------------------------------------------------
def test_the_fit_description_holds_what_decides_the_weights():
    trainer = settings(log_every=3, checkpoint_every=5, keep_checkpoints=4)
    phases = [Phase(build_recipe("hinton", temperature=2.0), 3, name="0-hinton",
                    keep_best="accuracy"),
              Phase(build_recipe("ce"), 1, optimizer=trainer.optimizer,
                    scheduler=trainer.scheduler)]
    described = fit_description(trainer, phases, 32, 96)
    expected_trainer = trainer.model_dump(mode="json")
    for key in ("progress", "log_every", "checkpoint_every", "keep_checkpoints", "workers",
                "prefetch"):  # they change how fast or how visibly, never the weights
        del expected_trainer[key]
    assert described == {
        "trainer": expected_trainer,
        "phases": [
            {"name": "0-hinton", "recipe": "hinton",
             "params": phases[0].recipe.params.model_dump(mode="json"), "epochs": 3,
             "optimizer": None, "scheduler": None, "keep_best": "accuracy"},
            {"name": "", "recipe": "ce", "params": {}, "epochs": 1,
             "optimizer": trainer.optimizer.model_dump(mode="json"),
             "scheduler": trainer.scheduler.model_dump(mode="json"), "keep_best": None}],
        "global_batch": 32, "train_samples": 96}
    assert described["phases"][0]["params"]["temperature"] == 2.0


LONG = "x" * 38  # json.dumps gives 40 characters: shown whole


@pytest.mark.parametrize(("old", "new", "shown"), [
    ({"a": {"b": 1}, "c": [2]}, {"a": {"b": 2}, "c": [2, 3]}, "a.b: 1 → 2; c.1: (none) → 3"),
    ({"k": 1, "x": None}, {"k": 1}, "x: null → (none)"),
    ({"k": 1}, {"k": 1, "x": None}, "x: (none) → null"),
    ({"x": []}, {"x": [1]}, "x: [] → (none); x.0: (none) → 1"),
    ({"s": "ab"}, {"s": "a"}, 's: "ab" → "a"'),
    ({"s": LONG}, {"s": LONG + "y"}, f's: "{LONG}" → "{"x" * 36}...'),
    ({}, {}, ""),
    ({"same": 1}, {"same": 1}, ""),
])
def test_changes_are_shown_with_old_and_new_values(old, new, shown):
    assert format_changes(changed_fields(old, new)) == shown


def test_at_most_eight_changes_are_shown():
    def changes(count: int) -> list[tuple[str, Any, Any]]:
        return changed_fields({f"k{i:02d}": 0 for i in range(count)},
                              {f"k{i:02d}": 1 for i in range(count)})

    eight = "; ".join(f"k{i:02d}: 0 → 1" for i in range(8))
    assert format_changes(changes(8)) == eight
    assert format_changes(changes(9)) == f"{eight}; and 1 more"
    assert format_changes(changes(11)) == f"{eight}; and 3 more"
    assert format_changes(changes(3), limit=2) == "k00: 0 → 1; k01: 0 → 1; and 1 more"


# -- saving ------------------------------------------------------------------------------------
def test_a_checkpoint_holds_every_part_and_a_resume_restores_them_exactly(tmp_path):
    phases = [Phase(WithAdapter(), 1, name="a"), Phase(WithAdapter(5), 1, name="b")]
    model = student(0)
    saving = make_state(tmp_path, model, phases=phases, teacher=CountingTeacher(7.0),
                        accelerator=FakeAccelerator(scaler=FakeScaler(512.0)))
    saving.built = {0}
    optimizer, scheduler = optimizer_pair(model)
    train_steps(model, optimizer, scheduler, 3)
    saving.best.record = {"phase": 0, "epoch": 1, "score": 0.5}
    saving.best.weights = {k: v + 1 for k, v in model.state_dict().items()}
    saving.history = [{"kind": "train", "step": 1, "loss": 2.0}]
    saving.global_step = 3
    saving.save({"phase": 0, "epoch": 1, "batch": 2}, optimizer, scheduler)
    folder = tmp_path / "checkpoints" / "step-00000003"
    assert load_file(str(folder / "weights.safetensors")).keys() == {
        "student.0.weight", "student.0.bias", "best.0.weight", "best.0.bias",
        "recipe.0.adapter.weight", "recipe.0.adapter.bias", "teacher.counter"}
    expected_rng = torch.rand(3)

    fresh_phases = [Phase(WithAdapter(), 1, name="a"), Phase(WithAdapter(5), 1, name="b")]
    scaler, teacher = FakeScaler(1.0), CountingTeacher(0.0)
    resumed = make_state(tmp_path, student(9), phases=fresh_phases, teacher=teacher,
                         accelerator=FakeAccelerator(scaler=scaler))
    resumed.built = {0}
    checkpoint, position = resumed.load_newest()
    assert position == {"phase": 0, "epoch": 1, "batch": 2}
    assert resumed.global_step == 3
    assert resumed.history == saving.history
    assert resumed.best.record == saving.best.record
    assert resumed.best.weights is None  # weights come with restore
    new_optimizer, new_scheduler = optimizer_pair(resumed.student)
    resumed.restore(checkpoint, new_optimizer, new_scheduler)
    assert same_tensors(resumed.student.state_dict(), model.state_dict())
    assert same_tensors(resumed.best.weights, saving.best.weights)
    assert same_tensors(fresh_phases[0].recipe.state_dict(), phases[0].recipe.state_dict())
    assert not same_tensors(fresh_phases[1].recipe.state_dict(),
                            phases[1].recipe.state_dict())  # not built: not saved or loaded
    assert torch.equal(teacher.counter, torch.tensor([7.0]))
    assert new_scheduler.state_dict()["last_epoch"] == 3
    assert new_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    momentum = {i: s["momentum_buffer"] for i, s in new_optimizer.state_dict()["state"].items()}
    assert same_tensors({str(i): v for i, v in momentum.items()},
                        {str(i): s["momentum_buffer"]
                         for i, s in optimizer.state_dict()["state"].items()})
    assert torch.equal(torch.rand(3), expected_rng)  # the RNG state of the save
    assert scaler.loaded == [{"scale": 512.0, "growth_tracker": 3}]


def test_best_weights_and_the_scaler_state_are_loaded_only_when_saved(tmp_path):
    saving = make_state(tmp_path / "a")  # no best weights, no scaler
    save(saving, 2)
    scaler = FakeScaler(1.0)
    resumed = make_state(tmp_path / "a", accelerator=FakeAccelerator(scaler=scaler))
    resumed.best.weights = {"0.weight": torch.zeros(3, 4)}  # left from an earlier phase
    checkpoint, _ = resumed.load_newest()
    resumed.restore(checkpoint, *optimizer_pair(resumed.student))
    assert resumed.best.weights is None and resumed.best.record is None
    assert scaler.loaded == []

    with_scaler = make_state(tmp_path / "b", accelerator=FakeAccelerator(scaler=FakeScaler(8.)))
    save(with_scaler, 2)
    without = make_state(tmp_path / "b")  # e.g. resumed without fp16: the state is unused
    checkpoint, _ = without.load_newest()
    without.restore(checkpoint, *optimizer_pair(without.student))
    assert same_tensors(without.student.state_dict(), with_scaler.student.state_dict())


def test_saving_keeps_the_newest_checkpoints_and_only_the_main_process_writes(tmp_path):
    accelerator = FakeAccelerator()
    state = make_state(tmp_path, accelerator=accelerator, keep_checkpoints=2)
    for step in (2, 4, 6):
        save(state, step)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step-00000004", "step-00000006"]
    assert accelerator.waits == 3
    other = FakeAccelerator(main=False)
    save(make_state(tmp_path / "other", accelerator=other), 2)
    assert not (tmp_path / "other").exists() and other.waits == 1
    no_folder = FakeAccelerator()
    save(make_state(None, accelerator=no_folder), 2)
    assert no_folder.waits == 1


@pytest.mark.parametrize("main", [True, False])
def test_non_finite_weights_are_never_saved(tmp_path, main):
    state = make_state(tmp_path, accelerator=FakeAccelerator(main=main))
    with torch.no_grad():
        state.student[0].bias[1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^the weights after training step 5 are "
                       r"non-finite \(student.0.bias\), so a checkpoint was not saved; "):
        save(state, 5)
    with pytest.raises(NonFiniteError, match=r"^the weights after training step 5 are "
                       r"non-finite \(student.0.bias\), so the final student was not saved; "):
        state.save_student()
    assert list(tmp_path.iterdir()) == []
    make_state(None, state.student).save_student()  # no run folder: nothing to check or write


def test_the_final_student_is_written_by_the_main_process(tmp_path):
    state = make_state(tmp_path)
    state.best.weights = {k: v + 1 for k, v in state.student.state_dict().items()}
    state.save_student()
    assert same_tensors(load_file(str(tmp_path / "student.safetensors")),
                        state.student.state_dict())
    make_state(tmp_path / "other", accelerator=FakeAccelerator(main=False)).save_student()
    assert not (tmp_path / "other").exists()


# -- resuming ----------------------------------------------------------------------------------
def test_a_resume_needs_a_run_folder_and_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="^resume needs a run directory$"):
        make_state(None).load_newest()
    with pytest.raises(RunFolderError) as error:
        make_state(tmp_path).load_newest()
    assert str(error.value) == f"nothing to resume: no checkpoint in {tmp_path / 'checkpoints'}"


def test_damaged_newer_checkpoints_are_named_and_skipped(tmp_path, caplog):
    state = make_state(tmp_path, keep_checkpoints=3)
    for step in (2, 4, 6):
        state.history = [{"kind": "train", "step": step}]
        save(state, step, position=(0, 0, step))
    root = tmp_path / "checkpoints"
    (root / "step-00000006" / "manifest.json").unlink()
    state_file = root / "step-00000004" / "state.json"
    state_file.write_bytes(b" " * state_file.stat().st_size)
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        _, position = make_state(tmp_path).load_newest()
    assert position == {"phase": 0, "epoch": 0, "batch": 2}
    assert [r.getMessage() for r in caplog.records] == [
        "checkpoint step-00000006 is damaged (manifest.json is missing); resuming from "
        "step-00000002",
        "checkpoint step-00000004 is damaged (state.json fails its SHA-256 check); resuming "
        "from step-00000002"]

    (root / "step-00000002" / "manifest.json").unlink()
    with pytest.raises(RunFolderError) as error:
        make_state(tmp_path).load_newest()
    assert str(error.value) == (
        f"nothing to resume in {root}: every checkpoint is damaged (step-00000006: "
        "manifest.json is missing; step-00000004: state.json fails its SHA-256 check; "
        "step-00000002: manifest.json is missing)")


def test_a_checkpoint_of_a_fit_with_other_settings_is_refused(tmp_path):
    save(make_state(tmp_path), 4)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(RunFolderError) as error:
        make_state(tmp_path, optimizer={"lr": 0.5}, seed=3).load_newest()
    assert str(error.value) == (
        f"cannot resume {tmp_path}: step-00000004 was made by a fit with other settings "
        "(trainer.optimizer.lr: 0.001 → 0.5; trainer.seed: 0 → 3); a resume continues the "
        "same run: restore them, or start a new run to train with them")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # Progress, logging and checkpoint settings may change.
    resumed = make_state(tmp_path, log_every=7, progress=True, checkpoint_every=3,
                         keep_checkpoints=9)
    assert resumed.load_newest()[1] == {"phase": 0, "epoch": 1, "batch": 2}


def test_without_a_description_on_either_side_nothing_is_compared(tmp_path):
    save(make_state(tmp_path / "described"), 4)
    state = make_state(tmp_path / "described", describe=False, seed=3)
    assert state.load_newest()[1] == {"phase": 0, "epoch": 1, "batch": 2}
    save(make_state(tmp_path / "plain", describe=False), 4)  # saved without "fit"
    state = make_state(tmp_path / "plain", seed=3)
    assert state.load_newest()[1] == {"phase": 0, "epoch": 1, "batch": 2}
    assert state.global_step == 4


@pytest.mark.parametrize(("sizes", "problems"), [
    ((4, 5), "student.1.bias is not in this run; student.1.weight is not in this run; "
             "student.0.bias has shape [3] there, [5] here; student.0.weight has shape [3, 4] "
             "there, [5, 4] here"),
    ((4, 5, 2, 2), "student.2.bias is not in the checkpoint; student.2.weight is not in the "
                   "checkpoint; student.0.bias has shape [3] there, [5] here; student.0.weight "
                   "has shape [3, 4] there, [5, 4] here; student.1.weight has shape [2, 3] "
                   "there, [2, 5] here"),
    ((4, 5, 3, 2), "student.2.bias is not in the checkpoint; student.2.weight is not in the "
                   "checkpoint; student.0.bias has shape [3] there, [5] here; student.0.weight "
                   "has shape [3, 4] there, [5, 4] here; student.1.bias has shape [2] there, "
                   "[3] here; and 1 more"),
    ((4, 5, 2, 2, 2), "student.2.bias is not in the checkpoint; student.2.weight is not in the "
                      "checkpoint; student.3.bias is not in the checkpoint; student.3.weight is "
                      "not in the checkpoint; student.0.bias has shape [3] there, [5] here; and "
                      "2 more"),
])
def test_a_checkpoint_of_other_models_is_refused_naming_the_differences(tmp_path, sizes,
                                                                        problems):
    saving = make_state(tmp_path, student(0, 4, 3, 2), describe=False)
    saving.best.weights = {"0.weight": torch.zeros(3, 4)}  # best weights are not compared
    save(saving, 6)
    other = make_state(tmp_path, student(0, *sizes), describe=False)
    checkpoint, _ = other.load_newest()
    with pytest.raises(RunFolderError) as error:
        other.restore(checkpoint, *optimizer_pair(other.student))
    assert str(error.value) == (f"cannot resume {tmp_path}: step-00000006 holds other models "
                                f"than this run ({problems})")


def test_exactly_five_differences_are_all_named(tmp_path):
    save(make_state(tmp_path, student(0, 4, 3, 2), describe=False), 6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Identity(), nn.Linear(5, 2, bias=False))
    other = make_state(tmp_path, model, describe=False)
    with pytest.raises(RunFolderError) as error:
        other.check_weights(other.load_newest()[0])
    assert str(error.value).endswith(
        "(student.2.weight is not in the checkpoint; student.1.bias is not in this run; "
        "student.1.weight is not in this run; student.0.bias has shape [3] there, [5] here; "
        "student.0.weight has shape [3, 4] there, [5, 4] here)")
