"""The embeddings benchmark's pieces that need no real model: reading fortunes, the configs of
its rows, the targets and the results section it writes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import embeddings as eb  # noqa: E402

from kdistill.models.hf import model_folder  # noqa: E402


def test_fortunes_are_read_one_text_per_fortune_with_their_lines_joined(tmp_path: Path) -> None:
    (tmp_path / "wisdom").write_text("Look before\n  you leap.\n%\nHaste makes waste.\n%\n")
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x02binary index")
    (tmp_path / "wisdom.u8").write_text("Look before\nyou leap.\n%\n")  # a duplicate
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "rude").write_text("Not this one.\n%\n")
    (tmp_path / "art").write_text("%\nA first.\n%\n\n%\nA second,\ntwo lines.")
    assert eb.read_fortunes(tmp_path) == ["A first.", "A second, two lines.",
                                          "Look before you leap.", "Haste makes waste."]


def test_missing_fortunes_are_said_not_installed(tmp_path: Path) -> None:
    path, note = eb.fortunes_file(tmp_path / "none")
    assert path is None
    assert note.startswith(f"fortunes not installed ({tmp_path / 'none'} missing")


def row(name: str, spearman: float, overlap: float, probe: float, speedup: float) -> dict:
    return {"name": name, "params": 1234567, "size_mb": 4.56, "similarity_spearman": spearman,
            "nn10_overlap": overlap, "probe_accuracy": probe, "throughput": 12345.6,
            "speedup": speedup}


def test_a_student_meets_the_targets_only_when_it_reaches_every_one() -> None:
    assert eb.meets_targets(row("s", 0.6, 0.3, 0.76, 50.0))
    assert not eb.meets_targets(row("s", 0.9, 0.9, 0.9, 49.9))
    assert not eb.meets_targets(row("s", 0.59, 0.9, 0.9, 100.0))
    assert not eb.meets_targets(row("s", 0.9, 0.29, 0.9, 100.0))
    assert not eb.meets_targets(row("s", 0.9, 0.9, 0.75, 100.0))
    assert not eb.meets_targets({**row("s", 0.9, 0.9, 0.9, 100.0), "probe_accuracy": None})


def test_the_results_section_has_a_line_per_model_and_the_notes() -> None:
    results = {"rows": [row("teacher", 1.0, 1.0, 0.768, 1.0),
                        row("static ckd", 0.61, 0.35, 0.77, 210.0),
                        row("transformer-2L ckd", 0.9, 0.6, 0.75, 2.9)],
               "fortunes": "fortunes not installed", "model2vec": "No model2vec row.",
               "load_average": (1.0, 2.0, 3.5)}
    text = eb.results_markdown(results)
    lines = text.splitlines()
    assert lines[0] == ("| model | params | MB | sim. Spearman | NN@10 | probe acc | "
                        "sentences/s | speed-up | targets met |")
    assert lines[2] == ("| teacher | 1,234,567 | 4.56 | 1.000 | 1.000 | 76.80% | 12,346 | "
                        "1.0x | – |")
    assert lines[3].endswith("| 0.610 | 0.350 | 77.00% | 12,346 | 210.0x | yes |")
    assert lines[4].endswith("| 2.9x | no |")
    assert "Training texts: fortunes not installed. No model2vec row." in text
    assert "speedup >= 50, similarity_spearman >= 0.6, nn10_overlap >= 0.3, " \
           "probe_accuracy >= 0.76" in text
    assert text.endswith("(1, 5, 15 min): 1.00, 2.00, 3.50.\n")


def test_each_row_changes_only_its_recipe_and_shares_the_teacher_cache(tmp_path: Path) -> None:
    try:
        model_folder("all-MiniLM-L6-v2")
    except FileNotFoundError:
        pytest.skip("the embedding examples name all-MiniLM-L6-v2, which is not installed here")
    configs = {name: eb.row_config(name, False, None) for name in eb.ROWS}
    kd, ckd = configs["transformer-2L embedding_kd"], configs["transformer-2L ckd"]
    assert kd.recipe == {"name": "embedding_kd", "loss": "cosine"}
    assert ckd.recipe == eb.CKD and ckd.student == kd.student
    assert kd.student.options["layers"] == [2, 5] and kd.student.options["pooling"] == "mean"
    assert configs["static ckd"].student.name == "static"
    caches = {config.teacher.cache.path for config in configs.values()}
    assert len(caches) == 1  # one cache of the same teacher on the same texts
    assert all(config.trainer.seed == 0 and config.data.unlabeled_sources == []
               for config in configs.values())
    fortunes = tmp_path / "fortunes.txt"
    fortunes.write_text("A fortune.\n")
    quick = eb.row_config("static ckd", True, fortunes)
    assert quick.trainer.epochs == 1 and quick.data.unlabeled_sources == [str(fortunes)]
    assert quick.teacher.cache.path not in caches  # other texts: a cache of their own
