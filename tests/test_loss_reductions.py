"""The default reductions of attention transfer, RKD and PKT are the authors' code's.

Each loss is compared with a reference that computes it the way the authors' code does, written
here with explicit loops over samples, pairs and triplets (never the library's vectorised
expression), on small seeded tensors; then with a tiny case worked out by hand; then on the
degenerate cases the authors' reductions count (the zero diagonal of the distance matrix,
triplets with a repeated sample, identical points, zero feature maps). The code read:

* attention transfer: szagoruyko/attention-transfer ``utils.py`` (``at``, ``at_loss``: squared
  difference of the L2-normalised maps, ``.mean()`` over batch and positions), weighted by
  ``--beta 1e+3`` per layer pair in ``cifar.py``;
* RKD: lenscloth/RKD ``metric/loss.py`` (``RkdDistance``, ``RKdAngle``) and
  ``metric/utils.py`` (``pdist``): ``smooth_l1_loss`` averaged over the whole ``B x B`` distance
  matrix and over all ``B^3`` angle triplets;
* PKT: passalis/probabilistic_kt ``nn/pkt.py`` (``cosine_similarity_loss``): ``torch.mean``
  over the ``B x B`` matrix of KL terms.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdistill import losses as L

DT = torch.float64
SQRT2 = math.sqrt(2.0)


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT) * scale


def value(x: torch.Tensor) -> float:
    assert x.dim() == 0, f"expected a scalar, got shape {tuple(x.shape)}"
    return float(x.detach())


def huber(x: float) -> float:
    """``F.smooth_l1_loss`` with beta = 1, for one difference."""
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def unit(v: torch.Tensor) -> torch.Tensor:
    """``F.normalize``'s rule: ``v / max(||v||, 1e-12)`` (a zero vector stays zero)."""
    return v / max(float(torch.linalg.vector_norm(v)), 1e-12)


# ---------------------------------------------------------------------------------------------
# the authors' computations, one sample, pair or triplet at a time
# ---------------------------------------------------------------------------------------------
def authors_attention_transfer(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """``(at(x) - at(y)).pow(2).mean()``, ``at(x) = normalize(x.pow(2).mean(1).view(B, -1))``."""
    batch, positions = fs.shape[0], fs[0, 0].numel()

    def attention(sample: torch.Tensor) -> torch.Tensor:
        channels = sample.shape[0]
        total = torch.zeros(positions, dtype=DT)
        for c in range(channels):
            total = total + sample[c].reshape(-1) ** 2
        return unit(total / channels)

    squared = 0.0
    for b in range(batch):
        diff = attention(fs[b]) - attention(ft[b])
        for n in range(positions):
            squared += float(diff[n]) ** 2
    return squared / (batch * positions)


def authors_distances(x: torch.Tensor) -> list[list[float]]:
    """``pdist(e, squared=False)``: clamp at 1e-12 before the root, then a zero diagonal."""
    n = x.shape[0]
    out = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i][j] = math.sqrt(max(float(((x[i] - x[j]) ** 2).sum()), 1e-12))
    return out


def authors_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> float:
    """``RkdDistance``: divide by the mean of the non-zero distances, smooth-L1 over B x B."""
    n = s.shape[0]
    ds, dt = authors_distances(s), authors_distances(t)

    def mean_nonzero(d: list[list[float]]) -> float:
        entries = [v for row in d for v in row if v > 0]
        return sum(entries) / len(entries)

    mu_s, mu_t = mean_nonzero(ds), mean_nonzero(dt)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += huber(ds[i][j] / mu_s - dt[i][j] / mu_t)
    return total / (n * n)


def authors_cosine(x: torch.Tensor, i: int, j: int, k: int) -> float:
    """``bmm`` of ``normalize(x[j] - x[i])`` and ``normalize(x[k] - x[i])``."""
    return float(unit(x[j] - x[i]) @ unit(x[k] - x[i]))


def authors_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> float:
    """``RKdAngle``: smooth-L1 over all B^3 triplets, the degenerate ones included."""
    n = s.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            for k in range(n):
                total += huber(authors_cosine(s, i, j, k) - authors_cosine(t, i, j, k))
    return total / n**3


