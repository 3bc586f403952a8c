"""L2KD (kdistill.lifelong): each stage's loss against a hand computation with a non-default
temperature and weights, one SGD step per stage checked against the hand gradient from that
task's teacher, each teacher trained on its task alone, the forgetting matrix against direct
evaluations of the saved per-stage students, a YAML config run, and the errors (each naming
its field). Tiny Llamas (never a real model)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lm_models import EOS, PAD, save_llama, tiny_llama
from pydantic import ValidationError
from torch import nn

from kdistill import Distiller, cli
from kdistill.batch import TOKEN_MASK
from kdistill.config import ConfigError
from kdistill.data.lm import TokenBlocks, pad_rows
from kdistill.errors import KdistillError
from kdistill.evaluate import eval_batches, evaluate_model
from kdistill.lifelong import (
    L2KDSettings,
    LifelongTask,
    describe,
    forgetting,
    l2kd,
)
from kdistill.lifelong_run import load_l2kd_config, parse_l2kd_config, run_l2kd_config
from kdistill.schedules import TrainState
from kdistill.settings import TrainerSettings
from kdistill.taps import Taps

SGD = {"epochs": 1, "batch_size": 4, "progress": False,
       "optimizer": {"name": "sgd", "lr": 1.0, "momentum": 0.0}}


def rows(words: range, seed: int, count: int) -> TokenBlocks:
    """``count`` prompt/completion rows over ``words``: a prompt of 2 tokens, 3 to 5 more."""
    rng = np.random.default_rng(seed)
    sequences = [[int(w) for w in rng.choice(words, int(rng.integers(5, 8)))] + [EOS]
                 for _ in range(count)]
    return pad_rows(sequences, [2] * count, block_size=16, pad_id=PAD)


def two_tasks() -> list[LifelongTask]:
    """Task 'animals' over words 4-15, task 'colours' over words 16-33 (disjoint)."""
    return [LifelongTask("animals", rows(range(4, 16), 0, 4), rows(range(4, 16), 1, 3)),
            LifelongTask("colours", rows(range(16, 34), 2, 4), rows(range(16, 34), 3, 3))]


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def hand_loss(z_s: torch.Tensor, z_t: torch.Tensor, batch: dict, temperature: float,
              kd_weight: float, ce_weight: float) -> torch.Tensor:
    """kd_weight * mean KL(p_t || p_s) at the temperature + ce_weight * mean CE, over the
    labelled positions, written out position by position."""
    mask = batch[TOKEN_MASK].bool()
    kls, ces = [], []
    for b, t in mask.nonzero().tolist():
        log_ps = torch.log_softmax(z_s[b, t] / temperature, -1)
        p_t = torch.softmax(z_t[b, t] / temperature, -1)
        kls.append((p_t * (p_t.log() - log_ps)).sum())
        ces.append(-torch.log_softmax(z_s[b, t], -1)[batch["labels"][b, t]])
    return kd_weight * torch.stack(kls).mean() + ce_weight * torch.stack(ces).mean()


def test_the_stage_loss_is_the_weighted_word_level_kd_plus_ce_at_the_temperature():
    batch = two_tasks()[0].train.rows([0, 1, 2, 3])
    student, teacher = tiny_llama(seed=0).double(), tiny_llama(seed=1).double()
    with torch.no_grad():
        z_s, z_t = logits_of(student, batch), logits_of(teacher, batch)
    settings = L2KDSettings(temperature=3.0, kd_weight=0.4, ce_weight=0.6)
    terms = settings.stage_recipe().terms(Taps({"logits": z_s}), Taps({"logits": z_t}), batch,
                                          TrainState())
    assert (terms["kd"].weight, terms["ce"].weight) == (0.4, 0.6)
    total = sum(term.weight * term.value for term in terms.values())
    expected = hand_loss(z_s, z_t, batch, 3.0, 0.4, 0.6)
    assert float(total) == pytest.approx(float(expected), rel=1e-9)
    # At T = 1 the value differs: the temperature reaches the KD term.
    assert float(total) != pytest.approx(float(hand_loss(z_s, z_t, batch, 1.0, 0.4, 0.6)))


class Recorder:
    """An ``on_stage`` hook keeping a copy of each stage's teacher and student."""

    def __init__(self) -> None:
        self.teachers: list[nn.Module] = []
        self.students: list[nn.Module] = []

    def __call__(self, stage: int, task: LifelongTask, teacher: nn.Module,
                 student: nn.Module) -> None:
        assert task.name == ["animals", "colours"][stage]
        self.teachers.append(copy.deepcopy(teacher))
        self.students.append(copy.deepcopy(student))


