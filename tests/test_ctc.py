"""CTC sequence recognition: the ``digit-lines`` data, the CTC loss, greedy decoding and the
error rates, and the CTC models (the CRNN student and the oracle teacher that reads targets)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.batch import TARGET_LENGTHS, collate
from kdistill.data import SequenceDataset, load_dataset
from kdistill.data.digit_lines import compose_lines
from kdistill.engine.phases import Phase
from kdistill.evaluate import (
    benchmark_models,
    ctc_metrics,
    edit_distance,
    greedy_decode,
    predict,
    task_metrics,
)
from kdistill.losses import ctc_loss, frames_needed
from kdistill.models import build_model
from kdistill.recipes import build_recipe
from kdistill.report import markdown_table
from kdistill.taps import run_model

U = -100
SHAPE = (1, 8, 20)  # a short line image: T = 10 frames for the CRNN


# ------------------------------------------------------------------------------------ data


def small_lines(seed: int = 3):
    return load_dataset("digit-lines", train_lines=40, test_lines=12, seed=seed)


def test_digit_lines_shapes_targets_and_batches() -> None:
    data = small_lines()
    assert data.task == "ctc" and data.num_classes == 11
    assert data.label_names == [*"0123456789", "<blank>"]
    assert data.input_shape == (1, 8, 5 * (8 + 3))  # max_length * (8 + max_gap) columns
    assert data.train.inputs.shape == (40, 1, 8, 55) and data.test.inputs.shape == (12, 1, 8, 55)
    labels, lengths = data.train.labels, data.train.target_lengths
    assert labels.shape == (40, 5) and labels.dtype == torch.int64
    assert set(lengths.tolist()) == {3, 4, 5}
    for row, length in zip(labels, lengths, strict=True):  # digits, then padding
        assert ((row[:length] >= 0) & (row[:length] <= 9)).all() and (row[length:] == U).all()
    batch = collate([data.train[i] for i in (4, 0, 7)])
    assert batch["input"].shape == (3, 1, 8, 55) and batch["labels"].shape == (3, 5)
    assert batch[TARGET_LENGTHS].tolist() == lengths[[4, 0, 7]].tolist()
    assert batch["index"].tolist() == [4, 0, 7]


def test_digit_lines_are_a_function_of_the_seed() -> None:
    first, again, other = small_lines(3), small_lines(3), small_lines(4)
    for split in ("train", "test"):
        assert torch.equal(getattr(first, split).inputs, getattr(again, split).inputs)
        assert torch.equal(getattr(first, split).labels, getattr(again, split).labels)
    assert not torch.equal(first.train.labels, other.train.labels)
    assert not torch.equal(first.test.inputs, other.test.inputs)


def test_lines_paste_the_drawn_digits_left_to_right_after_gaps() -> None:
    """Each digit image is pasted after a gap of 0..max_gap blank columns, in the order of
    the target; the rest of the line is blank."""
    images = np.stack([np.full((8, 8), value, dtype=np.float32) for value in (0.2, 0.5, 0.9)])
    digits = np.array([7, 2, 5])
    lines, targets = compose_lines(images, digits, 30, 2, 4, 2, np.random.default_rng(0))
    assert lines.shape == (30, 1, 8, 4 * 10) and targets.shape == (30, 4)
    value_of = {0.2: 7, 0.5: 2, 0.9: 5}
    gaps = set()
    for line, target in zip(lines[:, 0], targets, strict=True):
        columns = line[0]  # every row of a pasted image holds its one value
        assert (line == columns).all()
        read, gap, column = [], 0, 0
        while column < len(columns):
            if columns[column] == 0:
                gap, column = gap + 1, column + 1
                continue
            block = columns[column:column + 8]
            assert (block == block[0]).all()  # a whole image, never cut
            read.append(value_of[round(float(block[0]), 1)])
            gaps.add(gap)
            gap, column = 0, column + 8
        length = int((target != U).sum())
        assert 2 <= length <= 4 and read == target[:length].tolist()
    assert gaps == {0, 1, 2}  # every allowed gap occurs, no larger one


def test_digit_lines_show_their_targets_drawn_from_their_own_pool() -> None:
    """Scanning each line left to right finds its target digits, in order, as whole images of
    its split's pool (the digits split stratified with the data seed), never of the other's."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    pools = train_test_split(np.arange(len(images)), test_size=0.25, random_state=3,
                             stratify=digits.target)
    data = small_lines(3)
    for split, pool, other in ((data.train, pools[0], pools[1]),
                               (data.test, pools[1], pools[0])):
        for line, target, length in zip(split.inputs[:, 0].numpy(), split.labels,
                                        split.target_lengths, strict=True):
            wanted, column, found = target[:length].tolist(), 0, []
            while column <= line.shape[1] - 8 and len(found) < len(wanted):
                window = line[:, column:column + 8]
                matches = pool[(images[pool] == window).all(axis=(1, 2))]
                if len(matches) and digits.target[matches[0]] == wanted[len(found)]:
                    found.append(int(digits.target[matches[0]]))
                    assert not (images[other] == window).all(axis=(1, 2)).any()
                    column += 8
                else:
                    column += 1
            assert found == wanted


