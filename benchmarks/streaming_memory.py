"""Peak memory of training as the training set grows 10x: the engine does not materialise it.

Run on demand (never in CI), from the repository root:
``PYTHONPATH=src .venv/bin/python benchmarks/streaming_memory.py``.

It writes N and 10N samples (``--features`` float32 features and an int64 label each) as
numpy files on disk, then trains a tiny MLP student with a tiny MLP teacher (``hinton``)
through the engine for ``--steps`` optimizer steps of ``--batch`` samples on each, every run in
a fresh process (no workers: every sample is loaded in the measured process), handing the data
over in three ways:

* ``stream``: an ``IterableDataset`` reading the memory-mapped file in order, a row at a time,
  through the engine's shuffle buffer (``--buffer`` samples);
* ``memmap``: a map-style data set over the memory-mapped file, a row per ``__getitem__``,
  shuffled in full each epoch (the engine holds one permutation of the indices: 8 bytes a
  sample);
* ``in_memory`` (the control): the same files loaded into tensors first (``ArrayDataset``):
  it shows that the measurement sees a training set held in memory.

Each run first trains one step on 64 in-memory samples (a warm-up: the engine's first fit imports
its lazy dependencies, whose allocations would otherwise dominate the traced ones), then
records its peak resident memory (``VmHWM``), the peak of its anonymous memory
(``RssAnon``, sampled every 2 ms by a thread, and at the end: the memory the process itself
allocates), the peak of Python allocations traced by ``tracemalloc`` (numpy's included, torch's
tensor storage not), and the file-backed resident memory at the end (``RssFile``: pages of the
memory-mapped files, which are the kernel's page cache, shared and dropped under pressure; a
random read of a small file maps all of it, so ``VmHWM`` of ``memmap`` grows with the file
while its anonymous memory stays flat). The load average is recorded beside each run. Results
are printed and saved to ``benchmarks/results/streaming_memory.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from kdistill import Distiller
from kdistill.checkpoint import atomic_write_text
from kdistill.data.base import ArrayDataset

KINDS = ("stream", "memmap", "in_memory")
CLASSES = 10
CHUNK = 50_000  # rows generated at a time
MB = 2**20


# --------------------------------------------------------------------------- data


def write_data(folder: Path, rows: int, features: int, seed: int) -> None:
    """``inputs.npy`` [rows, features] float32 and ``labels.npy`` [rows] int64, written a chunk
    at a time (the generator never holds the data set either)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inputs = np.lib.format.open_memmap(folder / "inputs.npy", mode="w+", dtype=np.float32,
                                       shape=(rows, features))
    labels = np.lib.format.open_memmap(folder / "labels.npy", mode="w+", dtype=np.int64,
                                       shape=(rows,))
    for start in range(0, rows, CHUNK):
        stop = min(rows, start + CHUNK)
        inputs[start:stop] = rng.standard_normal((stop - start, features), dtype=np.float32)
        labels[start:stop] = rng.integers(0, CLASSES, stop - start)
    inputs.flush()
    labels.flush()
    del inputs, labels


class MemmapStream(IterableDataset):
    """The rows of ``folder``'s files in order, each copied out of the memory map."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __len__(self) -> int:
        return len(np.load(self.folder / "labels.npy", mmap_mode="r"))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        inputs = np.load(self.folder / "inputs.npy", mmap_mode="r")
        labels = np.load(self.folder / "labels.npy", mmap_mode="r")
        for i in range(len(labels)):
            yield {"input": torch.from_numpy(np.array(inputs[i])),
                   "labels": torch.tensor(int(labels[i]))}


class MemmapDataset(Dataset):
    """Row ``i`` of ``folder``'s files, copied out of the memory map when asked for."""

    def __init__(self, folder: Path):
        self.inputs = np.load(folder / "inputs.npy", mmap_mode="r")
        self.labels = np.load(folder / "labels.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": torch.from_numpy(np.array(self.inputs[i])),
                "labels": torch.tensor(int(self.labels[i]))}


def training_set(kind: str, folder: Path) -> Dataset:
    if kind == "stream":
        return MemmapStream(folder)
    if kind == "memmap":
        return MemmapDataset(folder)
    return ArrayDataset(torch.from_numpy(np.load(folder / "inputs.npy")),
                        torch.from_numpy(np.load(folder / "labels.npy")))


# --------------------------------------------------------------------------- memory


def status() -> dict[str, float]:
    """``VmHWM``, ``VmRSS``, ``RssAnon`` and ``RssFile`` of this process, in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024  # kB
    return fields


class AnonPeak:
    """The highest ``RssAnon`` seen by a thread sampling it every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, status()["RssAnon"]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, status()["RssAnon"])

    def __enter__(self) -> AnonPeak:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, status()["RssAnon"])


# --------------------------------------------------------------------------- one run


class Enough(Exception):
    """Raised by the student's forward once the steps asked for are done."""


