"""token_kd: each divergence against a hand computation over the labelled tokens, padding and
prompts left out, the tokens unit exact under gradient accumulation, the teacher untouched, a
student that beats its ce baseline, the language-modelling evaluation, and the errors. Tiny
Llamas built here (never a real model)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import transformers
from lm_models import EOS, PAD, VOCAB, save_llama, save_tokenizer, tiny_llama
from torch import nn

from kdistill import Distiller
from kdistill.batch import TOKEN_MASK, UNLABELED
from kdistill.batching import epoch_global_batches, process_micro_batches
from kdistill.config import parse_config
from kdistill.data.lm import TokenBlocks, pack, pad_rows, seq2seq_rows
from kdistill.errors import KdistillError
from kdistill.evaluate import eval_batches, evaluate_model, predict
from kdistill.models import build_model
from kdistill.recipes import build_recipe
from kdistill.run import build_data, check_task
from kdistill.schedules import TrainState
from kdistill.taps import TapReader, Taps

U = UNLABELED


def pairs_data() -> TokenBlocks:
    """Four prompt/completion rows of different lengths and prompt lengths: micro-batches of
    two hold different numbers of labelled tokens."""
    sequences = [[4, 5, 6, 7, 8, EOS], [9, 10, 11, EOS], [12, 13, 14, 15, 16, 17, 18, EOS],
                 [19, 20, EOS]]
    return pad_rows(sequences, [3, 1, 5, 2], block_size=16, pad_id=PAD)


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def hand_divergence(name: str, student: torch.Tensor, teacher: torch.Tensor,
                    mask: torch.Tensor, temperature: float, beta: float) -> float:
    """The mean over the masked positions of D(p_t, p_s), written out in float64 numpy."""
    values = []
    for b, t in zip(*np.nonzero(mask.numpy()), strict=True):
        zs = student[b, t].double().numpy() / temperature
        zt = teacher[b, t].double().numpy() / temperature
        ps, pt = np.exp(zs - zs.max()), np.exp(zt - zt.max())
        ps, pt = ps / ps.sum(), pt / pt.sum()
        if name == "forward_kl":
            values.append(np.sum(pt * np.log(pt / ps)))
        elif name == "reverse_kl":
            values.append(np.sum(ps * np.log(ps / pt)))
        elif name == "generalized_jsd":
            m = beta * pt + (1 - beta) * ps
            values.append(beta * np.sum(pt * np.log(pt / m))
                          + (1 - beta) * np.sum(ps * np.log(ps / m)))
        else:
            values.append(0.5 * np.abs(pt - ps).sum())
    return float(np.mean(values))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd", "tvd"])
def test_each_divergence_is_the_hand_computed_mean_over_the_labelled_tokens(divergence):
    data = pairs_data()
    batch = data.rows([0, 1, 2, 3])
    # In float64, so that the comparison tests the formula, not float32 rounding.
    student, teacher = tiny_llama(seed=0).double(), tiny_llama(seed=1).double()
    with torch.no_grad():
        z_s, z_t = logits_of(student, batch), logits_of(teacher, batch)
    params = {"beta": 0.3} if divergence == "generalized_jsd" else {}
    recipe = build_recipe("token_kd", divergence=divergence, temperature=2.0, kd_weight=0.7,
                          **params)
    terms = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), batch, TrainState())
    assert set(terms) == {"kd"}
    kd = terms["kd"]
    assert (kd.weight, kd.unit) == (0.7, "tokens")
    mask = batch[TOKEN_MASK].bool()
    assert int(mask.sum()) == 3 + 3 + 3 + 1  # completion tokens plus each end of sequence
    expected = hand_divergence(divergence, z_s, z_t, mask, 2.0, 0.3)
    assert float(kd.value) == pytest.approx(expected, rel=1e-9)
    # Prompt and padding positions count nowhere: garbage there changes nothing.
    spoiled = z_t.masked_fill(~mask.unsqueeze(-1), float("nan"))
    again = recipe.terms(Taps({"logits": z_s}), Taps({"logits": spoiled}), batch, TrainState())
    assert float(again["kd"].value) == pytest.approx(expected, rel=1e-9)


def test_the_optional_ce_is_the_mean_next_token_cross_entropy():
    batch = pairs_data().rows([0, 1, 2, 3])
    z_s, z_t = torch.randn(4, 7, len(VOCAB)), torch.randn(4, 7, len(VOCAB))
    recipe = build_recipe("token_kd", ce_weight=0.25)
    terms = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), batch, TrainState())
    known = batch["labels"] != U
    expected = -z_s.log_softmax(-1)[known].gather(1, batch["labels"][known][:, None]).mean()
    assert (terms["ce"].weight, terms["ce"].unit) == (0.25, "labeled")
    assert float(terms["ce"].value) == pytest.approx(float(expected), rel=1e-6)


def fit_one_step(student: nn.Module, teacher: nn.Module, data: TokenBlocks, batch_size: int,
                 accumulation: int) -> dict[str, torch.Tensor]:
    recipe = build_recipe("token_kd", divergence="generalized_jsd", beta=0.3, temperature=1.5,
                          ce_weight=0.5)
    Distiller(student, teacher, recipe, epochs=1, batch_size=batch_size,
              accumulation=accumulation, progress=False,
              optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.0}).fit(data)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_accumulation_gives_the_gradient_of_the_mean_over_the_global_batch_tokens():
    data = pairs_data()
    teacher, initial = tiny_llama(seed=1), tiny_llama(seed=0)
    teacher_before = copy.deepcopy(teacher.state_dict())
    big = fit_one_step(copy.deepcopy(initial), teacher, data, batch_size=4, accumulation=1)
    accumulated = fit_one_step(copy.deepcopy(initial), teacher, data, batch_size=2,
                               accumulation=2)

    # By hand: the token-weighted mean over all 10 labelled tokens of the four rows.
    reference = copy.deepcopy(initial)
    batch = data.rows([0, 1, 2, 3])
    mask = batch[TOKEN_MASK].bool()
    z_s = logits_of(reference, batch)
    with torch.no_grad():
        z_t = logits_of(teacher, batch)
    log_ps, log_pt = (z_s / 1.5).log_softmax(-1), (z_t / 1.5).log_softmax(-1)
    log_m = torch.logsumexp(torch.stack([log_pt + math.log(0.3), log_ps + math.log(0.7)]), 0)
    jsd = (0.3 * (log_pt.exp() * (log_pt - log_m)).sum(-1)
           + 0.7 * (log_ps.exp() * (log_ps - log_m)).sum(-1))
    ce = -z_s.log_softmax(-1).gather(-1, batch["labels"].clamp_min(0)[..., None])[..., 0]
    loss = (jsd[mask].sum() + 0.5 * ce[mask].sum()) / mask.sum()
    loss.backward()
    expected = {name: (p - p.grad).detach() for name, p in reference.named_parameters()}

    assert set(expected) == set(big)
    for name, value in expected.items():
        assert torch.allclose(big[name], value, atol=1e-6), name
        assert torch.allclose(accumulated[name], value, atol=1e-6), name
    assert not torch.allclose(big["lm_head.weight"], initial.state_dict()["lm_head.weight"])
    # The two micro-batches hold different token counts, so a mean per micro-batch would
    # weight tokens unequally; and the teacher did not change.
    (rows,) = epoch_global_batches(list(range(4)), 4, 2, 0, 0, 0)
    counts = [int(data.rows(m)[TOKEN_MASK].sum()) for m in process_micro_batches(rows, 1, 0, 2)]
    assert sorted(counts) == [4, 6]
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


class MarkovTeacher(nn.Module):
    """A teacher that knows the language: each token's successor distribution."""

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        self.register_buffer("table", log_probs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return {"logits": self.table[input_ids]}


def markov_language(seed: int = 0) -> tuple[torch.Tensor, object]:
    """Transition log-probabilities over 30 words (three successors each, 0.6/0.3/0.1) and a
    sampler of sentences of 6 to 10 words ending with </s>."""
    rng = np.random.default_rng(seed)
    words = np.arange(4, 34)
    table = np.full((len(VOCAB), len(VOCAB)), 1e-6)
    successors = {w: rng.choice(words, 3, replace=False) for w in words}
    for w, nexts in successors.items():
        table[w, nexts] = [0.6, 0.3, 0.1]
    table[:, EOS] += 0.05  # a sentence may end after any word
    table /= table.sum(1, keepdims=True)

    def sentence() -> list[int]:
        word = int(rng.choice(words))
        out = [word]
        for _ in range(int(rng.integers(5, 10))):
            word = int(rng.choice(successors[word], p=[0.6, 0.3, 0.1]))
            out.append(word)
        return [*out, EOS]

    return torch.tensor(np.log(table), dtype=torch.float32), sentence


def test_a_small_student_learns_more_from_the_teacher_than_from_the_labels_alone():
    table, sentence = markov_language()
    train = pack([sentence() for _ in range(40)], 16, PAD, "train")
    test = pack([sentence() for _ in range(100)], 16, PAD, "test")
    teacher = MarkovTeacher(table)
    initial = tiny_llama(layers=1, hidden=16, heads=2, kv_heads=1, seed=2)

    def perplexity(recipe: str) -> float:
        student = copy.deepcopy(initial)
        Distiller(student, None if recipe == "ce" else teacher, recipe, epochs=20,
                  batch_size=8, progress=False, seed=0,
                  optimizer={"name": "adamw", "lr": 3e-3}).fit(train)
        return evaluate_model(student, eval_batches(test, 64), "cpu")["perplexity"]

    ce, kd = perplexity("ce"), perplexity("token_kd")
    truth = evaluate_model(teacher, eval_batches(test, 64), "cpu")["perplexity"]
    assert truth < kd < 0.85 * ce, (truth, kd, ce)


def test_the_evaluation_reports_perplexity_accuracy_and_agreement_over_labelled_tokens():
    data = pairs_data()
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    batches = eval_batches(data, 3)  # two batches
    predictions = predict(student, batches)
    teacher_tokens = predict(teacher, batches).logits
    metrics = evaluate_model(student, batches, "cpu", teacher_tokens)
    batch = data.rows([0, 1, 2, 3])
    mask = batch[TOKEN_MASK].bool()
    with torch.no_grad():
        z_s, z_t = logits_of(student, batch), logits_of(teacher, batch)
    nll = -z_s.double().log_softmax(-1).gather(-1, batch["labels"].clamp_min(0)[..., None])[..., 0]
    assert metrics["perplexity"] == pytest.approx(math.exp(float(nll[mask].mean())), rel=1e-5)
    guess = z_s.argmax(-1)[mask]
    assert metrics["accuracy"] == pytest.approx(float((guess == batch["labels"][mask])
                                                      .double().mean()))
    assert metrics["agreement"] == pytest.approx(float((guess == z_t.argmax(-1)[mask])
                                                       .double().mean()))
    assert torch.equal(predictions.mask, mask)


def test_beta_belongs_to_generalized_jsd_alone():
    with pytest.raises(ValueError, match="beta mixes the two distributions of generalized_jsd; "
                                         "divergence 'tvd' has none, remove beta"):
        build_recipe("token_kd", divergence="tvd", beta=0.2)


def test_token_kd_needs_one_vocabulary_and_language_modelling_batches():
    batch = pairs_data().rows([0, 1])
    recipe = build_recipe("token_kd")
    z_s = torch.randn(2, 7, len(VOCAB))
    with pytest.raises(ValueError, match="token_kd: the student predicts 100 tokens and the "
                                         "teacher 90; .* must share the teacher's tokenizer"):
        recipe.terms(Taps({"logits": z_s}), Taps({"logits": torch.randn(2, 7, 90)}), batch,
                     TrainState())
    with pytest.raises(ValueError, match="token_kd: the batch has no 'token_mask'"):
        recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_s}),
                     {k: v for k, v in batch.items() if k != TOKEN_MASK}, TrainState())


