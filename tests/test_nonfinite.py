"""Non-finite training: a NaN or infinite loss term or gradient stops the run (or, with
``trainer.on_nonfinite: skip``, skips the step) without applying the update or saving anything
non-finite, and the metrics log stays strict JSON."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

from kdistill import Distiller
from kdistill import run as kdistill_run
from kdistill.batching import epoch_global_batches
from kdistill.checkpoint import load_checkpoint
from kdistill.config import parse_config
from kdistill.contexts import eval_mode
from kdistill.data.base import ArrayDataset
from kdistill.engine.nonfinite import MAX_CONSECUTIVE_SKIPS, trailing_skips
from kdistill.errors import NonFiniteError
from kdistill.metrics_log import MetricsLog, decode_record, encode_record, read_metrics

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0}


class Disturbed(nn.Module):
    """Wraps a model; its ``at``-th training forward is disturbed. ``"nan"``: the inputs are
    NaN (so are the logits, the loss, the gradients and, in training mode, the BatchNorm
    statistics). ``"mute"``: an eval-mode forward with a zero gradient, which with plain SGD is
    a step that changes nothing: the reference for a skipped step."""

    def __init__(self, model: nn.Module, at: set[int], how: str = "nan"):
        super().__init__()
        self.model, self.at, self.how, self.calls = model, at, how, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.model(x)
        self.calls += 1
        if self.calls not in self.at:
            return self.model(x)
        if self.how == "nan":
            return self.model(x * math.nan)
        with eval_mode(self.model):
            out = self.model(x)
        return out.detach() + 0 * out


def strict_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file parsed as strict RFC 8259 JSON (NaN/Infinity tokens raise)."""
    def refuse(token: str) -> float:
        raise ValueError(f"non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))


def student_weights(path: Path) -> dict[str, torch.Tensor]:
    """The student's tensors of a checkpoint folder."""
    weights = load_checkpoint(path).weights
    return {k[len("student."):]: v for k, v in weights.items() if k.startswith("student.")}


def assert_all_finite(state: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"non-finite: {bad}"


def fit(student: nn.Module, data: ArrayDataset, run_dir: Path | None,
        callbacks: Sequence[Callable[[dict[str, Any]], None]] = (), **settings: Any) -> Any:
    settings = {"epochs": 1, "batch_size": 16, "progress": False, "optimizer": SGD, **settings}
    return Distiller(student, None, "ce", run_dir=run_dir, **settings).fit(
        data, callbacks=callbacks)


# --------------------------------------------------------------------------- stop (default)


def test_a_huge_learning_rate_stops_at_the_first_nonfinite_step(digits_subset, make_mlp,
                                                                tmp_path: Path) -> None:
    data, initial = digits_subset(64), make_mlp(seed=0)
    student = copy.deepcopy(initial)
    with pytest.raises(NonFiniteError) as caught:
        fit(student, data, tmp_path, batch_size=32, epochs=3, checkpoint_every=1,
            keep_checkpoints=5, optimizer={"name": "sgd", "lr": 1e20, "momentum": 0.0})
    message = str(caught.value)
    # Step 1 is finite; its update (lr 1e20) makes step 2's loss infinite.
    assert message.startswith("training step 2 (phase 0 '0-ce', epoch 1 of 3, batch 2 of 2): "
                              "non-finite loss terms ce=inf, loss=inf")
    assert "\n" not in message
    assert "trainer.optimizer.lr" in message and "trainer.on_nonfinite: skip" in message

    # Only step 1's checkpoint exists: finite, and the weights before the failing step, which
    # are also the weights in memory (step 2 applied nothing) and one SGD step by hand.
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000001"]
    saved = student_weights(checkpoints(tmp_path)[0])
    assert_all_finite(saved)
    for name, value in student.state_dict().items():
        assert torch.equal(saved[name], value), name
    by_hand = copy.deepcopy(initial)
    first = epoch_global_batches(list(range(64)), 32, 1, 0, 0, 0)[0]  # as the engine draws it
    loss = F.cross_entropy(by_hand(data.inputs[first]), data.labels[first])
    grads = torch.autograd.grad(loss, list(by_hand.parameters()))
    with torch.no_grad():
        for p, g in zip(by_hand.parameters(), grads, strict=True):
            p -= 1e20 * g
    for name, value in by_hand.state_dict().items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=0)

    assert not (tmp_path / "student.safetensors").exists()
    records = strict_lines(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["train", "nonfinite_stop"]
    assert records[-1] == {"kind": "nonfinite_stop", "phase": 0, "epoch": 0, "step": 2,
                           "terms": ["ce", "loss"], "gradients": True, "parameters": []}


def test_a_nan_step_stops_the_run_and_keeps_the_checkpoints_before_it(
        digits_subset, make_cnn, tmp_path: Path) -> None:
    data = digits_subset(96)  # 6 steps of 16 per epoch
    student = Disturbed(make_cnn(seed=1), at={5})
    with pytest.raises(NonFiniteError) as caught:
        fit(student, data, tmp_path, epochs=2, checkpoint_every=2, keep_checkpoints=5)
    message = str(caught.value)
    assert message.startswith("training step 5 (phase 0 '0-ce', epoch 1 of 2, batch 5 of 6): "
                              "non-finite loss terms ce=nan, loss=nan and non-finite gradients "
                              "of student.model.blocks.0.0.weight, student.model.blocks.0.1.weight,"
                              " student.model.blocks.0.1.bias and 5 more.")
    # Steps 2 and 4 were saved and nothing after; the newest holds the parameters the run
    # stopped with (step 5 applied no update).
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    for path in checkpoints(tmp_path):
        assert_all_finite(student_weights(path))
    newest = student_weights(checkpoints(tmp_path)[-1])
    for name, value in student.named_parameters():
        assert torch.equal(newest[name], value.detach()), name
    assert not (tmp_path / "student.safetensors").exists()

    # A run without the NaN saves the same step-4 weights (BatchNorm statistics included).
    fit(Disturbed(make_cnn(seed=1), at=set()), data, tmp_path / "clean", epochs=2,
        checkpoint_every=2, keep_checkpoints=10)
    clean = student_weights(tmp_path / "clean" / "checkpoints" / "step-00000004")
    assert clean.keys() == newest.keys()
    for name, value in clean.items():
        assert torch.equal(newest[name], value), name


def test_the_cli_exits_non_zero_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    config = {
        "name": "diverges", "output_dir": str(tmp_path / "out"),
        "data": {"name": "digits"}, "student": {"name": "mlp", "size": "tiny"},
        "recipe": {"name": "ce"},
        "trainer": {"epochs": 2, "batch_size": 64, "progress": False, "checkpoint_every": 1,
                    "optimizer": {"name": "sgd", "lr": 1e20}},
        "evaluation": {"repeats": 1, "threads": 1},
    }
    path = tmp_path / "diverges.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "kdistill.cli", "run", str(path)],
                            capture_output=True, text=True, timeout=240, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kdistill: error: training step 2 (phase 0 '0-ce', epoch 1 of 2")
    assert "Traceback" not in result.stderr + result.stdout
    run_dir = tmp_path / "out" / "diverges"
    assert not (run_dir / "student.safetensors").exists()
    assert not (run_dir / "report.md").exists()
    assert [p.name for p in checkpoints(run_dir)] == ["step-00000001"]
    assert_all_finite(student_weights(checkpoints(run_dir)[0]))
    assert [r["kind"] for r in strict_lines(run_dir / "metrics.jsonl")] == \
        ["train", "nonfinite_stop"]


def test_weights_that_an_update_made_infinite_are_never_saved(digits_subset, make_mlp,
                                                              tmp_path: Path) -> None:
    # Finite loss and gradients, but lr x gradient overflows float32: step 1 is applied and
    # its checkpoint is refused, so nothing non-finite reaches the disk.
    digits = digits_subset(32)
    data = ArrayDataset(1e3 * digits.inputs, digits.labels)
    student = make_mlp(seed=0)
    with pytest.raises(NonFiniteError, match=r"^the weights after training step 1 are "
                       r"non-finite \(student\.features\.1\.weight, student\.head\.weight\), so "
                       r"a checkpoint was not saved"):
        fit(student, data, tmp_path, batch_size=32, checkpoint_every=1,
            optimizer={"name": "sgd", "lr": 3e38, "momentum": 0.0})
    assert checkpoints(tmp_path) == []
    assert not (tmp_path / "student.safetensors").exists()
    assert [r["kind"] for r in strict_lines(tmp_path / "metrics.jsonl")] == ["train"]


# --------------------------------------------------------------------------- skip


def test_skip_mode_skips_exactly_the_nonfinite_step(digits_subset, make_cnn,
                                                    tmp_path: Path) -> None:
    data = digits_subset(96)  # 6 steps of 16 per epoch, 12 in all
    cosine = {"name": "cosine"}  # a skipped step still advances the LR schedule
    skipped = Disturbed(make_cnn(seed=2), at={3})
    result = fit(skipped, data, tmp_path, epochs=2, checkpoint_every=3, on_nonfinite="skip",
                 scheduler=cosine)
    # The reference run changes nothing at step 3 (zero gradient, BatchNorm statistics kept).
    reference = Disturbed(make_cnn(seed=2), at={3}, how="mute")
    fit(reference, data, None, epochs=2, scheduler=cosine)
    final = skipped.state_dict()
    assert_all_finite(final)
    for name, value in reference.state_dict().items():
        assert torch.equal(final[name], value), name
    assert torch.equal(load_file(str(tmp_path / "student.safetensors"))["model.head.weight"],
                       final["model.head.weight"])

    assert result.skipped_steps() == 1
    records = strict_lines(tmp_path / "metrics.jsonl")
    assert [r for r in records if r["kind"] == "skipped_step"] == [
        {"kind": "skipped_step", "phase": 0, "epoch": 0, "step": 3, "terms": ["ce", "loss"],
         "gradients": True, "parameters": ["student.model.blocks.0.0.weight",
                                           "student.model.blocks.0.1.weight",
                                           "student.model.blocks.0.1.bias"]}]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, *range(4, 13)]
    for path in checkpoints(tmp_path):
        assert_all_finite(student_weights(path))


def test_the_report_counts_the_skipped_steps(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    build_from = kdistill_run.build_from

    def disturbed_student(config: Any, data: Any, seed: int, where: str = "model") -> nn.Module:
        model = build_from(config, data, seed, where)
        return Disturbed(model, at={2}) if where == "student" else model

    monkeypatch.setattr(kdistill_run, "build_from", disturbed_student)
    raw = {"name": "skips", "output_dir": str(tmp_path), "data": {"name": "digits"},
           "student": {"name": "mlp", "size": "tiny"}, "recipe": {"name": "ce"},
           "trainer": {"epochs": 1, "batch_size": 256, "progress": False,
                       "on_nonfinite": "skip"},
           "evaluation": {"repeats": 1, "threads": 1}}
    outcome = kdistill_run.run(parse_config(raw))
    assert outcome.fit.skipped_steps() == 1
    report = (tmp_path / "skips" / "report.md").read_text()
    assert "Skipped training steps (non-finite loss or gradients, trainer.on_nonfinite: skip): " \
           "1." in report
    raw.update(name="clean", trainer={**raw["trainer"], "on_nonfinite": "stop"})
    monkeypatch.setattr(kdistill_run, "build_from", build_from)
    kdistill_run.run(parse_config(raw))
    assert "Skipped training steps" not in (tmp_path / "clean" / "report.md").read_text()


def test_skip_mode_gives_up_after_too_many_nonfinite_steps_in_a_row(digits_subset, make_mlp,
                                                                    tmp_path: Path) -> None:
    student = Disturbed(make_mlp(seed=0), at=set(range(3, 100)))
    with pytest.raises(NonFiniteError) as caught:
        fit(student, digits_subset(64), tmp_path, epochs=10, on_nonfinite="skip")
    last = 2 + MAX_CONSECUTIVE_SKIPS
    assert str(caught.value).startswith(f"training step {last} (")
    assert f"{MAX_CONSECUTIVE_SKIPS} steps in a row were non-finite, so on_nonfinite 'skip' " \
           "gives up" in str(caught.value)
    records = strict_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "skipped_step"] == list(range(3, last))
    assert records[-1]["kind"] == "nonfinite_stop" and records[-1]["step"] == last
    assert not (tmp_path / "student.safetensors").exists()


def test_a_resumed_run_goes_on_counting_the_skips_in_a_row(digits_subset, make_mlp,
                                                           tmp_path: Path) -> None:
    data = digits_subset(64)  # 4 steps of 16 per epoch

    class Stopped(Exception):
        pass

    def stop(record: dict[str, Any]) -> None:
        raise Stopped  # after the first epoch's checkpoint

    # The first epoch's steps 3 and 4 are skipped; the fit stops after that epoch's checkpoint.
    with pytest.raises(Stopped):
        fit(Disturbed(make_mlp(seed=0), at={3, 4}), data, tmp_path, epochs=5,
            on_nonfinite="skip", callbacks=[stop])
    assert [r["step"] for r in strict_lines(tmp_path / "metrics.jsonl")
            if r["kind"] == "skipped_step"] == [3, 4]
    # The resumed fit goes on at step 5, where every step is NaN: the run in a row started at
    # step 3, so the tenth is step 12.
    with pytest.raises(NonFiniteError, match=r"^training step 12 \(.*; 10 steps in a row"):
        Distiller(Disturbed(make_mlp(seed=0), at=set(range(1, 100))), None, "ce",
                  run_dir=tmp_path, epochs=5, batch_size=16, progress=False, optimizer=SGD,
                  on_nonfinite="skip").fit(data, resume=True)
    assert [r["step"] for r in strict_lines(tmp_path / "metrics.jsonl")
            if r["kind"] == "skipped_step"] == list(range(3, 12))


def test_trailing_skips_counts_the_skipped_steps_in_a_row() -> None:
    history = [{"kind": "train", "step": 1}, {"kind": "skipped_step", "step": 2},
               {"kind": "train", "step": 3}, {"kind": "skipped_step", "step": 4},
               {"kind": "eval", "step": 5}, {"kind": "skipped_step", "step": 5}]
    assert trailing_skips(history, 5) == 2  # steps 4 and 5; the eval record does not count
    assert trailing_skips(history, 6) == 0  # step 6 trained
    assert trailing_skips(history[:2], 2) == 1
    assert trailing_skips([], 0) == 0


# --------------------------------------------------------------------------- metrics log


def test_the_metrics_log_is_strict_json_and_reads_non_finite_numbers_back(
        tmp_path: Path) -> None:
    record = {"kind": "eval", "step": 3, "eval_pearson": math.nan, "eval_mse": math.inf,
              "low": -math.inf, "ok": 0.5, "nested": {"a/b~": [1.0, math.nan]}, "name": "nan"}
    line = encode_record(record)
    parsed = json.loads(line, parse_constant=lambda token: pytest.fail(token))
    assert parsed["eval_pearson"] is None and parsed["name"] == "nan"
    assert parsed["nonfinite"] == {"/eval_pearson": "nan", "/eval_mse": "inf", "/low": "-inf",
                                   "/nested/a~1b~0/1": "nan"}
    back = decode_record(line)
    assert math.isnan(back["eval_pearson"]) and back["eval_mse"] == math.inf
    assert back["low"] == -math.inf and math.isnan(back["nested"]["a/b~"][1])
    assert "nonfinite" not in back and back["ok"] == 0.5 and back["name"] == "nan"
    assert decode_record(encode_record({"kind": "train", "loss": 1.0})) == \
        {"kind": "train", "loss": 1.0}
    with pytest.raises(ValueError, match="nonfinite"):
        encode_record({"nonfinite": 1})

    log = MetricsLog(tmp_path / "m.jsonl")
    log.write(record)
    log.replace([record, {"kind": "train", "loss": math.nan}])
    strict_lines(tmp_path / "m.jsonl")
    assert math.isnan(read_metrics(tmp_path / "m.jsonl")[1]["loss"])


def test_a_run_with_nan_metrics_writes_a_strict_log(digits_subset, make_mlp,
                                                    tmp_path: Path) -> None:
    def evaluator(student: nn.Module, teacher: Any) -> dict[str, float]:
        return {"pearson": math.nan, "accuracy": 0.5}

    Distiller(make_mlp(seed=0), None, "ce", epochs=1, batch_size=32, progress=False,
              run_dir=tmp_path, evaluator=evaluator).fit(digits_subset(32))
    evaluation = [r for r in strict_lines(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert evaluation[0]["eval_pearson"] is None
    assert evaluation[0]["nonfinite"] == {"/eval_pearson": "nan"}
    assert math.isnan(read_metrics(tmp_path / "metrics.jsonl")[-1]["eval_pearson"])
