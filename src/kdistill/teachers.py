"""Teacher sources: where a recipe's teacher taps come from.

Every source answers one call, ``taps = source(batch)``. Before training the engine calls
``source.bind(tap_names, device)`` so the source knows what to read; after every optimizer step it
calls ``source.after_step(student, state)`` (an EMA teacher updates itself there). A source's
trainable or evolving state is saved with checkpoints through ``state_dict``.

Most sources are frozen. A source whose :meth:`TeacherSource.trainable_module` is not ``None``
(peers in online distillation) trains with the student: the engine optimises that module with the
student, wraps it with the student for data parallelism and calls the source inside the training
forward, with gradients and the peers in train mode.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from kdistill.names import unknown_name
from kdistill.schedules import ScheduleConfig, TrainState, constant
from kdistill.taps import TapReader, Taps

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TeacherSource:
    """Base class: a source of teacher taps. Subclasses implement :meth:`__call__`.

    ``static`` says that the source answers the same batch the same way all run long (a frozen
    model), so what it produced once, such as its logits on the evaluation set, can be reused.
    """

    @property
    def static(self) -> bool:
        return False

    @property
    def answers_by_index(self) -> bool:
        """Whether the source answers a batch from rows stored under the samples' ``index``
        (a teacher cache) instead of running a model on the batch: then it knows the training
        samples only, as they were stored, and serves only recipes whose teacher reads them
        unchanged (:meth:`kdistill.recipes.base.Recipe.teacher_signal_varies`)."""
        return False

    def evaluation_source(self) -> TeacherSource | None:
        """The source to ask about samples outside the training data (the end-of-epoch
        evaluation's agreement with the teacher): this source itself, except for one that
        :attr:`answers_by_index`, which hands over its live teacher (``None`` without one)."""
        return self

    def trainable_module(self) -> nn.Module | None:
        """The module whose parameters train with the student (``None``: a frozen source)."""
        return None

    def bind(self, tap_names: Iterable[str], device: torch.device) -> None:
        """Prepare to produce ``tap_names`` on ``device``."""

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        raise NotImplementedError

    def after_step(self, student: nn.Module, state: TrainState) -> None:
        """Called after each optimizer step with the (unwrapped) student."""

    def close(self) -> None:
        """Release hooks and other resources held since :meth:`bind`."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class FrozenTeacher(TeacherSource):
    """A trained model run in eval mode under ``torch.inference_mode``; never trained.

    Its parameters have ``requires_grad=False`` and it is never wrapped for distributed
    training: each process holds a full copy. ``precision`` ``bf16``/``fp16`` runs the forward
    under autocast and returns float32 taps. ``compile`` compiles the model's forward in place
    (``nn.Module.compile``, hooks and weights untouched) when the source is first bound: the
    first batches pay the compilation (tens of seconds on a CPU, again for each new input
    shape); ``docs/performance.md`` says when either pays off.
    """

    @property
    def static(self) -> bool:
        return True

    def __init__(self, model: nn.Module, precision: Literal["fp32", "bf16", "fp16"] = "fp32",
                 compile: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(unknown_name("teacher precision", precision, PRECISIONS))
        self.model = _frozen(model)
        self.precision = precision
        self.compile = compile
        self.compiled = False
        self.reader: TapReader | None = None
        self.device = torch.device("cpu")

    def bind(self, tap_names: Iterable[str], device: torch.device) -> None:
        self.close()
        self.device = device
        self.model.to(device)
        _frozen(self.model)
        if self.compile and not self.compiled:
            self.model.compile()
            self.compiled = True
        self.reader = TapReader(self.model, tap_names)

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        if self.reader is None:
            raise RuntimeError("FrozenTeacher.bind must be called before the teacher is used")
        dtype = PRECISIONS[self.precision]
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype,
                                                    enabled=dtype is not None):
            taps = self.reader(batch)
        # Inference tensors cannot be saved for backward: hand out ordinary float copies.
        return Taps({k: v.float().clone() for k, v in taps.items()}, taps.mask)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


class MultiSource(TeacherSource):
    """A source made of several sources: it is static when all of them are, steps, closes,
    saves and loads each of them (state keys ``<i>.<key>``)."""

    def __init__(self, sources: Sequence[TeacherSource], what: str):
        if not sources:
            raise ValueError(f"{what} needs at least one teacher source")
        self.sources = list(sources)

    @property
    def static(self) -> bool:
        return all(source.static for source in self.sources)

    def after_step(self, student: nn.Module, state: TrainState) -> None:
        for source in self.sources:
            source.after_step(student, state)

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, s in enumerate(self.sources)
                for k, v in s.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for i, source in enumerate(self.sources):
            prefix = f"{i}."
            source.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                    if k.startswith(prefix)})


