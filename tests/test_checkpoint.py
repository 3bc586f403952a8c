"""Checkpoints: optimizer and RNG round trips, the ``latest`` pointer, atomic writes, pruning."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdistill.checkpoint as checkpoint_module
from kdistill import Distiller
from kdistill.checkpoint import (
    LATEST,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
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
