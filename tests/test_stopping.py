"""Each stopping criterion fires, the first one wins, resumes keep the history, bad values are refused."""

import pytest

from rso.stopping import StoppingCriteria


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def run(criteria, losses, metrics=None):
    metrics = metrics or [None] * len(losses)
    for iteration, (loss, metric) in enumerate(zip(losses, metrics)):
        reason = criteria.update(iteration, loss, metric)
        if reason is not None:
            return iteration, reason
    return None, None


def test_nothing_fires_without_criteria():
    assert run(StoppingCriteria(), [3.0, 2.0, 1.0, 0.0]) == (None, None)


def test_cost_threshold():
    iteration, reason = run(StoppingCriteria(cost_below=0.5), [3.0, 1.0, 0.6, 0.4, 0.1])
    assert iteration == 3
    assert reason.startswith("cost 0.4 below 0.5 at iteration 3")


def test_change_threshold_plain():
    iteration, reason = run(StoppingCriteria(change_below=0.05), [3.0, 2.0, 1.5, 1.48, 1.0])
    assert iteration == 3
    assert "loss change" in reason and "iteration 3" in reason


def test_change_threshold_needs_two_losses():
    # One loss has no change, so nothing may fire at iteration 0 even with a huge threshold.
    criteria = StoppingCriteria(change_below=1e9)
    assert criteria.update(0, 5.0) is None
    assert criteria.update(1, 5.0) is not None


def test_change_threshold_moving_average_smooths_noise():
    # Zig-zag losses: consecutive raw changes are 1.0 but the 2-window averages barely move.
    losses = [10.0, 11.0, 10.0, 11.0, 10.0]
    assert run(StoppingCriteria(change_below=0.1), losses) == (None, None)
    iteration, reason = run(StoppingCriteria(change_below=0.1, change_window=2), losses)
    assert iteration == 2  # averages 10.5, 10.5 -> change 0 once 3 losses are in
    assert "2-iteration average" in reason


def test_metric_thresholds():
    iteration, reason = run(StoppingCriteria(metric_above=0.9), [1.0] * 4, [0.5, 0.8, 0.95, 0.99])
    assert iteration == 2 and "metric 0.95 above 0.9" in reason
    iteration, reason = run(StoppingCriteria(metric_below=0.1), [1.0] * 4, [0.5, 0.2, 0.05, 0.01])
    assert iteration == 2 and "metric 0.05 below 0.1" in reason


def test_iteration_cap():
    iteration, reason = run(StoppingCriteria(max_iterations=3), [1.0] * 10)
    assert iteration == 2 and "iteration cap 3" in reason


def test_wall_time_cap_with_fake_clock():
    clock = FakeClock()
    criteria = StoppingCriteria(max_seconds=10.0, clock=clock)
    criteria.start()
    clock.now += 4.0
    assert criteria.update(0, 1.0) is None
    clock.now += 7.0
    reason = criteria.update(1, 1.0)
    assert reason is not None and "wall-time cap 10 s" in reason


def test_first_criterion_in_order_is_reported():
    criteria = StoppingCriteria(cost_below=1.0, max_iterations=1)
    assert criteria.update(0, 0.5).startswith("cost")
    assert criteria.reason.startswith("cost")


def test_state_dict_round_trip_keeps_history_and_elapsed_time():
    clock = FakeClock()
    first = StoppingCriteria(change_below=0.01, change_window=2, max_seconds=10.0, clock=clock)
    first.start()
    for iteration, loss in enumerate([5.0, 4.0, 3.0]):
        clock.now += 2.0
        assert first.update(iteration, loss) is None
    saved = first.state_dict()
    assert saved["elapsed_seconds"] == pytest.approx(6.0)

    clock.now += 1000.0  # time while the run was down does not count
    resumed = StoppingCriteria(change_below=0.01, change_window=2, max_seconds=10.0, clock=clock)
    resumed.load_state_dict(saved)
    clock.now += 2.0
    assert resumed.update(3, 3.0) is None  # averages (4+3)/2 vs (3+3)/2: change 0.5, and 8 s so far
    clock.now += 2.5
    reason = resumed.update(4, 3.0)  # averages 3.0 and 3.0: change fires first
    assert reason is not None and "change" in reason


def test_resumed_clock_fires_on_total_time():
    clock = FakeClock()
    first = StoppingCriteria(max_seconds=10.0, clock=clock)
    first.start()
    clock.now += 8.0
    first.update(0, 1.0)
    resumed = StoppingCriteria(max_seconds=10.0, clock=clock)
    resumed.load_state_dict(first.state_dict())
    clock.now += 2.5
    assert "wall-time" in resumed.update(1, 1.0)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"cost_below": -1.0}, "cost_below"),
        ({"change_below": -0.1}, "change_below"),
        ({"metric_below": -2}, "metric_below"),
        ({"max_seconds": -5.0}, "max_seconds"),
        ({"max_iterations": -1}, "max_iterations"),
        ({"max_iterations": 2.5}, "max_iterations"),
        ({"change_window": 0}, "change_window"),
    ],
)
def test_bad_values_are_refused_with_their_name(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        StoppingCriteria(**kwargs)
