"""The RSO progress bar's cost model and ETA (rso.progress), on a simulated clock: no timed tests."""

import pytest
import torch

from rso.models import build_model
from rso.progress import SweepCost, SweepProgress, format_seconds, sweep_costs
from rso.search.visit import visit_order

EXAMPLE = torch.zeros(1, 1, 28, 28)


def test_reference_engine_costs_three_full_forward_passes_per_visit():
    model = build_model("convnet", torch.Generator().manual_seed(0), depth=2, channels=3)
    targets = visit_order(model)
    costs = sweep_costs(model, targets, EXAMPLE, batch_size=100, n_examples=1050, scoring="full",
                        evaluation_samples=500)
    assert set(costs) == {target.name for target in targets}
    for target in targets:
        cost = costs[target.name]
        assert (cost.setup, cost.per_visit, cost.numel, cost.after) == (0.0, 300, target.numel, 500)


def test_fast_engine_visits_cost_more_the_further_they_are_from_the_output():
    model = build_model("paper6", torch.Generator().manual_seed(0))
    targets = visit_order(model)
    costs = sweep_costs(model, targets, EXAMPLE, batch_size=5000, n_examples=60000, scoring="incremental")
    convs = [target.name for target in targets if target.kind == "weight" and target.parameter.dim() == 4]
    per_visit = [costs[name].per_visit for name in convs]          # output-first order: last conv first
    assert per_visit == sorted(per_visit) and per_visit[-1] > 10 * per_visit[0]
    head = costs[targets[0].name]
    assert head.per_visit < per_visit[0] and not head.looped      # the fused numba sweep of the output layer
    # the caches: one pass of the used examples through the layers up to the next linear layer, each pooled conv
    # folded, so less than a full forward pass, and less the nearer the searched tensor is to the input
    setups = [costs[target.name].setup for target in targets]
    assert all(0 < setup < 60000 for setup in setups) and setups == sorted(setups, reverse=True)
    assert setups[-1] < 0.6 * setups[0]   # conv0: the layers up to conv1 (folded), about half the network
    # every visit is cheaper than the reference's three full forward passes
    assert all(0 < cost.per_visit < 3 * 5000 for cost in costs.values())
    # the prefix-cache engine runs every layer from the searched one up: dearer than incremental, cheaper than full
    prefix = sweep_costs(model, targets, EXAMPLE, batch_size=5000, n_examples=60000, scoring="prefix")
    assert all(costs[name].per_visit < prefix[name].per_visit < 3 * 5000 * 1.02 for name in convs)


def test_the_cost_model_folds_a_conv_with_the_average_pooling_after_it(monkeypatch):
    """As the fast engine runs it (plan.PooledConv): paper6's conv3 + pooling cost less in the suffix of the
    sweeps below it and as the next layer of conv2's sweep; the sweeps above it are unchanged."""
    import rso.engines.plan as plan

    model = build_model("paper6", torch.Generator().manual_seed(0))
    targets = visit_order(model)
    folded = sweep_costs(model, targets, EXAMPLE, batch_size=5000, n_examples=60000)
    monkeypatch.setattr(plan, "_foldable", lambda conv, pool: False)
    plain = sweep_costs(model, targets, EXAMPLE, batch_size=5000, n_examples=60000)
    for name in ("0.weight", "1.bias", "3.weight", "7.weight", "8.weight"):
        assert folded[name].per_visit < 0.95 * plain[name].per_visit, name
    for name in ("10.weight", "14.weight", "17.weight", "21.weight"):
        assert folded[name].per_visit == plain[name].per_visit, name


def test_fill_scale_changes_only_the_cache_fill():
    """--search-bn fixed-below (the authors' preset): its cache fill now costs what a chunk-statistics one does
    (measured, see FIXED_BELOW_SETUP); a fill scale, where one applies, scales only the sweep's setup."""
    from rso.progress import FIXED_BELOW_SETUP, fill_scale

    assert fill_scale("fixed-below", 2) == FIXED_BELOW_SETUP == 1.0
    assert fill_scale("fixed-below", 1) == fill_scale("chunk", 2) == fill_scale("chunk", 1) == 1.0

    model = build_model("paper6", torch.Generator().manual_seed(0))
    targets = visit_order(model)
    chunk = sweep_costs(model, targets, EXAMPLE, batch_size=5000, n_examples=60000, fused_head=False)
    half = sweep_costs(model, targets, EXAMPLE, batch_size=5000, n_examples=60000, fused_head=False, fill=0.5)
    for name in chunk:
        assert half[name].setup == pytest.approx(0.5 * chunk[name].setup)
        assert (half[name].per_visit, half[name].numel, half[name].looped) == \
            (chunk[name].per_visit, chunk[name].numel, chunk[name].looped)
    # the pass that fixes the statistics runs the layers below the searched one: nothing for the first conv
    counted = sweep_costs(model, targets, EXAMPLE, batch_size=5000, n_examples=60000, fused_head=False,
                          statistics_samples=2000)
    extra = {name: counted[name].setup - chunk[name].setup for name in chunk}
    assert extra["0.weight"] == 0 and 0 < extra["3.weight"] < extra["7.weight"] < extra["21.weight"] <= 2000


