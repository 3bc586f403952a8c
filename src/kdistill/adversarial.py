"""Adversarial inputs: projected gradient descent (PGD) in an L-infinity ball.

Madry, Makelov, Schmidt, Tsipras & Vladu (2018), "Towards Deep Learning Models Resistant to
Adversarial Attacks". Starting from x_0 = x (or x + U(-eps, eps)^d with ``random_start``),

    x_{k+1} = Proj( x_k + alpha * sign(grad_x L(f(x_k), y)) ),
    Proj    = clip to {x' : ||x' - x||_inf <= eps} and to [lo, hi] (per coordinate)

for ``steps`` steps, which (approximately) maximises the loss L inside the ball and the valid
input range [lo, hi]. Only the input receives a gradient (``torch.autograd.grad`` with respect
to it): no parameter ``.grad`` is created or changed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdistill import losses

LossFn = Callable[[Tensor, Tensor], Tensor]


def pgd_perturb(forward: Callable[[Tensor], Tensor], inputs: Tensor, labels: Tensor,
                epsilon: float, step_size: float, steps: int,
                loss: LossFn = losses.cross_entropy, random_start: bool = True,
                value_range: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    """Adversarial versions of ``inputs`` within ``epsilon`` (L-inf) that raise ``loss``.

    Args:
        forward: maps inputs to logits (the model, in whatever mode the caller chose: attacks
            usually run it in eval mode).
        inputs: float inputs ``[B, ...]``.
        labels: the targets ``loss`` compares the logits with (class ids, ``-100`` = skip).
        epsilon: radius of the L-inf ball (``>= 0``).
        step_size: alpha, the size of each signed-gradient step (``> 0``).
        steps: number of steps (``>= 0``; 0 returns the random start, or ``inputs``).
        loss: ``loss(logits, labels)``; cross-entropy by default.
        random_start: start at a uniform point of the ball instead of at ``inputs``; drawn from
            torch's global RNG.
        value_range: valid input range ``(lo, hi)``; ``None`` for none.

    Returns the perturbed inputs, detached, same shape and dtype as ``inputs``.
    """
    if not inputs.is_floating_point():
        raise ValueError(f"pgd_perturb: inputs must be floating point (images, embeddings), "
                         f"got {inputs.dtype}")
    if epsilon < 0 or step_size <= 0 or steps < 0:
        raise ValueError(f"pgd_perturb: need epsilon >= 0, step_size > 0 and steps >= 0, got "
                         f"epsilon={epsilon}, step_size={step_size}, steps={steps}")
    clean = inputs.detach()
    low, high = clean - epsilon, clean + epsilon
    if value_range is not None:
        low, high = low.clamp_min(value_range[0]), high.clamp_max(value_range[1])

    def project(x: Tensor) -> Tensor:
        return torch.maximum(torch.minimum(x, high), low)

    adversarial = clean
    if random_start:
        adversarial = project(clean + torch.empty_like(clean).uniform_(-epsilon, epsilon))
    for _ in range(steps):
        point = adversarial.clone().requires_grad_(True)
        with torch.enable_grad():
            value = loss(forward(point), labels)
            (gradient,) = torch.autograd.grad(value, point)
        adversarial = project(point.detach() + step_size * gradient.sign())
    return adversarial.detach()
