"""Hostile files: every loader refuses to run code hidden in what it reads.

Each test plants a file whose loading would run code (a model folder's own Python modules, a
pickle whose unpickling writes a marker file, a YAML tag that calls ``os.system``) and checks
that kdistill refuses it with a message naming the file or field, that the marker is never
written and that stdin is never read. Everything is built in ``tmp_path``; nothing is
downloaded.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from kdistill import Distiller
from kdistill.checkpoint import latest_checkpoint
from kdistill.cli import main
from kdistill.config import ConfigError, load_config
from kdistill.data import load_dataset
from kdistill.errors import KdistillError
from kdistill.models import build_model
from kdistill.models.hf import UnsafeModelFolder, custom_code, folder_problems, load_hf_model
from kdistill.run import load_weights

transformers = pytest.importorskip("transformers")


class WritesMarker:
    """Unpickling this object creates the file ``path`` (a stand-in for any code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.path, "w")


def hostile_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weight": WritesMarker(marker)})


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where the hostile files' code would leave its trace."""
    return tmp_path / "code-ran"


@pytest.fixture
def stdin(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """A stdin holding the answer that would let transformers run a folder's code."""
    answer = io.StringIO("y\n")
    monkeypatch.setattr(sys, "stdin", answer)
    return answer


def unread(stdin: io.StringIO) -> bool:
    return stdin.tell() == 0 and stdin.read() == "y\n"


def tiny_bert(folder: Path) -> Path:
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=8, num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


CONFIGURATION = '''
from pathlib import Path
from transformers import PretrainedConfig

Path({marker!r}).touch()


class EvilConfig(PretrainedConfig):
    model_type = "kdistill_evil"

    def __init__(self, width=4, **kwargs):
        self.width = width
        super().__init__(**kwargs)
'''

MODELING = '''
from pathlib import Path
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from .configuration_evil import EvilConfig

Path({marker!r}).touch()


class EvilModel(PreTrainedModel):
    config_class = EvilConfig

    def __init__(self, config):
        super().__init__(config)
        self.linear = torch.nn.Linear(config.width, config.num_labels)
        self.post_init()

    def forward(self, input=None, **kwargs):
        return SequenceClassifierOutput(logits=self.linear(input))
'''


def custom_code_folder(folder: Path, marker: Path) -> Path:
    """A model folder of a custom architecture: ``auto_map`` names its own modules, whose
    import creates ``marker``; the weights are safetensors (so only the code is hostile)."""
    folder.mkdir()
    (folder / "configuration_evil.py").write_text(CONFIGURATION.format(marker=str(marker)))
    (folder / "modeling_evil.py").write_text(MODELING.format(marker=str(marker)))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "kdistill_evil", "width": 4, "num_labels": 3,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModel": "modeling_evil.EvilModel",
                     "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}}))
    save_file({"linear.weight": torch.ones(3, 4), "linear.bias": torch.zeros(3)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture
def modules_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """transformers copies trusted custom code into its modules cache: keep it in tmp_path
    and forget the imported modules afterwards."""
    cache = tmp_path / "hf-modules"
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield cache
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        del sys.modules[name]


# --- Hugging Face model folders: custom code -------------------------------------------------

@pytest.mark.parametrize("task", ["classification", "encoder"])
def test_custom_code_folder_is_refused_without_reading_stdin(tmp_path: Path, marker: Path,
                                                             stdin: io.StringIO,
                                                             task: str) -> None:
    folder = custom_code_folder(tmp_path / "evil", marker)
    with pytest.raises(UnsafeModelFolder) as raised:
        load_hf_model(folder, task=task)  # type: ignore[arg-type]
    message = str(raised.value)
    assert str(folder) in message
    assert "auto_map" in message and "modeling_evil.py" in message
    assert "options.trust_remote_code: true" in message
    assert not marker.exists()
    assert unread(stdin)


def test_custom_code_folder_is_refused_by_the_model_registry(tmp_path: Path, marker: Path,
                                                             stdin: io.StringIO) -> None:
    folder = custom_code_folder(tmp_path / "evil", marker)
    with pytest.raises(KdistillError, match="trust_remote_code"):
        build_model("hf", (8,), 3, path=str(folder))
    with pytest.raises(KdistillError, match="trust_remote_code"):
        build_model("oracle", (8,), 3, base="hf", base_size=None,
                    base_options={"path": str(folder)})
    assert not marker.exists()
    assert unread(stdin)


def test_custom_code_runs_when_the_user_asks(tmp_path: Path, marker: Path, stdin: io.StringIO,
                                            modules_cache: Path) -> None:
    folder = custom_code_folder(tmp_path / "evil", marker)
    model = build_model("hf", (4,), 3, path=str(folder), trust_remote_code=True)
    assert marker.exists()  # the folder's code ran: the user asked for it
    assert type(model).__name__ == "EvilModel"
    torch.testing.assert_close(model(input=torch.ones(2, 4)).logits, torch.full((2, 3), 4.0))
    assert unread(stdin)


def test_only_a_real_true_lets_code_run(tmp_path: Path, marker: Path) -> None:
    folder = custom_code_folder(tmp_path / "evil", marker)
    for value in ("false", "yes", 1):
        with pytest.raises(KdistillError, match="trust_remote_code: expected true or false"):
            load_hf_model(folder, trust_remote_code=value)  # type: ignore[arg-type]
        assert len(folder_problems(folder, trust_remote_code=value)) == 1  # type: ignore[arg-type]
    assert not marker.exists()


def test_trust_remote_code_reaches_every_from_pretrained(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_bert(tmp_path / "bert")
    calls: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> Any:
        def from_pretrained(path: Path, **kwargs: Any) -> nn.Module:
            calls.append((name, kwargs))
            return nn.Identity()
        return from_pretrained

    for name in ("AutoModel", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", recorder(name))
    for trust in (False, True):
        for task in ("classification", "encoder"):
            build_model("hf", (8,), 2, path=str(folder), head=task, trust_remote_code=trust)
    assert [name for name, _ in calls] == ["AutoModelForSequenceClassification", "AutoModel"] * 2
    for (_, kwargs), trust in zip(calls, (False, False, True, True), strict=True):
        assert kwargs["trust_remote_code"] is trust  # always explicit: never None, never a prompt
        assert kwargs["use_safetensors"] is True and kwargs["local_files_only"] is True


def test_a_plain_folder_loads_with_the_flag_off(tmp_path: Path, marker: Path,
                                               stdin: io.StringIO) -> None:
    folder = tiny_bert(tmp_path / "bert")
    (folder / "pytorch_model.bin").write_bytes(hostile_pickle(marker))  # beside safetensors
    assert folder_problems(folder) == []
    model = build_model("hf", (8,), 2, path=str(folder))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not marker.exists()  # weights came from model.safetensors, the pickle was left alone
    assert unread(stdin)


@pytest.mark.parametrize("plant, named", [
    ("auto_map", "auto_map: AutoModel -> modeling_x.X"),
    ("python", "Python files tokenization_x.py"),
    ("kernel", "hub kernel 'someone/flash-kernel'"),
    ("nested", "config.json text_config.auto_map"),
])
def test_every_kind_of_custom_code_is_found(tmp_path: Path, plant: str, named: str) -> None:
    folder = tiny_bert(tmp_path / "bert")
    config = json.loads((folder / "config.json").read_text())
    if plant == "auto_map":
        config["auto_map"] = {"AutoModel": "modeling_x.X"}
    elif plant == "python":
        (folder / "tokenization_x.py").write_text("raise SystemExit('ran')\n")
    elif plant == "kernel":
        config["attn_implementation"] = "someone/flash-kernel"
    else:
        config["text_config"] = {"auto_map": {"AutoModel": "modeling_x.X"}}
    (folder / "config.json").write_text(json.dumps(config))
    assert any(named in found for found in custom_code(folder))
    problems = folder_problems(folder, where="student.options")
    assert len(problems) == 1 and problems[0].startswith("student.options.trust_remote_code: ")
    assert named in problems[0]
    assert folder_problems(folder, trust_remote_code=True) == []
    with pytest.raises(UnsafeModelFolder, match="trust_remote_code"):
        load_hf_model(folder)


# --- Hugging Face model folders: pickled weights ---------------------------------------------

@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
@pytest.mark.parametrize("trust", [False, True])
def test_pickle_only_weights_are_refused(tmp_path: Path, marker: Path, stdin: io.StringIO,
                                         monkeypatch: pytest.MonkeyPatch, name: str,
                                         trust: bool) -> None:
    folder = tiny_bert(tmp_path / "bert")
    (folder / "model.safetensors").unlink()
    (folder / name).write_bytes(hostile_pickle(marker))
    loads: list[Any] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(UnsafeModelFolder) as raised:
        load_hf_model(folder, trust_remote_code=trust)
    message = str(raised.value)
    assert f"{folder} has its weights only as pickle ({name})" in message
    assert "save_pretrained" in message and "model.safetensors" in message
    assert loads == [] and not marker.exists() and unread(stdin)


def test_a_folder_without_weights_is_refused(tmp_path: Path) -> None:
    folder = tiny_bert(tmp_path / "bert")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UnsafeModelFolder, match=r"no weights \(model.safetensors missing\)"):
        load_hf_model(folder)


def test_a_broken_config_json_is_refused(tmp_path: Path) -> None:
    folder = tiny_bert(tmp_path / "bert")
    (folder / "config.json").write_text("[1, 2]")
    assert folder_problems(folder) == [f"options.path: {folder / 'config.json'}: not a JSON "
                                       "object"]
    (folder / "config.json").write_text("{nope")
    with pytest.raises(UnsafeModelFolder, match="config.json: not a readable JSON file"):
        load_hf_model(folder)


# --- Configs: kdistill check -----------------------------------------------------------------

def hf_config(tmp_path: Path, folder: Path, section: str, options: str = "") -> Path:
    model = f"{{name: hf, options: {{path: '{folder}'{options}}}}}"
    student = model if section == "student" else "{name: mlp, size: tiny}"
    teacher = model if section == "teacher" else "{name: mlp, size: tiny}"
    path = tmp_path / f"{section}.yaml"
    path.write_text(f"name: hf\nstudent: {student}\nteacher:\n  model: {teacher}\n"
                    "  train: {epochs: 1}\nrecipe: {name: hinton}\n")
    return path


@pytest.mark.parametrize("section, field", [("student", "student"),
                                            ("teacher", "teacher.model")])
def test_check_names_the_field_that_lets_code_run(tmp_path: Path, marker: Path,
                                                  stdin: io.StringIO,
                                                  capsys: pytest.CaptureFixture[str],
                                                  section: str, field: str) -> None:
    folder = custom_code_folder(tmp_path / "evil", marker)
    assert main(["check", str(hf_config(tmp_path, folder, section))]) == 2
    error = capsys.readouterr().err
    assert f"{field}.options.trust_remote_code: {folder} holds custom code" in error
    assert f"set {field}.options.trust_remote_code: true" in error
    assert "Traceback" not in error
    # Asking for it makes the config valid (check loads nothing, so no code runs either way).
    assert main(["check", str(hf_config(tmp_path, folder, section,
                                        ", trust_remote_code: true"))]) == 0
    assert not marker.exists() and unread(stdin)


def test_check_refuses_pickle_weights_and_a_non_boolean_flag(tmp_path: Path,
                                                             marker: Path) -> None:
    folder = tiny_bert(tmp_path / "bert")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(hostile_pickle(marker))
    with pytest.raises(ConfigError, match=r"student.options.path: .* weights only as pickle"):
        load_config(hf_config(tmp_path, folder, "student"))
    with pytest.raises(ConfigError, match="student.options.trust_remote_code: Input should be "
                                          "a valid boolean"):
        load_config(hf_config(tmp_path, folder, "student", ", trust_remote_code: 'yes'"))
    assert not marker.exists()


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system"])
def test_check_refuses_yaml_that_builds_python_objects(tmp_path: Path, marker: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       tag: str) -> None:
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: evil\ndata: {tag} [\"touch {marker}\"]\n")
    assert main(["check", str(config)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"kdistill: error: {config}: not valid "
                                                       "YAML")
    assert "tags that build Python objects are not allowed" in error
    # The same tag in a --set override.
    safe = tmp_path / "safe.yaml"
    safe.write_text("name: safe\nrecipe: {name: ce}\n")
    assert main(["check", str(safe), "--set", f"trainer.epochs={tag} [\"touch {marker}\"]"]) == 2
    assert "tags that build Python objects are not allowed" in capsys.readouterr().err
    assert not marker.exists()


# --- Data files ------------------------------------------------------------------------------

def test_npz_with_a_pickled_object_array_is_refused(tmp_path: Path, marker: Path) -> None:
    inputs = np.empty(4, dtype=object)
    inputs[:] = [WritesMarker(marker)] * 4
    path = tmp_path / "evil.npz"
    np.savez(path, x=inputs, y=np.arange(4))
    with pytest.raises(ValueError, match=f"{path}: not an .npz archive of plain numeric arrays"):
        load_dataset("npz", path=path)
    assert not marker.exists()
    # A bare pickle named .npz, and a lone .npy array named .npz.
    (tmp_path / "raw.npz").write_bytes(hostile_pickle(marker))
    with pytest.raises(ValueError, match="raw.npz: not an .npz archive of plain numeric arrays"):
        load_dataset("npz", path=tmp_path / "raw.npz")
    with (tmp_path / "lone.npz").open("wb") as handle:
        np.save(handle, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"lone.npz: a single .npy array, not an .npz archive"):
        load_dataset("npz", path=tmp_path / "lone.npz")
    assert not marker.exists()


def test_csv_cells_are_data_never_code(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "evil.csv"
    path.write_text(f"a,label\n__import__('os').system('touch {marker}'),1\n")
    with pytest.raises(ValueError, match=f"{path}, line 2"):
        load_dataset("csv", path=path)
    assert not marker.exists()


# --- Weights and checkpoints -----------------------------------------------------------------

def test_teacher_weights_that_are_a_pickle_are_refused(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(hostile_pickle(marker))
    with pytest.raises(ConfigError, match=f"teacher.checkpoint: cannot read {path}"):
        load_weights(nn.Linear(2, 2), path, "teacher.checkpoint")
    # torch's own format is a zip of pickles: refused the same way.
    torch.save({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, path)
    with pytest.raises(ConfigError, match=f"teacher.checkpoint: cannot read {path}"):
        load_weights(nn.Linear(2, 2), path, "teacher.checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("part", ["weights", "optimizer", "rng"])
def test_resume_refuses_a_checkpoint_holding_a_pickle(tmp_path: Path, marker: Path,
                                                      part: str) -> None:
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=generator),
                                          torch.randint(0, 2, (16,), generator=generator))

    def student() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(4, 2)

    Distiller(student(), None, "ce", epochs=1, batch_size=8, progress=False,
              run_dir=tmp_path / "run").fit(data)
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None
    (checkpoint / f"{part}.safetensors").write_bytes(hostile_pickle(marker))
    # checkpoint.load_checkpoint does not name the file yet (safetensors' own error): accept
    # that or a kdistill error, but never a loaded pickle.
    with pytest.raises((SafetensorError, KdistillError)):
        Distiller(student(), None, "ce", epochs=2, batch_size=8, progress=False,
                  run_dir=tmp_path / "run").fit(data, resume=True)
    assert not marker.exists()
