"""``kdistill.run.train_run``: a config's training on data and evaluation splits of the
caller's choosing (the leaderboard's validation split), without a report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kdistill.config import DataConfig, ModelConfig, RunConfig, TeacherConfig
from kdistill.data import holdout_split
from kdistill.evaluate import classification_metrics, eval_batches, predict
from kdistill.models import deployable
from kdistill.run import build_data, train_run
from kdistill.settings import TrainerSettings


def test_train_run_evaluates_on_the_given_split_and_writes_nothing_without_run_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = RunConfig(
        data=DataConfig(name="digits"), student=ModelConfig(name="mlp", size="tiny"),
        teacher=TeacherConfig(model=ModelConfig(name="cnn", size="tiny"),
                              train=TrainerSettings(epochs=1, progress=False)),
        recipe={"name": "hinton"}, trainer=TrainerSettings(epochs=2, progress=False))
    data = build_data(config.data)
    train, validation = holdout_split(data.train, 200, seed=0)
    teacher, fit = train_run(config, dataclasses.replace(data, train=train), validation)

    def accuracy(split: object) -> float:
        logits = predict(deployable(fit.student), eval_batches(split, 64)).logits
        return classification_metrics(logits, split.labels)["accuracy"]  # type: ignore[attr-defined]

    assert teacher is not None and fit.run_dir is None
    recorded = fit.evaluations()[-1]["eval_accuracy"]
    assert accuracy(validation) != pytest.approx(accuracy(data.test))  # the check has power
    assert recorded == pytest.approx(accuracy(validation))
    assert list(tmp_path.iterdir()) == []  # no run directory, no config.json