def simulate(costs, order, cycles, seconds_per_sample, seconds_per_visit, timings=None, start=(0, 0)):
    """Run a SweepProgress on a fake clock where every sweep costs exactly what the model says; returns
    (eta, true remaining, cycle, index, visits) at every report."""
    now = [0.0]
    tracker = SweepProgress(costs, order, cycles, {} if timings is None else timings, clock=lambda: now[0])
    schedule = [(cycle, index) for cycle in range(cycles) for index in range(len(order))]
    schedule = schedule[schedule.index(start):]

    def sweep_seconds(name):
        cost = costs[name]
        return seconds_per_sample * cost.total + seconds_per_visit * cost.numel * cost.looped

    end = sum(sweep_seconds(order[index]) for _, index in schedule)
    seen = []
    for cycle, index in schedule:
        cost = costs[order[index]]
        tracker.begin_sweep(cycle, index)
        seen.append((tracker.eta(), end - now[0], cycle, index, 0))
        now[0] += seconds_per_sample * cost.setup
        for _ in range(0, cost.numel, 4):
            visits = min(4, cost.numel - tracker.visits)
            now[0] += visits * (seconds_per_sample * cost.per_visit + seconds_per_visit * cost.looped)
            tracker.advance(visits)
            seen.append((tracker.eta(), end - now[0], cycle, index, tracker.visits))
        now[0] += seconds_per_sample * cost.after
        tracker.end_sweep()
    assert now[0] == pytest.approx(end)
    return seen, tracker


COSTS = {"head": SweepCost(1000.0, 2.0, 40, 500.0, looped=False), "conv2": SweepCost(1000.0, 50.0, 64, 500.0),
         "bn": SweepCost(1000.0, 40.0, 8, 500.0), "conv1": SweepCost(1000.0, 400.0, 32, 500.0)}
ORDER = ["head", "conv2", "bn", "conv1"]


def test_eta_is_exact_once_both_rates_are_measured():
    """With sweeps that cost what the model says, the ETA equals the remaining time from the second sweep's
    second report on: one rate comes from the first sweep, the per-visit overhead from the second's pace."""
    seen, tracker = simulate(COSTS, ORDER, cycles=2, seconds_per_sample=1e-4, seconds_per_visit=0.05)
    assert seen[0][0] is None                     # nothing measured yet: no ETA
    checked = 0
    for eta, remaining, cycle, index, visits in seen:
        if (cycle, index) >= (0, 1) and (visits >= 8 or index >= 2 or cycle > 0):
            assert eta == pytest.approx(remaining, rel=1e-9, abs=1e-9)
            checked += 1
    assert checked > 50
    assert set(tracker.timings) == set(ORDER)


def test_a_resumed_run_starts_from_its_own_timings():
    _, first = simulate(COSTS, ORDER, cycles=1, seconds_per_sample=1e-4, seconds_per_visit=0.05)
    # resumed at the second cycle's third sweep, with the timings the checkpoint kept: an exact ETA at once
    seen, _ = simulate(COSTS, ORDER, cycles=2, seconds_per_sample=1e-4, seconds_per_visit=0.05,
                       timings=dict(first.timings), start=(1, 2))
    assert seen[0][0] == pytest.approx(seen[0][1], rel=1e-9)
    assert all(eta == pytest.approx(remaining, rel=1e-9, abs=1e-9) for eta, remaining, *_ in seen)


def test_work_done_counts_sample_equivalents():
    tracker = SweepProgress(COSTS, ORDER, cycles=3, timings={})
    assert tracker.total == 3 * sum(cost.total for cost in COSTS.values())
    assert tracker.done(1, 0, 0) == tracker.per_cycle
    assert tracker.done(0, 2, 5) == COSTS["head"].total + COSTS["conv2"].total + 1000.0 + 5 * 40.0


