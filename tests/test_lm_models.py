"""Language models: hf_lm from a folder, a GGUF file converted once into kdistill's cache and
reused, lm_student (teacher layers kept, or a smaller configuration), and their errors. Tiny
Llamas saved to tmp_path; no real model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from lm_models import VOCAB, save_llama, save_tokenizer, tiny_llama

import kdistill.models.lm as lm
from kdistill.checkpoint import file_sha256
from kdistill.errors import KdistillError
from kdistill.models import build_model
from kdistill.models.lm import lm_folder
from kdistill.settings import cache_dir

BATCH = {"input_ids": torch.tensor([[4, 5, 6, 7, 8], [9, 10, 11, 3, 0]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**BATCH).logits


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("lm") / "teacher", layers=3, seed=1)


def reference(folder: Path) -> torch.nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(folder)


def test_hf_lm_loads_the_folder_as_transformers_does(teacher_folder: Path):
    model = build_model("hf_lm", (), len(VOCAB), path=str(teacher_folder), task="lm")
    assert torch.equal(logits(model), logits(reference(teacher_folder)))
    assert model.config.use_cache is False


def test_lm_student_keeps_the_teacher_layers_it_names(teacher_folder: Path):
    student = build_model("lm_student", (), len(VOCAB), teacher=str(teacher_folder),
                          layers=[0, 2], task="lm")
    teacher = reference(teacher_folder).state_dict()
    state = student.state_dict()
    assert student.config.num_hidden_layers == 2
    for key, value in state.items():
        source = key.replace("layers.1.", "layers.2.")
        assert torch.equal(value, teacher[source]), key


def test_lm_student_from_a_smaller_configuration_shares_the_vocabulary(teacher_folder: Path):
    student = build_model("lm_student", (), len(VOCAB), teacher=str(teacher_folder),
                          num_hidden_layers=1, num_attention_heads=2, task="lm")
    teacher = reference(teacher_folder)
    config = student.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.hidden_size) == (1, 2, 2, 16, 32)
    # Same hidden size: the embeddings and the output head start as the teacher's.
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert logits(student).shape == (2, 5, len(VOCAB))

    narrow = build_model("lm_student", (), len(VOCAB), teacher=str(teacher_folder),
                         hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=24, task="lm")
    assert (narrow.config.head_dim, narrow.config.num_key_value_heads) == (8, 1)
    assert narrow.model.embed_tokens.weight.shape == (len(VOCAB), 16)
    assert logits(narrow).shape == (2, 5, len(VOCAB))


@pytest.mark.parametrize(("options", "message"), [
    ({"hidden_size": 30}, "lm_student: hidden_size 30 is not a multiple of num_attention_heads 4"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3},
     "lm_student: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"layers": [3]}, r"lm_student: layers \[3\] out of range: the teacher has 3 layers"),
    ({}, "lm_student: give either layers .* not neither"),
])
def test_lm_student_refuses_options_that_make_no_student(teacher_folder, options, message):
    with pytest.raises(KdistillError, match=message):
        build_model("lm_student", (), len(VOCAB), teacher=str(teacher_folder), task="lm",
                    **options)


def test_a_model_whose_vocabulary_misses_tokens_of_the_data_is_refused(teacher_folder: Path):
    with pytest.raises(KdistillError, match="hf_lm: the data's tokenizer has 120 tokens but the "
                                            "model predicts 100"):
        build_model("hf_lm", (), 120, path=str(teacher_folder), task="lm")


def test_a_language_model_needs_language_modelling_data(teacher_folder: Path):
    with pytest.raises(KdistillError, match="hf_lm: a language model learns language-modelling "
                                            "data .* not classification data"):
        build_model("hf_lm", (), 2, path=str(teacher_folder), task="classification")


def test_a_gguf_file_is_converted_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    original = tiny_llama(seed=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(save_tokenizer(tmp_path / "tok"))
    reads: list[Path] = []

    def read_gguf(file: Path) -> tuple[torch.nn.Module, object]:
        reads.append(file)
        return original, tokenizer

    monkeypatch.setattr(lm, "read_gguf", read_gguf)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in, version 1")
    folder = lm_folder(gguf)
    assert folder == cache_dir() / "gguf" / file_sha256(gguf)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    model = build_model("hf_lm", (), len(VOCAB), path=str(gguf), task="lm")
    assert torch.equal(logits(model), logits(original))
    assert lm_folder(gguf) == folder and reads == [gguf]  # reused, not converted again
    gguf.write_bytes(b"GGUF stand-in, version 2")  # another file: converted again
    assert lm_folder(gguf) != folder and len(reads) == 2
    assert not list((cache_dir() / "gguf").glob("*.partial-*"))


def test_reading_a_gguf_file_without_the_gguf_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(lm.importlib.util, "find_spec", lambda name: None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    with pytest.raises(KdistillError, match=r"m.gguf: reading a GGUF file needs the gguf package; "
                                            r"install it with: pip install gguf"):
        lm_folder(gguf)


def test_the_lm_example_is_valid_where_its_model_and_data_are_installed():
    """examples/lm/token_kd.yaml names the installed SmolLM2 and the fortunes; without them
    the only problems are how to install them, never another field."""
    from kdistill.config import ConfigError, load_config
    from kdistill.models.hf import INSTALLED_MODELS

    path = Path(__file__).resolve().parents[1] / "examples" / "lm" / "token_kd.yaml"
    install = INSTALLED_MODELS["SmolLM2-135M-Instruct"].install
    try:
        config = load_config(path)
    except ConfigError as error:
        lines = str(error).splitlines()
        problems = lines[1:] if len(lines) > 1 else [lines[0]]
        assert problems and all(install in line or "file not found: /usr/share/games/fortunes"
                                in line for line in problems), problems
        return
    assert (config.recipe["name"], config.data.name) == ("token_kd", "lm_text")
