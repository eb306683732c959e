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
  estimated work at this run's measured seconds per sample-equivalent plus a fixed overhead per visit, both
  fitted to the sweeps timed so far and the running sweep's own pace.

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
# Beyond its multiply-adds, a candidate reads and writes cached tensors for every example of its chunk: fitted
# to results/bench/bench.json (paper6, batch 5000), about 1% of a full forward pass per example.
CANDIDATE_OVERHEAD = 0.01
# An elementwise op (BN, ReLU, pooling, the one-channel delta) moves memory; on the CPUs measured here one
# element of it costs about as much as this many multiply-adds of a convolution.
ELEMENT_COST = 4.0
# How a conv visit's work compares with a cache fill's, per sample-equivalent, for the fast engine: fitted to the
# per-tensor sweep times of results/bench/bench.json (paper6, batch 5000, fast engine with 1 and 2 workers, commit
# ac021db, where the fill also folds each pooled conv and a fill is costed as the layers it runs, not as a full
# forward pass). Replayed as 3 cycles through the ETA (``python -m experiments.eta_check --replay
# results/bench/bench.json --batch-size 5000 --cycles 3 [--bench-config fast_2 --workers 2] --visit-work-scale
# S``), the largest error after the first sweep is 15.0%/7.8% at S = 0.8, 9.9%/8.3% at 0.85, 8.9%/9.5% at 0.86,
# 4.9%/14.3% at 0.9, 13.4%/26.4% at 1.0 (with fills costed as full forward passes, as before: 40.5%/47.5% at
# 0.9, 10.4%/7.7% at 1.4). It was 0.9 for the bench at 332d1ab (fills as full passes), 1.05 at cf1029c, 1.2 at
# 5b8b1f8 (before the folding), and 0.7 before the fills got faster. A live run is the independent check (README).
VISIT_WORK_SCALE = 0.86
# With ``--search-bn fixed-below`` (the authors' BN handling) and several workers, a sweep's cache fill runs the
# layers below in inference mode, without the per-chunk BN collectives a chunk-statistics fill needs. When those
# collectives took a float64 copy and a var_mean (before be503bb) that made the fill cost 0.55-0.64 of the
# chunk-statistics one; now both cost the same: in 2-worker paper6 runs at batch 5000 (commit c2a8450) the BN
# layers' sweeps took 4.7 and 5.1 s with the authors' preset against 4.8 and 4.5 s with chunk statistics
# (results/progress/paper6_b5000_2workers_log.txt and paper6_authors_first_sweeps_log.txt, 15.bias/15.weight).
FIXED_BELOW_SETUP = 1.0


# An evaluation after a sweep (BN recalibration over --bn-samples, then the test set) runs on rank 0 alone, with
# PyTorch's layers rather than the engine's numba passes, while the other workers wait. Per example it costs about
# this many sample-equivalents of one worker's cache fill. Two measurements: in one process, a plain forward pass of
# paper6 at batch 5000 took 0.91 s against 0.53 s for the engine's fill of the same examples (1.7, timed by hand
# with keep_freed_memory in effect); in a 2-worker run at batch 5000, commit e7fef04, stopped after its first sweep
# (results/progress/paper6_first_sweep_e7fef04_log.txt), the sweep took 6.1 s and its line came 10 s after the
# start, so the evaluation of 20,000 examples took about 3.9 s, 0.19 ms an example, where the bench's 2-worker fill
# of 60,000 examples takes 4.2 s, 0.14 ms an example per worker (1.4). The live ETA check (README) ran with 1.7; at
# 1.4 each evaluation's prediction would be about 0.8 s shorter. With N workers the fill is split N ways and the
# evaluation is not: see :func:`evaluation_work`.
EVALUATION_COST = 1.7


def evaluation_work(samples: int, workers: int) -> float:
    """Sample-equivalents of an evaluation over ``samples`` examples in a run of ``workers`` workers."""
    return samples * EVALUATION_COST * max(1, workers)


def fill_scale(search_bn: str, workers: int) -> float:
    """A sweep's cache fill relative to the chunk-statistics fill the cost model was fitted to."""
    return FIXED_BELOW_SETUP if search_bn == "fixed-below" and workers > 1 else 1.0


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
    looped: bool = True     # the visits run one by one in Python (each with a fixed overhead), not fused

    @property
    def total(self) -> float:
        return self.setup + self.per_visit * self.numel + self.after


SCORINGS = {"reference": "full", "prefix-cache": "prefix"}   # engine name -> how it scores; others: incremental


