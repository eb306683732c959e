"""The interface every scoring engine implements: score the candidate values of one weight on one chunk."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Iterator

import torch
from torch import nn

from rso.distributed import LOCAL, World
from rso.search.visit import BATCHNORMS, SearchTarget


class ChunkPartition:
    """The training set shuffled once per layer sweep and cut into consecutive chunks of ``batch_size``.

    The remainder (``n mod batch_size`` examples) sits out this sweep, so every chunk has the same size and
    BN statistics are never taken over a tiny chunk. Visit ``j`` of a sweep uses chunk ``j mod n_chunks``.
    With several workers (``world``, see :mod:`rso.distributed`) ``indices`` is this rank's share of the chunk.
    """

    def __init__(self, order: torch.Tensor, batch_size: int, world: World = LOCAL):
        if batch_size < 1 or batch_size > order.numel():
            raise ValueError(f"batch_size must be in 1..{order.numel()}, got {batch_size}")
        if batch_size < world.size:
            raise ValueError(f"batch_size {batch_size} is smaller than the number of workers ({world.size})")
        self.order = order
        self.batch_size = batch_size
        self.n_chunks = order.numel() // batch_size
        self.world = world

    def rows(self, chunk: int) -> torch.Tensor:
        """Every example of chunk ``chunk`` (all ranks' shares)."""
        return self.order[chunk * self.batch_size:(chunk + 1) * self.batch_size]

    def indices(self, chunk: int) -> torch.Tensor:
        """The examples of chunk ``chunk`` this process scores: its share (all of them in a world of one)."""
        return self.world.share(self.rows(chunk))


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """BN layers normalize with the current batch's statistics and update no running statistics.

    Rejected candidates must leave no trace in the model, so scoring never touches running_mean/var.
    """
    saved = [(module, module.training, module.track_running_stats)
             for module in model.modules() if isinstance(module, BATCHNORMS)]
    try:
        for module, _, _ in saved:
            module.train()
            module.track_running_stats = False
        yield
    finally:
        for module, training, track in saved:
            module.train(training)
            module.track_running_stats = track


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy summed over the batch, in float64 (the authors' scoring)."""
    return torch.nn.functional.cross_entropy(logits.to(torch.float64), labels, reduction="sum")


class ScoringEngine(ABC):
    """Scores candidates during one layer sweep.

    The search loop calls ``begin_sweep`` once per sweep, then for each weight ``score`` (losses of the
    candidate values) and, when the weight's value changed, ``commit`` after writing it into the parameter.
    ``score`` must not change the model. Losses are summed cross-entropy over the chunk, float64.
    ``world`` (:mod:`rso.distributed`): the workers sharing each chunk; engines score their share and ask it
    for the totals (losses, BN statistics). A world of one by default.
    """

    name = "base"
    world: World = LOCAL

    def begin_sweep(self, model: nn.Module, target: SearchTarget, images: torch.Tensor, labels: torch.Tensor,
                    partition: ChunkPartition) -> None:
        self.model, self.target, self.images, self.labels, self.partition = model, target, images, labels, partition

    @abstractmethod
    def score(self, index: int, values: torch.Tensor, chunk: int) -> torch.Tensor:
        """Losses of setting flat element ``index`` of the target to each of ``values``, on chunk ``chunk``."""

    def commit(self, index: int, value: float, chunk: int) -> None:
        """The loop wrote ``value`` into flat element ``index``; engines with caches update them here."""

    def end_sweep(self) -> None:
        """Release per-sweep caches."""
