""":class:`CachedTeacher`: a teacher source that answers from a teacher cache."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.cache.format import HINT, CacheError, CacheMismatch
from kdistill.cache.store import TeacherCache
from kdistill.taps import Taps
from kdistill.teachers import FrozenTeacher, TeacherSource, as_source


class CachedTeacher(TeacherSource):
    """The teacher's taps of each training sample, read from a :class:`TeacherCache` by the
    batch's ``index``: the teacher ran once, when the cache was built.

    It serves every recipe whose teacher is frozen and reads the samples as stored; the engine
    refuses the others (:meth:`kdistill.recipes.base.Recipe.teacher_signal_varies`: augmented
    or noisy teacher inputs, online peers, an EMA of the student). It knows only the samples it
    was built on: ``live`` (the same teacher, a model or a source) answers the end-of-epoch
    evaluation's agreement with the teacher; without it there is no agreement metric. Taps come
    on the bound device, float32 (dense), as :class:`kdistill.losses.TopKLogits` (a cache of
    top-k logits), :class:`kdistill.losses.SampledLogits` (sampled logits) or as
    :class:`kdistill.losses.TokenSlice` (slice taps). With a dense fp32
    cache, training equals training with the live teacher.
    """

    def __init__(self, cache: TeacherCache | str | Path,
                 live: nn.Module | TeacherSource | None = None):
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache.open(cache)
        self.live = as_source(live)
        if isinstance(self.live, FrozenTeacher):
            self.cache.check(teacher=self.live.model)
        self.names: tuple[str, ...] = ()
        self.device = torch.device("cpu")

    @property
    def static(self) -> bool:
        return True

    @property
    def answers_by_index(self) -> bool:
        return True

    def evaluation_source(self) -> TeacherSource | None:
        return self.live

    def bind(self, tap_names: Iterable[str], device: torch.device) -> None:
        names = tuple(dict.fromkeys(tap_names))
        missing = [name for name in names if name not in self.cache.taps]
        if missing:
            raise CacheMismatch(f"teacher cache {self.cache.path} holds the taps "
                                f"{list(self.cache.taps)}, not {missing}, which the recipe "
                                f"reads; build it with those taps too: {HINT}")
        self.names, self.device = names, device
        if self.live is not None:
            self.live.bind(["logits"], device)

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        if not self.names:
            raise RuntimeError("CachedTeacher.bind must be called before the teacher is used")
        index = batch.get("index")
        if not isinstance(index, Tensor):
            raise CacheError(f"a teacher cache answers samples by their 'index' and the batch "
                             f"has none (keys: {sorted(batch)})")
        rows = index.reshape(-1).long().cpu()
        outside = rows[(rows < 0) | (rows >= self.cache.rows)]
        if len(outside):
            raise CacheError(f"sample index {int(outside[0])} is outside the {self.cache.rows} "
                             f"samples of teacher cache {self.cache.path}: it holds the "
                             "teacher's answers for the data it was built on only")
        values = {name: self.cache.read(name, rows, batch, self.device) for name in self.names}
        return Taps(values, batch.get("attention_mask"))  # type: ignore[arg-type]

    def close(self) -> None:
        if self.live is not None:
            self.live.close()