def test_a_run_pairs_language_modelling_data_with_language_modelling_recipes(tmp_path):
    folder = save_llama(tmp_path / "teacher")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on a mat\na dog ran to it\nthe bird sang\n")
    raw = {"data": {"name": "lm_text", "path": str(text),
                    "options": {"tokenizer": str(folder), "test_path": str(text)}},
           "student": {"name": "lm_student", "options": {"teacher": str(folder), "layers": [0]}},
           "teacher": {"model": {"name": "hf_lm", "options": {"path": str(folder)}}},
           "recipe": {"name": "token_kd", "divergence": "reverse_kl"}}
    config = parse_config(raw)
    data = build_data(config.data)
    check_task(build_recipe("token_kd"), data, "recipe")
    check_task(build_recipe("ce"), data, "recipe")
    with pytest.raises(KdistillError, match="recipe: 'hinton' is a classification recipe but "
                                            r"data set 't' is a lm task; recipes for it: "
                                            r"\['ce', 'gkd', 'ka', 'seqkd', 'span_kd', "
                                            r"'token_kd'\]"):
        check_task(build_recipe("hinton"), data, "recipe")
    with pytest.raises(KdistillError, match="teacher.train: recipe 'token_kd' distils a "
                                            "pretrained teacher"):
        parse_config({**raw, "teacher": {**raw["teacher"], "train": {"epochs": 1}}})