def run_two_stages(initial: nn.Module, teacher_init: nn.Module | None = None,
                   ) -> tuple[Recorder, object, list[LifelongTask]]:
    tasks, recorder = two_tasks(), Recorder()
    settings = L2KDSettings(temperature=2.5, kd_weight=0.7, ce_weight=0.3,
                            trainer=TrainerSettings(**SGD), eval_batch_size=2,
                            teacher_trainer=TrainerSettings(**{**SGD, "epochs": 2}))
    result = l2kd(copy.deepcopy(initial), tasks, settings, teacher_init=teacher_init,
                  on_stage=recorder)
    return recorder, result, tasks


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_each_stage_is_one_kd_step_from_that_tasks_teacher():
    initial = tiny_llama(seed=0)
    recorder, result, tasks = run_two_stages(initial)
    before = copy.deepcopy(initial)
    for stage, task in enumerate(tasks):
        # One SGD step (lr 1, the four rows in one batch) on the hand loss from the teacher.
        batch = task.train.rows([0, 1, 2, 3])
        with torch.no_grad():
            z_t = logits_of(recorder.teachers[stage], batch)
        hand_loss(logits_of(before, batch), z_t, batch, 2.5, 0.7, 0.3).backward()
        with torch.no_grad():
            for p in before.parameters():
                p -= p.grad
                p.grad = None
        after = recorder.students[stage].state_dict()
        for name, value in before.state_dict().items():
            assert torch.allclose(after[name], value, atol=1e-6), (stage, name)
    assert same(result.student, recorder.students[-1])


def test_each_teacher_starts_from_the_initial_model_and_learns_its_task_alone():
    initial = tiny_llama(seed=0)
    recorder, _, tasks = run_two_stages(initial)
    for task, teacher, student in zip(tasks, recorder.teachers, recorder.students, strict=True):
        alone = copy.deepcopy(initial)  # the same two epochs of CE on this task only
        Distiller(alone, None, "ce", trainer=TrainerSettings(**{**SGD, "epochs": 2})
                  ).fit(task.train)
        assert same(teacher, alone), task.name
        assert not same(teacher, initial) and not same(teacher, student)
    # Task 2's teacher never saw task 1: it is not the first teacher trained further.
    assert not same(recorder.teachers[0], recorder.teachers[1])

    # A given starting model replaces the student's initial weights.
    other = tiny_llama(seed=5)
    recorder, _, tasks = run_two_stages(initial, teacher_init=other)
    alone = copy.deepcopy(other)
    Distiller(alone, None, "ce", trainer=TrainerSettings(**{**SGD, "epochs": 2})
              ).fit(tasks[1].train)
    assert same(recorder.teachers[1], alone)


def test_the_forgetting_matrix_is_the_evaluation_of_each_saved_stage_student():
    recorder, result, tasks = run_two_stages(tiny_llama(seed=0))
    assert result.tasks == ["animals", "colours"]
    for metric in ("perplexity", "accuracy"):
        matrix = result.scores[metric]
        for i, student in enumerate(recorder.students):
            for j, task in enumerate(tasks):
                if j > i:
                    assert math.isnan(matrix[i][j])
                    continue
                direct = evaluate_model(student, eval_batches(task.test, 3), "cpu")[metric]
                assert matrix[i][j] == pytest.approx(direct, rel=1e-6), (metric, i, j)
    ppl, acc = result.scores["perplexity"], result.scores["accuracy"]
    assert result.forgetting == {"perplexity": [ppl[1][0] - ppl[0][0]],
                                 "accuracy": [acc[0][0] - acc[1][0]]}
    assert result.mean_forgetting == {"perplexity": ppl[1][0] - ppl[0][0],
                                      "accuracy": acc[0][0] - acc[1][0]}
    text = describe(result)
    assert f"{ppl[1][0]:.4f}" in text and "mean forgetting" in text


def test_forgetting_is_the_drop_from_the_best_earlier_score():
    accuracy = [[0.5, 0.1, 0.0],
                [0.7, 0.6, 0.2],
                [0.4, 0.65, 0.9]]
    # task 0: best 0.7 (stage 1), now 0.4; task 1: best 0.6 (stage 1), now 0.65.
    assert forgetting(accuracy, higher_is_better=True) == pytest.approx([0.3, -0.05])
    perplexity = [[3.0, 9.0, 9.0],
                  [2.0, 4.0, 9.0],
                  [5.0, 3.5, 1.5]]
    assert forgetting(perplexity, higher_is_better=False) == pytest.approx([3.0, -0.5])
    assert forgetting([[2.0]], higher_is_better=False) == []


