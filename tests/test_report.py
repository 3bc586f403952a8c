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
     "accuracy_share": 1.0, "params": 1234567, "size_mb": 4.938, "latency_ms": 12.345,
     "per_example_ms": 0.3858, "speedup": 1.0, "batch_size": 32, "threads": 2},
    {"name": "student", "accuracy": 0.88, "macro_f1": 0.87, "ece": 0.03, "agreement": None,
     "accuracy_share": 0.88 / 0.9123, "params": 45678, "size_mb": 0.183, "latency_ms": 1.2345,
     "per_example_ms": 0.03858, "speedup": 10.0, "batch_size": 32, "threads": 2},
]
# What each row shows under each header, written out by hand.
SHOWN = [
    {"Model": "teacher", "Acc": "91.23%", "Macro-F1": "90.00%", "ECE": "5.00%", "Agree": "100.00%",
     "Acc/teacher": "100.00%", "Params": "1,234,567", "MB": "4.94", "ms/batch": "12.3",
     "ms/ex": "0.386", "Speed-up": "1.00×", "Batch": "32", "Threads": "2"},
    {"Model": "student", "Acc": "88.00%", "Macro-F1": "87.00%", "ECE": "3.00%", "Agree": "–",
     "Acc/teacher": "96.46%", "Params": "45,678", "MB": "0.183", "ms/batch": "1.23",
     "ms/ex": "0.0386", "Speed-up": "10.0×", "Batch": "32", "Threads": "2"},
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


def markdown_cells(table: str) -> tuple[list[str], list[dict[str, str]]]:
    """The headers of a markdown table and its rows as {header: cell}."""
    header, _, *rows = table.splitlines()

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    return cells(header), [dict(zip(cells(header), cells(row), strict=True)) for row in rows]


def test_markdown_table_formats_every_cell():
    headers, rows = markdown_cells(markdown_table(ROWS))
    assert headers == list(SHOWN[0])  # the fixed column order
    assert rows == SHOWN  # speed-up as given (10x faster), retention as a share, – for None


def test_unknown_keys_follow_the_known_columns_in_row_order():
    headers, rows = markdown_cells(markdown_table([{"zeta": 1.23456, "name": "a", "alpha": 2},
                                                   {"name": "b", "speedup": 2.5}]))
    assert headers == ["Model", "Speed-up", "zeta", "alpha"]
    assert rows == [{"Model": "a", "Speed-up": "–", "zeta": "1.23", "alpha": "2"},
                    {"Model": "b", "Speed-up": "2.50×", "zeta": "–", "alpha": "–"}]


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
    table = results_table(ROWS, title="Comparison")
    columns = {column.header: list(column.cells) for column in table.columns}
    assert columns == {header: [row[header] for row in SHOWN] for header in SHOWN[0]}
    assert [column.justify for column in table.columns] == ["left"] + ["right"] * 12
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "Comparison" in text and "10.0×" in text and "96.46%" in text


def test_the_trade_off_plot_puts_speed_up_on_x_and_accuracy_on_y():
    from matplotlib.figure import Figure

    from kdistill.report import _colours, _plot_tradeoff

    axes = Figure().subplots()
    _plot_tradeoff(axes, ROWS, _colours([row["name"] for row in ROWS]))
    points = [tuple(c.get_offsets()[0]) for c in axes.collections]
    assert points == [(1.0, 0.9123), (10.0, 0.88)]
    assert [t.get_text() for t in axes.texts] == ["teacher", "student"]


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
