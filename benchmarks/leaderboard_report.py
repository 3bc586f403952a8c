"""The leaderboard's report: the JSON file ``benchmarks/leaderboard.py`` rewrites after each
job (its machine, setups, teachers, runs and per-setting summary) and the page
``docs/leaderboard.md`` rendered from it.

Run alone to render the page again from a report, without training anything::

    .venv/bin/python benchmarks/leaderboard_report.py [--json REPORT] [--output PAGE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kdistill.checkpoint import atomic_write_text
from kdistill.report import markdown_grid, mean_std_text, summarise_runs

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("accuracy", "agreement", "ece", "seconds")
BASELINE = "ce"  # the recipe of the rows every other row is judged against (`ce`, `ce-steps`)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """How this process was started, from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else Path(sys.argv[0])
    return shlex.join([".venv/bin/python", str(shown), *sys.argv[1:]])


class Report:
    """The JSON report at ``path``, rewritten by :meth:`save` after each job; the last save also
    renders the page at ``page`` from it."""

    def __init__(self, path: Path, page: Path, workers: int, protocol: dict[str, Any],
                 setups: dict[str, Any]):
        self.path, self.page, self.started, self.loads = path, page, time.perf_counter(), []
        self.data: dict[str, Any] = {
            "benchmark": "kdistill leaderboard", "command": command_line(), "started": now(),
            "finished": None, "workers": workers, "protocol": protocol, "setups": setups,
            "teachers": {}, "runs": [], "summary": {}, "machine": {
                "cpus": os.cpu_count(), "torch": torch.__version__,
                "python": platform.python_version(), "platform": platform.platform(),
                "load_start": list(os.getloadavg()), "load_end": None, "load_mean": None},
            "total_seconds": 0.0}

    def add(self, entry: dict[str, Any], teacher: str | None = None) -> None:
        """A finished teacher (under its key) or run (noting the machine's load at its end)."""
        if teacher is not None:
            self.data["teachers"][teacher] = entry
        else:
            self.data["runs"].append(entry)
            self.loads.append(os.getloadavg()[0])

    def save(self, final: bool = False) -> None:
        """Update the totals and the summary and rewrite the JSON; ``final``: the page too."""
        data = self.data
        data["total_seconds"] = time.perf_counter() - self.started
        data["machine"]["load_mean"] = statistics.fmean(self.loads) if self.loads else None
        data["summary"] = {setting: summarise(data["runs"], setting, list(data["setups"]))
                           for setting in SECTIONS}
        if final:
            data["finished"], data["machine"]["load_end"] = now(), list(os.getloadavg())
        outputs = {self.path: json.dumps(data, indent=1) + "\n"}
        if final:
            outputs[self.page] = render_markdown(data)
        for target, text in outputs.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, text)


def setup(recipe: str, configs: Mapping[str, Any], teacher: str, note: str = "") -> dict[str, Any]:
    """A row as the report records it, from its run configs by setting: recipe, parameters,
    teacher, student, epochs per setting and notes (``note``, student options, step matching)."""
    config = next(iter(configs.values()))
    epochs = {setting: c.trainer.epochs for setting, c in configs.items()}
    notes = [note] * bool(note) + [f"student options `{json.dumps(config.student.options)}`"] * \
        bool(config.student.options)
    if "all" in epochs and epochs.get("few", epochs["all"]) != epochs["all"]:
        notes.append("step-matched in `few`")
    return {"recipe": recipe, "params": {k: v for k, v in config.recipe.items() if k != "name"},
            "teacher": teacher, "student": config.student.model_dump(), "epochs": epochs,
            "note": "; ".join(notes)}


def previous_seconds(path: Path) -> dict[str, float]:
    """The mean time/run of each row in an earlier report at ``path`` (none: empty)."""
    try:
        runs = json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return {}
    return {entry: statistics.fmean(r["seconds"] for r in runs if r["entry"] == entry)
            for entry in {r["entry"] for r in runs}}


def summarise(runs: Sequence[Mapping[str, Any]], setting: str,
              order: Sequence[str]) -> list[dict[str, Any]]:
    """One row per entry of ``setting``, in ``order``: its recipe and teacher, mean and std of
    every metric over its successful seeds, the number of seeds and the failures."""
    chosen = [run for run in runs if run["setting"] == setting]
    first = {run["entry"]: run for run in reversed(chosen)}
    rows = [{**row, "recipe": first[row["entry"]]["recipe"],
             "teacher": first[row["entry"]]["teacher"]}
            for row in summarise_runs(chosen, "entry", METRICS)]
    return sorted(rows, key=lambda r: order.index(r["entry"]) if r["entry"] in order
                  else len(order))


def verdict(accuracy: float | None, baseline: float | None) -> str:
    """``yes`` when the mean accuracy exceeds the baseline's mean, ``no`` when it does not
    (ties included), ``n/a`` when either is missing."""
    if accuracy is None or baseline is None:
        return "n/a"
    return "yes" if accuracy > baseline else "no"


def short_error(errors: Sequence[str], limit: int = 80) -> str:
    first = errors[0].splitlines()[0] if errors else "unknown error"
    return first if len(first) <= limit else first[:limit - 3] + "..."


