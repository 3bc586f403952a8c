import math

import pytest
import torch
from torch import nn

from kdistill.evaluate import (
    Predictions,
    benchmark_models,
    classification_metrics,
    count_parameters,
    eval_batches,
    evaluate_model,
    expected_calibration_error,
    measure_latency,
    predict,
    predict_source,
    size_on_disk,
    task_metrics,
)


def test_ece_matches_hand_computation():
    # Two bins: (0, 0.5] and (0.5, 1]; the confidence 0.5 belongs to the first.
    # Bin 1: confidence 0.5, right -> acc 1, conf 0.5, weight 1/4 -> 0.125.
    # Bin 2: 0.75 right, 1.0 wrong, 0.75 right -> acc 2/3, conf 5/6, weight 3/4 -> 0.125.
    # ECE = 0.25 (it would be 0 if 0.5 fell into the second bin).
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.75, 0.0], [1.0, 0.0, 0.0],
                          [0.0, 0.25, 0.75]])
    labels = torch.tensor([0, 1, 2, 2])
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.25)


def test_ece_of_three_bins_with_an_empty_bin():
    # Bins (0, 1/3], (1/3, 2/3], (2/3, 1]: 0.6 right, 0.6 wrong, 0.9 right; the first is empty.
    # ECE = 2/3 * |0.5 - 0.6| + 1/3 * |1 - 0.9| = 0.1.
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.9, 0.1]])
    labels = torch.tensor([0, 0, 0])
    assert expected_calibration_error(probs, labels, n_bins=3) == pytest.approx(0.1)


def test_ece_is_zero_for_confident_correct_predictions():
    probs = torch.eye(3)
    assert expected_calibration_error(probs, torch.arange(3)) == pytest.approx(0.0)


def test_classification_metrics_on_hand_made_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])  # predictions 0, 1, 0, 0 -> 3 of 4 right
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # 0, 0, 0, 1
    metrics = classification_metrics(logits, labels, teacher)
    assert metrics["accuracy"] == pytest.approx(0.75)
    # class 0: precision 2/3, recall 1 -> F1 0.8; class 1: precision 1, recall 1/2 -> 2/3.
    assert metrics["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert metrics["agreement"] == pytest.approx(0.5)
    confidence = torch.tensor([2.0, 0.0]).softmax(0)[0].item()
    assert metrics["ece"] == pytest.approx(abs(0.75 - confidence))


def test_classification_metrics_without_teacher_has_no_agreement():
    metrics = classification_metrics(torch.eye(2), torch.tensor([0, 1]))
    assert "agreement" not in metrics
    assert metrics["accuracy"] == 1.0


def test_unlabelled_rows_are_excluded_from_label_metrics_but_not_agreement():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    labels = torch.tensor([0, -100, 0])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    metrics = classification_metrics(logits, labels, teacher)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["agreement"] == pytest.approx(2 / 3)


def test_all_unlabelled_rows_give_nan_label_metrics():
    metrics = classification_metrics(torch.eye(2), torch.tensor([-100, -100]), torch.eye(2))
    assert math.isnan(metrics["accuracy"]) and math.isnan(metrics["ece"])
    assert metrics["agreement"] == 1.0


def test_mismatched_sizes_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2,\)"):
        classification_metrics(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        classification_metrics(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long),
                               torch.zeros(3, 4))


