""":class:`TeacherCache`: build a teacher cache once, then read its rows by sample index."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdistill.cache.encode import LENGTH, TapLayout, answer_length, as_taps, pad_to, value_keys
from kdistill.cache.format import (
    DTYPES,
    HINT,
    MANIFEST,
    SPEC_FILE,
    CacheError,
    CacheSpec,
    DamagedCache,
    HiddenSlice,
    LogitSample,
    data_fingerprint,
    make_plan,
    read_json,
    read_spec,
    refuse_differences,
    shard_problem,
    spec_differences,
    teacher_fingerprint,
    teacher_input_keys,
)
from kdistill.cache.write import write_cache
from kdistill.losses import SampledLogits, TokenSlice, TopKLogits
from kdistill.teachers import FrozenTeacher


def default_device() -> torch.device:
    """The current GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TeacherCache:
    """A built teacher cache (see :mod:`kdistill.cache`), its shards memory-mapped.

    :meth:`build` makes one (or reuses or finishes one); :meth:`open` opens one;
    :meth:`read` gathers the rows of one tap for some sample indices. ``build_seconds`` is how
    long :meth:`build` ran the teacher (``None`` when the cache was reused as it was).
    """

    def __init__(self, path: Path, manifest: Mapping[str, Any]):
        self.path = path
        self.spec = CacheSpec.from_json(manifest["spec"])
        self.layouts = {name: TapLayout.from_json(entry)
                        for name, entry in manifest["taps"].items()}
        self.shards = list(manifest["shards"])
        self.starts = torch.tensor([shard["rows"][0] for shard in self.shards])
        # safe_open maps each file; get_tensor hands out tensors over the map, copying nothing.
        # (A safe_open handle is not iterable: its keys() are listed.)
        self._files = [safe_open(str(path / shard["file"]), framework="pt")
                       for shard in self.shards]
        self._tensors = [{key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
                         for f in self._files]
        self.build_seconds: float | None = None

    @property
    def rows(self) -> int:
        return self.spec.rows

    @property
    def taps(self) -> tuple[str, ...]:
        return self.spec.taps

    @property
    def nbytes(self) -> int:
        """The size of the shard files."""
        return sum(shard["bytes"] for shard in self.shards)

    @classmethod
    def open(cls, path: str | Path, *, teacher: nn.Module | None = None,
             data: Dataset | None = None, taps: Iterable[str] = (),
             verify: bool = True) -> TeacherCache:
        """Open the cache in folder ``path``, refusing it (:class:`CacheMismatch`) when it was
        built for another ``teacher`` or other ``data`` or lacks one of ``taps`` (each checked
        when given). ``verify`` checks every shard's SHA-256 (:class:`DamagedCache` names a
        damaged one)."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            unfinished = (path / SPEC_FILE).is_file()
            raise CacheError(f"teacher cache {path} is an unfinished build (no {MANIFEST}); run "
                             "the build again to finish it" if unfinished else
                             f"no teacher cache in {path} (no {MANIFEST})")
        read_spec(path)  # checks the format
        manifest = read_json(path / MANIFEST)
        if verify:
            for shard in manifest["shards"]:
                problem = shard_problem(path, shard)
                if problem is not None:
                    raise DamagedCache(f"teacher cache {path} is damaged: {problem}; run the "
                                       f"build again to rebuild that shard, or {HINT}")
        try:
            cache = cls(path, manifest)
        except (KeyError, TypeError, ValueError, OSError, SafetensorError) as error:
            raise DamagedCache(f"teacher cache {path} cannot be read: {error!r}; {HINT}") from None
        cache.check(teacher=teacher, data=data, taps=taps)
        return cache

    def check(self, *, teacher: nn.Module | None = None, data: Dataset | None = None,
              taps: Iterable[str] = ()) -> None:
        """Raise :class:`CacheMismatch` when ``teacher``, ``data`` or ``taps`` (those given)
        are not what the cache was built for."""
        wanted: dict[str, Any] = {"taps": tuple(taps) or self.spec.taps}
        if teacher is not None:
            wanted["teacher"] = teacher_fingerprint(teacher)
        if data is not None:
            wanted["data"] = data_fingerprint(data, self.spec.inputs)
            wanted["rows"] = len(data)  # type: ignore[arg-type]
        refuse_differences(self.path, spec_differences(
            self.spec, dataclasses.replace(self.spec, **wanted)))

    @classmethod
    def build(cls, teacher: nn.Module | FrozenTeacher, data: Dataset, taps: Sequence[str],
              path: str | Path, *, batch_size: int, dtype: str = "fp32",
              top_k: int | None = None, sample: LogitSample | None = None,
              hidden: Mapping[str, HiddenSlice] | None = None, progress: bool = True,
              shard_rows: int | None = None,
              device: str | torch.device | None = None) -> TeacherCache:
        """Run the frozen ``teacher`` once over ``data`` and store what ``taps`` need, keyed by
        sample index, in folder ``path``; return the opened cache.

        ``teacher``: a model (run in eval mode under ``torch.inference_mode``) or a
        :class:`FrozenTeacher` (its precision is kept). ``data``: sample dicts whose ``index``
        is their position (raw text batches too: samples are collated with
        :func:`kdistill.batch.collate`). ``taps``: tap names; ``logits`` is always stored (the
        engine binds every teacher to it). ``dtype``: ``fp32``, ``fp16`` or ``bf16`` for the
        stored float tensors. ``top_k``: store the logits as their k largest values plus the
        tail's mass (:class:`kdistill.losses.TopKLogits`). ``sample``: store them as tokens
        drawn from the teacher's distribution with importance weights
        (:class:`kdistill.losses.SampledLogits`, random-sampling KD). ``hidden``: a
        :class:`HiddenSlice` per tap to keep only some positions or features of it.
        ``shard_rows``: rows per shard (rounded to whole batches). ``device``: where the teacher
        runs (default the GPU if any).

        A complete cache in ``path`` built for the same teacher, data, taps and storage is
        reused as it is, once every shard's checksum is verified (which reads the cache once; a
        damaged shard is built again); an unfinished build is continued with the plan it
        started with (its batch size and shard size); a cache built for anything else is
        refused (:class:`CacheMismatch`), saying what differs. Checking that a cache fits runs
        no teacher, but hashes the teacher's weights and every sample's inputs.
        """
        source = teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        wanted = build_spec(source, data, taps, dtype, top_k, hidden, sample)
        path = Path(path)
        found = read_spec(path)
        if found is not None:
            refuse_differences(path, spec_differences(found[0], wanted))
        spec, plan = found if found is not None else (wanted, make_plan(wanted.rows, batch_size,
                                                                        shard_rows))
        started = time.monotonic()
        built = write_cache(source, data, spec, plan, path, progress=progress,
                            device=torch.device(device) if device is not None
                            else default_device())
        cache = cls.open(path, verify=False)  # every shard was just checked or written
        cache.build_seconds = time.monotonic() - started if built else None
        return cache

    def read(self, tap: str, rows: Tensor, batch: Mapping[str, Any],
             device: torch.device) -> Tensor | TopKLogits | SampledLogits | TokenSlice:
        """Tap ``tap`` of the samples ``rows`` (int64 indices on the CPU), as the teacher
        answers ``batch``, on ``device`` (see :mod:`kdistill.cache.encode`)."""
        layout = self.layouts[tap]
        shard_of = torch.searchsorted(self.starts, rows, right=True) - 1
        length = None
        if layout.layout is not None:
            lengths = self._gather(tap + LENGTH, rows, shard_of, None)
            length = answer_length(tap, layout.layout, lengths, batch)
        gathered = {key: self._gather(key, rows, shard_of, length)
                    for key in value_keys(tap, layout)}
        return as_taps(gathered, tap, layout, device)

    def _gather(self, key: str, rows: Tensor, shard_of: Tensor, length: int | None) -> Tensor:
        """Rows ``rows`` of the stored tensor ``key``, each read from its shard in one
        ``index_select`` per shard; sequence rows padded or cut to ``length``."""
        out: Tensor | None = None
        for shard in shard_of.unique().tolist():
            where = torch.nonzero(shard_of == shard).flatten()
            part = self._tensors[shard][key].index_select(0, rows[where] - self.starts[shard])
            if length is not None:
                part = pad_to(part, length)
            if out is None:
                out = part.new_zeros((len(rows), *part.shape[1:]))
            out.index_copy_(0, where, part)
        if out is None:
            raise CacheError("no rows asked of the teacher cache")
        return out


def build_spec(source: FrozenTeacher, data: Dataset, taps: Sequence[str], dtype: str,
               top_k: int | None, hidden: Mapping[str, HiddenSlice] | None,
               sample: LogitSample | None = None) -> CacheSpec:
    """The spec of a cache of ``source`` on ``data``, its arguments checked."""
    if dtype not in DTYPES:
        raise CacheError(f"cache dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
    if top_k is not None and top_k < 1:
        raise CacheError(f"top_k must be at least 1, got {top_k}")
    if top_k is not None and sample is not None:
        raise CacheError(f"the logits are stored either as the top-{top_k} or as "
                         f"{sample.draws} sampled tokens, not both: give top_k or sample")
    names = tuple(dict.fromkeys(["logits", *taps]))
    hidden = dict(hidden or {})
    for name in hidden:
        if name not in names or name == "logits":
            raise CacheError(f"hidden slice for '{name}': slices apply to the cached taps other "
                             f"than logits ({[n for n in names if n != 'logits']})")
    if len(data) == 0:  # type: ignore[arg-type]
        raise CacheError("the data set is empty: there is nothing to cache")
    inputs = teacher_input_keys(source.model)
    return CacheSpec(teacher_fingerprint(source.model), source.precision,
                     data_fingerprint(data, inputs), len(data),  # type: ignore[arg-type]
                     inputs, names, dtype, top_k, hidden, sample)