class EnsembleTeacher(MultiSource):
    """Weighted combination of several sources' logits.

    ``mode="probs"``: p = sum_i w_i softmax(z_i), returned as logits log p (so a softmax of the
    result gives the averaged probabilities). ``mode="logits"``: z = sum_i w_i z_i. Weights are
    normalised to sum to 1. Only the ``logits`` tap is combined; other taps come from the first
    source.
    """

    def __init__(self, sources: Sequence[TeacherSource], weights: Sequence[float] | None = None,
                 mode: Literal["probs", "logits"] = "probs"):
        super().__init__(sources, "an ensemble")
        weights = list(weights) if weights is not None else [1.0] * len(sources)
        if (len(weights) != len(sources) or not all(math.isfinite(w) and w >= 0 for w in weights)
                or sum(weights) <= 0):
            raise ValueError(f"ensemble weights must be {len(sources)} finite non-negative "
                             f"numbers with a positive sum, got {weights}")
        if mode not in ("probs", "logits"):
            raise ValueError(f"ensemble mode must be 'probs' or 'logits', got '{mode}'")
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.mode = mode


    def bind(self, tap_names: Iterable[str], device: torch.device) -> None:
        names = list(tap_names)
        for i, source in enumerate(self.sources):
            source.bind(names if i == 0 else ["logits"], device)

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        outputs = [source(batch) for source in self.sources]
        if "logits" not in outputs[0]:
            return outputs[0].with_members(outputs)
        logits = [o["logits"] for o in outputs]
        if self.mode == "logits":
            combined = sum(w * z for w, z in zip(self.weights, logits, strict=True))
        else:
            log_w = torch.log(torch.tensor(self.weights, device=logits[0].device))
            stacked = torch.stack([z.log_softmax(-1) for z in logits])
            combined = torch.logsumexp(stacked + log_w.view(-1, *[1] * logits[0].dim()), dim=0)
        return outputs[0].replace(logits=combined).with_members(outputs)



