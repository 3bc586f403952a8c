"""The retrieval recipes pinned to their equations: ``lead`` (student CE, output KL and the
layer KLs weighted by the teacher's own per-layer CE, layers drawn per period) and ``dcd``
(teacher-chosen hard negatives, entropy-driven per-query weights), each with non-default
parameters, against plain float64 loops written here (never ``kdistill.losses``); the layer
draws are reproducible and resumable; a frozen teacher never changes."""

from __future__ import annotations

import math

import pytest
import torch
from recipe_maths import check_terms, d, seeded

from kdistill.batch import POSITIVE, RELEVANCE
from kdistill.recipes import build_recipe
from kdistill.schedules import TrainState
from kdistill.taps import Taps

# Three queries and five passages: query 0's positive is passage 0, and passage 3 is relevant
# to it too (a second copy of a relevant passage: no negative, out of its distribution).
POS = [0, 2, 4]
RELEVANT = [[0, 3], [2], [4]]
B, P = 3, 5


def retrieval_batch() -> dict[str, torch.Tensor]:
    relevance = torch.zeros(B, P, dtype=torch.bool)
    for row, passages in enumerate(RELEVANT):
        relevance[row, passages] = True
    return {"index": torch.arange(B), POSITIVE: torch.tensor(POS), RELEVANCE: relevance}


def state(step: int, phase: int = 0) -> TrainState:
    return TrainState(phase=phase, epoch=0, step=step, epoch_progress=0.5, steps_per_epoch=50,
                      total_steps=100)


def candidates(b: int) -> list[int]:
    """The passages of query b's distribution: all but those relevant to it besides its own
    positive."""
    return [p for p in range(P) if p == POS[b] or p not in RELEVANT[b]]


def similarity(q: torch.Tensor, p: torch.Tensor, kind: str) -> float:
    q, p = d(q), d(p)
    if kind == "cosine":
        return float(q @ p / (q.norm() * p.norm()))
    return float(q @ p)


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def distributions(vectors: torch.Tensor, kind: str, tau: float) -> list[dict[int, float]]:
    """Per query, passage -> probability over its candidates of sim / tau."""
    out = []
    for b in range(B):
        keys = candidates(b)
        probs = softmax([similarity(vectors[b], vectors[B + p], kind) / tau for p in keys])
        out.append(dict(zip(keys, probs, strict=True)))
    return out


def mean_kl(teacher: list[dict[int, float]], student: list[dict[int, float]]) -> float:
    return sum(sum(pt * math.log(pt / student[b][p]) for p, pt in teacher[b].items())
               for b in range(B)) / B


def mean_ce(dist: list[dict[int, float]]) -> float:
    return -sum(math.log(dist[b][POS[b]]) for b in range(B)) / B


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = []
    for h, m in zip(d(hidden), mask, strict=True):
        kept = [h[t] for t in range(len(m)) if m[t]]
        rows.append(sum(kept) / len(kept))
    return torch.stack(rows)


def model_taps(seed: int, layers: int, tokens: int, width: int, out: int) -> Taps:
    """Taps of a model that tokenises into ``tokens`` positions (trailing ones padding,
    holding large garbage) with ``layers`` hidden states of ``width`` and a sentence
    embedding of ``out``."""
    lengths = torch.tensor([tokens, 2, 3, tokens - 1, 2, 4, 3, tokens])[:B + P]
    mask = (torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)).long()
    values = {"sentence_embedding": seeded(B + P, out, seed=seed), "token_mask": mask}
    for layer in range(1, layers + 1):
        hidden = seeded(B + P, tokens, width, seed=seed * 10 + layer)
        values[f"hidden.{layer}"] = torch.where(mask.bool().unsqueeze(-1), hidden,
                                                torch.tensor(50.0))
    return Taps(values)


# --------------------------------------------------------------------------------------- lead

LEAD = {"student_layers": 3, "teacher_layers": 4, "pairs": 2, "resample_every": 7, "seed": 5,
        "pooling": "mean", "similarity": "cosine", "temperature": 0.5,
        "layer_temperature": 3.0, "ce_weight": 0.7, "kd_weight": 1.3, "layer_weight": 2.0}


