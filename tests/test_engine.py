"""The training engine: gradient accumulation, logging, labelled-only recipes, settings errors,
mixed precision and teacher sources."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from kdistill import Distiller
from kdistill.batch import UNLABELED
from kdistill.batching import epoch_global_batches, process_micro_batches
from kdistill.data.base import ArrayDataset
from kdistill.errors import KdistillError
from kdistill.metrics_log import read_metrics
from kdistill.recipes import build_recipe
from kdistill.teachers import EMATeacher, FrozenTeacher

ALPHA, TEMPERATURE = 0.5, 2.0


def hinton_loss(student: nn.Module, teacher: nn.Module, inputs: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    """(1 - a) CE over the labelled rows + a T^2 KL(p_t^T || p_s^T) (batch mean), by hand."""
    logits = student(inputs)
    with torch.no_grad():
        target = teacher(inputs)
    known = labels != UNLABELED
    ce = F.cross_entropy(logits[known], labels[known]) if known.any() else logits.sum() * 0
    kd = F.kl_div(F.log_softmax(logits / TEMPERATURE, -1), F.softmax(target / TEMPERATURE, -1),
                  reduction="batchmean") * TEMPERATURE ** 2
    return (1 - ALPHA) * ce + ALPHA * kd


def sgd_step(model: nn.Module, loss: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """One plain gradient step, by hand; returns the new state dict."""
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def one_step(student: nn.Module, teacher: nn.Module, data: ArrayDataset, batch_size: int,
             accumulation: int, lr: float) -> dict[str, torch.Tensor]:
    recipe = build_recipe("hinton", alpha=ALPHA, temperature=TEMPERATURE)
    result = Distiller(student, teacher, recipe, epochs=1, batch_size=batch_size,
                       accumulation=accumulation, progress=False,
                       optimizer={"name": "sgd", "lr": lr, "momentum": 0.0}).fit(data)
    assert [r["step"] for r in result.history if r["kind"] == "train"] == [1]
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_accumulation_matches_one_big_batch_with_labelled_normalisation(
        digits_subset, make_mlp, weights_diff):
    lr = 1.0
    data = digits_subset(64, labeled=20)
    teacher = make_mlp(seed=1, hidden=(32,))
    initial = make_mlp(seed=0)
    # The micro-batches the engine cuts the single global batch into (seeded permutation):
    # their labelled counts differ, so a per-micro-batch CE mean weights labels unequally.
    (global_batch,) = epoch_global_batches(list(range(64)), 64, 4, 0, 0, 0)
    micro = process_micro_batches(global_batch, 1, 0, 4)
    counts = [int((data.labels[m] != UNLABELED).sum()) for m in micro]
    assert sum(counts) == 20 and len(set(counts)) > 1, counts

    big = one_step(copy.deepcopy(initial), teacher, data, batch_size=64, accumulation=1, lr=lr)
    accumulated = one_step(copy.deepcopy(initial), teacher, data, batch_size=16, accumulation=4,
                           lr=lr)
    assert weights_diff(big, accumulated) < 1e-6

    # Independent reference: the gradient of the mean over the whole batch, by hand.
    reference = copy.deepcopy(initial)
    expected = sgd_step(reference, hinton_loss(reference, teacher, data.inputs, data.labels), lr)
    assert weights_diff(expected, big) < 1e-6
    assert weights_diff(expected, accumulated) < 1e-6

    # Control: averaging each micro-batch's own means (the naive accumulation) is different.
    naive_model = copy.deepcopy(initial)
    naive_loss = sum(hinton_loss(naive_model, teacher, data.inputs[m], data.labels[m])
                     for m in micro) / len(micro)
    naive = sgd_step(naive_model, naive_loss, lr)
    assert weights_diff(naive, expected) > 1e-4
    assert weights_diff(naive, accumulated) > 1e-4


@pytest.mark.parametrize("accumulation", [1, 2])
def test_every_term_and_the_total_are_logged_each_step(tmp_path, digits_subset, make_mlp,
                                                       accumulation):
    data = digits_subset(64, labeled=20)
    teacher = make_mlp(seed=1, hidden=(32,))
    student = make_mlp(seed=0)
    initial = copy.deepcopy(student)
    recipe = build_recipe("hinton", alpha=ALPHA, temperature=TEMPERATURE)
    result = Distiller(student, teacher, recipe, epochs=2, batch_size=32 // accumulation,
                       accumulation=accumulation, progress=False,
                       run_dir=tmp_path / "run").fit(data)
    train = [r for r in result.history if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for record in train:
        assert {"ce", "kd", "loss", "lr"} <= set(record)
        assert record["loss"] == pytest.approx((1 - ALPHA) * record["ce"] + ALPHA * record["kd"],
                                               rel=1e-5)
    # Step 1's values are the means over its global batch at the initial weights.
    first = epoch_global_batches(list(range(64)), 32, accumulation, 0, 0, 0)[0]
    inputs, labels = data.inputs[first], data.labels[first]
    with torch.no_grad():
        logits, target = initial(inputs), teacher(inputs)
    known = labels != UNLABELED
    ce = F.cross_entropy(logits[known], labels[known]).item()
    kd = (F.kl_div(F.log_softmax(logits / TEMPERATURE, -1), F.softmax(target / TEMPERATURE, -1),
                   reduction="batchmean") * TEMPERATURE ** 2).item()
    assert train[0]["ce"] == pytest.approx(ce, rel=1e-5)
    assert train[0]["kd"] == pytest.approx(kd, rel=1e-5)
    # The JSONL log holds the same records, one line per step and per epoch end.
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert logged == json.loads(json.dumps(result.history))
    assert [r["step"] for r in logged if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [(r["kind"], r["epoch"]) for r in logged if r["kind"] == "eval"] == \
        [("eval", 1), ("eval", 2)]


def dkd_by_hand(logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                temperature: float) -> tuple[float, float, float]:
    """(CE over labelled rows, TCKD, NCKD) from probabilities, the target of an unlabelled row
    being the teacher's argmax."""
    known = labels != UNLABELED
    ce = F.cross_entropy(logits[known], labels[known]).item()
    target = torch.where(known, labels, target_logits.argmax(-1)).unsqueeze(-1)
    parts = []
    for z in (logits, target_logits):
        p = F.softmax(z.double() / temperature, -1)
        p_g = p.gather(-1, target)
        parts.append((torch.cat([p_g, 1 - p_g], -1), p.scatter(-1, target, 0.0) / (1 - p_g)))
    (b_s, hat_s), (b_t, hat_t) = parts
    tckd = (b_t * (b_t / b_s).log()).sum(-1).mean()
    nckd = torch.where(hat_t > 0, hat_t * (hat_t / hat_s).log(), 0.0).sum(-1).mean()
    return ce, float(temperature**2 * tckd), float(temperature**2 * nckd)


