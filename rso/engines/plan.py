"""Walk an ``nn.Sequential`` into what the fast engine needs: which layers it can handle, where a sweep's
searched layer sits, the per-channel block after it, and the next linear layer.

A *linear layer* is a Conv2d or Linear: the only layers that mix channels. Everything between two linear
layers (BatchNorm, ReLU, pooling, global pooling, flatten) acts on each channel alone, so a change confined to
one channel of a linear layer's output stays in that channel until the next linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rso.search.visit import SearchTarget

LINEAR_LAYERS = (nn.Conv2d, nn.Linear)
CHANNEL_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
                  nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast engine cannot score ``model`` (``None`` when it can).

    Checks the layer types and that the tensor layout flows: spatial (N, C, H, W) from the input until a
    Flatten, flat (N, F) after it, and a flat output (the logits).
    """
    if not isinstance(model, nn.Sequential):
        return f"not an nn.Sequential ({type(model).__name__})"
    spatial = True
    for index, layer in enumerate(model):
        where = f"layer {index} ({type(layer).__name__})"
        if not isinstance(layer, LINEAR_LAYERS + CHANNEL_LAYERS):
            return f"{where} is not supported"
        if any(True for _ in layer.children()):
            return f"{where} has children"
        if isinstance(layer, nn.Conv2d):
            if not spatial or layer.groups != 1 or layer.padding_mode != "zeros":
                return f"{where}: needs groups=1, zero padding and a spatial input"
        elif isinstance(layer, (nn.BatchNorm2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            if not spatial:
                return f"{where} needs a spatial input"
            if isinstance(layer, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) and layer.return_indices:
                return f"{where} returns indices"
        elif isinstance(layer, (nn.Linear, nn.BatchNorm1d)):
            if spatial:
                return f"{where} needs a flat input"
        elif isinstance(layer, nn.Flatten):
            if not spatial or layer.start_dim != 1 or layer.end_dim != -1:
                return f"{where}: only Flatten(1, -1) of a spatial input"
            spatial = False
    if spatial:
        return "the output is not flat logits"
    return None


@dataclass
class SweepPlan:
    """Where the searched tensor sits: ``layers[:searched]`` is the cached prefix, ``block`` the per-channel
    layers after it (starting with the searched layer itself when it is a BatchNorm), ``next_layer`` the
    first linear layer after the block (``None`` when the block reaches the output), ``suffix`` the layers
    after ``next_layer``, recomputed in full for each candidate."""

    layers: list[nn.Module]
    searched: int
    block: list[nn.Module]
    next_layer: nn.Module | None
    next_index: int          # index of next_layer, or len(layers)
    suffix: list[nn.Module]
    spatial: bool            # layout of the searched layer's output channel

    @property
    def head_only(self) -> bool:
        """The searched layer is a Linear whose output is the logits: the closed-form dense-head case."""
        return isinstance(self.layers[self.searched], nn.Linear) and not self.block and self.next_layer is None


def plan_sweep(model: nn.Sequential, target: SearchTarget) -> SweepPlan:
    layers = list(model)
    searched = next(index for index, layer in enumerate(layers) if layer is target.module)
    start = searched if isinstance(layers[searched], (nn.BatchNorm1d, nn.BatchNorm2d)) else searched + 1
    end = start
    while end < len(layers) and not isinstance(layers[end], LINEAR_LAYERS):
        end += 1
    next_layer = layers[end] if end < len(layers) else None
    spatial = isinstance(layers[searched], (nn.Conv2d, nn.BatchNorm2d))
    return SweepPlan(layers, searched, layers[start:end], next_layer, end, layers[end + 1:], spatial)


@dataclass(frozen=True)
class ChannelOps:
    """A run of per-channel layers that the numba kernels do in two passes over a channels-last tensor:
    an optional BatchNorm2d (batch statistics), an optional ReLU, an optional 2x2/global pooling, in this order.
    (Pooling before a BN, as in the authors' network, is a group of its own: pooling only.)"""

    layers: tuple[nn.Module, ...]
    batchnorm: nn.BatchNorm2d | None
    relu: bool
    pool: str        # "none", "avg2", "max2", "global" (average) or "global-max"


def _pool_kind(layer: nn.Module) -> str | None:
    """The kernels' name for a pooling layer they compute exactly, else ``None``."""
    def pair(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if isinstance(layer, nn.AvgPool2d):
        plain = (pair(layer.kernel_size) == (2, 2) and pair(layer.stride) == (2, 2) and pair(layer.padding) == (0, 0)
                 and not layer.ceil_mode and layer.divisor_override is None)
        return "avg2" if plain else None
    if isinstance(layer, nn.MaxPool2d):
        plain = (pair(layer.kernel_size) == (2, 2) and pair(layer.stride) == (2, 2) and pair(layer.padding) == (0, 0)
                 and pair(layer.dilation) == (1, 1) and not layer.ceil_mode and not layer.return_indices)
        return "max2" if plain else None
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return "global" if pair(layer.output_size) == (1, 1) else None
    if isinstance(layer, nn.AdaptiveMaxPool2d):
        return "global-max" if pair(layer.output_size) == (1, 1) and not layer.return_indices else None
    return None


def group_channel_ops(layers: list[nn.Module]) -> list[nn.Module | ChannelOps]:
    """``layers`` (whose input is spatial) with each run of BN -> ReLU -> pooling replaced by one
    :class:`ChannelOps`.

    A run that does not fit the pattern (another order, an unusual pooling) stays as its layers. Only the
    spatial part is grouped: the walk stops at the first Flatten.
    """
    grouped: list[nn.Module | ChannelOps] = []
    position = 0
    while position < len(layers):
        layer = layers[position]
        if isinstance(layer, nn.Flatten):
            return grouped + list(layers[position:])
        start, batchnorm, relu, pool = position, None, False, "none"
        if isinstance(layer, nn.BatchNorm2d):
            batchnorm, position = layer, position + 1
        if position < len(layers) and isinstance(layers[position], nn.ReLU):
            relu, position = True, position + 1
        if position < len(layers) and _pool_kind(layers[position]) is not None:
            pool, position = _pool_kind(layers[position]), position + 1
        if position == start:
            grouped.append(layer)
            position += 1
        else:
            grouped.append(ChannelOps(tuple(layers[start:position]), batchnorm, relu, pool))
    return grouped


class PooledConv(nn.Conv2d):
    """A stride-1 convolution followed by a 2x2 average pooling, as one convolution: kernel one larger in each
    direction, stride 2, the same padding, weight ``K'[u, v] = (K[u, v] + K[u-1, v] + K[u, v-1] + K[u-1, v-1]) / 4``
    (``K`` zero outside its support). Equal to ``avg_pool2d(conv2d(x, K), 2)`` up to rounding, with the output
    size pooling gives (odd sizes drop the last row/column, as the pooling does), for a quarter of the outputs
    and (k+1)^2 / (4 k^2) of the work: paper6's 3x3 conv before a pooling takes 0.4x the time (2.4x less with
    the pooling pass it replaces). Built from the layers' weights as they are; a copy, not a view."""

    def __init__(self, conv: nn.Conv2d):
        height, width = conv.kernel_size
        super().__init__(conv.in_channels, conv.out_channels, (height + 1, width + 1), stride=2,
                         padding=conv.padding, bias=conv.bias is not None, device=conv.weight.device,
                         dtype=conv.weight.dtype)
        with torch.no_grad():
            kernel = conv.weight.detach()
            box = torch.full((1, 1, 2, 2), 0.25, dtype=kernel.dtype, device=kernel.device)
            folded = F.conv_transpose2d(kernel.reshape(-1, 1, height, width), box)
            self.weight.copy_(folded.reshape(self.weight.shape))
            if conv.bias is not None:
                self.bias.copy_(conv.bias.detach())
        self.requires_grad_(False)
        self.source = (conv,)     # a tuple: not a registered submodule

    def reset_parameters(self) -> None:
        """Nothing: the weights are copied from the folded conv (``nn.Conv2d`` would draw a random init from the
        global generator first, on every sweep)."""


def _foldable(conv: nn.Module, pool: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and not isinstance(conv, PooledConv) and _pool_kind(pool) == "avg2"
            and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros")


def fold_pooled_convs(layers: list[nn.Module]) -> list[nn.Module]:
    """``layers`` with each stride-1 Conv2d that a plain 2x2 average pooling follows replaced by one
    :class:`PooledConv` (the pooling dropped). For layers whose weights stay fixed while the result is used."""
    folded: list[nn.Module] = []
    position = 0
    while position < len(layers):
        if position + 1 < len(layers) and _foldable(layers[position], layers[position + 1]):
            folded.append(PooledConv(layers[position]))
            position += 2
        else:
            folded.append(layers[position])
            position += 1
    return folded
