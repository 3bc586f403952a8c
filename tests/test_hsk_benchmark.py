"""The hsk benchmark's protocol pieces that need no training: the configs of its variants and
the table it writes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hsk as bench  # noqa: E402


@pytest.mark.usefixtures("minilm")
def test_the_variants_change_only_the_hidden_phases_slice_and_the_teacher_source() -> None:
    full, live, cached = (bench.variant_config(v, 2, quick=False) for v in bench.VARIANTS)
    assert full.phases[0].recipe == {"name": "hsk", "stage": "hidden", "student_layers": 2,
                                     "teacher_layers": 6, "layers": 3, "tokens": None,
                                     "width": 1.0}
    assert live.phases[0].recipe == cached.phases[0].recipe == {
        "name": "hsk", "stage": "hidden", "student_layers": 2, "teacher_layers": 6}
    assert full.teacher.cache is None and live.teacher.cache is None
    assert cached.teacher.cache.path.endswith("hsk-teacher-slices")
    assert full.trainer.seed == live.trainer.seed == cached.trainer.seed == 2
    assert full.phases[1] == live.phases[1] == cached.phases[1]
    assert [p.epochs for p in cached.phases] == [3, 2]
    quick = bench.variant_config("slice-cache", 0, True, Path("corpus.csv.bz2"))
    assert [p.epochs for p in quick.phases] == [1, 1]
    assert quick.data.options["path"] == "corpus.csv.bz2"  # the quick run's corpus as data
    assert quick.teacher.cache.path.endswith("hsk-teacher-slices-quick")
    subset = bench.variant_config("slice-cache", 0, quick=False, train_texts=3000)
    assert subset.teacher.cache.path.endswith("hsk-teacher-slices-3000")  # a cache of its own


def test_the_report_gives_accuracy_time_speed_up_and_cache_size() -> None:
    runs = [{"variant": v, "seed": s, "accuracy": a, "train_seconds": t,
             "load_average": [1.5, 1, 1]}
            for v, s, a, t in (("full-live", 0, 0.80, 300.0), ("full-live", 1, 0.82, 300.0),
                               ("slice-cache", 0, 0.79, 100.0), ("slice-cache", 1, 0.81, 100.0))]
    cache = {"rows": 10000, "bytes": 31_000_000, "build_seconds": 60.0}
    text = bench.report({"runs": runs, "cache": cache})
    lines = text.splitlines()
    assert lines[2].split("|")[1:-1] == [" full-live ", " 81.00 ± 1.41 ", " 2 ", " 300 ",
                                         " 1.00x "]
    assert lines[3].split("|")[1:-1] == [" slice-cache ", " 80.00 ± 1.41 ", " 2 ", " 100 ",
                                         " 3.00x "]
    assert "Slice cache: 10,000 texts, 31.0 MB (3.10 kB per text with the logits), built in " \
           "60 s." in text
