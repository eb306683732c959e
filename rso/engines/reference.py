"""The reference engine: one full forward pass per candidate. Slow, obviously correct: the test oracle."""

from __future__ import annotations

import torch

from rso.engines.base import ScoringEngine, batch_statistics, summed_cross_entropy


class ReferenceEngine(ScoringEngine):
    """Works for any ``nn.Module`` on any device: sets the weight, runs the whole model, restores it."""

    name = "reference"

    def score(self, index: int, values: torch.Tensor, chunk: int) -> torch.Tensor:
        rows = self.partition.indices(chunk)
        images, labels = self.images[rows], self.labels[rows]
        flat = self.target.parameter.data.view(-1)
        original = flat[index].clone()
        losses = torch.empty(len(values), dtype=torch.float64)
        try:
            with torch.no_grad(), batch_statistics(self.model):
                for k, value in enumerate(values.tolist()):
                    flat[index] = value
                    losses[k] = summed_cross_entropy(self.model(images), labels)
        finally:
            flat[index] = original
        return losses
