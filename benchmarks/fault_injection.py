"""Fault injection: ``kill -9`` at random points of training and checkpointing.

Run on demand: ``.venv/bin/python benchmarks/fault_injection.py --kills 20 --seed 0`` (about a
minute or two); the CI test ``tests/integration/test_fault_injection.py`` runs a sample of 4.
Results go to ``benchmarks/results/fault_injection.json``.

A tiny two-phase run (FitNets on digits, a dropout MLP student, 2 epochs of 22 steps,
checkpoints every 4 steps and at each epoch's end, the newest 2 kept) is run once to the end by
``kdistill run``: the reference. Every *event* of a run is counted: each optimizer step,
metrics-log line, file written (``safetensors`` or text), rename and removal. A kill runs the
same config in a forked process that sends itself SIGKILL just before the chosen event, then
``kdistill run --resume`` until the run is done (in every other case the first resume is killed
too, at a random event among its first 60: its tidying, its records and its first steps). A
run killed before its first checkpoint cannot resume; it is started again with
``--overwrite``. Points are drawn from the events between the first optimizer step and the
final student's rename, one from each kind of event first (a checkpoint rename, the rename of a
re-saved step while its earlier version is moved aside, a checkpoint file, a step, a removal, a
log line, the ``latest`` pointer, the final student), then at random.

After every kill: each checkpoint folder a resume could read is intact, the newest is the
newest one committed before the kill (nothing earlier is lost) and the metrics log holds at
least its history. After the last resume: the student, the metrics log and the kept
checkpoints (every file's SHA-256) equal the reference's exactly, and no temporary file or
folder is left anywhere in or beside the run folder.

Children are forked from this process (torch is imported once), write their output to a log
file, die with their parent (``PR_SET_PDEATHSIG``) and are killed on a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

import kdistill.checkpoint as checkpoint_module
import kdistill.engine.step as step_module
import kdistill.metrics_log as metrics_module
import kdistill.report  # noqa: F401  (imported before forking, so children start fast)
from kdistill.checkpoint import (
    MANIFEST,
    DamagedCheckpoint,
    checkpoint_folders,
    load_newest,
    verify_checkpoint,
)
from kdistill.cli import main as kdistill_main
from kdistill.metrics_log import read_metrics
from kdistill.models import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "fault_injection.json"
CATEGORIES = ("checkpoint rename", "checkpoint re-save", "checkpoint file", "step", "removal",
              "log", "pointer", "final student")
RESUME_KILL_WINDOW = 60
CHILD_TIMEOUT = 300.0

CONFIG: dict[str, Any] = {
    "cpu_threads": 1,
    "data": {"name": "digits", "labeled": 200, "seed": 0},
    "student": {"name": "mlp", "size": "tiny", "options": {"dropout": 0.2}},
    "recipe": {"name": "fitnets", "hint_epochs": 1},
    "trainer": {"epochs": 2, "batch_size": 64, "seed": 0, "checkpoint_every": 4,
                "keep_checkpoints": 2, "progress": False,
                "optimizer": {"name": "adamw", "lr": 0.01},
                "scheduler": {"name": "cosine", "warmup_steps": 3}},
    "evaluation": {"batch_size": 64, "repeats": 1, "threads": 1},
}


# -- the child: a kdistill command that counts its events and kills itself at one -------------
@dataclass
class Event:
    index: int
    kind: str
    detail: str

    @property
    def category(self) -> str:
        """The kind of moment: a checkpoint rename or file, a step, a removal, a log line, the
        pointer, the final student or something else (the run's records, the report)."""
        detail = self.detail
        if "student.safetensors" in detail:
            return "final student"
        if "latest" in detail:
            return "pointer"
        if self.kind in ("step", "log"):
            return self.kind
        if self.kind == "remove":
            return "removal"
        if self.kind == "rename" and "step-" in detail:
            return "checkpoint rename"
        if self.kind == "write" and ".step-" in detail:
            return "checkpoint file"
        return "other"

    def committed_step(self) -> int | None:
        """The step of a checkpoint this event puts in place (a temporary folder renamed)."""
        if self.kind != "rename" or " -> step-" not in self.detail:
            return None
        source, target = self.detail.split(" -> ")
        return int(target[len("step-"):]) if source.startswith(".step-") else None


def categorise(events: Sequence[Event]) -> dict[int, str]:
    """Each event's category; the rename that puts a re-saved step in place (its earlier
    version just moved aside as ``.stale-step-<N>-<pid>``) is a ``checkpoint re-save``."""
    categories = {}
    for previous, event in zip([None, *events], events, strict=False):
        aside = previous is not None and previous.kind == "rename" and \
            " -> .stale-" in previous.detail
        categories[event.index] = "checkpoint re-save" if aside else event.category
    return categories


def read_events(path: Path) -> list[Event]:
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        index, kind, detail = line.split("\t", 2)
        events.append(Event(int(index), kind, detail))
    return events


def _install_hooks(kill_at: int | None, events_fd: int) -> None:
    """Count the child's events (written to ``events_fd``); SIGKILL itself at ``kill_at``."""
    count = 0

    def event(kind: str, detail: str) -> None:
        nonlocal count
        count += 1
        os.write(events_fd, f"{count}\t{kind}\t{detail}\n".encode())
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner: Any, name: str, describe: Callable[..., tuple[str, str] | None]) -> None:
        real = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            described = describe(*args, **kwargs)
            if described is not None:
                event(*described)
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)

    def where(path: Any) -> str:
        path = Path(path)
        return f"{path.parent.name}/{path.name}"

    wrap(step_module.OptimizerStep, "__call__", lambda *a, **k: ("step", ""))
    wrap(metrics_module.MetricsLog, "write",
         lambda log, record: ("log", f"{record.get('kind')} {record.get('step')}")
         if log.path is not None else None)
    wrap(checkpoint_module, "save_file", lambda tensors, path, *a, **k: ("write", where(path)))
    wrap(Path, "write_text", lambda path, *a, **k: ("write", where(path)))
    wrap(Path, "unlink", lambda path, *a, **k: ("remove", where(path)))
    wrap(shutil, "rmtree", lambda path, *a, **k: ("remove", where(path)))
    wrap(os, "replace", lambda source, target, *a, **k:
         ("rename", f"{Path(source).name} -> {Path(target).name}"))


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (no orphaned workers)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)


