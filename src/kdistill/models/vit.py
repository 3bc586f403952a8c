"""A small vision transformer for images shaped [C, H, W], with DeiT's distillation token.

Dosovitskiy et al. (2021), "An Image is Worth 16x16 Words: Transformers for Image Recognition
at Scale" (the architecture); Touvron et al. (2021), "Training data-efficient image
transformers & distillation through attention" (the distillation token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdistill.models.heads import average_probabilities

__all__ = ["ViT", "has_distillation_token"]

POSITION_INIT_STD = 0.02  # the tokens and position embeddings start as N(0, 0.02^2), as ViT's


class ViT(nn.Module):
    """Patches -> tokens -> pre-norm transformer blocks -> a head on the class token's output.

    * ``patch_embed``: a convolution with kernel and stride ``patch_size`` turns the image into
      ``N = (H / p) (W / p)`` patch tokens of width ``dim``;
    * ``cls_token`` and, with ``distillation_token``, ``dist_token``: learned tokens put before
      the patches, so the sequence is ``[cls, dist, patch_1 .. patch_N]``; ``pos_embed`` adds a
      learned position embedding to every token;
    * ``blocks``: ``depth`` pre-norm encoder layers (``nn.TransformerEncoderLayer``, GELU,
      ``heads`` attention heads, MLP width ``mlp_ratio * dim``) in which every token attends
      to every other, the distillation token included; then a final LayerNorm ``norm``;
    * ``features`` (the class token's output, [B, dim]) -> ``head`` gives z_cls;
      ``dist_features`` (the distillation token's output) -> ``dist_head`` gives z_dist.

    Without the distillation token ``forward`` returns z_cls [B, C]. With it, it returns
    ``{"logits": log((softmax(z_cls) + softmax(z_dist)) / 2), "heads": stack([z_cls, z_dist])}``,
    the convention of :class:`~kdistill.models.heads.TwoHeadStudent`: the ``heads`` tap feeds
    the ``deit`` recipe, ``logits`` (what evaluation and prediction read) is the paper's
    inference rule, the average of the two heads' softmax outputs. ``features`` and
    ``dist_features`` are identity modules, there to be tapped (``module:features``) and to
    give a shared-features distillation head (``TwoHeadStudent``) the class token's output.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 4,
                 dropout: float = 0.0, distillation_token: bool = True):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"vit needs image inputs shaped [C, H, W], got {tuple(input_shape)}")
        channels, height, width = input_shape
        if height % patch_size or width % patch_size:
            raise ValueError(f"vit: patch_size {patch_size} must divide the image's height and "
                             f"width, got {height}x{width}")
        if dim % heads:
            raise ValueError(f"vit: dim {dim} must be a multiple of heads ({heads})")
        patches = (height // patch_size) * (width // patch_size)
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.dist_token = nn.Parameter(torch.empty(1, 1, dim)) if distillation_token else None
        leading = 2 if distillation_token else 1
        self.pos_embed = nn.Parameter(torch.empty(1, leading + patches, dim))
        for parameter in (self.cls_token, self.dist_token, self.pos_embed):
            if parameter is not None:
                nn.init.trunc_normal_(parameter, std=POSITION_INIT_STD)
        self.blocks = nn.Sequential(*(
            nn.TransformerEncoderLayer(dim, heads, mlp_ratio * dim, dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.features = nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        self.dist_features = nn.Identity() if distillation_token else None
        self.dist_head = nn.Linear(dim, num_classes) if distillation_token else None

    def tokens(self, x: Tensor) -> Tensor:
        """Every token's output [B, leading + N, dim]: the class token first, then the
        distillation token (when there is one), then the patches."""
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        leading = [t for t in (self.cls_token, self.dist_token) if t is not None]
        sequence = torch.cat([*(t.expand(len(x), -1, -1) for t in leading), patches], dim=1)
        return self.norm(self.blocks(sequence + self.pos_embed))

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        out = self.tokens(x)
        z_cls = self.head(self.features(out[:, 0]))
        if self.dist_head is None or self.dist_features is None:
            return z_cls
        z_dist = self.dist_head(self.dist_features(out[:, 1]))
        heads = torch.stack([z_cls, z_dist])
        return {"logits": average_probabilities(heads), "heads": heads}


def has_distillation_token(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`ViT` with a distillation token (and head)."""
    return isinstance(model, ViT) and model.dist_token is not None
