"""A registry of named models, each built with the paper's He initialization.

Every model is an ``nn.Sequential`` of standard layers (Conv2d, BatchNorm2d, ReLU, pooling, Flatten, Linear),
so the fast scoring engine can walk it layer by layer. ``MODELS`` maps a name to ``(builder, description)``;
``INPUT_TRANSFORMS`` maps it to the input transform it is trained with by default (see
:data:`rso.data.INPUT_TRANSFORMS`): ``paper6`` takes the authors' (pixels / 255 minus the training mean),
every other model standardizes with the MNIST mean and std.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

Builder = Callable[..., nn.Sequential]
MODELS: dict[str, tuple[Builder, str]] = {}
INPUT_TRANSFORMS: dict[str, str] = {}


def register(name: str, description: str, input_transform: str = "standardize") -> Callable[[Builder], Builder]:
    def decorator(builder: Builder) -> Builder:
        MODELS[name] = (builder, description)
        INPUT_TRANSFORMS[name] = input_transform
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


AUTHORS_BN_EPS = 1e-3     # MXNet's BatchNorm default, which the authors' code keeps
AUTHORS_POOLED = (1, 3)   # the authors' pool_index for 6 layers: 2x2 average pooling after conv1 and conv3


def _check_depth_and_channels(depth: int, channels: int) -> None:
    if not 1 <= depth <= 6:
        raise ValueError(f"depth must be in 1..6, got {depth}")
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")


def authors_convnet(depth: int = 6, channels: int = 16) -> nn.Sequential:
    """The ``forward`` of the authors' ``CNN_ND`` (rohun-tripathi/RSO-gradient-free, ``train.py``), layer for layer::

        for l in 0..depth-1:
            if l > 0: x = relu(x)                       # the ReLU opens the next layer: none after the last BN
            x = conv3x3(x, channels, padding 1, no bias)
            if l in (1, 3): x = avg_pool2d(x, 2)         # pooling BEFORE the BatchNorm
            x = batch_norm(x, eps=1e-3)
        x = global max pooling                          # MXNet's global_pool default pool_type is max
        logits = x @ W (channels -> 10, no bias)

    ``paper6`` is ``depth=6, channels=16`` (11,824 conv/dense weights, 192 BN parameters); other depths and
    widths keep the same layer pattern (the exactness tests use narrow copies).
    """
    _check_depth_and_channels(depth, channels)
    layers: list[nn.Module] = []
    for index in range(depth):
        if index > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Conv2d(1 if index == 0 else channels, channels, 3, padding=1, bias=False))
        if index in AUTHORS_POOLED:
            layers.append(nn.AvgPool2d(2))
        layers.append(nn.BatchNorm2d(channels, eps=AUTHORS_BN_EPS))
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(channels, 10, bias=False)]
    return nn.Sequential(*layers)


def paper_convnet_cbr(depth: int = 6, channels: int = 16) -> nn.Sequential:
    """Conv -> BN -> ReLU blocks with ``depth`` conv layers (1..6), pooling after conv1 and conv3.

    It differs from the authors' network (:func:`authors_convnet`) in the order inside a layer (BN and ReLU
    before the pooling), a ReLU after the last BN, global average instead of max pooling, and BN eps 1e-5.
    """
    _check_depth_and_channels(depth, channels)
    layers: list[nn.Module] = []
    for index in range(depth):
        layers += conv_bn_relu(1 if index == 0 else channels, channels)
        if index in AUTHORS_POOLED and index != depth - 1:
            layers.append(nn.AvgPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10, bias=False)]
    return nn.Sequential(*layers)


@register("paper6", "the authors' MNIST net exactly: 6 x [ReLU (not before conv0)] conv 3x3 16 ch (no bias) "
                    "[avg-pool 2x2 after conv1, conv3] BN(eps 1e-3); no ReLU after BN5; global MAX pool; dense 16->10 "
                    "(no bias); inputs /255 minus the training mean", input_transform="center")
def paper6() -> nn.Sequential:
    return authors_convnet(depth=6, channels=16)


@register("paper6-cbr", "a variant of the paper's net (this project's paper6 before 2026-11-30): 6 x conv 3x3 16 ch "
                        "-> BN (eps 1e-5) -> ReLU, avg-pool after the ReLU of conv1 and conv3, a ReLU after the last "
                        "BN, global AVERAGE pool, dense 16->10; inputs standardized")
def paper6_cbr() -> nn.Sequential:
    return paper_convnet_cbr(depth=6, channels=16)


@register("convnet", "the paper6-cbr family (conv -> BN -> ReLU, global average pool) with --depth conv layers "
                     "(1-6) and --channels channels; the depth experiment's family")
def convnet(depth: int = 6, channels: int = 16) -> nn.Sequential:
    return paper_convnet_cbr(depth=depth, channels=channels)


@register("authors-convnet", "the authors' layer pattern (paper6's) with --depth conv layers (1-6) and --channels "
                             "channels", input_transform="center")
def authors_convnet_family(depth: int = 6, channels: int = 16) -> nn.Sequential:
    return authors_convnet(depth=depth, channels=channels)


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


__all__ = ["INPUT_TRANSFORMS", "MODELS", "authors_convnet", "build_model", "count_weights", "he_init_", "register"]
