"""Schedules: the engine's learning-rate factors, ScheduleConfig values, and the LR a run logs."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from kdistill import Distiller
from kdistill.schedules import ScheduleConfig, TrainState, constant, lr_multiplier


@pytest.mark.parametrize(("name", "step", "expected"), [
    # constant: linear warm-up over 4 steps, (step + 1) / 4, then 1.
    ("constant", 0, 0.25), ("constant", 1, 0.5), ("constant", 3, 1.0), ("constant", 9, 1.0),
    # linear over 10 steps, 2 of warm-up: decay over the 8 others, 1 - (step - 2) / 8.
    ("linear", 0, 0.5), ("linear", 1, 1.0), ("linear", 2, 1.0), ("linear", 6, 0.5),
    ("linear", 9, 0.125), ("linear", 10, 0.0), ("linear", 50, 0.0),
    # cosine: (1 + cos(pi (step - 2) / 8)) / 2.
    ("cosine", 0, 0.5), ("cosine", 2, 1.0), ("cosine", 4, (1 + math.sqrt(0.5)) / 2),
    ("cosine", 6, 0.5), ("cosine", 8, (1 - math.sqrt(0.5)) / 2), ("cosine", 10, 0.0),
    # step: x0.5 every 3 steps after warm-up.
    ("step", 1, 1.0), ("step", 2, 1.0), ("step", 4, 1.0), ("step", 5, 0.5), ("step", 8, 0.25),
])
def test_lr_multiplier_hand_values(name, step, expected):
    warmup = 4 if name == "constant" else 2
    value = lr_multiplier(name, step, total_steps=10, warmup_steps=warmup, min_ratio=0.0,
                          step_size=3, gamma=0.5)
    assert value == pytest.approx(expected, abs=1e-12)


def test_lr_multiplier_min_ratio_and_no_warmup():
    # linear with min_ratio 0.2: 1 - 0.8 * step / 10.
    assert lr_multiplier("linear", 0, 10, 0, min_ratio=0.2) == pytest.approx(1.0)
    assert lr_multiplier("linear", 5, 10, 0, min_ratio=0.2) == pytest.approx(0.6)
    assert lr_multiplier("linear", 10, 10, 0, min_ratio=0.2) == pytest.approx(0.2)
    # cosine with min_ratio 0.1: 0.1 + 0.9 (1 + cos(pi step / 10)) / 2.
    assert lr_multiplier("cosine", 5, 10, 0, min_ratio=0.1) == pytest.approx(0.55)
    assert lr_multiplier("cosine", 10, 10, 0, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier("step", 7, 10, 0, step_size=2, gamma=0.1) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'exp'"):
        lr_multiplier("exp", 3, 10, 0)


def at_epochs(progress: float) -> TrainState:
    return TrainState(epoch=int(progress), epoch_progress=progress)


def at_step(step: int) -> TrainState:
    return TrainState(step=step, epoch_progress=123.0)


@pytest.mark.parametrize(("step", "expected"), [
    (0, 1.0 + 3.0 * math.exp(-5.0)), (2, 1.0 + 3.0 * math.exp(-5.0 * 0.75**2)),
    (4, 1.0 + 3.0 * math.exp(-1.25)), (8, 4.0), (20, 4.0)])
def test_schedule_config_gaussian_ramp(step, expected):
    """start + (end - start) exp(-5 (1 - min(t / length, 1))^2), Laine & Aila's ramp-up."""
    ramp = ScheduleConfig(name="gaussian", start=1.0, end=4.0, length=8, unit="steps")
    assert ramp.at(at_step(step)) == pytest.approx(expected, rel=1e-12)


def test_schedule_config_constant_and_linear():
    assert constant(3.5).at(at_epochs(7.0)) == 3.5
    assert ScheduleConfig(name="constant", start=2.0, end=9.0).at(at_step(50)) == 2.0
    ramp = ScheduleConfig(name="linear", start=1.0, end=0.0, length=4)  # unit: epochs
    assert ramp.at(at_epochs(0.0)) == pytest.approx(1.0)
    assert ramp.at(at_epochs(1.0)) == pytest.approx(0.75)
    assert ramp.at(at_epochs(2.5)) == pytest.approx(0.375)
    assert ramp.at(at_epochs(9.0)) == pytest.approx(0.0)  # held at ``end`` after ``length``
    steps = ScheduleConfig(name="linear", start=0.0, end=2.0, length=10, unit="steps")
    assert steps.at(at_step(5)) == pytest.approx(1.0)  # reads the step, not the epoch
    assert steps.at(at_step(30)) == pytest.approx(2.0)


def test_schedule_config_cosine():
    momentum = ScheduleConfig(name="cosine", start=0.99, end=0.999, length=10, unit="steps")
    assert momentum.at(at_step(0)) == pytest.approx(0.99)
    assert momentum.at(at_step(5)) == pytest.approx(0.9945)
    assert momentum.at(at_step(2)) == pytest.approx(0.999 - 0.009 *
                                                    (1 + math.cos(math.pi * 0.2)) / 2)
    assert momentum.at(at_step(10)) == pytest.approx(0.999)
    assert momentum.at(at_step(99)) == pytest.approx(0.999)
    epochs = ScheduleConfig(name="cosine", start=0.0, end=1.0, length=2)
    assert epochs.at(at_epochs(1.0)) == pytest.approx(0.5)
    assert epochs.at(at_epochs(0.5)) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)


