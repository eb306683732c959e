"""RSO (Random Search Optimization) as a ``torch.optim.Optimizer`` for any parameters.

One call to ``step(closure)`` is one *cycle*: every scalar of every parameter is visited once, in order::

    for each parameter tensor P (order: output-first = reverse registration order, or input-first):
        sigma <- annealed_sigma(sigma_P, cycle, cycles)       (constant when cycles is None)
        for each scalar w of P (flat, row-major: output channel, input channel, kernel row, column):
            before_visit()                                   (optional: e.g. draw the next mini-batch)
            dw ~ sampler(sigma)
            w0 <- w (1 - weight_decay)
            keep argmin over {L(w0), L(w0 + dw), L(w0 - dw)}  (ties keep w0; non-finite losses never win)

where ``L`` is ``closure()`` evaluated under ``torch.no_grad`` with the scalar set to the candidate.
A model with BatchNorm in train mode would update its running statistics on every candidate, rejected ones
included: evaluate such a model inside ``rso.engines.batch_statistics(model)``, as the MNIST trainer does.
"output-first" here is the reverse of the parameters' registration order, so a BN layer's beta and gamma come
before the conv they follow; the MNIST trainer's :func:`rso.search.visit.visit_order` visits the conv first, as
the authors' code does. Biases take ``vector_sigma``, where the trainer gives them their layer's He std.
:meth:`RSO.for_model` builds the optimizer with the trainer's order and sigmas instead. This is
the reference scoring: three full evaluations per scalar, nothing cached. Candidates come from
:func:`rso.search.candidate_values` and the choice from :func:`rso.search.select_candidate`, the same rule
as the MNIST trainer.

Differences from the paper, on purpose: the paper's sigma is ``std(W_d)`` at init; here ``sigma=None`` takes
the He std ``sqrt(2 / fan_in)`` of a tensor with 2 or more dimensions (what the authors' code uses) and
``vector_sigma`` (0.167, the authors' value for BN parameters) for vectors and scalars. After ``cycles``
cycles the last cycle's sigma is kept.

The generator and the cycle counter are part of ``state_dict()``, so a loaded optimizer continues exactly
as the saved one would have.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from rso.search import annealed_sigma, candidate_values, get_sampler, he_std, select_candidate
from rso.search.visit import visit_order

ORDERS = {
    "output-first": "reverse registration order: the layer nearest the loss first (BN parameters before their conv)",
    "input-first": "registration order: the first layer first",
}


class RSO(Optimizer):
    def __init__(
        self,
        params,
        sigma: float | None = None,
        cycles: int | None = None,
        final_fraction: float = 0.1,
        anneal: bool = True,
        weight_decay: float = 0.0,
        sampler: str = "gaussian",
        vector_sigma: float = 0.167,
        order: str = "output-first",
        generator: torch.Generator | None = None,
        seed: int = 0,
    ):
        if sigma is not None and not sigma > 0.0:
            raise ValueError(f"sigma must be positive or None, got {sigma}")
        if cycles is not None and (not isinstance(cycles, int) or cycles <= 0):
            raise ValueError(f"cycles must be a positive integer or None, got {cycles!r}")
        if not 0.0 < final_fraction <= 1.0:
            raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction}")
        if not 0.0 <= weight_decay < 1.0:
            raise ValueError(f"weight_decay must be in [0, 1), got {weight_decay}")
        if not vector_sigma > 0.0:
            raise ValueError(f"vector_sigma must be positive, got {vector_sigma}")
        get_sampler(sampler)  # raises a ValueError naming the choices
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
        defaults = dict(
            sigma=sigma, cycles=cycles, final_fraction=final_fraction, anneal=anneal,
            weight_decay=weight_decay, sampler=sampler, vector_sigma=vector_sigma,
        )
        super().__init__(params, defaults)
        self.order = order
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.cycle = 0
        self.evaluations = 0
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sigma"] = self.base_sigma(p, group)

    @classmethod
    def for_model(cls, model: torch.nn.Module, order: str = "output-first", bn_sigma: float = 0.167, **options) -> "RSO":
        """RSO over ``model`` with the MNIST trainer's visiting order and sigmas (:func:`rso.search.visit.visit_order`).

        Each conv/dense layer is visited before the beta and gamma of the BN that follows it, as in the authors'
        code; weights and biases take their layer's He std, BN parameters ``bn_sigma``.
        """
        if "sigma" in options:
            raise ValueError("for_model takes the sigmas from the model; use RSO(params, sigma=...) for one sigma")
        targets = visit_order(model, order, bn_sigma)
        groups = [{"params": [target.parameter], "sigma": target.sigma} for target in targets]
        return cls(groups, order="input-first", **options)  # the groups are already in visiting order

    @staticmethod
    def base_sigma(p: torch.Tensor, group: dict) -> float:
        if group["sigma"] is not None:
            return float(group["sigma"])
        if p.dim() >= 2:
            return he_std(p[0].numel())
        return float(group["vector_sigma"])

    def visit_order(self) -> list[tuple[dict, torch.Tensor]]:
        pairs = [(group, p) for group in self.param_groups for p in group["params"]]
        return pairs[::-1] if self.order == "output-first" else pairs

    def current_sigma(self, p: torch.Tensor, group: dict) -> float:
        cycles = group["cycles"]
        if cycles is None:
            return self.state[p]["sigma"]
        return annealed_sigma(self.state[p]["sigma"], min(self.cycle, cycles - 1), cycles, group["final_fraction"], group["anneal"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None, before_visit: Callable[[], None] | None = None):
        """Run one cycle over all scalars; return the loss of the last accepted candidate."""
        if closure is None:
            raise ValueError("RSO.step needs a closure that returns the loss (it is called 3 times per scalar)")
        loss = None
        for group, p in self.visit_order():
            sampler = get_sampler(group["sampler"])
            sigma = self.current_sigma(p, group)
            steps = sampler(sigma, p.numel(), self.generator)
            flat = p.view(-1) if p.is_contiguous() else None
            if flat is None:
                raise ValueError("RSO needs contiguous parameters; call .contiguous() on the parameter before training")
            for j in range(p.numel()):
                if before_visit is not None:
                    before_visit()
                original = float(flat[j])
                values = candidate_values(original, float(steps[j]), group["weight_decay"])
                losses = torch.empty(3, dtype=torch.float64)
                for k in range(3):
                    flat[j] = values[k]
                    losses[k] = float(closure())
                self.evaluations += 3
                choice = select_candidate(losses)
                if choice < 0:
                    flat[j] = original
                    raise RuntimeError(f"RSO: every candidate loss was non-finite ({losses.tolist()}) at a scalar of a parameter of shape {tuple(p.shape)}")
                flat[j] = values[choice]
                loss = float(losses[choice])
        self.cycle += 1
        return loss

    def state_dict(self):
        state = super().state_dict()
        state["rso"] = {"cycle": self.cycle, "evaluations": self.evaluations, "generator_state": self.generator.get_state(), "order": self.order}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("rso", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.cycle = int(extra["cycle"])
            self.evaluations = int(extra["evaluations"])
            self.generator.set_state(extra["generator_state"])
            self.order = extra["order"]


def rso_parameters(module: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
    """The parameters RSO should search: those that require grad (frozen ones are left alone)."""
    return [p for p in module.parameters() if p.requires_grad]