def setting_cells(row: Mapping[str, Any], bases: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A row's accuracy, agreement, ECE, Δ vs ``ce`` and verdict against each baseline."""
    failed = f"failed: {short_error(row['errors'])}"
    if not row["ok"]:
        return [failed, "–", "–", "–", *["n/a"] * len(bases)]
    ce = bases.get(BASELINE, {}).get("accuracy")
    seeds = f" ({len(row['errors'])} of {row['seeds']} seeds {failed})" if row["errors"] else ""
    return [mean_std_text(row["accuracy"], row["accuracy_std"]) + seeds,
            mean_std_text(row["agreement"], row["agreement_std"]),
            mean_std_text(row["ece"], row["ece_std"]),
            "–" if row["entry"] == BASELINE or ce is None else
            f"{100 * (row['accuracy'] - ce):+.2f}",
            *["–" if row["entry"] == name else verdict(row["accuracy"], base["accuracy"])
              for name, base in bases.items()]]


def render_setting(rows: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table of one setting, with a verdict column for each baseline row present
    (the rows of the ``ce`` recipe)."""
    bases = {row["entry"]: row for row in rows if row["recipe"] == BASELINE}
    return markdown_grid(
        ["recipe", "teacher", "accuracy %", "agreement %", "ECE %", "Δ acc vs ce (pts)",
         *[f"beats {name}?" for name in bases], "time/run (s)"],
        [[f"`{row['entry']}`", row["teacher"], *setting_cells(row, bases),
          "–" if row["seconds"] is None else f"{row['seconds']:.1f}"] for row in rows])


PAGE = """\
# Leaderboard: kdistill recipes on MNIST-5k

Generated by `benchmarks/leaderboard.py` on {date}{smoke}.
Reproduce: `{command}`.

Data: `{data}`, {train:,} training images ({validation} more held out as the validation split, \
stratified and labelled in both settings, used only for end-of-epoch evaluation and \
`keep_best`), {test:,} test images for every figure below. Recipe parameters are read from \
`examples/<recipe>.yaml` (chosen on digits with 50 labels), not tuned here; see Setups below. \
Student: `{student[name]}` size `{student[size]}` ({student_params:,} parameters) for every \
recipe, {epochs} epochs, batch {batch_size}, AdamW lr {lr}, cosine schedule; seeds {seed_list} \
(student initialisation and data order; the teacher is the same). Mean ± standard deviation \
over seeds. Agreement is top-1 agreement with the shared CNN teacher for every row; ECE uses 15 \
bins. "Beats ce?" compares mean accuracies: "no" means the recipe's mean does not exceed the \
baseline's.

{tables}## Teachers

Each trained on all {labels:,} training labels (the validation images included) and cached. \
Test accuracy and ECE are computed with the labels hidden from the model's input (this matters \
for the oracle teacher only).

{teachers}

## Setups

{setups}

## Machine

{cpus} CPUs, {workers} worker processes with one torch thread each; torch {torch}, Python \
{python}. Load average (1, 5, 15 min) at the start: {start}; mean 1-minute load average at the \
end of each run: {during}. Total wall time {minutes:.1f} min for {runs} runs; time/run is the \
wall time of one run in its worker (data, teacher loading, training, test predictions), so it \
grows with the machine's load.
"""
SECTIONS = {"all": ("All labels", "all {train:,} training labels"),
            "few": ("Few labels ({few_labels})", (
                "{few_labels} labels (10 per class) + {unlabelled:,} unlabelled images; recipes "
                "that train on labelled samples only (`ce-steps`, and those marked step-matched "
                "below) get as many optimizer steps as the others, the plain `ce` the same "
                "number of epochs"))}


def render_tables(report: Mapping[str, Any]) -> str:
    """One section per setting that has results: title, what the student sees, the table."""
    meta = {**report["protocol"],
            "unlabelled": report["protocol"]["train"] - report["protocol"]["few_labels"]}
    return "".join(f"## {SECTIONS[setting][0].format(**meta)}\n\nThe student sees "
                   f"{SECTIONS[setting][1].format(**meta)}.\n\n{render_setting(rows)}\n\n"
                   for setting, rows in report["summary"].items() if rows)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The whole page from the JSON report."""
    meta, machine, load = report["protocol"], report["machine"], report["machine"]["load_mean"]
    teachers = [[t["name"], t["model"], t["recipe"], f"{t['params']:,}",
                 f"{100 * t['accuracy']:.2f}", f"{100 * t['ece']:.2f}",
                 "cached" if t["cached"] else f"{t['seconds']:.0f}"] if t["status"] == "ok" else
                [t["name"], "–", "–", "–", f"failed: {short_error([t['error']])}", "–", "–"]
                for t in report["teachers"].values()]
    setups = [[f"`{name}`", f"`{s['recipe']}`", s["teacher"],
               f"`{json.dumps(s['params'], separators=(', ', ': ')) if s['params'] else '–'}`",
               " / ".join(str(s["epochs"].get(setting, "–")) for setting in SECTIONS),
               s["note"]] for name, s in report["setups"].items()]
    return PAGE.format(
        date=report["finished"] or report["started"], command=report["command"],
        smoke=" (**quick smoke budget, not a real result**)" if meta["quick"] else "",
        seed_list=", ".join(map(str, meta["seeds"])), tables=render_tables(report),
        labels=meta["train"] + meta["validation"], teachers=markdown_grid(
            ["teacher", "model", "training recipe", "params", "accuracy %", "ECE %",
             "train time (s)"], teachers), setups=markdown_grid(
            ["row", "recipe", "teacher", "parameters", "epochs (all / few)", "notes"], setups),
        workers=report["workers"], runs=len(report["runs"]), minutes=report["total_seconds"] / 60,
        start=", ".join(f"{v:.2f}" for v in machine["load_start"]),
        during="–" if load is None else f"{load:.2f}", **meta, **machine)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/leaderboard.json")
    parser.add_argument("--output", type=Path, default=ROOT / "docs/leaderboard.md")
    args = parser.parse_args(argv)
    atomic_write_text(args.output, render_markdown(json.loads(args.json.read_text())))


if __name__ == "__main__":
    main()
