"""gkd: the JSD(beta) over the completion tokens against a float64 hand computation, the
sampled branch taken on the seeded steps with probability lambda, sampling at the temperature
(greedy in the limit), one optimizer step equal to the hand gradient over the sampled
sequences (no gradient through sampling, units counted on the sampled tokens, the teacher
unchanged), an exact resume, and the teacher-cache refusal. Tiny Llamas built here."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from lm_models import EOS, PAD, tiny_llama
from torch import nn

from kdistill import Distiller
from kdistill.batch import TOKEN_MASK, UNLABELED
from kdistill.data.lm import TokenBlocks, pad_rows
from kdistill.recipes import build_recipe, cache_refusal
from kdistill.recipes.gkd import GKD
from kdistill.schedules import TrainState
from kdistill.taps import TapReader, Taps


def pairs_data() -> TokenBlocks:
    sequences = [[4, 5, 6, 7, 8, EOS], [9, 10, 11, EOS], [12, 13, 14, 15, 16, 17, 18, EOS],
                 [19, 20, EOS]]
    return pad_rows(sequences, [3, 1, 5, 2], block_size=16, pad_id=PAD)


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def hand_jsd(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
             beta: float) -> float:
    """The mean over the masked positions of beta KL(P || M) + (1 - beta) KL(Q || M),
    M = beta P + (1 - beta) Q, P the teacher's distribution and Q the student's (numpy)."""
    values = []
    for b, t in zip(*np.nonzero(mask.numpy()), strict=True):
        zs, zt = student[b, t].double().numpy(), teacher[b, t].double().numpy()
        q, p = np.exp(zs - zs.max()), np.exp(zt - zt.max())
        q, p = q / q.sum(), p / p.sum()
        m = beta * p + (1 - beta) * q
        values.append(beta * np.sum(p * np.log(p / m)) + (1 - beta) * np.sum(q * np.log(q / m)))
    return float(np.mean(values))


def prepared(recipe: GKD, student: nn.Module, batch: dict, step: int = 0) -> dict:
    with TapReader(student, ["logits"]) as reader:
        return recipe.prepare(dict(batch), reader, TrainState(step=step))


def test_the_loss_is_the_jsd_over_the_sampled_completion_tokens():
    batch = pairs_data().rows([0, 1, 2, 3])
    student, teacher = tiny_llama(seed=0).double(), tiny_llama(seed=1).double()
    recipe = build_recipe("gkd", lmbda=1.0, beta=0.3, temperature=1.7, max_new_tokens=4,
                          kd_weight=0.6)
    rows = prepared(recipe, student, batch)
    # The prompts stay; each completion is at most 4 sampled tokens, up to the first </s>;
    # labels and token mask are on the completion alone.
    prompt_lengths = [3, 1, 5, 2]
    for r, length in enumerate(prompt_lengths):
        ids = rows["input_ids"][r]
        assert ids[:length].tolist() == batch["input_ids"][r, :length].tolist()
        labelled = rows["labels"][r][rows["labels"][r] != UNLABELED].tolist()
        assert rows[TOKEN_MASK][r].sum() == len(labelled)
        assert 1 <= len(labelled) <= 4 and (EOS not in labelled[:-1])
        assert len(labelled) == 4 or labelled[-1] == EOS
        assert rows["labels"][r, :length - 1].eq(UNLABELED).all()
        assert rows["input_ids"][r, length:length + len(labelled) - 1].tolist() == labelled[:-1]
    assert torch.equal(rows["index"], batch["index"])
    assert not torch.equal(rows["labels"], batch["labels"])
    with torch.no_grad():
        z_s, z_t = logits_of(student, rows), logits_of(teacher, rows)
    terms = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), rows, TrainState())
    assert set(terms) == {"kd"}
    assert (terms["kd"].weight, terms["kd"].unit) == (0.6, "tokens")
    expected = hand_jsd(z_s, z_t, rows[TOKEN_MASK].bool(), 0.3)
    assert float(terms["kd"].value) == pytest.approx(expected, rel=1e-9)


def test_a_near_zero_temperature_samples_the_greedy_completion():
    batch = pairs_data().rows([0, 1])
    student = tiny_llama(seed=3)
    rows = prepared(build_recipe("gkd", lmbda=1.0, temperature=1e-4, max_new_tokens=5),
                    student, batch)
    for r, length in enumerate([3, 1]):
        prompt = batch["input_ids"][r:r + 1, :length]
        greedy = student.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                  max_new_tokens=5, do_sample=False, pad_token_id=PAD,
                                  eos_token_id=EOS)[0, length:].tolist()
        greedy = greedy[:greedy.index(EOS) + 1] if EOS in greedy else greedy
        assert rows["labels"][r][rows["labels"][r] != UNLABELED].tolist() == greedy


def test_the_sampled_branch_is_taken_with_probability_lambda_on_seeded_steps():
    def draws(**params: Any) -> list[bool]:
        recipe = build_recipe("gkd", **params)
        return [recipe.on_policy(TrainState(phase=0, step=n)) for n in range(4000)]

    drawn = draws(lmbda=0.3, seed=4)
    assert abs(np.mean(drawn) - 0.3) < 0.025  # 3.5 standard deviations of 4000 draws
    assert draws(lmbda=0.3, seed=4) == drawn  # a function of (seed, phase, step) alone
    assert draws(lmbda=0.3, seed=5) != drawn
    assert not any(draws(lmbda=0.0)) and all(draws(lmbda=1.0))
    # The branch of a step: its rows are the data's, or sampled ones.
    recipe, student = build_recipe("gkd", lmbda=0.5, seed=4), tiny_llama(seed=0)
    batch = pairs_data().rows([0, 1, 2, 3])
    for step in range(6):
        rows = prepared(recipe, student, batch, step)
        kept = rows["labels"].shape == batch["labels"].shape and \
            torch.equal(rows["labels"], batch["labels"])
        assert kept != recipe.on_policy(TrainState(step=step)), step


class Recording(GKD):
    """gkd that keeps every prepared micro-batch (by step)."""

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.seen: list[tuple[int, dict]] = []

    def prepare(self, batch, student, state):
        rows = super().prepare(batch, student, state)
        self.seen.append((state.step, {k: v.clone() for k, v in rows.items()}))
        return rows


def test_one_step_is_the_hand_gradient_over_the_sampled_tokens_and_the_teacher_stays():
    """Accumulation 2: the two micro-batches sample completions of different lengths; the
    step's gradient is that of the mean over every sampled token of both, the samples taken
    as constants (no gradient through the sampling)."""
    data = pairs_data()
    teacher, initial = tiny_llama(seed=1), tiny_llama(seed=0)
    teacher_before = copy.deepcopy(teacher.state_dict())
    recipe = Recording(lmbda=1.0, beta=0.3, temperature=1.3, max_new_tokens=4)
    student = copy.deepcopy(initial)
    Distiller(student, teacher, recipe, epochs=1, batch_size=2, accumulation=2,
              progress=False, optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.0}).fit(data)
    assert [step for step, _ in recipe.seen] == [0, 0]
    micro = [rows for _, rows in recipe.seen]
    counts = [int(rows[TOKEN_MASK].sum()) for rows in micro]
    # Other counts than the data's micro-batches (4 and 6 tokens): weights taken from the
    # data's counts would weight the sampled tokens unequally.
    assert sorted(counts) != [4, 6], counts
    reference = copy.deepcopy(initial)
    total = torch.zeros(())
    for rows in micro:
        z_s = logits_of(reference, rows)
        with torch.no_grad():
            z_t = logits_of(teacher, rows)
        log_q, log_p = z_s.log_softmax(-1), z_t.log_softmax(-1)
        log_m = torch.logsumexp(torch.stack([log_p + np.log(0.3), log_q + np.log(0.7)]), 0)
        jsd = 0.3 * (log_p.exp() * (log_p - log_m)).sum(-1) + \
            0.7 * (log_q.exp() * (log_q - log_m)).sum(-1)
        total = total + jsd[rows[TOKEN_MASK].bool()].sum()
    (total / sum(counts)).backward()
    for name, p in reference.named_parameters():
        assert torch.allclose(student.state_dict()[name], (p - p.grad).detach(), atol=1e-6), name
    assert not torch.equal(student.state_dict()["lm_head.weight"],
                           initial.state_dict()["lm_head.weight"])
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_a_resumed_run_draws_and_trains_as_the_uninterrupted_one(tmp_path):
    data, teacher = pairs_data(), tiny_llama(seed=1)
    settings = {"epochs": 3, "batch_size": 2, "progress": False,
                "optimizer": {"name": "adamw", "lr": 1e-2}}
    params = {"lmbda": 0.5, "seed": 2, "max_new_tokens": 3}
    full_recipe = Recording(**params)
    full = Distiller(tiny_llama(seed=0), teacher, full_recipe, run_dir=tmp_path / "full",
                     **settings).fit(data)

    class Stopped(Exception):
        pass

    def stop(record: dict) -> None:
        raise Stopped

    with pytest.raises(Stopped):
        Distiller(tiny_llama(seed=0), teacher, Recording(**params), run_dir=tmp_path / "run",
                  **settings).fit(data, callbacks=[stop])
    resumed_recipe = Recording(**params)
    resumed = Distiller(tiny_llama(seed=7), teacher, resumed_recipe, run_dir=tmp_path / "run",
                        **settings).fit(data, resume=True)
    later = [(step, rows) for step, rows in full_recipe.seen if step >= 2]
    assert [s for s, _ in resumed_recipe.seen] == [s for s, _ in later] == [2, 3, 4, 5]
    for (_, mine), (_, theirs) in zip(resumed_recipe.seen, later, strict=True):
        assert torch.equal(mine["input_ids"], theirs["input_ids"])
    # Both branches occurred, so the resume reproduced draws of each kind.
    assert len({full_recipe.on_policy(TrainState(step=s)) for s in range(6)}) == 2
    for name, value in full.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[name], value), name


def test_gkd_refuses_a_teacher_cache_and_encoder_decoder_rows():
    assert cache_refusal([build_recipe("gkd")]) == (
        "recipe 'gkd' cannot read a teacher cache: its teacher reads completions the student "
        "samples during training, so the teacher must run live")
    rows = pairs_data().rows([0])
    with pytest.raises(ValueError, match="gkd: encoder-decoder rows"):
        build_recipe("gkd").prepare({**rows, "decoder_input_ids": rows["input_ids"]},
                                    lambda b: Taps({}), TrainState())


def test_the_branch_draw_depends_on_the_phase_as_on_the_step() -> None:
    recipe = GKD(lmbda=0.5, seed=4)
    draws = [[recipe.on_policy(TrainState(phase=phase, step=step)) for step in range(64)]
             for phase in (0, 1)]
    assert draws[0] != draws[1] and 16 < sum(draws[0]) < 48


def test_special_ids_prefer_the_generation_config_then_the_model_config() -> None:
    from types import SimpleNamespace

    from kdistill.recipes.completions import special_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 9],
                                                              pad_token_id=5),
                            config=SimpleNamespace(eos_token_id=3, pad_token_id=7))
    assert special_ids(model) == (2, 5)
    model.generation_config = SimpleNamespace(eos_token_id=None, pad_token_id=None)
    assert special_ids(model) == (3, 7)
    model.config.pad_token_id = None
    assert special_ids(model) == (3, 3)  # no pad id: the end-of-sequence id pads


def test_sampling_asks_generate_for_the_whole_softmax_at_the_temperature() -> None:
    from kdistill.recipes.completions import Decoding

    assert Decoding(8, sample=True, temperature=0.7).options() == {
        "do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0, "num_beams": 1}
    assert Decoding(8, num_beams=3).options() == {"do_sample": False, "num_beams": 3}