def test_bad_settings_and_tasks_name_the_field():
    with pytest.raises(ValidationError, match="temperature"):
        L2KDSettings(temperature=0.0)
    with pytest.raises(ValidationError, match="ce_weight"):
        L2KDSettings(ce_weight=-1.0)
    with pytest.raises(ValidationError, match="kd_weight and ce_weight are both 0"):
        L2KDSettings(kd_weight=0.0, ce_weight=0.0)
    with pytest.raises(ValidationError, match="tempreature"):
        L2KDSettings(tempreature=2.0)
    student, tasks = tiny_llama(seed=0), two_tasks()
    with pytest.raises(KdistillError, match=r"^tasks: give at least one task$"):
        l2kd(student, [])
    renamed = [tasks[0], LifelongTask("animals", tasks[1].train, tasks[1].test)]
    with pytest.raises(KdistillError, match=r"^tasks\.1\.name: task 'animals' is already the "
                                            "name of an earlier task"):
        l2kd(student, renamed)
    empty = [tasks[0], LifelongTask("colours", tasks[1].train, tasks[1].test.select([]))]
    with pytest.raises(KdistillError, match=r"^tasks\.1\.test: task 'colours' has no test rows$"):
        l2kd(student, empty)


def jsonl(path, pairs: list[tuple[str, str]]) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    return str(path)


def test_a_config_runs_l2kd_over_its_tasks(tmp_path, capsys):
    model = save_llama(tmp_path / "llama", seed=0)
    qa = jsonl(tmp_path / "qa.jsonl", [("Q: what is the sky A:", " blue"),
                                       ("Q: what is grass A:", " green"),
                                       ("Q: what is the cat A:", " big"),
                                       ("Q: what is the dog A:", " red")] * 2)
    story = jsonl(tmp_path / "story.jsonl", [("the cat", " sat on a mat"),
                                             ("the dog", " ran to the tree"),
                                             ("a bird", " sang a song"),
                                             ("the cat", " slept under the tree")] * 2)
    data = {"name": "lm_text", "test_fraction": 0.25,
            "options": {"tokenizer": str(model), "prompt_column": "prompt",
                        "completion_column": "completion", "block_size": 16}}
    raw = {"student": {"name": "hf_lm", "options": {"path": str(model)}},
           "tasks": [{"name": "qa", "data": {**data, "path": qa}},
                     {"name": "story", "data": {**data, "path": story}}],
           "l2kd": {"temperature": 2.0, "trainer": SGD | {"batch_size": 2}}}
    result = run_l2kd_config(parse_l2kd_config(raw))
    assert result.tasks == ["qa", "story"]
    assert math.isnan(result.scores["perplexity"][0][1])
    assert all(math.isfinite(v) for v in [*result.scores["accuracy"][1],
                                          *result.mean_forgetting.values()])
    config = tmp_path / "l2kd.yaml"  # the same through the command line: the same matrices
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert cli.main(["lifelong", str(config)]) == 0
    assert capsys.readouterr().out == describe(result) + "\n"


def test_bad_configs_name_the_field():
    good = {"student": {"name": "hf_lm"},
            "tasks": [{"name": "a", "data": {"name": "lm_text", "path": "a.jsonl"}}]}

    def problems(**changes) -> str:
        with pytest.raises(ConfigError) as error:
            parse_l2kd_config({**good, **changes}, "l2kd.yaml")
        return str(error.value)

    assert problems(tasks=[]) == ("l2kd.yaml: tasks: List should have at least 1 item after "
                                  "validation, not 0")
    assert problems(l2kd={"temperature": -1.0}) == (
        "l2kd.yaml: l2kd.temperature: Input should be greater than 0 (got -1.0)")
    assert problems(l2kd={"kd_weight": 0.0, "ce_weight": 0.0}).startswith(
        "l2kd.yaml: l2kd: kd_weight and ce_weight are both 0")
    assert problems(tasks=[{"name": "a", "data": {"name": "digits"}}]).startswith(
        "l2kd.yaml: tasks.0.data.name: unknown language-modelling data set 'digits'")
    assert problems(tasks=[good["tasks"][0]] * 2) == (
        "l2kd.yaml: tasks.1.name: task 'a' is already the name of an earlier task; give each "
        "task its own name")
    assert "tasks.0.dat" in problems(tasks=[{"name": "a", "dat": {}}])


def test_the_l2kd_example_is_a_valid_config():
    path = Path(__file__).resolve().parents[1] / "examples" / "lm" / "l2kd.yaml"
    config = load_l2kd_config(path)
    assert [task.name for task in config.tasks] == ["qa", "fortunes"]
    assert (config.l2kd.temperature, config.l2kd.kd_weight, config.l2kd.ce_weight) == (2, 1, 1)
