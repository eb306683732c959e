"""A registry of named models, each built with the paper's He initialization.

Every model is an ``nn.Sequential`` of standard layers (Conv2d, BatchNorm2d, ReLU, pooling, Flatten, Linear),
so the fast scoring engine can walk it layer by layer. ``MODELS`` maps a name to ``(builder, description)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

Builder = Callable[..., nn.Sequential]
MODELS: dict[str, tuple[Builder, str]] = {}


def register(name: str, description: str) -> Callable[[Builder], Builder]:
    def decorator(builder: Builder) -> Builder:
        MODELS[name] = (builder, description)
        return builder
    return decorator


def he_init_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Paper init: every conv/dense weight ~ N(0, sqrt(2 / fan_in)); biases 0; BN gamma 1, beta 0."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                module.reset_parameters()
    return model


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


@register("paper6", "the paper's MNIST net: 6 conv 3x3 (16 ch, BN, ReLU), avg-pool after conv1 and conv3, GAP, dense 16->10")
def paper_convnet(depth: int = 6, channels: int = 16) -> nn.Sequential:
    """The authors' MNIST design with ``depth`` conv layers (1..6); pooling after conv1 and conv3 as in the paper."""
    if not 1 <= depth <= 6:
        raise ValueError(f"depth must be in 1..6, got {depth}")
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    layers: list[nn.Module] = []
    for index in range(depth):
        layers += conv_bn_relu(1 if index == 0 else channels, channels)
        if index in (1, 3) and index != depth - 1:
            layers.append(nn.AvgPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10, bias=False)]
    return nn.Sequential(*layers)


@register("convnet", "the paper's design with --depth conv layers (1-6) and --channels channels")
def convnet(depth: int = 6, channels: int = 16) -> nn.Sequential:
    return paper_convnet(depth=depth, channels=channels)


@register("oneconv", "course net: conv 3x3 1->4 (+bias), ReLU, 2x2 max pool, dense 784->10")
def oneconv() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(784, 10))


@register("twoconv", "course net: conv 3x3 1->4, ReLU, max pool, conv 3x3 4->8, ReLU, max pool, dense 392->10")
def twoconv() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(392, 10),
    )


@register("mlp", "multilayer perceptron 784 -> widths -> 10 with ReLU (--widths, default 128)")
def mlp(widths: tuple[int, ...] = (128,)) -> nn.Sequential:
    if any(width < 1 for width in widths):
        raise ValueError(f"widths must be positive, got {list(widths)}")
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = [784, *widths]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], 10))
    return nn.Sequential(*layers)


def build_model(name: str, generator: torch.Generator | None = None, **options) -> nn.Sequential:
    """Build model ``name`` with He init drawn from ``generator``; ``options`` go to its builder (unused ones are dropped)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    builder = MODELS[name][0]
    accepted = builder.__code__.co_varnames[: builder.__code__.co_argcount]
    model = builder(**{key: value for key, value in options.items() if key in accepted and value is not None})
    return he_init_(model, generator)


def count_weights(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


__all__ = ["MODELS", "build_model", "count_weights", "he_init_", "register"]
