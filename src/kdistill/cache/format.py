"""The files of a teacher cache, what identifies one, and how its rows are split into shards.

A cache is a folder:

* ``build.json``, written first: the :class:`CacheSpec` (what the cache answers for: the
  teacher, the data, the taps and how they are stored) and the :class:`ShardPlan`. A rerun of
  an unfinished build continues only when it asks for the same spec, and with this plan;
* ``shard-<i>.safetensors``: rows ``[start, stop)`` of every stored tensor, written through a
  temporary file and ``os.replace``, then ``shard-<i>.json`` (the shard's rows, size, SHA-256
  and the layout of its taps), also atomically. A shard without its ``.json``, or whose bytes
  do not match it, is the one a kill interrupted: it is built again;
* ``manifest.json``, written last, once every shard is in place: the spec, the plan, the taps'
  layout and the shard list with checksums, plus the kdistill version that wrote it. A folder
  without it is an unfinished build.

Why safetensors: no pickle (reading a cache runs no code from it); ``safe_open(...)
.get_tensor`` maps the file into memory without copying, so a step reads only the rows it
gathers (``index_select``); every dtype including bf16; and it is the library that already
writes kdistill's weights and checkpoints, so no new dependency. (A numpy memmap has no bf16
and no header naming the tensors; Arrow would be a new dependency and copies tensors of more
than two dimensions.)

The data's fingerprint hashes what the teacher reads of every sample, in index order: the
``input`` (tensor bytes with dtype and shape, raw text strings, pairs and word lists), the
Hugging Face inputs (``input_ids``, ``attention_mask``...) and any ``batch_inputs`` the teacher
declares (the labels of an oracle teacher); labels the teacher does not read are left out, so
hiding labels does not invalidate a cache. The teacher's fingerprint hashes its ``state_dict``
in key order (names, dtypes, shapes, bytes) and its ``tokenisation`` (a text model's tokenizer
is not in its weights).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from kdistill.checkpoint import file_sha256
from kdistill.errors import KdistillError
from kdistill.taps import HF_INPUT_KEYS

FORMAT = 1
SPEC_FILE = "build.json"
MANIFEST = "manifest.json"
DEFAULT_SHARD_ROWS = 4096
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HINT = "delete the folder to build it anew, or point the cache to another folder"


class CacheError(KdistillError):
    """A teacher cache that cannot be built or read as asked."""


class CacheMismatch(CacheError):
    """A cache built for another teacher, other data or other taps than asked."""


class DamagedCache(CacheError):
    """A cache file that is missing or whose bytes do not match their checksum."""


@dataclass(frozen=True)
class HiddenSlice:
    """The part of a (hidden-state) tap to keep: the token ``positions`` (``None``: every
    position; e.g. ``(0,)`` for a [CLS] token) and the first ``width`` features (``None``: all).
    The cache then answers the tap with the slice, ``[B, len(positions), width]``."""

    positions: tuple[int, ...] | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.positions is not None and (not self.positions or min(self.positions) < 0):
            raise CacheError(f"hidden slice positions must be non-negative token positions, "
                             f"got {self.positions}")
        if self.width is not None and self.width < 1:
            raise CacheError(f"hidden slice width must be at least 1, got {self.width}")


@dataclass(frozen=True)
class LogitSample:
    """Logits stored as ``draws`` tokens sampled from the teacher's distribution with their
    importance weights (random-sampling KD, :class:`kdistill.losses.SampledLogits`): the
    proposal is ``softmax(z / proposal_temperature)``, and the batch of the plan starting at row
    ``start`` is drawn with a generator seeded from ``(seed, start)``, so a rebuilt shard is
    identical."""

    draws: int
    proposal_temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise CacheError(f"sample draws must be at least 1, got {self.draws}")
        if not self.proposal_temperature > 0:
            raise CacheError(f"sample proposal_temperature must be > 0, got "
                             f"{self.proposal_temperature}")
        if not 0 <= self.seed < 2**31:
            raise CacheError(f"sample seed must be in [0, 2**31), got {self.seed}")

    def generator(self, start: int) -> torch.Generator:
        """The generator of the batch whose first row is ``start``: seeded with 32 bits of the
        SHA-256 of both (a CPU generator keeps only the low 32 bits of its seed)."""
        digest = hashlib.sha256(f"kdistill sample {self.seed} {start}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


@dataclass(frozen=True)
class CacheSpec:
    """What a cache answers for: the teacher's and the data's fingerprints (``inputs``: the
    sample keys the data's fingerprint hashes), the taps and how they are stored (``dtype`` of
    float tensors; ``top_k`` or ``sample`` for the logits; hidden slices)."""

    teacher: str
    precision: str
    data: str
    rows: int
    inputs: tuple[str, ...]
    taps: tuple[str, ...]
    dtype: str
    top_k: int | None
    hidden: dict[str, HiddenSlice] = field(default_factory=dict)
    sample: LogitSample | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "taps": list(self.taps), "inputs": list(self.inputs),
                "hidden": {k: asdict(v) for k, v in self.hidden.items()}}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> CacheSpec:
        hidden = {k: HiddenSlice(tuple(v["positions"]) if v["positions"] is not None else None,
                                 v["width"]) for k, v in raw["hidden"].items()}
        return cls(raw["teacher"], raw["precision"], raw["data"], raw["rows"],
                   tuple(raw["inputs"]), tuple(raw["taps"]), raw["dtype"], raw["top_k"], hidden,
                   LogitSample(**raw["sample"]) if raw.get("sample") else None)

    def storage(self) -> str:
        """``fp16, top-32 logits``, ``fp32, 12 sampled logits (proposal T 1.0, seed 0)`` or
        ``fp32, dense logits`` (plus the hidden slices)."""
        logits = (f"top-{self.top_k} logits" if self.top_k else
                  f"{self.sample.draws} sampled logits (proposal T "
                  f"{self.sample.proposal_temperature}, seed {self.sample.seed})" if self.sample
                  else "dense logits")
        slices = f", slices {self.to_json()['hidden']}" if self.hidden else ""
        return f"{self.dtype}, {logits}{slices}"


@dataclass(frozen=True)
class ShardPlan:
    """How the rows are split: shards of ``shard_rows`` rows, each run through the teacher in
    batches of ``batch_size`` (a rerun keeps the plan, so it computes the same batches)."""

    rows: int
    batch_size: int
    shard_rows: int

    def ranges(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of every shard."""
        return [(start, min(start + self.shard_rows, self.rows))
                for start in range(0, self.rows, self.shard_rows)]

    def batches(self, shard: int) -> list[range]:
        """The teacher's batches of shard ``shard``."""
        start, stop = self.ranges()[shard]
        return [range(i, min(i + self.batch_size, stop))
                for i in range(start, stop, self.batch_size)]


