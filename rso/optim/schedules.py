"""Learning-rate schedules of the course notes, built from ``torch.optim.lr_scheduler``.

``t`` counts scheduler steps (call ``scheduler.step()`` once per optimizer step):

- constant:     lr
- piecewise:    lr, then lr * 0.5 at each milestone (MultiStepLR)
- exponential:  lr * exp(-0.1 t)                     (ExponentialLR, gamma = exp(-0.1))
- polynomial:   lr * (1 + 0.1 t)^-0.5                (LambdaLR; torch's PolynomialLR is a different curve,
                                                      (1 - t / total)^power, so it is not used here)
"""

from __future__ import annotations

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, ExponentialLR, LambdaLR, LRScheduler, MultiStepLR


def constant(optimizer: Optimizer, steps: int = 0) -> LRScheduler:
    return ConstantLR(optimizer, factor=1.0, total_iters=0)


def piecewise(optimizer: Optimizer, steps: int = 100) -> LRScheduler:
    milestones = [max(1, steps // 3), max(2, 2 * steps // 3)]
    return MultiStepLR(optimizer, milestones=milestones, gamma=0.5)


def exponential(optimizer: Optimizer, steps: int = 0, rate: float = 0.1) -> LRScheduler:
    return ExponentialLR(optimizer, gamma=math.exp(-rate))


def polynomial(optimizer: Optimizer, steps: int = 0, rate: float = 0.1, power: float = 0.5) -> LRScheduler:
    return LambdaLR(optimizer, lambda t: (1.0 + rate * t) ** -power)


SCHEDULES: dict[str, tuple[Callable[..., LRScheduler], str]] = {
    "constant": (constant, "lr unchanged"),
    "piecewise": (piecewise, "lr halved at 1/3 and 2/3 of the run (MultiStepLR)"),
    "exponential": (exponential, "lr * exp(-0.1 t) (ExponentialLR)"),
    "polynomial": (polynomial, "lr * (1 + 0.1 t)^-0.5 (LambdaLR)"),
}


def make_schedule(name: str, optimizer: Optimizer, steps: int = 100) -> LRScheduler:
    try:
        factory = SCHEDULES[name][0]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
    return factory(optimizer, steps=steps)
