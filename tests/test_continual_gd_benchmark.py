"""The continual general-distillation benchmark: its domains, the order it trains its rows in,
what a rerun takes up again, the table it writes, and (tiny models) a whole quick run whose
continual row starts from the exported student of the first domain."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import continual_gd as bench  # noqa: E402
from resumable import saved_results  # noqa: E402
from test_hf_text import VOCAB, save_bert  # noqa: E402

from kdistill.data import DataSplits, TextDataset  # noqa: E402

RT_TRAIN = [f"review {i}" for i in range(20)]
RT_TEST = [f"held review {i}" for i in range(10)]
FORTUNES = [f"fortune {i}" for i in range(30)]


# -- domains -----------------------------------------------------------------------------------
def test_each_domain_trains_and_holds_out_distinct_texts_of_its_own() -> None:
    domains = bench.make_domains(RT_TRAIN, RT_TEST, FORTUNES, texts=5, eval_texts=4)
    a, b, mixed = domains["A"], domains["B"], domains["A+B"]
    assert len(set(a.train)) == 5 and set(a.train) <= set(RT_TRAIN)
    assert len(set(a.held_out)) == 4 and set(a.held_out) <= set(RT_TEST)
    assert len(set(b.train)) == 5 and len(set(b.held_out)) == 4
    assert set(b.train) | set(b.held_out) <= set(FORTUNES)
    assert not set(b.train) & set(b.held_out)
    assert mixed.train == a.train + b.train and mixed.held_out == a.held_out + b.held_out
    assert bench.make_domains(RT_TRAIN, RT_TEST, FORTUNES, 5, 4) == domains  # seeded
    assert bench.make_domains(RT_TRAIN, RT_TEST, FORTUNES, 5, 4, seed=1)["A"] != a


def test_the_held_out_texts_do_not_change_with_the_training_cap() -> None:
    few = bench.make_domains(RT_TRAIN, RT_TEST, FORTUNES, texts=3, eval_texts=4)
    many = bench.make_domains(RT_TRAIN, RT_TEST, FORTUNES, texts=20, eval_texts=4)
    for domain in bench.DOMAINS:
        assert few[domain].held_out == many[domain].held_out
        assert many[domain].train[:3] == few[domain].train  # a larger cap adds texts


def test_asking_for_more_texts_than_a_domain_has_names_the_flag() -> None:
    with pytest.raises(SystemExit, match=r"^--texts: 21 texts asked for, only 20 available$"):
        bench.make_domains(RT_TRAIN, RT_TEST, FORTUNES, texts=21, eval_texts=4)
    with pytest.raises(SystemExit, match=r"^--eval-texts: 11 texts asked for, only 10 "):
        bench.make_domains(RT_TRAIN, RT_TEST, FORTUNES, texts=5, eval_texts=11)
    with pytest.raises(SystemExit, match=r"^--texts and --eval-texts: 20 \+ 10 fortunes asked "
                                         r"for, only 29 available$"):
        bench.make_domains(RT_TRAIN, RT_TEST, FORTUNES[:29], texts=20, eval_texts=10)
    bench.make_domains(RT_TRAIN, RT_TEST, FORTUNES, texts=20, eval_texts=10)  # exactly all


# -- the plan ----------------------------------------------------------------------------------
def test_a_fresh_plan_measures_start_once_then_each_seed_with_a_before_a_then_b() -> None:
    assert bench.plan(bench.ROWS, [0, 1], set(), set()) == [
        ("start", None), ("A", 0), ("A->B", 0), ("B", 0), ("A+B", 0),
        ("A", 1), ("A->B", 1), ("B", 1), ("A+B", 1)]


def test_a_rerun_trains_only_what_is_missing() -> None:
    done = {("start", None), ("A", 0), ("A->B", 0), ("B", 0), ("A", 1)}
    exported = {("A", 0), ("A", 1)}
    assert bench.plan(bench.ROWS, [0, 1], done, exported) == [
        ("A+B", 0), ("A->B", 1), ("B", 1), ("A+B", 1)]


def test_a_continual_row_brings_its_first_row_even_when_not_asked_or_not_exported() -> None:
    assert bench.plan(["A->B"], [3], set(), set()) == [("A", 3), ("A->B", 3)]
    # A measured, but its student is gone: A is trained again before A->B
    assert bench.plan(["A", "A->B"], [0], {("A", 0)}, set()) == [("A", 0), ("A->B", 0)]
    # A->B measured already: A's student is not needed any more
    assert bench.plan(["A", "A->B"], [0], {("A", 0), ("A->B", 0)}, set()) == []
    assert bench.prerequisites("A->B") == ["A"] and bench.prerequisites("A+B") == []
    assert [row for row in bench.ROWS if bench.needed_later(row)] == ["A"]


def test_saved_rows_count_only_under_the_same_settings(tmp_path: Path) -> None:
    settings = {"texts": 2000, "eval_texts": 500, "epochs": 2, "probe_texts": 2000,
                "layers": [2, 5], "quick": False}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"protocol": bench.protocol(settings),
                                "runs": [{"row": "A", "seed": 0}], "teacher": {"p": 1}}))
    kept = saved_results(path, False, bench.protocol(dict(reversed(settings.items()))),
                         {"runs": []}, keep=("teacher",))
    assert kept["runs"] == [{"row": "A", "seed": 0}] and kept["teacher"] == {"p": 1}
    other = saved_results(path, False, bench.protocol({**settings, "epochs": 3}), {"runs": []},
                          keep=("teacher",))
    assert other["runs"] == [] and "teacher" not in other


# -- the report --------------------------------------------------------------------------------
def measured(row: str, seed: int | None, a: float, b: float, probe: float,
             seconds: float | None = 120.0) -> dict[str, Any]:
    """A row's figures: every metric of held-out A is ``a``, of held-out B ``b`` (L_GD ten
    times it)."""
    run = {"row": row, "seed": seed, "probe_accuracy": probe, "load_average": [1.5, 1.0, 1.0],
           "A": {"loss": 10 * a, "similarity_spearman": a, "nn10_overlap": a},
           "B": {"loss": 10 * b, "similarity_spearman": b, "nn10_overlap": b}}
    if seconds is not None:
        run["train_seconds"] = seconds
    return run


def test_the_report_gives_each_row_over_its_seeds_and_the_headline_differences() -> None:
    runs = [measured("start", None, 0.5, 0.4, 0.70, None),
            measured("A", 0, 0.80, 0.50, 0.75), measured("A", 1, 0.82, 0.52, 0.77),
            measured("A->B", 0, 0.70, 0.70, 0.72), measured("A->B", 1, 0.72, 0.72, 0.74, 60.0)]
    settings = {"texts": 2000, "eval_texts": 500, "epochs": 2, "probe_texts": 2000,
                "layers": [2, 5]}
    text = bench.report({"runs": runs, "teacher": {"probe_accuracy": 0.8},
                         "settings": settings})
    lines = text.splitlines()
    assert lines[0] == ("| row | seeds | A: L_GD | A: sim. Spearman | A: NN@10 | A: probe % | "
                        "B: L_GD | B: sim. Spearman | B: NN@10 | train min |")
    assert lines[2] == ("| start | – | 5.000 | 0.500 | 0.500 | 70.00 | 4.000 | 0.400 | 0.400 "
                        "| – |")
    assert lines[3] == ("| A | 2 | 8.100 ± 0.141 | 0.810 ± 0.014 | 0.810 ± 0.014 | "
                        "76.00 ± 1.41 | 5.100 ± 0.141 | 0.510 ± 0.014 | 0.510 ± 0.014 | 2.0 |")
    assert lines[4].endswith("| 1.5 |")
    assert ("A->B minus A (seed means): on held-out A, L_GD -1, sim. Spearman -0.100, NN@10 "
            "-0.100, probe -3.00 points; on held-out B, L_GD +2, sim. Spearman +0.200, NN@10 "
            "+0.200.") in text
    assert "Teacher (all-MiniLM-L6-v2, mean-pooled): probe accuracy 80.00%" in text
    assert ("Settings: 2,000 training and 500 held-out texts per domain, 2 epoch(s) per GD run, "
            "student layers [2, 5] of the teacher, the probe trained on 2,000 snippets.") in text
    assert text.endswith("Load average (1 min) at the end of the runs: 1.50 to 1.50.\n")


def test_without_both_a_and_its_continuation_there_is_no_headline() -> None:
    text = bench.report({"runs": [measured("A", 0, 0.8, 0.5, 0.75)]})
    assert "minus" not in text and len(text.splitlines()) == 5


# -- a whole quick run on tiny models ----------------------------------------------------------
def tiny_texts(count: int, seed: int) -> list[str]:
    """``count`` texts of 3 to 6 words of the tiny vocabulary."""
    words = VOCAB[5:]
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 7, (count,), generator=generator).tolist()
    return [" ".join(words[i] for i in torch.randint(len(words), (n,), generator=generator))
            for n in lengths]


@pytest.fixture
def tiny_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The benchmark on a tiny 6-layer BERT (as the encoder), 400 + 200 labelled snippets and
    200 fortunes of its vocabulary, writing under ``tmp_path``; records each GD run's config."""
    encoder = save_bert(tmp_path / "encoder", layers=6, labels=2)
    labels = torch.arange(600) % 2
    snippets = DataSplits("rotten-tomatoes", TextDataset(tiny_texts(400, 0), labels[:400]),
                          TextDataset(tiny_texts(200, 1), labels[400:]), num_classes=2,
                          input_shape=())
    monkeypatch.setattr(bench, "ENCODER", str(encoder))
    monkeypatch.setattr(bench, "load_dataset", lambda *args, **kwargs: snippets)
    monkeypatch.setattr(bench, "read_fortunes", lambda folder: tiny_texts(200, 2))
    monkeypatch.setattr(bench, "QUICK_OUTPUT", tmp_path / "quick")
    configs: list[Any] = []
    train_run = bench.train_run

    def recorded(config: Any, data: DataSplits) -> Any:
        configs.append(config)
        return train_run(config, data)

    monkeypatch.setattr(bench, "train_run", recorded)
    return {"configs": configs, "folder": tmp_path / "quick"}


