"""torchdistill 1.1.5's KD loop on one pair of ``benchmarks/throughput.py``, timed the same way.

Called by ``throughput.py --torchdistill-site FOLDER`` in a fresh process each round, with
torchdistill installed (without its dependencies) in ``FOLDER``:
``.venv/bin/pip install --no-deps --target /work/td-site torchdistill==1.1.5``.

torchdistill imports torchvision at import time (its model zoo and data set registries), and
the only torchvision wheels this machine can reach need a CUDA build of torch. Nothing the KD
loop runs uses torchvision, so an import stub stands in for it: every ``torchvision.*`` module
is an empty module whose attributes are inert placeholder classes. The stub lives in this
process only (transformers, which probes for torchvision, never sees it).

The loop is torchdistill's own: ``get_distillation_box`` with its ``KDLoss`` (T=4, alpha=0.9,
batchmean: the loss of ``throughput.py``'s ``hand_kd``) under ``WeightedSumLoss``, SGD
(lr 0.01, momentum 0.9), the frozen teacher (``requires_grad: False``), and its training step
as its image classification example writes it: ``pre_epoch_process``, then for each batch
``loss = box.forward_process(sample_batch, targets, supp_dict)`` and
``box.post_forward_process(loss=loss)``.
Prints one JSON line: the round's median step (after ``--warmup`` steps).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import json
import statistics
import sys
import types
from typing import Any

import torch
from throughput import LR, MOMENTUM, PAIRS, StepClock
from torch.utils.data import RandomSampler, TensorDataset


class _StubModule(types.ModuleType):
    """A stand-in module: any public attribute is an inert placeholder class."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *args, **kwargs: None})


class TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers every ``torchvision`` import with a :class:`_StubModule`."""

    SUBMODULES = ("datasets", "models", "transforms", "ops", "io", "utils")

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StubModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # type: ignore[attr-defined]
        if module.__name__ == "torchvision":  # torchdistill reads these from sys.modules
            for sub in self.SUBMODULES:
                setattr(module, sub, importlib.import_module(f"torchvision.{sub}"))


def train_config(batch: int) -> dict[str, Any]:
    kd = {"key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                      "teacher_module_path": ".", "teacher_module_io": "output",
                                      "temperature": 4.0, "alpha": 0.9,
                                      "reduction": "batchmean"}}
    return {"num_epochs": 1,
            "train_data_loader": {"dataset_id": "train",
                                  "sampler": {"class_or_func": RandomSampler},
                                  "kwargs": {"batch_size": batch, "num_workers": 0}},
            "teacher": {"forward_proc": "forward_batch_only", "sequential": [],
                        "requires_grad": False, "frozen_modules": []},
            "student": {"forward_proc": "forward_batch_only", "sequential": [],
                        "requires_grad": True, "frozen_modules": []},
            "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": MOMENTUM}},
            "criterion": {"key": "WeightedSumLoss",
                          "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}}}}


def one_epoch(box: Any) -> None:
    box.pre_epoch_process(epoch=0)
    for sample_batch, targets, supp_dict in box.train_data_loader:
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pair", choices=("cnn", "mlp"))
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    args = parser.parse_args()
    sys.meta_path.insert(0, TorchvisionStub())
    from torchdistill import __version__
    from torchdistill.core.distillation import get_distillation_box

    torch.set_num_threads(1)
    pair = PAIRS[args.pair]()
    data = pair.data((args.warmup + args.steps + 1) * pair.batch)
    tensors = TensorDataset(data.inputs, data.labels)
    student = pair.make_student()
    clock = StepClock(student)
    box = get_distillation_box(pair.teacher, student, {"train": tensors},
                               train_config(pair.batch), torch.device("cpu"), None, False, 1)
    one_epoch(box)
    print(json.dumps({"torchdistill": __version__,
                      "median_step_s": statistics.median(clock.steps(args.warmup))}))


if __name__ == "__main__":
    main()
