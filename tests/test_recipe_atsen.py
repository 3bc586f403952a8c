"""ATSEN: pseudo-labels and masks on hand-made teacher predictions, the student terms against a
hand computation, the fine-grained EMA (which tensors a seeded step updates, and by how much),
the cosine momentum ramp, and short fits on digits and on the token-classification set (with the
tagging data and the tagger model checked on their own)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from kdistill import Distiller
from kdistill.batch import collate
from kdistill.data.tagging import ENTITY_WORDS, VOCAB_SIZE, load_tagging, make_tagging
from kdistill.models.tagger import Tagger
from kdistill.recipes.atsen import (
    ATSEN,
    PEER,
    TEACHER_A,
    TEACHER_B,
    pseudo_labels,
    sharpen,
    student_terms,
)
from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.taps import Taps
from kdistill.teachers import EMATeacher, PeerTeacher, SourceGroup

CONFIDENT_0 = [6.0, 0.0, 0.0]   # sharpened (k=2): e^12 / (e^12 + 2) = 0.99999 on class 0
UNSURE_0 = [0.5, 0.0, 0.0]      # sharpened: e / (e + 2) = 0.576 on class 0
CONFIDENT_1 = [0.0, 6.0, 0.0]


def sharpened_max(row: list[float], k: float = 2.0) -> float:
    powers = [math.exp(k * v) for v in row]
    return max(powers) / sum(powers)


def test_sharpen_is_the_renormalised_power() -> None:
    z = torch.tensor([[1.0, 0.2, -0.5]])
    p = z.softmax(-1)[0].tolist()
    by_hand = [v**3 / sum(u**3 for u in p) for v in p]
    torch.testing.assert_close(sharpen(z, 3.0)[0], torch.tensor(by_hand))
    # Divided by the soft class frequency over the valid rows (the padding row does not count).
    rows = torch.tensor([[2.0, 0.0], [0.0, 1.0], [9.0, -9.0]])
    p = rows.softmax(-1)
    f = p[:2].sum(0)
    q = p**2 / f
    expected = q / q.sum(-1, keepdim=True)
    got = sharpen(rows, 2.0, torch.tensor([True, True, False]))
    torch.testing.assert_close(got[:2], expected[:2])
    assert sharpened_max(CONFIDENT_0) > 0.99 and sharpened_max(UNSURE_0) < 0.6


def test_pseudo_labels_on_hand_made_token_predictions() -> None:
    """Tokens: confident + agree, agree but unsure, disagree, confident + agree on padding,
    disagree on padding, one teacher unsure."""
    teacher_a = torch.tensor([[CONFIDENT_1, UNSURE_0, CONFIDENT_0, CONFIDENT_0, CONFIDENT_0,
                               CONFIDENT_0]])
    teacher_b = torch.tensor([[CONFIDENT_1, UNSURE_0, CONFIDENT_1, CONFIDENT_0, CONFIDENT_1,
                               UNSURE_0]])
    valid = torch.tensor([[True, True, True, False, False, True]])
    out = pseudo_labels(teacher_a, teacher_b, valid, threshold=0.9, power=2.0)
    assert out.kept.tolist() == [[True, False, False, False, False, False]]
    assert out.labels.tolist() == [[1, -100, -100, -100, -100, -100]]
    assert out.disagree.tolist() == [[False, False, True, False, False, False]]
    # At a threshold below 0.576 the agreeing unsure tokens are kept too, padding still never.
    low = pseudo_labels(teacher_a, teacher_b, valid, threshold=0.5, power=2.0)
    assert low.kept.tolist() == [[True, True, False, False, False, True]]
    assert low.labels.tolist() == [[1, 0, -100, -100, -100, 0]]


def test_pseudo_labels_on_sample_logits_and_shape_errors() -> None:
    teacher_a = torch.tensor([CONFIDENT_0, CONFIDENT_1, UNSURE_0])
    teacher_b = torch.tensor([CONFIDENT_0, CONFIDENT_0, UNSURE_0])
    out = pseudo_labels(teacher_a, teacher_b, torch.ones(3, dtype=torch.bool))
    assert out.labels.tolist() == [0, -100, -100]
    assert out.disagree.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="valid mask"):
        pseudo_labels(teacher_a, teacher_b, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="differ in shape"):
        pseudo_labels(teacher_a, teacher_b[:2], torch.ones(3, dtype=torch.bool))


def test_frequency_lets_a_rare_class_pass_the_threshold() -> None:
    """Nine rows lean to the frequent class 0 and one to class 1: dividing by the frequency
    lifts the rare row's confidence over 0.9 (it is not kept without it)."""
    rows = torch.tensor([[3.0, 0.0]] * 9 + [[0.0, 0.8]])
    valid = torch.ones(10, dtype=torch.bool)
    plain = pseudo_labels(rows, rows, valid, threshold=0.9)
    assert not plain.kept[9]
    assert pseudo_labels(rows, rows, valid, threshold=0.9, frequency=True).kept[9]


