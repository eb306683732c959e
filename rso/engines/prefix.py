"""The prefix-cache engine: what the authors' code does, the honest anchor for the fast engine.

Before a layer's sweep the activations below the searched layer are cached per chunk (nothing below it
changes during the sweep); every candidate is then forwarded from the searched layer up to the loss, in
channels-last layout (about twice the rate of NCHW for 16-channel 3x3 convolutions on CPU). Exact: the same
layers on the same inputs as the reference, minus the frozen prefix. A user without the fast engine's
one-channel increments would write this.
"""

from __future__ import annotations

import torch
from torch import nn

from rso.distributed import LOCAL, World
from rso.engines.base import (ChunkPartition, FixedStatistics, ScoringEngine, channels_last, return_freed_memory,
                              summed_cross_entropy)
from rso.search.visit import SearchTarget


class PrefixCacheEngine(ScoringEngine):
    """Cached input of the searched layer per chunk; each candidate runs the layers from it to the logits."""

    name = "prefix-cache"

    def __init__(self, world: World = LOCAL):
        self.world = world

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return isinstance(model, nn.Sequential)

    def begin_sweep(self, model: nn.Module, target: SearchTarget, images: torch.Tensor, labels: torch.Tensor,
                    partition: ChunkPartition, fixed: FixedStatistics | None = None) -> None:
        if not isinstance(model, nn.Sequential):
            raise ValueError("the prefix-cache engine needs an nn.Sequential; use --engine reference")
        super().begin_sweep(model, target, images, labels, partition, fixed)
        layers = list(model)
        self.searched = next(index for index, layer in enumerate(layers) if target.module is layer)
        self.prefix, self.rest = layers[:self.searched], layers[self.searched:]
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def release(self, chunk: int) -> None:
        self.cache.pop(chunk, None)

    def end_sweep(self) -> None:
        self.cache = {}
        return_freed_memory()

    @torch.no_grad()
    def _inputs(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self.cache.get(chunk)
        if cached is None:
            rows = self.partition.indices(chunk)
            x = self.images[rows]
            with self.world.batch_statistics(self.model, self.fixed):
                for layer in self.prefix:
                    x = layer(x)
            if x.dim() == 4:    # (a one-channel input too: its conv then writes channels-last)
                x = channels_last(x)
            cached = self.cache[chunk] = (x, self.labels[rows])
        return cached

    @torch.no_grad()
    def score(self, index: int, values: torch.Tensor, chunk: int) -> torch.Tensor:
        x0, labels = self._inputs(chunk)
        flat = self.target.parameter.data.view(-1)
        original = flat[index].clone()
        losses = torch.empty(len(values), dtype=torch.float64)
        try:
            with self.world.batch_statistics(self.model, self.fixed):
                for k, value in enumerate(values.tolist()):
                    flat[index] = value
                    x = x0
                    for layer in self.rest:
                        x = layer(x)
                    losses[k] = summed_cross_entropy(x, labels)
        finally:
            flat[index] = original
        return self.world.sum(losses)