def models(features: int) -> tuple[nn.Module, nn.Module]:
    """(student, teacher): tiny MLPs, seeded."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    student = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    return student, teacher


def train(kind: str, folder: Path, steps: int, batch: int, buffer: int) -> dict[str, Any]:
    """Train for ``steps`` steps on ``folder``'s data handed over as ``kind``; the figures."""
    torch.set_num_threads(1)
    features = int(np.load(folder / "inputs.npy", mmap_mode="r").shape[1])
    warm = ArrayDataset(torch.randn(64, features), torch.randint(0, CLASSES, (64,)))
    Distiller(*models(features), "hinton", epochs=1, batch_size=64, progress=False).fit(warm)
    student, teacher = models(features)
    forwards = [0]

    def stop_after(_module: nn.Module, _inputs: object) -> None:
        if torch.is_grad_enabled():
            forwards[0] += 1
            if forwards[0] > steps:
                raise Enough

    student.register_forward_pre_hook(stop_after)
    before = status()
    tracemalloc.start()
    started = time.perf_counter()
    with AnonPeak() as anon:
        data = training_set(kind, folder)
        with contextlib.suppress(Enough):
            Distiller(student, teacher, "hinton", epochs=1, batch_size=batch, progress=False,
                      shuffle_buffer=buffer if kind == "stream" else 0).fit(data)
    seconds = time.perf_counter() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after = status()
    if forwards[0] <= steps:
        raise RuntimeError(f"{kind}: only {forwards[0]} steps trained, {steps} asked")
    return {"kind": kind, "samples": len(np.load(folder / "labels.npy", mmap_mode="r")),
            "steps": steps, "seconds": seconds, "load_average": list(os.getloadavg()),
            "peak_rss_mb": after["VmHWM"], "peak_anon_mb": anon.peak,
            "tracemalloc_peak_mb": traced_peak / MB, "rss_file_mb_end": after["RssFile"],
            "anon_mb_before": before["RssAnon"]}


def run_child(kind: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`train` in a fresh Python process (its own peak), its record."""
    command = [sys.executable, __file__, "--child", kind, str(folder), "--steps",
               str(args.steps), "--batch", str(args.batch), "--buffer", str(args.buffer)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind} on {folder} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def summary(records: list[dict[str, Any]], small: int) -> dict[str, dict[str, float]]:
    """Per kind and figure: the 10N value over the N value."""
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        pair = {r["samples"]: r for r in records if r["kind"] == kind}
        one, ten = pair[small], pair[10 * small]
        out[kind] = {f"{key}_ratio": ten[key] / one[key] for key in
                     ("peak_rss_mb", "peak_anon_mb", "tracemalloc_peak_mb")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000, help="N (10N is the other set)")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--buffer", type=int, default=1024, help="the stream's shuffle buffer")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where to write the data (default: a temporary folder)")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).parent / "results" / "streaming_memory.json")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder = args.child
        print(json.dumps(train(kind, Path(folder), args.steps, args.batch, args.buffer)))
        return

    started, load_at_start = time.perf_counter(), list(os.getloadavg())
    with tempfile.TemporaryDirectory(dir=args.folder) as scratch:
        folders = {rows: Path(scratch) / f"rows-{rows}"
                   for rows in (args.samples, 10 * args.samples)}
        for rows, folder in folders.items():
            write_data(folder, rows, args.features, seed=rows)
        records = []
        for kind in KINDS:
            for rows, folder in folders.items():
                record = run_child(kind, folder, args)
                records.append(record)
                print(f"{kind:<9} {rows:>8,} samples: peak RSS {record['peak_rss_mb']:7.1f} MB, "
                      f"peak anon {record['peak_anon_mb']:7.1f} MB, tracemalloc peak "
                      f"{record['tracemalloc_peak_mb']:7.2f} MB, file pages at the end "
                      f"{record['rss_file_mb_end']:6.1f} MB ({record['seconds']:.1f} s, load "
                      f"{record['load_average'][0]:.2f})", flush=True)
    ratios = summary(records, args.samples)
    result = {
        "command": " ".join(["PYTHONPATH=src .venv/bin/python benchmarks/streaming_memory.py",
                             *sys.argv[1:]]),
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg()),
        "seconds": time.perf_counter() - started,
        "settings": {"samples": [args.samples, 10 * args.samples], "features": args.features,
                     "bytes_per_sample": 4 * args.features + 8, "steps": args.steps,
                     "batch": args.batch, "shuffle_buffer": args.buffer, "workers": 0,
                     "recipe": "hinton"},
        "ratios_10n_over_n": ratios,
        "within_10_percent": {kind: {key[:-6]: value <= 1.10 for key, value in figures.items()}
                              for kind, figures in ratios.items()},
        "records": records}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(result, indent=2))
    for kind, figures in ratios.items():
        print(f"{kind:<9} 10N / N: " + ", ".join(f"{k[:-6]} {v:.3f}" for k, v in figures.items()))
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
