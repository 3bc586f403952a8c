"""ka: each term against a float64 hand computation with two teacher models sharing the
student's tokenizer, the snapshot that stands for the student's previous version, a config run
with teacher.models (teachers unchanged), and the errors. Tiny Llamas built here."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_models import PAD, save_llama, tiny_llama
from torch import nn

from kdistill import Distiller
from kdistill.batch import TOKEN_MASK
from kdistill.config import ConfigError, parse_config
from kdistill.data.lm import pad_rows
from kdistill.recipes import build_recipe
from kdistill.run import build_data, preflight, train_run
from kdistill.schedules import TrainState
from kdistill.taps import Taps
from kdistill.teachers import SnapshotTeacher, SourceGroup


def rows():
    sequences = [[4, 5, 6, 7, 8, 3], [9, 10, 11, 3], [12, 13, 14, 15, 16, 17, 3]]
    return pad_rows(sequences, [2, 1, 3], block_size=16, pad_id=PAD)


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    e = np.exp(z / temperature - (z / temperature).max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q)))


def hand_terms(z_s, teachers, z_prev, labels, mask, temperature):
    """toward, away and previous written out per position in float64 numpy."""
    toward, away, previous = [], [], []
    for b, t in zip(*np.nonzero(mask.numpy()), strict=True):
        zs = z_s[b, t].double().numpy()
        ps, ps1 = softmax(zs, temperature), softmax(zs, 1.0)
        y = int(labels[b, t])
        pulls, pushes = 0.0, 0.0
        for z_k in teachers:
            zk = z_k[b, t].double().numpy()
            pk = softmax(zk, temperature)
            if softmax(zk, 1.0)[y] > ps1[y]:
                pulls += kl(pk, ps)
            else:
                m = (pk + ps) / 2
                pushes += math.log(2) - (kl(pk, m) + kl(ps, m)) / 2
        toward.append(pulls / len(teachers))
        away.append(pushes / len(teachers))
        previous.append(kl(softmax(z_prev[b, t].double().numpy(), temperature), ps))
    return np.mean(toward), np.mean(away), np.mean(previous)


def test_each_term_is_the_hand_computed_mean_over_the_labelled_tokens():
    batch = rows().rows([0, 1, 2])
    student, first, second, before = (tiny_llama(seed=s).double() for s in (0, 1, 2, 3))
    z_s, z_1, z_2, z_prev = (logits_of(m, batch) for m in (student, first, second, before))
    # Make the first teacher beneficial at some positions and harmful at others.
    labels, mask = batch["labels"], batch[TOKEN_MASK].bool()
    z_1 = z_1.clone()
    z_1[0, :3].scatter_(-1, labels[0, :3].clamp_min(0)[:, None], 8.0)
    recipe = build_recipe("ka", temperature=2.0, toward_weight=0.7, away_weight=0.3,
                          previous_weight=0.4, ce_weight=0.2)
    teacher = Taps({"logits": z_1}).with_members(
        [Taps({"logits": z}) for z in (z_1, z_2, z_prev)])
    terms = recipe.terms(Taps({"logits": z_s}), teacher, batch, TrainState())
    assert set(terms) == {"toward", "away", "previous", "ce"}
    assert [(terms[k].weight, terms[k].unit) for k in ("toward", "away", "previous", "ce")] == \
        [(0.7, "tokens"), (0.3, "tokens"), (0.4, "tokens"), (0.2, "labeled")]
    toward, away, previous = hand_terms(z_s, [z_1, z_2], z_prev, labels, mask, 2.0)
    both = toward > 0 and away > 0
    assert both  # the batch has beneficial and harmful positions
    assert float(terms["toward"].value) == pytest.approx(toward, rel=1e-9)
    assert float(terms["away"].value) == pytest.approx(away, rel=1e-9)
    assert float(terms["previous"].value) == pytest.approx(previous, rel=1e-9)
    nll = -z_s.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    assert float(terms["ce"].value) == pytest.approx(float(nll[mask].mean()), rel=1e-9)


def test_the_beneficial_split_follows_the_reference_token_probability():
    batch = rows().rows([0])
    mask = batch[TOKEN_MASK].bool()
    z_s = torch.zeros(1, batch["input_ids"].shape[1], 100, dtype=torch.float64)
    sure = z_s.clone().scatter_(-1, batch["labels"].clamp_min(0)[..., None], 5.0)
    unsure = z_s.clone().scatter_(-1, batch["labels"].clamp_min(0)[..., None], -5.0)
    recipe = build_recipe("ka")
    # The model that is surer of every reference token only pulls; the other only pushes.
    for z_k, pulls in ((sure, True), (unsure, False)):
        teacher = Taps({"logits": z_k}).with_members([Taps({"logits": z_k}),
                                                      Taps({"logits": z_s})])
        terms = recipe.terms(Taps({"logits": z_s}), teacher, batch, TrainState())
        assert (float(terms["toward"].value) > 0) == pulls
        assert (float(terms["away"].value) > 0) == (not pulls)
        assert float(terms["previous"].value) == pytest.approx(0.0, abs=1e-12)
    assert int(mask.sum()) == 4


def test_the_previous_version_is_the_student_as_the_last_epoch_left_it():
    data = rows()
    student, first, second = tiny_llama(seed=0), tiny_llama(seed=1), tiny_llama(seed=2)
    start = copy.deepcopy(student.state_dict())
    teachers_before = [copy.deepcopy(t.state_dict()) for t in (first, second)]
    recipe = build_recipe("ka")
    source = recipe.teacher_source(student, nn.ModuleList([first, second]))
    assert isinstance(source, SourceGroup)
    snapshot = source.sources[-1]
    assert isinstance(snapshot, SnapshotTeacher) and snapshot.every == "epoch"
    seen = []

    class Watch(type(recipe)):
        def terms(self, student, teacher, batch, state):
            seen.append((state.step, {k: v.clone() for k, v in snapshot.model.state_dict()
                                      .items()}))
            return super().terms(student, teacher, batch, state)

    watched = Watch(recipe.params)
    Distiller(student, source, watched, epochs=2, batch_size=2, progress=False,
              optimizer={"name": "sgd", "lr": 0.5}).fit(data)  # 2 steps per epoch
    assert [step for step, _ in seen] == [0, 1, 2, 3]
    for _, weights in seen[:2]:  # the first epoch reads the student it started as
        assert all(torch.equal(weights[k], start[k]) for k in start)
    assert all(torch.equal(seen[2][1][k], seen[3][1][k]) for k in start)
    assert not torch.equal(seen[2][1]["lm_head.weight"], start["lm_head.weight"])
    # After the last epoch the snapshot holds the trained student.
    assert all(torch.equal(snapshot.model.state_dict()[k], student.state_dict()[k])
               for k in start)
    for teacher, before in zip((first, second), teachers_before, strict=True):
        assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())


def test_a_snapshot_refreshed_every_n_steps():
    model = nn.Linear(2, 2)
    snapshot = SnapshotTeacher(model, every=3)
    snapshot.bind(["logits"], torch.device("cpu"))
    refreshed = []
    for step in range(7):
        with torch.no_grad():
            model.weight.add_(1.0)
        snapshot.after_step(model, TrainState(step=step, steps_per_epoch=5))
        refreshed.append(torch.equal(snapshot.model.weight, model.weight))
    assert refreshed == [False, False, True, False, False, True, False]
    saved = snapshot.state_dict()
    again = SnapshotTeacher(nn.Linear(2, 2), every=3)
    again.load_state_dict(saved)
    assert torch.equal(again.model.weight, snapshot.model.weight)
    with pytest.raises(ValueError, match="every must be a number of steps >= 1 or 'epoch'"):
        SnapshotTeacher(model, every=0)


def config_of(tmp_path, recipe: dict, teacher: dict) -> dict:
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on a mat\na dog ran to it\nthe bird sang a song\n"
                    "it is a big red tree\n")
    return {"name": "ka", "output_dir": str(tmp_path / "runs"),
            "data": {"name": "lm_text", "path": str(text),
                     "options": {"tokenizer": str(tmp_path / "a"), "test_path": str(text)}},
            "student": {"name": "lm_student", "options": {"teacher": str(tmp_path / "a"),
                                                          "layers": [0]}},
            "teacher": teacher, "recipe": recipe,
            "trainer": {"epochs": 2, "batch_size": 2, "progress": False,
                        "optimizer": {"name": "sgd", "lr": 0.1}}}


def test_a_config_run_learns_from_every_model_of_teacher_models(tmp_path):
    folders = [save_llama(tmp_path / name, seed=seed) for name, seed in (("a", 1), ("b", 2))]
    models = [{"name": "hf_lm", "options": {"path": str(f)}} for f in folders]
    config = parse_config(config_of(tmp_path, {"name": "ka", "refresh": 1}, {"models": models}))
    assert config.teacher.model == config.teacher.models[0]
    data = build_data(config.data)
    preflight(config)
    teacher, fit = train_run(config, data)
    first = tiny_llama(seed=1)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in first.state_dict().items())
    logged = set().union(*(set(record) for record in fit.history))
    assert {"toward", "away", "previous", "ce", "eval_agreement"} <= logged


def test_bad_teacher_configs_name_the_field(tmp_path):
    folder = save_llama(tmp_path / "a", seed=1)
    model = {"name": "hf_lm", "options": {"path": str(folder)}}
    with pytest.raises(ConfigError, match="teacher.models: recipe 'token_kd' distils one "
                                          r"teacher; give it as teacher.model \(recipes that "
                                          r"learn from several models: \['ka'\]\)"):
        parse_config(config_of(tmp_path, {"name": "token_kd"}, {"models": [model, model]}))
    with pytest.raises(ConfigError, match="teacher: both 'model' and 'models' are given"):
        parse_config(config_of(tmp_path, {"name": "ka"}, {"model": model, "models": [model]}))
    with pytest.raises(ConfigError, match="teacher: 'checkpoint' loads the weights of one "
                                          "teacher; with 'models'"):
        parse_config(config_of(tmp_path, {"name": "ka"}, {"models": [model],
                                                          "checkpoint": "x.safetensors"}))
    with pytest.raises(ConfigError, match="teacher.models.1.options.path: "):
        parse_config(config_of(tmp_path, {"name": "ka"},
                               {"models": [model, {"name": "hf_lm",
                                                   "options": {"path": str(tmp_path / "no")}}]}))
    with pytest.raises(ConfigError, match="teacher.precision: recipe 'ka' runs its teacher "
                                          "models itself, in fp32"):
        parse_config(config_of(tmp_path, {"name": "ka"}, {"models": [model],
                                                          "precision": "bf16"}))
    with pytest.raises(ConfigError, match="recipe.refresh"):
        parse_config(config_of(tmp_path, {"name": "ka", "refresh": 0}, {"models": [model]}))
    with pytest.raises(ConfigError, match="teacher.cache: recipe 'ka' cannot read a teacher "
                                          "cache: its previous-version teacher is a snapshot"):
        config = parse_config(config_of(tmp_path, {"name": "ka"},
                                        {"models": [model], "cache": str(tmp_path / "c")}))
        preflight(config)


def test_ka_needs_its_members_and_one_vocabulary():
    batch = rows().rows([0])
    z_s = torch.randn(1, batch["input_ids"].shape[1], 100)
    recipe = build_recipe("ka")
    with pytest.raises(ValueError, match="ka: the teacher source must give the models then "
                                         "the student's previous version as members"):
        recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_s}), batch, TrainState())
    other = Taps({"logits": torch.randn(1, z_s.shape[1], 90)})
    with pytest.raises(ValueError, match="ka: the student predicts 100 tokens and the models "
                                         "90; .* must share the student's tokenizer"):
        recipe.terms(Taps({"logits": z_s}), other.with_members([other, Taps({"logits": z_s})]),
                     batch, TrainState())


def test_the_ka_example_is_valid_where_its_models_and_data_are_installed():
    """examples/lm/ka.yaml: without SmolLM2 or the fortunes the only problems say how to
    install them, never another field."""
    from kdistill.config import load_config
    from kdistill.models.hf import INSTALLED_MODELS

    path = Path(__file__).resolve().parents[1] / "examples" / "lm" / "ka.yaml"
    install = INSTALLED_MODELS["SmolLM2-135M-Instruct"].install
    try:
        config = load_config(path)
    except ConfigError as error:
        lines = str(error).splitlines()
        problems = lines[1:] if len(lines) > 1 else [lines[0]]
        assert problems and all(install in line or "file not found: /usr/share/games/fortunes"
                                in line for line in problems), problems
        return
    assert (config.recipe["name"], len(config.teacher.models)) == ("ka", 2)
