"""One layer sweep of RSO: the search loop every engine plugs into.

For the target tensor ``W`` of a layer, with its annealed sigma::

    partition <- the training set shuffled and cut into chunks of batch_size
    for j, weight w_j of W in row-major order:
        (x, l) <- chunk j mod n_chunks            (or chunk 0 for the whole sweep, an ablation)
        dw     ~ sampler(sigma)                   (Gaussian by default)
        w0     <- w_j * (1 - weight_decay)
        w_j    <- argmin over [w0, w0 + dw, w0 - dw] of F(x, l, W)   (ties keep w0)

All randomness of a sweep (the shuffle and every dw) is drawn from the caller's ``torch.Generator`` at the
start of the sweep, so the result does not depend on the engine, and a run resumed at a sweep boundary
continues exactly. With several workers (:mod:`rso.distributed`) every rank draws the same randomness and
the engine reduces the losses over the ranks' shares, so every rank takes the same decisions.

BN during the search: by default every BN layer normalizes with the scored chunk's statistics. With
``fixed_bn_images`` (the authors' code: the first 2000 training images), the BN layers below the searched
tensor normalize with the statistics of those images, taken at the start of the sweep
(:func:`rso.engines.base.fixed_statistics`); the searched layer and the layers above it keep the chunk's.

A sweep can also start at visit ``start_visit`` (a checkpoint taken inside a sweep saves
the generator state of the sweep's start and the visit): the draws are repeated, visits before
``start_visit`` are skipped, and the engine builds its caches from the weights as they are.
``checkpoint(visit, stats)`` is called after every completed visit (the fused output-layer sweep: between
its blocks), when the weights and ``stats`` hold visits ``0..visit-1``; it may save, or raise to stop.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from rso.engines.base import ChunkPartition, ScoringEngine, fixed_statistics
from rso.search.candidates import Sampler, candidate_values, select_candidate
from rso.search.visit import SearchTarget

CHUNKINGS = ("per-visit", "per-sweep")
N_CANDIDATES = 3


class NonFiniteLossError(RuntimeError):
    """Every candidate of a visit scored NaN or infinity: the search cannot go on."""


@dataclass
class SweepStats:
    target: str
    sigma: float
    visits: int = 0
    accepted: int = 0
    loss_sum: float = 0.0        # sum over visits of the chosen candidate's mean loss on its chunk
    forward_samples: int = 0     # examples passed through the network, counted as full forward passes
    seconds: float = 0.0

    @property
    def accept_rate(self) -> float:
        return self.accepted / self.visits if self.visits else 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.visits if self.visits else float("nan")


# progress(visits_done_in_this_call, their_mean_loss, accepted_in_this_call)
Progress = Callable[[int, float, int], None]
# checkpoint(visits_done_in_this_sweep, stats): called between visits, may save a checkpoint or raise
Checkpoint = Callable[[int, SweepStats], None]


def draw_sweep(target: SearchTarget, n_examples: int, batch_size: int, sigma: float, sampler: Sampler,
               generator: torch.Generator, chunking: str = "per-visit") -> tuple[ChunkPartition, torch.Tensor, torch.Tensor]:
    """The sweep's randomness: the chunk partition, each visit's chunk, and each visit's step dw."""
    if chunking not in CHUNKINGS:
        raise ValueError(f"unknown chunking {chunking!r}; choose one of {', '.join(CHUNKINGS)}")
    partition = ChunkPartition(torch.randperm(n_examples, generator=generator), batch_size)
    steps = sampler(sigma, target.numel, generator)
    if chunking == "per-visit":
        chunks = torch.arange(target.numel) % partition.n_chunks
    else:
        chunks = torch.zeros(target.numel, dtype=torch.long)
    return partition, chunks, steps


