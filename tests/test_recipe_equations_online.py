"""Equation tests of the recipes whose teacher trains or follows the student: ``dml``, ``bdkd``,
``okdhp``, ``mean_teacher`` and ``atsen`` (see ``test_recipe_equations.py`` for the rules).

Besides each term's value, weight and unit, the stop-gradients of the equations are pinned
by comparing the gradients of the weighted sum with those of the hand-written loss, and the
EMA teachers' momentum schedules (and ATSEN's seeded skips) through the teacher source that
the recipe builds.
"""

from __future__ import annotations

import math

import pytest
import torch
from recipe_maths import (
    ce,
    ce_rows,
    check_term,
    check_terms,
    d,
    entropy,
    hinton_kd_rows,
    kl,
    log_p,
    mean_over,
    p,
    seeded,
)
from torch import nn

from kdistill.batch import UNLABELED
from kdistill.recipes import build_recipe
from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.taps import Taps

U = UNLABELED
LABELS = torch.tensor([2, U, 0, 4, U, 1])
LABELLED = LABELS != U
CPU = torch.device("cpu")


def at(epoch: int, batch: int, steps_per_epoch: int, epochs: int) -> TrainState:
    return TrainState(phase=0, epoch=epoch, step=epoch * steps_per_epoch + batch,
                      epoch_progress=epoch + (batch + 1) / steps_per_epoch,
                      steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * epochs)


def weighted_sum(terms: dict) -> torch.Tensor:
    return sum(t.weight * t.value for t in terms.values())


