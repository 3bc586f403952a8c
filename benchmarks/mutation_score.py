"""Mutation score per module from the last ``mutmut run`` (``make mutate``).

Reads mutmut's per-file results (``mutants/<source path>.meta``) and the mutants judged
equivalent (``benchmarks/mutation_equivalent.toml``: name -> why no input tells it apart from
the original), prints a table of killed, survived, equivalent, timed-out and untested mutants
per module with the score killed / (killed + survived - equivalent), lists the surviving
non-equivalent mutants (``mutmut show <name>`` gives each diff) and saves it all to
``benchmarks/results/mutation.json``. ``docs/testing.md`` discusses the results.

``--sample FILE`` (one mutant name a line) estimates the score of an area too large to run in
full: the file lists mutants drawn uniformly at random (seeded) from the area's mutants not
checked when it was drawn, and only those were run since. The area's estimate adds the sample's
kill rate among its decided, non-equivalent mutants, applied to the whole drawn-from
population, to the mutants checked in full; the 95% interval is the Wilson interval of the
sample's rate carried through the same sum.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code
from scipy.stats import binomtest

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


def sampled_estimate(results: dict[str, dict[str, list[str]]], sample: list[str],
                     population: int) -> dict[str, float | int]:
    """The score of the checked mutants plus a sample of ``population`` unchecked ones (see
    the module docstring): the estimate and its 95% interval."""
    status = {name: s for by_status in results.values() for s, names in by_status.items()
              for name in names}
    drawn = Counter(status.get(name, "not checked") for name in sample)
    run = len(sample) - drawn["not checked"]
    kills, decided = drawn["killed"] + drawn["timeout"], drawn["killed"] + drawn["timeout"] + \
        drawn["survived"]
    if not decided:
        raise SystemExit("none of the sampled mutants has been run yet")
    checked = Counter(s for name, s in status.items() if name not in sample
                      and s != "not checked")
    base_kills = checked["killed"] + checked["timeout"]
    base_decided = base_kills + checked["survived"]
    share = decided / run  # of the population: decided, non-equivalent
    interval = binomtest(kills, decided).proportion_ci(method="wilson")

    def total(rate: float) -> float:
        return (base_kills + population * share * rate) / (base_decided + population * share)

    return {"sampled": len(sample), "run": run, "killed": kills, "decided": decided,
            "population": population, "estimate": total(kills / decided),
            "low": total(interval.low), "high": total(interval.high)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, help="mutants drawn at random, one a line")
    parser.add_argument("--population", type=int,
                        help="how many unchecked mutants the sample was drawn from")
    parser.add_argument("--area", nargs="+",
                        default=["src/kdistill/engine/", "src/kdistill/data/base.py"],
                        help="the modules whose score the sample estimates (path prefixes)")
    args = parser.parse_args()
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
    if args.sample is not None:
        if args.population is None:
            parser.error("--sample needs --population")
        sample = args.sample.read_text().split()
        covered = {m: r for m, r in results.items() if m.startswith(tuple(args.area))}
        estimate = sampled_estimate(covered, sample, args.population)
        summary["sampled_estimate"] = {"area": args.area, **estimate}
        print(f"{' + '.join(args.area)}: {estimate['killed']} of {estimate['decided']} sampled "
              f"mutants killed ({estimate['run']} of {estimate['sampled']} run); estimated score "
              f"{100 * estimate['estimate']:.1f}% (95% interval {100 * estimate['low']:.1f}-"
              f"{100 * estimate['high']:.1f}%)")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUTPUT, json.dumps(summary, indent=1) + "\n")
    print(f"saved {OUTPUT}")


if __name__ == "__main__":
    main()
