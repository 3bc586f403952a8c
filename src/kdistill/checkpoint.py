"""Atomic checkpoints: safetensors for every tensor, JSON for everything else, no pickle.

A checkpoint is a folder ``<run>/checkpoints/step-<N>/`` written under a temporary name and
renamed into place, then named in ``<run>/checkpoints/latest`` (itself replaced atomically). A
crash or a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
PREFIX = "step-"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """``safetensors`` save through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def split_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer ``state_dict`` -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    """Inverse of :func:`split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch, numpy and Python random states, split into tensors and JSON."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(),
               "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
               "python": torch.tensor(internal, dtype=torch.int64)}
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [version, gauss]}
    return tensors, meta


def restore_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["torch"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         cached))
    version, gauss = meta["python"]
    random.setstate((version, tuple(int(v) for v in tensors["python"].tolist()), gauss))


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    trainer: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    rng_meta: dict[str, Any]


def save_checkpoint(run_dir: Path, step: int, *, weights: Mapping[str, torch.Tensor],
                    optimizer: Mapping[str, Any], scheduler: Mapping[str, Any],
                    trainer: Mapping[str, Any], keep: int = 2) -> Path:
    """Write a checkpoint for ``step`` atomically and keep the newest ``keep`` of them."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{PREFIX}{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        opt_tensors, opt_meta = split_optimizer_state(optimizer)
        rng_tensors, rng_meta = capture_rng()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  str(tmp / "weights.safetensors"))
        save_file({k: v.cpu().contiguous() for k, v in opt_tensors.items()},
                  str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        meta = {"optimizer": opt_meta, "scheduler": dict(scheduler), "trainer": dict(trainer),
                "rng": rng_meta}
        (tmp / "state.json").write_text(json.dumps(meta))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        stale = root / f".stale-{final.name}-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name)
    _prune(root, step, keep)
    return final


def _step_of(path: Path) -> int | None:
    suffix = path.name[len(PREFIX):]
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``; later ones (left by an earlier,
    longer run in the same folder) are stale and go too."""
    steps = sorted((s, p) for p in root.glob(f"{PREFIX}*")
                   if p.is_dir() and (s := _step_of(p)) is not None)
    current = [p for s, p in steps if s <= step]
    for old in current[:-keep] + [p for s, p in steps if s > step]:
        shutil.rmtree(old, ignore_errors=True)


def clear_checkpoints(run_dir: Path) -> None:
    """Remove every checkpoint of ``run_dir`` (the ``latest`` pointer first)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    (root / LATEST).unlink(missing_ok=True)
    for path in root.glob(f"{PREFIX}*"):
        if path.is_dir() and _step_of(path) is not None:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named in ``checkpoints/latest``, or None."""
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`."""
    meta = json.loads((path / "state.json").read_text())
    return Checkpoint(
        path=path,
        weights=load_file(str(path / "weights.safetensors")),
        optimizer=join_optimizer_state(load_file(str(path / "optimizer.safetensors")),
                                       meta["optimizer"]),
        scheduler=meta["scheduler"],
        trainer=meta["trainer"],
        rng_tensors=load_file(str(path / "rng.safetensors")),
        rng_meta=meta["rng"],
    )