def sweep_costs(model: nn.Module, targets: list[SearchTarget], example: torch.Tensor, batch_size: int,
                n_examples: int, scoring: str = "incremental", evaluation_samples: float = 0.0,
                fused_head: bool | None = None, fill: float = 1.0, statistics_samples: int = 0,
                fold: bool = True) -> dict[str, SweepCost]:
    """Each target's :class:`SweepCost`. ``scoring``: ``full`` (every candidate a full forward pass, the
    reference engine), ``prefix`` (the layers below the searched one cached, the rest run in full: the
    prefix-cache engine) or ``incremental`` (cached, and one channel recomputed up to the next linear layer:
    the fast engine). ``evaluation_samples``: examples an evaluation after the sweep passes through the network.
    ``fill``: the fast engine's cache fill relative to a chunk-statistics one (:func:`fill_scale`).
    ``statistics_samples``: examples passed through the layers below the searched one before each sweep to fix
    their BN statistics (``--search-bn fixed-below``: ``--search-bn-images``, 2000; a third of a 6000-example
    run's fill, 3% of a full one's). ``fold``: the engine runs a conv that an average pooling follows as one
    conv (the fast engine; not the sync-free one)."""
    layers = layer_costs(model, example)
    used = (n_examples // batch_size) * batch_size
    if layers is None or scoring == "full":
        return {target.name: SweepCost(0.0, N_CANDIDATES * batch_size, target.numel, evaluation_samples)
                for target in targets}
    if fused_head is None:   # the fast engine runs the output layer's sweep as one numba loop (one process, CPU)
        fused_head = example.device.type == "cpu"
    from rso.engines.plan import plan_sweep

    costs, elements = [work for work, _ in layers], [count for _, count in layers]
    full = sum(costs)
    # the fast engine runs a conv that a 2x2 average pooling follows (above the searched layer) as one stride-2
    # conv (rso.engines.plan.PooledConv): its work scaled by (kh+1)(kw+1) / (4 kh kw), the pooling's gone
    from rso.engines.plan import _foldable

    modules = list(model)
    folded = {}
    for index, layer in enumerate(modules[:-1]):
        if fold and _foldable(layer, modules[index + 1]):
            height, width = layer.kernel_size
            folded[index] = (height + 1) * (width + 1) / (4 * height * width)

    def run_cost(index: int) -> float:
        return costs[index] * folded[index] if index in folded else 0.0 if index - 1 in folded else costs[index]

    def run_elements(index: int) -> int:
        return elements[index + 1] if index in folded else elements[index]
    result = {}
    for target in targets:
        plan = plan_sweep(model, target)
        if scoring == "prefix":
            rest = sum(costs[plan.searched:]) + CANDIDATE_OVERHEAD * full
            result[target.name] = SweepCost(used * sum(costs[:plan.searched]) / full,
                                            N_CANDIDATES * batch_size * rest / full, target.numel, evaluation_samples)
            continue
        channels = _out_channels(plan.layers[plan.searched])
        block_start = plan.searched if isinstance(target.module, BATCHNORMS) else plan.searched + 1
        # every candidate: the channel's delta, its BN/ReLU/pooling, the next layer's output updated by one
        # input channel (a stencil, then the whole output written), the layers after it in full, the loss
        candidate = ELEMENT_COST * (elements[plan.searched] / channels + elements[-1])
        candidate += sum(costs[block_start:plan.next_index]) / channels
        if plan.next_layer is not None:
            fan_in = getattr(plan.next_layer, "in_channels", getattr(plan.next_layer, "in_features", 1))
            candidate += run_cost(plan.next_index) / max(fan_in, 1) + ELEMENT_COST * run_elements(plan.next_index)
            candidate += sum(run_cost(index) for index in range(plan.next_index + 1, len(costs)))
        # a candidate of the output layer is a rank-one update of the cached logits: no cached tensors to move
        if not plan.head_only:
            candidate += CANDIDATE_OVERHEAD * full
        # the fill: the layers up to the next linear layer, each pooled conv folded (the fast engine; a pooling
        # folded into a conv costs nothing in run_cost); other engines' fills are counted as a full forward pass
        stop = len(costs) if plan.next_layer is None else plan.next_index + 1
        reach = sum(run_cost(index) for index in range(stop)) / full if fold else 1.0
        setup = used * fill * reach + statistics_samples * sum(costs[:plan.searched]) / full
        result[target.name] = SweepCost(setup, VISIT_WORK_SCALE * N_CANDIDATES * batch_size * candidate / full,
                                        target.numel, evaluation_samples, looped=not (plan.head_only and fused_head))
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

    def rates(self) -> tuple[float, float] | None:
        """This run's (seconds per sample-equivalent, seconds of fixed overhead per looped visit), fitted to
        the sweeps it has timed and the running sweep's pace (relative least squares, both non-negative)."""
        rows = []   # (sample-equivalents, looped visits, seconds)
        for name in self.order:
            if name in self.timings:
                cost = self.costs[name]
                rows.append((cost.total, cost.numel * cost.looped, self.timings[name]))
        pace, cost = self._pace(), self.costs[self.order[self.index]]
        if pace is not None and self.order[self.index] not in self.timings:
            rows.append((cost.per_visit, float(cost.looped), pace))
        rows = [(work / seconds, visits / seconds) for work, visits, seconds in rows if seconds > 0]
        if not rows:
            return None
        # minimize sum((a * work + b * visits) / seconds - 1)^2: the normal equations of two unknowns
        s_ww = sum(w * w for w, _ in rows)
        s_vv = sum(v * v for _, v in rows)
        s_wv = sum(w * v for w, v in rows)
        s_w, s_v = sum(w for w, _ in rows), sum(v for _, v in rows)
        determinant = s_ww * s_vv - s_wv * s_wv
        if len(rows) >= 2 and determinant > 1e-12 * s_ww * s_vv:
            a, b = (s_w * s_vv - s_v * s_wv) / determinant, (s_v * s_ww - s_w * s_wv) / determinant
            if a >= 0 and b >= 0:
                return a, b
        # one unknown: all of it per sample-equivalent, or (when that fits clearly better) all per visit. One
        # timed sweep fits either exactly, and rounding must not pick: then it is per sample-equivalent.
        per_sample = (s_w / s_ww, 0.0) if s_ww > 0 else None
        per_visit = (0.0, s_v / s_vv) if s_vv > 0 else None
        if per_sample is None or per_visit is None:
            return per_sample or per_visit

        def residual(ab):
            return sum((ab[0] * w + ab[1] * v - 1) ** 2 for w, v in rows)
        return per_visit if residual(per_visit) < residual(per_sample) - 1e-9 * len(rows) else per_sample

    def predicted(self, name: str) -> float | None:
        if name in self.timings:
            return self.timings[name]
        rates = self.rates()
        if rates is None:
            return None
        cost = self.costs[name]
        return rates[0] * cost.total + rates[1] * cost.numel * cost.looped

    def _current_sweep_left(self, predicted: float | None) -> float | None:
        """Seconds left in the running sweep: for a tensor swept for the first time, at the sweep's own pace
        once it has reported twice, else at the fitted rates; for a timed one, its last time less the part
        of it done (as the rates split it)."""
        name = self.order[self.index]
        cost, pace, rates = self.costs[name], self._pace(), self.rates()
        if rates is None:
            return None
        per_sample, per_visit = rates
        left = cost.numel - self.visits
        if name not in self.timings:
            if pace is not None:
                return pace * left + per_sample * cost.after
            return (per_sample * (cost.per_visit * left + cost.after + (cost.setup if not self.visits else 0.0))
                    + per_visit * left * cost.looped)
        modelled = per_sample * cost.total + per_visit * cost.numel * cost.looped
        done = (per_sample * (cost.setup + cost.per_visit * self.visits) + per_visit * self.visits * cost.looped
                if self.visits else 0.0)
        return predicted * (1 - done / modelled) if modelled > 0 else predicted

    def eta(self) -> float | None:
        """Seconds left: the rest of this sweep and every sweep after it, at their predicted times."""
        predictions = {name: self.predicted(name) for name in self.order}
        current = self._current_sweep_left(predictions[self.order[self.index]])
        after = self.eta_after_sweep(predictions)
        return None if current is None or after is None else current + after

    def eta_after_sweep(self, predictions: dict[str, float | None] | None = None) -> float | None:
        """Seconds left once the running sweep is over: every sweep after it, at its predicted time (after
        :meth:`end_sweep`, what a sweep's log line reports). ``predictions``: :meth:`predicted` of every
        tensor, when the caller has them."""
        if predictions is None:
            predictions = {name: self.predicted(name) for name in self.order}
        if any(value is None for value in predictions.values()):
            return None
        rest_of_cycle = sum(predictions[other] for other in self.order[self.index + 1:])
        return rest_of_cycle + (self.cycles - self.cycle - 1) * sum(predictions.values())


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"
