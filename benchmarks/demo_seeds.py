"""The demo over several seeds: how much its figures move with the seed.

Run on demand (never in CI)::

    .venv/bin/python benchmarks/demo_seeds.py                 # seeds 0-4, about 4 minutes

Each seed is a whole ``kdistill demo`` (teacher and students initialised and shuffled from that
seed; the teacher is cached per seed). Prints and saves ``benchmarks/results/demo_seeds.json``:
every seed's accuracy, ECE and agreement per model, their mean and sample standard deviation,
and the CPU kernels torch used (results differ between processors with different vector
instruction sets, see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from kdistill.checkpoint import atomic_write_text
from kdistill.demo import DemoOptions, run_demo
from kdistill.report import markdown_grid, mean_std_text, summarise_runs

METRICS = ("accuracy", "ece", "agreement")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--json", default="benchmarks/results/demo_seeds.json")
    args = parser.parse_args()
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as output:
        for seed in args.seeds:
            outcome = run_demo(DemoOptions(seed=seed, output=output, progress=False))
            runs += [{"seed": seed, "model": row["name"], "status": "ok",
                      **{m: row[m] for m in METRICS}}
                     for row in outcome.rows]
            print(f"seed {seed}: " + ", ".join(f"{r['name']} {100 * r['accuracy']:.2f}%"
                                              for r in outcome.rows), flush=True)
    summary = summarise_runs(runs, "model", METRICS)
    print(markdown_grid(["model", *(f"{m} (mean ± std, %)" for m in METRICS)],
                        [[row["model"], *(mean_std_text(row[m], row[f"{m}_std"])
                                          for m in METRICS)] for row in summary]))
    seeds = " ".join(map(str, args.seeds))
    result = {"command": f"python benchmarks/demo_seeds.py --seeds {seeds}",
              "seeds": args.seeds, "runs": runs, "summary": summary,
              "seconds": time.perf_counter() - start,
              "machine": {"processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__,
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "load_average_after": os.getloadavg()}}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