class Identity(nn.Module):
    """Returns its input as logits; dropout makes train and eval mode differ."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x)


def test_predict_returns_dataset_order_and_restores_train_mode():
    model = Identity().train()
    data = torch.arange(12.0).reshape(6, 2)
    order = [[4, 1, 5], [0, 3, 2]]
    batches = [{"input": data[rows], "labels": torch.tensor(rows), "index": torch.tensor(rows)}
               for rows in order]
    result = predict(model, batches)
    assert model.training and model.dropout.training
    assert torch.equal(result.logits, data)  # eval mode: no dropout, and sorted
    assert result.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert result.logits.dtype == torch.float32 and result.labels.dtype == torch.int64


def test_predict_keeps_mixed_modes_and_fills_missing_labels():
    model = Identity().train()
    model.dropout.eval()
    result = predict(model, [{"input": torch.ones(2, 3)}])
    assert model.training and not model.dropout.training
    assert result.labels.tolist() == [-100, -100]
    assert not result.logits.is_inference()


def test_count_parameters_of_linear():
    assert count_parameters(nn.Linear(3, 2)) == 8


def test_size_on_disk_grows_with_parameters_and_is_about_four_bytes_each():
    small, large = nn.Linear(10, 10), nn.Linear(100, 100)
    assert size_on_disk(large) > size_on_disk(small)
    params = count_parameters(large)
    assert 4 * params <= size_on_disk(large) < 4 * params + 1024


def test_size_on_disk_stores_tied_weights_once():
    model = nn.Sequential(nn.Embedding(50, 20), nn.Linear(20, 50, bias=False))
    model[1].weight = model[0].weight
    assert size_on_disk(model) < 4 * count_parameters(model) + 1024


def test_measure_latency_is_positive_and_restores_threads_and_mode():
    previous = torch.get_num_threads()
    threads = 1 if previous != 1 else 2
    model = nn.Linear(4, 3).train()
    latency = measure_latency(model, {"input": torch.randn(5, 4)}, threads=threads, repeats=3)
    assert torch.get_num_threads() == previous
    assert model.training
    assert latency.median_batch_ms > 0 and latency.per_example_ms > 0
    assert latency.per_example_ms == pytest.approx(latency.median_batch_ms / 5)
    assert (latency.batch_size, latency.threads) == (5, threads)


def test_benchmark_models_reference_speedup_and_teacher_agreement():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    student = nn.Linear(4, 3)
    batches = [{"input": torch.randn(8, 4), "labels": torch.randint(0, 3, (8,)),
                "index": torch.arange(i * 8, i * 8 + 8)} for i in range(2)]
    rows = benchmark_models({"teacher": teacher, "student": student}, batches,
                            reference="teacher", teacher_logits_from="teacher",
                            latency_batch=batches[0], threads=1, repeats=3)
    by_name = {row["name"]: row for row in rows}
    assert [row["name"] for row in rows] == ["teacher", "student"]
    assert by_name["teacher"]["speedup"] == 1.0
    assert by_name["teacher"]["agreement"] == 1.0
    assert by_name["teacher"]["accuracy_share"] == pytest.approx(1.0)
    assert by_name["student"]["params"] == 15 and by_name["student"]["batch_size"] == 8
    # Real timings vary; the arithmetic on them does not (fake-clock values further down).
    assert by_name["student"]["speedup"] == pytest.approx(
        by_name["teacher"]["latency_ms"] / by_name["student"]["latency_ms"])
    inputs = torch.cat([b["input"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    with torch.no_grad():
        said_by_teacher, said_by_student = teacher(inputs).argmax(1), student(inputs).argmax(1)
    accuracy = (said_by_student == labels).double().mean().item()
    assert by_name["student"]["accuracy"] == pytest.approx(accuracy)
    assert by_name["student"]["accuracy_share"] == pytest.approx(
        accuracy / (said_by_teacher == labels).double().mean().item())
    assert by_name["student"]["agreement"] == pytest.approx(
        (said_by_student == said_by_teacher).double().mean().item())


def test_benchmark_models_rejects_unknown_reference():
    with pytest.raises(ValueError, match="reference 'missing'"):
        benchmark_models({"a": nn.Linear(2, 2)}, [], reference="missing",
                         latency_batch={"input": torch.zeros(1, 2)})


# --------------------------------------------------------------------------- benchmark arithmetic
# Time is never measured here: a fake clock stands in for ``time.perf_counter`` and each model
# advances it by a fixed cost per forward pass, so its relative cost is known exactly.


class FakeClock:
    """``perf_counter`` of a machine where only the models' forward passes take time."""

    def __init__(self) -> None:
        self.now = 1000.0  # seconds

    def __call__(self) -> float:
        return self.now


