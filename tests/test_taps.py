"""Taps: reading logits, hidden states, attentions, pooled features and module hooks from every
kind of model output, and the errors a wrong tap name gives."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput

from kdistill.taps import ModuleTap, TapError, TapReader, Taps, output_tap, parse_tap

B, D_IN, D, C = 3, 4, 6, 5


class Toy(nn.Module):
    """A small network whose forward returns its result in one of several output forms.

    ``hidden_states`` are (embedding, block 0 output, block 1 output); ``attentions`` are two
    softmaxed [B, 2, 4, 4] maps made from the block outputs, so every field is a real function
    of the input.
    """

    def __init__(self, form: str = "tensor"):
        super().__init__()
        self.form = form
        self.features = nn.Sequential(nn.Linear(D_IN, D), nn.Tanh())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(D, C)
        self.unused = nn.Linear(D, D)

    def parts(self, x: torch.Tensor) -> dict[str, Any]:
        """Every quantity the forward exposes, computed without hooks."""
        h0 = self.features(x)
        h1 = self.blocks[0](h0)
        h2 = self.blocks[1](h1)
        attentions = tuple(torch.einsum("bi,bj->bij", h[:, :4], h[:, 2:6]).unsqueeze(1)
                           .repeat(1, 2, 1, 1).softmax(dim=-1) for h in (h1, h2))
        return {"logits": self.head(h2), "hidden_states": (h0, h1, h2), "attentions": attentions}

    def forward(self, x: torch.Tensor) -> Any:
        p = self.parts(x)
        if self.form == "tensor":
            return p["logits"]
        if self.form == "tuple":
            return p["logits"], p["hidden_states"][-1]
        if self.form == "dict":
            return p
        return SequenceClassifierOutput(logits=p["logits"], hidden_states=p["hidden_states"],
                                        attentions=p["attentions"])


def _toy(form: str = "tensor") -> tuple[Toy, torch.Tensor]:
    torch.manual_seed(0)
    return Toy(form).eval(), torch.randn(B, D_IN)


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict", "model_output"])
def test_logits_from_every_output_form(form: str) -> None:
    model, x = _toy(form)
    with TapReader(model, ["logits"]) as reader:
        taps = reader({"input": x})
    expected = model.head(model.blocks[1](model.blocks[0](model.features(x))))
    assert list(taps) == ["logits"]
    torch.testing.assert_close(taps["logits"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["dict", "model_output"])
def test_hidden_attention_and_embedding_taps(form: str) -> None:
    model, x = _toy(form)
    names = ["hidden.0", "hidden.1", "hidden.2", "hidden.-1", "hidden.-3", "embeddings",
             "attention.0", "attention.1", "attention.-1"]
    with TapReader(model, names) as reader:
        taps = reader({"input": x})
    h0 = model.features(x)
    h1 = model.blocks[0](h0)
    h2 = model.blocks[1](h1)
    expected = {"hidden.0": h0, "hidden.1": h1, "hidden.2": h2, "hidden.-1": h2,
                "hidden.-3": h0, "embeddings": h0}
    for name, value in expected.items():
        torch.testing.assert_close(taps[name], value, rtol=0, atol=0, msg=name)
    attn = model.parts(x)["attentions"]
    assert taps["attention.0"].shape == (B, 2, 4, 4)
    torch.testing.assert_close(taps["attention.0"], attn[0], rtol=0, atol=0)
    torch.testing.assert_close(taps["attention.1"], attn[1], rtol=0, atol=0)
    torch.testing.assert_close(taps["attention.-1"], attn[1], rtol=0, atol=0)
    assert not torch.equal(taps["attention.0"], taps["attention.1"])


def test_tuple_output_has_no_hidden_states() -> None:
    model, x = _toy("tuple")
    with TapReader(model, ["hidden.0"]) as reader, pytest.raises(TapError,
                                                                 match="no hidden_states"):
        reader({"input": x})


def test_out_of_range_hidden_index_names_the_count() -> None:
    model, x = _toy("dict")
    for name, index in (("hidden.3", 3), ("hidden.-4", -4)):
        with TapReader(model, [name]) as reader, pytest.raises(TapError) as err:
            reader({"input": x})
        assert f"index {index} out of range, the model has 3 hidden_states" in str(err.value)
    with TapReader(model, ["attention.2"]) as reader, pytest.raises(TapError) as err:
        reader({"input": x})
    assert "the model has 2 attentions" in str(err.value)


def test_missing_attentions_hint_at_eager_attention() -> None:
    output = SequenceClassifierOutput(logits=torch.zeros(1, 2), attentions=())
    with pytest.raises(TapError, match="attn_implementation='eager'"):
        output_tap(output, "attention.0")


def test_pooled_prefers_pooler_output() -> None:
    last = torch.randn(2, 5, 4)
    pooler = torch.randn(2, 4)
    output = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooler)
    assert output_tap(output, "pooled", torch.ones(2, 5)) is pooler


@pytest.mark.parametrize("source", ["last_hidden_state", "hidden_states"])
def test_pooled_masked_mean_by_hand(source: str) -> None:
    torch.manual_seed(1)
    last = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    expected = torch.stack([
        sum(last[b, t] for t in range(5) if mask[b, t]) / int(mask[b].sum()) for b in range(3)
    ])
    garbage = last.clone()
    garbage[mask == 0] = 1e6
    for hidden in (last, garbage):
        if source == "last_hidden_state":
            output: Any = {"last_hidden_state": hidden}
        else:
            output = {"hidden_states": (torch.zeros_like(hidden), hidden)}
        torch.testing.assert_close(output_tap(output, "pooled", mask), expected)
    # Without a mask every position counts.
    torch.testing.assert_close(output_tap({"last_hidden_state": last}, "pooled"),
                               last.mean(dim=1))


def test_pooled_through_reader_uses_the_batch_mask() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    output_hidden_states: bool = False) -> dict[str, Any]:
            h = self.embed(input_ids)
            return {"logits": h[:, 0], "hidden_states": (h, h * 2) if output_hidden_states
                    else None}

    torch.manual_seed(0)
    model = Encoder()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = (ids != 0).long()
    with TapReader(model, ["pooled"]) as reader:
        taps = reader({"input_ids": ids, "attention_mask": mask})
    assert taps.mask is mask
    h = model.embed(ids) * 2
    expected = torch.stack([h[0, :3].mean(0), h[1, :2].mean(0)])
    torch.testing.assert_close(taps["pooled"], expected)


class KwargsRecorder(nn.Module):
    """A Hugging Face-like model that records the keyword arguments it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def forward(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        ids = kwargs["input_ids"].float()
        return {"logits": ids, "hidden_states": (ids,), "attentions": (ids,)}


@pytest.mark.parametrize(("names", "hidden", "attentions"), [
    (["logits"], False, False),
    (["hidden.0"], True, False),
    (["embeddings"], True, False),
    (["attention.0"], False, True),
])
def test_hidden_states_and_attentions_are_requested_only_when_tapped(
        names: list[str], hidden: bool, attentions: bool) -> None:
    model = KwargsRecorder()
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long),
             "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.zeros(1, dtype=torch.long), "index": torch.zeros(1)}
    with TapReader(model, names) as reader:
        reader(batch)
    kwargs = model.calls[0]
    assert set(kwargs) - {"output_hidden_states", "output_attentions"} == {
        "input_ids", "attention_mask"}  # labels and index never reach the model
    assert kwargs.get("output_hidden_states", False) is hidden
    assert kwargs.get("output_attentions", False) is attentions


