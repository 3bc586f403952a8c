"""seqkd: the student trains on the teacher's beam-search completions, generated once and
stored (a second fit calls no generate and trains identically), generated again for another
teacher or other settings, a foreign store refused; the completions re-tokenised for a
student with another vocabulary; the CE over the completion tokens. Tiny Llamas built here."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lm_models import EOS, ID, PAD, VOCAB, WORDS, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from kdistill import Distiller
from kdistill.batch import TOKEN_MASK, UNLABELED
from kdistill.data.lm import TokenBlocks, pad_rows
from kdistill.errors import KdistillError
from kdistill.recipes import build_recipe, cache_refusal
from kdistill.recipes.completion_store import MANIFEST
from kdistill.recipes.seqkd import SeqKD
from kdistill.schedules import TrainState
from kdistill.taps import TapReader, Taps
from kdistill.teachers import FrozenTeacher

PROMPTS = [[4, 5, 6], [9], [12, 13, 14, 15, 16], [19, 20]]


def pairs_data() -> TokenBlocks:
    sequences = [[4, 5, 6, 7, 8, EOS], [9, 10, 11, EOS], [12, 13, 14, 15, 16, 17, 18, EOS],
                 [19, 20, EOS]]
    return pad_rows(sequences, [len(p) for p in PROMPTS], block_size=16, pad_id=PAD)


def counted(model: nn.Module) -> list[int]:
    """Count the ``generate`` calls of ``model`` (the number of prompts of each)."""
    calls: list[int] = []
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(len(kwargs["input_ids"]))
        return original(*args, **kwargs)

    model.generate = generate
    return calls


def beam(model: nn.Module, prompt: list[int], beams: int, new: int = 4) -> list[int]:
    """transformers' own beam search of one prompt, cut after the first </s>."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         num_beams=beams, max_new_tokens=new, pad_token_id=PAD,
                         eos_token_id=EOS)[0, len(prompt):].tolist()
    return out[:out.index(EOS) + 1] if EOS in out else out


class Recording(SeqKD):
    def __init__(self, **params: Any):
        super().__init__(**params)
        self.rows: list[dict] = []

    def prepare(self, batch, student, state):
        rows = super().prepare(batch, student, state)
        self.rows.append(rows)
        return rows


def fit(teacher: nn.Module, store: Path, **params: Any) -> tuple[nn.Module, Recording]:
    recipe = Recording(store=str(store), max_new_tokens=4, **params)
    student = tiny_llama(seed=0)
    Distiller(student, teacher, recipe, epochs=2, batch_size=2, progress=False,
              optimizer={"name": "adamw", "lr": 1e-2}).fit(pairs_data())
    return student, recipe


def test_the_teacher_completes_each_prompt_once_and_a_rerun_reuses_the_store(tmp_path):
    teacher = tiny_llama(seed=1)
    expected = {tuple(p): beam(copy.deepcopy(teacher), p, 3) for p in PROMPTS}
    calls = counted(teacher)
    first, recipe = fit(teacher, tmp_path, num_beams=3)
    assert sum(calls) == 4  # four prompts, generated in the first epoch only
    # Every row trained on is its prompt followed by the teacher's beam-search completion.
    for rows in recipe.rows:
        for r in range(len(rows["index"])):
            prompt = PROMPTS[int(rows["index"][r])]
            labels = rows["labels"][r][rows["labels"][r] != UNLABELED].tolist()
            assert labels == expected[tuple(prompt)]
            assert rows["input_ids"][r, :len(prompt)].tolist() == prompt
            assert int(rows[TOKEN_MASK][r].sum()) == len(labels)
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / MANIFEST).is_file()

    calls.clear()
    second, _ = fit(teacher, tmp_path, num_beams=3)
    assert calls == []
    for name, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], value), name


def test_another_teacher_or_other_settings_generate_again_and_a_foreign_store_is_refused(
        tmp_path):
    teacher = tiny_llama(seed=1)
    calls = counted(teacher)
    fit(teacher, tmp_path, num_beams=2)
    assert sum(calls) == 4
    calls.clear()
    fit(teacher, tmp_path, num_beams=1)  # greedy: other settings
    assert sum(calls) == 4
    other = tiny_llama(seed=2)
    other_calls = counted(other)
    fit(other, tmp_path, num_beams=2)
    assert sum(other_calls) == 4
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3
    calls.clear()
    fit(teacher, tmp_path, num_beams=2)
    assert calls == []
    # A store folder whose manifest names something else is refused, not read.
    for manifest in tmp_path.glob(f"*/{MANIFEST}"):
        found = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**found, "teacher": "0" * 64}))
    recipe = build_recipe("seqkd", store=str(tmp_path), num_beams=2, max_new_tokens=4)
    with pytest.raises(KdistillError, match=r"manifest.json: holds the completions of another "
                                            r"teacher or other settings \(\{'do_sample': False, "
                                            r"'num_beams': 2, 'max_new_tokens': 4\}\); delete"):
        recipe.attach_teacher(FrozenTeacher(teacher))


