"""Ship a text model: write it to a folder with its tokeniser, and load it back for inference.

A transformers student is written as a plain transformers folder (``save_pretrained`` with its
tokenizer: it loads without kdistill; a sentence encoder in the sentence-transformers layout,
:mod:`kdistill.models.sentence`); the other text students as safetensors weights plus their
vocabulary (:func:`kdistill.models.text_students.save_text_student`). A finished text
run keeps its student in ``<run>/student/`` and the meaning of its outputs in
``<run>/labels.json`` (task, label names, the scale of regression targets).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kdistill.batch import Task
from kdistill.checkpoint import atomic_write_text
from kdistill.errors import KdistillError
from kdistill.models.hf_text import HFTextEncoder, export_pretrained, load_text_model
from kdistill.models.sentence import MODULES_FILE, SentenceEncoder, load_sentence_encoder
from kdistill.models.text import TextModel
from kdistill.models.text_networks import StaticEmbeddingNet
from kdistill.models.text_students import STUDENT_FILE, load_text_student, save_text_student

TOKEN_CLASSIFIERS = "ForTokenClassification"
STUDENT_FOLDER = "student"
LABELS_FILE = "labels.json"


@dataclass
class OutputMeaning:
    """What a model's outputs mean: the task, a name per class (None: class ids) and, for
    standardised regression targets, ``(mean, std)`` (raw target = output * std + mean)."""

    task: Task
    label_names: list[str] | None = None
    target_scale: tuple[float, float] | None = None


def is_sentence_encoder(model: TextModel) -> bool:
    """Whether ``model`` answers sentence embeddings (a transformers sentence encoder or the
    static one) rather than logits."""
    return isinstance(model.model, SentenceEncoder | StaticEmbeddingNet)


def export_text_model(model: TextModel, folder: str | Path,
                      label_names: Sequence[str] | None = None) -> Path:
    """Write ``model`` into ``folder`` so :func:`load_exported` (or, for a transformers model,
    plain ``transformers``) loads it; ``label_names`` name the outputs (a sentence encoder's
    have none)."""
    folder = Path(folder)
    if is_sentence_encoder(model):
        label_names = None
    if isinstance(model.encoder, HFTextEncoder):
        return export_pretrained(model, folder, label_names)
    save_text_student(model, folder)
    return folder


def exported_task(folder: Path) -> Task:
    """The task of the transformers model in ``folder``, read from its config."""
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    return ("token_classification" if any(a.endswith(TOKEN_CLASSIFIERS) for a in architectures)
            else "classification")


def load_exported(folder: str | Path) -> TextModel:
    """A text model written by :func:`export_text_model`, ready for inference."""
    folder = Path(folder)
    if (folder / STUDENT_FILE).is_file():
        return load_text_student(folder)
    if (folder / MODULES_FILE).is_file():
        return load_sentence_encoder(folder)
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        return load_text_model(folder, exported_task(folder), int(config.get("num_labels", 2)))
    raise KdistillError(f"{folder}: no exported text model here (neither {STUDENT_FILE} nor "
                        "config.json)")


def export_run_student(model: TextModel, run_dir: Path, meaning: OutputMeaning) -> Path:
    """Write a run's text student to ``<run_dir>/student/`` and ``meaning`` to
    ``<run_dir>/labels.json`` (for a sentence encoder, task ``embedding`` without labels);
    returns the student's folder."""
    if is_sentence_encoder(model):
        meaning = OutputMeaning("embedding")
    folder = export_text_model(model, run_dir / STUDENT_FOLDER, meaning.label_names)
    atomic_write_text(run_dir / LABELS_FILE, json.dumps(asdict(meaning), indent=1) + "\n")
    return folder


def load_run_student(run_dir: str | Path) -> tuple[TextModel, OutputMeaning]:
    """The student exported by the text run in ``run_dir`` and what its outputs mean."""
    run_dir = Path(run_dir)
    folder, labels = run_dir / STUDENT_FOLDER, run_dir / LABELS_FILE
    if not folder.is_dir() or not labels.is_file():
        raise KdistillError(f"{run_dir}: not a finished text run (expected {STUDENT_FOLDER}/ "
                            f"and {LABELS_FILE}, written when a run on text data ends)")
    try:
        meaning = OutputMeaning(**json.loads(labels.read_text()))
    except (ValueError, TypeError) as error:
        raise KdistillError(f"{labels}: unreadable ({error})") from None
    if meaning.task == "lm":
        raise KdistillError(f"{run_dir}: a language-model run; continue texts with its student "
                            "with kdistill generate")
    return load_exported(folder), meaning