def test_digit_lines_refuse_bad_options() -> None:
    with pytest.raises(ValueError, match=r"need 1 <= min_length <= max_length, got 4 and 3"):
        load_dataset("digit-lines", min_length=4, max_length=3)
    with pytest.raises(ValueError, match=r"max_gap >= 0, got 5, 5 and -1"):
        load_dataset("digit-lines", train_lines=5, test_lines=5, max_gap=-1)


def test_sequence_dataset_keeps_lengths_through_subsets() -> None:
    labels = torch.tensor([[1, 2, U], [3, U, U], [U, U, U]])
    data = SequenceDataset(torch.zeros(3, 1, 2, 2), labels)
    assert data.target_lengths.tolist() == [2, 1, 0]
    assert data.select([2, 0]).target_lengths.tolist() == [0, 2]
    hidden = data.with_labels(torch.tensor([[1, U, U], [U, U, U], [4, 4, 4]]))
    assert hidden.target_lengths.tolist() == [1, 0, 3]
    assert data[1][TARGET_LENGTHS].item() == 1


def test_sequence_dataset_refuses_gaps_and_float_targets() -> None:
    with pytest.raises(ValueError, match=r"target sequence 1 has a token after padding \(-100\): "
                                         r"\[3, -100, 4\]; pad only at the end"):
        SequenceDataset(torch.zeros(2, 4), torch.tensor([[1, 2, U], [3, U, 4]]))
    with pytest.raises(ValueError, match=r"integer token ids \[samples, tokens\], got "
                                         r"torch.float32 of shape \(2,\)"):
        SequenceDataset(torch.zeros(2, 4), torch.tensor([1.0, 2.0]))


# ------------------------------------------------------------------------------------ loss


def brute_force_nll(logits: torch.Tensor, target: list[int]) -> float:
    """-log p(target | x): the probabilities of every path that reads as ``target`` (repeats
    merged, then blanks - the last class - removed), summed by enumeration."""
    probs = logits.double().softmax(-1)
    frames, classes = probs.shape
    blank, total = classes - 1, 0.0
    for path in itertools.product(range(classes), repeat=frames):
        merged = [c for t, c in enumerate(path) if t == 0 or c != path[t - 1]]
        if [c for c in merged if c != blank] == target:
            total += float(torch.prod(probs[torch.arange(frames), list(path)]))
    return -math.log(total)


def test_ctc_loss_is_the_path_sum_per_target_token() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 3) * 2  # classes 0, 1 and the blank 2
    labels = torch.tensor([[0, 1, U], [1, 1, U], [U, U, U], [0, 1, 0]])
    lengths = torch.tensor([2, 2, 0, 3])  # row 2 is hidden; "1 1" needs a blank between
    expected = sum(brute_force_nll(logits[i], labels[i, :lengths[i]].tolist())
                   for i in (0, 1, 3)) / 7
    assert ctc_loss(logits, labels, lengths).item() == pytest.approx(expected, rel=1e-5)


def test_ctc_loss_ignores_hidden_targets() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 3, requires_grad=True)
    labels, lengths = torch.tensor([[1, 0], [U, U]]), torch.tensor([2, 0])
    value = ctc_loss(logits, labels, lengths)
    assert value.item() == pytest.approx(brute_force_nll(logits[0].detach(), [1, 0]) / 2,
                                         rel=1e-5)
    value.backward()
    assert logits.grad[0].abs().sum() > 0 and torch.equal(logits.grad[1], torch.zeros(4, 3))
    nothing = ctc_loss(logits, torch.full((2, 2), U), torch.tensor([0, 0]))
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_frames_needed_counts_a_blank_between_repeats() -> None:
    assert frames_needed(torch.tensor([3, 3, 1, 1, 1])) == 8
    assert frames_needed(torch.tensor([2])) == 1 and frames_needed(torch.tensor([], dtype=int)) == 0