def test_dkd_logs_its_terms_and_the_warmed_up_total_each_step(digits_subset, make_mlp):
    """Step 1's terms are DKD computed by hand on its global batch at the initial weights;
    every step's total is w_ce CE + min(e / warm-up, 1) (alpha TCKD + beta NCKD), e the
    fractional epoch at that step (1/4 ... 4/4 of the only epoch)."""
    data = digits_subset(64, labeled=20)
    teacher = make_mlp(seed=1, hidden=(32,))
    student = make_mlp(seed=0)
    initial = copy.deepcopy(student)
    recipe = build_recipe("dkd", alpha=1.5, beta=3.0, temperature=2.0, ce_weight=0.4,
                          warmup_epochs=2.0)
    result = Distiller(student, teacher, recipe, epochs=1, batch_size=16,
                       progress=False).fit(data)
    train = [r for r in result.history if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for step, record in enumerate(train, start=1):
        warm = (step / 4) / 2.0
        assert record["loss"] == pytest.approx(
            0.4 * record["ce"] + warm * (1.5 * record["tckd"] + 3.0 * record["nckd"]), rel=1e-5)
    first = epoch_global_batches(list(range(64)), 16, 16, 0, 0, 0)[0]
    with torch.no_grad():
        logits, target = initial(data.inputs[first]), teacher(data.inputs[first])
    ce, tckd, nckd = dkd_by_hand(logits, target, data.labels[first], 2.0)
    assert (train[0]["ce"], train[0]["tckd"], train[0]["nckd"]) == pytest.approx(
        (ce, tckd, nckd), rel=1e-5)


class InputRecorder(nn.Module):
    """Wraps a model; records the marker pixel (the sample index) of every training forward."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.seen.append(x[:, 0, 0, 0].detach().round().long())
        return self.inner(x)


def test_a_labels_only_recipe_trains_on_labelled_samples_only(digits_subset, make_mlp):
    data = digits_subset(64, labeled=20)
    data.inputs[:, 0, 0, 0] = torch.arange(64, dtype=torch.float32)  # marker = sample index
    labelled = sorted(torch.nonzero(data.labels != UNLABELED).flatten().tolist())
    assert len(labelled) == 20
    student = InputRecorder(make_mlp(seed=0))
    result = Distiller(student, None, "ce", epochs=2, batch_size=8, progress=False).fit(data)
    # 20 labelled samples in global batches of 8: 8 + 8 + 4 -> 3 steps per epoch.
    assert len([r for r in result.history if r["kind"] == "train"]) == 6
    seen = torch.cat(student.seen).tolist()
    assert len(seen) == 40
    assert sorted(seen[:20]) == labelled and sorted(seen[20:]) == labelled
    # The same data under a recipe that learns from unlabelled samples: 64 / 8 = 8 steps.
    student = InputRecorder(make_mlp(seed=0))
    result = Distiller(student, make_mlp(seed=1), "hinton", epochs=1, batch_size=8,
                       progress=False).fit(data)
    assert len([r for r in result.history if r["kind"] == "train"]) == 8
    assert sorted(torch.cat(student.seen).tolist()) == list(range(64))


@pytest.mark.parametrize(("overrides", "field", "text"), [
    ({"batch_size": 0}, ("batch_size",), "greater than or equal to 1"),
    ({"optimizer": {"name": "adam"}}, ("optimizer", "name"), "'adamw' or 'sgd'"),
    ({"mixed_precision": "fp8"}, ("mixed_precision",), "'no', 'bf16' or 'fp16'"),
    ({"epochs": 2, "bacth_size": 8}, ("bacth_size",), "Extra inputs are not permitted"),
    ({"optimizer": {"betas": [0.9, 1.0]}}, ("optimizer", "betas", 1), "less than 1"),
])
def test_bad_settings_raise_a_validation_error_naming_the_field(make_mlp, overrides, field,
                                                                text):
    with pytest.raises(ValidationError) as caught:
        Distiller(make_mlp(), make_mlp(seed=1), "hinton", progress=False, **overrides)
    errors = caught.value.errors()
    assert [e["loc"] for e in errors] == [field]
    assert text in errors[0]["msg"]
    assert "\n" + ".".join(map(str, field)) + "\n" in str(caught.value)


def test_a_teacher_recipe_without_a_teacher_is_a_clear_error(make_mlp):
    with pytest.raises(ValueError, match="recipe 'hinton' needs a teacher, none was given"):
        Distiller(make_mlp(), None, "hinton", progress=False)
    with pytest.raises(ValueError, match="recipe 'dkd' needs a teacher"):
        Distiller(make_mlp(), None, build_recipe("dkd"), progress=False)
    Distiller(make_mlp(), None, "ce", progress=False)  # a teacher-free recipe is fine


def test_bf16_mixed_precision_trains_after_an_fp32_run(digits_subset, make_mlp, take_snapshot,
                                                       weights_diff):
    data = digits_subset(64, labeled=32)
    teacher = make_mlp(seed=1, hidden=(32,))
    Distiller(make_mlp(seed=0), teacher, "hinton", epochs=1, batch_size=32,
              progress=False).fit(data)  # Accelerate's process-wide state is fp32 now
    student = make_mlp(seed=0)
    before = take_snapshot(student)
    dtypes: list[torch.dtype] = []

    def record(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            dtypes.append(output.dtype)

    student.head.register_forward_hook(record)
    result = Distiller(student, teacher, "hinton", epochs=2, batch_size=32,
                       mixed_precision="bf16", progress=False).fit(data)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the forward ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert weights_diff(before, take_snapshot(student)) > 1e-4
    train = [r for r in result.history if r["kind"] == "train"]
    assert len(train) == 4 and all(math.isfinite(r["loss"]) for r in train)


def test_ema_teacher_follows_the_student_by_its_momentum(digits_subset, make_mlp,
                                                         take_snapshot):
    data = digits_subset(32, labeled=16)
    student = make_mlp(seed=0)
    initial = take_snapshot(student)
    ema = EMATeacher(student, momentum=0.75)
    Distiller(student, ema, "hinton", epochs=1, batch_size=32, progress=False).fit(data)
    final = take_snapshot(student)
    assert ema.model is not None
    averaged = take_snapshot(ema.model)
    # One step: theta_t = m theta_0 + (1 - m) theta_s.
    for name, value in averaged.items():
        expected = 0.75 * initial[name] + 0.25 * final[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        assert not torch.equal(value, initial[name])
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_ema_moves_while_a_frozen_teacher_stays_fixed(digits_subset, make_mlp, make_cnn,
                                                     take_snapshot, weights_diff):
    from kdistill.teachers import EnsembleTeacher

    data = digits_subset(64, labeled=20)
    frozen_model = make_cnn(seed=1)
    frozen_before = take_snapshot(frozen_model)
    student = make_mlp(seed=0)
    ema = EMATeacher(student, momentum=0.5)
    source = EnsembleTeacher([FrozenTeacher(frozen_model), ema], weights=[0.5, 0.5])
    Distiller(student, source, "hinton", epochs=2, batch_size=16, progress=False).fit(data)
    assert ema.model is not None
    ema_weights = take_snapshot(ema.model)
    assert weights_diff(ema_weights, take_snapshot(make_mlp(seed=0))) > 1e-4  # it moved
    assert weights_diff(ema_weights, take_snapshot(student)) > 1e-6  # and lags the student
    after = take_snapshot(frozen_model)
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)
    assert not frozen_model.training


def test_a_term_named_like_the_total_is_refused(digits_subset, make_mlp):
    recipe = build_recipe("composite", terms=[{"loss": "kd", "name": "loss"}])
    with pytest.raises(ValueError, match="cannot be named 'loss'"):
        Distiller(make_mlp(), make_mlp(seed=1), recipe, epochs=1, batch_size=32,
                  progress=False).fit(digits_subset(32))


def test_a_term_is_logged_as_zero_in_a_step_without_its_units(digits_subset, make_mlp):
    # One label among 32 samples, global batches of 8: three of the four steps have no
    # labelled sample; their CE is logged as 0 (nothing to average), never left out or NaN.
    data = digits_subset(32, labeled=1)
    (labelled,) = torch.nonzero(data.labels != UNLABELED).flatten().tolist()
    batches = epoch_global_batches(list(range(32)), 8, 1, 0, 0, 0)
    with_label = next(i for i, b in enumerate(batches) if labelled in b)
    result = Distiller(make_mlp(seed=0), make_mlp(seed=1), "hinton", epochs=1, batch_size=8,
                       progress=False).fit(data)
    train = [r for r in result.history if r["kind"] == "train"]
    assert len(train) == 4
    for i, record in enumerate(train):
        assert math.isfinite(record["ce"]) and math.isfinite(record["kd"])
        assert (record["ce"] > 0) == (i == with_label), (i, record)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on CPU only")
def test_fp16_on_cpu_is_refused_rather_than_silently_fp32(make_mlp):
    with pytest.raises(ValueError, match="mixed_precision 'fp16' needs a GPU.*use 'bf16'"):
        Distiller(make_mlp(), make_mlp(seed=1), "hinton", mixed_precision="fp16",
                  progress=False)


def test_a_gradient_scaler_is_unscaled_before_clipping_and_the_update(
        tmp_path, monkeypatch, digits_subset, make_mlp, take_snapshot, weights_diff):
    # fp16 on a GPU gives Accelerate a GradScaler whose scaled loss backward() sees; the
    # engine must unscale before clipping and stepping. Simulated on CPU with a real scaler.
    import accelerate

    import kdistill.engine.loop
    from kdistill.checkpoint import latest_checkpoint, load_checkpoint

    class ScalingAccelerator(accelerate.Accelerator):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    data = digits_subset(64, labeled=20)
    teacher = make_mlp(seed=1, hidden=(32,))
    settings = {"epochs": 1, "batch_size": 16, "clip_grad_norm": 50.0, "progress": False,
                "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.0}}
    plain = make_mlp(seed=0)
    Distiller(plain, teacher, "hinton", **settings).fit(data)
    monkeypatch.setattr(kdistill.engine.loop, "Accelerator", ScalingAccelerator)
    scaled = make_mlp(seed=0)
    Distiller(scaled, teacher, "hinton", run_dir=tmp_path, **settings).fit(data)
    assert weights_diff(take_snapshot(plain), take_snapshot(scaled)) < 1e-6
    saved = load_checkpoint(latest_checkpoint(tmp_path)).trainer["scaler"]
    assert saved["scale"] == 2.0 ** 10


def test_a_batch_the_student_cannot_take_is_a_clear_error() -> None:
    from kdistill.data.base import ArrayDataset
    from kdistill.errors import ModelCallError
    from kdistill.models import build_model

    data = ArrayDataset(torch.randn(16, 32), torch.arange(16) % 4)
    student = build_model("mlp", (64,), 4, size="tiny")  # expects 64 features, gets 32
    with pytest.raises(ModelCallError) as caught:
        Distiller(student, None, "ce", epochs=1, batch_size=8, progress=False).fit(data)
    message = str(caught.value)
    assert "the student cannot run on a training batch" in message
    assert "input [8, 32] float32" in message


def test_a_teacher_that_cannot_take_the_batch_is_named() -> None:
    from kdistill.data.base import ArrayDataset
    from kdistill.errors import ModelCallError
    from kdistill.models import build_model

    data = ArrayDataset(torch.randn(16, 64), torch.arange(16) % 4)
    student = build_model("mlp", (64,), 4, size="tiny")
    teacher = build_model("mlp", (10,), 4, size="tiny")
    with pytest.raises(ModelCallError, match="the teacher cannot run"):
        Distiller(student, teacher, "hinton", epochs=1, batch_size=8, progress=False).fit(data)


class CountingModel(nn.Module):
    """Wraps a model and counts its forward passes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def test_a_frozen_teacher_runs_over_the_eval_set_once_per_fit(digits_subset, make_mlp):
    train, evaluation = digits_subset(64, labeled=64), digits_subset(40, labeled=40)
    teacher = CountingModel(make_mlp(seed=1, hidden=(32,)))
    Distiller(make_mlp(), teacher, "hinton", epochs=3, batch_size=32,
              progress=False).fit(train, evaluation)
    # 2 steps x 3 epochs of training, 1 first-batch build, 3 evaluations of 2 batches of 32:
    # the evaluation set is seen by the teacher once, not once per epoch.
    assert teacher.calls == 2 * 3 + 1 + 2


def test_agreement_follows_data_order_when_the_eval_loader_shuffles(digits_subset, make_mlp):
    from torch.utils.data import DataLoader

    from kdistill.batch import collate
    from kdistill.data.base import IndexedDataset

    train, evaluation = digits_subset(64, labeled=64), digits_subset(64, labeled=64)
    teacher = make_mlp(seed=1, hidden=(32,))
    Distiller(teacher, None, "ce", epochs=20, batch_size=32, progress=False,
              optimizer={"lr": 1e-2}).fit(train)
    student = copy.deepcopy(teacher)  # identical predictions: agreement must be exactly 1
    loader = DataLoader(IndexedDataset(evaluation), batch_size=16, shuffle=True,
                        collate_fn=collate, generator=torch.Generator().manual_seed(0))
    record = Distiller(student, teacher, "hinton", epochs=1, batch_size=32, progress=False,
                       optimizer={"lr": 1e-12}).fit(train, loader).evaluations()[-1]
    assert record["eval_accuracy"] > 0.5  # varied predictions: a wrong order would disagree
    assert record["eval_agreement"] == 1.0


def test_scaled_gradients_that_overflow_are_left_to_the_scaler(
        tmp_path, monkeypatch, digits_subset, make_mlp) -> None:
    # The scaled loss overflows (a scale of 2^127): the terms are finite, so the engine lets
    # the gradient scaler skip the step and lower its scale rather than stop the run.
    import accelerate

    import kdistill.engine.loop
    from kdistill.checkpoint import latest_checkpoint, load_checkpoint

    class OverflowingAccelerator(accelerate.Accelerator):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)

    monkeypatch.setattr(kdistill.engine.loop, "Accelerator", OverflowingAccelerator)
    result = Distiller(make_mlp(seed=0), make_mlp(seed=1, hidden=(32,)), "hinton", epochs=1,
                       batch_size=16, progress=False, run_dir=tmp_path).fit(
                           digits_subset(64, labeled=20))
    assert result.skipped_steps() == 0
    assert load_checkpoint(latest_checkpoint(tmp_path)).trainer["scaler"]["scale"] < 2.0 ** 127


