"""The embeddings benchmark's pieces that need no real model: reading fortunes, the configs of
its rows, the targets and the results section it writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_model2vec_encoder import TEXTS, by_hand, save_model2vec, write_check

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import embeddings as eb  # noqa: E402
from model2vec_encoder import Model2VecEncoder  # noqa: E402

from kdistill.errors import KdistillError  # noqa: E402


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
               "fortunes": "fortunes not installed", "model2vec": {"note": "No model2vec row."},
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


@pytest.mark.usefixtures("minilm")
def test_each_row_changes_only_its_recipe_and_shares_the_teacher_cache(tmp_path: Path) -> None:
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
    swept = eb.row_config("static embedding_kd", False, None, ["trainer.epochs=5"])
    assert swept.trainer.epochs == 5 and configs["static embedding_kd"].trainer.epochs == 10
    assert swept.recipe == configs["static embedding_kd"].recipe  # the sweep's one change


RECORD = {"model2vec": "0.10.0", "transformers": "5.3.0", "torch": "2.13.0+cpu",
          "teacher": "/models/minilm",
          "arguments": {"pca_dims": 256, "sif_coefficient": 1e-4, "quantize_to": "float16",
                        "model_name": "/models/minilm"},
          "seconds": 29.6, "threads": 1, "vectors": [8, 3], "dtype": "float16"}


def test_without_a_model2vec_folder_there_is_no_row_but_the_commands_to_make_one(
        tmp_path: Path) -> None:
    model, entry = eb.model2vec_row(tmp_path / "none")
    assert model is None
    teacher, student = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert list(eb.measured_models(teacher, {"static ckd": student}, model)) == [
        "teacher", "static ckd"]
    assert entry == {"note": f"No model2vec row: {tmp_path / 'none'} does not exist; make it "
                             f"with {eb.MODEL2VEC_COMMANDS}."}
    assert "pip install torch==2.13.0" in eb.MODEL2VEC_COMMANDS
    assert "benchmarks/model2vec_distill.py runs/model2vec-minilm" in eb.MODEL2VEC_COMMANDS


def test_a_model2vec_folder_gives_the_row_checked_with_where_it_came_from(
        tmp_path: Path) -> None:
    folder = save_model2vec(tmp_path, normalize=True)
    (folder / "distillation.json").write_text(json.dumps(RECORD))
    write_check(folder, by_hand(True), by_hand(True).half().float())
    model, entry = eb.model2vec_row(folder)
    assert isinstance(model, Model2VecEncoder)
    teacher, student = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    models = eb.measured_models(teacher, {"static ckd": student}, model)
    assert list(models) == ["teacher", "static ckd", "model2vec"] and models["model2vec"] is model
    torch.testing.assert_close(model(TEXTS)["sentence_embedding"], by_hand(True), atol=1e-6,
                               rtol=0)
    assert {k: entry[k] for k in RECORD} == RECORD and entry["folder"] == str(folder)
    assert entry["check"]["texts"] == len(TEXTS)
    assert entry["note"].startswith(
        "model2vec: model2vec 0.10.0's `distill` of the teacher with its defaults (pca_dims "
        "256, sif_coefficient 0.0001, float16 vectors of 8 tokens), 30 s on 1 thread(s) in "
        "its own environment (benchmarks/model2vec_distill.py), not trained by kdistill; its "
        "embeddings of 5 check texts, read here without model2vec, are its own to ")


def test_a_model2vec_folder_without_its_record_or_check_is_refused(tmp_path: Path) -> None:
    folder = save_model2vec(tmp_path, normalize=True)
    with pytest.raises(KdistillError, match="distillation.json is missing: the model2vec row "
                                            "needs a folder made by benchmarks/model2vec_"):
        eb.model2vec_row(folder)
    (folder / "distillation.json").write_text(json.dumps(RECORD))
    with pytest.raises(KdistillError, match="encode_check.json: unreadable"):
        eb.model2vec_row(folder)
    write_check(folder, by_hand(True), by_hand(True))
    (folder / "distillation.json").write_text(json.dumps({"model2vec": "0.10.0"}))
    with pytest.raises(KdistillError, match="distillation.json: not a record of benchmarks/"
                                            "model2vec_distill.py"):
        eb.model2vec_row(folder)
