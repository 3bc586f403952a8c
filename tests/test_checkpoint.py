"""Checkpoints: optimizer and RNG round trips, the ``latest`` pointer, atomic writes, pruning,
manifests, damaged checkpoints and the leftovers of killed saves."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdistill.checkpoint as checkpoint_module
from kdistill import Distiller
from kdistill.checkpoint import (
    FILES,
    LATEST,
    MANIFEST,
    DamagedCheckpoint,
    RunFolderError,
    capture_rng,
    check_fresh_run_folder,
    checkpoint_folders,
    file_sha256,
    latest_checkpoint,
    load_checkpoint,
    load_newest,
    replace_run_folder,
    restore_rng,
    save_checkpoint,
    tidy_run_folder,
    verify_checkpoint,
)
from kdistill.metrics_log import MetricsLog, read_metrics


def trained_pair(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small model and its optimizer after three steps (so every state slot is filled)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    if kind == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2,
                                                             betas=(0.8, 0.95),
                                                             weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(3):
        take_step(model, optimizer)
    return model, optimizer


def take_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    generator = torch.Generator().manual_seed(7)
    x, y = torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,),
                                                                 generator=generator)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def save(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         keep: int = 2, **trainer: object) -> Path:
    return save_checkpoint(run_dir, step, weights=model.state_dict(),
                           optimizer=optimizer.state_dict(),
                           scheduler={"last_epoch": step, "base_lrs": [0.1]},
                           trainer={"global_step": step, **trainer}, keep=keep)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_state_round_trip(tmp_path, kind):
    model, optimizer = trained_pair(kind)
    path = save(tmp_path, 3, model, optimizer)
    loaded = load_checkpoint(path)

    clone = copy.deepcopy(model)
    clone.load_state_dict(loaded.weights)
    restored = type(optimizer)(clone.parameters(), lr=123.0)  # settings come from the state
    restored.load_state_dict(loaded.optimizer)

    original, back = optimizer.state_dict(), restored.state_dict()
    assert json.loads(json.dumps(back["param_groups"])) == \
        json.loads(json.dumps(original["param_groups"]))
    assert set(back["state"]) == set(original["state"]) == set(range(4))
    slots = {"adamw": {"step", "exp_avg", "exp_avg_sq"}, "sgd": {"momentum_buffer"}}[kind]
    for pid, entry in original["state"].items():
        assert set(entry) == slots
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(back["state"][pid][key]), torch.as_tensor(value))
    # Continuing from the restored state is the same as never stopping.
    take_step(model, optimizer)
    take_step(clone, restored)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    model, optimizer = trained_pair("sgd")
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    np.random.normal()  # leaves a cached Gaussian in numpy's legacy state
    random.gauss(0, 1)  # and in Python's
    path = save(tmp_path, 1, model, optimizer)

    def draw() -> tuple[list[float], list[float], list[float]]:
        return (torch.rand(5).tolist(), np.random.normal(size=5).tolist(),
                [random.gauss(0, 1) for _ in range(5)])

    expected = draw()
    draw()  # move every generator on
    loaded = load_checkpoint(path)
    restore_rng(loaded.rng_tensors, loaded.rng_meta)
    assert draw() == expected
    # The same in memory, without files.
    tensors, meta = capture_rng()
    first = draw()
    assert draw() != first
    restore_rng(tensors, meta)
    assert draw() == first


def test_latest_pointer_names_the_newest_checkpoint(tmp_path):
    model, optimizer = trained_pair("adamw")
    assert latest_checkpoint(tmp_path) is None
    save(tmp_path, 5, model, optimizer, phase=0)
    take_step(model, optimizer)
    newest = save(tmp_path, 10, model, optimizer, phase=1)
    assert (tmp_path / "checkpoints" / LATEST).read_text().strip() == "step-00000010"
    assert latest_checkpoint(tmp_path) == newest
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert loaded.trainer == {"global_step": 10, "phase": 1}
    assert loaded.scheduler == {"last_epoch": 10, "base_lrs": [0.1]}
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.weights[name], value)


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = trained_pair("adamw")
    previous = save(tmp_path, 1, model, optimizer)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    take_step(model, optimizer)

    real_save_file = checkpoint_module.save_file
    calls = []

    def failing_save_file(tensors: dict, filename: str, *args: object, **kwargs: object) -> None:
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, model, optimizer)
    assert len(calls) == 2  # the first file of step 2 was written, the second failed

    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000001"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temp left
    assert latest_checkpoint(tmp_path) == previous
    loaded = load_checkpoint(previous)
    assert all(torch.equal(loaded.weights[k], v) for k, v in expected.items())

    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)
    assert save(tmp_path, 2, model, optimizer) == latest_checkpoint(tmp_path)


def test_keep_prunes_the_oldest_checkpoints(tmp_path):
    model, optimizer = trained_pair("sgd")
    for step in range(1, 6):
        save(tmp_path, step, model, optimizer, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000004", "step-00000005"]
    save(tmp_path, 6, model, optimizer, keep=3)
    assert sorted(p.name for p in root.glob("step-*")) == \
        ["step-00000004", "step-00000005", "step-00000006"]


def test_checkpoints_of_an_earlier_longer_run_do_not_win(tmp_path):
    # Steps sort by name: stale later steps must not crowd out (and prune) the new ones.
    model, optimizer = trained_pair("sgd")
    for step in (100, 120):
        save(tmp_path, step, model, optimizer)
    newest = save(tmp_path, 10, model, optimizer)
    assert latest_checkpoint(tmp_path) == newest
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000010"]


def test_the_engine_checkpoints_every_n_steps_and_keeps_the_newest(tmp_path, digits_subset,
                                                                   make_mlp):
    # 48 samples in batches of 16: 3 steps per epoch, 2 epochs; every 2 steps + epoch ends.
    Distiller(make_mlp(seed=0), make_mlp(seed=1), "hinton", epochs=2, batch_size=16,
              checkpoint_every=2, keep_checkpoints=3, run_dir=tmp_path,
              progress=False).fit(digits_subset(48, labeled=12))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == \
        ["step-00000003", "step-00000004", "step-00000006"]
    positions = {p.name: load_checkpoint(p).trainer for p in root.glob("step-*")}
    assert {k: (v["epoch"], v["batch"]) for k, v in positions.items()} == {
        "step-00000003": (1, 0), "step-00000004": (1, 1), "step-00000006": (2, 0)}
    assert latest_checkpoint(tmp_path) == root / "step-00000006"


def test_metrics_log_replace_drops_torn_lines_and_later_steps(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLog(path)
    records = [{"kind": "train", "step": step, "kd": step / 10} for step in (1, 2, 3)]
    for record in records:
        log.write(record)
    with path.open("a") as handle:
        handle.write('{"kind": "train", "st')  # a kill in the middle of a line
    log.replace(records[:2])  # what a resume does with the checkpoint's history
    assert read_metrics(path) == [{"kind": "train", "step": 1, "kd": 0.1},
                                  {"kind": "train", "step": 2, "kd": 0.2}]
    log.replace([{"kind": "eval", "step": 7}])
    assert read_metrics(path) == [{"kind": "eval", "step": 7}]
    log.replace([])
    assert path.read_text() == ""
    MetricsLog(None).write({"step": 1})  # non-main processes log nothing


# -- verified checkpoints: manifests, damage, fallback, the pointer, leftovers -------------------
def test_a_checkpoint_holds_a_manifest_of_its_files(tmp_path):
    model, optimizer = trained_pair("sgd")
    path = save(tmp_path, 3, model, optimizer)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 3 and set(manifest["files"]) == set(FILES)
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(p.name for p in path.iterdir()) == sorted([*FILES, MANIFEST])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": (lambda p: truncate(p / "weights.safetensors"),
                          r"weights.safetensors has \d+ bytes, \d+ were written"),
    "truncated state": (lambda p: truncate(p / "state.json"), r"state.json has \d+ bytes"),
    "flipped bit": (lambda p: flip_a_bit(p / "optimizer.safetensors"),
                    "optimizer.safetensors fails its SHA-256 check"),
    "missing file": (lambda p: (p / "rng.safetensors").unlink(), "rng.safetensors is missing"),
    "missing manifest": (lambda p: (p / MANIFEST).unlink(), "manifest.json is missing"),
    "torn manifest": (lambda p: truncate(p / MANIFEST), "manifest.json is unreadable"),
    "manifest of another step": (lambda p: edit_manifest(p, step=1),
                                 "manifest.json does not describe this step"),
    "file left out of the manifest": (lambda p: edit_manifest(p, files={}),
                                      "manifest.json does not list weights.safetensors"),
    "unreadable file matching its manifest": (lambda p: rewrite(p, "state.json", "{"),
                                              "cannot be read: "),
}


def rewrite(path: Path, name: str, text: str) -> None:
    """Replace a file and its manifest entry, as a bug (not a disk) would."""
    (path / name).write_text(text)
    files = json.loads((path / MANIFEST).read_text())["files"]
    files[name] = {"bytes": len(text), "sha256": file_sha256(path / name)}
    edit_manifest(path, files=files)


def edit_manifest(path: Path, **changes: object) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, **changes}))


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_is_used(tmp_path, damage):
    model, optimizer = trained_pair("adamw")
    older = save(tmp_path, 4, model, optimizer)
    take_step(model, optimizer)
    newest = save(tmp_path, 8, model, optimizer)
    harm, reason = DAMAGE[damage]
    harm(newest)
    with pytest.raises(DamagedCheckpoint,
                       match=rf"checkpoint {re.escape(str(newest))} is damaged \({reason}"):
        load_checkpoint(newest)
    loaded, skipped = load_newest(tmp_path)
    assert loaded is not None and loaded.path == older
    assert [s.path for s in skipped] == [newest]
    assert latest_checkpoint(tmp_path) == older
    harm(older)
    assert load_newest(tmp_path)[0] is None and latest_checkpoint(tmp_path) is None


def test_the_latest_pointer_is_never_followed(tmp_path):
    model, optimizer = trained_pair("sgd")
    other = save(tmp_path / "other", 50, model, optimizer)
    other_files = {p: p.read_bytes() for p in other.iterdir()}
    own = save(tmp_path / "run", 5, model, optimizer)
    root = tmp_path / "run" / "checkpoints"
    (root / LATEST).write_text("../../other/checkpoints/step-00000050")  # another run's
    assert latest_checkpoint(tmp_path / "run") == own
    (root / LATEST).unlink()
    assert latest_checkpoint(tmp_path / "run") == own
    (root / "step-00000099").symlink_to(other, target_is_directory=True)  # not one of ours
    assert checkpoint_folders(tmp_path / "run") == [own]
    save(tmp_path / "run", 6, model, optimizer)  # pruning leaves the other run alone
    assert {p: p.read_bytes() for p in other.iterdir()} == other_files
    assert (root / LATEST).read_text() == "step-00000006"


def test_leftovers_of_a_killed_save_are_tidied(tmp_path):
    model, optimizer = trained_pair("sgd")
    save(tmp_path, 4, model, optimizer)
    eight = save(tmp_path, 8, model, optimizer)
    root = tmp_path / "checkpoints"
    (root / ".step-00000012.tmp-999").mkdir()  # killed while writing step 12
    (root / ".step-00000012.tmp-999" / "weights.safetensors").write_bytes(b"partial")
    (root / ".latest.tmp-999").write_text("step-000")  # killed while replacing the pointer
    (root / ".discarded-step-00000002-999").mkdir()  # killed while pruning step 2
    (tmp_path / ".metrics.jsonl.tmp-999").write_text("{")
    (tmp_path / ".report.md.0123abcd.tmp").write_text("#")
    # Killed while re-saving step 8, between moving the old folder aside and renaming the new
    # one in: the old folder is still the newest checkpoint, and is put back.
    aside = root / ".stale-step-00000008-999"
    os.replace(eight, aside)
    assert checkpoint_folders(tmp_path)[0] == aside
    assert load_newest(tmp_path)[0].trainer["global_step"] == 8
    tidy_run_folder(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-00000004", "step-00000008"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    # When the new folder was in place, the old one aside is deleted; a save tidies too.
    shutil.copytree(eight, aside)
    (root / ".step-00000009.tmp-999").mkdir()
    save(tmp_path, 10, model, optimizer)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-00000008", "step-00000010"]


def test_resaving_a_step_replaces_it(tmp_path):
    model, optimizer = trained_pair("sgd")
    save(tmp_path, 4, model, optimizer, epoch=0)
    path = save(tmp_path, 4, model, optimizer, epoch=1)  # e.g. the epoch's end at the same step
    assert load_checkpoint(path).trainer == {"global_step": 4, "epoch": 1}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [LATEST, path.name]


def test_a_crash_between_the_renames_of_a_resave_keeps_the_earlier_version(tmp_path,
                                                                           monkeypatch):
    model, optimizer = trained_pair("sgd")
    save(tmp_path, 4, model, optimizer, epoch=0)
    real_replace, calls = os.replace, []

    def failing_replace(source: object, target: object) -> None:
        calls.append(Path(str(target)).name)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place
            raise OSError("killed")
        real_replace(source, target)

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="killed"):
        save(tmp_path, 4, model, optimizer, epoch=1)
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert calls[0].startswith(".stale-step-00000004-")
    loaded, _ = load_newest(tmp_path)
    assert loaded is not None and loaded.trainer == {"global_step": 4, "epoch": 0}
    tidy_run_folder(tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "step-00000004").trainer["epoch"] == 0


def test_a_checkpoint_being_pruned_is_never_visible_half_deleted(tmp_path, monkeypatch):
    model, optimizer = trained_pair("sgd")
    save(tmp_path, 1, model, optimizer)
    save(tmp_path, 2, model, optimizer)

    def killed_while_deleting(path: object, *args: object, **kwargs: object) -> None:
        (Path(str(path)) / "weights.safetensors").unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 3, model, optimizer)  # prunes step 1
    monkeypatch.undo()
    folders = checkpoint_folders(tmp_path)
    assert [p.name for p in folders] == ["step-00000003", "step-00000002"]
    for folder in folders:
        verify_checkpoint(folder)
    tidy_run_folder(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        LATEST, "step-00000002", "step-00000003"]


def test_overwrite_refuses_the_working_directory_and_symbolic_links(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "inner").mkdir(parents=True)
    monkeypatch.chdir(run_dir / "inner")
    with pytest.raises(RunFolderError, match=f"run folder {run_dir} holds the working "):
        check_fresh_run_folder(run_dir, overwrite=True, hint="")
    with pytest.raises(RunFolderError, match="holds the working directory"):
        replace_run_folder(run_dir)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(run_dir, target_is_directory=True)
    with pytest.raises(RunFolderError, match=f"run folder {tmp_path / 'link'} is a symbolic "):
        replace_run_folder(tmp_path / "link")
    assert (run_dir / "inner").is_dir()
    replace_run_folder(run_dir)
    assert list(run_dir.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == \
        ["link", "run"]
