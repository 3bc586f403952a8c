"""Mutation score per module from the last ``mutmut run`` (``make mutate``).

Reads mutmut's per-file results (``mutants/<source path>.meta``) and the mutants judged
equivalent (``benchmarks/mutation_equivalent.toml``: name -> why no input tells it apart from
the original), prints a table of killed, survived, equivalent, timed-out and untested mutants
per module with the score killed / (killed + survived - equivalent), lists the surviving
non-equivalent mutants (``mutmut show <name>`` gives each diff) and saves it all to
``benchmarks/results/mutation.json``. ``docs/testing.md`` discusses the results.
"""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

from kdistill.checkpoint import atomic_write_text
from kdistill.report import markdown_grid

MUTANTS = Path("mutants")
OUTPUT = Path("benchmarks/results/mutation.json")
EQUIVALENT = Path("benchmarks/mutation_equivalent.toml")
STATUSES = ("killed", "survived", "equivalent", "timeout", "no tests", "not checked")


def module_results(equivalent: set[str]) -> dict[str, dict[str, list[str]]]:
    """``{module path: {status: [mutant names]}}`` for every mutated file; a survivor listed
    in ``equivalent`` has the status ``equivalent``."""
    results: dict[str, dict[str, list[str]]] = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        module = str(meta.relative_to(MUTANTS))[:-len(".meta")]
        exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
        by_status: dict[str, list[str]] = {}
        for name, code in sorted(exit_codes.items()):
            status = status_by_exit_code[code]
            if status == "survived" and name in equivalent:
                status = "equivalent"
            by_status.setdefault(status, []).append(name)
        if exit_codes:
            results[module] = by_status
    return results


def score(counts: Counter) -> float | None:
    """killed / (killed + survived), equivalent mutants left out; None before any mutant was
    decided."""
    decided = counts["killed"] + counts["survived"]
    return counts["killed"] / decided if decided else None


def area_of(module: str) -> str:
    """The area a module belongs to: its package folder (``src/kdistill/losses/``), or the
    module itself for a top-level module."""
    parent = str(Path(module).parent)
    return f"{parent}/" if parent != "src/kdistill" else module


def row(name: str, counts: Counter) -> list[str]:
    value = score(counts)
    return [name, *(str(counts[s]) for s in STATUSES),
            "–" if value is None else f"{100 * value:.1f}%"]


def main() -> None:
    equivalent = set(tomllib.loads(EQUIVALENT.read_text())) if EQUIVALENT.is_file() else set()
    results = module_results(equivalent)
    if not results:
        raise SystemExit("no mutation results: run `make mutate` first")
    summary: dict[str, dict] = {}
    areas: dict[str, Counter] = {}
    for module, by_status in results.items():
        counts = Counter({status: len(names) for status, names in by_status.items()})
        summary[module] = {"counts": dict(counts), "score": score(counts),
                           "survived": by_status.get("survived", [])}
        areas.setdefault(area_of(module), Counter()).update(counts)
    print(markdown_grid(["module", *STATUSES, "score"],
                        [row(module, Counter(entry["counts"])) for module, entry in
                         summary.items()]))
    print(markdown_grid(["area", *STATUSES, "score"],
                        [row(area, counts) for area, counts in areas.items()]))
    for entry in summary.values():
        for name in entry["survived"]:
            print(f"survived: {name}")
    summary["areas"] = {area: {"counts": dict(c), "score": score(c)} for area, c in areas.items()}
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUTPUT, json.dumps(summary, indent=1) + "\n")
    print(f"saved {OUTPUT}")


if __name__ == "__main__":
    main()
