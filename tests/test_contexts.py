"""eval_mode and num_threads set torch state for a block and put back exactly what was there."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.contexts import eval_mode, num_threads


class CountsTrainCalls(nn.Sequential):
    """A model that overrides ``train``: eval_mode must still call it when restoring."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
        self.calls: list[bool] = []

    def train(self, mode: bool = True) -> CountsTrainCalls:
        self.calls.append(mode)
        return super().train(mode)


def test_eval_mode_sets_every_model_to_eval_and_restores_mixed_modes() -> None:
    first, second = CountsTrainCalls().train(), nn.Sequential(nn.Dropout(0.1), nn.Linear(2, 2))
    first[2].eval()  # a frozen norm layer inside a training model
    second.eval()
    second[0].train()
    before = [m.training for m in (*first.modules(), *second.modules())]
    first.calls.clear()
    with eval_mode(first, second):
        assert not any(m.training for m in (*first.modules(), *second.modules()))
    assert [m.training for m in (*first.modules(), *second.modules())] == before
    assert first.calls == [False, True]  # eval() then the root's own train(True)


def test_eval_mode_restores_modes_after_an_error() -> None:
    model = nn.Sequential(nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        raise RuntimeError("inside")
    assert model.training and model[0].training


def test_num_threads_sets_and_restores_the_count() -> None:
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with num_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with num_threads(None):
        assert torch.get_num_threads() == before


def test_num_threads_refuses_a_count_below_one() -> None:
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"), num_threads(0):
        pass
