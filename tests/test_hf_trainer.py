"""DistillationTrainer: a transformers Trainer whose loss and accumulated gradient are the
kdistill engine's (Distiller) for the same global batch; the teacher stays frozen."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from test_hf_text import CLS, ID, PAD, SEP, bert_config, save_tokenizer
from torch import nn
from torch.utils.data import DataLoader

from kdistill.engine import Distiller
from kdistill.errors import KdistillError
from kdistill.hf import DistillationTrainer
from kdistill.models.hf_text import HFTextEncoder
from kdistill.models.text import TextModel
from kdistill.recipes.base import build_recipe
from kdistill.settings import OptimizerSettings

LR = 0.5
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "a", "big", "red", "ran", "to", "it"]
# 8 texts of different lengths, 3 of them labelled: however a global batch of 8 is cut into two
# micro-batches of 4, their labelled counts differ (3 is odd), so a mean of per-micro-batch
# means would not be the mean over the global batch.
LENGTHS = [3, 7, 2, 5, 6, 4, 8, 3]
LABELS = [0, -100, 2, -100, -100, 1, -100, -100]
HINTON = {"temperature": 2.0, "alpha": 0.5}
# Hidden states (unit: tokens) and cross-entropy (unit: labelled samples) without an adapter.
COMPOSITE = {"terms": [{"loss": "hidden_mse", "student": "hidden.-1", "teacher": "hidden.-1"},
                       {"loss": "cross_entropy", "teacher": "logits", "weight": 0.5}]}


def texts() -> list[list[str]]:
    return [[WORDS[(3 * i + k) % len(WORDS)] for k in range(n)] for i, n in enumerate(LENGTHS)]


def samples() -> list[dict[str, Any]]:
    return [{"input_ids": [CLS, *(ID[w] for w in words), SEP], "labels": label,
             "input": " ".join(words)} for words, label in zip(texts(), LABELS, strict=True)]


def pad(features: list[dict[str, Any]]) -> dict[str, Any]:
    """The Trainer's (and the engine's) collator: token ids padded to the longest; raw texts
    kept as a list, the engine's sample index stacked."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [PAD] * (longest - len(f["input_ids"]))
                        for f in features])
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": (ids != PAD).long(),
                             "labels": torch.tensor([f["labels"] for f in features]),
                             "input": [f["input"] for f in features]}
    if "index" in features[0]:
        batch["index"] = torch.stack([torch.as_tensor(f["index"]) for f in features])
    return batch


def models(student_hidden: int = 16) -> tuple[nn.Module, nn.Module]:
    """(student, teacher): tiny BERT classifiers of 3 labels, without dropout, with weights
    large enough for logits (and gradients) far from zero."""
    def bert(layers: int, hidden: int, seed: int) -> nn.Module:
        config = bert_config(layers=layers, hidden=hidden)
        config.initializer_range = 0.5
        torch.manual_seed(seed)
        return transformers.BertForSequenceClassification(config)

    return bert(1, student_hidden, 1), bert(2, 16, 0)


def arguments(folder: Path, batch_size: int, accumulation: int) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(folder), report_to=[], use_cpu=True, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, num_train_epochs=1, learning_rate=LR,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        logging_steps=1, save_strategy="no", remove_unused_columns=False, disable_tqdm=True)


def engine_step(student: nn.Module, teacher: nn.Module, recipe: str, params: dict[str, Any],
                batch_size: int, accumulation: int) -> list[dict[str, Any]]:
    """One optimizer step of the engine over the 8 samples (plain SGD): its history."""
    loader = DataLoader(samples(), batch_size=batch_size, collate_fn=pad)
    distiller = Distiller(student, teacher, build_recipe(recipe, **params), epochs=1,
                          batch_size=batch_size, accumulation=accumulation, cpu=True,
                          progress=False, optimizer=OptimizerSettings(name="sgd", lr=LR,
                                                                      momentum=0.0))
    return distiller.fit(loader).history


def hinton_by_hand(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                   labelled: float, examples: float) -> torch.Tensor:
    """(1 - a) sum CE / labelled + a T^2 sum KL(p_t^T || p_s^T) / examples."""
    t, a = HINTON["temperature"], HINTON["alpha"]
    known = labels != -100
    ce = F.cross_entropy(student[known], labels[known], reduction="sum")
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                  log_target=True, reduction="sum")
    return (1 - a) * ce / labelled + a * t**2 * kl / examples


def test_the_loss_of_a_batch_is_the_recipes_mean_over_it(tmp_path: Path):
    student, teacher = models()
    trainer = DistillationTrainer(student, arguments(tmp_path, 8, 1), teacher=teacher,
                                  recipe="hinton", recipe_params=HINTON)
    batch = pad(samples())
    loss, outputs = trainer.compute_loss(student, batch, return_outputs=True)
    tokens = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        z_s, z_t = student(**tokens).logits, teacher(**tokens).logits
    torch.testing.assert_close(outputs["logits"], z_s)
    torch.testing.assert_close(loss, hinton_by_hand(z_s, z_t, batch["labels"], 3, 8))
    # The engine's first step records the same loss for the same batch.
    history = engine_step(*models(), "hinton", HINTON, 8, 1)
    assert loss.item() == pytest.approx(history[0]["loss"], rel=1e-6)