def test_student_terms_against_a_hand_computation() -> None:
    z = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [0.3, 0.1, 0.0], [0.0, 0.0, 1.0]])
    t_a = torch.tensor([CONFIDENT_0, CONFIDENT_1, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    t_b = torch.tensor([CONFIDENT_0, CONFIDENT_0, [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    valid = torch.tensor([True, True, True, True])
    targets = pseudo_labels(t_a, t_b, valid)
    assert targets.kept.tolist() == [True, False, False, False]
    assert targets.disagree.tolist() == [False, True, False, True]
    labels = torch.tensor([2, -100, -100, -100])
    values = student_terms(z, labels, t_a, t_b, targets, valid, temperature=2.0)

    def log_softmax(row: list[float], t: float = 1.0) -> list[float]:
        lse = math.log(sum(math.exp(v / t) for v in row))
        return [v / t - lse for v in row]

    def kd(s: list[float], t: list[float]) -> float:
        ls, lt = log_softmax(s, 2.0), log_softmax(t, 2.0)
        return 4.0 * sum(math.exp(b) * (b - a) for a, b in zip(ls, lt, strict=True))

    zl, al, bl = z.tolist(), t_a.tolist(), t_b.tolist()
    assert values["ce"].item() == pytest.approx(-log_softmax(zl[0])[2], rel=1e-6)
    assert values["pseudo"].item() == pytest.approx(-log_softmax(zl[0])[0] / 4, rel=1e-6)
    kd_rows = [(kd(zl[r], al[r]) + kd(zl[r], bl[r])) / 2 for r in (1, 3)]
    assert values["kd"].item() == pytest.approx(sum(kd_rows) / 4, rel=1e-5)


def test_the_source_group_pairs_each_student_with_its_fine_grained_ema(make_mlp,
                                                                       make_cnn) -> None:
    student, peer = make_mlp(), make_cnn(seed=1)
    recipe = ATSEN(seed=7)
    group = recipe.teacher_source(student, peer)
    assert isinstance(group, SourceGroup)
    teacher_a, peers, teacher_b = (group.sources[i] for i in (TEACHER_A, PEER, TEACHER_B))
    assert isinstance(peers, PeerTeacher) and peers.peers[0] is peer
    assert group.trainable_module() is not None
    for ema, followed in ((teacher_a, student), (teacher_b, peer)):
        assert isinstance(ema, EMATeacher)
        assert ema.followed is followed and ema.skip_prob == 0.8
    # Seeds 7 and 8: the two teachers draw different skips.
    assert torch.equal(teacher_a.generator.get_state(),
                       torch.Generator().manual_seed(7).get_state())
    assert torch.equal(teacher_b.generator.get_state(),
                       torch.Generator().manual_seed(8).get_state())
    with pytest.raises(ValueError, match="needs a peer model"):
        recipe.teacher_source(student, None)


def test_momentum_ramps_from_0_8_to_1_on_a_cosine_over_the_phase() -> None:
    """m = 1 - 0.2 (1 + cos(pi t)) / 2 with t the share of the phase's steps done (here 10
    steps per epoch, 40 in all), whatever the budget; the EMA teachers use this schedule."""
    ramp = ATSEN().params.momentum
    for steps_done, expected in ((0, 0.8), (10, 1 - 0.2 * (1 + math.cos(math.pi / 4)) / 2),
                                 (20, 0.9), (30, 1 - 0.2 * (1 + math.cos(3 * math.pi / 4)) / 2),
                                 (40, 1.0)):
        state = TrainState(epoch_progress=steps_done / 10, steps_per_epoch=10, total_steps=40)
        assert ramp.at(state) == pytest.approx(expected)
    assert ramp.at(TrainState(epoch_progress=1.0, steps_per_epoch=5, total_steps=10)) == \
        pytest.approx(0.9)
    group = ATSEN().teacher_source(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    state = TrainState(epoch_progress=0.5, steps_per_epoch=4, total_steps=8)
    assert group.sources[TEACHER_A].momentum.at(state) == pytest.approx(
        1 - 0.2 * (1 + math.cos(math.pi / 4)) / 2)
    fixed = ScheduleConfig(start=0.95)
    assert ATSEN(momentum=fixed).teacher_source(torch.nn.Linear(2, 2), torch.nn.Linear(
        2, 2)).sources[TEACHER_B].momentum == fixed


def test_a_seeded_step_updates_exactly_the_drawn_tensors(make_cnn, take_snapshot) -> None:
    """Two steps of the fine-grained EMA: tensor i is updated iff u_i >= 0.8, with u drawn
    independently here from torch.Generator seeded like the source; the updated ones follow
    theta_t <- m theta_t + (1 - m) theta_s, the others keep their values, buffers are copied."""
    peer = make_cnn(seed=1)
    recipe = ATSEN(seed=3)
    ema = recipe.teacher_source(make_cnn(), peer).sources[TEACHER_B]
    ema.bind(["logits"], torch.device("cpu"))
    names = [n for n, _ in peer.named_parameters()]
    generator = torch.Generator().manual_seed(4)  # teacher B: seed + 1
    updated_somewhere, skipped_somewhere = False, False
    for step, progress in enumerate((1.0, 2.0)):  # m = 0.829, then 0.9 (4 one-step epochs)
        with torch.no_grad():
            for p in peer.parameters():
                p.add_(1.0 + step)
            for b in peer.buffers():
                b.add_(1)
        before = take_snapshot(ema.model)
        state = TrainState(epoch_progress=progress, steps_per_epoch=1, total_steps=4)
        m = recipe.params.momentum.at(state)
        assert 0.8 < m < 0.95
        ema.after_step(peer, state)
        draws = torch.rand(len(names), generator=generator)
        expected = [n for n, u in zip(names, draws.tolist(), strict=True) if u >= 0.8]
        assert ema.last_updated == expected
        now, source = ema.model.state_dict(), peer.state_dict()
        for name in names:
            if name in expected:
                torch.testing.assert_close(now[name], m * before[name] + (1 - m) * source[name])
            else:
                assert torch.equal(now[name], before[name])
        assert all(torch.equal(now[n], source[n]) for n, _ in peer.named_buffers())
        updated_somewhere |= bool(expected)
        skipped_somewhere |= len(expected) < len(names)
    assert updated_somewhere and skipped_somewhere


def test_digits_fit_trains_both_students_and_both_teachers(digits_subset, make_mlp, make_cnn,
                                                           take_snapshot) -> None:
    """Warm-up for 2 of 4 epochs: the loss is ce + peer_ce during it and the sum of all six
    terms after it; every tensor of both students and both teachers moves. (Teachers that
    follow fast - half-way EMA steps, no skips - so that they agree on some images soon.)"""
    student, peer = make_mlp(), make_cnn(seed=1)
    before = {"student": take_snapshot(student), "peer": take_snapshot(peer)}
    recipe = ATSEN(warmup_epochs=2, threshold=0.2, skip_prob=0.0,
                   momentum=ScheduleConfig(start=0.5))
    distiller = Distiller(student, peer, recipe, epochs=4, batch_size=32, progress=False,
                          optimizer={"lr": 0.05})
    result = distiller.fit(digits_subset(96), digits_subset(32))
    names = {"ce", "pseudo", "kd", "peer_ce", "peer_pseudo", "peer_kd"}
    train = [r for r in result.history if r["kind"] == "train"]
    assert all(names <= set(r) for r in train)
    for record in train:
        on = record["epoch"] >= 2
        expected = sum(record[n] for n in names if on or n.endswith("ce"))
        assert record["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    later = [r for r in train if r["epoch"] >= 2]
    assert any(r["pseudo"] > 0 for r in later) and any(r["peer_pseudo"] > 0 for r in later)
    group = distiller.teacher
    models = {"student": student, "peer": peer, "teacher A": group.sources[TEACHER_A].model,
              "teacher B": group.sources[TEACHER_B].model}
    for label, model in models.items():
        start = before["peer" if label in ("peer", "teacher B") else "student"]
        state = take_snapshot(model)
        unchanged = [n for n, _ in model.named_parameters() if torch.equal(state[n], start[n])]
        assert unchanged == [], f"{label}: {unchanged} did not change"


def test_token_classification_fit(take_snapshot) -> None:
    """A BiLSTM student and a convolutional peer on the tagging set: token terms in token
    units, both students train, the evaluation is per token."""
    data = load_tagging(samples=120)
    torch.manual_seed(0)
    student = Tagger(data.input_shape, data.num_classes, vocab_size=VOCAB_SIZE, embed_dim=8,
                     hidden=8)
    peer = Tagger(data.input_shape, data.num_classes, vocab_size=VOCAB_SIZE, embed_dim=8,
                  hidden=8, encoder="conv")
    before = take_snapshot(peer)
    recipe = ATSEN(warmup_epochs=1, threshold=0.5, skip_prob=0.0,
                   momentum=ScheduleConfig(start=0.5))
    batch = _batch(data.train, 4)
    logits = [Taps({"logits": m(batch["input"], batch["attention_mask"]).detach()})
              for m in (student, peer, peer)]
    terms = recipe.terms(logits[0], logits[0].with_members(logits), batch,
                         TrainState(epoch_progress=2.0))
    assert {t.unit for n, t in terms.items() if not n.endswith("ce")} == {"tokens"}
    assert {terms["ce"].unit, terms["peer_ce"].unit} == {"labeled"}
    # Garbage at padded positions reaches no term.
    pad = batch["attention_mask"] == 0
    assert pad.any()
    spoiled = [Taps({"logits": t["logits"].masked_fill(pad[..., None], float("nan"))})
               for t in logits]
    again = recipe.terms(spoiled[0], spoiled[0].with_members(spoiled), batch,
                         TrainState(epoch_progress=2.0))
    for name, term in terms.items():
        torch.testing.assert_close(again[name].value, term.value)
    result = Distiller(student, peer, recipe, epochs=3, batch_size=30, progress=False,
                       optimizer={"lr": 0.01}).fit(data.train, data.test)
    train = [r for r in result.history if r["kind"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert any(r["pseudo"] > 0 for r in train if r["epoch"] >= 1)
    assert any(not torch.equal(v, before[k]) for k, v in take_snapshot(peer).items())
    assert 0.0 <= result.evaluations()[-1]["eval_accuracy"] <= 1.0


def _batch(dataset, count: int) -> dict:
    return collate([dataset[i] for i in range(count)])


# -- the tagging data set and the tagger --------------------------------------------------------
def test_distant_labels_only_miss_mentions() -> None:
    arrays = make_tagging(samples=400, coverage=0.6, seed=1)
    valid = arrays.mask == 1
    assert np.array_equal(arrays.gold == -100, ~valid)
    assert np.array_equal(arrays.distant == -100, ~valid)
    assert (arrays.ids[~valid] == 0).all() and (arrays.ids[valid] > 0).all()
    # The distant tag is the gold one or O (a missed mention), never another type.
    tagged = arrays.distant > 0
    assert np.array_equal(arrays.distant[tagged], arrays.gold[tagged])
    entity = arrays.gold > 0
    missed = entity & (arrays.distant == 0)
    assert 0.3 < missed.sum() / entity.sum() < 0.5
    # Entity tags sit on entity words of their type only.
    for kind, words in ENTITY_WORDS.items():
        assert np.isin(arrays.ids[arrays.gold == kind], words).all()
    # Padding only at the end, and a seed gives the same set.
    assert (np.diff(arrays.mask, axis=1) <= 0).all()
    assert np.array_equal(make_tagging(samples=400, seed=1).ids, arrays.ids)


def test_the_splits_carry_distant_train_and_gold_test_labels() -> None:
    data = load_tagging(test_fraction=0.25, seed=2, samples=200)
    arrays = make_tagging(samples=200, seed=2)
    assert data.task == "token_classification" and data.num_classes == 4
    assert torch.equal(data.train.labels, torch.as_tensor(arrays.distant[:150]))
    assert torch.equal(data.test.labels, torch.as_tensor(arrays.gold[150:]))
    item = data.train[3]
    assert set(item) == {"input", "labels", "attention_mask", "index"}
    assert int(data.train.inputs.max()) < VOCAB_SIZE
    with pytest.raises(ValueError, match="coverage"):
        make_tagging(coverage=1.5)


@pytest.mark.parametrize("encoder", ["lstm", "conv"])
def test_tagger_logits_of_valid_tokens_ignore_padding(encoder: str) -> None:
    torch.manual_seed(0)
    model = Tagger((6,), 4, vocab_size=20, embed_dim=8, hidden=8, encoder=encoder)
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [7, 8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    garbage = ids.clone()
    garbage[0, 3:] = torch.tensor([13, 14, 15])  # other ids where the mask says padding
    out = model(ids, mask)
    assert out.shape == (2, 6, 4)
    torch.testing.assert_close(model(garbage, mask)[0, :3], out[0, :3])
    torch.testing.assert_close(model(ids)[mask.bool()], out[mask.bool()])
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[25, 1]]))
    with pytest.raises(ValueError, match=r"token ids \[B, L\]"):
        model(torch.rand(2, 6))


class Stopped(Exception):
    """Raised by a callback to stop a fit, as a killed run would stop."""


def test_resume_gives_the_same_students_and_teachers(digits_subset, make_mlp, make_cnn,
                                                     tmp_path) -> None:
    """Stopped after epoch 2 of 3 and resumed: both students and both EMA teachers (whose skip
    draws come from a checkpointed generator) end bit for bit as in an uninterrupted run."""
    data = digits_subset(96, labeled=48)

    def fit(run_dir, **kwargs):
        student, peer = make_mlp(), make_cnn(seed=1)
        distiller = Distiller(student, peer, ATSEN(warmup_epochs=1), epochs=3, batch_size=32,
                              progress=False, run_dir=run_dir, optimizer={"lr": 0.05})
        with contextlib.suppress(Stopped):
            distiller.fit(data, **kwargs)
        group = distiller.teacher
        return [student, peer, group.sources[TEACHER_A].model, group.sources[TEACHER_B].model]

    def stop(record: dict) -> None:
        if record["epoch"] == 2:
            raise Stopped

    whole = fit(tmp_path / "whole")
    fit(tmp_path / "split", callbacks=[stop])
    resumed = fit(tmp_path / "split", resume=True)
    for one, other in zip(whole, resumed, strict=True):
        a, b = one.state_dict(), other.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
