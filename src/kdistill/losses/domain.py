"""Domain alignment: the distance between two sets of features."""

from __future__ import annotations

import torch
from torch import Tensor


def mmd_rbf(source: Tensor, target: Tensor, kernels: int = 5, multiplier: float = 2.0) -> Tensor:
    """Squared maximum mean discrepancy between two feature sets under a sum of RBF kernels.

    Equation, for source rows x_1..x_n and target rows y_1..y_m ([n, D], [m, D]), Z = [X; Y]
    (N = n + m rows) and D_ij = ||z_i - z_j||^2::

        b        = sum_ij D_ij / (N^2 - N)                 (mean pairwise distance, no gradient)
        s_k      = b * multiplier^(k - floor(K / 2)),      k = 0 .. K-1
        k(z, z') = sum_k exp(-||z - z'||^2 / s_k)
        MMD^2    = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j)

    the biased estimate (diagonal terms included). With K = 5 and multiplier 2 the bandwidths
    are b/4, b/2, b, 2b, 4b. Papers: A. Gretton, K. Borgwardt, M. Rasch, B. Schoelkopf,
    A. Smola (2012), "A Kernel Two-Sample Test"; M. Long, Y. Cao, J. Wang, M. Jordan (2015),
    "Learning Transferable Features with Deep Adaptation Networks" (the multi-kernel form,
    which MSD, Ma et al. 2022, uses on [CLS] features).

    Reduction: one value for the two sets. Both need at least one row and the same width.
    """
    if source.dim() != 2 or target.dim() != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"mmd_rbf: expected features [n, D] and [m, D], got "
                         f"{tuple(source.shape)} and {tuple(target.shape)}")
    if not len(source) or not len(target):
        raise ValueError(f"mmd_rbf: both feature sets need a row, got {len(source)} source "
                         f"and {len(target)} target rows")
    if kernels < 1 or multiplier <= 0:
        raise ValueError(f"mmd_rbf: kernels must be >= 1 and multiplier > 0, got {kernels} and "
                         f"{multiplier}")
    z = torch.cat([source.float(), target.float()])
    distances = (z.unsqueeze(0) - z.unsqueeze(1)).pow(2).sum(dim=-1)
    count = len(z)
    base = distances.detach().sum() / max(count * count - count, 1)
    base = base.clamp_min(1e-12) / multiplier ** (kernels // 2)
    kernel = sum((-distances / (base * multiplier**k)).exp() for k in range(kernels))
    n = len(source)
    return (kernel[:n, :n].mean() + kernel[n:, n:].mean() - kernel[:n, n:].mean()
            - kernel[n:, :n].mean())