def save_word_tokenizer(folder: Path, vocab: list[str]) -> Path:
    """A whitespace word-level tokenizer of ``vocab`` with its </s> and <pad> named."""
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>"}))
    return folder


def test_completions_are_retokenised_for_a_student_with_another_vocabulary(tmp_path):
    # The teacher's vocabulary: the student's words in reverse order, then 20 extra words.
    teacher_vocab = ["<pad>", "<unk>", "<s>", "</s>", *reversed(WORDS),
                     *(f"t{i}" for i in range(20))]
    teacher_id = {t: i for i, t in enumerate(teacher_vocab)}
    student_tok = save_word_tokenizer(tmp_path / "student", VOCAB)
    teacher_tok = save_word_tokenizer(tmp_path / "teacher", teacher_vocab)
    torch.manual_seed(5)
    config = tiny_llama().config
    config.vocab_size = len(teacher_vocab)
    teacher = type(tiny_llama())(config)
    # Words only: a student prompt's words and the teacher's completion words exist in both.
    bias = torch.full((len(teacher_vocab),), -1e4)
    bias[[teacher_id[w] for w in WORDS[:10]] + [teacher_id["</s>"]]] = 0.0
    teacher.lm_head.bias = nn.Parameter(bias)
    recipe = build_recipe("seqkd", tokenizer=str(student_tok), teacher_tokenizer=str(teacher_tok),
                          num_beams=1, max_new_tokens=5, store=str(tmp_path / "store"))
    recipe.attach_teacher(FrozenTeacher(teacher))
    batch = pad_rows([[ID["the"], ID["cat"], ID["sat"], EOS], [ID["a"], ID["dog"], EOS]],
                     [2, 2], 16, PAD).rows([0, 1])
    with TapReader(tiny_llama(), ["logits"]) as reader:
        rows = recipe.prepare(dict(batch), reader, TrainState())
    for r, words in enumerate([["the", "cat"], ["a", "dog"]]):
        completion = beam(teacher, [teacher_id[w] for w in words], 1, new=5)
        text = [teacher_vocab[i] for i in completion if i != teacher_id["</s>"]]
        expected = [ID[w] for w in text] + ([EOS] if completion[-1] == teacher_id["</s>"] else [])
        assert rows["labels"][r][rows["labels"][r] != UNLABELED].tolist() == expected
        assert rows["input_ids"][r, :2].tolist() == [ID[w] for w in words]
    assert any(len(rows["labels"][r][rows["labels"][r] != UNLABELED]) > 1 for r in range(2))


def test_the_loss_is_the_cross_entropy_of_the_completion_tokens():
    rows = pairs_data().rows([0, 1, 2, 3])
    z_s = torch.randn(4, 7, len(VOCAB))
    terms = build_recipe("seqkd", ce_weight=0.4).terms(Taps({"logits": z_s}), None, rows,
                                                       TrainState())
    known = rows["labels"] != UNLABELED
    expected = -z_s.log_softmax(-1)[known].gather(1, rows["labels"][known][:, None]).mean()
    assert (terms["ce"].weight, terms["ce"].unit) == (0.4, "labeled")
    assert float(terms["ce"].value) == pytest.approx(float(expected), rel=1e-6)


def test_seqkd_refuses_a_cache_and_half_a_tokenizer_pair():
    assert cache_refusal([build_recipe("seqkd")]) == (
        "recipe 'seqkd' cannot read a teacher cache: it generates completions with the "
        "teacher's model, which a cache does not hold, so the teacher must run live")
    with pytest.raises(ValueError, match="tokenizer and teacher_tokenizer go together"):
        build_recipe("seqkd", teacher_tokenizer="somewhere")


def test_a_prompt_reaches_the_teacher_as_its_text_without_the_datas_special_tokens(tmp_path):
    from kdistill.data.lm import read_tokenizer
    from kdistill.recipes.seqkd import Retokeniser

    folders = []
    for name, vocab in (("data", VOCAB), ("teacher", ["<pad>", "<unk>", "<s>", "</s>",
                                                     *reversed(WORDS)])):
        folder = save_word_tokenizer(tmp_path / name, vocab)
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        backend.add_special_tokens(["<s>", "</s>", "<pad>"])
        backend.save(str(folder / "tokenizer.json"))
        folders.append(folder)
    data, teacher = (read_tokenizer(f) for f in folders)
    retokenise = Retokeniser(data, teacher)
    assert retokenise.prompt([ID["<s>"], ID["the"], ID["cat"]]) == teacher.encode(["the cat"])[0]
