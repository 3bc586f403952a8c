"""The TinyBERT layer-map benchmark's pieces that need no training: its variants' configs and
the table it writes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kdistill.layermap import LayerMap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tinybert_maps as bench  # noqa: E402


@pytest.mark.usefixtures("minilm")
def test_the_variants_change_only_the_student_layers_the_map_and_the_seed() -> None:
    top = bench.variant_config("top", "uniform", 1)
    bottom = bench.variant_config("bottom", "auto", 2)
    assert top.student.options["layers"] == [2, 5] and bottom.student.options["layers"] == [0, 1]
    assert "layer_map" not in top.phases[0].recipe
    assert bottom.phases[0].recipe["layer_map"] == "auto"
    assert top.data.augment is None and bottom.data.augment is None
    assert (top.trainer.seed, bottom.trainer.seed) == (1, 2)
    assert top.phases[1] == bottom.phases[1] and [p.epochs for p in top.phases] == [3, 2]
    assert bench.map_used(top, None) == [3, 6]  # uniform: no data read
    free = bench.variant_config("bottom", "auto_free", 0)
    assert free.phases[0].recipe["layer_map"] == "auto_free"
    assert bench.MAPS == ("uniform", "auto", "auto_free")


def test_the_report_gives_each_student_and_map_with_the_maps_used() -> None:
    runs = [{"student": s, "map": m, "seed": seed, "accuracy": a, "train_seconds": 100.0,
             "layer_map": g, "load_average": [2.0, 1, 1]}
            for s, m, seed, a, g in (("bottom", "uniform", 0, 0.70, [3, 6]),
                                     ("bottom", "uniform", 1, 0.72, [3, 6]),
                                     ("bottom", "auto", 0, 0.75, [1, 2]),
                                     ("bottom", "auto", 1, 0.77, [1, 2]))]
    lines = bench.report({"runs": runs, "teacher_accuracy": 0.8}).splitlines()
    assert lines[0] == "Teacher: 80.00% test accuracy."
    assert lines[4].split("|")[1:-1] == [" bottom ", " uniform ", " [3, 6] ", " 71.00 ± 1.41 ",
                                         " 88.8% ", " 2 ", " 100 "]
    assert lines[5].split("|")[1:-1] == [" bottom ", " auto ", " [1, 2] ", " 76.00 ± 1.41 ",
                                         " 95.0% ", " 2 ", " 100 "]
    assert "Load average (1 min) at the end of the runs: 2.00 to 2.00." in lines[-1]


def test_a_subset_report_says_how_many_texts_the_students_saw() -> None:
    runs = [{"student": "top", "map": "auto", "seed": 0, "accuracy": 0.7, "train_seconds": 1.0,
             "layer_map": [2, 6], "load_average": [2.0, 1, 1]}]
    text = bench.report({"runs": runs, "train_texts": 3000, "teacher_accuracy": 0.8})
    assert text.startswith("Students trained on 3,000 of the training texts (a seeded random "
                           "sample, seed 0); the teacher and the test split are the full "
                           "benchmark's.\n\nTeacher: 80.00% test accuracy.\n\n| student")
    assert bench.report({"runs": runs, "train_texts": None,
                         "teacher_accuracy": 0.8}).startswith("Teacher: 80.00%")


@pytest.mark.usefixtures("minilm")
def test_each_measured_map_saves_the_map_its_run_trains_with(
        monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                           [0.0, 0.9, 0.1, 0.0],
                           [0.0, 0.0, 1.0, 0.1]])  # pinned [0, 1, 3], free [0, 1, 2]
    monkeypatch.setattr(bench, "measure_layer_map",
                        lambda config, data: LayerMap.from_matrix(matrix, samples=2))
    assert bench.map_used(bench.variant_config("top", "auto", 0), None) == [1, 3]
    assert bench.map_used(bench.variant_config("top", "auto_free", 0), None) == [1, 2]
