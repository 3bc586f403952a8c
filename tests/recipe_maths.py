"""Hand-written maths for the recipe equation tests (``test_recipe_equations*.py``).

Everything here is plain torch on float64 copies of the inputs (softmax, logs, sums), written
from the docstring equations, never through ``kdistill.losses``: a recipe that calls the wrong
loss, passes the wrong argument or drops a parameter gives a value these functions do not.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from kdistill.batch import UNLABELED
from kdistill.recipes import Term


def d(x: Tensor) -> Tensor:
    """A float64 copy cut from any graph."""
    return x.detach().to(torch.float64)


def log_p(z: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(z / T) over the last dimension, per row."""
    return torch.log_softmax(d(z) / temperature, dim=-1)


def p(z: Tensor, temperature: float = 1.0) -> Tensor:
    return log_p(z, temperature).exp()


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(A || B) per row from log-probabilities: sum_c A_c (log A_c - log B_c)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def entropy(z: Tensor, temperature: float = 1.0) -> Tensor:
    lp = log_p(z, temperature)
    return -(lp.exp() * lp).sum(-1)


def ce_rows(z: Tensor, labels: Tensor) -> Tensor:
    """-log softmax(z)[y] per row, 0 where the label is UNLABELED."""
    lp = log_p(z)
    known = labels != UNLABELED
    safe = torch.where(known, labels, torch.zeros_like(labels))
    picked = -lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(known, picked, torch.zeros_like(picked))


def ce(z: Tensor, labels: Tensor) -> float:
    """Cross-entropy averaged over the labelled rows."""
    known = labels != UNLABELED
    return float(ce_rows(z, labels).sum() / known.sum())


def mean_over(values: Tensor, rows: Tensor) -> float:
    """Mean of ``values`` over the rows where ``rows`` is true."""
    return float(values[rows].sum() / rows.sum())


def hinton_kd_rows(z_s: Tensor, z_t: Tensor, temperature: float) -> Tensor:
    """T^2 KL(p_t^T || p_s^T) per row."""
    return temperature**2 * kl(log_p(z_t, temperature), log_p(z_s, temperature))


def check_term(name: str, term: Term, value: float, weight: float, unit: str) -> None:
    """One term's value (a scalar tensor), weight and unit."""
    assert isinstance(term.value, Tensor) and term.value.dim() == 0, name
    assert term.value.item() == pytest.approx(value, rel=1e-5, abs=1e-7), f"{name}: value"
    assert float(term.weight) == pytest.approx(weight, rel=1e-6, abs=1e-9), f"{name}: weight"
    assert term.unit == unit, f"{name}: unit"


def check_terms(terms: Mapping[str, Term],
                expected: Mapping[str, tuple[float, float, str]]) -> None:
    """``terms`` has exactly the ``expected`` names, each with (value, weight, unit)."""
    assert sorted(terms) == sorted(expected)
    for name, (value, weight, unit) in expected.items():
        check_term(name, terms[name], value, weight, unit)


def seeded(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    """Standard normal values times ``scale`` from a private generator (float32)."""
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