def run_child(argv: Sequence[str], *, kill_at: int | None, events: Path, log: Path,
              timeout: float = CHILD_TIMEOUT) -> int:
    """Run ``kdistill <argv>`` in a forked process; its exit code (``-9`` when killed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child never returns into the caller
        code = 1
        try:
            _die_with_parent()
            output = open(log, "a", buffering=1)  # noqa: SIM115 (open until os._exit)
            os.dup2(output.fileno(), 1)
            os.dup2(output.fileno(), 2)
            sys.stdout = sys.stderr = output
            _install_hooks(kill_at, os.open(events, os.O_WRONLY | os.O_CREAT | os.O_APPEND))
            code = kdistill_main(list(argv))
        except BaseException:  # noqa: BLE001 (reported in the log, then the exit code)
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise TimeoutError(f"kdistill {' '.join(argv)} ran longer than {timeout} s")
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


# -- one campaign ---------------------------------------------------------------------------------
@dataclass
class Campaign:
    """A reference run and the kill scenarios, in ``workdir``."""

    workdir: Path
    seed: int = 0
    reference: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    def config(self, name: str) -> Path:
        path = self.workdir / f"{name}.yaml"
        raw = {"name": name, "output_dir": str(self.workdir / "runs"), **CONFIG,
               "teacher": {"model": {"name": "cnn", "size": "tiny"},
                           "checkpoint": str(self.workdir / "teacher.safetensors")}}
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def run(self, name: str, *extra: str,
            kill_at: int | None = None) -> tuple[int, str, list[Event]]:
        """``kdistill run`` of config ``name`` in a child killed at event ``kill_at``: the exit
        code, the output and the events the child carried out (the one it was killed at is
        left out)."""
        attempt = len(list(self.workdir.glob(f"{name}.*.events")))
        events = self.workdir / f"{name}.{attempt}.events"
        code = run_child(["run", str(self.workdir / f"{name}.yaml"), *extra], kill_at=kill_at,
                         events=events, log=self.workdir / f"{name}.log")
        done = read_events(events)
        return code, (self.workdir / f"{name}.log").read_text(), \
            done[:-1] if code == -signal.SIGKILL else done

    def prepare(self) -> None:
        """The teacher file and the reference run, with its events."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.seed)
        save_file(build_model("cnn", (1, 8, 8), 10, size="tiny").state_dict(),
                  str(self.workdir / "teacher.safetensors"))
        self.config("reference")
        code, log, self.events = self.run("reference")
        if code != 0:
            raise RuntimeError(f"the reference run failed ({code}):\n{log[-3000:]}")
        self.reference = summary(self.workdir / "runs" / "reference")

    def window(self) -> list[Event]:
        """The events from the first optimizer step to the final student's rename."""
        first = next(e.index for e in self.events if e.kind == "step")
        last = next(e.index for e in self.events
                    if e.kind == "rename" and e.detail.endswith("-> student.safetensors"))
        return [e for e in self.events if first <= e.index <= last]

    def kill_points(self, kills: int) -> list[Event]:
        """One event of each kind first (in the order of :data:`CATEGORIES`), then random
        ones, all distinct."""
        rng = random.Random(self.seed)
        window, categories = self.window(), categorise(self.events)
        chosen: list[Event] = []
        for category in CATEGORIES:
            members = [e for e in window if categories[e.index] == category]
            if members and len(chosen) < kills:
                chosen.append(rng.choice(members))
        rest = [e for e in window if e not in chosen]
        chosen += rng.sample(rest, kills - len(chosen))
        return chosen

    def scenario(self, number: int, point: Event, resume_kill: int | None) -> dict[str, Any]:
        """Kill a fresh run at ``point``, resume until done, compare with the reference."""
        name = f"kill-{number:02d}"
        self.config(name)
        run_dir = self.workdir / "runs" / name
        problems: list[str] = []
        result: dict[str, Any] = {"kill_at": point.index, "event": f"{point.kind} {point.detail}",
                                  "category": categorise(self.events)[point.index],
                                  "resumes": [],
                                  "restarted": False, "problems": problems}
        code, log, done = self.run(name, kill_at=point.index)
        if code != -signal.SIGKILL:
            problems.append(f"the run was not killed (exit {code}): {log[-2000:]}")
            return result
        committed = self.after_kill(run_dir, done, None, problems)
        kills_left = [resume_kill] if resume_kill is not None else []
        for _ in range(10):
            kill_at = kills_left.pop() if kills_left else None
            code, log, done = self.run(name, "--resume", kill_at=kill_at)
            if code == 2 and "nothing to resume: no checkpoint" in log and committed is None:
                result["restarted"] = True
                code, log, done = self.run(name, "--overwrite")
            killed = code == -signal.SIGKILL
            result["resumes"].append({"from_step": committed,
                                      "killed_at": kill_at if killed else None})
            if killed:
                committed = self.after_kill(run_dir, done, committed, problems)
                continue
            if code != 0:
                problems.append(f"the resume failed (exit {code}): {log[-2000:]}")
                return result
            break
        recorded = json.loads((run_dir / "run.json").read_text())["resumes"]
        if not result["restarted"] and (not recorded or recorded[-1]["step"] != committed):
            problems.append(f"the last resume started at {recorded[-1:]}, not at the newest "
                            f"checkpoint committed, step {committed}")
        problems += compare(summary(run_dir), self.reference)
        problems += [f"left behind: {p}" for p in leftovers(run_dir)]
        return result

    def after_kill(self, run_dir: Path, done: list[Event], committed: int | None,
                   problems: list[str]) -> int | None:
        """Check the folder a kill left: every checkpoint a resume could read is intact, the
        newest is the newest committed so far and the metrics log holds its history. Returns
        the newest committed step (``committed`` before this child's ``done`` events)."""
        steps = [s for e in done if (s := e.committed_step()) is not None]
        if committed is not None:
            steps.append(committed)
        committed = max(steps) if steps else None
        for folder in checkpoint_folders(run_dir):
            try:
                verify_checkpoint(folder)
            except DamagedCheckpoint as error:
                problems.append(f"a resume could read a damaged checkpoint: {error}")
        loaded, _ = load_newest(run_dir)
        newest = int(loaded.trainer["global_step"]) if loaded is not None else None
        if newest != committed:
            problems.append(f"after the kill the newest checkpoint is step {newest}, "
                            f"not step {committed}, the newest committed")
        if loaded is not None:
            logged = read_metrics(run_dir / "metrics.jsonl")
            if logged[:len(loaded.trainer["history"])] != loaded.trainer["history"]:
                problems.append("the metrics log lost records of the newest checkpoint")
        return committed


