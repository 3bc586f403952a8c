"""Evaluation of token classification and regression models, checked against metrics computed
here by hand with numpy (no scikit-learn or SciPy in the expected values)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.evaluate import (
    benchmark_models,
    classification_metrics,
    evaluate_model,
    predict,
    predict_source,
    regression_metrics,
    task_of,
)
from kdistill.taps import Taps

# --------------------------------------------------------------------------- references


def macro_f1_by_hand(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean F1 over the classes seen in the labels or the predictions."""
    scores = []
    for c in np.union1d(labels, predicted):
        tp = np.sum((predicted == c) & (labels == c))
        fp = np.sum((predicted == c) & (labels != c))
        fn = np.sum((predicted != c) & (labels == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def ece_by_hand(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Bins ((m-1)/M, m/M]: sum over bins of |B|/N |accuracy - mean confidence|."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for m in range(n_bins):
        low, high = m / n_bins, (m + 1) / n_bins
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = np.mean(predicted[inside] == labels[inside]) - confidence[inside].mean()
            total += inside.mean() * abs(gap)
    return total


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of values without ties."""
    assert len(np.unique(x)) == len(x)
    return np.argsort(np.argsort(x)).astype(float)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


# --------------------------------------------------------------------------- token classification

# Two sentences, 4 positions, 3 classes. Sentence 1 has one padding position (mask 0) and one
# special token (label -100, mask 1); sentence 2 has two padding positions. Padding carries
# garbage: large logits and labels that would count as wrong if they were looked at.
TOKEN_LOGITS = torch.tensor([
    [[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 9.0, 0.0]],
    [[0.0, 1.0, 0.0], [2.0, 0.0, 1.0], [9.0, 0.0, 0.0], [0.0, 0.0, 9.0]],
])
TOKEN_LABELS = torch.tensor([[0, 1, -100, 2], [1, 2, 1, 1]])
TOKEN_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
TEACHER_TOKEN_LOGITS = torch.tensor([
    [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
    [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
])


def test_token_metrics_ignore_padding_and_match_hand_computation():
    metrics = classification_metrics(TOKEN_LOGITS, TOKEN_LABELS, TEACHER_TOKEN_LOGITS,
                                     mask=TOKEN_MASK)
    # Labelled tokens inside the mask: (0,0) y0 p0, (0,1) y1 p1, (1,0) y1 p1, (1,1) y2 p0.
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    labels, predicted = np.array([0, 1, 1, 2]), np.array([0, 1, 1, 0])
    # class 0: P 1/2 R 1 -> 2/3; class 1: 1; class 2: 0.
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics["macro_f1"] == pytest.approx(macro_f1_by_hand(labels, predicted))
    logits = TOKEN_LOGITS.numpy()[[0, 0, 1, 1], [0, 1, 0, 1]]
    assert metrics["ece"] == pytest.approx(ece_by_hand(softmax(logits), labels))
    # Agreement over the five mask tokens, the special token included: student 0,1,2 | 1,0;
    # teacher 0,0,2 | 1,2 -> 3 of 5.
    assert metrics["agreement"] == pytest.approx(3 / 5)


def test_token_agreement_without_mask_uses_labelled_tokens():
    labels = TOKEN_LABELS.masked_fill(TOKEN_MASK == 0, -100)  # padding labelled -100
    metrics = classification_metrics(TOKEN_LOGITS, labels, TEACHER_TOKEN_LOGITS)
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    # The special token (label -100) no longer counts: 0,1 | 1,0 against 0,0 | 1,2 -> 2 of 4.
    assert metrics["agreement"] == pytest.approx(2 / 4)


def test_token_padding_garbage_does_not_change_metrics():
    garbage_logits, garbage_labels = TOKEN_LOGITS.clone(), TOKEN_LABELS.clone()
    garbage_logits[TOKEN_MASK == 0] = torch.tensor([-5.0, 7.0, 3.0])
    garbage_labels[TOKEN_MASK == 0] = 0
    teacher = TEACHER_TOKEN_LOGITS.clone()
    teacher[TOKEN_MASK == 0] = torch.tensor([0.0, 1.0, 0.0])
    assert (classification_metrics(garbage_logits, garbage_labels, teacher, mask=TOKEN_MASK)
            == classification_metrics(TOKEN_LOGITS, TOKEN_LABELS, TEACHER_TOKEN_LOGITS,
                                      mask=TOKEN_MASK))


def test_token_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 3\).*\(2, 3\)"):
        classification_metrics(TOKEN_LOGITS, TOKEN_LABELS[:, :3])
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3\)"):
        classification_metrics(TOKEN_LOGITS, TOKEN_LABELS, mask=TOKEN_MASK[:, :3])
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 1\) fit no task"):
        task_of(torch.zeros(2, 4, 3, 1))


class Echo(nn.Module):
    """Returns its input as outputs; dropout makes train and eval mode differ."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x)


def token_batches() -> list[dict[str, torch.Tensor]]:
    """TOKEN_* in two shuffled batches of different lengths: sample 1 first (cut to its two
    real tokens plus one padding position), then sample 0."""
    return [
        {"input": TOKEN_LOGITS[1:, :3], "labels": TOKEN_LABELS[1:, :3],
         "attention_mask": TOKEN_MASK[1:, :3], "index": torch.tensor([1])},
        {"input": TOKEN_LOGITS[:1], "labels": TOKEN_LABELS[:1],
         "attention_mask": TOKEN_MASK[:1], "index": torch.tensor([0])},
    ]


def test_predict_orders_token_rows_by_index_and_pads_shorter_batches():
    result = predict(Echo().train(), token_batches())
    assert result.logits.shape == (2, 4, 3) and result.task == "token_classification"
    assert torch.equal(result.logits[0], TOKEN_LOGITS[0])
    assert torch.equal(result.logits[1, :3], TOKEN_LOGITS[1, :3])
    # The position sample 1 never had is padded: zero logits, label -100, mask off.
    assert torch.equal(result.logits[1, 3], torch.zeros(3))
    assert result.labels.tolist() == [[0, 1, -100, 2], [1, 2, 1, -100]]
    assert result.mask.tolist() == TOKEN_MASK.bool().tolist()


def test_evaluate_model_on_tokens_matches_hand_computation():
    teacher = predict(Echo(), [{"input": TEACHER_TOKEN_LOGITS, "index": torch.arange(2)}])
    metrics = evaluate_model(Echo(), token_batches(), "cpu", teacher.logits)
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    assert metrics["agreement"] == pytest.approx(3 / 5)
    assert set(metrics) == {"accuracy", "macro_f1", "ece", "agreement"}


# --------------------------------------------------------------------------- regression

SCORES = np.array([0.1, 0.9, 0.4, 0.35, 0.8, 0.2, 0.6])
GOLD = np.array([0.0, 1.0, np.nan, 0.5, 0.7, 0.1, np.nan])
TEACHER = np.array([0.2, 0.8, 0.3, 0.5, 0.9, 0.0, 0.45])


def test_regression_metrics_skip_nan_labels_and_match_numpy():
    metrics = regression_metrics(torch.tensor(SCORES), torch.tensor(GOLD),
                                 torch.tensor(TEACHER).unsqueeze(1))
    known = ~np.isnan(GOLD)
    s, y = SCORES[known], GOLD[known]
    assert metrics["mse"] == pytest.approx(np.mean((s - y) ** 2))
    assert metrics["pearson"] == pytest.approx(pearson(s, y))
    assert metrics["spearman"] == pytest.approx(pearson(ranks(s), ranks(y)))
    # Against the teacher: every sample, labelled or not.
    assert metrics["mse_teacher"] == pytest.approx(np.mean((SCORES - TEACHER) ** 2))
    assert metrics["pearson_teacher"] == pytest.approx(pearson(SCORES, TEACHER))
    assert metrics["spearman_teacher"] == pytest.approx(pearson(ranks(SCORES), ranks(TEACHER)))


def test_regression_scores_at_unknown_labels_change_only_teacher_metrics():
    base = regression_metrics(torch.tensor(SCORES), torch.tensor(GOLD), torch.tensor(TEACHER))
    moved = SCORES.copy()
    moved[np.isnan(GOLD)] = [5.0, -3.0]
    other = regression_metrics(torch.tensor(moved), torch.tensor(GOLD), torch.tensor(TEACHER))
    for key in ("mse", "pearson", "spearman"):
        assert other[key] == pytest.approx(base[key])
    for key in ("mse_teacher", "pearson_teacher", "spearman_teacher"):
        assert other[key] != pytest.approx(base[key])


def test_regression_correlations_are_nan_when_undefined():
    constant = regression_metrics(torch.ones(4), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert constant["mse"] == pytest.approx(np.mean((1 - np.arange(4.0)) ** 2))
    assert math.isnan(constant["pearson"]) and math.isnan(constant["spearman"])
    unlabelled = regression_metrics(torch.ones(3), torch.full((3,), float("nan")))
    assert all(math.isnan(unlabelled[k]) for k in ("mse", "pearson", "spearman"))
    assert "pearson_teacher" not in unlabelled


def test_regression_shape_errors_name_the_field():
    with pytest.raises(ValueError, match=r"labels of shape \(3,\): expected \[4\]"):
        regression_metrics(torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"teacher outputs of shape \(4, 2\)"):
        regression_metrics(torch.zeros(4), torch.zeros(4), torch.zeros(4, 2))


def regression_batches(order: list[list[int]], labelled: bool = True) -> list[dict]:
    scores, gold = torch.tensor(SCORES, dtype=torch.float32), torch.tensor(GOLD)
    return [{"input": scores[rows], "index": torch.tensor(rows),
             **({"labels": gold[rows]} if labelled else {})} for rows in order]


def test_predict_orders_regression_rows_and_marks_missing_labels_nan():
    result = predict(Echo().train(), regression_batches([[4, 1, 6], [0, 5], [3, 2]]))
    assert result.task == "regression"
    assert torch.equal(result.logits, torch.tensor(SCORES, dtype=torch.float32))
    assert np.array_equal(result.labels.numpy(), GOLD.astype(np.float32), equal_nan=True)
    bare = predict(Echo(), regression_batches([[1, 0]], labelled=False))
    assert bare.labels.dtype == torch.float32 and torch.isnan(bare.labels).all()


def test_evaluate_model_on_regression_reports_gold_and_teacher_correlations():
    batches = regression_batches([[6, 2, 0], [5, 1, 3, 4]])
    metrics = evaluate_model(Echo(), batches, "cpu", torch.tensor(TEACHER))
    known = ~np.isnan(GOLD)
    assert metrics["pearson"] == pytest.approx(pearson(SCORES[known], GOLD[known]), abs=1e-6)
    assert metrics["pearson_teacher"] == pytest.approx(pearson(SCORES, TEACHER), abs=1e-6)
    assert set(metrics) == {"mse", "pearson", "spearman", "mse_teacher", "pearson_teacher",
                            "spearman_teacher"}


def test_integer_regression_labels_of_minus_100_are_unknown():
    batches = [{"input": torch.tensor([[1.0], [2.0], [3.0]]),
                "labels": torch.tensor([1, -100, 3])}]
    result = predict(Echo(), batches)
    assert result.logits.shape == (3, 1)
    assert torch.isnan(result.labels[1]) and result.labels[[0, 2]].tolist() == [1.0, 3.0]
    assert evaluate_model(Echo(), batches, "cpu")["mse"] == pytest.approx(0.0)


# --------------------------------------------------------------------------- sources


class TrainableSource:
    """A source of peers that train: its module has dropout and reports the modes it ran in."""

    def __init__(self) -> None:
        self.module = Echo().train()
        self.seen: list[tuple[bool, bool]] = []

    def trainable_module(self) -> nn.Module:
        return self.module

    def __call__(self, batch):
        self.seen.append((self.module.dropout.training, torch.is_inference_mode_enabled()))
        return Taps({"logits": self.module(batch["input"])})


def test_predict_source_runs_a_trainable_source_in_eval_and_inference_mode():
    source = TrainableSource()
    result = predict_source(source, token_batches(), torch.device("cpu"))
    assert source.seen == [(False, True), (False, True)]
    assert source.module.training and source.module.dropout.training  # restored
    assert torch.equal(result.logits[0], TOKEN_LOGITS[0])  # no dropout: eval mode
    assert not result.logits.is_inference()


def test_predict_source_without_trainable_module_leaves_the_model_alone():
    model = Echo().train()

    def source(batch):
        return Taps({"logits": model(batch["input"])})

    torch.manual_seed(0)
    result = predict_source(source, regression_batches([[0, 1, 2, 3, 4, 5, 6]]),
                            torch.device("cpu"))
    # Dropout stayed on: half of the scores zeroed, the rest doubled.
    values = result.logits.numpy()
    assert model.training
    assert np.all(np.isclose(values, 0) | np.isclose(values, 2 * SCORES))
    assert np.any(np.isclose(values, 0))


# --------------------------------------------------------------------------- comparison


class Shift(nn.Module):
    """Outputs ``x + shift`` (a number, or a vector added to every token's logits)."""

    def __init__(self, shift: float | list[float]) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


def test_benchmark_models_gives_regression_rows():
    batches = regression_batches([[0, 1, 2], [3, 4, 5, 6]])
    models = {"teacher": Shift(0.0), "student": Shift(0.5)}
    rows = benchmark_models(models, batches, reference="teacher", teacher_logits_from="teacher",
                            latency_batch=batches[0], threads=1, repeats=1)
    teacher, student = rows
    assert "accuracy" not in student and "agreement" not in student
    assert teacher["mse_teacher"] == 0.0 and teacher["pearson_teacher"] == pytest.approx(1.0)
    known = ~np.isnan(GOLD)
    assert student["mse"] == pytest.approx(np.mean((SCORES[known] + 0.5 - GOLD[known]) ** 2))
    assert student["mse_teacher"] == pytest.approx(0.25)
    assert student["spearman_teacher"] == pytest.approx(1.0)  # a shift keeps the ranks
    assert student["params"] == 1
    alone = benchmark_models({"student": Shift(0.5)}, batches, reference="student",
                             latency_batch=batches[0], threads=1, repeats=1)[0]
    assert alone["pearson_teacher"] is None
    assert alone["pearson"] == pytest.approx(student["pearson"])


def test_benchmark_models_gives_per_token_rows():
    batches = token_batches()
    models = {"teacher": Shift([0.0, 0.0, 0.0]), "student": Shift([0.0, 0.0, 2.5])}
    teacher, student = benchmark_models(models, batches, reference="teacher",
                                        teacher_logits_from="teacher",
                                        latency_batch=batches[1], threads=1, repeats=1)
    assert teacher["accuracy"] == pytest.approx(3 / 4) and teacher["agreement"] == 1.0
    # Student predictions on the mask tokens: 0, 2, 2 | 2, 2 against labels 0, 1, - | 1, 2 and
    # the teacher's 0, 1, 2 | 1, 0.
    assert student["accuracy"] == pytest.approx(2 / 4)
    assert student["agreement"] == pytest.approx(2 / 5)
    assert student["accuracy_share"] == pytest.approx((2 / 4) / (3 / 4))
    assert "mse" not in student and student["params"] == 3


@pytest.mark.parametrize(("outputs", "labels", "teacher", "message"), [
    (torch.zeros(3, 2), torch.zeros(3), None, "outputs of shape (3, 2): expected [N] or [N, 1]"),
    (torch.zeros(4), torch.zeros(3), None, "labels of shape (3,): expected [4] or [4, 1]"),
    (torch.zeros(4), torch.zeros(4), torch.zeros(1),
     "teacher outputs of shape (1,): expected [4] or [4, 1]"),
])
def test_regression_shape_errors_in_full(outputs, labels, teacher, message):
    with pytest.raises(ValueError) as error:
        regression_metrics(outputs, labels, teacher)
    assert str(error.value) == message


def test_regression_metrics_of_one_and_two_pairs():
    one = regression_metrics(torch.tensor([2.0, 5.0]), torch.tensor([1.0, math.nan]),
                             torch.tensor([0.0, 5.0]))
    assert one["mse"] == 1.0 and math.isnan(one["pearson"]) and math.isnan(one["spearman"])
    assert one["mse_teacher"] == 2.0 and one["pearson_teacher"] == pytest.approx(1.0)
    two = regression_metrics(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.0]))
    assert two["mse"] == 5.0
    assert two["pearson"] == pytest.approx(-1.0) and two["spearman"] == pytest.approx(-1.0)


def test_only_the_undefined_correlation_of_a_constant_side_is_silenced():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constant = regression_metrics(torch.ones(3), torch.tensor([0.0, 1.0, 2.0]))
    assert math.isnan(constant["pearson"])
    with pytest.warns(RuntimeWarning):  # an infinite score is a problem worth a warning
        infinite = regression_metrics(torch.tensor([1.0, 2.0, math.inf]),
                                      torch.tensor([1.0, 2.0, 3.0]))
    assert infinite["mse"] == math.inf and math.isnan(infinite["pearson"])


@pytest.mark.parametrize(("shape", "task"), [
    ((4,), "regression"), ((4, 1), "regression"), ((4, 2), "classification"),
    ((2, 5, 3), "token_classification")])
def test_the_task_follows_the_output_shape(shape, task):
    assert task_of(torch.zeros(shape)) == task


def test_an_output_shape_of_no_task_is_an_error():
    with pytest.raises(ValueError) as error:
        task_of(torch.zeros(2, 3, 4, 5))
    assert str(error.value) == ("model outputs of shape (2, 3, 4, 5) fit no task: expected "
                                "[batch] or [batch, 1] scores, [batch, classes] or "
                                "[batch, tokens, classes] logits")


def test_labels_of_one_column_are_read_as_one_score_per_sample_for_regression_only():
    regression = predict(Echo(), [{"input": torch.tensor([1.0, 2.0, 3.0]),
                                   "labels": torch.tensor([[1.5], [2.0], [math.nan]])}])
    assert regression.labels.shape == (3,)
    assert np.array_equal(regression.labels.numpy(), np.array([1.5, 2.0, np.nan], np.float32),
                          equal_nan=True)
    tokens = predict(Echo(), [{"input": torch.zeros(2, 1, 3), "labels": torch.tensor([[2], [0]])}])
    assert tokens.labels.tolist() == [[2], [0]] and tokens.task == "token_classification"


def test_token_metrics_without_teacher_have_no_agreement():
    with_teacher = classification_metrics(TOKEN_LOGITS, TOKEN_LABELS, TEACHER_TOKEN_LOGITS,
                                          mask=TOKEN_MASK)
    alone = classification_metrics(TOKEN_LOGITS, TOKEN_LABELS, mask=TOKEN_MASK)
    assert "agreement" not in alone
    assert alone == {k: v for k, v in with_teacher.items() if k != "agreement"}
