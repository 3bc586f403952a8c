"""Teacher-signal cache: run a frozen teacher once over the training data, then train the
student at its own speed.

Every method that reads a frozen teacher on inputs that do not change (Hinton KD, DKD,
FitNets, DeiT...) can read the teacher's taps of each sample from disk instead of running the
teacher at every step of every epoch. :meth:`TeacherCache.build` runs the teacher once and
stores, keyed by sample index, what the taps need (dense logits in fp32, fp16 or bf16; or top-k
logits plus the tail's mass, or tokens sampled from the teacher with importance weights; pooled
embeddings; hidden states, whole or sliced by position and width; slice taps as their positions
and kept entries); :class:`CachedTeacher` is the teacher source that reads them back::

    cache = TeacherCache.build(teacher, train, ["logits"], "cache/teacher", batch_size=256)
    Distiller(student, CachedTeacher(cache, live=teacher), "hinton").fit(train, test)

Modules: :mod:`~kdistill.cache.format` (the files, fingerprints and shard plan; why
safetensors), :mod:`~kdistill.cache.encode` (what is stored per tap),
:mod:`~kdistill.cache.write` (the build: atomic shards, resume, torchrun),
:mod:`~kdistill.cache.store` (:class:`TeacherCache`) and :mod:`~kdistill.cache.source`
(:class:`CachedTeacher`).
"""

from kdistill.cache.format import (
    CacheError,
    CacheMismatch,
    DamagedCache,
    HiddenSlice,
    LogitSample,
)
from kdistill.cache.source import CachedTeacher
from kdistill.cache.store import TeacherCache

__all__ = ["CacheError", "CacheMismatch", "CachedTeacher", "DamagedCache", "HiddenSlice",
           "LogitSample", "TeacherCache"]