def test_batch_without_input_is_an_error() -> None:
    model, _ = _toy()
    with TapReader(model, ["logits"]) as reader, pytest.raises(TapError, match="neither 'input'"):
        reader({"x": torch.zeros(1)})


def test_module_taps_output_and_input_match_a_manual_forward() -> None:
    model, x = _toy("tensor")
    names = ["module:blocks.1", "module:features", "module:blocks.1:input", "module:blocks.0.0",
             "logits"]
    with TapReader(model, names) as reader:
        taps = reader({"input": x})
    h0 = model.features(x)
    h1 = model.blocks[0](h0)
    torch.testing.assert_close(taps["module:features"], h0, rtol=0, atol=0)
    torch.testing.assert_close(taps["module:blocks.1:input"], h1, rtol=0, atol=0)
    torch.testing.assert_close(taps["module:blocks.1"], model.blocks[1](h1), rtol=0, atol=0)
    torch.testing.assert_close(taps["module:blocks.0.0"], model.blocks[0][0](h0), rtol=0, atol=0)
    assert set(taps) == set(names)
    # A second batch gives that batch's values, not the first one's.
    with TapReader(model, ["module:features"]) as reader:
        other = reader({"input": x[:1] + 1})
    torch.testing.assert_close(other["module:features"], model.features(x[:1] + 1))