def authors_pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> float:
    """``cosine_similarity_loss``: ``torch.mean`` of the B x B KL terms."""
    n = s.shape[0]

    def conditionals(x: torch.Tensor) -> list[list[float]]:
        rows = [x[i] / (float(torch.linalg.vector_norm(x[i])) + eps) for i in range(n)]
        out = []
        for i in range(n):
            kernel = [(float(rows[i] @ rows[j]) + 1.0) / 2.0 for j in range(n)]
            total = sum(kernel)
            out.append([v / total for v in kernel])
        return out

    qs, qt = conditionals(s), conditionals(t)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += qt[i][j] * math.log((qt[i][j] + eps) / (qs[i][j] + eps))
    return total / (n * n)


# ---------------------------------------------------------------------------------------------
# attention transfer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [((3, 4, 5, 6), (3, 7, 5, 6)), ((2, 1, 8, 8), (2, 3, 8, 8)), ((4, 2, 6), (4, 5, 6))],
)
def test_attention_transfer_default_is_the_authors_mean(
    s_shape: tuple[int, ...], t_shape: tuple[int, ...]
) -> None:
    s, t = rand(*s_shape, seed=1), rand(*t_shape, seed=2, scale=3.0)
    expected = authors_attention_transfer(s, t)
    assert math.isclose(value(L.attention_transfer(s, t)), expected, rel_tol=1e-9)
    assert math.isclose(value(L.attention_transfer(s, t, reduction="mean")), expected,
                        rel_tol=1e-9)
    # the other reduction sums over the N positions instead of averaging
    positions = math.prod(s_shape[2:])
    assert math.isclose(value(L.attention_transfer(s, t, reduction="batchmean")),
                        positions * expected, rel_tol=1e-9)


def test_attention_transfer_by_hand() -> None:
    # student sample 0: two channels whose squares average to [1, 0, 0, 0]; sample 1: the
    # teacher's own map. Teacher: one channel, uniform attention [1, 1, 1, 1] / 2.
    student = torch.zeros(2, 2, 2, 2, dtype=DT)
    student[0, 0, 0, 0], student[0, 1, 0, 0] = 1.0, -1.0
    student[1] = 5.0
    teacher = torch.ones(2, 1, 2, 2, dtype=DT)
    # sample 0: Q_s = [1, 0, 0, 0], Q_t = [1/2] * 4: squared differences 1/4 each, sum 1;
    # sample 1: 0. Mean over 2 samples x 4 positions: 1/8; per-sample sum, averaged: 1/2.
    assert math.isclose(value(L.attention_transfer(student, teacher)), 1 / 8, rel_tol=1e-12)
    assert math.isclose(value(L.attention_transfer(student, teacher, reduction="batchmean")),
                        1 / 2, rel_tol=1e-12)
    # the published weight: beta = 1000 per layer pair, pairs summed (two pairs here)
    assert math.isclose(1000 * (value(L.attention_transfer(student, teacher)) * 2), 250.0,
                        rel_tol=1e-12)


def test_attention_transfer_zero_map() -> None:
    # an all-zero map normalises to the zero vector (``F.normalize``), so each sample adds
    # ||Q_t||^2 = 1: the mean is 1 / N, finite, with a finite gradient
    student = torch.zeros(3, 2, 4, 4, dtype=DT, requires_grad=True)
    teacher = rand(3, 5, 4, 4, seed=3)
    loss = L.attention_transfer(student, teacher)
    assert math.isclose(value(loss), 1 / 16, rel_tol=1e-12)
    assert math.isclose(value(loss), authors_attention_transfer(student.detach(), teacher),
                        rel_tol=1e-12)
    loss.backward()
    assert torch.isfinite(student.grad).all()


# ---------------------------------------------------------------------------------------------
# RKD distance
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "seed"), [(2, 10), (5, 11), (8, 12)])
def test_rkd_distance_default_is_the_authors_mean(batch: int, seed: int) -> None:
    s, t = rand(batch, 3, seed=seed), rand(batch, 7, seed=seed + 100, scale=4.0)
    t[0] += 20.0  # far outlier: reaches the linear part of the smooth-L1
    expected = authors_rkd_distance(s, t)
    assert math.isclose(value(L.rkd_distance(s, t)), expected, rel_tol=1e-9)
    # the zero diagonal counts in the default mean: the distinct-pair mean is B / (B - 1) times
    assert math.isclose(value(L.rkd_distance(s, t, reduction="distinct")),
                        expected * batch / (batch - 1), rel_tol=1e-9)