def quick_results(folder: Path) -> dict[str, Any]:
    return json.loads(folder.with_suffix(".json").read_text())


@pytest.mark.slow
def test_a_quick_run_continues_from_the_exported_student_and_a_rerun_resumes(
        tiny_benchmark: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    configs, folder = tiny_benchmark["configs"], tiny_benchmark["folder"]
    bench.main(["--quick"])
    results = quick_results(folder)
    assert [(r["row"], r["seed"]) for r in results["runs"]] == [
        ("start", None), ("A", 0), ("A->B", 0), ("B", 0), ("A+B", 0)]
    starts = [c.student for c in configs]
    assert [s.name for s in starts] == ["hf_student", "hf_text", "hf_student", "hf_student"]
    assert starts[1].options["path"] == str(folder / "seed0" / "A" / "student")
    assert [c.recipe for c in configs] == [{"name": "tinybert", "stage": "general",
                                            "student_layers": 2, "teacher_layers": 6}] * 4
    assert all(c.teacher.checkpoint is None and c.teacher.train is None for c in configs)
    start = results["runs"][0]
    assert start["A"]["embeddings"] == start["B"]["embeddings"] == 0.0  # the teacher's own
    assert start["A"]["loss"] == pytest.approx(start["A"]["hidden"] + start["A"]["attention"])
    trained = {r["row"]: r for r in results["runs"][1:]}
    assert trained["A+B"]["trained_texts"] == 2 * trained["A"]["trained_texts"] == 128
    assert trained["A"]["A"]["embeddings"] > 0  # a projection trained from a random start
    page = folder.with_suffix(".md").read_text()
    assert page.startswith("<!-- results: benchmarks/continual_gd.py -->\n| row |")
    capsys.readouterr()

    configs.clear()
    bench.main(["--quick"])  # everything saved: nothing trained again
    assert configs == [] and quick_results(folder)["runs"] == results["runs"]

    saved = quick_results(folder)
    saved["runs"] = [r for r in saved["runs"] if r["row"] != "A->B"]
    folder.with_suffix(".json").write_text(json.dumps(saved))
    for path in sorted((folder / "seed0" / "A" / "student").iterdir()):
        path.unlink()
    (folder / "seed0" / "A" / "student").rmdir()
    bench.main(["--quick"])  # A->B needs A's student: A is trained again first
    assert [c.student.name for c in configs] == ["hf_student", "hf_text"]
    rerun = quick_results(folder)
    assert [(r["row"], r["seed"]) for r in rerun["runs"]] == [
        ("start", None), ("B", 0), ("A+B", 0), ("A", 0), ("A->B", 0)]
