"""Teacher sources: frozen teachers, ensembles and the EMA (mean) teacher."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.teachers import EMATeacher, EnsembleTeacher, FrozenTeacher, TeacherSource, as_source

CPU = torch.device("cpu")


def _mlp(seed: int, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(16, 4))


def _batch(seed: int = 100, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input": torch.randn(n, 6, generator=g), "labels": torch.zeros(n, dtype=torch.long)}


def _bound(model: nn.Module, names: list[str] | None = None, **kwargs: str) -> FrozenTeacher:
    teacher = FrozenTeacher(model, **kwargs)  # type: ignore[arg-type]
    teacher.bind(names or ["logits"], CPU)
    return teacher


# -- FrozenTeacher ----------------------------------------------------------------------------


def test_frozen_teacher_is_in_eval_mode_without_gradients() -> None:
    model = _mlp(0, dropout=0.5).train()
    assert all(p.requires_grad for p in model.parameters())
    teacher = _bound(model)
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    model.train()  # someone flips it back: bind puts it in eval mode again
    teacher.bind(["logits"], CPU)
    assert not any(m.training for m in model.modules())
    batch = _batch()
    first, second = teacher(batch)["logits"], teacher(batch)["logits"]
    assert torch.equal(first, second)  # dropout is off, BatchNorm uses running statistics
    running = model[1].running_mean.clone()
    teacher(_batch(seed=5))
    assert torch.equal(model[1].running_mean, running)  # statistics never updated


def test_frozen_teacher_taps_are_ordinary_tensors_usable_with_a_student() -> None:
    teacher_model = _mlp(0)
    teacher = _bound(teacher_model, ["logits", "module:1"])
    batch = _batch()
    taps = teacher(batch)
    for name in ("logits", "module:1"):
        assert not taps[name].is_inference(), name
        assert not taps[name].requires_grad, name
    torch.manual_seed(1)
    student = nn.Linear(6, 4)
    student_logits = student(batch["input"])
    # Saving teacher tensors for backward fails with inference tensors ("Inference tensors
    # cannot be saved for backward"); these multiply and feed a KL, so they are saved.
    loss = F.kl_div(student_logits.log_softmax(-1), taps["logits"].softmax(-1),
                    reduction="batchmean") + (student_logits * taps["logits"]).mean()
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher_model.parameters())
    # The values are the model's eval-mode outputs.
    with torch.no_grad():
        expected = teacher_model(batch["input"])
    torch.testing.assert_close(taps["logits"], expected, rtol=0, atol=0)


def test_frozen_teacher_reduced_precision_returns_float32_close_to_fp32() -> None:
    model = _mlp(0)
    reference = _bound(copy.deepcopy(model), ["logits", "module:0"])
    batch = _batch()
    exact = reference(batch)
    for precision in ("bf16", "fp16"):
        low = _bound(copy.deepcopy(model), ["logits", "module:0"], precision=precision)(batch)
        for name in ("logits", "module:0"):
            assert low[name].dtype == torch.float32, (precision, name)
            torch.testing.assert_close(low[name], exact[name], rtol=3e-2, atol=3e-2)
            # The forward really ran in reduced precision.
            assert not torch.equal(low[name], exact[name]), (precision, name)


def test_frozen_teacher_compile_keeps_taps_hooks_and_weights() -> None:
    model = _mlp(0)
    weights = copy.deepcopy(model.state_dict())
    eager = _bound(copy.deepcopy(model), ["logits", "module:2"])
    teacher = FrozenTeacher(model, compile=True)
    teacher.bind(["logits", "module:2"], CPU)
    batch = _batch()
    compiled, exact = teacher(batch), eager(batch)
    for name in ("logits", "module:2"):  # module taps still come from hooks
        torch.testing.assert_close(compiled[name], exact[name], rtol=1e-5, atol=1e-6)
    assert model._compiled_call_impl is not None  # the forward really is compiled
    compiled_forward = model._compiled_call_impl
    teacher.bind(["logits"], CPU)  # binding again keeps the compiled forward
    assert model._compiled_call_impl is compiled_forward
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert FrozenTeacher(_mlp(0)).compile is False


def test_the_run_hands_over_the_teachers_precision_and_compile(tmp_path: Path) -> None:
    from test_teacher_cache import digits_config

    from kdistill.run import build_data, build_phases, build_student, build_teacher

    config = digits_config(tmp_path, {"name": "hinton"}, None)
    assert config.teacher is not None
    config.teacher.precision, config.teacher.compile = "bf16", True
    data, phases = build_data(config.data), build_phases(config)
    student = build_student(config, data, phases, ["recipe"])
    _, source, _ = build_teacher(config, data, phases, ["recipe"], student)
    assert isinstance(source, FrozenTeacher)
    assert (source.precision, source.compile) == ("bf16", True)


def test_frozen_teacher_rejects_an_unknown_precision() -> None:
    with pytest.raises(ValueError, match=r"^unknown teacher precision 'fp8'; did you mean 'fp32' "
                                         r"or 'fp16'\?$"):
        FrozenTeacher(_mlp(0), precision="fp8")  # type: ignore[arg-type]


def test_frozen_teacher_must_be_bound_and_close_removes_hooks() -> None:
    model = _mlp(0)
    teacher = FrozenTeacher(model)
    with pytest.raises(RuntimeError, match="bind must be called"):
        teacher(_batch())
    teacher.bind(["logits", "module:2"], CPU)
    assert len(model[2]._forward_hooks) == 1
    teacher.bind(["module:2"], CPU)  # re-binding replaces the hooks
    assert len(model[2]._forward_hooks) == 1
    teacher.close()
    assert len(model[2]._forward_hooks) == 0
    assert teacher.state_dict() == {}


def test_as_source() -> None:
    model = _mlp(0)
    source = as_source(model)
    assert isinstance(source, FrozenTeacher) and source.model is model
    ensemble = EnsembleTeacher([FrozenTeacher(model)])
    assert as_source(ensemble) is ensemble
    assert as_source(None) is None
    with pytest.raises(TypeError, match="got str"):
        as_source("teacher")  # type: ignore[arg-type]


# -- EnsembleTeacher --------------------------------------------------------------------------


def _members(n: int = 3) -> list[nn.Sequential]:
    models = [_mlp(seed) for seed in range(n)]
    for model in models:
        with torch.no_grad():  # spread the logits so that the two modes differ clearly
            model[-1].weight.mul_(4)
        model.eval()
    return models


def _raw_logits(models: list[nn.Sequential], batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [m(batch["input"]) for m in models]


def test_ensemble_probs_mode_averages_probabilities() -> None:
    models = _members()
    batch = _batch()
    z = _raw_logits(models, batch)
    ensemble = EnsembleTeacher([FrozenTeacher(m) for m in models], weights=[1.0, 2.0, 1.0])
    ensemble.bind(["logits", "module:0"], CPU)
    taps = ensemble(batch)
    expected = 0.25 * z[0].softmax(-1) + 0.5 * z[1].softmax(-1) + 0.25 * z[2].softmax(-1)
    torch.testing.assert_close(taps["logits"].softmax(-1), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(taps["logits"].exp().sum(-1), torch.ones(8))  # log p, normalised
    # Not the softmax of averaged logits.
    assert not torch.allclose(taps["logits"].softmax(-1),
                              (0.25 * z[0] + 0.5 * z[1] + 0.25 * z[2]).softmax(-1), atol=1e-3)
    # Other taps come from the first member.
    with torch.no_grad():
        torch.testing.assert_close(taps["module:0"], models[0][0](batch["input"]))


def test_ensemble_logits_mode_averages_logits() -> None:
    models = _members(2)
    batch = _batch()
    z = _raw_logits(models, batch)
    ensemble = EnsembleTeacher([FrozenTeacher(m) for m in models], weights=[3, 1], mode="logits")
    ensemble.bind(["logits"], CPU)
    torch.testing.assert_close(ensemble(batch)["logits"], 0.75 * z[0] + 0.25 * z[1])


def test_ensemble_zero_weight_ignores_a_member() -> None:
    models = _members(2)
    batch = _batch()
    z = _raw_logits(models, batch)
    ensemble = EnsembleTeacher([FrozenTeacher(m) for m in models], weights=[0.0, 5.0])
    ensemble.bind(["logits"], CPU)
    logits = ensemble(batch)["logits"]
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.softmax(-1), z[1].softmax(-1))


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [float("nan"), 1.0],
                                     [float("inf"), 1.0], [1.0, 1.0, 1.0]])
def test_ensemble_bad_weights_are_named(weights: list[float]) -> None:
    sources = [FrozenTeacher(m) for m in _members(2)]
    with pytest.raises(ValueError) as err:
        EnsembleTeacher(sources, weights=weights)
    assert "ensemble weights must be 2" in str(err.value)
    assert f"got {weights}" in str(err.value)


def test_ensemble_bad_mode_and_no_sources() -> None:
    with pytest.raises(ValueError, match="ensemble mode must be 'probs' or 'logits', got 'mean'"):
        EnsembleTeacher([FrozenTeacher(_mlp(0))], mode="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one teacher source"):
        EnsembleTeacher([])


# -- EMATeacher -------------------------------------------------------------------------------


def _cosine_momentum() -> ScheduleConfig:
    return ScheduleConfig(name="cosine", start=0.5, end=0.9, length=10, unit="steps")


def _perturb(model: nn.Module, seed: int) -> None:
    """Change every parameter and the BatchNorm statistics, as a training step would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    model.train()
    model(torch.randn(16, 6, generator=g) * 3 + 1)


