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
    assert by_name["student"]["params"] == 15
    assert by_name["student"]["speedup"] > 0 and by_name["student"]["batch_size"] == 8


def test_benchmark_models_rejects_unknown_reference():
    with pytest.raises(ValueError, match="reference 'missing'"):
        benchmark_models({"a": nn.Linear(2, 2)}, [], reference="missing",
                         latency_batch={"input": torch.zeros(1, 2)})
