import math

import pytest
import torch
from torch import nn

from kdistill.evaluate import (
    benchmark_models,
    classification_metrics,
    count_parameters,
    expected_calibration_error,
    measure_latency,
    predict,
    size_on_disk,
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
