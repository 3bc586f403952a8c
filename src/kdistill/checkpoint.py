"""Atomic, verified checkpoints: safetensors for every tensor, JSON for everything else, no
pickle; and the rules of a run folder (fresh, replaced or resumed).

A checkpoint is a folder ``<run>/checkpoints/step-<N>/`` written under a temporary name
(``.step-<N>.tmp-<pid>``): the tensors, ``state.json`` and, last, ``manifest.json`` with the
size and SHA-256 of every other file; then renamed into place. Re-saving a step that exists
(the end-of-epoch checkpoint at a step that ``checkpoint_every`` already saved) first moves the
old folder aside as ``.stale-step-<N>-<pid>``, so a kill between the two renames leaves it to be
restored. ``checkpoints/latest`` names the newest folder for people and other tools; kdistill
never follows it: the checkpoints are found by scanning the ``step-*`` folders, newest first,
and the first whose files match its manifest is used (a damaged one is named and skipped). A
crash or a kill at any moment leaves every earlier checkpoint intact.
"""

from __future__ import annotations

import hashlib
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

from kdistill.errors import KdistillError

LATEST = "latest"
PREFIX = "step-"
MANIFEST = "manifest.json"
FILES = ("weights.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
FORMAT = 1
TEMPORARY = f".{PREFIX}"  # .step-<N>.tmp-<pid>: a checkpoint being written
STALE = ".stale-"  # .stale-step-<N>-<pid>: the previous version of a step being re-saved
DISCARDED = ".discarded-"  # .discarded-step-<N>-<pid>: a pruned checkpoint being deleted


class RunFolderError(KdistillError):
    """A run folder that cannot be used as asked: a fresh run into an earlier run's folder,
    nothing (intact) to resume, or a resume whose settings differ from the run's."""


class DamagedCheckpoint(RunFolderError):
    """A checkpoint folder whose files do not match its manifest or cannot be read."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} is damaged ({reason})")
        self.path, self.reason = path, reason


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




def step_name(step: int) -> str:
    """The folder name of the checkpoint of ``step``: ``step-00000042``."""
    return f"{PREFIX}{step:08d}"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, step: int, *, weights: Mapping[str, torch.Tensor],
                    optimizer: Mapping[str, Any], scheduler: Mapping[str, Any],
                    trainer: Mapping[str, Any], keep: int = 2) -> Path:
    """Write a checkpoint for ``step`` atomically and keep the newest ``keep`` of them.

    The files go into a temporary folder, the manifest (size and SHA-256 of each) last; the
    folder is then renamed into place. What an earlier save left behind when it was killed
    (temporary folders, a folder moved aside) is tidied first.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tidy_checkpoints(run_dir)
    final = root / step_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
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
        files = {name: {"bytes": (tmp / name).stat().st_size,
                        "sha256": file_sha256(tmp / name)} for name in FILES}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step,
                                                "files": files}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a directory cannot be replaced in one rename: move the old one aside
        stale = root / f"{STALE}{final.name}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name)
    _prune(root, step, keep)
    return final


def _step_of(path: Path) -> int | None:
    suffix = path.name[len(PREFIX):]
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``; later ones are stale (damaged ones
    a resume skipped) and go too."""
    steps = sorted((s, p) for p in root.glob(f"{PREFIX}*")
                   if not p.is_symlink() and p.is_dir() and (s := _step_of(p)) is not None)
    current = [p for s, p in steps if s <= step]
    for old in current[:-keep] + [p for s, p in steps if s > step]:
        # Renamed first: a kill during the deletion leaves no half-deleted step folder.
        doomed = root / f"{DISCARDED}{old.name}-{os.getpid()}"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def tidy_checkpoints(run_dir: Path) -> None:
    """Clean up after a save that was killed: temporary checkpoint folders and pointer files
    and pruned folders being deleted are removed; a step folder moved aside
    (``.stale-step-<N>-<pid>``) is deleted when its replacement is in place and renamed back
    when the kill came before that."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        name = path.name
        if name.startswith(STALE):
            original = _stale_original(root, name)
            if original is not None and not original.exists() and not path.is_symlink():
                os.replace(path, original)
            else:
                _remove(path)
        elif name.startswith(DISCARDED) or (
                name.startswith((TEMPORARY, f".{LATEST}.")) and ".tmp" in name):
            _remove(path)


def tidy_run_folder(run_dir: Path) -> None:
    """:func:`tidy_checkpoints` and remove the temporary files of atomic writes
    (``.<name>.tmp-<pid>``, ``.<name>.<hex>.tmp``) that a kill left in ``run_dir``."""
    if run_dir.is_dir():
        for path in run_dir.glob(".*"):
            if path.is_file() and (".tmp-" in path.name or path.name.endswith(".tmp")):
                path.unlink(missing_ok=True)
    tidy_checkpoints(run_dir)


