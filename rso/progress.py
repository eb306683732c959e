"""RSO's progress bar and ETA: weight visits weighted by what they cost.

Visits differ in cost by 100x and more (a dense-head visit is a rank-one update of the logits; a visit to an
early conv recomputes every layer after the next one for three candidates), so counting visits gives an ETA
that jumps from tensor to tensor. Instead:

- the bar counts **forward-sample equivalents** (one example through the whole network = 1 sample): per
  tensor, the work a sweep does once (the cached layers below it over the training set, and the evaluation
  after it) plus the work of each visit (three candidates over a chunk, through the part of the network the
  engine recomputes), estimated from the layers' multiply-adds and element counts on one example;
- the ETA adds up the sweeps still to come, each at the seconds the same tensor's last sweep took in this run
  (kept in the checkpoint, so a resumed run starts from its own timings), or, for a tensor not yet swept, its
  estimated work at this run's measured seconds per sample-equivalent.

Nothing here changes what the search does; it only reads the model's shapes and the clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from rso.search.visit import BATCHNORMS, SearchTarget

N_CANDIDATES = 3
# An elementwise op (BN, ReLU, pooling, the one-channel delta) moves memory; on the CPUs measured here one
# element of it costs about as much as this many multiply-adds of a convolution.
ELEMENT_COST = 4.0


def layer_costs(model: nn.Module, example: torch.Tensor) -> list[tuple[float, int]] | None:
    """Per layer of an ``nn.Sequential``, for one example: (work, output elements), the work being
    multiply-adds for Conv2d/Linear and element count times ``ELEMENT_COST`` for the rest. ``None`` for
    models that are not a Sequential."""
    if not isinstance(model, nn.Sequential):
        return None
    costs: list[tuple[float, int]] = []

    def hook(layer, inputs, output):
        elements = output.numel()
        if isinstance(layer, nn.Conv2d):
            costs.append((float(elements * layer.weight[0].numel()), elements))
        elif isinstance(layer, nn.Linear):
            costs.append((float(layer.weight.numel()), elements))
        else:
            costs.append((ELEMENT_COST * max(elements, inputs[0].numel()), elements))

    handles = [layer.register_forward_hook(hook) for layer in model]
    training = model.training
    try:
        model.eval()  # one example: BN must not need batch statistics to count shapes
        with torch.no_grad():
            model(example[:1])
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return costs


def _out_channels(layer: nn.Module) -> int:
    for attribute in ("out_channels", "out_features", "num_features"):
        if hasattr(layer, attribute):
            return getattr(layer, attribute)
    return 1


@dataclass
class SweepCost:
    """A sweep's work in forward-sample equivalents: once per sweep, and per visit."""

    setup: float            # before the first visit: the caches
    per_visit: float
    numel: int
    after: float = 0.0      # after the last visit: the evaluation

    @property
    def total(self) -> float:
        return self.setup + self.per_visit * self.numel + self.after