def test_a_micro_batch_counts_its_share_of_the_global_batch(tmp_path: Path):
    student, teacher = models()
    trainer = DistillationTrainer(student, arguments(tmp_path, 4, 2), teacher=teacher,
                                  recipe="hinton", recipe_params=HINTON)
    everything = samples()
    micro = [pad(everything[:4]), pad(everything[4:])]  # labelled: 2 and 1
    _, counts = trainer.get_batch_samples(iter(micro), 2, torch.device("cpu"))
    assert counts["examples"] == 8 and counts["labeled"] == 3
    assert counts["tokens"] == sum(LENGTHS) + 2 * len(LENGTHS)
    for batch in micro:
        loss = trainer.compute_loss(student, batch, num_items_in_batch=counts)
        tokens = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            z_s, z_t = student(**tokens).logits, teacher(**tokens).logits
        # Each micro-batch's sums are divided by the global batch's counts, not its own.
        torch.testing.assert_close(loss, hinton_by_hand(z_s, z_t, batch["labels"], 3, 8))


@pytest.mark.parametrize("recipe, params", [("hinton", HINTON), ("composite", COMPOSITE)])
@pytest.mark.parametrize("batch_size, accumulation", [(8, 1), (4, 2)])
def test_one_trainer_step_is_the_engines_step(tmp_path: Path, recipe: str,
                                              params: dict[str, Any], batch_size: int,
                                              accumulation: int):
    student, teacher = models()
    before = copy.deepcopy(student.state_dict())
    teacher_before = copy.deepcopy(teacher.state_dict())
    engine_student, engine_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    trainer = DistillationTrainer(student, arguments(tmp_path, batch_size, accumulation),
                                  train_dataset=samples(), data_collator=pad, teacher=teacher,
                                  recipe=recipe, recipe_params=params)
    trainer.train()
    history = engine_step(engine_student, engine_teacher, recipe, params, batch_size,
                          accumulation)
    assert trainer.state.global_step == 1
    assert trainer.state.log_history[0]["loss"] == pytest.approx(history[0]["loss"], rel=1e-5)
    moved = 0.0
    for name, value in student.state_dict().items():
        update, expected = value - before[name], engine_student.state_dict()[name] - before[name]
        torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, float(expected.abs().max()))
    assert moved > 0.05  # the step did update the student, far beyond the tolerance
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name  # the teacher stayed frozen


def test_a_recipes_adapter_is_built_on_the_first_batch_and_trained(tmp_path: Path):
    student, teacher = models(student_hidden=8)  # narrower than the teacher: an adapter
    params = {"terms": [{"loss": "hidden_mse", "student": "hidden.-1", "teacher": "hidden.-1",
                         "adapter": "linear"}]}
    trainer = DistillationTrainer(student, arguments(tmp_path, 4, 2), train_dataset=samples(),
                                  data_collator=pad, teacher=teacher, recipe="composite",
                                  recipe_params=params)
    trainer.create_optimizer()
    adapter = trainer.recipe.adapters["hidden_mse"]
    weight = next(adapter.parameters())
    assert weight.shape[-1] == 8 and weight.shape[0] == 16  # student 8 -> teacher 16
    held = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert any(p is weight for p in held)
    before = weight.detach().clone()
    trainer.train()
    assert not torch.equal(weight.detach(), before)


def test_a_text_model_teacher_reads_the_raw_text(tmp_path: Path):
    student, teacher = models()
    folder = save_tokenizer(tmp_path / "tokenizer")
    text_teacher = TextModel(HFTextEncoder.from_folder(folder), copy.deepcopy(teacher))
    batch = pad(samples())
    plain = DistillationTrainer(student, arguments(tmp_path, 8, 1), teacher=teacher,
                                recipe="hinton", recipe_params=HINTON)
    texts = DistillationTrainer(student, arguments(tmp_path, 8, 1), teacher=text_teacher,
                                recipe="hinton", recipe_params=HINTON)
    # Same tokenizer: the TextModel's own tokens are the batch's token ids, so the same loss.
    torch.testing.assert_close(texts.compute_loss(student, batch),
                               plain.compute_loss(student, batch))
    without_text = {k: v for k, v in batch.items() if k != "input"}
    with pytest.raises(KdistillError, match="the teacher is a TextModel and reads raw text, but "
                                            "the batch has no 'input'"):
        texts.compute_loss(student, without_text)


def test_token_level_taps_with_a_text_model_teacher_are_refused(tmp_path: Path):
    student, teacher = models()
    text_teacher = TextModel(HFTextEncoder.from_folder(save_tokenizer(tmp_path / "t")), teacher)
    with pytest.raises(KdistillError, match=r"taps \['hidden.-1'\] compare tokens position by "
                                            r"position, but the TextModel teacher tokenises"):
        DistillationTrainer(student, arguments(tmp_path, 8, 1), teacher=text_teacher,
                            recipe="composite", recipe_params=COMPOSITE)


@pytest.mark.parametrize("recipe, message", [
    ("fitnets", "recipe 'fitnets' trains in several phases"),
    ("dml", "recipe 'dml' trains its teacher or makes it from the student"),
    ("deit", "recipe 'deit' trains a student with extra parts"),
])
def test_recipes_the_trainer_cannot_run_like_the_engine_are_refused(tmp_path: Path, recipe: str,
                                                                     message: str):
    student, teacher = models()
    with pytest.raises(KdistillError, match=message):
        DistillationTrainer(student, arguments(tmp_path, 8, 1), teacher=teacher, recipe=recipe)


def test_a_teacher_is_required_and_recipe_params_go_with_a_name(tmp_path: Path):
    student, teacher = models()
    with pytest.raises(KdistillError, match="recipe 'hinton' needs a teacher: pass teacher="):
        DistillationTrainer(student, arguments(tmp_path, 8, 1), teacher=None)
    with pytest.raises(KdistillError, match="recipe_params go with a recipe name"):
        DistillationTrainer(student, arguments(tmp_path, 8, 1), teacher=teacher,
                            recipe=build_recipe("hinton"), recipe_params=HINTON)
