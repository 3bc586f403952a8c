import pytest
from rich.console import Console

from kdistill.report import (
    markdown_grid,
    markdown_table,
    mean_std,
    mean_std_text,
    results_table,
    significant,
    summarise_runs,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"name": "teacher", "accuracy": 0.9123, "macro_f1": 0.9, "ece": 0.05, "agreement": 1.0,
     "params": 1234567, "size_mb": 4.938, "latency_ms": 12.345, "per_example_ms": 0.3858,
     "speedup": 1.0, "batch_size": 32, "threads": 2},
    {"name": "student", "accuracy": 0.88, "macro_f1": 0.87, "ece": 0.03, "agreement": None,
     "params": 45678, "size_mb": 0.183, "latency_ms": 1.2345, "per_example_ms": 0.03858,
     "speedup": 10.0, "batch_size": 32, "threads": 2},
]
HISTORIES = {
    "student": [{"epoch": 1, "eval_accuracy": 0.7}, {"epoch": 1, "loss": 0.3},
                {"epoch": 2, "eval_accuracy": 0.88}],
    "baseline": [{"epoch": 1, "loss": 0.5}],
}


def test_significant_figures():
    assert significant(12.345) == "12.3"
    assert significant(1234.5) == "1230"
    assert significant(0.012345) == "0.0123"
    assert significant(9.996) == "10.0"
    assert significant(0.0) == "0"


def test_markdown_table_formats_values():
    table = markdown_table(ROWS)
    lines = table.splitlines()
    assert lines[0].startswith("| Model | Acc |")
    assert len(lines) == 2 + len(ROWS)
    assert "91.23%" in lines[2] and "1,234,567" in lines[2] and "12.3" in lines[2]
    assert "| – |" in lines[3]  # missing agreement
    assert "10.0×" in lines[3]


def test_markdown_grid_escapes_cells_and_aligns_when_asked():
    plain = markdown_grid(["a", "b"], [["x | y", "1"], ["two\nlines", "2"]]).splitlines()
    assert plain == ["| a | b |", "|---|---|", "| x \\| y | 1 |", "| two lines | 2 |"]
    aligned = markdown_grid(["name", "n"], [], numeric=[False, True]).splitlines()
    assert aligned == ["| name | n |", "|:---|---:|"]
    assert markdown_table(ROWS).splitlines()[1].startswith("|:---|---:|")


def test_mean_and_sample_std_leave_out_missing_values():
    mean, std = mean_std([0.90, 0.92, None, 0.97])
    assert mean == pytest.approx(0.93)
    assert std == pytest.approx(((0.03**2 + 0.01**2 + 0.04**2) / 2) ** 0.5)
    assert mean_std([0.5, float("nan")]) == (0.5, None)
    assert mean_std([None]) == (None, None)
    assert mean_std_text(0.7612, 0.0141) == "76.12 ± 1.41"
    assert mean_std_text(0.5, None) == "50.00" and mean_std_text(None, None) == "–"


def test_summarise_runs_groups_by_key_over_successful_runs():
    runs = [{"entry": "b", "status": "ok", "acc": 0.8}, {"entry": "a", "status": "ok", "acc": 0.6},
            {"entry": "b", "status": "ok", "acc": 0.9},
            {"entry": "b", "status": "failed", "error": "boom"}, {"entry": "a", "status": "failed"}]
    b, a = summarise_runs(runs, "entry", ["acc"])  # in order of first appearance
    assert (b["entry"], b["seeds"], b["ok"], b["errors"]) == ("b", 3, 2, ["boom"])
    assert b["acc"] == pytest.approx(0.85) and b["acc_std"] == pytest.approx(0.0707, abs=1e-4)
    assert (a["ok"], a["errors"], a["acc"], a["acc_std"]) == (1, ["unknown error"], 0.6, None)


def test_results_table_renders_rows():
    console = Console(record=True, width=200)
    console.print(results_table(ROWS, title="Comparison"))
    text = console.export_text()
    assert "Comparison" in text and "teacher" in text and "45,678" in text


def test_write_report_writes_markdown_and_png_and_no_temp_files(tmp_path):
    run_dir = tmp_path / "run"
    path = write_report(run_dir, title="Demo run", rows=ROWS, histories=HISTORIES,
                        notes="Student is ten times faster.", settings={"seed": 0, "epochs": 2})
    assert path == run_dir / "report.md"
    text = path.read_text()
    assert text.startswith("# Demo run")
    assert "teacher" in text and "student" in text
    assert "- **seed**: 0" in text
    assert "![comparison](comparison.png)" in text
    assert "Student is ten times faster." in text
    assert (run_dir / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in run_dir.iterdir()) == ["comparison.png", "report.md"]


def test_write_report_replaces_an_existing_report(tmp_path):
    write_report(tmp_path, title="First", rows=ROWS, histories={})
    path = write_report(tmp_path, title="Second", rows=ROWS[:1], histories={})
    assert path.read_text().startswith("# Second")
    assert "student" not in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.png", "report.md"]