def _stale_original(root: Path, name: str) -> Path | None:
    """The step folder that ``.stale-step-<N>-<pid>`` stood for (None for other names)."""
    if not name.startswith(STALE):
        return None
    original = root / name[len(STALE):].rsplit("-", 1)[0]
    return original if _step_of(original) is not None else None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The checkpoint folders of ``run_dir/checkpoints``, newest first: every ``step-<N>``
    folder, and a step folder moved aside by a save killed before its replacement was in
    place (which :func:`tidy_checkpoints` renames back). Symbolic links and anything else are
    ignored: a run only ever reads its own checkpoints."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in sorted(root.iterdir()):
        if path.is_symlink() or not path.is_dir():
            continue
        original = _stale_original(root, path.name)
        if original is not None and not original.exists():
            found.setdefault(int(original.name[len(PREFIX):]), path)
        elif (step := _step_of(path)) is not None:
            found[step] = path
    return [found[step] for step in sorted(found, reverse=True)]


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`DamagedCheckpoint` unless every file of ``path`` has the size and SHA-256
    its manifest gives."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint(path, f"{MANIFEST} is missing") from None
    except (OSError, ValueError) as error:
        raise DamagedCheckpoint(path, f"{MANIFEST} is unreadable: {error}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    original = _stale_original(path.parent, path.name)
    step = _step_of(original if original is not None else path)
    if not isinstance(files, dict) or manifest.get("step") != step:
        raise DamagedCheckpoint(path, f"{MANIFEST} does not describe this step")
    for name in FILES:
        entry = files.get(name)
        if not isinstance(entry, dict):
            raise DamagedCheckpoint(path, f"{MANIFEST} does not list {name}")
        try:
            size = (path / name).stat().st_size
            if size != entry.get("bytes"):
                raise DamagedCheckpoint(path, f"{name} has {size} bytes, {entry.get('bytes')} "
                                              "were written")
            if file_sha256(path / name) != entry.get("sha256"):
                raise DamagedCheckpoint(path, f"{name} fails its SHA-256 check")
        except FileNotFoundError:
            raise DamagedCheckpoint(path, f"{name} is missing") from None
        except OSError as error:
            raise DamagedCheckpoint(path, f"{name} is unreadable: {error}") from None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`, after checking every file
    against its manifest (:class:`DamagedCheckpoint` otherwise)."""
    verify_checkpoint(path)
    try:
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
    except Exception as error:  # safetensors and json raise several types for bad files
        raise DamagedCheckpoint(path, f"cannot be read: {error}") from None


def load_newest(run_dir: Path) -> tuple[Checkpoint | None, list[DamagedCheckpoint]]:
    """The newest intact checkpoint of ``run_dir`` (None if there is none) and the damaged
    newer ones that were skipped, newest first."""
    damaged: list[DamagedCheckpoint] = []
    for path in checkpoint_folders(run_dir):
        try:
            return load_checkpoint(path), damaged
        except DamagedCheckpoint as error:
            damaged.append(error)
    return None, damaged


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder of the newest intact checkpoint of ``run_dir`` (see :func:`load_newest`), or
    None. Found by scanning the checkpoint folders; the ``latest`` pointer is not read."""
    checkpoint, _ = load_newest(run_dir)
    return checkpoint.path if checkpoint is not None else None


# -- the run folder ---------------------------------------------------------------------------
def run_folder_entries(run_dir: Path) -> list[str]:
    """The sorted names in ``run_dir`` (none when it does not exist)."""
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []


def check_fresh_run_folder(run_dir: Path, *, overwrite: bool, hint: str) -> None:
    """Raise :class:`RunFolderError` unless a new run may start in ``run_dir``: it is absent or
    empty, or ``overwrite`` allows replacing it (``hint`` says how to continue or replace)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file, not a folder")
    entries = run_folder_entries(run_dir)
    if entries and not overwrite:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise RunFolderError(f"run folder {run_dir} already holds a run ({shown}); {hint}")
    if entries:
        _check_replaceable(run_dir)


def _check_replaceable(run_dir: Path) -> None:
    if run_dir.is_symlink():
        raise RunFolderError(f"run folder {run_dir} is a symbolic link; name the folder itself "
                             "to replace it")
    here, target = Path.cwd().resolve(), run_dir.resolve()
    if here == target or here.is_relative_to(target):
        raise RunFolderError(f"run folder {run_dir} holds the working directory; it cannot be "
                             "replaced")


def replace_run_folder(run_dir: Path) -> None:
    """Give a new run an empty ``run_dir``: an earlier folder is renamed aside
    (``.<name>.replaced-<pid>`` next to it) and then deleted, so a kill leaves the earlier run
    whole or the new folder empty (a sibling left aside is deleted by the next replacement)."""
    for old in run_dir.parent.glob(f".{run_dir.name}.replaced-*"):
        _remove(old)
    if run_folder_entries(run_dir):
        _check_replaceable(run_dir)
        aside = run_dir.parent / f".{run_dir.name}.replaced-{os.getpid()}"
        os.replace(run_dir, aside)
        run_dir.mkdir()
        shutil.rmtree(aside)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
