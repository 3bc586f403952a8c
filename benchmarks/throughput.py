"""Training-step speed of knowledge distillation: student alone, hand loop, kdistill live, cached.

Run on demand (never in CI), on a quiet machine, from the repository root:
``PYTHONPATH=src .venv/bin/python benchmarks/throughput.py`` (``--quick`` for a smoke run).
torchdistill's row needs torchdistill installed apart, without its dependencies:
``.venv/bin/pip install --no-deps --target /work/td-site torchdistill==1.1.5``, then
``--torchdistill-site /work/td-site`` (``benchmarks/throughput_torchdistill.py`` says why a
torchvision import stub stands in for torchvision); without it the row is left out.

Three teacher/student pairs (random weights and inputs: speed does not depend on them):

* ``cnn``: kdistill's CNN, channels 64-128-256-336 (1.15M parameters) teaching channels
  16-32-64-64 (61k), 3x32x32 images, batch 128;
* ``mlp``: 784-1024-1024-10 teaching 784-64-10, batch 256;
* ``text``: a MiniLM-size BERT (6 layers, width 384, 12 heads, vocabulary 30,522: 22.7M
  parameters) teaching a 2-layer BERT of width 128 (4.4M, most of it the embedding table),
  64 tokens, batch 32, two classes.

Configurations, each training the same student with SGD (lr 0.01, momentum 0.9) for ``--steps``
steps:
``student_alone`` (a hand-written cross-entropy loop), ``hand_kd`` (the same loop plus the
teacher under ``torch.inference_mode`` and Hinton's loss with kdistill's defaults T=4,
alpha=0.9), kdistill's ``Distiller`` with the ``hinton`` recipe and a live teacher (``live``,
then ``live_bf16``: the teacher under bf16 autocast, and ``live_compile``: the teacher through
``torch.compile``) or a teacher cache built once beforehand (``cached_fp32``, ``cached_fp16``
and ``cached_topk``: the top 5 of the 10 classes plus the tail's mass; not on the 2-class text
pair), and ``torchdistill`` (its ``KDLoss`` in its ``DistillationBox`` loop, in a process of its
own each round, CNN and MLP pairs).

Each step's time is the gap between two consecutive starts of the student's training forward
(a forward pre-hook), so every configuration is timed the same way and everything a step does
is inside it: loading and collating the batch, reading the cache, the teacher, the student,
the loss, backward and the optimizer. The first ``--warmup`` steps of every run are dropped
(``live_compile`` compiles then). The configurations run in alternating rounds (``--rounds``,
the order rotated each round), one thread each; a configuration's figure is the median over
its rounds of each round's median step, and ratios are taken between figures of the same run.
The machine's load average is saved beside every round.

Also measured: each cache's build time and size per 1,000 samples (and a 32,000-class teacher:
dense logits against top-32 plus the tail), and the peak resident memory of cached training
at 1x and 10x the data (fresh processes). Results are printed and saved to
``benchmarks/results/throughput.json`` and into the results section of ``docs/performance.md``
(``--quick``: ``runs/throughput-quick.{json,md}``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pages import write_results
from streaming_memory import AnonPeak, Enough, status
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdistill import Distiller
from kdistill.cache import CachedTeacher, TeacherCache
from kdistill.checkpoint import atomic_write_text
from kdistill.data.base import ArrayDataset
from kdistill.models.cnn import CNN
from kdistill.report import markdown_grid
from kdistill.teachers import FrozenTeacher

OUTPUT = Path(__file__).parent / "results" / "throughput.json"
PAGE = Path(__file__).parent.parent / "docs" / "performance.md"
TEMPERATURE, ALPHA = 4.0, 0.9  # kdistill's hinton defaults
LR, MOMENTUM = 0.01, 0.9  # SGD, as kdistill's optimizer "sgd" (no scheduler)
TOP_K = 5
LARGE_VOCABULARY = 32_000


# --------------------------------------------------------------------------- the pairs


class TokenDataset(Dataset):
    """Pre-tokenised text: item i is ``{"input_ids", "attention_mask", "labels", "index"}``."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i], "index": torch.tensor(i)}