def test_input_tap_of_a_module_called_with_keywords_only() -> None:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(3, 3)

        def forward(self, *, scale: float, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.dense(hidden_states) * scale

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = Layer()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(scale=2.0, hidden_states=x + 1)

    model, x = Outer(), torch.randn(2, 3)
    with TapReader(model, ["module:layer:input", "module:layer"]) as reader:
        taps = reader({"input": x})
    torch.testing.assert_close(taps["module:layer:input"], x + 1, rtol=0, atol=0)
    torch.testing.assert_close(taps["module:layer"], model.layer.dense(x + 1) * 2)


def test_module_taps_keep_the_graph_for_the_student() -> None:
    model, x = _toy("tensor")
    with TapReader(model, ["module:features", "logits"]) as reader:
        taps = reader({"input": x})
    taps["module:features"].sum().backward()
    assert model.features[0].weight.grad is not None
    assert model.head.weight.grad is None  # only the tapped feature's graph was used


def test_hooks_are_removed_by_close_and_by_the_with_block() -> None:
    model, x = _toy("tensor")
    reader = TapReader(model, ["module:blocks.1", "module:features:input"])
    assert len(model.blocks[1]._forward_hooks) == 1
    assert len(model.features._forward_hooks) == 1
    reader.close()
    assert len(model.blocks[1]._forward_hooks) == 0
    assert len(model.features._forward_hooks) == 0
    reader.close()  # closing twice is harmless
    with TapReader(model, ["module:blocks.0"]) as reader:
        assert len(model.blocks[0]._forward_hooks) == 1
        reader({"input": x})
    assert len(model.blocks[0]._forward_hooks) == 0
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_unknown_module_path_lists_close_paths_and_leaves_no_hook() -> None:
    model, _ = _toy()
    with pytest.raises(TapError) as err:
        TapReader(model, ["module:features", "module:featurs"])
    message = str(err.value)
    assert message.startswith("tap 'module:featurs': unknown Toy module 'featurs'; did you mean "
                              "'features'")
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with pytest.raises(TapError, match=r"did you mean 'blocks\.1'"):
        TapReader(model, ["module:block.1"])


def test_module_that_did_not_run_is_an_error() -> None:
    model, x = _toy()
    with TapReader(model, ["module:unused"]) as reader, pytest.raises(
            TapError, match="module 'unused' did not run"):
        reader({"input": x})


@pytest.mark.parametrize("name", ["hidden.x", "hidden.", "hidden", "module:", "module::input",
                                  "module:a:b", "attention.1.2", "logit", "", "Logits"])
def test_malformed_tap_names_raise(name: str) -> None:
    with pytest.raises(TapError) as err:
        parse_tap(name)
    assert isinstance(err.value, ValueError)
    assert repr(name)[1:-1] in str(err.value)
    model, _ = _toy()
    with pytest.raises(TapError):
        TapReader(model, [name])


def test_well_formed_names_parse() -> None:
    assert parse_tap("hidden.-1") == "hidden.-1"
    assert parse_tap("attention.12") == "attention.12"
    assert parse_tap("module:encoder.layer.1.output:input") == ModuleTap(
        "module:encoder.layer.1.output:input", "encoder.layer.1.output", True)
    assert parse_tap("module:layer3") == ModuleTap("module:layer3", "layer3", False)


def test_taps_mapping_errors_detach_and_replace() -> None:
    w = torch.ones(2, requires_grad=True)
    mask = torch.tensor([[1, 0]])
    taps = Taps({"logits": w * 2, "hidden.0": w * 3}, mask)
    with pytest.raises(TapError, match="tap 'pooled' was not recorded; recorded taps: "
                                       "hidden.0, logits"):
        taps["pooled"]
    detached = taps.detached()
    assert not detached["logits"].requires_grad and detached.mask is mask
    detached["logits"].add_(1)  # a copy: the original is untouched
    torch.testing.assert_close(taps["logits"], torch.full((2,), 2.0))
    replaced = taps.replace(logits=torch.zeros(2))
    assert torch.equal(replaced["logits"], torch.zeros(2)) and replaced.mask is mask
    assert torch.equal(taps["logits"].detach(), torch.full((2,), 2.0))
    assert len(replaced) == 2


def _tiny_bert(pooling: bool = True) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(config, add_pooling_layer=pooling).eval()


def _bert_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 7, 9, 11, 5, 0, 0], [3, 4, 8, 12, 6, 13, 14]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_tiny_bert_module_and_output_taps() -> None:
    model = _tiny_bert()
    batch = _bert_batch()
    names = ["module:encoder.layer.1.output", "module:encoder.layer.1.output:input",
             "module:encoder.layer.1", "module:encoder", "module:encoder.layer.1.intermediate",
             "hidden.2", "hidden.-1", "embeddings",
             "pooled", "attention.1"]
    # Transformers installs its own output-capturing hooks on the first forward: count ours
    # against the hooks present after a warm-up forward.
    model.set_attn_implementation("eager")
    with torch.no_grad():
        model(**batch, output_hidden_states=True, output_attentions=True)
    before = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    with TapReader(model, names) as reader:
        assert len(model.encoder.layer[1].output._forward_hooks) == \
            before["encoder.layer.1.output"] + 2
        taps = reader(batch)
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == before
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    # The second layer's output block produces hidden state 2 (0 is the embedding output).
    torch.testing.assert_close(taps["module:encoder.layer.1.output"], out.hidden_states[2])
    torch.testing.assert_close(taps["module:encoder.layer.1"], out.hidden_states[2])
    torch.testing.assert_close(taps["module:encoder"], out.last_hidden_state)
    torch.testing.assert_close(taps["hidden.-1"], out.last_hidden_state)
    torch.testing.assert_close(taps["hidden.2"], out.hidden_states[2])
    torch.testing.assert_close(taps["embeddings"], out.hidden_states[0])
    torch.testing.assert_close(taps["pooled"], out.pooler_output)
    # BertOutput's first input is the intermediate activation (width intermediate_size).
    assert taps["module:encoder.layer.1.output:input"].shape == (2, 7, 24)
    torch.testing.assert_close(taps["module:encoder.layer.1.output:input"],
                               taps["module:encoder.layer.1.intermediate"])
    attn = taps["attention.1"]
    assert attn.shape == (2, 2, 7, 7)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 7))
    assert torch.all(attn[0, :, :, 5:] == 0)  # padded keys get no attention
    assert taps.mask is batch["attention_mask"]


