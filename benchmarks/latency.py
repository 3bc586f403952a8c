"""Latency and speed-up of the demo's teacher and student sizes, measured side by side.

Run on demand (never in CI): ``.venv/bin/python benchmarks/latency.py``. For each batch size and
thread count, the models are timed in alternating rounds in one call
(:func:`kdistill.evaluate.benchmark_models`), so the speed-ups are ratios measured together.
The machine's load average is recorded beside each figure. Results are printed and saved to
``benchmarks/results/latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from kdistill.checkpoint import atomic_write_text
from kdistill.data import load_dataset
from kdistill.evaluate import benchmark_models
from kdistill.models import build_model

MODELS = {"teacher cnn-small": ("cnn", "small"), "cnn-tiny": ("cnn", "tiny"),
          "mlp-small": ("mlp", "small"), "mlp-tiny (demo student)": ("mlp", "tiny")}


def measure(batch_sizes: list[int], threads: list[int], repeats: int) -> list[dict]:
    """One record per (batch size, thread count), each with every model's row."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    models = {name: build_model(kind, data.input_shape, data.num_classes, size=size)
              for name, (kind, size) in MODELS.items()}
    inputs = data.test.inputs
    records = []
    for size in batch_sizes:
        batch = {"input": inputs[torch.arange(size) % len(inputs)],
                 "labels": torch.zeros(size, dtype=torch.long)}
        for count in threads:
            rows = benchmark_models(models, [batch], reference="teacher cnn-small",
                                    latency_batch=batch, threads=count, repeats=repeats)
            records.append({
                "batch_size": size, "threads": count,
                "load_average": list(os.getloadavg()),
                "models": [{k: row[k] for k in ("name", "params", "latency_ms",
                                                "per_example_ms", "throughput", "speedup")}
                           for row in rows],
            })
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).parent / "results" / "latency.json")
    args = parser.parse_args()
    records = measure(args.batch_sizes, args.threads, args.repeats)
    result = {"torch": torch.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "records": records}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(result, indent=2))
    for record in records:
        print(f"batch {record['batch_size']}, {record['threads']} thread(s), load "
              f"{record['load_average'][0]:.2f}")
        for row in record["models"]:
            print(f"  {row['name']:<26} {row['params']:>7,} params  "
                  f"{row['latency_ms']:9.4f} ms/batch  {row['speedup']:7.1f}x")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
