"""Distillation losses: pure functions of tensors, each returning a scalar tensor.

Families:
    logits.py     kd, soft_ce, dkd (+ dkd_parts), logit_mse, cross_entropy, topk_kl
    ctc.py        ctc_loss (per target token) and the checks of CTC targets
    topk.py       TopKLogits: a teacher cache's top-k logits plus a tail bucket, read by kd,
                  forward_kl, tvd and generalized_jsd
    sampled.py    SampledLogits: tokens sampled from the teacher with importance weights
                  (random-sampling KD), read by forward_kl as an unbiased estimate
    slices.py     TokenSlice: a few tokens and entries of a hidden state (hidden-state
                  knowledge compression), slice_tokens to take one, sliced_mse to distil it
    features.py   hidden_mse, cosine, attention_mse, attention_transfer
    domain.py     mmd_rbf (multi-kernel RBF MMD between two feature sets)
    relations.py  rkd_distance, rkd_angle, pkt
    contrastive.py  info_nce (InfoNCE against keys, with exclusions)
    sequence.py   forward_kl, reverse_kl, generalized_jsd, tvd (token level, masked, with an
                  optional global-batch ``normalizer``) and their unreduced ``per_token_*`` forms
    registry.py   LOSSES, the registry that config-built recipes name losses from

Each function's docstring gives its equation, the paper it comes from and its reduction.
"""

from .contrastive import info_nce
from .ctc import check_ctc_targets, ctc_loss, frames_needed
from .domain import mmd_rbf
from .features import attention_mse, attention_transfer, cosine, hidden_mse
from .logits import cross_entropy, dkd, dkd_parts, kd, logit_mse, soft_ce, topk_kl
from .registry import (
    ALIASES,
    LOSSES,
    LossSpec,
    UnknownLossError,
    check_params,
    get_loss,
    loss_params,
)
from .relations import pkt, rkd_angle, rkd_distance
from .sampled import SampledLogits, sample_logits, sampled_kl
from .sequence import (
    forward_kl,
    generalized_jsd,
    per_token_forward_kl,
    per_token_generalized_jsd,
    per_token_reverse_kl,
    per_token_tvd,
    reverse_kl,
    tvd,
)
from .slices import TokenSlice, gather_tokens, slice_tokens, sliced_mse
from .topk import TopKLogits, TopKLogitsError

__all__ = [
    "ALIASES",
    "LOSSES",
    "LossSpec",
    "SampledLogits",
    "TokenSlice",
    "TopKLogits",
    "TopKLogitsError",
    "UnknownLossError",
    "attention_mse",
    "attention_transfer",
    "check_ctc_targets",
    "check_params",
    "cosine",
    "cross_entropy",
    "ctc_loss",
    "dkd",
    "dkd_parts",
    "forward_kl",
    "frames_needed",
    "gather_tokens",
    "generalized_jsd",
    "get_loss",
    "hidden_mse",
    "info_nce",
    "kd",
    "logit_mse",
    "loss_params",
    "mmd_rbf",
    "per_token_forward_kl",
    "per_token_generalized_jsd",
    "per_token_reverse_kl",
    "per_token_tvd",
    "pkt",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "sample_logits",
    "sampled_kl",
    "slice_tokens",
    "sliced_mse",
    "soft_ce",
    "topk_kl",
    "tvd",
]
