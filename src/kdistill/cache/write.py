"""Building a teacher cache's files: the frozen teacher run once over the data, shard by shard.

Each shard is written atomically and then recorded (``shard-<i>.json``), so a kill loses at
most the shard in flight; a rerun skips every shard whose bytes match its record and builds
the others (a damaged one is named in a warning). The batches of a shard are fixed by the
plan, so a resumed build writes the same bytes as an uninterrupted one. Under ``torchrun``
(``torch.distributed`` initialised) process ``r`` of ``w`` builds shards ``r, r + w, ...``
and, after a barrier, process 0 checks every record and writes the manifest; the folder must
be one that every process sees (one machine, or a shared file system).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kdistill import __version__
from kdistill.batch import collate, to_device
from kdistill.cache.encode import TapLayout, TapStorage, assemble, encode_tap, value_keys
from kdistill.cache.format import (
    FORMAT,
    MANIFEST,
    SPEC_FILE,
    CacheError,
    CacheSpec,
    ShardPlan,
    rank_shards,
    read_json,
    record_name,
    sample_at,
    shard_name,
    shard_problem,
)
from kdistill.checkpoint import atomic_save_tensors, atomic_write_text, file_sha256
from kdistill.progress import TrainingProgress
from kdistill.taps import Taps
from kdistill.teachers import FrozenTeacher

logger = logging.getLogger("kdistill")


def process_group() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    if process_group()[1] > 1:
        torch.distributed.barrier()


class TeacherRun:
    """The frozen teacher bound to the cache's taps on ``device``; a call gives a batch's taps
    and the teacher's own token mask (a model that tokenises raw text reports it in its output
    as ``attention_mask``), caught by a forward hook on the model."""

    def __init__(self, source: FrozenTeacher, taps: tuple[str, ...], device: torch.device):
        self.source, self.device = source, device
        self.token_mask: torch.Tensor | None = None
        source.bind(taps, device)
        self.hook = source.model.register_forward_hook(self._catch)

    def _catch(self, _module: torch.nn.Module, _args: Any, output: Any) -> None:
        mask = output.get("attention_mask") if isinstance(output, Mapping) else None
        self.token_mask = mask if isinstance(mask, torch.Tensor) else None

    def __call__(self, batch: Mapping[str, Any]) -> tuple[Taps, torch.Tensor | None]:
        self.token_mask = None
        taps = self.source(to_device(batch, self.device))
        return taps, self.token_mask

    def close(self) -> None:
        self.hook.remove()
        self.source.close()


def shard_intact(folder: Path, shard: int, plan: ShardPlan) -> bool:
    """Whether shard ``shard`` is recorded with the plan's rows and its bytes match the record;
    a recorded shard that fails its check is named in a warning (it will be built again)."""
    path = folder / record_name(shard)
    if not path.is_file():
        return False
    try:
        record = read_json(path)
        rows = list(plan.ranges()[shard])
        problem = "its record names other rows" if record.get("rows") != rows else \
            shard_problem(folder, record)
    except (CacheError, KeyError, TypeError) as error:
        problem = f"its record is unreadable ({error})"
    if problem is not None:
        logger.warning("teacher cache %s: shard %d is damaged (%s); building it again", folder,
                       shard, problem)
    return problem is None


def write_cache(source: FrozenTeacher, data: Dataset, spec: CacheSpec, plan: ShardPlan,
                folder: Path, *, progress: bool, device: torch.device) -> int:
    """Build every missing or damaged shard of ``folder`` (this process's share of them), then
    the manifest; returns how many shards this process built."""
    rank, world = process_group()
    if rank == 0 and not (folder / MANIFEST).exists() and not (folder / SPEC_FILE).exists():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / SPEC_FILE, json.dumps(
            {"format": FORMAT, "spec": spec.to_json(), "plan": asdict(plan)}, indent=2))
    barrier()
    mine = rank_shards(len(plan.ranges()), rank, world)
    todo = [shard for shard in mine if not shard_intact(folder, shard, plan)]
    storages = [TapStorage(name, spec.dtype, spec.top_k if name == "logits" else None,
                           spec.hidden.get(name), spec.sample if name == "logits" else None)
                for name in spec.taps]
    bar = TrainingProgress(enabled=progress and rank == 0)
    total = sum(len(plan.batches(shard)) for shard in mine)
    bar.start_phase("teacher cache", total, total - sum(len(plan.batches(s)) for s in todo))
    run = TeacherRun(source, spec.taps, device) if todo else None
    try:
        for shard in todo:
            write_shard(run, data, plan, shard, storages, folder, bar)  # type: ignore[arg-type]
    finally:
        bar.stop()
        if run is not None:
            run.close()
    barrier()
    if rank == 0:
        write_manifest(folder, spec, plan)
    barrier()
    return len(todo)


def write_shard(run: TeacherRun, data: Dataset, plan: ShardPlan, shard: int,
                storages: list[TapStorage], folder: Path, bar: TrainingProgress) -> None:
    """Run the teacher over the batches of ``shard``; write the shard, then its record."""
    parts: list[dict[str, torch.Tensor]] = []
    layouts: dict[str, TapLayout] = {}
    for rows in plan.batches(shard):
        taps, token_mask = run(collate([sample_at(data, i) for i in rows]))
        encoded: dict[str, torch.Tensor] = {}
        for storage in storages:
            generator = storage.sample.generator(rows.start) if storage.sample else None
            stored, layout = encode_tap(storage, taps[storage.name], taps.mask, token_mask,
                                        generator)
            if layouts.setdefault(storage.name, layout) != layout:
                raise CacheError(f"tap '{storage.name}' is laid out as "
                                 f"{layouts[storage.name].to_json()} in one batch and as "
                                 f"{layout.to_json()} in another; it cannot be cached")
            encoded.update(stored)
        parts.append(encoded)
        bar.advance({})
    padded = {key for s in storages if layouts[s.name].layout is not None
              for key in value_keys(s.name, layouts[s.name])}
    path = folder / shard_name(shard)
    for stale in folder.glob(f".{path.name}.tmp-*"):  # left by a killed build
        stale.unlink(missing_ok=True)
    atomic_save_tensors(assemble(parts, padded), path)
    record = {"file": path.name, "rows": list(plan.ranges()[shard]),
              "bytes": path.stat().st_size, "sha256": file_sha256(path),
              "taps": {name: layout.to_json() for name, layout in layouts.items()}}
    atomic_write_text(folder / record_name(shard), json.dumps(record, indent=2))


def write_manifest(folder: Path, spec: CacheSpec, plan: ShardPlan) -> None:
    """Check that every shard is recorded with the same tap layouts; write ``manifest.json``
    (unless it already says exactly that)."""
    records = []
    for shard, rows in enumerate(plan.ranges()):
        path = folder / record_name(shard)
        if not path.is_file():
            raise CacheError(f"teacher cache {folder}: shard {shard} was not built; run the "
                             "build again")
        records.append(read_json(path))
        if records[-1].get("rows") != list(rows):
            raise CacheError(f"teacher cache {folder}: {path.name} names rows "
                             f"{records[-1].get('rows')}, the plan {list(rows)}")
    taps = records[0]["taps"]
    for record in records[1:]:
        if record["taps"] != taps:
            raise CacheError(f"teacher cache {folder}: the taps are laid out as {taps} in "
                             f"{records[0]['file']} and as {record['taps']} in "
                             f"{record['file']}")
    manifest = json.dumps({"format": FORMAT, "kdistill": __version__, "spec": spec.to_json(),
                           "plan": asdict(plan), "taps": taps,
                           "shards": [{k: r[k] for k in ("file", "rows", "bytes", "sha256")}
                                      for r in records]}, indent=2)
    path = folder / MANIFEST
    if not path.is_file() or path.read_text() != manifest:  # a reused cache is left untouched
        atomic_write_text(path, manifest)
