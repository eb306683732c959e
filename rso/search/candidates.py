"""The three candidates of one weight visit, and the rule that picks one.

A visit to weight ``w`` with step ``dw`` scores ``[w0, w0 + dw, w0 - dw]`` where ``w0 = w * (1 - weight_decay)``
(the authors' code decays the current weight on every visit; with ``weight_decay = 0`` it is the paper's rule).
The lowest loss wins; ties keep the earlier candidate, so the current weight wins every tie.
Non-finite losses never win.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# A sampler draws ``n`` steps of scale ``sigma`` from a ``torch.Generator``.
Sampler = Callable[[float, int, torch.Generator], torch.Tensor]


def gaussian_steps(sigma: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """dw ~ N(0, sigma^2): the paper's sampler."""
    return torch.randn(n, generator=generator, dtype=torch.float64) * sigma


def uniform_steps(sigma: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """dw ~ U(-2 sigma, 2 sigma): an ablation."""
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 4.0 - 2.0) * sigma


def fixed_steps(sigma: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """dw = sigma (the candidates are then w - sigma, w, w + sigma): an ablation."""
    return torch.full((n,), float(sigma), dtype=torch.float64)


SAMPLERS: dict[str, tuple[Sampler, str]] = {
    "gaussian": (gaussian_steps, "dw ~ N(0, sigma^2), as in the paper"),
    "uniform": (uniform_steps, "dw ~ U(-2 sigma, 2 sigma)"),
    "fixed": (fixed_steps, "dw = sigma: candidates w - sigma, w, w + sigma"),
}


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name][0]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def candidate_values(weight: float, step: float, weight_decay: float = 0.0) -> torch.Tensor:
    """``[w0, w0 + dw, w0 - dw]`` in float64, with ``w0 = w * (1 - weight_decay)``."""
    current = float(weight) * (1.0 - weight_decay)
    return torch.tensor([current, current + step, current - step], dtype=torch.float64)


def select_candidate(losses: torch.Tensor, values: torch.Tensor | None = None) -> int:
    """Index of the lowest finite loss; the first index wins ties (index 0 is the current weight).

    A loss of NaN or +-infinity never wins, nor (when ``values`` are given) a candidate whose value is not
    finite. Returns -1 when no candidate qualifies, so the caller can stop with a clear error.
    """
    scores = [float(v) for v in losses.detach().cpu().reshape(-1)]
    allowed = [True] * len(scores) if values is None else \
        [math.isfinite(float(v)) for v in values.detach().cpu().reshape(-1)]
    best, best_index = math.inf, -1
    for index, (score, ok) in enumerate(zip(scores, allowed)):
        if ok and math.isfinite(score) and score < best:
            best, best_index = score, index
    return best_index