@pytest.mark.parametrize(("step", "fraction"), [(4, 0.4), (25, 1.0)])
def test_ema_after_step_matches_the_formula(step: int, fraction: float) -> None:
    student = _mlp(0)
    ema = EMATeacher(student, momentum=_cosine_momentum())
    ema.bind(["logits"], CPU)
    assert ema.model is not None and ema.model is not student
    old = {k: v.clone() for k, v in ema.model.state_dict().items()}
    for k, v in student.state_dict().items():
        assert torch.equal(old[k], v)  # the copy is taken at bind
    _perturb(student, seed=1)
    assert torch.equal(ema.model[0].weight, old["0.weight"])  # independent of the student
    ema.after_step(student, TrainState(step=step, epoch_progress=0.0))
    m = 0.9 - (0.9 - 0.5) * (1 + math.cos(math.pi * fraction)) / 2
    assert 0.5 < m <= 0.9
    params = dict(student.named_parameters())
    for name, value in ema.model.named_parameters():
        expected = m * old[name] + (1 - m) * params[name].detach()
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
        assert not value.requires_grad
    for name, buffer in student.named_buffers():  # BatchNorm statistics are copied
        assert torch.equal(dict(ema.model.named_buffers())[name], buffer), name
    # The teacher's taps come from the averaged weights in eval mode.
    reference = copy.deepcopy(ema.model).eval()
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ema(batch)["logits"], reference(batch["input"]))