class EMATeacher(TeacherSource):
    """Mean teacher (Tarvainen & Valpola, 2017): an exponential moving average of a model.

    The teacher follows ``model`` (the student, or a peer). After each optimizer step, every
    parameter tensor is updated

        theta_t <- m theta_t + (1 - m) theta_s,     m = momentum.at(state)

    (``momentum`` a constant or a schedule, e.g. a cosine ramp from 0.99 to 1), and buffers
    (BatchNorm statistics) are copied. With ``warmup`` the momentum is capped as in the mean
    teacher's official code (``min(1 - 1 / (global_step + 1), alpha)``):

        m = min(momentum.at(state), 1 - 1 / (n + 1)),   n = state.step + 1 steps done,

    so while the EMA's memory would be longer than the run so far the teacher is the plain
    average of the n + 1 weights seen (the initial copy and one per step).

    With ``skip_prob`` > 0 the update is fine-grained as in ATSEN (Qu et al. 2023): each tensor
    is updated independently, skipped with probability ``skip_prob``. The draws come from the
    source's own generator seeded with ``seed``: one ``u = torch.rand(n_tensors)`` per step in
    ``named_parameters()`` order, tensor i updated iff ``u[i] >= skip_prob``; the generator's
    state is checkpointed. ``last_updated`` names the tensors updated by the latest step. The
    copy is made from ``model`` at the first ``bind``.
    """

    def __init__(self, model: nn.Module, momentum: float | ScheduleConfig = 0.999,
                 skip_prob: float = 0.0, seed: int = 0, warmup: bool = False):
        if not 0.0 <= skip_prob < 1.0:
            raise ValueError(f"EMATeacher skip_prob must be in [0, 1), got {skip_prob}")
        self.followed = model
        self.momentum = momentum if isinstance(momentum, ScheduleConfig) else constant(momentum)
        self.skip_prob = skip_prob
        self.warmup = warmup
        self.generator = torch.Generator().manual_seed(seed)
        self.model: nn.Module | None = None
        self.frozen: FrozenTeacher | None = None
        self.last_updated: list[str] = []

    def bind(self, tap_names: Iterable[str], device: torch.device) -> None:
        if self.model is None:
            self.model = copy.deepcopy(self.followed)
        self.close()  # a second bind (next phase) must not leave the old reader's hooks behind
        self.frozen = FrozenTeacher(self.model)
        self.frozen.bind(tap_names, device)

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        if self.frozen is None:
            raise RuntimeError("EMATeacher.bind must be called before the teacher is used")
        return self.frozen(batch)

    def momentum_at(self, state: TrainState) -> float:
        """The momentum m of the update after the step of ``state`` (see the class)."""
        m = self.momentum.at(state)
        return min(m, 1.0 - 1.0 / (state.step + 2)) if self.warmup else m

    @torch.no_grad()
    def after_step(self, student: nn.Module, state: TrainState) -> None:
        if self.model is None:
            raise RuntimeError("EMATeacher.after_step called before bind")
        m = self.momentum_at(state)
        ema = dict(self.model.named_parameters())
        followed = list(self.followed.named_parameters())
        draws = torch.rand(len(followed), generator=self.generator)
        self.last_updated = []
        for (name, param), u in zip(followed, draws.tolist(), strict=True):
            if u >= self.skip_prob:
                ema[name].mul_(m).add_(param.detach(), alpha=1 - m)
                self.last_updated.append(name)
        ema_buffers = dict(self.model.named_buffers())
        for name, buffer in self.followed.named_buffers():
            ema_buffers[name].copy_(buffer)

    def close(self) -> None:
        if self.frozen is not None:
            self.frozen.close()
            self.frozen = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.model is None:
            return {}
        return {**{f"model.{k}": v for k, v in self.model.state_dict().items()},
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            if self.model is None:
                self.model = copy.deepcopy(self.followed)
            self.model.load_state_dict({k[len("model."):]: v for k, v in state.items()
                                        if k.startswith("model.")})
            self.generator.set_state(state["generator"])


class SnapshotTeacher(TeacherSource):
    """A frozen copy of a model (the student) taken at the first ``bind`` and refreshed from it
    every ``every`` optimizer steps: the model's *previous version*, as knowledge-inheritance
    terms read it (``ka``).

    After the optimizer step with ``state.step`` = s (0-based), the copy is refreshed when
    s + 1 is a multiple of ``every``, or, with ``every="epoch"``, of ``state.steps_per_epoch``
    (the copy then answers for the whole next epoch with the weights the model ended the
    previous one with; during the first epoch, with the weights it started with). Frozen (eval
    mode, no gradients); the copy's weights are checkpointed, so a resume reads the same
    previous version.
    """

    def __init__(self, model: nn.Module, every: int | Literal["epoch"] = "epoch"):
        if every != "epoch" and not (isinstance(every, int) and every >= 1):
            raise ValueError(f"SnapshotTeacher every must be a number of steps >= 1 or "
                             f"'epoch', got {every!r}")
        self.followed = model
        self.every = every
        self.model: nn.Module | None = None
        self.frozen: FrozenTeacher | None = None

    @property
    def static(self) -> bool:
        return False

    def bind(self, tap_names: Iterable[str], device: torch.device) -> None:
        if self.model is None:
            self.model = copy.deepcopy(self.followed)
        self.close()
        self.frozen = FrozenTeacher(self.model)
        self.frozen.bind(tap_names, device)

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        if self.frozen is None:
            raise RuntimeError("SnapshotTeacher.bind must be called before the teacher is used")
        return self.frozen(batch)

    def refreshes_after(self, state: TrainState) -> bool:
        """Whether the copy is refreshed after the optimizer step of ``state``."""
        period = state.steps_per_epoch if self.every == "epoch" else self.every
        return (state.step + 1) % max(period, 1) == 0

    @torch.no_grad()
    def after_step(self, student: nn.Module, state: TrainState) -> None:
        if self.model is None:
            raise RuntimeError("SnapshotTeacher.after_step called before bind")
        if self.refreshes_after(state):
            self.model.load_state_dict(self.followed.state_dict())

    def close(self) -> None:
        if self.frozen is not None:
            self.frozen.close()
            self.frozen = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.model is None else dict(self.model.state_dict())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            if self.model is None:
                self.model = copy.deepcopy(self.followed)
            self.model.load_state_dict(dict(state))


class PeerTeacher(TeacherSource):
    """Peers that train alongside the student (online distillation: deep mutual learning,
    BD-KD, ATSEN's second student).

    ``source(batch)`` runs every peer with gradients in its current (train/eval) mode and
    returns peer 0's taps, with each peer's taps in ``members``. The engine optimises
    :meth:`trainable_module` with the student and checkpoints it through ``state_dict``.
    """

    def __init__(self, models: nn.Module | Sequence[nn.Module]):
        peers = [models] if isinstance(models, nn.Module) else list(models)
        if not peers:
            raise ValueError("PeerTeacher needs at least one peer model")
        self.peers = nn.ModuleList(peers)
        self.readers: list[TapReader] = []

    def trainable_module(self) -> nn.Module:
        return self.peers

    def bind(self, tap_names: Iterable[str], device: torch.device) -> None:
        self.close()
        names = list(tap_names)
        self.peers.to(device)
        self.readers = [TapReader(peer, names) for peer in self.peers]

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        if not self.readers:
            raise RuntimeError("PeerTeacher.bind must be called before the peers are used")
        outputs = [reader(batch) for reader in self.readers]
        return outputs[0].with_members(outputs)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.readers = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.peers.state_dict())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            self.peers.load_state_dict(dict(state))