@pytest.mark.parametrize(("logits", "labels", "lengths", "message"), [
    (torch.zeros(2, 11), torch.tensor([[1, U], [2, 3]]), torch.tensor([1, 2]),
     r"ctc_loss: CTC needs per-frame logits \[batch, frames, classes\] with a blank class last, "
     r"got logits of shape \(2, 11\); the model must give one distribution per frame"),
    (torch.zeros(2, 6, 11), torch.tensor([[1, U], [10, 3]]), torch.tensor([1, 2]),
     r"row 1, position 0: token 10 is not in 0 \.\. 9 \(class 10 is the blank\)"),
    (torch.zeros(2, 6, 11), torch.tensor([[1, 4], [2, 3]]), torch.tensor([1, 2]),
     r"row 0: after its 1 tokens the labels must be -100 \(padding\), got 4 at position 1"),
    (torch.zeros(2, 2, 11), torch.tensor([[1, U], [2, 2]]), torch.tensor([1, 2]),
     r"row 1: a target of 2 tokens needs at least 3 frames, the model gives 2"),
    (torch.zeros(2, 6, 11), torch.tensor([[1, U], [2, 3]]), torch.tensor([1, 3]),
     r"row 1: target length 3 is not in 0 \.\. 2"),
    (torch.zeros(2, 6, 11), torch.tensor([[1, U], [2, 3]]), torch.tensor([1.0, 2.0]),
     r"target_lengths must be one integer per row \(\[2\]\), got torch.float32"),
    (torch.zeros(2, 6, 11), torch.tensor([1, 2]), torch.tensor([1, 1]),
     r"labels must be integer token ids \[batch, tokens\], got torch.int64 of shape \(2,\)"),
])
def test_ctc_loss_names_what_is_wrong(logits, labels, lengths, message) -> None:
    with pytest.raises(ValueError, match=message):
        ctc_loss(logits, labels, lengths)


def test_a_target_that_fits_its_frames_exactly_is_accepted() -> None:
    value = ctc_loss(torch.zeros(1, 3, 11), torch.tensor([[2, 2]]), torch.tensor([2]))
    assert math.isfinite(value.item())


# ------------------------------------------------------------------------ decoding, metrics


def path_logits(paths: list[list[int]], classes: int = 4) -> torch.Tensor:
    """Logits [N, T, C] whose most likely class at frame t is ``paths[n][t]``."""
    return torch.nn.functional.one_hot(torch.tensor(paths), classes).float() * 5.0


def test_greedy_decoding_merges_repeats_then_drops_blanks() -> None:
    b = 3
    logits = path_logits([[0, 0, b, 0, 1, 1, b], [b] * 7, [2, b, 2, 2, b, b, 1]])
    assert greedy_decode(logits) == [[0, 0, 1], [], [2, 2, 1]]


@pytest.mark.parametrize(("a", "b", "distance"), [
    ([], [], 0), ([], [1, 2], 2), ([1, 2, 3], [], 3), ([1, 2, 3], [1, 2, 3], 0),
    ([1, 2, 3], [1, 3], 1), ([1, 2, 3], [1, 4, 3], 1), ([1, 2], [2, 1], 2),
    ([5, 1, 2, 3], [1, 2, 3, 5], 2), ([1, 1, 1], [1], 2)])
def test_edit_distance(a: list[int], b: list[int], distance: int) -> None:
    assert edit_distance(a, b) == distance == edit_distance(b, a)


B3 = 3
READ = [[0, B3, 1, 1, B3], [2, 2, B3, B3, B3], [1, B3, 1, B3, 0], [B3] * 5]  # 0 1 | 2 | 1 1 0 | -
TARGETS = torch.tensor([[0, 1, U], [2, 0, U], [1, 0, U], [U, U, U]])
LENGTHS = torch.tensor([2, 2, 2, 0])