class FixedLogits(nn.Module):
    """Returns a fixed row of log-probabilities per sample (the input is the sample number)
    and costs ``cost_ms`` of fake time per forward pass."""

    def __init__(self, probs: list[list[float]], clock: FakeClock, cost_ms: float) -> None:
        super().__init__()
        self.register_buffer("table", torch.tensor(probs).log())
        self.clock, self.cost_ms = clock, cost_ms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.cost_ms / 1000
        return self.table[x.long().reshape(-1)]


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    import types

    import kdistill.evaluate

    fake = FakeClock()
    monkeypatch.setattr(kdistill.evaluate, "time", types.SimpleNamespace(perf_counter=fake))
    return fake


LABELS = [0, 1, 2, 1, 1]
# Teacher: predictions 0, 1, 2, 0, 1 (4 of 5 right), every confidence 0.85.
TEACHER_PROBS = [[0.85, 0.05, 0.10], [0.05, 0.85, 0.10], [0.05, 0.10, 0.85],
                 [0.85, 0.10, 0.05], [0.10, 0.85, 0.05]]
# Student: predictions 0, 1, 1, 0, 2 (2 of 5 right; 3 of 5 agree with the teacher) with
# confidences 0.9 (right), 0.62 (right), 0.5, 0.92, 0.7 (wrong).
STUDENT_PROBS = [[0.90, 0.05, 0.05], [0.20, 0.62, 0.18], [0.20, 0.50, 0.30],
                 [0.92, 0.04, 0.04], [0.10, 0.20, 0.70]]
BATCH = {"input": torch.arange(5.0)[:, None], "labels": torch.tensor(LABELS),
         "index": torch.arange(5)}


def test_measure_latency_reports_the_time_of_one_forward_pass(clock):
    model = FixedLogits(STUDENT_PROBS, clock, cost_ms=2.5)
    latency = measure_latency(model, BATCH, threads=1, repeats=4)
    assert latency.median_batch_ms == pytest.approx(2.5)
    assert latency.per_example_ms == pytest.approx(2.5 / 5)
    assert (latency.batch_size, latency.threads) == (5, 1)


def markdown_cells(table: str) -> list[dict[str, str]]:
    """The rows of a markdown table as {header: cell}."""
    header, _, *rows = table.splitlines()

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    return [dict(zip(cells(header), cells(row), strict=True)) for row in rows]


