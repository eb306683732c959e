"""The interface every scoring engine implements: score the candidate values of one weight on one chunk."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Iterator

import torch
from torch import nn

from rso.distributed import LOCAL, World
from rso.search.visit import BATCHNORMS, SearchTarget


def return_freed_memory() -> None:
    """Give the memory of a finished sweep's caches back to the system (glibc's ``malloc_trim``). Tensors below
    glibc's adaptive mmap threshold (it rises to 32 MB once one such block is freed) come from the heap, and
    a heap fragmented by one sweep's per-chunk tensors kept a few GB resident into the next sweep, whose own
    caches then came on top (paper6 at batch 5000: 11 GB peak in one process, 7 GB per worker with 2). A no-op
    where there is no glibc."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


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


# BN layer -> (mean, biased variance) it normalizes with instead of its batch's statistics
FixedStatistics = dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]
SEARCH_BN_MODES = {
    "chunk": "every BN layer normalizes with the statistics of the scored chunk",
    "fixed-below": "BN layers below the searched tensor normalize with statistics fixed before each sweep from the "
                   "first N training images (inference mode, the authors' code); the searched layer and above "
                   "with the chunk's",
}


@contextlib.contextmanager
def batch_statistics(model: nn.Module, fixed: FixedStatistics | None = None) -> Iterator[None]:
    """BN layers normalize with the current batch's statistics and update no running statistics.

    Rejected candidates must leave no trace in the model, so scoring never touches running_mean/var. The BN
    layers in ``fixed`` normalize with the given statistics instead (see :func:`fixed_statistics`); their own
    running statistics are put back on exit.
    """
    fixed = fixed or {}
    saved = [(module, module.training, module.track_running_stats, module.running_mean, module.running_var)
             for module in model.modules() if isinstance(module, BATCHNORMS)]
    try:
        for module, *_ in saved:
            if module in fixed:
                module.eval()
                module.track_running_stats = True
                module.running_mean, module.running_var = fixed[module]
            else:
                module.train()
                module.track_running_stats = False
        yield
    finally:
        for module, training, track, mean, variance in saved:
            module.train(training)
            module.track_running_stats = track
            module.running_mean, module.running_var = mean, variance


@torch.no_grad()
def fixed_statistics(model: nn.Module, images: torch.Tensor, below: nn.Module) -> FixedStatistics:
    """The statistics the authors' code normalizes the layers below the searched one with.

    Before caching the activations below a layer, their code resets every BN's moving statistics (momentum 0)
    by one training-mode forward pass of the first 2000 training images: each BN layer takes the mean and the
    biased variance of its input over that batch. Returns them for the BN layers of the ``nn.Sequential``
    ``model`` that come before the layer ``below``.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError("BN statistics fixed below the searched layer need an nn.Sequential model")
    layers = list(model)
    stop = next((index for index, layer in enumerate(layers) if layer is below), None)
    if stop is None:
        raise ValueError("the searched layer is not a layer of the model")
    statistics: FixedStatistics = {}
    x = images
    with batch_statistics(model):
        for layer in layers[:stop]:
            if isinstance(layer, BATCHNORMS):
                dims = [0, *range(2, x.dim())]
                statistics[layer] = (x.mean(dims), x.var(dims, unbiased=False))
            x = layer(x)
    return statistics


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
                    partition: ChunkPartition, fixed: FixedStatistics | None = None) -> None:
        """``fixed``: BN layers (below the target) that normalize with fixed statistics, see :func:`batch_statistics`."""
        self.model, self.target, self.images, self.labels, self.partition = model, target, images, labels, partition
        self.fixed = fixed or {}

    @abstractmethod
    def score(self, index: int, values: torch.Tensor, chunk: int) -> torch.Tensor:
        """Losses of setting flat element ``index`` of the target to each of ``values``, on chunk ``chunk``."""

    def commit(self, index: int, value: float, chunk: int) -> None:
        """The loop wrote ``value`` into flat element ``index``; engines with caches update them here."""

    def release(self, chunk: int) -> None:
        """The loop will not score ``chunk`` again this sweep: engines may drop its caches (a BN sweep of 16
        visits over 12 chunks uses most chunks once, and holding them all would double a sweep's memory)."""

    def end_sweep(self) -> None:
        """Release per-sweep caches."""


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) channels-last, so that a convolution of it writes channels-last too. With one channel
    both layouts are the same memory, but PyTorch keeps the NCHW strides and oneDNN then writes an NCHW
    output: paper6's conv0 (the images) wrote its 16 channels NCHW, and the BN pass after it read them through
    a channels-last copy (one chunk of 5000: conv0 + BN 172 ms with the copy, 70 ms without)."""
    x = x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 4 and x.shape[1] == 1 and x.stride(1) != 1:
        x = x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), x.stride(3)))
    return x
