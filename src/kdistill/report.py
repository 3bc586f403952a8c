"""Reports: comparison tables for the terminal and markdown, a comparison plot, report.md,
and the table and heat map of a layer map (:mod:`kdistill.layermap`).

Rows are mappings such as :class:`kdistill.evaluate.BenchmarkRow`. Known keys are shown in a
fixed order with their own format (percentages, thousands separators, three significant figures
for times); any other keys follow in the row's order. Missing values print as ``–``.

Files are written atomically: to a temporary name in the target directory, then ``os.replace``,
so a crash never leaves a half-written report or plot.
"""

from __future__ import annotations

import math
import os
import statistics
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from rich.table import Table

from kdistill.layermap import LayerMap
from kdistill.settings import SHIFTS

Row = Mapping[str, Any]
MISSING = "–"
PLOT_NAME = "comparison.png"
REPORT_NAME = "report.md"


# --------------------------------------------------------------------------- formatting


def significant(value: float, digits: int = 3) -> str:
    """``value`` rounded to ``digits`` significant figures, without scientific notation.

    >>> significant(1234.5), significant(0.012345), significant(9.996)
    ('1230', '0.0123', '10.0')
    """
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    rounded = float(f"{value:.{digits}g}")
    decimals = digits - 1 - math.floor(math.log10(abs(rounded)))
    return f"{rounded:.{max(decimals, 0)}f}"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _thousands(value: int) -> str:
    return f"{value:,}"


def _times(value: float) -> str:
    return f"{significant(value)}×"


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return significant(value)
    return str(value)


@dataclass(frozen=True)
class Column:
    """How one row key is shown: header text, formatter, and whether it is right-aligned."""

    key: str
    header: str
    format: Callable[[Any], str] = _plain
    numeric: bool = True


COLUMNS = (
    Column("name", "Model", str, numeric=False),
    Column("cer", "CER", _percent),
    Column("perplexity", "PPL", significant),
    Column("accuracy", "Acc", _percent),
    *(Column(f"accuracy_{shift}", f"Acc {shift}", _percent) for shift in SHIFTS),
    Column("accuracy_shifted", "Acc shifted", _percent),
    Column("macro_f1", "Macro-F1", _percent),
    Column("ece", "ECE", _percent),
    Column("agreement", "Agree", _percent),
    Column("accuracy_share", "Acc/teacher", _percent),
    Column("mse", "MSE", significant),
    Column("pearson", "Pearson", significant),
    Column("spearman", "Spearman", significant),
    Column("mse_teacher", "MSE/teacher", significant),
    Column("pearson_teacher", "Pearson/teacher", significant),
    Column("spearman_teacher", "Spearman/teacher", significant),
    Column("similarity_spearman", "Sim. Spearman", significant),
    Column("nn10_overlap", "NN@10", significant),
    Column("probe_accuracy", "Probe acc", _percent),
    Column("mrr10", "MRR@10", significant),
    Column("recall10", "R@10", _percent),
    Column("recall100", "R@100", _percent),
    Column("ndcg10", "nDCG@10", significant),
    Column("teacher_overlap10", "Top-10/teacher", _percent),
    Column("params", "Params", _thousands),
    Column("size_mb", "MB", significant),
    Column("latency_ms", "ms/batch", significant),
    Column("per_example_ms", "ms/ex", significant),
    Column("throughput", "ex/s", significant),
    Column("tokens_per_s", "tok/s", significant),
    Column("speedup", "Speed-up", _times),
    Column("batch_size", "Batch"),
    Column("threads", "Threads"),
)


def _columns(rows: Sequence[Row]) -> list[Column]:
    """Known columns that some row has, in the fixed order, then unknown keys as they come."""
    present = {key for row in rows for key in row}
    known = [column for column in COLUMNS if column.key in present]
    known_keys = {column.key for column in COLUMNS}
    extra = dict.fromkeys(key for row in rows for key in row if key not in known_keys)
    return known + [Column(key, key) for key in extra]