def test_benchmark_rows_against_hand_values_and_their_rendering(clock):
    from kdistill.report import markdown_table

    # The teacher does three times the student's work per forward pass.
    teacher = FixedLogits(TEACHER_PROBS, clock, cost_ms=3.0)
    student = FixedLogits(STUDENT_PROBS, clock, cost_ms=1.0)
    rows = benchmark_models({"teacher": teacher, "student": student}, [BATCH],
                            reference="teacher", teacher_logits_from="teacher",
                            latency_batch=BATCH, threads=1, repeats=5)
    by_name = {row["name"]: row for row in rows}
    t, s = by_name["teacher"], by_name["student"]

    assert t["latency_ms"] == pytest.approx(3.0) and s["latency_ms"] == pytest.approx(1.0)
    assert t["speedup"] == 1.0
    assert s["speedup"] == pytest.approx(3.0)  # teacher time / student time, not the inverse
    assert s["per_example_ms"] == pytest.approx(0.2)
    assert s["throughput"] == pytest.approx(5000.0)  # examples per second
    assert t["throughput"] == pytest.approx(5000.0 / 3)

    assert t["accuracy"] == pytest.approx(0.8) and s["accuracy"] == pytest.approx(0.4)
    assert s["accuracy_share"] == pytest.approx(0.4 / 0.8)  # retention: student / teacher
    assert t["accuracy_share"] == pytest.approx(1.0)
    assert s["agreement"] == pytest.approx(3 / 5) and t["agreement"] == 1.0
    # ECE, 15 bins: 0.9 (right) and 0.92 (wrong) share the bin (13/15, 14/15]; the others are
    # alone: (|1 - 1.82| + |1 - 0.62| + 0.5 + 0.7) / 5.
    assert s["ece"] == pytest.approx((0.82 + 0.38 + 0.5 + 0.7) / 5, abs=1e-6)
    assert t["ece"] == pytest.approx(abs(4 - 5 * 0.85) / 5, abs=1e-6)  # one bin
    # Macro-F1. Student, per class (P, R): 0 (1/2, 1) -> 2/3, 1 (1/2, 1/3) -> 2/5, 2 -> 0.
    # Teacher: 0 (1/2, 1) -> 2/3, 1 (1, 2/3) -> 4/5, 2 -> 1.
    assert s["macro_f1"] == pytest.approx((2 / 3 + 2 / 5) / 3)
    assert t["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)

    # The report shows the same numbers: the headline "N x faster" is 3.00x for the student.
    shown = {row["Model"]: row for row in markdown_cells(markdown_table(rows))}
    assert shown["student"]["Speed-up"] == "3.00×" and shown["teacher"]["Speed-up"] == "1.00×"
    assert shown["student"]["Acc/teacher"] == "50.00%"
    assert shown["student"]["Agree"] == "60.00%" and shown["student"]["ECE"] == "48.00%"
    assert shown["student"]["ms/batch"] == "1.00" and shown["teacher"]["ms/batch"] == "3.00"

    # With the student as the reference the teacher is three times slower.
    rows = benchmark_models({"teacher": teacher, "student": student}, [BATCH],
                            reference="student", latency_batch=BATCH, threads=1, repeats=5)
    assert [row["speedup"] for row in rows] == pytest.approx([1 / 3, 1.0])
    assert all(row["agreement"] is None and row["accuracy_share"] is None for row in rows)


# --------------------------------------------------------------------------- timing protocol
# With the fake clock, the number of forward passes tells warm-up, calibration and timed
# passes apart: ``warmup`` untimed passes, one calibration pass, then ``repeats`` samples of as
# many back-to-back passes as fill MIN_SAMPLE_MS (5 ms).


def passes(clock: FakeClock, cost_ms: float, start: float) -> int:
    return round((clock.now - start) * 1000 / cost_ms)


@pytest.mark.parametrize(("cost_ms", "loops"), [(0.6, 9), (2.0, 3), (6.0, 1)])
def test_latency_runs_warmup_calibration_and_enough_passes_per_sample(clock, cost_ms, loops):
    model = FixedLogits(STUDENT_PROBS, clock, cost_ms=cost_ms)
    start = clock.now
    latency = measure_latency(model, BATCH, threads=1, repeats=4, warmup=2)
    assert passes(clock, cost_ms, start) == 2 + 1 + 4 * loops
    assert latency.median_batch_ms == pytest.approx(cost_ms)
    start = clock.now
    default = measure_latency(model, BATCH)  # 3 warm-up passes, 20 samples, 2 threads
    assert passes(clock, cost_ms, start) == 3 + 1 + 20 * loops
    assert (default.batch_size, default.threads) == (5, 2)


def test_benchmark_rows_report_size_threads_and_default_timing(clock):
    teacher = FixedLogits(TEACHER_PROBS, clock, cost_ms=6.0)
    student = FixedLogits(STUDENT_PROBS, clock, cost_ms=6.0)
    start = clock.now
    rows = benchmark_models({"teacher": teacher, "student": student}, [BATCH],
                            reference="teacher", latency_batch=BATCH)
    # Per model: one pass of predict, 3 warm-up passes, 1 calibration pass, 20 samples of 1.
    assert passes(clock, 6.0, start) == 2 * (1 + 3 + 1 + 20)
    for row, model in zip(rows, (teacher, student), strict=True):
        assert row["size_mb"] == size_on_disk(model) / 1_000_000
        assert (row["threads"], row["batch_size"]) == (2, 5)
    rows = benchmark_models({"student": student}, [BATCH], reference="student",
                            latency_batch=BATCH, threads=1, repeats=2)
    assert rows[0]["threads"] == 1


def test_benchmark_models_rejects_an_unknown_teacher():
    with pytest.raises(ValueError) as error:
        benchmark_models({"a": nn.Linear(2, 2)}, [], reference="a", teacher_logits_from="b",
                         latency_batch={"input": torch.zeros(1, 2)})
    assert str(error.value) == "teacher_logits_from 'b' is not among the models: ['a']"


class TokenIds(nn.Module):
    """A Hugging Face style model: keyword ``input_ids``, one logit row per token."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids) * attention_mask[..., None]


def test_the_latency_batch_size_of_a_token_batch_is_its_number_of_sequences():
    batch = {"input_ids": torch.zeros(7, 4, dtype=torch.long),
             "attention_mask": torch.ones(7, 4, dtype=torch.long)}
    latency = measure_latency(TokenIds(), batch, threads=1, repeats=1, warmup=0)
    assert latency.batch_size == 7
    assert latency.per_example_ms == pytest.approx(latency.median_batch_ms / 7)


def test_timings_on_a_gpu_wait_for_its_queued_work(monkeypatch):
    import kdistill.evaluate

    waited: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    kdistill.evaluate._synchronize(torch.device("cpu"))
    assert waited == []
    kdistill.evaluate._synchronize(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]


# --------------------------------------------------------------------------- ECE bins and errors
# Two predictions: confidence 0.86 (right) and 0.87 (wrong). With 15 bins they fall into
# (12/15, 13/15] and (13/15, 14/15]: ECE = (0.14 + 0.87) / 2; with 16 bins (or one) they share
# a bin: |0.14 - 0.87| / 2.
TWO_PROBS = torch.tensor([[0.86, 0.14], [0.87, 0.13]], dtype=torch.float64)
TWO_LABELS = torch.tensor([0, 1])
APART, TOGETHER = (0.14 + 0.87) / 2, abs(0.14 - 0.87) / 2


def test_ece_uses_15_bins_unless_told():
    assert expected_calibration_error(TWO_PROBS, TWO_LABELS) == pytest.approx(APART)
    assert expected_calibration_error(TWO_PROBS, TWO_LABELS, n_bins=16) == pytest.approx(TOGETHER)
    assert expected_calibration_error(TWO_PROBS, TWO_LABELS, n_bins=1) == pytest.approx(TOGETHER)
    assert expected_calibration_error(TWO_PROBS[:1], TWO_LABELS[:1]) == pytest.approx(0.14)
    logits = TWO_PROBS.log().float()
    assert classification_metrics(logits, TWO_LABELS)["ece"] == pytest.approx(APART)
    assert classification_metrics(logits, TWO_LABELS, n_bins=16)["ece"] == \
        pytest.approx(TOGETHER)
    predictions = Predictions(logits, TWO_LABELS)
    assert task_metrics(predictions)["ece"] == pytest.approx(APART)
    assert task_metrics(predictions, n_bins=16)["ece"] == pytest.approx(TOGETHER)


def test_a_confidence_on_a_bin_edge_belongs_to_the_bin_that_ends_there():
    # Ten bins: 0.7 (right) ends (0.6, 0.7]; 0.75 (wrong) is in (0.7, 0.8]. In float64 the edge
    # 0.7 must not be rounded to float32 (0.69999999), which would move 0.7 up a bin.
    probs = torch.tensor([[0.7, 0.3], [0.25, 0.75]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx((0.3 + 0.75) / 2)


@pytest.mark.parametrize(("probs", "labels", "n_bins", "message"), [
    (TWO_PROBS, TWO_LABELS, 0, "n_bins must be at least 1, got 0"),
    (TWO_PROBS, torch.tensor([0, 1, 1]), 15,
     "expected probs [N, C] and labels [N], got probs (2, 2) and labels (3,)"),
    (torch.tensor([0.5, 0.5]), TWO_LABELS, 15,
     "expected probs [N, C] and labels [N], got probs (2,) and labels (2,)"),
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 15,
     "expected_calibration_error needs at least one prediction"),
])
def test_ece_errors(probs, labels, n_bins, message):
    with pytest.raises(ValueError) as error:
        expected_calibration_error(probs, labels, n_bins)
    assert str(error.value) == message


def test_all_unlabelled_rows_give_exactly_the_three_label_metrics_as_nan():
    metrics = classification_metrics(torch.eye(2), torch.tensor([-100, -100]))
    assert set(metrics) == {"accuracy", "macro_f1", "ece"}
    assert all(math.isnan(value) for value in metrics.values())


# ------------------------------------------------------------------------- predict: errors, devices
@pytest.mark.parametrize(("batches", "message"), [
    ([], "predict received no batches"),
    ([{"input": torch.zeros(2, 3), "labels": torch.zeros(3, dtype=torch.long)}],
     "labels of shape (3,) do not match outputs of shape (2, 3): expected labels (2,)"),
    ([{"input": torch.zeros(2, 4, 3), "labels": torch.zeros(2, 4, dtype=torch.long),
       "attention_mask": torch.ones(2, 3)}],
     "attention_mask of shape (2, 3) does not match token logits of shape (2, 4, 3)"),
    ([{"input": torch.zeros(2, 3)}, {"input": torch.zeros(2, 4)}],
     "batches gave outputs of different shapes: [(2, 3), (2, 4)]"),
    ([{"input": torch.zeros(2, 3)}, {"input": torch.zeros(1, 5, 3)}],
     "batches gave outputs of different shapes: [(2, 3), (1, 5, 3)]"),
])
def test_predict_errors_name_the_shapes(batches, message):
    with pytest.raises(ValueError) as error:
        predict(Identity(), batches)
    assert str(error.value) == message


def test_a_classification_batch_may_carry_a_token_attention_mask():
    batch = {"input": torch.eye(2), "labels": torch.tensor([0, 1]),
             "attention_mask": torch.ones(2, 5)}  # a text classifier's batch
    result = predict(Identity(), [batch])
    assert result.mask is None and result.labels.tolist() == [0, 1]


class DeviceProbe(nn.Module):
    """Records the device (and thread count) of each forward's input; its one parameter lives
    on ``device``, its outputs on the CPU."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, device=device))
        self.seen: list[tuple[torch.device, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.device, torch.get_num_threads()))
        return torch.zeros(len(x), 3)


def test_predict_moves_the_batches_to_the_device_asked_or_the_models():
    batches = [{"input": torch.zeros(2, 4)}]
    meta, cpu = torch.device("meta"), torch.device("cpu")
    model = DeviceProbe()
    predict(model, batches)
    predict(model, batches, "meta")
    evaluate_model(model, batches, "meta")
    assert [device for device, _ in model.seen] == [cpu, meta, meta]
    on_meta = DeviceProbe("meta")
    predict(on_meta, batches)
    assert on_meta.seen[0][0] == meta

    def source(batch):
        on_meta.seen.append((batch["input"].device, 0))
        return {"logits": torch.zeros(2, 3)}

    predict_source(source, batches, meta)
    assert on_meta.seen[-1][0] == meta


def test_latency_is_timed_on_the_models_device_with_the_threads_asked():
    model = DeviceProbe("meta")
    measure_latency(model, {"input": torch.zeros(2, 4)}, threads=2, repeats=1, warmup=1)
    assert set(model.seen) == {(torch.device("meta"), 2)}


@pytest.mark.parametrize(("repeats", "warmup"), [(0, 3), (20, -1)])
def test_latency_needs_a_timed_pass_and_no_negative_warmup(repeats, warmup):
    with pytest.raises(ValueError) as error:
        measure_latency(nn.Linear(2, 2), {"input": torch.zeros(1, 2)}, repeats=repeats,
                        warmup=warmup)
    assert str(error.value) == f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}"


def test_evaluation_batches_of_a_loader_are_the_loaders_own():
    from torch.utils.data import DataLoader

    from kdistill.data.base import ArrayDataset

    data = ArrayDataset(torch.arange(10.0).reshape(5, 2), torch.tensor([0, 1, 0, 1, 0]))
    loader = DataLoader(data, batch_size=2)
    batches = eval_batches(loader, batch_size=99)
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    assert torch.equal(batches[2]["input"], data.inputs[4:])
    own = eval_batches(data, batch_size=3)
    assert [b["index"].tolist() for b in own] == [[0, 1, 2], [3, 4]]