@dataclass
class Pair:
    """A teacher, a student factory and the training set (``size`` samples)."""

    name: str
    teacher: nn.Module
    make_student: Callable[[], nn.Module]
    batch: int
    data: Callable[[int], Dataset]

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "input_ids" in batch:
            return model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
        return model(batch["input"])


def bert(width: int, layers: int, heads: int, seed: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30_522, hidden_size=width, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * width, num_labels=2,
                        max_position_embeddings=512)
    return BertForSequenceClassification(config).eval()


def mlp(*widths: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def images(shape: tuple[int, ...], classes: int) -> Callable[[int], Dataset]:
    def make(size: int) -> Dataset:
        g = torch.Generator().manual_seed(size)
        return ArrayDataset(torch.randn(size, *shape, generator=g),
                            torch.randint(0, classes, (size,), generator=g))
    return make


def tokens(size: int) -> Dataset:
    g = torch.Generator().manual_seed(size)
    return TokenDataset(torch.randint(1, 30_522, (size, 64), generator=g),
                        torch.randint(0, 2, (size,), generator=g))


def seeded(factory: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(seed)
        return factory()
    return make


def cnn_pair() -> Pair:
    torch.manual_seed(0)
    return Pair("cnn", CNN((3, 32, 32), 10, [64, 128, 256, 336]),
                seeded(lambda: CNN((3, 32, 32), 10, [16, 32, 64, 64]), 1), 128,
                images((3, 32, 32), 10))


def mlp_pair() -> Pair:
    torch.manual_seed(0)
    return Pair("mlp", mlp(784, 1024, 1024, 10), seeded(lambda: mlp(784, 64, 10), 1), 256,
                images((784,), 10))


def text_pair() -> Pair:
    return Pair("text", bert(384, 6, 12, 0), lambda: bert(128, 2, 2, 1).train(), 32, tokens)


PAIRS: dict[str, Callable[[], Pair]] = {"cnn": cnn_pair, "mlp": mlp_pair, "text": text_pair}


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- timing


class StepClock:
    """Times each training step: the gaps between consecutive starts of the student's forward
    with gradients on (evaluation forwards do not count)."""

    def __init__(self, student: nn.Module):
        self.starts: list[float] = []
        self.handle = student.register_forward_pre_hook(self._tick)

    def _tick(self, _module: nn.Module, _inputs: object) -> None:
        if torch.is_grad_enabled():
            self.starts.append(time.perf_counter())

    def steps(self, warmup: int) -> list[float]:
        self.handle.remove()
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]
        return gaps[warmup:]


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    """(1 - alpha) CE + alpha T^2 KL(p_t^T || p_s^T), as a hand loop writes it."""
    kd = F.kl_div(F.log_softmax(student_logits / TEMPERATURE, -1),
                  F.log_softmax(teacher_logits / TEMPERATURE, -1), reduction="batchmean",
                  log_target=True)
    return (1 - ALPHA) * F.cross_entropy(student_logits, labels) + ALPHA * TEMPERATURE ** 2 * kd


def hand_loop(pair: Pair, student: nn.Module, data: Dataset, with_teacher: bool) -> None:
    """The loop a user writes: a shuffling DataLoader, the teacher (if any) under
    ``torch.inference_mode``, the loss, backward, SGD."""
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM)
    teacher = pair.teacher.eval()
    student.train()
    for batch in DataLoader(data, batch_size=pair.batch, shuffle=True):
        logits = pair.logits(student, batch)
        if with_teacher:
            with torch.inference_mode():
                answers = pair.logits(teacher, batch)
            loss = hinton_loss(logits, answers.clone(), batch["labels"])
        else:
            loss = F.cross_entropy(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def distil(pair: Pair, student: nn.Module, data: Dataset, teacher: Any) -> None:
    Distiller(student, teacher, "hinton", epochs=1, batch_size=pair.batch, progress=False,
              optimizer={"name": "sgd", "lr": LR}).fit(data)


def caches(pair: Pair, data: Dataset, folder: Path) -> dict[str, TeacherCache]:
    """The pair's caches over ``data``, built now (the first build of each is timed)."""
    formats = {"fp32": {}, "fp16": {"dtype": "fp16"}}
    if pair.name != "text":
        formats["topk"] = {"top_k": TOP_K, "dtype": "fp16"}
    return {name: TeacherCache.build(pair.teacher, data, ["logits"], folder / name,
                                     batch_size=pair.batch, progress=False, **options)
            for name, options in formats.items()}


def timed(pair: Pair, train: Callable[[nn.Module, Dataset], None], data: Dataset,
          warmup: int) -> Callable[[], float]:
    """A configuration: train a fresh student on ``data``; the median step after ``warmup``."""
    def run() -> float:
        student = pair.make_student()
        clock = StepClock(student)
        train(student, data)
        return statistics.median(clock.steps(warmup))
    return run


def configurations(pair: Pair, built: dict[str, TeacherCache], data: Dataset,
                   args: argparse.Namespace) -> dict[str, Callable[[], float]]:
    """Each configuration: a function training one student, returning its median step."""
    live_bf16 = FrozenTeacher(pair.teacher, "bf16")
    live_compiled = FrozenTeacher(copy.deepcopy(pair.teacher), compile=True)  # compiled in place
    trainers: dict[str, Callable[[nn.Module, Dataset], None]] = {
        "student_alone": lambda s, d: hand_loop(pair, s, d, with_teacher=False),
        "hand_kd": lambda s, d: hand_loop(pair, s, d, with_teacher=True),
        "live": lambda s, d: distil(pair, s, d, pair.teacher),
        "live_bf16": lambda s, d: distil(pair, s, d, live_bf16),
        "live_compile": lambda s, d: distil(pair, s, d, live_compiled),
    }
    for name, cache in built.items():
        trainers[f"cached_{name}"] = lambda s, d, c=cache: distil(pair, s, d, CachedTeacher(c))
    runs = {name: timed(pair, train, data, args.warmup) for name, train in trainers.items()}
    if args.torchdistill_site and pair.name != "text":
        runs["torchdistill"] = lambda: torchdistill_round(args, pair.name)
    return runs


def rotated(names: list[str], round_: int) -> Iterator[str]:
    shift = round_ % len(names)
    yield from names[shift:] + names[:shift]


def time_pair(pair: Pair, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Every configuration of ``pair`` in alternating rounds; figures and ratios."""
    data = pair.data((args.warmup + args.steps + 1) * pair.batch)
    started = time.perf_counter()
    built = caches(pair, data, folder / pair.name)
    build = {name: {"seconds": cache.build_seconds, "bytes": cache.nbytes,
                    "bytes_per_1k_samples": cache.nbytes * 1000 / cache.rows}
             for name, cache in built.items()}
    print(f"{pair.name}: caches built in {time.perf_counter() - started:.1f} s: {build}",
          flush=True)
    runs = configurations(pair, built, data, args)
    rounds: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        record: dict[str, Any] = {"load_average": list(os.getloadavg()), "median_step_s": {}}
        for name in rotated(list(runs), round_):
            record["median_step_s"][name] = runs[name]()
        record["load_average_end"] = list(os.getloadavg())
        rounds.append(record)
        print(f"{pair.name} round {round_}: " + ", ".join(
            f"{k} {v * 1e3:.2f} ms" for k, v in record["median_step_s"].items()), flush=True)
    figures = {name: statistics.median(r["median_step_s"][name] for r in rounds)
               for name in runs}
    ratios = {"over_student_alone": {name: seconds / figures["student_alone"]
                                     for name, seconds in figures.items()},
              "live_over_hand_kd": figures["live"] / figures["hand_kd"]}
    if "torchdistill" in figures:
        ratios["cached_fp32_speedup_over_torchdistill"] = \
            figures["torchdistill"] / figures["cached_fp32"]
    return {"batch": pair.batch, "teacher_params": parameters(pair.teacher),
            "student_params": parameters(pair.make_student()), "cache_build": build,
            "median_step_s": figures,
            "steps_per_s": {name: 1 / seconds for name, seconds in figures.items()},
            **ratios, "rounds": rounds}


def torchdistill_round(args: argparse.Namespace, pair: str) -> float:
    """One round of torchdistill's loop (``benchmarks/throughput_torchdistill.py``, a fresh
    process with torchdistill from ``--torchdistill-site``); its median step."""
    src = Path(__file__).resolve().parent.parent / "src"
    command = [sys.executable, str(Path(__file__).with_name("throughput_torchdistill.py")),
               pair, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": f"{args.torchdistill_site}:{src}"})
    if done.returncode:
        raise RuntimeError(f"torchdistill on {pair} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["median_step_s"]


# --------------------------------------------------------------------------- size and memory


def large_vocabulary_sizes(folder: Path, samples: int = 1000) -> dict[str, Any]:
    """Bytes per 1,000 samples of a 32,000-class teacher's logits: dense fp32 / fp16 against
    the top 32 plus the tail's mass."""
    torch.manual_seed(0)
    teacher = nn.Linear(16, LARGE_VOCABULARY)
    data = ArrayDataset(torch.randn(samples, 16), torch.zeros(samples, dtype=torch.long))
    sizes = {}
    for name, options in {"dense_fp32": {}, "dense_fp16": {"dtype": "fp16"},
                          "top32_fp16": {"top_k": 32, "dtype": "fp16"},
                          "top32_fp32": {"top_k": 32}}.items():
        cache = TeacherCache.build(teacher, data, ["logits"], folder / f"vocab-{name}",
                                   batch_size=250, progress=False, **options)
        sizes[name] = cache.nbytes * 1000 / samples
    sizes["dense_fp32_over_top32_fp16"] = sizes["dense_fp32"] / sizes["top32_fp16"]
    sizes["dense_fp32_over_top32_fp32"] = sizes["dense_fp32"] / sizes["top32_fp32"]
    return {"classes": LARGE_VOCABULARY, "bytes_per_1k_samples": sizes}


def cached_training_memory(samples: int, steps: int) -> dict[str, Any]:
    """Build a dense cache for the MLP pair over ``samples`` samples, then train ``steps``
    cached steps on all of them (shuffled); the process's peak memory (run in a fresh
    process)."""
    torch.set_num_threads(1)
    pair = mlp_pair()
    data = pair.data(samples)
    student = pair.make_student()
    forwards = [0]

    def stop_after(_module: nn.Module, _inputs: object) -> None:
        forwards[0] += torch.is_grad_enabled()
        if forwards[0] > steps:
            raise Enough

    student.register_forward_pre_hook(stop_after)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        cache = TeacherCache.build(pair.teacher, data, ["logits"], Path(folder) / "c",
                                   batch_size=pair.batch, progress=False)
        build_seconds = time.perf_counter() - started
        with AnonPeak() as anon, contextlib.suppress(Enough):
            distil(pair, student, data, CachedTeacher(cache))
        memory = status()
    return {"samples": samples, "steps": steps, "cache_bytes": cache.nbytes,
            "build_seconds": build_seconds, "peak_rss_mb": memory["VmHWM"],
            "peak_anon_mb": anon.peak,
            "rss_anon_mb_end": memory["RssAnon"], "rss_file_mb_end": memory["RssFile"],
            "load_average": list(os.getloadavg())}


def memory_at(samples: int, steps: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--memory-child", str(samples), str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory run on {samples} samples failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the page


def load_text(rounds: list[dict[str, Any]]) -> str:
    """The range of the 1-minute load average over the rounds."""
    loads = [r["load_average"][0] for r in rounds] + [r["load_average_end"][0] for r in rounds]
    return f"{min(loads):.2f}-{max(loads):.2f}"


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    """The issue's targets, each with the figure measured and whether it is met."""
    rows = []

    def row(what: str, value: float, goal: str, met: bool) -> None:
        rows.append([what, f"{value:.2f}x", goal, "met" if met else "**not met**"])

    for name in ("cnn", "mlp"):
        if name in results["pairs"]:
            figures = results["pairs"][name]
            cached = figures["over_student_alone"]["cached_fp32"]
            row(f"{name}: cached (fp32) step / student-alone step", cached, "<= 1.10x",
                cached <= 1.10)
            if "cached_fp32_speedup_over_torchdistill" in figures:
                speedup = figures["cached_fp32_speedup_over_torchdistill"]
                row(f"{name}: cached steps/s / torchdistill steps/s", speedup, ">= 3x",
                    speedup >= 3)
    for name, figures in results["pairs"].items():
        live = figures["live_over_hand_kd"]
        row(f"{name}: kdistill live step / hand KD step", live, "<= 1.05x", live <= 1.05)
    sizes = results["large_vocabulary"]["bytes_per_1k_samples"]
    row("32,000 classes: dense fp32 / top-32 (fp16) + tail", sizes["dense_fp32_over_top32_fp16"],
        ">= 20x", sizes["dense_fp32_over_top32_fp16"] >= 20)
    return rows


def report(results: dict[str, Any]) -> str:
    """The results section of ``docs/performance.md``."""
    parts = [f"Command: `{results['command']}` (torch {results['torch']}, {results['cpus']} "
             f"CPUs, one thread; {results['rounds']} rounds of {results['steps']} timed steps "
             f"after {results['warmup']} warm-up steps; {results['seconds'] / 60:.0f} min).\n"]
    parts.append(markdown_grid(["target", "measured", "goal", ""], target_rows(results)))
    for name, figures in results["pairs"].items():
        rows = [[config, f"{seconds * 1e3:.2f}", f"{1 / seconds:.2f}",
                 f"{figures['over_student_alone'][config]:.2f}x"]
                for config, seconds in figures["median_step_s"].items()]
        parts.append(f"**{name}** (teacher {figures['teacher_params']:,} parameters, student "
                     f"{figures['student_params']:,}, batch {figures['batch']}; load average "
                     f"{load_text(figures['rounds'])} during the rounds)\n\n"
                     + markdown_grid(["configuration", "ms / step", "steps / s",
                                      "of student alone"], rows))
    build_rows = [[name, fmt, f"{b['seconds']:.2f}", f"{b['bytes_per_1k_samples'] / 1e3:.1f}"]
                  for name, figures in results["pairs"].items()
                  for fmt, b in figures["cache_build"].items()]
    parts.append("Cache builds (over each pair's timing set):\n\n" + markdown_grid(
        ["pair", "format", "build s", "kB per 1k samples"], build_rows))
    sizes = results["large_vocabulary"]["bytes_per_1k_samples"]
    parts.append("A 32,000-class teacher's logits, per 1,000 samples: " + ", ".join(
        f"{name} {sizes[name] / 1e6:.2f} MB" for name in
        ("dense_fp32", "dense_fp16", "top32_fp32", "top32_fp16")) + ".")
    memory_rows = [[f"{m['samples']:,}", f"{m['cache_bytes'] / 1e6:.1f}",
                    f"{m['build_seconds']:.1f}", f"{m['peak_rss_mb']:.0f}",
                    f"{m['peak_anon_mb']:.0f}", f"{m['load_average'][0]:.2f}"]
                   for m in results["cached_memory"]]
    parts.append(f"Cached training of the MLP pair, {results['cached_memory'][0]['steps']} steps "
                 "over 1x and 10x the samples (a fresh process each):\n\n" + markdown_grid(
                     ["samples", "cache MB", "build s", "peak RSS MB", "peak anonymous MB",
                      "load"], memory_rows))
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (figures meaningless)")
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-samples", type=int, default=20_000)
    parser.add_argument("--torchdistill-site", metavar="FOLDER",
                        help="a folder holding torchdistill 1.1.5 (pip install --target)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(cached_training_memory(*args.memory_child)))
        return
    if args.quick:
        args.steps, args.warmup, args.rounds, args.memory_samples = 3, 1, 1, 2_000
        args.output = Path("runs") / "throughput-quick.json"
    torch.set_num_threads(1)
    started, load_at_start = time.perf_counter(), list(os.getloadavg())
    results: dict[str, Any] = {"pairs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.pairs:
            results["pairs"][name] = time_pair(PAIRS[name](), args, Path(scratch))
        results["large_vocabulary"] = large_vocabulary_sizes(Path(scratch))
    memory_steps = 50 if not args.quick else 3
    results["cached_memory"] = [memory_at(n, memory_steps) for n in
                                (args.memory_samples, 10 * args.memory_samples)]
    results.update({
        "command": " ".join(["PYTHONPATH=src .venv/bin/python benchmarks/throughput.py",
                             *sys.argv[1:]]),
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "threads": 1, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg()),
        "seconds": time.perf_counter() - started})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(results, indent=2))
    write_results(args.output.with_suffix(".md") if args.quick else PAGE, report(results),
                  Path(__file__).name)
    for name, figures in results["pairs"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in
                                      figures["over_student_alone"].items()))
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
