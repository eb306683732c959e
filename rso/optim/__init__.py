"""Optimizers for the landscape and overparameterization studies, registered by name.

``OPTIMIZERS[name] = (factory, description)``; every factory is ``factory(params, lr=None, generator=None,
**options)`` and returns a ``torch.optim.Optimizer``. ``lr`` is the one step-size knob: for RSO it is sigma
(the scale of the random steps), and the param groups' ``lr`` stays a factor 1.0 on it that torch's schedulers
scale. ``generator`` feeds the optimizers that draw random numbers.
torch.optim provides most of the family; only AdaGrad with accumulator decay, SGD with gradient noise and
RSO are written here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.optim import Optimizer

from rso.optim.adagrad_decay import AdagradDecay
from rso.optim.noisy_sgd import NoisySGD
from rso.optim.rso import RSO
from rso.optim.schedules import SCHEDULES, make_schedule

Factory = Callable[..., Optimizer]


def _lr(lr: float | None, default: float) -> float:
    return default if lr is None else float(lr)


def _sgd(params, lr=None, generator=None, **options):
    return torch.optim.SGD(params, lr=_lr(lr, 0.1), **options)


def _momentum(params, lr=None, generator=None, **options):
    options.setdefault("momentum", 0.9)
    return torch.optim.SGD(params, lr=_lr(lr, 0.05), **options)


def _nesterov(params, lr=None, generator=None, **options):
    options.setdefault("momentum", 0.9)
    return torch.optim.SGD(params, lr=_lr(lr, 0.05), nesterov=True, **options)


def _adagrad(params, lr=None, generator=None, **options):
    return torch.optim.Adagrad(params, lr=_lr(lr, 0.5), **options)


def _rmsprop(params, lr=None, generator=None, **options):
    options.setdefault("alpha", 0.9)  # the course's gamma
    return torch.optim.RMSprop(params, lr=_lr(lr, 0.05), **options)


def _adadelta(params, lr=None, generator=None, **options):
    options.setdefault("rho", 0.95)
    options.setdefault("eps", 1e-6)
    return torch.optim.Adadelta(params, lr=_lr(lr, 1.0), **options)


def _adam(params, lr=None, generator=None, **options):
    return torch.optim.Adam(params, lr=_lr(lr, 0.1), **options)


def _adagrad_decay(params, lr=None, generator=None, **options):
    options.setdefault("decay", 0.1)
    return AdagradDecay(params, lr=_lr(lr, 0.5), **options)


def _noisy_sgd(params, lr=None, generator=None, **options):
    return NoisySGD(params, lr=_lr(lr, 0.05), generator=generator, **options)


def _rso(params, lr=None, generator=None, **options):
    if lr is not None:
        options.setdefault("sigma", float(lr))  # the group's lr stays 1.0: the factor schedulers scale
    return RSO(params, generator=generator, **options)


OPTIMIZERS: dict[str, tuple[Factory, str]] = {
    "sgd": (_sgd, "gradient descent (torch.optim.SGD)"),
    "momentum": (_momentum, "SGD with momentum 0.9, a leaky average of gradients (torch.optim.SGD)"),
    "nesterov": (_nesterov, "SGD with Nesterov momentum 0.9 (torch.optim.SGD)"),
    "adagrad": (_adagrad, "AdaGrad: per-coordinate steps shrink with the summed squared gradients (torch.optim.Adagrad)"),
    "rmsprop": (_rmsprop, "RMSProp with gamma 0.9 (torch.optim.RMSprop)"),
    "adadelta": (_adadelta, "AdaDelta with rho 0.95, eps 1e-6 (torch.optim.Adadelta)"),
    "adam": (_adam, "Adam (torch.optim.Adam)"),
    "adagrad-decay": (_adagrad_decay, "AdaGrad whose accumulator decays: gsum += g^2 - r gsum, r = 0.1 (rso.optim)"),
    "noisy-sgd": (_noisy_sgd, "SGD on the gradient plus N(0, 1) noise (rso.optim)"),
    "rso": (_rso, "Random Search Optimization: keep the best of w, w + dw, w - dw per scalar; lr is sigma (rso.optim)"),
}

GRADIENT_FREE = frozenset({"rso"})


def make_optimizer(name: str, params, lr: float | None = None, generator: torch.Generator | None = None, **options) -> Optimizer:
    try:
        factory = OPTIMIZERS[name][0]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    return factory(params, lr=lr, generator=generator, **options)


def optimizer_step(optimizer: Optimizer, loss_fn: Callable[[], torch.Tensor], clip_grad_norm: float | None = None) -> float:
    """One step of any registered optimizer on ``loss_fn``; returns the loss before the step.

    Gradient optimizers get ``zero_grad``, ``backward``, optional norm clipping, ``step``. RSO gets the
    closure (one cycle over all scalars) and returns the loss after its cycle; the closure runs under
    ``no_grad`` (RSO never reads gradients, and recording the graph for every candidate costs about 2x).
    """
    if isinstance(optimizer, RSO):
        return float(optimizer.step(torch.no_grad()(loss_fn)))
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    if clip_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    optimizer.step()
    return float(loss.detach())


__all__ = [
    "AdagradDecay", "GRADIENT_FREE", "NoisySGD", "OPTIMIZERS", "RSO", "SCHEDULES",
    "make_optimizer", "make_schedule", "optimizer_step",
]