def sweep_costs(model: nn.Module, targets: list[SearchTarget], example: torch.Tensor, batch_size: int,
                n_examples: int, incremental: bool, evaluation_samples: float = 0.0) -> dict[str, SweepCost]:
    """Each target's :class:`SweepCost`. ``incremental``: the engine caches the layers below the searched one
    and recomputes one channel up to the next linear layer (the fast engine); else every candidate is a full
    forward pass. ``evaluation_samples``: examples an evaluation after the sweep passes through the network."""
    layers = layer_costs(model, example)
    used = (n_examples // batch_size) * batch_size
    if layers is None or not incremental:
        return {target.name: SweepCost(0.0, N_CANDIDATES * batch_size, target.numel, evaluation_samples)
                for target in targets}
    from rso.engines.plan import plan_sweep

    costs, elements = [work for work, _ in layers], [count for _, count in layers]
    full = sum(costs)
    result = {}
    for target in targets:
        plan = plan_sweep(model, target)
        channels = _out_channels(plan.layers[plan.searched])
        block_start = plan.searched if isinstance(target.module, BATCHNORMS) else plan.searched + 1
        # every candidate: the channel's delta, its BN/ReLU/pooling, the next layer's output updated by one
        # input channel (a stencil, then the whole output written), the layers after it in full, the loss
        candidate = ELEMENT_COST * (elements[plan.searched] / channels + elements[-1])
        candidate += sum(costs[block_start:plan.next_index]) / channels
        if plan.next_layer is not None:
            fan_in = getattr(plan.next_layer, "in_channels", getattr(plan.next_layer, "in_features", 1))
            candidate += costs[plan.next_index] / max(fan_in, 1) + ELEMENT_COST * elements[plan.next_index]
            candidate += sum(costs[plan.next_index + 1:])
        # once per sweep: the caches (a forward pass of the used examples) and the evaluation after the sweep
        result[target.name] = SweepCost(used, N_CANDIDATES * batch_size * candidate / full, target.numel,
                                        evaluation_samples)
    return result


class SweepProgress:
    """Where an RSO run stands in forward-sample equivalents, and its ETA from this run's own timings.

    ``order`` is the cycle's tensor names in visiting order; ``timings`` maps a tensor to the seconds its last
    sweep took (sweep, evaluation and checkpoint), and is kept by the caller in the checkpoint.
    """

    def __init__(self, costs: dict[str, SweepCost], order: list[str], cycles: int, timings: dict[str, float],
                 clock: Callable[[], float] = time.perf_counter):
        self.costs, self.order, self.cycles, self.timings, self.clock = costs, order, cycles, timings, clock
        self.per_cycle = sum(costs[name].total for name in order)
        self.total = self.per_cycle * cycles
        self.cycle = self.index = self.visits = 0
        self.sweep_started = clock()
        self.first_report: tuple[float, int] | None = None   # (time, visits) at the running sweep's first report

    def done(self, cycle: int | None = None, index: int | None = None, visits: int | None = None) -> float:
        """Sample-equivalents done at (cycle, tensor index, visits into that sweep); default: now."""
        cycle = self.cycle if cycle is None else cycle
        index = self.index if index is None else index
        visits = self.visits if visits is None else visits
        current = self.costs[self.order[index]] if index < len(self.order) else None
        within = current.setup + current.per_visit * visits if current is not None and visits else 0.0
        return cycle * self.per_cycle + sum(self.costs[name].total for name in self.order[:index]) + within

    def begin_sweep(self, cycle: int, index: int) -> None:
        self.cycle, self.index, self.visits = cycle, index, 0
        self.sweep_started = self.clock()
        self.first_report = None

    def advance(self, visits: int) -> None:
        self.visits += visits
        if self.first_report is None:
            self.first_report = (self.clock(), self.visits)

    def end_sweep(self) -> float:
        """The sweep (with its evaluation and checkpoint) is over: remember its time; returns it."""
        seconds = self.clock() - self.sweep_started
        self.timings[self.order[self.index]] = seconds
        return seconds

    def _pace(self) -> float | None:
        """Seconds per visit of the running sweep, from its own reports (None before its second report)."""
        if self.first_report is None or self.visits <= self.first_report[1]:
            return None
        started, visits = self.first_report
        return (self.clock() - started) / (self.visits - visits)

    def seconds_per_sample(self) -> float | None:
        """This run's measured seconds per sample-equivalent: over the tensors it has timed, or, before the
        first sweep ends, from the running sweep's pace."""
        timed = [name for name in self.order if name in self.timings]
        work = sum(self.costs[name].total for name in timed)
        if work > 0:
            return sum(self.timings[name] for name in timed) / work
        pace, cost = self._pace(), self.costs[self.order[self.index]]
        return pace / cost.per_visit if pace is not None and cost.per_visit > 0 else None

    def predicted(self, name: str) -> float | None:
        if name in self.timings:
            return self.timings[name]
        rate = self.seconds_per_sample()
        return None if rate is None else self.costs[name].total * rate

    def _current_sweep_left(self, predicted: float | None) -> float | None:
        """Seconds left in the running sweep: for a tensor swept for the first time, at the sweep's own pace
        once it has reported twice; else its predicted time less the fraction of its work done."""
        name = self.order[self.index]
        cost = self.costs[name]
        pace, rate = self._pace(), self.seconds_per_sample()
        if name not in self.timings and pace is not None and rate is not None:
            return pace * (cost.numel - self.visits) + rate * cost.after
        if predicted is None:
            return None
        fraction = (cost.setup + cost.per_visit * self.visits) / cost.total if self.visits and cost.total else 0.0
        return predicted * (1 - fraction)

    def eta(self) -> float | None:
        """Seconds left: the rest of this sweep and every sweep after it, at their predicted times."""
        predictions = {name: self.predicted(name) for name in self.order}
        current = self._current_sweep_left(predictions[self.order[self.index]])
        if current is None or any(value is None for value in predictions.values()):
            return None
        rest_of_cycle = sum(predictions[other] for other in self.order[self.index + 1:])
        return current + rest_of_cycle + (self.cycles - self.cycle - 1) * sum(predictions.values())


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"