def test_schedule_config_step():
    weights = ScheduleConfig(name="step", boundaries=[2, 5], values=[1.0, 0.5, 0.1])
    assert weights.at(at_epochs(0.0)) == 1.0
    assert weights.at(at_epochs(1.99)) == 1.0
    assert weights.at(at_epochs(2.0)) == 0.5  # a boundary counts as passed when reached
    assert weights.at(at_epochs(4.9)) == 0.5
    assert weights.at(at_epochs(5.0)) == 0.1
    by_step = ScheduleConfig(name="step", boundaries=[3], values=[0.0, 1.0], unit="steps")
    assert [by_step.at(at_step(s)) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_schedule_over_the_share_of_the_phase_done():
    ramp = ScheduleConfig(name="cosine", start=0.8, end=1.0, unit="phase")
    # 1.5 epochs of 4 steps done out of 12 steps: half the phase
    half = TrainState(epoch=1, step=5, epoch_progress=1.5, steps_per_epoch=4, total_steps=12)
    assert half.phase_progress == 0.5
    assert ramp.at(half) == pytest.approx(0.9)
    done = TrainState(epoch=2, step=11, epoch_progress=3.0, steps_per_epoch=4, total_steps=12)
    assert ramp.at(done) == pytest.approx(1.0)
    start = TrainState(epoch_progress=0.0, steps_per_epoch=4, total_steps=12)
    assert ramp.at(start) == pytest.approx(0.8)


def test_schedule_config_rejects_bad_values():
    with pytest.raises(ValidationError, match=r"len\(values\) == len\(boundaries\) \+ 1"):
        ScheduleConfig(name="step", boundaries=[1, 2], values=[1.0, 0.5])
    with pytest.raises(ValidationError) as caught:
        ScheduleConfig(name="linear", length=0)
    assert caught.value.errors()[0]["loc"] == ("length",)
    with pytest.raises(ValidationError) as caught:
        ScheduleConfig(name="linear", unit="minutes")
    assert caught.value.errors()[0]["loc"] == ("unit",)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_a_run_logs_the_learning_rate_each_step_used(digits_subset, make_mlp, name):
    # 64 samples in batches of 16 for 2 epochs: 8 steps, 2 of warm-up, 6 of decay.
    base = 0.1
    result = Distiller(make_mlp(seed=0), make_mlp(seed=1), "hinton", epochs=2, batch_size=16,
                       optimizer={"name": "sgd", "lr": base},
                       scheduler={"name": name, "warmup_steps": 2, "min_ratio": 0.0},
                       progress=False).fit(digits_subset(64, labeled=16))
    logged = [r["lr"] for r in result.history if r["kind"] == "train"]
    if name == "linear":
        factors = [0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    else:
        factors = [0.5, 1.0] + [(1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)]
    assert logged == pytest.approx([base * f for f in factors], abs=1e-12)


def test_each_phase_runs_its_own_schedule(digits_subset, make_mlp):
    # fitnets: a 1-epoch hint phase (4 steps) then a 2-epoch KD phase (8 steps); the cosine
    # schedule restarts at the full rate at the start of each phase.
    result = Distiller(make_mlp(seed=0), make_mlp(seed=1), "fitnets", epochs=3, batch_size=16,
                       optimizer={"name": "sgd", "lr": 0.2}, scheduler={"name": "cosine"},
                       progress=False).fit(digits_subset(64, labeled=16))
    train = [r for r in result.history if r["kind"] == "train"]
    assert [r["phase"] for r in train] == [0] * 4 + [1] * 8
    hint = [0.2 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    kd = [0.2 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(8)]
    assert [r["lr"] for r in train] == pytest.approx(hint + kd, abs=1e-12)
    assert "hint" in train[0] and "kd" in train[-1] and "kd" not in train[0]


@pytest.mark.parametrize(("scheduler", "factors"), [
    # constant after 3 warm-up steps: (step + 1) / 3, then 1.
    ({"name": "constant", "warmup_steps": 3}, [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1]),
    # step: 1 warm-up step, then x0.5 every 2 steps: 0.5 ** ((step - 1) // 2).
    ({"name": "step", "warmup_steps": 1, "step_size": 2, "gamma": 0.5},
     [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.125]),
    # linear from 1 down towards min_ratio 0.5 over 8 steps: 1 - 0.5 step / 8.
    ({"name": "linear", "min_ratio": 0.5},
     [1, 0.9375, 0.875, 0.8125, 0.75, 0.6875, 0.625, 0.5625]),
    # cosine to min_ratio 0.2 after 2 warm-up steps: 0.2 + 0.8 (1 + cos(pi k / 6)) / 2.
    ({"name": "cosine", "warmup_steps": 2, "min_ratio": 0.2},
     [0.5, 1] + [0.2 + 0.4 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]),
])
def test_every_scheduler_setting_reaches_the_run(digits_subset, make_mlp, scheduler, factors):
    # 64 samples in batches of 16 for 2 epochs: 8 steps; each factor differs from what the
    # schedule would give with any one of its settings at its default.
    result = Distiller(make_mlp(seed=0), None, "ce", epochs=2, batch_size=16,
                       optimizer={"name": "sgd", "lr": 0.1}, scheduler=scheduler,
                       progress=False).fit(digits_subset(64))
    logged = [r["lr"] for r in result.history if r["kind"] == "train"]
    assert logged == pytest.approx([0.1 * f for f in factors], abs=1e-12)