def make_plan(rows: int, batch_size: int, shard_rows: int | None) -> ShardPlan:
    """A plan whose shards hold a whole number of batches (about :data:`DEFAULT_SHARD_ROWS`
    rows unless ``shard_rows`` is given)."""
    if batch_size < 1:
        raise CacheError(f"batch_size must be at least 1, got {batch_size}")
    wanted = shard_rows if shard_rows is not None else DEFAULT_SHARD_ROWS
    if wanted < 1:
        raise CacheError(f"shard_rows must be at least 1, got {wanted}")
    return ShardPlan(rows, batch_size, max(1, wanted // batch_size) * batch_size)


def rank_shards(count: int, rank: int, world: int) -> list[int]:
    """The shards process ``rank`` of ``world`` builds: every ``world``-th one from ``rank``
    (striped, so processes share the work evenly even when the last shard is short)."""
    return list(range(rank, count, world))


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def record_name(shard: int) -> str:
    return f"shard-{shard:05d}.json"


# -- fingerprints -----------------------------------------------------------------------------
def _feed(digest: Any, value: Any, where: str) -> None:
    """Add ``value`` to ``digest`` with its type, so that different values never collide."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(json.dumps(["tensor", str(value.dtype), list(value.shape)]).encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, str):
        encoded = value.encode()
        digest.update(f"str {len(encoded)}:".encode() + encoded)
    elif isinstance(value, tuple | list):
        digest.update(f"{type(value).__name__} {len(value)}:".encode())
        for item in value:
            _feed(digest, item, where)
    elif value is None or isinstance(value, bool | int | float):
        digest.update(f"{type(value).__name__} {value!r};".encode())
    else:
        raise CacheError(f"{where} is a {type(value).__name__}; the cache fingerprints tensors, "
                         "strings, numbers and lists or tuples of them")


def teacher_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the teacher's ``state_dict`` in key order (name, dtype, shape and bytes of
    every tensor) and of its ``tokenisation`` (text models), if any."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + b"\0")
        _feed(digest, tensor, f"teacher tensor '{name}'")
    _feed(digest, getattr(model, "tokenisation", None), "the teacher's tokenisation")
    return digest.hexdigest()


def teacher_input_keys(model: nn.Module) -> tuple[str, ...]:
    """The sample keys the teacher reads: ``input``, the Hugging Face inputs and the model's
    ``batch_inputs``."""
    return tuple(dict.fromkeys(("input", *HF_INPUT_KEYS, *getattr(model, "batch_inputs", ()))))


def sample_at(data: Dataset, position: int) -> dict[str, Any]:
    """Sample ``position`` of ``data``: a dict whose ``index`` (when given) is its position,
    the key under which the cache stores its row."""
    item = data[position]
    if not isinstance(item, Mapping):
        raise CacheError(f"data set item {position} is a {type(item).__name__}; the cache needs "
                         "sample dicts (wrap the data set in kdistill.data.IndexedDataset)")
    index = item.get("index", position)
    if int(index) != position:
        raise CacheError(f"data set item {position} has index {int(index)}; the cache stores "
                         "each sample's row under its index and needs index == position")
    return dict(item)


def data_fingerprint(data: Dataset, keys: Sequence[str]) -> str:
    """SHA-256 of the number of samples and, for every sample in index order, the values of
    ``keys`` it has (see the module notes)."""
    digest = hashlib.sha256(f"rows {len(data)};".encode())  # type: ignore[arg-type]
    for position in range(len(data)):  # type: ignore[arg-type]
        sample = sample_at(data, position)
        for key in keys:
            if key in sample:
                digest.update(key.encode() + b"=")
                _feed(digest, sample[key], f"sample {position}'s '{key}'")
    return digest.hexdigest()


# -- comparing what a cache holds with what is asked ------------------------------------------
def spec_differences(found: CacheSpec, wanted: CacheSpec) -> list[str]:
    """What differs between the spec of a cache (``found``) and the one asked (``wanted``),
    one phrase each. A cache holding more taps than asked, stored alike, fits."""
    differences = []
    if found.teacher != wanted.teacher:
        differences.append(f"the teacher differs (weights sha256 {found.teacher[:12]} in the "
                           f"cache, {wanted.teacher[:12]} here)")
    if found.precision != wanted.precision:
        differences.append(f"the teacher's precision differs ({found.precision} in the cache, "
                           f"{wanted.precision} here)")
    # Not ``inputs``, the keys the teacher may read: the fingerprint names those the samples
    # have, so a key added to them that the data lacks leaves a cache fitting.
    if (found.data, found.rows) != (wanted.data, wanted.rows):
        differences.append(f"the data differ ({found.rows} samples, sha256 {found.data[:12]} "
                           f"in the cache; {wanted.rows} samples, sha256 {wanted.data[:12]} "
                           "here)")
    missing = [t for t in wanted.taps if t not in found.taps]
    if missing:
        differences.append(f"the taps differ (the cache holds {list(found.taps)}, not "
                           f"{missing})")
    if ((found.dtype, found.top_k, found.hidden, found.sample)
            != (wanted.dtype, wanted.top_k, wanted.hidden, wanted.sample)):
        differences.append(f"the storage differs ({found.storage()} in the cache, "
                           f"{wanted.storage()} asked)")
    return differences


def refuse_differences(path: Path, differences: Iterable[str]) -> None:
    """Raise :class:`CacheMismatch` listing ``differences`` (if any) and what to do."""
    found = list(differences)
    if found:
        raise CacheMismatch(f"teacher cache {path} does not fit: {'; '.join(found)}; {HINT}")


# -- reading and checking the files -----------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object of the cache, or :class:`DamagedCache` naming the file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DamagedCache(f"teacher cache file {path} is unreadable: {error}") from None
    if not isinstance(raw, dict):
        raise DamagedCache(f"teacher cache file {path} does not hold a JSON object")
    return raw


def read_spec(path: Path) -> tuple[CacheSpec, ShardPlan] | None:
    """The spec and plan of the cache in folder ``path`` (from its manifest, else from the
    ``build.json`` of an unfinished build); ``None`` when neither exists."""
    for name in (MANIFEST, SPEC_FILE):
        if (path / name).is_file():
            raw = read_json(path / name)
            if raw.get("format") != FORMAT:
                raise CacheMismatch(f"teacher cache {path} has format {raw.get('format')}, "
                                    f"this kdistill reads format {FORMAT}; {HINT}")
            try:
                return CacheSpec.from_json(raw["spec"]), ShardPlan(**raw["plan"])
            except (KeyError, TypeError, ValueError) as error:
                raise DamagedCache(f"teacher cache file {path / name} is malformed: "
                                   f"{error!r}") from None
    return None


def shard_problem(folder: Path, record: Mapping[str, Any]) -> str | None:
    """Why the shard ``record`` describes is not intact (missing, other size, other SHA-256),
    or ``None``."""
    path = folder / record["file"]
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{path} has {size} bytes, {record['bytes']} were written"
    if file_sha256(path) != record["sha256"]:
        return f"{path} fails its SHA-256 check"
    return None
