"""SGD with injected Gaussian gradient noise (the course's "SGD" on deterministic test functions).

Each step uses ``g + noise * n`` with ``n ~ N(0, 1)`` drawn from the optimizer's own ``torch.Generator``::

    x <- x - lr * (g + noise * n)

so a stochastic gradient can be simulated on a deterministic function. With ``noise = 0`` it is plain SGD.
The generator's state is saved in ``state_dict()``, so a resumed run draws the same noise.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class NoisySGD(Optimizer):
    def __init__(self, params, lr: float = 0.1, noise: float = 1.0, generator: torch.Generator | None = None, seed: int = 0):
        if not lr > 0.0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not noise >= 0.0:
            raise ValueError(f"noise must be non-negative, got {noise}")
        super().__init__(params, dict(lr=lr, noise=noise))
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

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
                noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype)
                p.add_(p.grad + group["noise"] * noise, alpha=-group["lr"])
        return loss

    def state_dict(self):
        state = super().state_dict()
        state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if generator_state is not None:
            self.generator.set_state(generator_state)