def test_ctc_metrics_against_hand_counts() -> None:
    """Readings 01, 2, 110 and an empty one; targets 01, 20, 10 and a hidden one: edit
    distances 0, 1 (a deletion), 1 (an insertion) over 6 target digits."""
    teacher = path_logits([[0, B3, 1, B3, B3], [2, B3, 0, B3, B3], [1, B3, 1, B3, 0], [B3] * 5])
    metrics = ctc_metrics(path_logits(READ), TARGETS, LENGTHS, teacher)
    assert metrics == pytest.approx({"cer": 2 / 6, "accuracy": 1 / 3, "agreement": 3 / 4})
    assert ctc_metrics(path_logits(READ), TARGETS, LENGTHS).keys() == {"cer", "accuracy"}
    hidden = ctc_metrics(path_logits(READ), torch.full((4, 3), U), torch.zeros(4, dtype=int))
    assert math.isnan(hidden["cer"]) and math.isnan(hidden["accuracy"])


class Passthrough(nn.Module):
    """A "model" whose per-frame logits are its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def ctc_batches(order: list[list[int]]) -> list[dict]:
    """Batches of the rows ``order`` names of the lines READ (as their logits) and TARGETS."""
    data = SequenceDataset(path_logits(READ), TARGETS)
    return [collate([data[i] for i in rows]) for rows in order]


def test_predictions_of_ctc_batches_in_any_order() -> None:
    """Batches out of data order and padded to different target widths give the rows in data
    order and the hand-counted metrics."""
    batches = ctc_batches([[3, 1], [2, 0]])
    batches[0]["labels"] = batches[0]["labels"][:, :2]  # targets of width 2 in this batch
    predictions = predict(Passthrough(), batches)
    assert predictions.task == "ctc" and predictions.mask is None
    assert torch.equal(predictions.logits, path_logits(READ))
    assert torch.equal(predictions.labels, TARGETS)
    assert torch.equal(predictions.target_lengths, LENGTHS)
    assert task_metrics(predictions) == pytest.approx({"cer": 2 / 6, "accuracy": 1 / 3})


def test_ctc_predictions_refuse_unfit_outputs() -> None:
    class Pooled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=1)

    with pytest.raises(ValueError, match=r"CTC data \(the batch has target_lengths\) needs "
                                         r"per-frame logits \[batch, frames, classes\], got "
                                         r"outputs of shape \(2, 4\)"):
        predict(Pooled(), ctc_batches([[0, 1]]))
    short = ctc_batches([[0, 1], [2, 3]])
    short[1]["input"] = short[1]["input"][:, :4]
    with pytest.raises(ValueError, match=r"per-frame outputs of different shapes \(frames, "
                                         r"classes\): \[\(4, 4\), \(5, 4\)\]"):
        predict(Passthrough(), short)
    mixed = ctc_batches([[0, 1], [2, 3]])
    del mixed[1][TARGET_LENGTHS]  # read as token labels, one per frame
    mixed[1]["labels"] = torch.full((2, 5), U)
    with pytest.raises(ValueError, match="some batches carry target_lengths"):
        predict(Passthrough(), mixed)


def test_cer_is_minimised_by_keep_best_and_shown_in_percent() -> None:
    phase = Phase(build_recipe("ce"), 3, keep_best="cer")
    assert phase.improves(0.10, 0.20) and not phase.improves(0.30, 0.20)
    table = markdown_table([{"name": "student", "cer": 0.0425, "accuracy": 0.8}])
    assert table.splitlines()[0] == "| Model | CER | Acc |"
    assert table.splitlines()[2] == "| student | 4.25% | 80.00% |"


def test_benchmark_rows_of_ctc_models() -> None:
    batches = ctc_batches([[0, 1, 2, 3]])
    teacher = Passthrough()
    rows = benchmark_models({"teacher": teacher, "student": Passthrough()}, batches,
                            reference="teacher", teacher_logits_from="teacher",
                            latency_batch=batches[0], threads=1, repeats=1)
    quality = {k: rows[1][k] for k in ("cer", "accuracy", "agreement", "accuracy_share")}
    assert quality == pytest.approx({"cer": 2 / 6, "accuracy": 1 / 3, "agreement": 1.0,
                                     "accuracy_share": 1.0})
    assert "macro_f1" not in rows[1] and "ece" not in rows[1]


# ---------------------------------------------------------------------------------- models


def models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = build_model("crnn", SHAPE, 11, size="tiny")
    torch.manual_seed(seed)
    teacher = build_model("oracle_ctc", SHAPE, 11, channels=[4, 8], dim=8, hidden=8, heads=2)
    return student.eval(), teacher.eval()


def test_crnn_gives_one_distribution_per_frame() -> None:
    student, teacher = models()
    x = torch.rand(3, *SHAPE)
    assert student(x).shape == (3, 10, 11) and teacher(x).shape == (3, 10, 11)
    assert build_model("crnn", (1, 8, 21), 11, channels=[4, 8, 8], dim=8,
                       hidden=8)(x[:1, :, :, :1].expand(1, 1, 8, 21)).shape == (1, 6, 11)
    with pytest.raises(ValueError, match=r"crnn needs line images shaped \[C, H, W\], got "
                                         r"\(8, 20\)"):
        build_model("crnn", (8, 20), 11, size="tiny")
    with pytest.raises(ValueError, match="at least one token class and the blank, got "
                                         "num_classes 1"):
        build_model("crnn", SHAPE, 1, size="tiny")


def test_the_oracle_teacher_reads_the_targets_and_the_student_does_not() -> None:
    student, teacher = models()
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        teacher.targets.weight.normal_(std=2.0)  # make the targets matter at initialisation
        batch = {"input": x, "labels": torch.tensor([[1, 2, 3], [4, 4, U]]),
                 TARGET_LENGTHS: torch.tensor([3, 2])}
        other = {**batch, "labels": torch.tensor([[1, 2, 5], [4, 4, U]])}
        reordered = {**batch, "labels": torch.tensor([[3, 1, 2], [4, 4, U]])}
        given = run_model(teacher, batch)
        changed = run_model(teacher, other)
        assert not torch.allclose(given[0], changed[0], atol=1e-4)  # another digit: changed
        torch.testing.assert_close(given[1], changed[1])  # the same targets: unchanged
        # The targets' order is not read: the alignment must come from the image.
        torch.testing.assert_close(given, run_model(teacher, reordered))
        assert torch.equal(run_model(student, batch), run_model(student, other))
        assert torch.equal(run_model(student, batch), student(x))


def test_the_oracle_teacher_attends_to_the_null_key_without_targets() -> None:
    """No labels, or a row of padding: the frames attend to the null key alone (the blank's
    embedding row), so the output depends on the image and that row only."""
    _, teacher = models()
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        teacher.targets.weight.normal_(std=2.0)
        bare = teacher(x)
        torch.testing.assert_close(teacher(x, labels=torch.full((2, 3), U)), bare)
        frames = teacher.encode(x)
        null = teacher.targets.weight[10].expand(2, 1, -1)
        attended, _ = teacher.attend(frames, null, null)
        torch.testing.assert_close(bare, teacher.decode(frames + attended))
        teacher.targets.weight[10] += 1.0
        assert not torch.allclose(teacher(x), bare, atol=1e-4)


@pytest.mark.parametrize(("labels", "message"), [
    (torch.tensor([[1, 10]]).expand(2, 2), r"target tokens must be in 0 \.\. 9 or -100 "
                                            r"\(padding\), got 10"),
    (torch.tensor([[1, -3], [2, 2]]), r"got -3"),
    (torch.tensor([[1.0, 2.0], [2.0, 2.0]]), r"labels must be integer target sequences \[2, "
                                             r"tokens\] \(padded with -100\), got torch.float32"),
    (torch.tensor([1, 2]), r"got torch.int64 of shape \(2,\)"),
    (torch.tensor([[1, 2]]), r"\[2, tokens\] \(padded with -100\), got torch.int64 of shape "
                             r"\(1, 2\)"),
])
def test_the_oracle_teacher_refuses_bad_targets(labels: torch.Tensor, message: str) -> None:
    _, teacher = models()
    with pytest.raises(ValueError, match=message):
        teacher(torch.rand(2, *SHAPE), labels=labels)


def test_oracle_heads_must_divide_the_frame_size() -> None:
    with pytest.raises(ValueError, match="oracle_ctc: dim 10 must be a multiple of heads 4"):
        build_model("oracle_ctc", SHAPE, 11, channels=[4], dim=10, hidden=4, heads=4)


def test_labels_for_other_rows_than_the_logits_are_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"^ctc_loss: labels of shape \(3, 2\) for 2 rows of "
                                         r"logits$"):
        ctc_loss(torch.zeros(2, 5, 4), torch.zeros(3, 2, dtype=torch.long),
                 torch.tensor([2, 2, 2]))