def test_an_encoder_decoder_model_learns_through_the_same_terms(tmp_path):
    """A tiny T5 teacher loaded by hf_lm and a T5 student: the decoder's logits line up with
    the labels, and token_kd is the hand-computed mean over the labelled decoder tokens."""
    def t5(seed: int) -> transformers.T5ForConditionalGeneration:
        torch.manual_seed(seed)
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=len(VOCAB), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
            dropout_rate=0.0, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD))

    t5(1).save_pretrained(tmp_path / "teacher")
    save_tokenizer(tmp_path / "teacher")
    teacher = build_model("hf_lm", (), len(VOCAB), path=str(tmp_path / "teacher"), task="lm")
    assert isinstance(teacher, transformers.T5ForConditionalGeneration)
    data = seq2seq_rows([[4, 5, 6], [7, 8]], [[9, 10, EOS], [11, EOS]], 8, PAD, PAD)
    batch = data.rows([0, 1])
    student = t5(0)
    with TapReader(student, ["logits"]) as s_reader, TapReader(teacher, ["logits"]) as t_reader:
        z_s, z_t = s_reader(batch)["logits"], t_reader(batch)["logits"].detach()
    assert z_s.shape == (*batch["labels"].shape, len(VOCAB))
    recipe = build_recipe("token_kd", divergence="reverse_kl", temperature=0.5)
    kd = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), batch, TrainState())["kd"]
    mask = batch[TOKEN_MASK].bool()
    assert int(mask.sum()) == 5
    expected = hand_divergence("reverse_kl", z_s.detach(), z_t, mask, 0.5, 0.0)
    assert float(kd.value.detach()) == pytest.approx(expected, rel=1e-5)