def test_the_fit_description_holds_the_global_batch(tmp_path, digits_subset, make_mlp) -> None:
    from kdistill.checkpoint import latest_checkpoint, load_checkpoint

    Distiller(make_mlp(seed=0), make_mlp(seed=1, hidden=(32,)), "hinton", epochs=1,
              batch_size=4, accumulation=3, progress=False, run_dir=tmp_path).fit(
                  digits_subset(48, labeled=48))
    assert load_checkpoint(latest_checkpoint(tmp_path)).trainer["fit"]["global_batch"] == 12


def test_the_progress_shows_each_phase_by_its_name_or_its_recipe(
        monkeypatch, digits_subset, make_mlp) -> None:
    from kdistill.engine import Phase
    from kdistill.progress import TrainingProgress

    shown: list[str] = []
    monkeypatch.setattr(TrainingProgress, "start_phase",
                        lambda self, name, total, completed=0: shown.append(name))
    phases = [Phase(build_recipe("ce"), 1), Phase(build_recipe("hinton"), 1, name="kd")]
    Distiller(make_mlp(seed=0), make_mlp(seed=1, hidden=(32,)), phases=phases, batch_size=16,
              progress=False).fit(digits_subset(32, labeled=32))
    assert shown == ["ce", "kd"]


@pytest.mark.parametrize("kind, name", [("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed")])
def test_a_sharded_accelerate_launch_is_refused_before_any_work(
        kind, name, monkeypatch, digits_subset, make_mlp) -> None:
    import accelerate
    from accelerate.utils import DistributedType

    import kdistill.engine.loop

    class ShardingAccelerator(accelerate.Accelerator):
        @property
        def distributed_type(self) -> DistributedType:
            return DistributedType[kind]

    monkeypatch.setattr(kdistill.engine.loop, "Accelerator", ShardingAccelerator)
    student = make_mlp(seed=0)
    with pytest.raises(KdistillError, match=f"^the Accelerate launch config asks for {name}, "
                                            "which kdistill does not run yet"):
        Distiller(student, make_mlp(seed=1), "hinton", epochs=1, progress=False).fit(
            digits_subset(32, labeled=32))