def lead_by_hand(student: Taps, teacher: Taps, pairs: list[tuple[int, int]], kind: str,
                 tau: float, layer_tau: float, pooled) -> tuple[float, float, float]:
    s_out = distributions(student["sentence_embedding"], kind, tau)
    t_out = distributions(teacher["sentence_embedding"], kind, tau)
    kls, ces = [], []
    for layer_s, layer_t in pairs:
        s = distributions(pooled(student[f"hidden.{layer_s}"], student["token_mask"]), kind, tau)
        t = distributions(pooled(teacher[f"hidden.{layer_t}"], teacher["token_mask"]), kind, tau)
        kls.append(mean_kl(t, s))
        ces.append(mean_ce(t))
    weights = softmax([-c / layer_tau for c in ces])
    layers = sum(w * k for w, k in zip(weights, kls, strict=True))
    return mean_ce(s_out), mean_kl(t_out, s_out), layers


def test_lead_is_ce_plus_output_kl_plus_layer_kls_weighted_by_the_teachers_own_ce() -> None:
    # Student and teacher tokenise differently (7 vs 9 positions) and differ in width.
    student = model_taps(1, layers=3, tokens=7, width=6, out=5)
    teacher = model_taps(2, layers=4, tokens=9, width=8, out=4)
    recipe = build_recipe("lead", **LEAD)
    pairs = recipe.layer_pairs(state(9))
    assert len(pairs) == 2
    ce, kd, layers = lead_by_hand(student, teacher, pairs, "cosine", 0.5, 3.0, mean_pool)
    check_terms(recipe.terms(student, teacher, retrieval_batch(), state(9)),
                {"ce": (ce, 0.7, "examples"), "kd": (kd, 1.3, "examples"),
                 "layers": (layers, 2.0, "examples")})


def test_lead_with_cls_pooling_and_dot_products() -> None:
    student = model_taps(3, layers=2, tokens=6, width=5, out=5)
    teacher = model_taps(4, layers=2, tokens=6, width=5, out=5)
    recipe = build_recipe("lead", student_layers=2, teacher_layers=2, pairs=2, pooling="cls",
                          similarity="dot", temperature=4.0)
    pairs = recipe.layer_pairs(state(0))
    assert pairs == [(1, 1), (2, 2)]  # every layer of both: one draw, sorted

    def first_token(hidden: torch.Tensor, _mask: torch.Tensor) -> torch.Tensor:
        return d(hidden)[:, 0]

    ce, kd, layers = lead_by_hand(student, teacher, pairs, "dot", 4.0, 10.0, first_token)
    check_terms(recipe.terms(student, teacher, retrieval_batch(), state(0)),
                {"ce": (ce, 1.0, "examples"), "kd": (kd, 1.0, "examples"),
                 "layers": (layers, 1.0, "examples")})


def test_lead_reads_every_candidate_layer_and_the_models_own_tokens() -> None:
    recipe = build_recipe("lead", student_layers=2, teacher_layers=3, pairs=1)
    assert recipe.student_taps() == ["sentence_embedding", "token_mask", "hidden.1", "hidden.2"]
    assert recipe.teacher_taps()[-1] == "hidden.3"
    assert recipe.pools_tokens and recipe.task == "retrieval"
    assert "not one row per sample" in recipe.teacher_signal_varies()


def test_lead_layer_draws_are_sorted_fixed_per_period_and_a_function_of_seed_phase_period(
) -> None:
    recipe = build_recipe("lead", **LEAD)
    draws = [recipe.layer_pairs(state(step)) for step in range(0, 70)]
    for pairs in draws:
        students, teachers = zip(*pairs, strict=True)
        assert list(students) == sorted(set(students)) and list(teachers) == sorted(set(teachers))
        assert all(1 <= s <= 3 for s in students) and all(1 <= t <= 4 for t in teachers)
    periods = [draws[i:i + 7] for i in range(0, 70, 7)]
    assert all(all(p == period[0] for p in period) for period in periods)  # fixed in a period
    assert len({tuple(period[0]) for period in periods}) > 1  # and drawn anew across periods
    # A resumed run (a new recipe object) at step 45 draws what the uninterrupted one drew.
    assert build_recipe("lead", **LEAD).layer_pairs(state(45)) == draws[45]
    other_seed = build_recipe("lead", **{**LEAD, "seed": 6})
    assert [other_seed.layer_pairs(state(s)) for s in range(0, 70, 7)] != \
        [period[0] for period in periods]
    assert [recipe.layer_pairs(state(s, phase=1)) for s in range(0, 70, 7)] != \
        [period[0] for period in periods]


