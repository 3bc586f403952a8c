"""Shifted test data for images: noise, blur, contrast and rotation at a chosen severity.

A distribution shift keeps the labels and changes the inputs. Each shift has one parameter
that grows linearly with the severity ``s`` in [0, 5] (0 leaves the images unchanged; 1-5
follow the five levels of Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness
to Common Corruptions and Perturbations", with our own, simpler, parameters):

=============  ==========================================================================
``noise``      x + N(0, sigma^2), sigma = 0.04 s (x) the width of the value range
``blur``       Gaussian blur, sigma = 0.25 s pixels (kernel radius ceil(3 sigma), edges
               replicated)
``contrast``   per image: m + c (x - m) with m the image mean, c = 1 - 0.15 s
``rotation``   rotation about the image centre by +-6 s degrees (sign drawn per image),
               bilinear, the uncovered corners filled with the low end of the value range
=============  ==========================================================================

Every result is clamped to the value range (default [0, 1]). Randomness (the noise, the
rotation signs) comes from a generator seeded with ``seed``, so a shift is the same on every
call. :func:`shifted_dataset` gives a shifted copy of an :class:`ArrayDataset`;
:func:`shifted_evaluation` measures accuracy under each shift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.data.base import ArrayDataset
from kdistill.names import unknown_name
from kdistill.settings import MAX_SEVERITY, SHIFTS, Shift

NOISE_PER_SEVERITY = 0.04  # noise std per severity level, as a fraction of the value range
BLUR_PER_SEVERITY = 0.25  # Gaussian sigma in pixels per severity level
CONTRAST_PER_SEVERITY = 0.15  # contrast lost per severity level
DEGREES_PER_SEVERITY = 6.0  # rotation angle per severity level


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Blur ``[B, C, H, W]`` images with a separable Gaussian of ``sigma`` pixels (kernel radius
    ``ceil(3 sigma)``, normalised to sum 1; borders replicated)."""
    if sigma <= 0:
        return images
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1),
                    groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)


def rotate(images: Tensor, degrees: Tensor | float, fill: float = 0.0) -> Tensor:
    """Rotate each ``[B, C, H, W]`` image counter-clockwise by its angle (a scalar or one per
    image) about its centre, bilinear; positions from outside the image get ``fill``."""
    b = images.shape[0]
    angle = torch.as_tensor(degrees, dtype=images.dtype, device=images.device).expand(b)
    theta = angle * math.pi / 180
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(theta)
    # affine_grid maps output to input coordinates (x right, y down, in [-1, 1]): sampling the
    # input at R(-theta) turns the picture counter-clockwise as displayed (rows top-down).
    matrix = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    # Sample (x - fill) with zero padding and add fill back: outside pixels become ``fill``.
    out = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out + fill


def _check(images: Tensor, shift: str, severity: float) -> None:
    if shift not in SHIFTS:
        raise ValueError(unknown_name("shift", shift, SHIFTS))
    if not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be in [0, {MAX_SEVERITY:g}], got {severity}")
    if not images.is_floating_point():
        raise ValueError(f"shift '{shift}': images must be floating point, got {images.dtype}")
    if images.dim() < 2 or (shift in ("blur", "rotation") and images.dim() != 4):
        wanted = "[N, C, H, W]" if shift in ("blur", "rotation") else "[N, ...]"
        raise ValueError(f"shift '{shift}' needs inputs shaped {wanted}, got "
                         f"{tuple(images.shape)}")


def shift_images(images: Tensor, shift: Shift, severity: float, seed: int = 0,
                 value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """``images`` under ``shift`` at ``severity`` (see the module docstring); deterministic in
    ``seed``. ``noise`` and ``contrast`` accept any ``[N, ...]`` float inputs."""
    _check(images, shift, severity)
    low, high = value_range
    generator = torch.Generator().manual_seed(seed)
    if shift == "noise":
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        out = images + NOISE_PER_SEVERITY * severity * (high - low) * noise.to(images.device)
    elif shift == "blur":
        out = gaussian_blur(images, BLUR_PER_SEVERITY * severity)
    elif shift == "contrast":
        mean = images.mean(dim=tuple(range(1, images.dim())), keepdim=True)
        out = mean + (1 - CONTRAST_PER_SEVERITY * severity) * (images - mean)
    else:
        sign = torch.randint(0, 2, (len(images),), generator=generator) * 2 - 1
        out = rotate(images, (DEGREES_PER_SEVERITY * severity * sign).to(images.device),
                     fill=low)
    return out.clamp(low, high)


def shifted_dataset(data: ArrayDataset, shift: Shift, severity: float, seed: int = 0,
                    value_range: tuple[float, float] = (0.0, 1.0)) -> ArrayDataset:
    """A copy of ``data`` with shifted inputs and the same labels."""
    return ArrayDataset(shift_images(data.inputs, shift, severity, seed, value_range),
                        data.labels)


def value_range_of(images: Tensor) -> tuple[float, float]:
    """The smallest and largest value of ``images``: the range shifts are clamped to when the
    data does not say (pixels in [0, 1] or [0, 255] alike)."""
    return float(images.min()), float(images.max())


def check_shifts(images: Tensor, shifts: Sequence[Shift], severity: float) -> None:
    """Raise a ValueError now, on a couple of images, for a shift ``images`` cannot take."""
    for shift in shifts:
        shift_images(images[:2], shift, severity)