def test_ema_warmup_averages_every_weight_seen_until_the_momentum_takes_over() -> None:
    """min(m, 1 - 1/(n + 1)) after n steps (the official mean-teacher code's warm-up): with
    m = 0.7 the teacher is the plain mean of theta_0 .. theta_n for n = 1, 2 (caps 1/2, 2/3),
    then m = 0.7 < 3/4 takes over at the third step; without warm-up m is 0.7 throughout."""
    student = nn.Linear(6, 4)
    warm, plain = EMATeacher(student, momentum=0.7, warmup=True), EMATeacher(student, 0.7)
    assert EMATeacher(student).warmup is False
    for source in (warm, plain):
        source.bind(["logits"], CPU)
    seen = [student.weight.detach().clone()]
    for step in range(3):
        with torch.no_grad():
            student.weight.add_(torch.randn(4, 6, generator=torch.Generator().manual_seed(step)))
        seen.append(student.weight.detach().clone())
        state = TrainState(step=step)
        assert warm.momentum_at(state) == pytest.approx(min(0.7, (step + 1) / (step + 2)))
        warm.after_step(student, state)
        plain.after_step(student, state)
        if step < 2:
            torch.testing.assert_close(warm.model.weight, sum(seen) / len(seen))
    mean_of_three = sum(seen[:3]) / 3
    torch.testing.assert_close(warm.model.weight, 0.7 * mean_of_three + 0.3 * seen[3])
    by_hand = seen[0]
    for weight in seen[1:]:
        by_hand = 0.7 * by_hand + 0.3 * weight
    torch.testing.assert_close(plain.model.weight, by_hand)


