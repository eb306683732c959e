"""The reference engine: one full forward pass per candidate. Slow, obviously correct: the test oracle."""

from __future__ import annotations

import torch

from rso.distributed import LOCAL, World
from rso.engines.base import ScoringEngine, summed_cross_entropy


class ReferenceEngine(ScoringEngine):
    """Works for any ``nn.Module`` on any device: sets the weight, runs the whole model, restores it.

    With several workers each runs its share of the chunk; BN layers normalize by the whole chunk's
    statistics and the losses are summed over the ranks (:class:`rso.distributed.World`).
    """

    name = "reference"

    def __init__(self, world: World = LOCAL):
        self.world = world

    def score(self, index: int, values: torch.Tensor, chunk: int) -> torch.Tensor:
        rows = self.partition.indices(chunk)
        images, labels = self.images[rows], self.labels[rows]
        flat = self.target.parameter.data.view(-1)
        original = flat[index].clone()
        losses = torch.empty(len(values), dtype=torch.float64)
        try:
            with torch.no_grad(), self.world.batch_statistics(self.model, self.fixed):
                for k, value in enumerate(values.tolist()):
                    flat[index] = value
                    losses[k] = summed_cross_entropy(self.model(images), labels)
        finally:
            flat[index] = original
        return self.world.sum(losses)
