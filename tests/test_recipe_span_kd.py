"""span_kd: the shared spans of two tokenizations, the term against a float64 hand computation
with a word-level student tokenizer and a word-piece teacher tokenizer of another vocabulary,
a config run (teacher unchanged), the refusals. Tiny models and tokenizers built here."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import transformers
from lm_models import ID, PAD, save_llama, save_tokenizer, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers

from kdistill import Distiller
from kdistill.batch import TOKEN_MASK
from kdistill.config import ConfigError, parse_config
from kdistill.data.lm import pad_rows
from kdistill.recipes import build_recipe
from kdistill.recipes.span_kd import NO_SPAN, shared_spans
from kdistill.run import build_data, preflight, train_run
from kdistill.schedules import TrainState
from kdistill.taps import Taps

# The teacher's vocabulary: 40 entries, some words whole and others in word pieces.
PIECES = ["[PAD]", "[UNK]", "</s>", "the", "on", "a", "to", "it", "ran", "c", "s", "m", "d",
          "##at", "##og"] + [f"x{i}" for i in range(25)]
TID = {token: i for i, token in enumerate(PIECES)}


def save_piece_tokenizer(folder: Path) -> Path:
    backend = Tokenizer(models.WordPiece(vocab=TID, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.save_pretrained(folder)
    return folder


def piece_llama(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(PIECES), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=TID["[PAD]"]))


def test_spans_start_where_both_tokenizations_start_a_token():
    text = "new york is big"
    student = [(0, 3), (3, 8), (8, 11), (11, 15)]  # "new", " york", " is", " big"
    teacher = [(0, 5), (5, 6), (6, 8), (9, 11), (11, 13), (13, 15)]  # "new y", "o", ...
    mine, theirs = shared_spans(text, student, teacher)
    # Shared starts: 0 ("new york" is one span: the teacher runs across the space), 9 ("is"),
    # 12 ("big": the teacher's " b" starts at 11, its first visible character at 12).
    assert mine == [0, 0, 1, 2]
    assert theirs == [0, 0, 0, 1, 2, 2]
    assert shared_spans("  ", [(0, 2)], [(0, 1)]) == ([NO_SPAN], [NO_SPAN])


@pytest.fixture
def tokenizers(tmp_path):
    return (str(save_tokenizer(tmp_path / "student")),
            str(save_piece_tokenizer(tmp_path / "teacher")))


def rows():
    words = [["the", "cat", "sat", "on", "the", "mat"], ["a", "dog", "ran", "to", "it"]]
    return pad_rows([[ID[w] for w in row] for row in words], [0, 2], block_size=16,
                    pad_id=PAD)


def log_probs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)


def hand_span_kd(student, teacher) -> float:
    """The Bernoulli KLs of the used spans written out for the two rows, over the 5 + 3
    labelled student tokens. Each span: the student word's position and the teacher pieces'
    positions. Row 1 "the cat sat on the mat": the first word is predicted by no position.
    Row 2 "a dog ran to it", a prompt of 2 student tokens: "dog" is not labelled."""
    total = 0.0
    for words, pieces, spans in (
            (["the", "cat", "sat", "on", "the", "mat"],
             ["the", "c", "##at", "s", "##at", "on", "the", "m", "##at"],
             [(1, [1, 2]), (2, [3, 4]), (3, [5]), (4, [6]), (5, [7, 8])]),
            (["a", "dog", "ran", "to", "it"], ["a", "d", "##og", "ran", "to", "it"],
             [(2, [3]), (3, [4]), (4, [5])])):
        s_lp = log_probs(student, [ID[w] for w in words])
        t_lp = log_probs(teacher, [TID[p] for p in pieces])
        for word, positions in spans:
            log_ps = float(s_lp[word - 1, ID[words[word]]])
            log_pt = sum(float(t_lp[j - 1, TID[pieces[j]]]) for j in positions)
            ps, pt = math.exp(log_ps), math.exp(log_pt)
            total += pt * (log_pt - log_ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    return total / 8


def test_the_term_is_the_hand_computed_span_kl_per_labelled_student_token(tokenizers):
    student_tok, teacher_tok = tokenizers
    student, teacher = tiny_llama(seed=0).double(), piece_llama(seed=1).double()
    recipe = build_recipe("span_kd", student_tokenizer=student_tok,
                          teacher_tokenizer=teacher_tok, kd_weight=0.6, ce_weight=0.3)
    source = recipe.teacher_source(student, teacher)
    source.bind(["logits"], torch.device("cpu"))
    batch = recipe.prepare(rows().rows([0, 1]), None, TrainState())
    assert batch["teacher_input_ids"][0].tolist() == [TID[p] for p in [
        "the", "c", "##at", "s", "##at", "on", "the", "m", "##at"]]
    assert int(batch[TOKEN_MASK].sum()) == 8
    with torch.no_grad():
        z_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        z_t = teacher(input_ids=batch["teacher_input_ids"],
                      attention_mask=batch["teacher_attention_mask"]).logits
    terms = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), batch, TrainState())
    assert set(terms) == {"span", "ce"}
    assert (terms["span"].weight, terms["span"].unit) == (0.6, "tokens")
    expected = hand_span_kd(student, teacher)
    assert float(terms["span"].value) == pytest.approx(expected, rel=1e-9)
    # The teacher source runs the teacher on its own tokens (its taps come back in float32).
    served = recipe.terms(Taps({"logits": z_s}), source(batch), batch, TrainState())
    assert float(served["span"].value) == pytest.approx(expected, rel=1e-5)
    assert source.evaluation_source() is None  # another vocabulary: no agreement


def test_a_student_trained_by_span_kd_leaves_the_teacher_unchanged(tokenizers):
    student_tok, teacher_tok = tokenizers
    student, teacher = tiny_llama(seed=0), piece_llama(seed=1)
    before, start = copy.deepcopy(teacher.state_dict()), copy.deepcopy(student.state_dict())
    recipe = build_recipe("span_kd", student_tokenizer=student_tok, teacher_tokenizer=teacher_tok)
    Distiller(student, teacher, recipe, epochs=2, batch_size=2, progress=False,
              optimizer={"name": "sgd", "lr": 0.5}).fit(rows())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(student.state_dict()["lm_head.weight"], start["lm_head.weight"])


def test_a_config_run_and_the_refusals_name_the_field(tmp_path, tokenizers):
    student_tok, teacher_tok = tokenizers
    piece_llama(seed=1).save_pretrained(teacher_tok)
    save_llama(tmp_path / "student_model")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\na dog ran to it\nthe dog sat on a mat\n")
    raw = {"name": "span", "output_dir": str(tmp_path / "runs"),
           "data": {"name": "lm_text", "path": str(text),
                    "options": {"tokenizer": student_tok, "test_path": str(text)}},
           "student": {"name": "hf_lm", "options": {"path": str(tmp_path / "student_model")}},
           "teacher": {"model": {"name": "hf_lm", "options": {"path": teacher_tok}}},
           "recipe": {"name": "span_kd", "student_tokenizer": student_tok,
                      "teacher_tokenizer": teacher_tok},
           "trainer": {"epochs": 1, "batch_size": 2, "progress": False}}
    config = parse_config(raw)
    preflight(config)
    teacher, fit = train_run(config, build_data(config.data))
    assert teacher is None  # it reads other tokens: not scored on the student's test rows
    assert "span" in set().union(*(set(r) for r in fit.history))
    with pytest.raises(ConfigError, match=r"recipe: teacher_tokenizer: tokenizer: no "
                                          r"tokenizer.json in .*nowhere"):
        parse_config({**raw, "recipe": {**raw["recipe"],
                                        "teacher_tokenizer": str(tmp_path / "nowhere")}})
    with pytest.raises(ConfigError, match="teacher.cache: recipe 'span_kd' cannot read a "
                                          "teacher cache: its teacher reads its own "
                                          "tokenization"):
        preflight(parse_config({**raw, "teacher": {**raw["teacher"],
                                                   "cache": str(tmp_path / "c")}}))


def test_token_kd_across_vocabularies_is_refused_naming_the_alternatives():
    batch = rows().rows([0])
    z_s = torch.randn(1, batch["input_ids"].shape[1], 100)
    z_t = torch.randn(1, batch["input_ids"].shape[1], len(PIECES))
    with pytest.raises(ValueError, match="token_kd: the student predicts 100 tokens and the "
                                         "teacher 40; .* to distil across tokenizers use "
                                         r"span_kd \(likelihoods of word-aligned text spans\) "
                                         r"or seqkd \(sequence-level KD on the teacher's "
                                         r"generated text\)$"):
        build_recipe("token_kd").terms(Taps({"logits": z_s}), Taps({"logits": z_t}), batch,
                                       TrainState())


def test_the_span_kd_example_is_valid_but_for_the_student_it_asks_for():
    """examples/lm/span_kd.yaml names a student folder the user provides (models/my-student):
    its only problems are that folder, SmolLM2's install and the fortunes."""
    from kdistill.config import load_config
    from kdistill.models.hf import INSTALLED_MODELS

    path = Path(__file__).resolve().parents[1] / "examples" / "lm" / "span_kd.yaml"
    install = INSTALLED_MODELS["SmolLM2-135M-Instruct"].install
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = str(caught.value).splitlines()[1:]
    assert problems and all("models/my-student" in line or install in line
                            or "file not found: /usr/share/games/fortunes" in line
                            for line in problems), problems


def test_a_batch_that_is_not_language_modelling_is_refused(tokenizers):
    student_tok, teacher_tok = tokenizers
    recipe = build_recipe("span_kd", student_tokenizer=student_tok,
                          teacher_tokenizer=teacher_tok)
    batch = {k: v for k, v in rows().rows([0]).items() if k != TOKEN_MASK}
    with pytest.raises(ValueError, match=r"^span_kd: the batch has no 'token_mask'; it distils "
                                         r"language models on language-modelling data "
                                         r"\(lm_text, lm_hf_dataset\)$"):
        recipe.prepare(batch, None, TrainState())


def test_the_batchs_spans_are_numbered_from_0_without_gaps(tokenizers):
    student_tok, teacher_tok = tokenizers
    recipe = build_recipe("span_kd", student_tokenizer=student_tok,
                          teacher_tokenizer=teacher_tok)
    batch = recipe.prepare(rows().rows([0, 1]), None, TrainState())
    used = {int(s) for s in batch["student_span"].flatten() if int(s) != NO_SPAN}
    assert used == set(range(batch["span_count"])) and batch["span_count"] > 2
    assert {int(s) for s in batch["teacher_span"].flatten() if int(s) != NO_SPAN} == used