def grads_of(loss: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


def leaf(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return x.detach().to(dtype).clone().requires_grad_(True)


def nll_mean(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Differentiable cross-entropy averaged over the labelled rows."""
    return torch.nn.functional.cross_entropy(z, labels, ignore_index=UNLABELED)


def kl_mean(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Differentiable KL(A || B) summed over classes, averaged over rows."""
    return (log_a.exp() * (log_a - log_b)).sum(-1).mean()


def assert_grads_close(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------- dml

PEERS = [seeded(6, 5, seed=30, scale=2.0), seeded(6, 5, seed=31, scale=2.0),
         seeded(6, 5, seed=32, scale=3.0)]


def dml_by_hand(logits: list[torch.Tensor], temperature: float) -> dict:
    """L_i = CE(y, z_i) + 1/(k-1) sum_{j != i} T^2 KL(p_j^T || p_i^T), p_j fixed."""
    k = len(logits)
    out = {}
    for i, z in enumerate(logits):
        kl_i = sum(hinton_kd_rows(z, logits[j], temperature).mean()
                   for j in range(k) if j != i) / (k - 1)
        prefix = "" if i == 0 else f"peer{i}_"
        out[f"{prefix}ce"] = (ce(z, LABELS), 1.0, "labeled")
        out[f"{prefix}kl"] = (float(kl_i), 1.0, "examples")
    return out


def test_dml_terms_and_gradients_of_three_peers() -> None:
    temperature = 2.0
    recipe = build_recipe("dml", peers=3, temperature=temperature)
    z = [leaf(x) for x in PEERS]
    teacher = Taps({"logits": z[1]}, members=(Taps({"logits": z[1]}), Taps({"logits": z[2]})))
    for state in (at(0, 0, 4, 3), at(2, 3, 4, 3)):
        terms = recipe.terms(Taps({"logits": z[0]}), teacher, {"labels": LABELS}, state)
        check_terms(terms, dml_by_hand(PEERS, temperature))
    # each peer's logits get the gradient of its own L_i only (the other peers are targets)
    z64 = [leaf(x, torch.float64) for x in PEERS]
    total = torch.zeros((), dtype=torch.float64)
    for i, zi in enumerate(z64):
        total = total + nll_mean(zi, LABELS)
        log_i = torch.log_softmax(zi / temperature, -1)
        for j in range(3):
            if j != i:
                log_j = torch.log_softmax(z64[j].detach() / temperature, -1)
                total = total + temperature**2 * kl_mean(log_j, log_i) / 2
    assert_grads_close(grads_of(weighted_sum(terms), *z), grads_of(total, *z64))


# --------------------------------------------------------------------------------------- bdkd

# Rows of different sharpness, so the entropy gap moves the weights both ways.
BD_S = seeded(6, 5, seed=33) * torch.tensor([0.1, 6.0, 1.0, 0.1, 5.0, 1.0]).unsqueeze(-1)
BD_T = seeded(6, 5, seed=34) * torch.tensor([5.0, 0.1, 1.0, 6.0, 0.1, 1.2]).unsqueeze(-1)


@pytest.mark.parametrize("teacher_kl", ["teacher_first", "student_first"])
def test_bdkd_terms_and_gradients(teacher_kl: str) -> None:
    """Student: CE + mean_b [w_f KL(p_t || p_s) + w_r KL(p_s || p_t)], teacher: CE +
    KL(p_t || p_s) (teacher_first) or KL(p_s || p_t) (student_first), at temperature T with
    T^2, w_r = sigmoid((H_s - H_t) / tau_g) per sample (a constant in the backward), p_t fixed
    in the student's loss and p_s in the teacher's."""
    temperature, gap_scale = 2.0, 0.8
    teacher_first = teacher_kl == "teacher_first"
    recipe = build_recipe("bdkd", temperature=temperature, gap_scale=gap_scale,
                          teacher_kl=teacher_kl)
    w_r = torch.sigmoid((entropy(BD_S, temperature) - entropy(BD_T, temperature)) / gap_scale)
    assert w_r.min() < 0.3 and w_r.max() > 0.7
    w_f = 1 - w_r
    t2 = temperature**2
    log_s, log_t = log_p(BD_S, temperature), log_p(BD_T, temperature)
    expected = {
        "ce": (ce(BD_S, LABELS), 1.0, "labeled"),
        "forward_kl": (float((w_f * t2 * kl(log_t, log_s)).mean()), 1.0, "examples"),
        "reverse_kl": (float((w_r * t2 * kl(log_s, log_t)).mean()), 1.0, "examples"),
        "teacher_ce": (ce(BD_T, LABELS), 1.0, "labeled"),
        "teacher_kl": (float((t2 * (kl(log_t, log_s) if teacher_first else
                                    kl(log_s, log_t))).mean()), 1.0, "examples"),
    }
    assert float(kl(log_t, log_s).mean()) != pytest.approx(float(kl(log_s, log_t).mean()),
                                                          rel=1e-2)
    z_s, z_t = leaf(BD_S), leaf(BD_T)
    for state in (at(0, 0, 4, 3), at(2, 3, 4, 3)):
        terms = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t},
                             members=(Taps({"logits": z_t}),)), {"labels": LABELS}, state)
        check_terms(terms, expected)

    s64, t64 = leaf(BD_S, torch.float64), leaf(BD_T, torch.float64)

    def log_soft(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x / temperature, -1)

    def kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    student_loss = nll_mean(s64, LABELS) + t2 * (
        w_f * kl_rows(log_soft(t64.detach()), log_soft(s64))
        + w_r * kl_rows(log_soft(s64), log_soft(t64.detach()))).mean()
    teacher_pair = (log_soft(t64), log_soft(s64.detach()))
    teacher_loss = nll_mean(t64, LABELS) + t2 * kl_mean(*(teacher_pair if teacher_first
                                                          else teacher_pair[::-1]))
    assert_grads_close(grads_of(weighted_sum(terms), z_s, z_t),
                       grads_of(student_loss + teacher_loss, s64, t64))


# -------------------------------------------------------------------------------------- okdhp


OKDHP_RAMP = ScheduleConfig(name="gaussian", start=0.5, end=3.0, length=0.25, unit="phase")


@pytest.mark.parametrize("detach", [False, True])
def test_okdhp_terms_and_gradients_with_a_trained_gate(detach: bool) -> None:
    """sum_j CE(z_j, y) + w_ens CE(z_ens, y) + w(t) T^2 sum_j KL(p_ens^T || p_j^T), z_ens[c] =
    sum_j g_j[c] z_j[c] with g = softmax over the branches of (W f + b) reshaped [k, C] from
    the trunk features f, w(t) = w_0 + (w_1 - w_0) exp(-5 (1 - min(t / l, 1))^2) with t the
    share of the phase done; p_ens a fixed target only with detach_ensemble."""
    k, c, f, temperature, ens_weight = 4, 5, 3, 2.0, 1.7
    recipe = build_recipe("okdhp", branches=k, temperature=temperature, kl_weight=OKDHP_RAMP,
                          ensemble_weight=ens_weight, detach_ensemble=detach)
    trunk = recipe.trunk_tap
    heads, feats = leaf(seeded(k, 6, c, seed=35, scale=2.0)), leaf(seeded(6, f, seed=36))
    recipe.build(Taps({"heads": heads, trunk: feats}), None)
    gate_w, gate_b = seeded(k * c, f, seed=37, scale=0.8), seeded(k * c, seed=38)
    params = {tuple(q.shape): q for q in recipe.parameters()}
    assert set(params) == {(k * c, f), (k * c,)}
    with torch.no_grad():
        params[(k * c, f)].copy_(gate_w)
        params[(k * c,)].copy_(gate_b)

    def by_hand(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple:
        scores = (x @ w.T + b).reshape(6, k, c)  # row j * C + c of W: branch j, class c
        gate = torch.softmax(scores, dim=1)  # [B, k, C], over the branches
        ensemble = (gate.permute(1, 0, 2) * z).sum(0)
        target = ensemble.detach() if detach else ensemble
        log_target = torch.log_softmax(target / temperature, -1)
        ce_sum = sum(nll_mean(z[j], LABELS) for j in range(k))
        ce_ens = nll_mean(ensemble, LABELS)
        kl_sum = sum(temperature**2 * kl_mean(log_target,
                                              torch.log_softmax(z[j] / temperature, -1))
                     for j in range(k))
        return ce_sum, ce_ens, kl_sum

    h64, x64, w64, b64 = (leaf(x, torch.float64) for x in (heads, feats, gate_w, gate_b))
    ce_sum, ce_ens, kl_sum = by_hand(h64, x64, w64, b64)
    assert ce_ens.item() != pytest.approx(by_hand(h64, x64, 0 * w64, 0 * b64)[1].item(),
                                          rel=1e-3)
    # at(e, b, 4, 3): a phase of 12 steps; t = 3/12 (the ramp's end) and 1/12.
    for state, weight in ((at(0, 0, 4, 3), 0.5 + 2.5 * math.exp(-5 * (1 - 1 / 3) ** 2)),
                          (at(0, 2, 4, 3), 3.0), (at(2, 3, 4, 3), 3.0)):
        terms = recipe.terms(Taps({"heads": heads, trunk: feats}), None, {"labels": LABELS},
                             state)
        check_terms(terms, {"ce": (ce_sum.item(), 1.0, "labeled"),
                            "ce_ensemble": (ce_ens.item(), ens_weight, "labeled"),
                            "kl": (kl_sum.item(), weight, "examples")})
    terms = recipe.terms(Taps({"heads": heads, trunk: feats}), None, {"labels": LABELS},
                         at(0, 0, 4, 3))
    weight = 0.5 + 2.5 * math.exp(-5 * (1 - 1 / 3) ** 2)
    gate = [params[(k * c, f)], params[(k * c,)]]
    assert_grads_close(grads_of(weighted_sum(terms), heads, feats, *gate),
                       grads_of(ce_sum + ens_weight * ce_ens + weight * kl_sum,
                                h64, x64, w64, b64))


# ------------------------------------------------------------------------------- mean_teacher

TOKEN_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
TOKEN_LABELS = torch.tensor([[1, 3, U, U], [0, 4, U, U], [2, U, 1, 3]])
VALID = TOKEN_MASK.bool()
TOK_S = torch.where(VALID.unsqueeze(-1), seeded(3, 4, 5, seed=38, scale=2.0), torch.tensor(9.0))
TOK_T = torch.where(VALID.unsqueeze(-1), seeded(3, 4, 5, seed=39, scale=2.0),
                    seeded(3, 4, 5, seed=40, scale=20.0))
MT_S, MT_T = seeded(6, 5, seed=41, scale=2.0), seeded(6, 5, seed=42, scale=2.0)
RAMP = ScheduleConfig(name="linear", start=1.0, end=4.0, length=2.0, unit="epochs")


def consistency(z_s: torch.Tensor, z_t: torch.Tensor, rows: torch.Tensor, kind: str) -> float:
    """mse: mean over rows and classes of (softmax z_s - softmax z_t)^2; kl: KL(p_t || p_s)
    summed over classes, mean over rows."""
    if kind == "mse":
        return float(((p(z_s) - p(z_t)) ** 2)[rows].mean())
    return mean_over(kl(log_p(z_t), log_p(z_s)), rows)


@pytest.mark.parametrize("kind", ["mse", "kl"])
@pytest.mark.parametrize(("state", "weight"), [
    (at(0, 1, 4, 5), 1.0 + 3.0 * 0.5 / 2),    # e = 0.5 of a 2-epoch ramp 1 -> 4
    (at(1, 1, 4, 5), 1.0 + 3.0 * 1.5 / 2),
    (at(3, 0, 4, 5), 4.0),
])
def test_mean_teacher_terms(kind: str, state: TrainState, weight: float) -> None:
    """w_ce CE(y, z_s) over labelled samples + w(t) C(z_s, z_t) over every sample."""
    recipe = build_recipe("mean_teacher", ce_weight=0.6, consistency=kind,
                          consistency_weight=RAMP, momentum=0.7)
    every = torch.ones(6, dtype=torch.bool)
    terms = recipe.terms(Taps({"logits": MT_S}), Taps({"logits": MT_T}), {"labels": LABELS},
                         state)
    check_terms(terms, {"ce": (ce(MT_S, LABELS), 0.6, "labeled"),
                        "consistency": (consistency(MT_S, MT_T, every, kind), weight,
                                        "examples")})


def test_mean_teacher_ce_over_the_whole_batch() -> None:
    """ce_denominator = batch (the official code): the CE summed over the labelled samples
    (4 of 6) divided by all 6, counted in examples; per token, by the 9 valid tokens."""
    recipe = build_recipe("mean_teacher", ce_weight=0.6, ce_denominator="batch")
    terms = recipe.terms(Taps({"logits": MT_S}), Taps({"logits": MT_T}), {"labels": LABELS},
                         at(0, 0, 4, 5))
    check_term("ce", terms["ce"], float(ce_rows(MT_S, LABELS).sum() / 6), 0.6, "examples")
    assert float(ce_rows(MT_S, LABELS).sum() / 6) == pytest.approx(ce(MT_S, LABELS) * 4 / 6)
    terms = recipe.terms(Taps({"logits": TOK_S}, TOKEN_MASK), Taps({"logits": TOK_T},
                         TOKEN_MASK), {"labels": TOKEN_LABELS, "attention_mask": TOKEN_MASK},
                         at(0, 0, 4, 5))
    check_term("ce", terms["ce"], float(ce_rows(TOK_S, TOKEN_LABELS).sum() / 9), 0.6, "tokens")


@pytest.mark.parametrize(("progress", "weight"), [
    (1.25, 10 * (1 - math.cos(math.pi * 0.25)) / 2), (2.5, 5.0), (5.0, 10.0), (7.0, 10.0)])
def test_mean_teacher_default_weight_is_a_cosine_ramp_to_10_over_5_epochs(
        progress: float, weight: float) -> None:
    state = TrainState(epoch=int(progress - 1e-9), step=0, epoch_progress=progress,
                       steps_per_epoch=4, total_steps=40)
    terms = build_recipe("mean_teacher").terms(Taps({"logits": MT_S}), Taps({"logits": MT_T}),
                                               {"labels": LABELS}, state)
    assert float(terms["consistency"].weight) == pytest.approx(weight)


def bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def mlp_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def set_state(model: nn.Module, seed: int) -> None:
    """New parameters (and BatchNorm statistics), as after an optimizer step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in model.parameters():
            q.copy_(torch.randn(q.shape, generator=g))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=g))
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)


def bn_by_hand(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
               x: torch.Tensor) -> torch.Tensor:
    """``bn_model`` (BatchNorm in eval mode) computed from its tensors."""
    h = d(x) @ params["0.weight"].T + params["0.bias"]
    normal = (h - buffers["1.running_mean"]) / torch.sqrt(buffers["1.running_var"] + 1e-5)
    return normal * params["1.weight"] + params["1.bias"]


def mlp_by_hand(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(d(x) @ params["0.weight"].T + params["0.bias"])
    return h @ params["2.weight"].T + params["2.bias"]


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    return ({k: d(v) for k, v in model.named_parameters()},
            {k: d(v) for k, v in model.named_buffers() if "running" in k})


def test_mean_teacher_ema_follows_its_momentum_schedule() -> None:
    """theta_t <- m theta_t + (1 - m) theta_s after each step with m read at that step's
    state; BatchNorm statistics copied."""
    momentum = ScheduleConfig(name="linear", start=0.5, end=0.9, length=4.0, unit="steps")
    recipe = build_recipe("mean_teacher", momentum=momentum)
    student = bn_model(0)
    source = recipe.teacher_source(student, None)
    source.bind(["logits"], CPU)
    ema, _ = snapshot(student)
    x = seeded(5, 3, seed=43)
    for step, seed in ((1, 44), (3, 45)):
        set_state(student, seed)
        m = 0.5 + 0.4 * step / 4
        source.after_step(student, TrainState(step=step, steps_per_epoch=4, total_steps=8))
        params, buffers = snapshot(student)
        ema = {k: m * ema[k] + (1 - m) * params[k] for k in ema}
        torch.testing.assert_close(d(source({"input": x})["logits"]),
                                   bn_by_hand(ema, buffers, x), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------- atsen

# Two teachers' logits over 8 rows (4 classes): with threshold 0.7 and sharpening k = 3 the
# rows are kept (0, 1, 5, 7), in disagreement (2, 4) or neither (3); row 6 is kept only when
# the sharpened probabilities are divided by the class frequencies.
T_A = torch.tensor([[4.0, 0, 0, 0], [0, 0, 3.5, 0], [0, 3, 0, 0], [0.6, 0, 0, 0],
                    [1.0, 0, 0, 0.2], [0, 0, 0, 2.0], [0, 0.64, 0, 0], [0, 0, 2.5, 0]])
T_B = torch.tensor([[3.0, 0, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 3], [0.5, 0, 0, 0],
                    [0.2, 0, 0, 1.0], [0, 0, 0, 1.6], [0, 0.64, 0, 0], [0, 0.5, 2.0, 0]])
ATSEN_LABELS = torch.tensor([1, U, 3, 0, U, U, 2, 2])
Z_A, Z_B = seeded(8, 4, seed=46, scale=2.0), seeded(8, 4, seed=47, scale=2.0)
ATSEN_PARAMS = {"threshold": 0.7, "sharpen": 3.0, "temperature": 1.5, "pseudo_weight": 0.4,
                "kd_weight": 0.6, "warmup_epochs": 1.5, "skip_prob": 0.5, "seed": 7,
                "ce_weight": ScheduleConfig(name="step", boundaries=[2.0], values=[0.8, 0.3])}


def sharpened(z: torch.Tensor, valid: torch.Tensor, frequency: bool) -> torch.Tensor:
    """q_c = (p_c^k / f_c) / sum_j (p_j^k / f_j), f_c = sum over valid rows of p_c."""
    probs = p(z)
    powered = probs**3.0
    if frequency:
        powered = powered / probs[valid].sum(0)
    return powered / powered.sum(-1, keepdim=True)


def atsen_by_hand(z_x: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor,
                  labels: torch.Tensor, valid: torch.Tensor,
                  frequency: bool) -> tuple[float, float, float, torch.Tensor]:
    """(ce, pseudo, kd, kept) of one student: pseudo = sum over kept rows of CE(label, z) /
    #valid; kd = sum over disagreeing rows of (T^2 KL(p_a^T || p^T) + T^2 KL(p_b^T || p^T))
    / 2 / #valid."""
    conf_a, top_a = sharpened(t_a, valid, frequency).max(-1)
    conf_b, top_b = sharpened(t_b, valid, frequency).max(-1)
    kept = valid & (top_a == top_b) & (conf_a >= 0.7) & (conf_b >= 0.7)
    disagree = valid & (top_a != top_b)
    n = valid.sum()
    pseudo = (ce_rows(z_x, top_a) * kept).sum() / n
    both = (hinton_kd_rows(z_x, t_a, 1.5) + hinton_kd_rows(z_x, t_b, 1.5)) / 2
    kd = (both * disagree).sum() / n
    return ce(z_x, labels), float(pseudo), float(kd), kept


def atsen_expected(on: float, ce_weight: float, unit: str, z_a, z_b, t_a, t_b, labels, valid,
                   frequency: bool) -> dict:
    out = {}
    for prefix, z in (("", z_a), ("peer_", z_b)):
        ce_x, pseudo, kd, _ = atsen_by_hand(z, t_a, t_b, labels, valid, frequency)
        out[f"{prefix}ce"] = (ce_x, ce_weight, "labeled")
        out[f"{prefix}pseudo"] = (pseudo, on * 0.4, unit)
        out[f"{prefix}kd"] = (kd, on * 0.6, unit)
    return out


def group_taps(t_a: torch.Tensor, z_b: torch.Tensor, t_b: torch.Tensor,
               mask: torch.Tensor | None = None) -> Taps:
    """The teacher taps of ATSEN's source: members (teacher A, peer student B, teacher B)."""
    members = tuple(Taps({"logits": z}, mask) for z in (t_a, z_b, t_b))
    return members[0].with_members(members)


@pytest.mark.parametrize("frequency", [False, True])
@pytest.mark.parametrize(("progress", "on", "ce_weight"), [
    (1.0, 0.0, 0.8),   # warm-up: CE only
    (1.5, 0.0, 0.8),   # e = warm-up is still the warm-up ([e > warm-up])
    (2.25, 1.0, 0.3),  # after it; the CE weight stepped down at epoch 2
])
def test_atsen_terms_on_sample_logits(frequency: bool, progress: float, on: float,
                                      ce_weight: float) -> None:
    """L_X = w_ce CE(y, z_X) + [e > warm-up] (w_p PSEUDO_X + w_kd KD_X) for X = A, B."""
    valid = torch.ones(8, dtype=torch.bool)
    kept = atsen_by_hand(Z_A, T_A, T_B, ATSEN_LABELS, valid, frequency)[3]
    assert kept.tolist() == [True, True, False, False, False, True, frequency, True]
    recipe = build_recipe("atsen", frequency=frequency, **ATSEN_PARAMS)
    state = TrainState(epoch=int(progress - 1e-9), step=0, epoch_progress=progress,
                       steps_per_epoch=4, total_steps=16)
    terms = recipe.terms(Taps({"logits": Z_A}), group_taps(T_A, Z_B, T_B),
                         {"labels": ATSEN_LABELS}, state)
    check_terms(terms, atsen_expected(on, ce_weight, "examples", Z_A, Z_B, T_A, T_B,
                                      ATSEN_LABELS, valid, frequency))


def test_atsen_token_terms_leave_padding_out() -> None:
    """Token logits: the 8 rows above are the valid tokens; the padding tokens are confident
    and agreeing (class 1, which would also change the class frequencies) or disagreeing, and
    must count nowhere."""
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    valid = mask.bool()

    def tokens(rows: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        out = torch.empty(2, 5, 4)
        out[valid] = rows
        out[~valid] = padding
        return out

    t_a = tokens(T_A, torch.tensor([[0, 9.0, 0, 0], [9.0, 0, 0, 0]]))
    t_b = tokens(T_B, torch.tensor([[0, 9.0, 0, 0], [0, 0, 9.0, 0]]))
    z_a = tokens(Z_A, torch.full((2, 4), 5.0))
    z_b = tokens(Z_B, torch.full((2, 4), -5.0))
    labels = torch.full((2, 5), U)
    labels[valid] = ATSEN_LABELS
    recipe = build_recipe("atsen", **ATSEN_PARAMS)
    state = TrainState(epoch=2, step=9, epoch_progress=2.5, steps_per_epoch=4, total_steps=16)
    terms = recipe.terms(Taps({"logits": z_a}, mask), group_taps(t_a, z_b, t_b, mask),
                         {"labels": labels, "attention_mask": mask}, state)
    check_terms(terms, atsen_expected(1.0, 0.3, "tokens", z_a, z_b, t_a, t_b, labels, valid,
                                      True))


def test_atsen_fine_grained_ema_follows_its_momentum_seed_and_skip_probability() -> None:
    """Each teacher updates each parameter tensor iff its draw u >= skip_prob, the draws
    torch.rand(n_tensors) per step from a generator seeded with ``seed`` (teacher A) and
    ``seed + 1`` (teacher B), with m read from the momentum schedule at the step."""
    momentum = ScheduleConfig(name="linear", start=0.6, end=0.9, length=4.0, unit="steps")
    recipe = build_recipe("atsen", **{**ATSEN_PARAMS, "momentum": momentum})
    student, peer = mlp_model(1), mlp_model(2)
    source = recipe.teacher_source(student, peer)
    source.bind(["logits"], CPU)
    emas = [snapshot(student)[0], snapshot(peer)[0]]
    generators = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    x = seeded(5, 3, seed=48)
    updated, skipped = 0, 0
    for step, seed in ((2, 49), (4, 50)):
        set_state(student, seed)
        set_state(peer, seed + 100)
        m = 0.6 + 0.3 * min(step / 4, 1.0)
        source.after_step(student, TrainState(step=step, steps_per_epoch=4, total_steps=8))
        out = source({"input": x})
        for which, (model, generator) in enumerate(zip((student, peer), generators,
                                                       strict=True)):
            params = snapshot(model)[0]
            draws = torch.rand(len(params), generator=generator).tolist()
            for name, u in zip(params, draws, strict=True):  # named_parameters() order
                if u >= 0.5:
                    emas[which][name] = m * emas[which][name] + (1 - m) * params[name]
                    updated += 1
                else:
                    skipped += 1
            taps = out.members[0 if which == 0 else 2]  # teacher A, teacher B
            torch.testing.assert_close(d(taps["logits"]), mlp_by_hand(emas[which], x),
                                       rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d(out.members[1]["logits"]),  # the peer student itself
                                   mlp_by_hand(snapshot(peer)[0], x), rtol=1e-5, atol=1e-6)
    assert updated and skipped