class SourceGroup(MultiSource):
    """Several sources used side by side (e.g. ATSEN: a peer student and the EMA teachers of
    both students). ``source(batch)`` gives the first source's taps with ``members`` = every
    source's taps, in order; the group trains the trainable modules of its members."""

    def __init__(self, sources: Sequence[TeacherSource]):
        super().__init__(sources, "a SourceGroup")
        trainable = [m for m in (s.trainable_module() for s in self.sources) if m is not None]
        self.trainable = nn.ModuleList(trainable) if trainable else None


    def trainable_module(self) -> nn.Module | None:
        return self.trainable

    def bind(self, tap_names: Iterable[str], device: torch.device) -> None:
        names = list(tap_names)
        for source in self.sources:
            source.bind(names, device)

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        outputs = [source(batch) for source in self.sources]
        return outputs[0].with_members(outputs)



def as_source(teacher: nn.Module | TeacherSource | None) -> TeacherSource | None:
    """Accept a plain model (made a :class:`FrozenTeacher`) or any source."""
    if teacher is None or isinstance(teacher, TeacherSource):
        return teacher
    if isinstance(teacher, nn.Module):
        return FrozenTeacher(teacher)
    raise TypeError(f"a teacher must be an nn.Module or a TeacherSource, got "
                   f"{type(teacher).__name__}")