def run_sweep(model: nn.Module, target: SearchTarget, images: torch.Tensor, labels: torch.Tensor,
              engine: ScoringEngine, *, sigma: float, batch_size: int, sampler: Sampler,
              generator: torch.Generator, weight_decay: float = 0.0, chunking: str = "per-visit",
              progress: Progress | None = None, fixed_bn_images: torch.Tensor | None = None,
              start_visit: int = 0, stats: SweepStats | None = None, checkpoint: Checkpoint | None = None) -> SweepStats:
    """Visit every element of ``target`` once (from ``start_visit``, continuing ``stats``); returns the
    sweep's counts. See the module docstring."""
    start = time.perf_counter()
    partition, chunks, steps = draw_sweep(target, len(labels), batch_size, sigma, sampler, generator, chunking)
    partition.order = partition.order.to(images.device)
    partition.world = engine.world      # with several workers each scores its share of every chunk
    if not 0 <= start_visit <= target.numel:
        raise ValueError(f"start_visit must be in 0..{target.numel}, got {start_visit}")
    stats = stats if stats is not None else SweepStats(target.name, sigma)
    fixed = None if fixed_bn_images is None else fixed_statistics(model, fixed_bn_images, target.module)
    engine.begin_sweep(model, target, images, labels, partition, fixed)
    try:
        fused = getattr(engine, "run_sweep", None)
        resumable = {"start_visit": start_visit, "checkpoint": checkpoint}
        if fused is not None and "checkpoint" not in inspect.signature(fused).parameters:
            if start_visit:
                raise ValueError(f"the {engine.name} engine's sweep cannot start at visit {start_visit}")
            fused(chunks, steps, weight_decay, stats, progress)
        elif fused is not None:
            fused(chunks, steps, weight_decay, stats, progress, **resumable)
        else:
            visit_each_weight(engine, target, chunks, steps, weight_decay, stats, progress, **resumable)
    finally:
        engine.end_sweep()
    stats.forward_samples = stats.visits * N_CANDIDATES * batch_size
    stats.seconds = time.perf_counter() - start
    return stats


class VisitRecorder:
    """Counts each visit into a sweep's stats and reports progress every ``report_every`` visits.

    Every sweep implementation (the per-visit loop, an engine's fused sweep) records through it, so their
    statistics and progress reports are the same by construction.
    """

    def __init__(self, stats: SweepStats, progress: Progress | None, batch_size: int, numel: int,
                 report_every: int = 16):
        self.stats, self.progress, self.batch_size = stats, progress, batch_size
        self.numel, self.report_every = numel, report_every
        self.pending_visits = self.pending_accepted = 0
        self.pending_loss = 0.0

    def record(self, index: int, choice: int, loss: float) -> None:
        """Visit ``index`` kept candidate ``choice``, whose summed loss over the chunk was ``loss``."""
        mean_loss = loss / self.batch_size
        self.stats.visits += 1
        self.stats.accepted += choice != 0
        self.stats.loss_sum += mean_loss
        self.pending_visits += 1
        self.pending_accepted += choice != 0
        self.pending_loss += mean_loss
        if self.progress is not None and (self.pending_visits >= self.report_every or index == self.numel - 1):
            self.progress(self.pending_visits, self.pending_loss / self.pending_visits, self.pending_accepted)
            self.pending_visits = self.pending_accepted = 0
            self.pending_loss = 0.0


def last_visits(chunks: list[int], start: int = 0) -> dict[int, int]:
    """Each chunk's last visit from ``start`` on: after it the loop lets the engine drop the chunk's caches."""
    return {chunk: index for index, chunk in enumerate(chunks) if index >= start}


def visit_each_weight(engine: ScoringEngine, target: SearchTarget, chunks: torch.Tensor, steps: torch.Tensor,
                      weight_decay: float, stats: SweepStats, progress: Progress | None,
                      report_every: int = 16, start_visit: int = 0, checkpoint: Checkpoint | None = None) -> None:
    """The plain per-weight loop over ``engine.score`` / ``engine.commit``."""
    flat = target.parameter.data.view(-1)
    dtype = target.parameter.dtype
    recorder = VisitRecorder(stats, progress, engine.partition.batch_size, target.numel, report_every)
    steps_list, chunks_list = steps.tolist(), chunks.tolist()
    last_visit = last_visits(chunks_list, start_visit)
    for index in range(start_visit, target.numel):
        chunk = chunks_list[index]
        current = flat[index].item()
        values = candidate_values(current, steps_list[index], weight_decay).to(dtype).to(torch.float64)
        losses = engine.score(index, values, chunk)
        choice = select_candidate(losses, values)
        if choice < 0:
            raise NonFiniteLossError(
                f"every candidate loss is non-finite at {target.name}[{index}] (losses {losses.tolist()}); "
                "the weights or the learning setup diverged")
        chosen = values[choice].item()
        if chosen != current:
            flat[index] = chosen
            engine.commit(index, chosen, chunk)
        recorder.record(index, choice, losses[choice].item())
        if last_visit[chunk] == index:
            engine.release(chunk)       # the sweep does not come back to this chunk
        if checkpoint is not None:
            checkpoint(index + 1, stats)