def test_ema_constant_momentum_and_bind_before_use() -> None:
    student = nn.Linear(6, 4)
    ema = EMATeacher(student, momentum=0.75)
    with pytest.raises(RuntimeError, match="bind must be called"):
        ema(_batch())
    with pytest.raises(RuntimeError, match="after_step called before bind"):
        ema.after_step(student, TrainState())
    ema.bind(["logits"], CPU)
    before = student.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    ema.after_step(student, TrainState(step=3))
    torch.testing.assert_close(ema.model.weight, 0.75 * before + 0.25 * (before + 1.0))


def test_ema_state_dict_round_trip() -> None:
    student = _mlp(0)
    ema = EMATeacher(student, momentum=_cosine_momentum())
    ema.bind(["logits"], CPU)
    _perturb(student, seed=2)
    ema.after_step(student, TrainState(step=2))
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    assert "model.0.weight" in state and "model.1.running_mean" in state
    assert "generator" in state

    other_student = _mlp(7)  # different weights: the state, not the student, must win
    restored = EMATeacher(other_student, momentum=_cosine_momentum())
    restored.load_state_dict(state)  # before bind, as on resume
    restored.bind(["logits"], CPU)
    assert state.keys() == restored.state_dict().keys()
    for k, v in restored.state_dict().items():
        assert torch.equal(v, state[k]), k
    batch = _batch()
    assert torch.equal(restored(batch)["logits"], ema(batch)["logits"])
    restored.load_state_dict({})  # an empty state (no teacher in the checkpoint) changes nothing
    assert torch.equal(restored.state_dict()["model.0.weight"], state["model.0.weight"])


def test_ema_rebinding_does_not_leak_hooks() -> None:
    student = _mlp(0)
    ema = EMATeacher(student)
    ema.bind(["module:0"], CPU)
    ema.bind(["module:0"], CPU)  # e.g. the next phase
    assert ema.model is not None
    assert len(ema.model[0]._forward_hooks) == 1
    ema.close()
    assert len(ema.model[0]._forward_hooks) == 0
    assert len(student[0]._forward_hooks) == 0


def test_ensemble_forwards_after_step_and_state_to_members() -> None:
    student = _mlp(0)
    ema = EMATeacher(student, momentum=0.5)
    frozen = FrozenTeacher(_mlp(3))
    ensemble = EnsembleTeacher([frozen, ema])
    ensemble.bind(["logits"], CPU)
    before = ema.model[0].weight.detach().clone()
    _perturb(student, seed=4)
    ensemble.after_step(student, TrainState(step=1))
    torch.testing.assert_close(ema.model[0].weight, 0.5 * before + 0.5 * student[0].weight)
    state = ensemble.state_dict()
    assert state and all(k.startswith("1.") for k in state)

    twin = EMATeacher(_mlp(9), momentum=0.5)
    copy_ensemble = EnsembleTeacher([FrozenTeacher(_mlp(3)), twin])
    copy_ensemble.load_state_dict(state)
    assert twin.model is not None
    for k, v in ema.state_dict().items():
        assert torch.equal(twin.state_dict()[k], v), k
    ensemble.close()
    assert frozen.reader is None


def test_base_source_defaults() -> None:
    source = TeacherSource()
    with pytest.raises(NotImplementedError):
        source({})
    assert source.state_dict() == {}