def summary(run_dir: Path) -> dict[str, Any]:
    """What must match: the student's bytes, the metrics log, the kept checkpoints' files."""
    checkpoints = {folder.name: json.loads((folder / MANIFEST).read_text())["files"]
                   for folder in checkpoint_folders(run_dir)}
    return {"student": (run_dir / "student.safetensors").read_bytes(),
            "metrics": read_metrics(run_dir / "metrics.jsonl"), "checkpoints": checkpoints}


def compare(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    problems = []
    if found["student"] != expected["student"]:
        problems.append("the final student differs from the uninterrupted run's")
    if found["metrics"] != expected["metrics"]:
        problems.append("the metrics log differs from the uninterrupted run's")
    if found["checkpoints"] != expected["checkpoints"]:
        problems.append(f"the kept checkpoints differ: {sorted(found['checkpoints'])} vs "
                        f"{sorted(expected['checkpoints'])}")
    return problems


def leftovers(run_dir: Path) -> list[str]:
    """Hidden (temporary, moved-aside) files and folders in and beside ``run_dir``."""
    inside = [str(p.relative_to(run_dir)) for p in run_dir.rglob(".*")]
    beside = [p.name for p in run_dir.parent.glob(f".{run_dir.name}.*")]
    return sorted(inside + beside)


def warm_up() -> None:
    """Import, before forking, what a run imports on first use (torch's optimizers load
    ``torch._dynamo``, seconds; the data loaders scikit-learn), so children start fast."""
    from kdistill.data import load_dataset

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    load_dataset("digits")


def campaign(workdir: Path, kills: int, seed: int = 0,
             resume_kill_every: int = 2) -> dict[str, Any]:
    """Prepare the reference, run ``kills`` scenarios; every other one (``resume_kill_every``)
    also kills its first resume."""
    started = time.monotonic()
    warm_up()
    run = Campaign(workdir, seed)
    run.prepare()
    rng = random.Random(seed + 1)
    scenarios = []
    for number, point in enumerate(run.kill_points(kills)):
        resume_kill = rng.randint(1, RESUME_KILL_WINDOW) \
            if resume_kill_every and number % resume_kill_every == 1 else None
        scenarios.append(run.scenario(number, point, resume_kill))
    window = run.window()
    counts: dict[str, int] = {}
    for scenario in scenarios:
        counts[scenario["category"]] = counts.get(scenario["category"], 0) + 1
    resume_kills = sum(1 for s in scenarios for r in s["resumes"] if r["killed_at"] is not None)
    return {
        "reference": {"events": len(run.events), "window": [window[0].index, window[-1].index],
                      "optimizer_steps": sum(e.kind == "step" for e in run.events),
                      "checkpoints_committed": sum(e.committed_step() is not None
                                                   for e in run.events),
                      "kept_checkpoints": sorted(run.reference["checkpoints"])},
        "scenarios": scenarios,
        "summary": {"kills": len(scenarios) + resume_kills, "kills_in_training": len(scenarios),
                    "kills_in_resumes": resume_kills,
                    "restarted_with_overwrite": sum(s["restarted"] for s in scenarios),
                    "identical_to_uninterrupted": sum(not s["problems"] for s in scenarios),
                    "with_problems": sum(bool(s["problems"]) for s in scenarios),
                    "kills_by_category": dict(sorted(counts.items())),
                    "seconds": round(time.monotonic() - started, 1)},
    }


@contextlib.contextmanager
def working_folder(path: str | None) -> Iterator[Path]:
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="kdistill-faults-") as folder:
        yield Path(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kill points in training runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with working_folder(args.workdir) as workdir:
        results = campaign(workdir, args.kills, args.seed)
    results = {"command": f"python benchmarks/fault_injection.py --kills {args.kills} "
                          f"--seed {args.seed}", **results}
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    for scenario in results["scenarios"]:
        for problem in scenario["problems"]:
            print(f"kill at {scenario['kill_at']} ({scenario['event']}): {problem}")
    return 1 if results["summary"]["with_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
