"""The ``vit`` model: shapes, the token sequence, the distillation token and its head, the
averaged inference prediction and the builder's checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.evaluate import predict
from kdistill.models import build_model
from kdistill.models.vit import ViT, has_distillation_token
from kdistill.taps import TapReader


def vit(shape: tuple[int, int, int] = (1, 8, 8), patch_size: int = 2, seed: int = 0,
        **options: object) -> ViT:
    torch.manual_seed(seed)
    model = build_model("vit", shape, 10, size="tiny", patch_size=patch_size, **options)
    assert isinstance(model, ViT)
    return model.eval()


def average(z_cls: torch.Tensor, z_dist: torch.Tensor) -> torch.Tensor:
    """The paper's inference rule, in log space: log((softmax(z_cls) + softmax(z_dist)) / 2)."""
    return torch.log((torch.softmax(z_cls, -1) + torch.softmax(z_dist, -1)) / 2)


@pytest.mark.parametrize(("shape", "patch_size", "patches"),
                         [((1, 28, 28), 4, 49), ((1, 28, 28), 7, 16), ((3, 32, 32), 4, 64)])
def test_shapes(shape, patch_size, patches):
    model = vit(shape, patch_size)
    x = torch.rand(3, *shape)
    with torch.no_grad():
        out = model(x)
        tokens = model.tokens(x)
    assert tokens.shape == (3, 2 + patches, 32)
    assert out["heads"].shape == (2, 3, 10) and out["logits"].shape == (3, 10)
    assert model.patch_embed.kernel_size == model.patch_embed.stride == (patch_size, patch_size)
    assert model.pos_embed.shape == (1, 2 + patches, 32)
    plain = vit(shape, patch_size, distillation_token=False)
    with torch.no_grad():
        assert plain.tokens(x).shape == (3, 1 + patches, 32)
        z = plain(x)
    assert isinstance(z, torch.Tensor) and z.shape == (3, 10)
    assert plain.dist_token is None and plain.dist_head is None
    assert has_distillation_token(model) and not has_distillation_token(plain)


def test_size_presets_and_options():
    model = build_model("vit", (1, 28, 28), 10, size="small", patch_size=7, mlp_ratio=2)
    assert model.cls_token.shape == (1, 1, 64) and len(model.blocks) == 4
    layer = model.blocks[0]
    assert layer.self_attn.num_heads == 4 and layer.linear1.out_features == 128
    assert layer.norm_first and layer.self_attn.batch_first


def test_the_sequence_is_class_token_distillation_token_then_patches():
    """``tokens`` recomputed from the parts: the patches of a stride-p convolution after the
    class and the distillation token, plus the position embeddings, through every block and
    the final norm."""
    model = vit()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        patches = torch.stack([
            torch.stack([model.patch_embed(x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2])[:, :, 0, 0]
                         for j in range(4)], dim=1) for i in range(4)], dim=1).reshape(2, 16, 32)
        sequence = torch.cat([model.cls_token.expand(2, -1, -1),
                              model.dist_token.expand(2, -1, -1), patches], dim=1)
        sequence = sequence + model.pos_embed
        for block in model.blocks:
            sequence = block(sequence)
        expected = model.norm(sequence)
        torch.testing.assert_close(model.tokens(x), expected, rtol=1e-5, atol=1e-6)


def test_each_head_reads_its_own_token():
    model = vit()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        tokens = model.tokens(x)
        out = model(x)
        # The distillation token's output is not the class token's.
        assert not torch.allclose(tokens[:, 0], tokens[:, 1], atol=1e-3)
        torch.testing.assert_close(out["heads"][0], model.head(tokens[:, 0]))
        torch.testing.assert_close(out["heads"][1], model.dist_head(tokens[:, 1]))
        # Perturbing the distillation head moves the distillation logits only. (A constant
        # shift would not: the LayerNorm'd token sums to zero over its features at init.)
        model.dist_head.weight.add_(torch.randn_like(model.dist_head.weight))
        moved = model(x)["heads"]
        torch.testing.assert_close(moved[0], out["heads"][0])
        assert not torch.allclose(moved[1], out["heads"][1], atol=1e-3)
        # The distillation token attends through the blocks: changing its embedding changes
        # what the class token sees, hence the class logits too.
        model.dist_token.zero_()
        assert not torch.allclose(model(x)["heads"][0], moved[0], atol=1e-4)


def test_the_prediction_averages_the_two_heads_probabilities(digits):
    model = vit()
    batch = {"input": digits.test.inputs[:5], "labels": digits.test.labels[:5],
             "index": torch.arange(5)}
    with torch.no_grad():
        out = model(batch["input"])
    expected = average(out["heads"][0], out["heads"][1])
    torch.testing.assert_close(out["logits"], expected, rtol=1e-5, atol=1e-6)
    # Evaluation reads the averaged prediction (in eval mode, as the paper at test time).
    model.train()
    predicted = predict(model, [batch]).logits
    assert model.training
    torch.testing.assert_close(predicted, expected, rtol=1e-5, atol=1e-6)


def test_taps_read_the_heads_and_each_tokens_output():
    model = vit()
    x = torch.rand(3, 1, 8, 8)
    with TapReader(model, ["heads", "logits", "module:features", "module:dist_features"]) as read:
        taps = read({"input": x})
    with torch.no_grad():
        tokens = model.tokens(x)
    torch.testing.assert_close(taps["module:features"], tokens[:, 0])
    torch.testing.assert_close(taps["module:dist_features"], tokens[:, 1])
    assert taps["heads"].shape == (2, 3, 10) and taps["logits"].shape == (3, 10)


@pytest.mark.parametrize(("shape", "options", "message"), [
    ((64,), {}, r"^vit needs image inputs shaped \[C, H, W\], got \(64,\)$"),
    ((1, 28, 28), {"patch_size": 5},
     "^vit: patch_size 5 must divide the image's height and width, got 28x28$"),
    ((1, 8, 8), {"dim": 30, "heads": 4}, r"^vit: dim 30 must be a multiple of heads \(4\)$"),
])
def test_builder_errors(shape, options, message):
    with pytest.raises(ValueError, match=message):
        build_model("vit", shape, 10, **options)


def test_parameters_of_the_distillation_token_and_head():
    """The token and its head add dim + dim * C + C parameters, plus one position."""
    with_token, without = vit(), vit(distillation_token=False)
    count = sum(p.numel() for p in with_token.parameters())
    assert count - sum(p.numel() for p in without.parameters()) == 32 + (32 * 10 + 10) + 32
    assert isinstance(without.features, nn.Identity)
