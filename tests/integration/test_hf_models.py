"""Tiny Hugging Face BERTs (built from a config, nothing downloaded) as teacher and student.

The teacher (4 layers, width 32) is distilled into a student (2 layers, width 16) by the
``composite`` recipe with a logit term, a hidden-state term through a linear adapter and an
attention-map term, and the padding mask is checked to keep padded positions out of the loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification

from kdistill import Distiller
from kdistill.losses import attention_mse
from kdistill.models.hf import load_hf_model
from kdistill.recipes import build_recipe
from kdistill.schedules import TrainState
from kdistill.taps import TapError, TapReader, Taps

VOCAB, MAX_LEN, PAD = 100, 12, 0

TERMS = [
    {"loss": "kd", "student": "logits", "teacher": "logits", "params": {"temperature": 2.0}},
    {"loss": "hidden_mse", "student": "hidden.-1", "teacher": "hidden.-1", "adapter": "linear"},
    {"loss": "attention_mse", "student": "attention.1", "teacher": "attention.3"},
]


class TokenData(Dataset):
    """Random token sequences, padded at the end (some with no padding at all).

    The label says whether the first token is in the upper half of the vocabulary, so it is a
    function of the tokens a model can learn.
    """

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, MAX_LEN), generator=g)
        lengths = torch.randint(4, MAX_LEN + 1, (n,), generator=g)
        lengths[::4] = MAX_LEN
        self.mask = (torch.arange(MAX_LEN) < lengths[:, None]).long()
        self.ids[self.mask == 0] = PAD
        self.labels = (self.ids[:, 0] >= VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


def _bert(layers: int, hidden: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=MAX_LEN, num_labels=2, pad_token_id=PAD)
    return BertForSequenceClassification(config)


def _teacher() -> BertForSequenceClassification:
    return _bert(layers=4, hidden=32, seed=0)


def _student() -> BertForSequenceClassification:
    return _bert(layers=2, hidden=16, seed=1)


def _batch(data: TokenData, n: int = 8) -> dict[str, torch.Tensor]:
    return {"input_ids": data.ids[:n], "attention_mask": data.mask[:n],
            "labels": data.labels[:n]}


def test_composite_distillation_between_tiny_berts(tmp_path: Path) -> None:
    data = TokenData(48)
    assert (data.mask == 0).any() and (data.mask.sum(1) == MAX_LEN).any()
    teacher, student = _teacher(), _student()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    recipe = build_recipe("composite", terms=TERMS)
    run_dir = tmp_path / "run"
    result = Distiller(student, teacher, recipe, run_dir=run_dir, epochs=1, batch_size=16,
                       progress=False, optimizer={"lr": 1e-2}).fit(data)

    # Every term is logged each step, finite; 48 samples / 16 = 3 steps.
    steps = [r for r in result.history if r.get("kind") == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        for name in ("kd", "hidden_mse", "attention_mse"):
            assert math.isfinite(record[name]), (name, record)
        assert record["hidden_mse"] > 0 and record["attention_mse"] > 0

    # The teacher is bit-identical; the student moved.
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert all(p.grad is None for p in teacher.parameters())
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any(k.startswith("bert.encoder.layer.1.") for k in changed)
    assert "classifier.weight" in changed

    # The adapter maps 16 -> 32 and is saved with the checkpoint.
    adapter = recipe.adapters["hidden_mse"]
    assert tuple(adapter.weight.shape) == (32, 16)
    assert isinstance(recipe.adapters["kd"], torch.nn.Identity)
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    weights = load_file(str(checkpoint / "weights.safetensors"))
    assert {k for k in weights if k.startswith("recipe.0.adapters.")} == {
        "recipe.0.adapters.hidden_mse.weight", "recipe.0.adapters.hidden_mse.bias"}
    assert torch.equal(weights["recipe.0.adapters.hidden_mse.weight"], adapter.weight.detach())
    assert not any(k.startswith("teacher.") for k in weights)  # a frozen teacher has no state

    # Attention taps switched both models to eager attention; no tap hook is left behind
    # (transformers' own output-capturing hooks may stay).
    assert student.config._attn_implementation == "eager"
    assert teacher.config._attn_implementation == "eager"
    for model in (student, teacher):
        hooks = [h for m in model.modules() for h in m._forward_hooks.values()]
        assert not [h for h in hooks if "TapReader" in getattr(h, "__qualname__", "")]


def test_attention_taps_switch_to_eager_and_return_maps() -> None:
    student = _student().eval()
    assert student.config._attn_implementation != "eager"
    batch = _batch(TokenData(8))
    with TapReader(student, ["attention.1", "attention.0", "hidden.-1"]) as reader:
        taps = reader(batch)
    assert student.config._attn_implementation == "eager"
    assert taps["attention.1"].shape == (8, 2, MAX_LEN, MAX_LEN)
    assert taps["hidden.-1"].shape == (8, MAX_LEN, 16)
    assert taps.mask is batch["attention_mask"]
    with TapReader(student, ["attention.2"]) as reader, pytest.raises(
            TapError, match="index 2 out of range, the model has 2 attentions"):
        reader(batch)


def _attention_taps(model: BertForSequenceClassification, name: str,
                    batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad(), TapReader(model.eval(), [name]) as reader:
        return reader(batch)[name]


def test_attention_term_ignores_padded_positions() -> None:
    data = TokenData(8, seed=3)
    batch = _batch(data)
    mask = batch["attention_mask"]
    assert (mask == 0).any()
    s = _attention_taps(_student(), "attention.1", batch)
    t = _attention_taps(_teacher(), "attention.3", batch)
    recipe = build_recipe("composite", terms=[{"loss": "attention_mse", "student": "attention.1",
                                               "teacher": "attention.3"}])

    def term(student_map: torch.Tensor, teacher_map: torch.Tensor,
             with_mask: bool = True) -> torch.Tensor:
        student_taps = Taps({"attention.1": student_map}, mask if with_mask else None)
        teacher_taps = Taps({"attention.3": teacher_map}, mask if with_mask else None)
        recipe.build(student_taps, teacher_taps)
        return recipe.terms(student_taps, teacher_taps, batch, TrainState())["attention_mse"].value

    clean = term(s, t)
    # By hand: mean over heads and (query, key) pairs whose query and key are both real tokens.
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        valid = mask[b].bool()
        diff = (s[b][:, valid][:, :, valid] - t[b][:, valid][:, :, valid]).pow(2)
        total += float(diff.sum())
        count += diff.numel()
    torch.testing.assert_close(clean, torch.tensor(total / count))

    pad_pairs = (mask[:, None, :, None] == 0) | (mask[:, None, None, :] == 0)
    g = torch.Generator().manual_seed(0)
    s_garbage = torch.where(pad_pairs, torch.randn(s.shape, generator=g) * 1e3, s)
    t_garbage = torch.where(pad_pairs, torch.full_like(t, -1e4), t)
    assert not torch.equal(s_garbage, s)
    torch.testing.assert_close(term(s_garbage, t_garbage), clean, rtol=0, atol=0)
    # Without the mask the garbage would count: the mask is what keeps it out.
    assert float(term(s_garbage, t_garbage, with_mask=False)) > 1e3 * float(clean)
    assert float(attention_mse(s_garbage, t_garbage, mask)) == pytest.approx(float(clean))


def test_load_hf_model_from_a_local_folder(tmp_path: Path) -> None:
    teacher = _teacher()
    teacher.save_pretrained(tmp_path / "bert")
    loaded = load_hf_model(tmp_path / "bert")
    for k, v in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # Another label count gets a fresh classifier on top of the saved encoder.
    five = load_hf_model(tmp_path / "bert", num_labels=5)
    assert tuple(five.classifier.weight.shape) == (5, 32)
    assert five.config.num_labels == 5
    assert torch.equal(five.bert.encoder.layer[3].output.dense.weight,
                       teacher.bert.encoder.layer[3].output.dense.weight)
    encoder = load_hf_model(tmp_path / "bert", task="encoder")
    assert not hasattr(encoder, "classifier")
    assert torch.equal(encoder.embeddings.word_embeddings.weight,
                       teacher.bert.embeddings.word_embeddings.weight)
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_hf_model(tmp_path / "nothing-here")


def test_teacher_attention_maps_do_not_depend_on_batch_padding_garbage() -> None:
    """Padding tokens do not leak into real positions: changing padded token ids leaves the
    teacher's attention among real tokens unchanged (the mask reaches the model)."""
    data = TokenData(8, seed=5)
    batch = _batch(data)
    other = dict(batch)
    other["input_ids"] = torch.where(batch["attention_mask"] == 0, 7, batch["input_ids"])
    teacher = _teacher()
    a = _attention_taps(teacher, "attention.3", batch)
    b = _attention_taps(teacher, "attention.3", other)
    valid = (batch["attention_mask"][:, None, :, None] == 1) & \
        (batch["attention_mask"][:, None, None, :] == 1)
    torch.testing.assert_close(a[valid.expand_as(a)], b[valid.expand_as(b)])