def _cell(column: Column, row: Row) -> str:
    value = row.get(column.key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return column.format(value)


def results_table(rows: Sequence[Row], title: str | None = None) -> Table:
    """A :class:`rich.table.Table` of the rows, for printing in the terminal."""
    columns = _columns(rows)
    table = Table(title=title)
    for column in columns:
        table.add_column(column.header, justify="right" if column.numeric else "left")
    for row in rows:
        table.add_row(*(_cell(column, row) for column in columns))
    return table


def _markdown_cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def markdown_grid(header: Sequence[str], rows: Iterable[Sequence[str]],
                  numeric: Sequence[bool] | None = None) -> str:
    """A GitHub-flavoured markdown table of ready-made cells; ``|`` and line breaks inside a
    cell are escaped. ``numeric`` right-aligns the columns marked True and left-aligns the
    others; without it the alignment is left to the renderer."""
    if numeric is None:
        rule = "|" + "---|" * len(header)
    else:
        rule = "|" + "|".join("---:" if right else ":---" for right in numeric) + "|"
    lines = ["| " + " | ".join(_markdown_cell(cell) for cell in header) + " |", rule]
    lines += ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub-flavoured markdown table (numbers right-aligned)."""
    columns = _columns(rows)
    return markdown_grid([column.header for column in columns],
                         ([_cell(column, row) for column in columns] for row in rows),
                         [column.numeric for column in columns])


# --------------------------------------------------------------------------- repeated runs


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the values, None and NaN left out; the
    std is None for fewer than two values, both are None for none."""
    numbers = [v for v in values if v is not None and not math.isnan(v)]
    if not numbers:
        return None, None
    return statistics.fmean(numbers), statistics.stdev(numbers) if len(numbers) > 1 else None


def mean_std_text(mean: float | None, std: float | None, scale: float = 100.0) -> str:
    """``mean ± std`` times ``scale`` (percent by default) with two decimals; the mean alone
    without a std, ``–`` without a mean."""
    if mean is None:
        return MISSING
    return f"{scale * mean:.2f}" + (f" ± {scale * std:.2f}" if std is not None else "")


def summarise_runs(runs: Iterable[Row], key: str, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Repeated runs (one per seed, say) grouped by ``run[key]``, in order of first appearance.

    Each group gives ``key``, ``seeds`` (its number of runs), ``ok`` (those whose ``status`` is
    ``"ok"``), ``errors`` (the others' ``error``) and, over the successful runs, the
    :func:`mean_std` of each metric as ``<metric>`` and ``<metric>_std``.
    """
    groups: dict[Any, list[Row]] = {}
    for run in runs:
        groups.setdefault(run[key], []).append(run)
    summary = []
    for name, members in groups.items():
        done = [run for run in members if run.get("status") == "ok"]
        row: dict[str, Any] = {key: name, "seeds": len(members), "ok": len(done), "errors": [
            run.get("error") or "unknown error" for run in members if run.get("status") != "ok"]}
        for metric in metrics:
            row[metric], row[f"{metric}_std"] = mean_std(run.get(metric) for run in done)
        summary.append(row)
    return summary


# --------------------------------------------------------------------------- atomic writes


def _write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` through a temporary file in the same directory, then ``os.replace``.

    The temporary file is opened normally (``"xb"``), so the final file gets the usual
    permissions; it is flushed to disk before the rename and removed if writing fails.
    """
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- plot


def _learning_curve(history: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """(optimizer step, eval_accuracy) of the entries that have ``eval_accuracy``.

    Steps, not epochs, so runs whose epochs differ in length (a labels-only baseline) line up.
    An entry without ``step`` is placed at its position among the evaluations (1, 2, ...).
    """
    evaluations = [entry for entry in history if entry.get("eval_accuracy") is not None]
    epochs = [float(entry.get("step", position))
              for position, entry in enumerate(evaluations, start=1)]
    return epochs, [float(entry["eval_accuracy"]) for entry in evaluations]


def _colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per run name, the same in both panels."""
    cycle = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(dict.fromkeys(names))}


def _plot_histories(axes: Axes, histories: Mapping[str, Sequence[Mapping[str, Any]]],
                    colours: Mapping[str, str]) -> None:
    curves = {name: _learning_curve(history) for name, history in histories.items()}
    curves = {name: curve for name, curve in curves.items() if curve[0]}
    for name, (epochs, accuracy) in curves.items():
        axes.plot(epochs, accuracy, marker="o", markersize=3, label=name, color=colours[name])
    if curves:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no evaluation history", ha="center", va="center",
                  transform=axes.transAxes)
    axes.set(title="Learning curves", xlabel="optimizer step", ylabel="eval accuracy")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))


def _plot_tradeoff(axes: Axes, rows: Sequence[Row], colours: Mapping[str, str]) -> None:
    points = [row for row in rows
              if row.get("speedup") is not None and row.get("accuracy") is not None]
    for i, row in enumerate(points):
        name = str(row.get("name", ""))
        axes.scatter(row["speedup"], row["accuracy"], color=colours[name])
        # Alternate label offsets so that points close together keep readable labels.
        axes.annotate(name, (row["speedup"], row["accuracy"]), textcoords="offset points",
                      xytext=(6, 6 if i % 2 == 0 else -12), color=colours[name])
    axes.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    axes.margins(0.15)  # room for the labels of the outermost points
    axes.set(title="Accuracy against speed-up", xlabel="speed-up over reference (×)",
             ylabel="accuracy")
    axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))


def plot_comparison(histories: Mapping[str, Sequence[Mapping[str, Any]]],
                    rows: Sequence[Row], path: str | os.PathLike[str]) -> Path:
    """Save a two-panel PNG: learning curves (left), accuracy against speed-up (right).

    Left: ``eval_accuracy`` per optimizer ``step`` for each run in ``histories``. Right: one
    labelled point per row at (``speedup``, ``accuracy``). The figure is drawn on matplotlib's Agg
    canvas without pyplot, so no window opens and the global backend is untouched.
    """
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    colours = _colours([str(row.get("name", "")) for row in rows] + list(histories))
    _plot_histories(left, histories, colours)
    _plot_tradeoff(right, rows, colours)
    return _write_atomically(Path(path), lambda handle: figure.savefig(handle, format="png",
                                                                       dpi=120))


# --------------------------------------------------------------------------- layer map


def layer_map_table(result: LayerMap) -> Table:
    """The CKA matrix of a :class:`~kdistill.layermap.LayerMap` as a table: a row ``s<m>`` per
    student hidden state, a column ``t<n>`` per teacher hidden state, ``*`` on the proposed
    map."""
    table = Table()
    table.add_column("", no_wrap=True)
    for n in range(result.matrix.shape[1]):
        table.add_column(f"t{n}", justify="right", no_wrap=True)
    for m, values in enumerate(result.matrix.tolist()):
        table.add_row(f"s{m}", *(f"{value:.3f}{'*' if result.proposed[m] == n else ' '}"
                                 for n, value in enumerate(values)))
    return table


def plot_layer_map(result: LayerMap, path: str | os.PathLike[str]) -> Path:
    """Save a heat map PNG of a :class:`~kdistill.layermap.LayerMap`'s CKA matrix (teacher
    hidden states across, student hidden states up), the proposed map as a red line of dots,
    the free map (when it differs) as a dashed orange line and the uniform map as white
    crosses, each with its total similarity in the legend."""
    rows, columns = result.matrix.shape
    figure = Figure(figsize=(2.5 + 0.45 * columns, 1.8 + 0.45 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow(result.matrix.numpy(), origin="lower", vmin=0.0, vmax=1.0,
                        cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes, label="linear CKA")
    axes.plot(result.proposed, range(rows), "o-", color="red", markerfacecolor="none",
              label=f"proposed {result.proposed} ({result.proposed_total:.3f})")
    if result.free != result.proposed:
        axes.plot(result.free, range(rows), "s--", color="orange", markerfacecolor="none",
                  label=f"free {result.free} ({result.free_total:.3f})")
    axes.plot(result.uniform, range(rows), "x", color="white", markersize=9,
              label=f"uniform {result.uniform} ({result.uniform_total:.3f})")
    axes.set(xticks=range(columns), yticks=range(rows), xlabel="teacher hidden.n",
             ylabel="student hidden.m", title=f"Layer similarity ({result.samples} inputs)")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize="small",
                facecolor="0.75")  # grey: the uniform map's white crosses show
    return _write_atomically(Path(path), lambda handle: figure.savefig(handle, format="png",
                                                                       dpi=120))


# --------------------------------------------------------------------------- report


def _settings_list(settings: Mapping[str, Any]) -> str:
    return "\n".join(f"- **{key}**: {_markdown_cell(str(value))}"
                     for key, value in settings.items())


def _report_markdown(title: str, rows: Sequence[Row], notes: str,
                     settings: Mapping[str, Any] | None) -> str:
    sections = [f"# {title}"]
    if settings:
        sections.append("## Settings\n\n" + _settings_list(settings))
    sections.append("## Results\n\n" + markdown_table(rows))
    sections.append(f"![comparison]({PLOT_NAME})")
    if notes.strip():
        sections.append("## Notes\n\n" + notes.strip())
    return "\n\n".join(sections) + "\n"


def write_report(run_dir: str | os.PathLike[str], *, title: str, rows: Sequence[Row],
                 histories: Mapping[str, Sequence[Mapping[str, Any]]], notes: str = "",
                 settings: Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/comparison.png``; return the report's path.

    The report holds the title, the settings as a list, the results table, the embedded plot
    and the notes. Both files are written atomically, the plot first, so a report never
    refers to a missing or partial plot.
    """
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    plot_comparison(histories, rows, directory / PLOT_NAME)
    text = _report_markdown(title, rows, notes, settings)
    return _write_atomically(directory / REPORT_NAME,
                             lambda handle: handle.write(text.encode("utf-8")))