def test_rkd_distance_by_hand() -> None:
    # student: a right isosceles triangle, distances 1, 1, sqrt 2 (mean (2 + sqrt 2) / 3);
    # teacher: three points on a line, distances 1, 2, 1 (mean 4 / 3).
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=DT)
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=DT)
    mu_s = (2 + SQRT2) / 3
    diffs = [1 / mu_s - 3 / 4, 1 / mu_s - 3 / 2, SQRT2 / mu_s - 3 / 4]  # pairs 01, 02, 12
    assert all(abs(d) < 1 for d in diffs)  # quadratic part: 0.5 d^2, each pair twice
    ordered_sum = sum(d * d for d in diffs)
    assert math.isclose(value(L.rkd_distance(s, t)), ordered_sum / 9, rel_tol=1e-12)
    assert math.isclose(value(L.rkd_distance(s, t, reduction="distinct")), ordered_sum / 6,
                        rel_tol=1e-12)
    assert math.isclose(ordered_sum / 9, 0.0716992, rel_tol=1e-5)  # 0.07170 for the record


def test_rkd_distance_identical_points() -> None:
    # two student samples coincide: their distance is the clamped sqrt(1e-12) = 1e-6, which
    # the authors' ``d[d > 0].mean()`` keeps in the normaliser
    s = rand(5, 4, seed=13)
    s[3] = s[1]
    t = rand(5, 6, seed=14)
    assert math.isclose(value(L.rkd_distance(s, t)), authors_rkd_distance(s, t), rel_tol=1e-9)
    # every sample identical in both models: every normalised distance is 1 off the diagonal
    same = torch.ones(4, 3, dtype=DT)
    assert value(L.rkd_distance(same, torch.zeros(4, 2, dtype=DT))) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# RKD angle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "seed"), [(3, 20), (4, 21), (6, 22)])
def test_rkd_angle_default_is_the_authors_mean(batch: int, seed: int) -> None:
    s, t = rand(batch, 3, seed=seed), rand(batch, 5, seed=seed + 100, scale=2.0)
    expected = authors_rkd_angle(s, t)
    assert math.isclose(value(L.rkd_angle(s, t)), expected, rel_tol=1e-9)
    # the degenerate triplets count in the default mean
    distinct = batch * (batch - 1) * (batch - 2)
    assert math.isclose(value(L.rkd_angle(s, t, reduction="distinct")),
                        expected * batch**3 / distinct, rel_tol=1e-9)


def test_rkd_angle_degenerate_triplets_add_nothing_but_count() -> None:
    s, t = rand(4, 3, seed=23), rand(4, 5, seed=24)
    for i in range(4):
        for j in range(4):
            for k in range(4):
                if len({i, j, k}) < 3:
                    cs, ct = authors_cosine(s, i, j, k), authors_cosine(t, i, j, k)
                    expected = 1.0 if (j == k and j != i) else 0.0
                    assert cs == pytest.approx(expected) and ct == pytest.approx(expected)
    # so the sum over all 64 triplets is the sum over the 24 distinct ones
    assert math.isclose(value(L.rkd_angle(s, t)) * 64,
                        value(L.rkd_angle(s, t, reduction="distinct")) * 24, rel_tol=1e-9)


def test_rkd_angle_by_hand() -> None:
    # student: right isosceles triangle, cosines 0 at the right angle, 1/sqrt 2 at the others;
    # teacher: points on a line at 0, 1, 2, cosines 1, -1, 1 at those anchors.
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=DT)
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=DT)
    per_anchor = [huber(0 - 1), huber(1 / SQRT2 + 1), huber(1 / SQRT2 - 1)]
    # 0.5 + (0.5 + 1/sqrt 2) + (0.75 - 1/sqrt 2) = 1.75; each anchor has 2 ordered triplets
    assert math.isclose(sum(per_anchor), 1.75, rel_tol=1e-12)
    assert math.isclose(value(L.rkd_angle(s, t)), 3.5 / 27, rel_tol=1e-12)
    assert math.isclose(value(L.rkd_angle(s, t, reduction="distinct")), 3.5 / 6,
                        rel_tol=1e-12)


def test_rkd_angle_identical_points_and_tiny_batches() -> None:
    # coincident samples give a zero difference vector, hence cosine 0, as in the authors' code
    s = rand(5, 3, seed=25)
    s[4] = s[0]
    t = rand(5, 4, seed=26)
    assert math.isclose(value(L.rkd_angle(s, t)), authors_rkd_angle(s, t), rel_tol=1e-9)
    # two samples: every triplet is degenerate, the authors' mean is 0 too
    two_s, two_t = rand(2, 3, seed=27), rand(2, 3, seed=28)
    assert authors_rkd_angle(two_s, two_t) == pytest.approx(0.0, abs=1e-15)
    assert value(L.rkd_angle(two_s, two_t)) == 0.0


