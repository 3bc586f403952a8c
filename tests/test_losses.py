"""Tests for kdistill.losses.

Every loss is checked against an independent reference written with plain Python loops and the
``math`` module straight from the equation in its docstring (never the same torch expression),
plus known limits, masking, gradients and error messages.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdistill import losses as L

DT = torch.float64


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT) * scale


def rows(x: torch.Tensor) -> list[list[float]]:
    """Distributions (last dim) of ``x`` as Python lists."""
    return x.reshape(-1, x.shape[-1]).tolist()


def close(
    value: torch.Tensor | float, expected: float, rel: float = 1e-9, abs_: float = 1e-12
) -> bool:
    if isinstance(value, torch.Tensor):
        assert value.dim() == 0, f"expected a scalar, got shape {tuple(value.shape)}"
        value = value.detach().item()
    return math.isclose(value, expected, rel_tol=rel, abs_tol=abs_)


# ---------------------------------------------------------------------------------------------
# references, written from the formulas
# ---------------------------------------------------------------------------------------------
def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    top = max(row)
    exps = [math.exp((v - top) / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def ref_kd(s: torch.Tensor, t: torch.Tensor, temp: float, reduction: str) -> float:
    total = 0.0
    for zs, zt in zip(rows(s), rows(t), strict=True):
        total += temp * temp * kl(softmax(zt, temp), softmax(zs, temp))
    n_rows = len(rows(s))
    return total / n_rows if reduction == "batchmean" else total / (n_rows * s.shape[-1])


def ref_dkd_parts(
    s: torch.Tensor, t: torch.Tensor, target: list[int], temp: float
) -> list[tuple[float, float]]:
    out = []
    for zs, zt, g in zip(rows(s), rows(t), target, strict=True):
        ps, pt = softmax(zs, temp), softmax(zt, temp)
        rest_s = sum(v for c, v in enumerate(ps) if c != g)
        rest_t = sum(v for c, v in enumerate(pt) if c != g)
        tckd = temp**2 * kl([pt[g], rest_t], [ps[g], rest_s])
        hat_s = [v / rest_s for c, v in enumerate(ps) if c != g]
        hat_t = [v / rest_t for c, v in enumerate(pt) if c != g]
        out.append((tckd, temp**2 * kl(hat_t, hat_s)))
    return out


def ref_token(
    kind: str,
    s: torch.Tensor,
    t: torch.Tensor,
    valid: list[bool] | None = None,
    temp: float = 1.0,
    beta: float = 0.5,
) -> float:
    total, count = 0.0, 0
    for r, (zs, zt) in enumerate(zip(rows(s), rows(t), strict=True)):
        if valid is not None and not valid[r]:
            continue
        ps, pt = softmax(zs, temp), softmax(zt, temp)
        if kind == "fkl":
            d = kl(pt, ps)
        elif kind == "rkl":
            d = kl(ps, pt)
        elif kind == "tvd":
            d = 0.5 * sum(abs(a - b) for a, b in zip(pt, ps, strict=True))
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps, strict=True)]
            d = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
        total += d
        count += 1
    return total / count


# ---------------------------------------------------------------------------------------------
# logits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temp", [1.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_kd_matches_reference(temp: float, reduction: str) -> None:
    s, t = rand(3, 5, seed=1), rand(3, 5, seed=2, scale=2.0)
    assert close(L.kd(s, t, temp, reduction), ref_kd(s, t, temp, reduction))


def test_kd_extra_leading_dims_are_rows() -> None:
    s, t = rand(2, 3, 4, seed=3), rand(2, 3, 4, seed=4)
    assert close(L.kd(s, t, 2.0), ref_kd(s, t, 2.0, "batchmean"))
    assert close(L.kd(s, t, 2.0), L.kd(s.reshape(6, 4), t.reshape(6, 4), 2.0))


def test_kd_zero_at_equal_logits_and_default_temperature() -> None:
    s = rand(4, 7, seed=5)
    assert abs(float(L.kd(s, s.clone()))) < 1e-12
    assert close(L.kd(s, rand(4, 7, seed=6)), ref_kd(s, rand(4, 7, seed=6), 4.0, "batchmean"))


def test_kd_t_squared_scaling_high_temperature_limit() -> None:
    # For large T, T^2 KL(p_t||p_s) -> (1 / 2C) sum_i (d_i - mean d)^2 with d = z_t - z_s:
    # the T^2 factor makes KD converge to logit matching instead of vanishing.
    s, t = rand(3, 6, seed=7), rand(3, 6, seed=8)
    expected = 0.0
    for zs, zt in zip(rows(s), rows(t), strict=True):
        d = [b - a for a, b in zip(zs, zt, strict=True)]
        mean = sum(d) / len(d)
        expected += sum((x - mean) ** 2 for x in d) / (2 * len(d))
    expected /= 3
    assert close(L.kd(s, t, temperature=1000.0), expected, rel=1e-2)
    # Without T^2 the divergence itself vanishes like 1/T^2.
    assert float(L.kd(s, t, temperature=1000.0)) / 1000.0**2 < 1e-5


def test_kd_handles_minus_inf_teacher_logits() -> None:
    s = rand(2, 4, seed=9)
    t = rand(2, 4, seed=10)
    t[:, 0] = float("-inf")  # a class the teacher rules out
    value = L.kd(s, t, 1.0)
    assert torch.isfinite(value)
    assert close(value, ref_kd(s, t, 1.0, "batchmean"))


def test_kd_half_precision_is_upcast() -> None:
    s, t = rand(4, 5, seed=11), rand(4, 5, seed=12)
    value = L.kd(s.bfloat16(), t.bfloat16(), 2.0)
    assert value.dtype == torch.float32
    assert close(value, ref_kd(s, t, 2.0, "batchmean"), rel=5e-2)


def test_kd_rejects_bad_reduction_and_temperature() -> None:
    s = rand(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        L.kd(s, s, reduction="sum_all")
    with pytest.raises(ValueError, match="temperature"):
        L.kd(s, s, temperature=0.0)


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_soft_ce_matches_reference(temp: float) -> None:
    s, t = rand(3, 4, seed=13), rand(3, 4, seed=14)
    expected = 0.0
    for zs, zt in zip(rows(s), rows(t), strict=True):
        ps, pt = softmax(zs, temp), softmax(zt, temp)
        expected -= sum(a * math.log(b) for a, b in zip(pt, ps, strict=True))
    assert close(L.soft_ce(s, t, temp), expected / 3)
    assert close(L.soft_ce(s, t, temp, reduction="mean"), expected / 12)


def test_dkd_matches_reference() -> None:
    s, t = rand(4, 5, seed=15), rand(4, 5, seed=16, scale=2.0)
    target = [0, 3, 4, 1]
    parts = ref_dkd_parts(s, t, target, 4.0)
    tckd = sum(p[0] for p in parts) / 4
    nckd = sum(p[1] for p in parts) / 4
    got_t, got_n = L.dkd_parts(s, t, torch.tensor(target), 4.0)
    assert close(got_t, tckd) and close(got_n, nckd)
    assert close(L.dkd(s, t, torch.tensor(target)), 1.0 * tckd + 8.0 * nckd)
    assert close(L.dkd(s, t, torch.tensor(target), alpha=0.5, beta=2.0), 0.5 * tckd + 2 * nckd)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dkd_decomposition_reproduces_kd(temp: float) -> None:
    # Paper identity: KD = TCKD + (1 - p_t[target]) * NCKD, per sample.
    s, t = rand(1, 6, seed=17), rand(1, 6, seed=18, scale=3.0)
    target = torch.tensor([2])
    p_t_target = softmax(rows(t)[0], temp)[2]
    value = L.dkd(s, t, target, alpha=1.0, beta=1.0 - p_t_target, temperature=temp)
    assert close(value, float(L.kd(s, t, temp)), rel=1e-9)
    assert close(value, ref_kd(s, t, temp, "batchmean"), rel=1e-9)
    # ... and on every row of a batch through dkd_parts
    sb, tb, tgt = rand(3, 6, seed=19), rand(3, 6, seed=20), [5, 0, 2]
    for r in range(3):
        tckd, nckd = L.dkd_parts(sb[r : r + 1], tb[r : r + 1], torch.tensor([tgt[r]]), temp)
        rest = 1.0 - softmax(rows(tb)[r], temp)[tgt[r]]
        assert close(tckd + rest * nckd, ref_kd(sb[r : r + 1], tb[r : r + 1], temp, "batchmean"))


def test_dkd_leading_dims_and_errors() -> None:
    s, t = rand(2, 3, 4, seed=21), rand(2, 3, 4, seed=22)
    target = torch.tensor([[0, 1, 2], [3, 0, 1]])
    flat = L.dkd(s.reshape(6, 4), t.reshape(6, 4), target.reshape(6))
    assert close(L.dkd(s, t, target), float(flat))
    with pytest.raises(ValueError, match=r"dkd: target shape \(6,\)"):
        L.dkd(s, t, target.reshape(6))
    with pytest.raises(ValueError, match="integer"):
        L.dkd(s, t, target.double())
    with pytest.raises(ValueError, match="2 classes"):
        L.dkd(rand(2, 1), rand(2, 1), torch.tensor([0, 0]))


def test_logit_mse_matches_reference() -> None:
    s, t = rand(2, 3, 4, seed=23), rand(2, 3, 4, seed=24)
    a, b = s.flatten().tolist(), t.flatten().tolist()
    expected = sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a)
    assert close(L.logit_mse(s, t), expected)


def test_cross_entropy_matches_reference_and_ignores() -> None:
    logits = rand(2, 3, 4, seed=25)
    labels = torch.tensor([[1, -100, 3], [0, 2, -100]])
    expected, n = 0.0, 0
    for z, y in zip(rows(logits), labels.flatten().tolist(), strict=True):
        if y == -100:
            continue
        expected -= math.log(softmax(z)[y])
        n += 1
    assert close(L.cross_entropy(logits, labels), expected / n)
    # garbage in ignored rows changes neither value nor gradient of the labelled rows
    dirty = logits.clone()
    dirty[0, 1] = float("nan")
    dirty.requires_grad_(True)
    value = L.cross_entropy(dirty, labels)
    value.backward()
    assert close(value, expected / n)
    assert torch.isfinite(dirty.grad).all() and float(dirty.grad[0, 1].abs().sum()) == 0.0
    # custom ignore_index
    assert close(L.cross_entropy(logits, labels.clamp_min(0), ignore_index=0), float(
        L.cross_entropy(logits, torch.where(labels <= 0, -100, labels))
    ))


def test_cross_entropy_label_smoothing_against_the_smoothed_target() -> None:
    """Target (1 - e) onehot + e / C, ignored rows skipped: the mean over labelled rows of
    -sum_c target_c log p_c, computed row by row."""
    logits = rand(2, 3, 5, seed=26)
    labels = torch.tensor([[4, -100, 0], [2, 2, -100]])
    e, expected, n = 0.3, 0.0, 0
    for z, y in zip(rows(logits), labels.flatten().tolist(), strict=True):
        if y == -100:
            continue
        p = softmax(z)
        expected -= sum(((1 - e) * (c == y) + e / 5) * math.log(p[c]) for c in range(5))
        n += 1
    assert close(L.cross_entropy(logits, labels, label_smoothing=e), expected / n)
    with pytest.raises(ValueError, match=r"^cross_entropy: label_smoothing must be in \[0, 1\), "
                                         "got 1.0$"):
        L.cross_entropy(logits, labels, label_smoothing=1.0)


def test_cross_entropy_without_labelled_rows_is_connected_zero() -> None:
    logits = rand(3, 4).requires_grad_(True)
    value = L.cross_entropy(logits, torch.full((3,), -100))
    assert value.detach().item() == 0.0 and value.requires_grad
    value.backward()
    assert float(logits.grad.abs().sum()) == 0.0


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_hidden_mse_matches_reference_with_and_without_mask() -> None:
    s, t = rand(2, 4, 3, seed=26), rand(2, 4, 3, seed=27)
    sl, tl = s.tolist(), t.tolist()
    sse, n = 0.0, 0
    for b in range(2):
        for pos in range(4):
            if MASK[b, pos]:
                sse += sum((x - y) ** 2 for x, y in zip(sl[b][pos], tl[b][pos], strict=True))
                n += 1
    assert close(L.hidden_mse(s, t, MASK), sse / (n * 3))
    assert close(L.hidden_mse(s, t, MASK.bool()), sse / (n * 3))
    assert close(L.hidden_mse(s, t), float(L.logit_mse(s, t)))


def test_hidden_mse_ignores_padding_garbage() -> None:
    s, t = rand(2, 4, 3, seed=28), rand(2, 4, 3, seed=29)
    clean = float(L.hidden_mse(s, t, MASK))
    s2, t2 = s.clone(), t.clone()
    s2[~MASK.bool()] = float("nan")
    t2[~MASK.bool()] = 1e30
    s2.requires_grad_(True)
    value = L.hidden_mse(s2, t2, MASK)
    value.backward()
    assert close(value, clean)
    assert torch.isfinite(s2.grad).all() and float(s2.grad[~MASK.bool()].abs().sum()) == 0.0


def test_cosine_matches_reference() -> None:
    s, t = rand(2, 4, 3, seed=30), rand(2, 4, 3, seed=31)
    sl, tl = s.tolist(), t.tolist()
    total, n, total_all = 0.0, 0, 0.0
    for b in range(2):
        for pos in range(4):
            u, v = sl[b][pos], tl[b][pos]
            dot = sum(x * y for x, y in zip(u, v, strict=True))
            d = 1 - dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))
            total_all += d
            if MASK[b, pos]:
                total += d
                n += 1
    assert close(L.cosine(s, t, MASK), total / n)
    assert close(L.cosine(s, t), total_all / 8)
    assert abs(float(L.cosine(s, 3.0 * s))) < 1e-12


def ref_attention(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> float:
    sl, tl = s.tolist(), t.tolist()
    sse, n = 0.0, 0
    batch, heads, length = s.shape[0], s.shape[1], s.shape[2]
    for b in range(batch):
        for h in range(heads):
            for q in range(length):
                for k in range(length):
                    if mask[b, q] and mask[b, k]:
                        sse += (sl[b][h][q][k] - tl[b][h][q][k]) ** 2
                        n += 1
    return sse / n


def test_attention_mse_excludes_masked_pairs() -> None:
    s, t = rand(2, 3, 4, 4, seed=32), rand(2, 3, 4, 4, seed=33)
    expected = ref_attention(s, t, MASK)
    assert close(L.attention_mse(s, t, MASK), expected)
    s2, t2 = s.clone(), t.clone()
    s2[0, :, 3, :] = float("-inf")  # padded query row
    t2[1, :, :, 2:] = -10000.0  # padded keys, as an additive mask leaves them
    s2[1, :, 2:, 0] = float("nan")
    s2.requires_grad_(True)
    value = L.attention_mse(s2, t2, MASK)
    value.backward()
    assert close(value, expected)
    assert torch.isfinite(s2.grad).all()
    # no mask: plain mean over every entry
    assert close(L.attention_mse(s, t), float(L.logit_mse(s, t)))


def test_attention_mse_heads() -> None:
    s, t = rand(2, 2, 4, 4, seed=34), rand(2, 6, 4, 4, seed=35)
    # different head counts: each map is averaged over its heads first
    s_avg, t_avg = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    assert close(L.attention_mse(s, t, MASK), ref_attention(s_avg, t_avg, MASK))
    # 3-D maps and mixed 3-D / 4-D inputs
    assert close(L.attention_mse(s_avg[:, 0], t, MASK), ref_attention(s_avg, t_avg, MASK))
    assert close(L.attention_mse(s_avg[:, 0], t_avg[:, 0]), float(L.logit_mse(s_avg, t_avg)))
    # same head count: head by head unless asked to average
    t2 = rand(2, 2, 4, 4, seed=36)
    assert close(L.attention_mse(s, t2, MASK), ref_attention(s, t2, MASK))
    forced = L.attention_mse(s, t2, MASK, average_heads=True)
    assert close(forced, ref_attention(s_avg, t2.mean(1, keepdim=True), MASK))
    with pytest.raises(ValueError, match=r"\(2, 2, 4, 4\).*\(2, 6, 4, 4\)"):
        L.attention_mse(s, t, average_heads=False)


def test_attention_mse_errors() -> None:
    with pytest.raises(ValueError, match=r"attention_mse.*\(2, 4, 4\).*\(2, 5, 5\)"):
        L.attention_mse(rand(2, 4, 4), rand(2, 5, 5))
    with pytest.raises(ValueError, match="mask shape"):
        L.attention_mse(rand(2, 4, 4), rand(2, 4, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\[B, H, L, L\]"):
        L.attention_mse(rand(2, 4), rand(2, 4))


def ref_at_map(x: torch.Tensor, p: float) -> list[list[float]]:
    out = []
    for sample in x.tolist():  # [C][H][W]
        channels = len(sample)
        flat = []
        for i in range(len(sample[0])):
            for j in range(len(sample[0][0])):
                flat.append(sum(abs(sample[c][i][j]) ** p for c in range(channels)) / channels)
        norm = math.sqrt(sum(v * v for v in flat))
        out.append([v / norm for v in flat])
    return out


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_attention_transfer_matches_reference(p: float) -> None:
    s, t = rand(2, 3, 4, 5, seed=37), rand(2, 7, 4, 5, seed=38)  # channels differ
    a_s, a_t = ref_at_map(s, p), ref_at_map(t, p)
    expected = sum(
        sum((x - y) ** 2 for x, y in zip(u, v, strict=True)) for u, v in zip(a_s, a_t, strict=True)
    ) / 2
    # the sum over positions per sample; the default (authors') reduction: test_loss_reductions.py
    assert close(L.attention_transfer(s, t, p=p, reduction="batchmean"), expected)
    assert abs(float(L.attention_transfer(s, 5.0 * s))) < 1e-12


def test_attention_transfer_spatial_mismatch_names_shapes() -> None:
    with pytest.raises(ValueError, match=r"attention_transfer.*\(2, 3, 4, 4\).*\(2, 3, 8, 8\)"):
        L.attention_transfer(rand(2, 3, 4, 4), rand(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------
# relations
# ---------------------------------------------------------------------------------------------
def ref_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> float:
    def dists(x: list[list[float]]) -> list[float]:
        out = []
        for i, u in enumerate(x):
            for j, v in enumerate(x):
                if i != j:
                    out.append(math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v, strict=True))))
        mean = sum(out) / len(out)
        return [d / mean for d in out]

    ds, dt = dists(rows(s.flatten(1))), dists(rows(t.flatten(1)))
    return sum(huber(a - b) for a, b in zip(ds, dt, strict=True)) / len(ds)


def ref_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> float:
    def angles(x: list[list[float]]) -> list[float]:
        def unit(i: int, j: int) -> list[float]:
            d = [b - a for a, b in zip(x[i], x[j], strict=True)]
            n = math.sqrt(sum(v * v for v in d))
            return [v / n for v in d]

        out = []
        n = len(x)
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if len({i, j, k}) == 3:
                        out.append(sum(a * b for a, b in zip(unit(i, j), unit(i, k), strict=True)))
        return out

    a_s, a_t = angles(rows(s.flatten(1))), angles(rows(t.flatten(1)))
    return sum(huber(a - b) for a, b in zip(a_s, a_t, strict=True)) / len(a_s)


def test_rkd_distance_matches_reference() -> None:
    s, t = rand(5, 3, seed=39), rand(5, 8, seed=40, scale=3.0)  # widths differ
    # the mean over distinct pairs; the default (authors') reduction: test_loss_reductions.py
    assert close(L.rkd_distance(s, t, reduction="distinct"), ref_rkd_distance(s, t))
    # large differences reach the linear part of the Huber loss
    t2 = rand(5, 8, seed=41)
    t2[0] += 50.0
    assert close(L.rkd_distance(s, t2, reduction="distinct"), ref_rkd_distance(s, t2))
    # features of any rank are flattened per sample
    s4 = rand(5, 2, 2, 2, seed=42)
    assert close(L.rkd_distance(s4, t, reduction="distinct"), ref_rkd_distance(s4, t))
    # normalised distances: invariant to scaling and shifting the student's embedding
    assert close(L.rkd_distance(7.0 * s + 2.0, t, reduction="distinct"), ref_rkd_distance(s, t),
                 rel=1e-7)


def test_rkd_distance_is_accurate_far_from_the_origin_in_float32() -> None:
    # Gram-matrix distances lose precision when features share a large offset; the loss
    # centres the batch first, so float32 stays close to the float64 reference.
    s, t = rand(6, 16, seed=62), rand(6, 8, seed=63)
    value = L.rkd_distance((s + 1e3).float(), t.float(), reduction="distinct")
    assert close(value, ref_rkd_distance(s, t), rel=1e-4)


def test_rkd_angle_matches_reference() -> None:
    s, t = rand(4, 3, seed=43), rand(4, 6, seed=44)
    # the mean over distinct triplets; the default (authors') reduction: test_loss_reductions.py
    assert close(L.rkd_angle(s, t, reduction="distinct"), ref_rkd_angle(s, t))
    assert close(L.rkd_angle(0.1 * s - 3.0, t, reduction="distinct"), ref_rkd_angle(s, t),
                 rel=1e-7)
    assert abs(float(L.rkd_angle(s, 2.0 * s))) < 1e-12


def ref_pkt(s: torch.Tensor, t: torch.Tensor, eps: float, exclude_self: bool) -> float:
    def cond(x: list[list[float]]) -> list[list[float]]:
        units = []
        for u in x:
            n = math.sqrt(sum(v * v for v in u)) + eps
            units.append([v / n for v in u])
        out = []
        for i, u in enumerate(units):
            k = [
                0.0 if exclude_self and i == j else
                (sum(a * b for a, b in zip(u, v, strict=True)) + 1) / 2
                for j, v in enumerate(units)
            ]
            total = sum(k)
            out.append([v / total for v in k])
        return out

    qs, qt = cond(rows(s.flatten(1))), cond(rows(t.flatten(1)))
    total = 0.0
    for rs, rt in zip(qs, qt, strict=True):
        total += sum(b * math.log((b + eps) / (a + eps)) for a, b in zip(rs, rt, strict=True))
    return total / len(qs)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_pkt_matches_reference(exclude_self: bool) -> None:
    s, t = rand(5, 3, seed=45), rand(5, 9, seed=46)
    # KL per anchor, averaged; the default (authors') reduction: test_loss_reductions.py
    value = L.pkt(s, t, exclude_self=exclude_self, reduction="batchmean")
    assert close(value, ref_pkt(s, t, 1e-7, exclude_self))
    assert abs(float(L.pkt(s, 4.0 * s))) < 1e-12


def test_relations_small_batches_and_errors() -> None:
    one = rand(1, 4).requires_grad_(True)
    for fn in (L.rkd_distance, L.rkd_angle, L.pkt):
        value = fn(one, rand(1, 6))
        assert value.detach().item() == 0.0 and value.requires_grad
    assert float(L.rkd_angle(rand(2, 3), rand(2, 3, seed=1))) == 0.0
    with pytest.raises(ValueError, match=r"rkd_distance.*\(4, 3\).*\(5, 3\)"):
        L.rkd_distance(rand(4, 3), rand(5, 3))


# ---------------------------------------------------------------------------------------------
# token-level (sequence) losses
# ---------------------------------------------------------------------------------------------
TOKEN_MASK = torch.tensor([[True, True, True, False], [True, False, False, False]])
VALID = TOKEN_MASK.flatten().tolist()
TOKEN_FNS = {"fkl": L.forward_kl, "rkl": L.reverse_kl, "tvd": L.tvd}


@pytest.mark.parametrize("kind", ["fkl", "rkl", "tvd", "jsd"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_token_losses_match_reference(kind: str, temp: float) -> None:
    s, t = rand(2, 4, 5, seed=47), rand(2, 4, 5, seed=48, scale=2.0)

    def call(**kw: object) -> torch.Tensor:
        if kind == "jsd":
            return L.generalized_jsd(s, t, beta=0.3, temperature=temp, **kw)
        return TOKEN_FNS[kind](s, t, temperature=temp, **kw)

    masked = ref_token(kind, s, t, VALID, temp, beta=0.3)
    assert close(call(mask=TOKEN_MASK), masked)
    assert close(call(mask=TOKEN_MASK.long()), masked)
    assert close(call(), ref_token(kind, s, t, None, temp, beta=0.3))
    # global-batch normaliser replaces the local count of 4 valid tokens
    assert close(call(mask=TOKEN_MASK, normalizer=10.0), masked * 4 / 10)
    assert close(call(mask=TOKEN_MASK, normalizer=torch.tensor(10.0)), masked * 4 / 10)
    # [N, V] logits work the same as [B, L, V]
    flat = call(mask=TOKEN_MASK)
    if kind == "jsd":
        again = L.generalized_jsd(
            s.reshape(8, 5), t.reshape(8, 5), 0.3, temp, mask=TOKEN_MASK.reshape(8)
        )
    else:
        again = TOKEN_FNS[kind](s.reshape(8, 5), t.reshape(8, 5), TOKEN_MASK.reshape(8), temp)
    assert close(again, float(flat))


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tvd", "generalized_jsd"])
def test_token_losses_ignore_padding_garbage(name: str) -> None:
    fn = getattr(L, name)
    s, t = rand(2, 4, 5, seed=49), rand(2, 4, 5, seed=50)
    clean = float(fn(s, t, mask=TOKEN_MASK))
    s2, t2 = s.clone(), t.clone()
    s2[~TOKEN_MASK] = float("nan")
    t2[~TOKEN_MASK] = float("inf")
    t2[1, 3] = -1e30
    s2.requires_grad_(True)
    value = fn(s2, t2, mask=TOKEN_MASK)
    value.backward()
    assert close(value, clean)
    assert torch.isfinite(s2.grad).all()
    assert float(s2.grad[~TOKEN_MASK].abs().sum()) == 0.0
    assert float(s2.grad[TOKEN_MASK].abs().sum()) > 0.0


def test_token_losses_with_no_valid_token_are_connected_zero() -> None:
    s = rand(2, 3, 4).requires_grad_(True)
    for name in ("forward_kl", "reverse_kl", "tvd", "generalized_jsd"):
        value = getattr(L, name)(s, rand(2, 3, 4, seed=1), mask=torch.zeros(2, 3))
        assert value.detach().item() == 0.0 and value.requires_grad


def test_generalized_jsd_limits_and_symmetries() -> None:
    s, t = rand(3, 6, seed=51), rand(3, 6, seed=52, scale=2.0)
    fkl, rkl = ref_token("fkl", s, t), ref_token("rkl", s, t)
    # endpoints follow TRL's GKD convention: exactly forward / reverse KL
    assert close(L.generalized_jsd(s, t, beta=0.0), fkl)
    assert close(L.generalized_jsd(s, t, beta=1.0), rkl)
    # the formula itself vanishes linearly at both ends, with the KLs as slopes
    eps = 1e-6
    assert close(L.generalized_jsd(s, t, beta=eps) / eps, fkl, rel=1e-4)
    assert close(L.generalized_jsd(s, t, beta=1 - eps) / eps, rkl, rel=1e-4)
    assert float(L.generalized_jsd(s, t, beta=eps)) < 1e-4
    # swapping the roles of student and teacher maps beta to 1 - beta
    for beta in (0.1, 0.5, 0.8):
        assert close(
            L.generalized_jsd(s, t, beta=beta), float(L.generalized_jsd(t, s, beta=1 - beta))
        )
    # beta = 0.5 is the symmetric JSD, bounded by log 2, and 0 at equal predictions
    half = float(L.generalized_jsd(s, t))
    assert 0.0 < half < math.log(2)
    far_s, far_t = torch.tensor([[50.0, 0.0]], dtype=DT), torch.tensor([[0.0, 50.0]], dtype=DT)
    assert close(L.generalized_jsd(far_s, far_t), math.log(2), rel=1e-9)
    assert abs(float(L.generalized_jsd(s, s.clone(), beta=0.3))) < 1e-12
    with pytest.raises(ValueError, match="beta"):
        L.generalized_jsd(s, t, beta=1.5)


def test_per_token_helpers_are_unreduced() -> None:
    s, t = rand(2, 4, 5, seed=53), rand(2, 4, 5, seed=54)
    for helper, kind in (
        (L.per_token_forward_kl, "fkl"),
        (L.per_token_reverse_kl, "rkl"),
        (L.per_token_tvd, "tvd"),
    ):
        values = helper(s, t, 2.0)
        assert values.shape == (2, 4)
        assert close(values[1, 2], ref_token(kind, s[1, 2:3], t[1, 2:3], temp=2.0))
    values = L.per_token_generalized_jsd(s, t, 0.4)
    assert close(values[0, 1], ref_token("jsd", s[0, 1:2], t[0, 1:2], beta=0.4))


def test_token_loss_errors() -> None:
    s = rand(2, 4, 5)
    with pytest.raises(ValueError, match=r"forward_kl.*\(2, 4, 5\).*\(2, 4, 6\)"):
        L.forward_kl(s, rand(2, 4, 6))
    with pytest.raises(ValueError, match=r"mask shape \(2, 3\)"):
        L.reverse_kl(s, s, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="normalizer"):
        L.tvd(s, s, normalizer=0.0)
    with pytest.raises(ValueError, match="temperature"):
        L.generalized_jsd(s, s, temperature=-1.0)


@pytest.mark.parametrize(
    ("fn", "a", "b"),
    [
        (L.kd, (2, 5), (2, 6)),
        (L.soft_ce, (2, 5), (3, 5)),
        (L.logit_mse, (2, 5), (2, 6)),
        (L.hidden_mse, (2, 3, 8), (2, 3, 16)),
        (L.cosine, (2, 3, 8), (2, 3, 16)),
        (L.tvd, (2, 3, 8), (2, 4, 8)),
        (L.generalized_jsd, (2, 3, 8), (2, 3, 9)),
    ],
)
def test_shape_mismatch_names_function_and_shapes(
    fn: object, a: tuple[int, ...], b: tuple[int, ...]
) -> None:
    pattern = rf"{fn.__name__}: .*{tuple(a)}.*{tuple(b)}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=pattern):
        fn(rand(*a), rand(*b))


# ---------------------------------------------------------------------------------------------
# gradients: every loss sends finite, non-zero gradients into the student
# ---------------------------------------------------------------------------------------------
def _labels() -> torch.Tensor:
    return torch.tensor([[0, 2, 1, 3], [3, 1, -100, 0]])


GRAD_CASES = {
    "kd": (lambda s, t: L.kd(s, t), (2, 4, 5), (2, 4, 5)),
    "soft_ce": (lambda s, t: L.soft_ce(s, t), (3, 5), (3, 5)),
    "dkd": (lambda s, t: L.dkd(s, t, _labels().clamp_min(0)), (2, 4, 5), (2, 4, 5)),
    "logit_mse": (lambda s, t: L.logit_mse(s, t), (3, 5), (3, 5)),
    "cross_entropy": (lambda s, t: L.cross_entropy(s, _labels()), (2, 4, 5), None),
    "hidden_mse": (lambda s, t: L.hidden_mse(s, t, MASK), (2, 4, 6), (2, 4, 6)),
    "cosine": (lambda s, t: L.cosine(s, t, MASK), (2, 4, 6), (2, 4, 6)),
    "attention_mse": (lambda s, t: L.attention_mse(s, t, MASK), (2, 2, 4, 4), (2, 3, 4, 4)),
    "attention_transfer": (lambda s, t: L.attention_transfer(s, t), (2, 3, 4, 4), (2, 5, 4, 4)),
    "rkd_distance": (lambda s, t: L.rkd_distance(s, t), (5, 3), (5, 7)),
    "rkd_angle": (lambda s, t: L.rkd_angle(s, t), (5, 3), (5, 7)),
    "pkt": (lambda s, t: L.pkt(s, t), (5, 3), (5, 7)),
    "forward_kl": (lambda s, t: L.forward_kl(s, t, TOKEN_MASK), (2, 4, 5), (2, 4, 5)),
    "reverse_kl": (lambda s, t: L.reverse_kl(s, t, TOKEN_MASK), (2, 4, 5), (2, 4, 5)),
    "tvd": (lambda s, t: L.tvd(s, t, TOKEN_MASK), (2, 4, 5), (2, 4, 5)),
    "generalized_jsd": (
        lambda s, t: L.generalized_jsd(s, t, 0.5, mask=TOKEN_MASK),
        (2, 4, 5),
        (2, 4, 5),
    ),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_student_gradients_match_finite_differences(name: str) -> None:
    """The analytic student gradient is the derivative of the value (whose equation the tests
    above check): torch's gradcheck against central differences in float64."""
    fn, s_shape, t_shape = GRAD_CASES[name]
    student = rand(*s_shape, seed=60).requires_grad_(True)
    teacher = None if t_shape is None else rand(*t_shape, seed=61, scale=2.0)
    (grad,) = torch.autograd.grad(fn(student, teacher), student)
    assert float(grad.abs().sum()) > 0.0
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher), (student,), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


def test_grad_cases_cover_every_public_loss() -> None:
    assert set(GRAD_CASES) == {spec.name for spec in L.LOSSES.values()}
