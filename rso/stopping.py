"""Stopping criteria shared by every trainer in the project.

One :class:`StoppingCriteria` holds the thresholds; the trainer calls :meth:`StoppingCriteria.update`
once per iteration (epoch, cycle, step) with the loss and optionally a metric. The first criterion
that fires stops the run, and its one-line reason is returned so the trainer can report it.

Criteria are checked in this order (so the reported reason is deterministic when several fire at once):
cost, change of the loss, metric below, metric above, iteration cap, wall-time cap.

The change criterion compares ``|J_e - J_(e-1)|`` with the threshold; with ``change_window = k > 1`` it
compares consecutive moving averages of the last ``k`` losses instead, and needs ``k + 1`` losses first.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Callable


def _check_non_negative(name: str, value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a number or None, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")


@dataclass
class StoppingCriteria:
    """Thresholds and caps; ``None`` switches a criterion off."""

    cost_below: float | None = None  # stop when loss < cost_below
    change_below: float | None = None  # stop when |J_e - J_(e-1)| < change_below (moving average if window > 1)
    change_window: int = 1  # moving-average window for change_below
    metric_below: float | None = None  # stop when metric < metric_below
    metric_above: float | None = None  # stop when metric > metric_above (e.g. an accuracy target)
    max_iterations: int | None = None  # stop once this many iterations were recorded (iteration + 1 >= cap)
    max_seconds: float | None = None  # stop once this much wall time has passed (summed over resumes)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("cost_below", "change_below", "metric_below", "metric_above", "max_seconds"):
            _check_non_negative(name, getattr(self, name))
        if self.max_iterations is not None and (
            not isinstance(self.max_iterations, int) or isinstance(self.max_iterations, bool) or self.max_iterations < 0
        ):
            raise ValueError(f"max_iterations must be a non-negative integer or None, got {self.max_iterations!r}")
        if not isinstance(self.change_window, int) or isinstance(self.change_window, bool) or self.change_window < 1:
            raise ValueError(f"change_window must be a positive integer, got {self.change_window!r}")
        self._losses: deque[float] = deque(maxlen=self.change_window + 1)
        self._elapsed_before = 0.0  # seconds spent in earlier (resumed-from) runs
        self._started_at: float | None = None
        self.reason: str | None = None
        self.iterations_seen = 0

    # ---- clock -------------------------------------------------------------------------------
    def start(self) -> None:
        """(Re)start the wall clock; time already recorded (e.g. from a loaded state) is kept."""
        self._started_at = self.clock()

    def elapsed_seconds(self) -> float:
        running = 0.0 if self._started_at is None else self.clock() - self._started_at
        return self._elapsed_before + running

    # ---- the check ---------------------------------------------------------------------------
    def _change(self) -> float | None:
        window = self.change_window
        if len(self._losses) < window + 1:
            return None
        values = list(self._losses)
        previous = sum(values[:window]) / window
        current = sum(values[1:]) / window
        return abs(current - previous)

    def update(self, iteration: int, loss: float, metric: float | None = None) -> str | None:
        """Record one iteration; return a one-line reason if a criterion fires, else None."""
        if self._started_at is None:
            self.start()
        loss = float(loss)
        self._losses.append(loss)
        self.iterations_seen += 1
        reason = self._check(iteration, loss, metric)
        if reason is not None and self.reason is None:
            self.reason = reason
        return reason

    def _check(self, iteration: int, loss: float, metric: float | None) -> str | None:
        if self.cost_below is not None and loss < self.cost_below:
            return f"cost {loss:.6g} below {self.cost_below:g} at iteration {iteration}"
        if self.change_below is not None:
            change = self._change()
            if change is not None and change < self.change_below:
                what = "loss change" if self.change_window == 1 else f"change of the {self.change_window}-iteration average loss"
                return f"{what} {change:.3g} below {self.change_below:g} at iteration {iteration}"
        if metric is not None:
            if self.metric_below is not None and metric < self.metric_below:
                return f"metric {metric:.6g} below {self.metric_below:g} at iteration {iteration}"
            if self.metric_above is not None and metric > self.metric_above:
                return f"metric {metric:.6g} above {self.metric_above:g} at iteration {iteration}"
        if self.max_iterations is not None and iteration + 1 >= self.max_iterations:
            return f"iteration cap {self.max_iterations} reached at iteration {iteration}"
        if self.max_seconds is not None:
            elapsed = self.elapsed_seconds()
            if elapsed >= self.max_seconds:
                return f"wall-time cap {self.max_seconds:g} s reached after {elapsed:.1f} s at iteration {iteration}"
        return None

    # ---- resume ------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "clock"}

    def state_dict(self) -> dict:
        return {
            "config": self.config_dict(),
            "elapsed_seconds": self.elapsed_seconds(),
            "losses": list(self._losses),
            "iterations_seen": self.iterations_seen,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the history (elapsed seconds, last losses); the thresholds of ``self`` are kept.

        The clock is restarted, so time spent between saving and loading does not count.
        """
        self._elapsed_before = float(state["elapsed_seconds"])
        self._losses = deque((float(v) for v in state["losses"]), maxlen=self.change_window + 1)
        self.iterations_seen = int(state.get("iterations_seen", 0))
        self.reason = state.get("reason")
        self._started_at = None
        self.start()

    def any_enabled(self) -> bool:
        return any(
            v is not None
            for v in (self.cost_below, self.change_below, self.metric_below, self.metric_above, self.max_iterations, self.max_seconds)
        )
