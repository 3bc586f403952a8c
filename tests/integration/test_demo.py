"""``kdistill demo --quick`` on a fixed seed: distillation must beat the labels-only student."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdistill.demo import DemoOptions, run_demo, step_matched_epochs


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    output = tmp_path_factory.mktemp("demo")
    outcome = run_demo(DemoOptions(quick=True, output=str(output), progress=False))
    return outcome, output


def accuracy(outcome, name: str) -> float:
    return next(row["accuracy"] for row in outcome.rows if row["name"] == name)


def test_hinton_and_dkd_beat_ce_by_ten_points(quick_demo: tuple) -> None:
    outcome, _ = quick_demo
    ce = accuracy(outcome, "ce")
    for name in ("hinton", "dkd"):
        assert accuracy(outcome, name) >= ce + 0.10, (name, accuracy(outcome, name), ce)


def test_distilled_students_also_beat_the_step_matched_baseline(quick_demo: tuple) -> None:
    outcome, _ = quick_demo
    assert accuracy(outcome, "hinton") > accuracy(outcome, "ce-steps")
    assert accuracy(outcome, "dkd") > accuracy(outcome, "ce-steps")


def test_table_rows_compare_teacher_and_students(quick_demo: tuple) -> None:
    outcome, _ = quick_demo
    rows = {row["name"]: row for row in outcome.rows}
    assert list(rows) == ["teacher", "ce", "ce-steps", "hinton", "dkd"]
    assert rows["teacher"]["speedup"] == 1.0
    assert rows["teacher"]["agreement"] == 1.0
    assert rows["teacher"]["accuracy"] > 0.95
    for name in ("ce", "ce-steps", "hinton", "dkd"):
        assert rows[name]["params"] == 64 * 16 + 16 + 16 * 10 + 10
        assert rows[name]["params"] < rows["teacher"]["params"]
        assert 0.0 <= rows[name]["ece"] <= 1.0


def test_report_and_plot_are_written(quick_demo: tuple) -> None:
    outcome, output = quick_demo
    report = Path(outcome.report)
    assert report == output / "demo" / "report.md"
    text = report.read_text()
    for name in ("teacher", "ce-steps", "hinton", "dkd"):
        assert name in text
    assert (output / "demo" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_matched_baseline_gets_as_many_steps() -> None:
    # 1,347 samples in batches of 64 = 22 steps per epoch; 50 labels = 1 step per epoch.
    assert step_matched_epochs(30, 1347, 50, 64) == 30 * 22
    assert step_matched_epochs(10, 1000, 200, 100) == 10 * 10 // 2


def test_teacher_is_cached_between_runs(quick_demo: tuple) -> None:
    from kdistill.config import DataConfig
    from kdistill.demo import teacher_config
    from kdistill.run import build_data, obtain_teacher

    options = DemoOptions(quick=True, progress=False)
    data_config = DataConfig(name="digits", labeled=options.labeled)
    _, info = obtain_teacher(teacher_config(options), data_config, build_data(data_config))
    assert info["cached"] is True
