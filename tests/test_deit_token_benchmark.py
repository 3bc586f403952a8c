"""``benchmarks/deit_token.py``'s run configs: what differs between the rows (and only that),
and the leaderboard's teacher reused. No training here; the benchmark runs on demand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kdistill.config import check_registered, load_config
from kdistill.models.heads import TwoHeadStudent
from kdistill.models.vit import ViT
from kdistill.run import build_data, build_phases, build_student

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import deit_token as bench  # noqa: E402
import leaderboard as lb  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def configs(data: str = "mnist5k") -> dict:
    args = bench.parse_args(["--data", data, "--epochs", "3"])
    return {row: bench.row_config(row, 1, args) for row in bench.ROWS}


def test_the_rows_differ_only_in_token_and_recipe():
    runs = configs()
    assert all(check_registered(c) == [] for c in runs.values())
    example = load_config(EXAMPLES / "deit_vit.yaml")
    assert runs["deit-token"].recipe == example.recipe
    assert runs["deit-token"].recipe["distillation_head"] == "token"
    assert runs["deit-shared"].recipe == {**example.recipe,
                                          "distillation_head": "shared_features"}
    assert runs["hinton"].recipe == load_config(EXAMPLES / "hinton.yaml").recipe
    assert runs["ce"].recipe == {"name": "ce"} and runs["ce"].teacher is None
    tokens = {row: c.student.options["distillation_token"] for row, c in runs.items()}
    assert tokens == {"deit-token": True, "deit-shared": False, "hinton": False, "ce": False}
    for c in runs.values():
        assert (c.student.name, c.student.size, c.student.options["patch_size"]) == \
            ("vit", "small", 7)
        assert (c.trainer.epochs, c.trainer.seed, c.cpu_threads) == (3, 1, 1)
        assert c.trainer.optimizer == example.trainer.optimizer
        assert c.trainer.scheduler == example.trainer.scheduler
    # The leaderboard's teacher and data, so a teacher it cached is reused.
    board = lb.run_config(lb.Row("deit", "deit"), "all", 0, False, 3250)
    assert runs["deit-token"].teacher == board.teacher and runs["deit-token"].data == board.data


@pytest.mark.parametrize(("row", "kind"), [("deit-token", ViT), ("deit-shared", TwoHeadStudent)])
def test_the_token_row_keeps_the_vit_and_the_fallback_row_wraps_it(row, kind):
    config = configs("digits")[row]
    data = build_data(config.data)
    student = build_student(config, data, build_phases(config), ["recipe"])
    assert type(student) is kind
