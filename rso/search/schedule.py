"""Step-size schedules for RSO.

The paper anneals each layer's sigma linearly over the cycles so that the last cycle uses sigma / 10.
The authors' public code writes this as ``sigma * (0.1 + 0.9 * (C - e) / C)`` for cycle ``e = 0..C-1``;
that is what :func:`annealed_sigma` computes (with ``final_fraction = 0.1``).
"""

from __future__ import annotations

import math


def annealed_sigma(sigma: float, cycle: int, cycles: int, final_fraction: float = 0.1, anneal: bool = True) -> float:
    """Sigma used in ``cycle`` (0-based) of ``cycles``: linear from ``sigma`` towards ``final_fraction * sigma``.

    With the authors' formula the first cycle uses the full sigma and the last one
    ``sigma * (final_fraction + (1 - final_fraction) / cycles)``; the schedule never grows.
    """
    if cycles <= 0:
        raise ValueError(f"cycles must be positive, got {cycles}")
    if not 0 <= cycle < cycles:
        raise ValueError(f"cycle must be in [0, {cycles}), got {cycle}")
    if not 0.0 < final_fraction <= 1.0:
        raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction}")
    if not anneal:
        return float(sigma)
    return float(sigma) * (final_fraction + (1.0 - final_fraction) * (cycles - cycle) / cycles)


def he_std(fan_in: int) -> float:
    """He (Kaiming) standard deviation ``sqrt(2 / fan_in)``: the paper's init and per-layer sigma."""
    if fan_in <= 0:
        raise ValueError(f"fan_in must be positive, got {fan_in}")
    return math.sqrt(2.0 / fan_in)