def test_attention_taps_switch_a_bert_to_eager_attention() -> None:
    model = _tiny_bert()
    assert model.config._attn_implementation != "eager"
    with TapReader(model, ["attention.0", "attention.-1"]) as reader:
        assert model.config._attn_implementation == "eager"
        taps = reader(_bert_batch())
    assert taps["attention.0"].shape == taps["attention.-1"].shape == (2, 2, 7, 7)
    assert not torch.equal(taps["attention.0"], taps["attention.-1"])


def test_tiny_bert_without_pooler_pools_by_masked_mean() -> None:
    model = _tiny_bert(pooling=False)
    batch = _bert_batch()
    with TapReader(model, ["pooled"]) as reader:
        pooled = reader(batch)["pooled"]
    with torch.no_grad():
        last = model(**batch).last_hidden_state
    expected = torch.stack([last[0, :5].mean(0), last[1].mean(0)])
    torch.testing.assert_close(pooled, expected)


def test_tiny_bert_unknown_path_suggests_the_real_one() -> None:
    model = _tiny_bert()
    with pytest.raises(TapError) as err:
        TapReader(model, ["module:encoder.layer.1.outptu"])
    assert "did you mean 'encoder.layer.1.output'" in str(err.value)


def test_the_mask_applies_to_per_position_taps_only() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    taps = Taps({}, mask)
    assert taps.mask_for(torch.zeros(2, 3, 5)) is mask  # [B, L, D]: one value per position
    assert taps.mask_for(torch.zeros(2, 3)) is None  # a sentence's logits over 3 classes
    assert taps.mask_for(torch.zeros(2, 4, 5)) is mask  # other positions: the loss refuses it
    assert taps.mask_for(torch.zeros(2, 2, 3, 3)) is mask  # attention [B, H, L, L]
    assert Taps({}).mask_for(torch.zeros(2, 3, 5)) is None