# ---------------------------------------------------------------------------------------------
# PKT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "seed"), [(2, 30), (5, 31), (9, 32)])
def test_pkt_default_is_the_authors_mean(batch: int, seed: int) -> None:
    s, t = rand(batch, 4, seed=seed), rand(batch, 10, seed=seed + 100, scale=0.5)
    expected = authors_pkt(s, t)
    assert math.isclose(value(L.pkt(s, t)), expected, rel_tol=1e-9)
    # the other reduction sums the KL over j for each anchor: B times the default
    assert math.isclose(value(L.pkt(s, t, reduction="batchmean")), batch * expected,
                        rel_tol=1e-9)


def test_pkt_by_hand() -> None:
    # student: two orthogonal unit vectors, cos 0, kernel [[1, 1/2], [1/2, 1]], each row's
    # conditional [2/3, 1/3]. Teacher: antipodal, cos -1, kernel identity, conditional [1, 0];
    # identical, cos 1, conditional [1/2, 1/2].
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DT)
    identical = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=DT)
    # each row: 1 log(1 / (2/3)) + 0 = log 3/2; the mean over the 4 entries: 2 log(3/2) / 4
    # (eps = 1e-7 turns the teacher's 0 into ~1e-7, moving the value by ~1e-6)
    assert math.isclose(value(L.pkt(s, antipodal)), math.log(1.5) / 2, rel_tol=1e-4)
    assert math.isclose(value(L.pkt(s, antipodal, reduction="batchmean")), math.log(1.5),
                        rel_tol=1e-4)
    assert math.isclose(value(L.pkt(s, antipodal)), authors_pkt(s, antipodal), rel_tol=1e-9)
    # each row: 1/2 log((1/2) / (2/3)) + 1/2 log((1/2) / (1/3)) = log(9/8) / 2
    assert math.isclose(value(L.pkt(s, identical)), math.log(9 / 8) / 4, rel_tol=1e-6)
    assert math.isclose(value(L.pkt(s, identical)), authors_pkt(s, identical), rel_tol=1e-12)


def test_pkt_zero_feature_row() -> None:
    # a zero row divides by (0 + eps): its cosine with everything is 0, as in the authors' code
    s, t = rand(4, 3, seed=33), rand(4, 6, seed=34)
    s[2] = 0.0
    assert math.isclose(value(L.pkt(s, t)), authors_pkt(s, t), rel_tol=1e-9)


# ---------------------------------------------------------------------------------------------
# the reduction parameter: validated, reachable from configs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fn", "student", "teacher", "valid"),
    [
        (L.attention_transfer, (2, 3, 4, 4), (2, 3, 4, 4), "('mean', 'batchmean')"),
        (L.rkd_distance, (4, 3), (4, 5), "('mean', 'distinct')"),
        (L.rkd_angle, (4, 3), (4, 5), "('mean', 'distinct')"),
        (L.pkt, (4, 3), (4, 5), "('mean', 'batchmean')"),
    ],
)
def test_unknown_reduction_names_the_parameter(
    fn: object, student: tuple[int, ...], teacher: tuple[int, ...], valid: str
) -> None:
    s, t = rand(*student, seed=40), rand(*teacher, seed=41)
    message = rf"^{fn.__name__}: reduction must be one of {valid}, got 'sum'$"
    message = message.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=message):
        fn(s, t, reduction="sum")
    with pytest.raises(ValueError, match=message):  # checked even when the batch is too small
        fn(s[:1], t[:1], reduction="sum")


@pytest.mark.parametrize(
    ("name", "other"),
    [("attention_transfer", "batchmean"), ("rkd_distance", "distinct"),
     ("rkd_angle", "distinct"), ("pkt", "batchmean")],
)
def test_reduction_is_a_config_parameter(name: str, other: str) -> None:
    params = L.loss_params(name)
    assert params["reduction"].default == "mean"
    L.check_params(name, {"reduction": other})
    shapes = ((3, 2, 4, 4), (3, 5, 4, 4)) if name == "attention_transfer" else ((5, 3), (5, 4))
    s, t = rand(*shapes[0], seed=42), rand(*shapes[1], seed=43)
    spec = L.get_loss(name)
    assert torch.equal(spec(s, t), spec.fn(s, t, reduction="mean"))
    assert torch.equal(spec(s, t, reduction=other), spec.fn(s, t, reduction=other))