def test_lead_refuses_more_pairs_than_layers_and_a_batch_without_passages() -> None:
    with pytest.raises(ValueError, match=r"pairs 3 exceeds the layers to draw from \(student 2, "
                                         r"teacher 4\)"):
        build_recipe("lead", student_layers=2, teacher_layers=4, pairs=3)
    with pytest.raises(ValueError, match="student_layers"):
        build_recipe("lead", teacher_layers=4)
    recipe = build_recipe("lead", student_layers=1, teacher_layers=1, pairs=1)
    taps = model_taps(1, layers=1, tokens=4, width=3, out=3)
    with pytest.raises(ValueError, match=r"lead: the batch lacks \['positive', 'relevance'\] "
                                         r"\(a retrieval batch"):
        recipe.terms(taps, taps, {"index": torch.arange(8), "labels": torch.zeros(8)}, state(0))


# ---------------------------------------------------------------------------------------- dcd

def dcd_by_hand(student: torch.Tensor, teacher: torch.Tensor, negatives: int, alpha: float,
                kind: str, tau: float) -> tuple[float, float]:
    ces, mses, entropies = [], [], []
    for b in range(B):
        pool = [p for p in candidates(b) if p != POS[b]]
        sim_t = {p: similarity(teacher[b], teacher[B + p], kind) for p in candidates(b)}
        sim_s = {p: similarity(student[b], student[B + p], kind) for p in candidates(b)}
        hard = sorted(pool, key=lambda p: -sim_t[p])[:negatives]
        chosen = [POS[b], *hard]
        p_t = softmax([sim_t[p] / tau for p in chosen])
        p_s = softmax([sim_s[p] / tau for p in chosen])
        ces.append(-math.log(p_s[0]))
        mses.append(sum((sim_s[p] - sim_t[p]) ** 2 for p in chosen) / len(chosen))
        entropies.append(-sum(x * math.log(x) for x in p_t))
    w = [h / sum(entropies) for h in entropies]
    r = softmax([(1 - x) ** 2 for x in w])
    return (sum(x * c for x, c in zip(w, ces, strict=True)),
            sum(x * m for x, m in zip(r, mses, strict=True)))


@pytest.mark.parametrize("negatives", [2, 4])  # 4: query 0 has only 3 candidates
def test_dcd_weights_teacher_chosen_hard_negatives_by_the_teachers_entropy(
        negatives: int) -> None:
    student, teacher = seeded(B + P, 4, seed=11), seeded(B + P, 6, seed=12, scale=0.6)
    recipe = build_recipe("dcd", negatives=negatives, alpha=0.3, similarity="dot",
                          temperature=2.0)
    contrastive, kd = dcd_by_hand(student, teacher, negatives, 0.3, "dot", 2.0)
    check_terms(recipe.terms(Taps({"sentence_embedding": student}),
                             Taps({"sentence_embedding": teacher}), retrieval_batch(), state(0)),
                {"contrastive": (contrastive, 0.7, "examples"), "kd": (kd, 0.3, "examples")})


def test_dcd_with_cosine_similarities_and_the_default_alpha() -> None:
    student, teacher = seeded(B + P, 5, seed=13), seeded(B + P, 3, seed=14)
    recipe = build_recipe("dcd", negatives=3, similarity="cosine", temperature=0.1)
    contrastive, kd = dcd_by_hand(student, teacher, 3, 0.2, "cosine", 0.1)
    check_terms(recipe.terms(Taps({"sentence_embedding": student}),
                             Taps({"sentence_embedding": teacher}), retrieval_batch(), state(0)),
                {"contrastive": (contrastive, 0.8, "examples"), "kd": (kd, 0.2, "examples")})


def test_dcd_selection_and_gradients_leave_out_missing_and_relevant_passages() -> None:
    student = seeded(B + P, 4, seed=15).requires_grad_()
    teacher = seeded(B + P, 4, seed=16)
    recipe = build_recipe("dcd", negatives=6)  # more than any query has
    columns, exists = recipe.chosen(
        d(teacher)[:B] @ d(teacher)[B:].T - torch.tensor(
            [[0, 0, 0, math.inf, 0], [0] * 5, [0] * 5]), torch.tensor(POS))
    assert columns[:, 0].tolist() == POS
    assert exists.sum(dim=1).tolist() == [4, 5, 5]  # query 0: passage 3 is relevant, no negative
    assert 3 not in columns[0][exists[0]].tolist()
    terms = recipe.terms(Taps({"sentence_embedding": student}),
                         Taps({"sentence_embedding": teacher}), retrieval_batch(), state(0))
    (terms["contrastive"].value + terms["kd"].value).backward()
    assert torch.isfinite(student.grad).all()
