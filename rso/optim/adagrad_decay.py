"""AdaGrad whose squared-gradient accumulator decays (the course's "gsum regularization").

For each parameter, with gradient ``g``::

    gsum <- gsum + g^2 - r * gsum          (gsum starts at initial_accumulator_value = 1)
    x    <- x - lr * g / (sqrt(gsum) + eps)

``r = 0`` is plain AdaGrad and then equals ``torch.optim.Adagrad(initial_accumulator_value=1)`` step for
step (the tests check that). ``0 < r < 1`` lets old gradients fade, so the step size stops shrinking
for ever. Gradient-norm clipping (the course clips at 5) belongs in the loop:
``torch.nn.utils.clip_grad_norm_(params, 5.0)`` before ``step()``.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class AdagradDecay(Optimizer):
    def __init__(self, params, lr: float = 0.1, decay: float = 0.0, eps: float = 1e-10, initial_accumulator_value: float = 1.0):
        if not lr > 0.0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay (r) must be in [0, 1), got {decay}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        if not initial_accumulator_value >= 0.0:
            raise ValueError(f"initial_accumulator_value must be non-negative, got {initial_accumulator_value}")
        defaults = dict(lr=lr, decay=decay, eps=eps, initial_accumulator_value=initial_accumulator_value)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.full_like(p, group["initial_accumulator_value"])
                grad, gsum = p.grad, state["sum"]
                gsum.mul_(1.0 - group["decay"]).addcmul_(grad, grad)  # gsum + g^2 - r gsum
                p.addcdiv_(grad, gsum.sqrt().add_(group["eps"]), value=-group["lr"])
        return loss
