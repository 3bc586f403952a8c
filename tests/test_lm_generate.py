"""kdistill generate: a finished run of task lm exports its student as a transformers folder
with its tokenizer, and ``generate`` continues a prompt with it: greedy output equal to a
hand-written argmax loop over the exported folder, seeded sampling repeatable, clear errors for
folders that are not language-model runs. Tiny Llama built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from lm_models import save_llama

from kdistill.cli import main
from kdistill.config import parse_config
from kdistill.run import run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("lm-run")
    folder = save_llama(tmp / "teacher")
    text = tmp / "t.txt"
    text.write_text("the cat sat on a mat\na dog ran to it\nthe bird sang a song\n")
    raw = {"name": "lm", "output_dir": str(tmp / "runs"),
           "data": {"name": "lm_text", "path": str(text),
                    "options": {"tokenizer": str(folder), "test_path": str(text),
                                "block_size": 8}},
           "student": {"name": "lm_student", "options": {"teacher": str(folder), "layers": [0]}},
           "teacher": {"model": {"name": "hf_lm", "options": {"path": str(folder)}}},
           "recipe": {"name": "token_kd"},
           "trainer": {"epochs": 1, "batch_size": 2, "progress": False},
           "evaluation": {"batch_size": 2, "repeats": 1}}
    outcome = run(parse_config(raw))
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp / "runs" / "lm" / "student")
    trained = outcome.fit.student.state_dict()
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in trained.items())
    return tmp / "runs" / "lm"


def greedy(folder: Path, prompt: str, new: int) -> str:
    """Greedy decoding written out: append the most likely token until </s> or ``new``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt)["input_ids"]
    start = len(ids)
    with torch.no_grad():
        for _ in range(new):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[start:], skip_special_tokens=True)


def test_generate_prints_the_greedy_continuation_of_the_exported_student(run_dir, capsys):
    assert main(["generate", str(run_dir), "the cat", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    expected = greedy(run_dir / "student", "the cat", 6)
    assert expected.strip()
    assert printed == expected + "\n"


def test_sampling_is_seeded(run_dir, capsys):
    outputs = []
    for seed in (3, 3):
        assert main(["generate", str(run_dir), "a dog", "--temperature", "1.5",
                     "--max-new-tokens", "8", "--seed", str(seed)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_generate_refuses_a_folder_that_is_not_a_language_model_run(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "the cat"]) == 2
    assert capsys.readouterr().err == (
        f"kdistill: error: {tmp_path}: not a finished run (expected student/ and labels.json, "
        "written when a run of task lm ends)\n")
    (tmp_path / "student").mkdir()
    (tmp_path / "labels.json").write_text(json.dumps({"task": "classification"}))
    assert main(["generate", str(tmp_path), "the cat"]) == 2
    assert capsys.readouterr().err == (
        f"kdistill: error: {tmp_path}: a run of task classification, not a language model; "
        "generate continues texts with the student of a run of task lm (kdistill predict "
        "labels texts with the others)\n")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(tmp_path), "x", "--temperature", "-1"])
    assert exit_.value.code == 2
    assert "argument --temperature: must be a finite number >= 0, got -1" in \
        capsys.readouterr().err


def test_predict_sends_a_language_model_run_to_generate(run_dir, capsys):
    assert main(["predict", str(run_dir), "the cat"]) == 2
    assert capsys.readouterr().err == (f"kdistill: error: {run_dir}: a language-model run; "
                                       "continue texts with its student with kdistill generate\n")