def test_format_seconds():
    assert (format_seconds(None), format_seconds(59.6), format_seconds(3725)) == ("?", "01:00", "1:02:05")


def test_eta_replay_of_a_log_from_a_later_cycle(tmp_path, capsys):
    """``eta_check --replay --from-cycle 2``: a resumed run's log replayed from its first whole cycle on (the
    slow first cycle is left out); the replay reports one row per later sweep and fails beyond the tolerance."""
    from experiments import eta_check
    from rso.models import build_model
    from rso.search.visit import visit_order

    order = [target.name for target in visit_order(build_model("oneconv", torch.Generator().manual_seed(0)))]
    seconds = {name: 1.0 + 3 * position for position, name in enumerate(order)}
    lines, total = [], 0.0
    for cycle in (1, 2, 3):
        for name in order:
            took = seconds[name] * (20 if cycle == 1 else 1)    # a first cycle on a crowded machine
            total += took
            lines.append(f"12:00:00 cycle {cycle}/3 {name:<12} sigma 0.1 accept 0.5 loss 0.5 ({took:.1f} s, {total:.0f} s total)")
    log = tmp_path / "log.txt"
    log.write_text("\n".join(lines) + "\n")
    flags = ["--replay", str(log), "--model", "oneconv", "--batch-size", "1000", "--out", str(tmp_path)]
    def worst(*extra) -> float:
        capsys.readouterr()
        eta_check.main([*flags, *extra])
        return float(capsys.readouterr().out.rsplit("actual ", 1)[1].split("%")[0])

    later = worst("--from-cycle", "2")
    replayed = (tmp_path / "eta_replay_oneconv.csv").read_text().splitlines()
    assert len(replayed) == 1 + 2 * len(order) - 1      # a header, then every sweep after the first
    # from cycle 1 the slow first cycle is in the replay: the ETA made before it ended was far off
    assert worst() > later + 50
    assert eta_check.main([*flags, "--tolerance", "0"]) == 1


def test_eta_replay_of_a_missing_or_damaged_file_is_one_line(tmp_path, capsys):
    from experiments import eta_check

    damaged = tmp_path / "bench.json"
    damaged.write_text("{")
    for path, expected in ((tmp_path / "none.txt", "no file"), (damaged, "is not a bench report")):
        with pytest.raises(SystemExit) as stop:
            eta_check.main(["--replay", str(path), "--out", str(tmp_path)])
        assert str(stop.value).startswith("error: ") and expected in str(stop.value)


def test_eta_check_reads_the_etas_a_run_logged(tmp_path, capsys):
    """``eta_check --log``: each sweep line's logged ETA against the clock times of the lines after it (past
    midnight too); a run whose ETAs were 10% high passes at 25% and fails at 5%."""
    from experiments import eta_check

    lines, clock = [], 23 * 3600 + 59 * 60      # 23:59:00: the run crosses midnight
    took = [30, 300, 20, 400, 60, 90]
    for position, seconds in enumerate(took):
        clock += seconds
        left = sum(took[position + 1:])
        stamp = f"{clock // 3600 % 24:02d}:{clock // 60 % 60:02d}:{clock % 60:02d}"
        eta = f" eta {format_seconds(1.1 * left)}" if position < len(took) - 1 else ""
        lines.append(f"{stamp} cycle 1/1 t{position:<11} sigma 0.1 accept 0.5 loss 0.5 ({seconds:.1f} s, "
                     f"{clock:.0f} s total){eta}")
    log = tmp_path / "log.txt"
    log.write_text("\n".join(["23:59:00 engine: fast (auto)", *lines]) + "\n")
    assert eta_check.main(["--log", str(log), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "largest |ETA - actual| / actual 10.0%" in out
    rows = (tmp_path / "eta_log.csv").read_text().splitlines()
    assert len(rows) == 1 + len(took) - 2        # from the second sweep line to the one before the last
    assert eta_check.main(["--log", str(log), "--out", str(tmp_path), "--tolerance", "0.05"]) == 1
    with pytest.raises(SystemExit, match="fewer than 3 sweep lines with an ETA"):
        eta_check.main(["--log", str(tmp_path / "eta_log.csv"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no file"):
        eta_check.main(["--log", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])
