"""Mutation score per module from the last ``mutmut run`` (``make mutate``).

Reads mutmut's per-file results (``mutants/<source path>.meta``), prints a table of killed,
survived, timed-out and untested mutants per module with the score killed / (killed +
survived), lists the survivors (``mutmut show <name>`` gives each diff) and saves it all to
``benchmarks/results/mutation.json``. The mutants judged equivalent are discussed in
``docs/testing.md``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

from kdistill.checkpoint import atomic_write_text
from kdistill.report import markdown_grid

MUTANTS = Path("mutants")
OUTPUT = Path("benchmarks/results/mutation.json")
STATUSES = ("killed", "survived", "timeout", "no tests", "not checked")


def module_results() -> dict[str, dict[str, list[str]]]:
    """``{module path: {status: [mutant names]}}`` for every mutated file."""
    results: dict[str, dict[str, list[str]]] = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        module = str(meta.relative_to(MUTANTS))[:-len(".meta")]
        exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
        by_status: dict[str, list[str]] = {}
        for name, code in sorted(exit_codes.items()):
            by_status.setdefault(status_by_exit_code[code], []).append(name)
        if exit_codes:
            results[module] = by_status
    return results


def score(counts: Counter) -> float | None:
    """killed / (killed + survived); None before any mutant was decided."""
    decided = counts["killed"] + counts["survived"]
    return counts["killed"] / decided if decided else None


def main() -> None:
    results = module_results()
    if not results:
        raise SystemExit("no mutation results: run `make mutate` first")
    rows, summary = [], {}
    for module, by_status in results.items():
        counts = Counter({status: len(names) for status, names in by_status.items()})
        summary[module] = {"counts": dict(counts), "score": score(counts),
                           "survived": by_status.get("survived", [])}
        value = summary[module]["score"]
        rows.append([module, *(str(counts[s]) for s in STATUSES),
                     "–" if value is None else f"{100 * value:.1f}%"])
    print(markdown_grid(["module", *STATUSES, "score"], rows))
    for entry in summary.values():
        for name in entry["survived"]:
            print(f"survived: {name}")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUTPUT, json.dumps(summary, indent=1) + "\n")
    print(f"saved {OUTPUT}")


if __name__ == "__main__":
    main()
