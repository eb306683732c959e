"""Is the RSO progress bar's ETA honest? Train a ``paper6`` run on a slice of MNIST and compare, at every
progress report, the ETA the bar shows with the time the run actually still took; or replay the sweep times
of a run's ``log.txt`` through the same ETA model, at every sweep boundary.

    python -m experiments.eta_check                  # paper6, 1000 training examples, batch 200, one cycle
    python -m experiments.eta_check --cycles 2 --train-subset 2000 --batch-size 500
    python -m experiments.eta_check --preset authors --train-subset 6000 --batch-size 500   # the paper's 12 chunks
    python -m experiments.eta_check --replay runs/mnist-rso/log.txt --model oneconv --batch-size 1000
    python -m experiments.eta_check --replay results/paper/run/log.txt --batch-size 5000 --from-cycle 2 --workers 2
    python -m experiments.eta_check --replay results/bench/bench.json --batch-size 5000 --cycles 3 --bench-config fast_2 --workers 2
    python -m experiments.eta_check --log runs/paper6-1/log.txt     # the ETAs a finished run logged, per sweep

Writes ``eta.csv`` (one row per report: seconds since the start, cycle, tensor, visits into the sweep, ETA,
actual remaining time) into ``--out`` and prints, per sweep, the ETA at its first report against the actual
remaining time, then the largest relative error after the first sweep, counted while at least ``--tail`` (5%)
of the run remains (at the very end a second off is a large fraction). The remaining time is measured to the
end of the last sweep (the ETA does not include the final evaluation over the whole training set).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import tempfile
import time
from pathlib import Path

from rso import progress as progress_module
from rso.config import PRESETS, TrainConfig
from rso.train import train


SWEEP_LINE = re.compile(r"^(?:\S+ )?cycle (\d+)/(\d+) (\S+) .*\(([\d.]+) s, [\d.]+ s total\)")


def bench_sweeps(args) -> list[tuple[int, str, float]]:
    """A bench report's per-tensor sweep times (``rso.bench``'s bench.json, configuration ``--bench-config``)
    as ``--cycles`` identical cycles: the ETA on an idle machine whose every sweep takes what the bench measured."""
    import json

    try:
        report = json.loads(Path(args.replay).read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: {args.replay} is not a bench report (rso.bench's bench.json): {error}") from None
    case = next((case for case in report.get("results", [])
                 if case["model"] == args.model and case["batch_size"] == args.batch_size), None)
    if case is None or args.bench_config not in case["configurations"]:
        raise SystemExit(f"error: {args.replay} has no {args.model} batch {args.batch_size} {args.bench_config}")
    rows = case["configurations"][args.bench_config]["rows"]
    return [(cycle, name, rows[name]["sweep_s"]) for cycle in range(args.cycles) for name in case["tensors"]]


def replay(args) -> int:
    """Feed the sweep times of a log into SweepProgress: at the start of every sweep after the first, the ETA
    (from the sweeps logged before it) against the time the logged sweeps after that point actually took.
    Sweep times in the log exclude the evaluations, so the model counts none."""
    import torch

    from rso.models import build_model
    from rso.search.visit import visit_order

    if not Path(args.replay).is_file():
        raise SystemExit(f"error: no file {args.replay} to replay (a run's log.txt or rso.bench's bench.json)")
    if args.replay.endswith(".json"):
        sweeps = bench_sweeps(args)
    else:
        sweeps = [(int(m.group(1)) - 1, m.group(3), float(m.group(4)))
                  for m in map(SWEEP_LINE.match, Path(args.replay).read_text().splitlines()) if m]
    if args.from_cycle > 1:
        # a resumed run's log: replay its whole cycles from this one on, as if the run had started there (a
        # cycle's sweeps do the same work whatever its number; only sigma differs)
        sweeps = [(cycle - args.from_cycle + 1, name, seconds) for cycle, name, seconds in sweeps
                  if cycle + 1 >= args.from_cycle]
    if not sweeps:
        raise SystemExit(f"error: no sweep lines ('cycle c/C tensor ... (s s, t s total)') in {args.replay}")
    model = build_model(args.model, torch.Generator().manual_seed(0))
    targets = visit_order(model)
    order = [target.name for target in targets]
    if [name for _, name, _ in sweeps[:len(order)]] != order[:len(sweeps)]:
        raise SystemExit(f"error: the log's tensors do not follow {args.model}'s visit order {order}")
    costs = progress_module.sweep_costs(model, targets, torch.zeros(1, 1, 28, 28), args.batch_size,
                                        args.train_examples, fused_head=args.workers == 1,
                                        fill=progress_module.fill_scale(args.search_bn, args.workers),
                                        statistics_samples=args.search_bn_images if args.search_bn == "fixed-below" else 0)
    now = [0.0]
    tracker = progress_module.SweepProgress(costs, order, cycles=sweeps[-1][0] + 1, timings={}, clock=lambda: now[0])
    # the ETA covers the run up to the end of the log: cut the model's schedule there
    logged = len(sweeps)
    rows, worst = [], 0.0
    total = sum(sweep[2] for sweep in sweeps)
    for position, (cycle, name, seconds) in enumerate(sweeps):
        tracker.begin_sweep(cycle, order.index(name))
        if position:
            predictions = {other: tracker.predicted(other) for other in order}
            eta = sum(predictions[sweeps[later][1]] for later in range(position, logged))
            actual = sum(sweep[2] for sweep in sweeps[position:])
            error = (eta - actual) / actual
            if actual >= args.tail * total:
                worst = max(worst, abs(error))
            rows.append({"sweep": position, "cycle": cycle + 1, "tensor": name, "elapsed": round(now[0], 1),
                         "eta": round(eta, 1), "actual": round(actual, 1), "error": round(error, 4)})
        now[0] += seconds
        tracker.end_sweep()
    report(args, rows, worst, f"eta_replay_{args.model}.csv",
           f"{args.replay}: {logged} sweeps, {now[0]:.0f} s; {args.model}, batch {args.batch_size}, "
           f"{args.train_examples} training examples")
    return 0 if worst <= args.tolerance else 1


def report(args, rows: list[dict], worst: float, name: str, heading: str) -> None:
    """Write the per-sweep rows (sweep, cycle, tensor, elapsed, eta, actual, error) to ``--out``/``name`` and
    print them under ``heading``, then the largest error."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sweep", "cycle", "tensor", "elapsed", "eta", "actual", "error"])
        writer.writeheader()
        writer.writerows(rows)
    print(heading)
    print(f"{'sweep':>5} {'cycle':>5} {'tensor':<12} {'at s':>8} {'ETA s':>8} {'actual s':>9} {'error':>7}")
    for row in rows:
        print(f"{row['sweep']:>5} {row['cycle']:>5} {row['tensor']:<12} {row['elapsed']:8.0f} {row['eta']:8.0f} "
              f"{row['actual']:9.0f} {row['error']:+7.1%}")
    print(f"after the first sweep, while {args.tail:.0%} of the run remains: largest |ETA - actual| / actual "
          f"{worst:.1%} (tolerance {args.tolerance:.0%}); {path}")


LOGGED_ETA = re.compile(r"^(\d\d):(\d\d):(\d\d) cycle (\d+)/\d+ (\S+) .*\) eta (?:(\d+):)?(\d\d):(\d\d)$")
LOGGED_SWEEP = re.compile(r"^(\d\d):(\d\d):(\d\d) cycle \d+/\d+ \S+ .*s total\)")


def logged(args) -> int:
    """A finished run's own ETAs: every sweep line of its ``log.txt`` ends with the ETA the run computed then
    (``eta H:MM:SS``); the actual remaining time is from that line's clock time to the last sweep line's. This
    checks what a user of that run saw, with any number of workers (the bar's ETA is only on rank 0). A run that
    was stopped and resumed counts the time in between as run time: check uninterrupted runs."""
    path = Path(args.log)
    if not path.is_file():
        raise SystemExit(f"error: no file {args.log} (a finished run's log.txt)")
    times, etas = [], []   # per sweep line: seconds since the first, and the logged ETA (None on the last)
    day = previous = 0
    for line in path.read_text(errors="replace").splitlines():
        if not LOGGED_SWEEP.match(line):
            continue
        hours, minutes, seconds = (int(part) for part in line[:8].split(":"))
        clock = hours * 3600 + minutes * 60 + seconds
        if times and clock + day < previous:
            day += 86400       # the run went past midnight
        previous = clock + day
        times.append(previous)
        match = LOGGED_ETA.match(line)   # (ETA s, cycle, tensor), or None (the last sweep logs none)
        etas.append(None if match is None else
                    (int(match.group(6) or 0) * 3600 + int(match.group(7)) * 60 + int(match.group(8)),
                     match.group(4), match.group(5)))
    if etas and etas[-1] is not None:
        raise SystemExit(f"error: {args.log} is not a finished run's log (its last sweep line still has an ETA); "
                         "the actual remaining time is only known once the run has ended")
    if len(times) < 3 or not any(etas[:-1]):
        raise SystemExit(f"error: {args.log} has fewer than 3 sweep lines with an ETA ('... s total) eta H:MM:SS'); "
                         "it needs a finished run logged by this version")
    end, total = times[-1], times[-1] - times[0]
    rows, worst = [], 0.0
    for position in range(1, len(times) - 1):     # after the first sweep, up to the last one
        if etas[position] is None:
            continue
        eta, cycle, tensor = etas[position]
        actual = end - times[position]
        if actual <= 0:
            continue
        error = (eta - actual) / actual
        if actual >= args.tail * total:
            worst = max(worst, abs(error))
        rows.append({"sweep": position, "cycle": int(cycle), "tensor": tensor, "elapsed": times[position] - times[0],
                     "eta": eta, "actual": actual, "error": round(error, 4)})
    report(args, rows, worst, "eta_log.csv",
           f"{args.log}: {len(times)} sweep lines over {total} s (from the end of the first sweep)")
    return 0 if rows and worst <= args.tolerance else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.eta_check",
                                     description="Compare the RSO progress bar's ETA with the actual remaining time.")
    parser.add_argument("--model", default="paper6")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="train with a named configuration (e.g. authors: "
                        "fixed-below BN, weight decay, centred inputs) at this check's size and batch")
    parser.add_argument("--train-subset", type=int, default=1000)
    parser.add_argument("--test-subset", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--cycles", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=0.25, help="allowed |ETA - actual| / actual")
    parser.add_argument("--tail", type=float, default=0.05,
                        help="errors count while at least this fraction of the run remains")
    parser.add_argument("--out", default="results/progress")
    parser.add_argument("--replay", help="a run's log.txt: replay its sweep times instead of training")
    parser.add_argument("--log", help="a finished run's log.txt: compare the ETA it logged after each sweep with "
                        "the time it then took (any number of workers)")
    parser.add_argument("--train-examples", type=int, default=60000, help="--replay: training examples of the run")
    parser.add_argument("--bench-config", default="fast_1",
                        help="--replay of a bench.json: its configuration (fast_1, fast_2, prefix), as --cycles cycles")
    parser.add_argument("--workers", type=int, default=1, help="--replay: workers of the run (1: its output-layer "
                        "sweep ran fused)")
    parser.add_argument("--search-bn", default="chunk", choices=["chunk", "fixed-below"],
                        help="--replay: the run's BN handling during the search (the authors' preset: fixed-below)")
    parser.add_argument("--search-bn-images", type=int, default=2000,
                        help="--replay, fixed-below: images the fixed statistics come from (2000)")
    parser.add_argument("--visit-work-scale", type=float,
                        help="--replay: use this rso.progress.VISIT_WORK_SCALE (how its value was fitted)")
    parser.add_argument("--from-cycle", type=int, default=1,
                        help="--replay: start at this cycle of the log (a run resumed inside an earlier one)")
    args = parser.parse_args(argv)
    if args.log:
        return logged(args)
    if args.replay:
        if args.visit_work_scale is not None:
            progress_module.VISIT_WORK_SCALE = args.visit_work_scale
        return replay(args)

    reports: list[dict] = []
    sweep_ends: list[float] = []
    original_eta, original_end = progress_module.SweepProgress.eta, progress_module.SweepProgress.end_sweep
    start = time.perf_counter()

    def eta(self):
        value = original_eta(self)
        reports.append({"seconds": time.perf_counter() - start, "cycle": self.cycle + 1,
                        "tensor": self.order[self.index], "sweep": self.cycle * len(self.order) + self.index,
                        "visits": self.visits, "eta": value})
        return value

    def end_sweep(self):
        sweep_ends.append(time.perf_counter() - start)
        return original_end(self)

    progress_module.SweepProgress.eta, progress_module.SweepProgress.end_sweep = eta, end_sweep
    try:
        with tempfile.TemporaryDirectory(prefix="rso-eta-") as folder:
            preset = {**PRESETS[args.preset], "search_bn_images": min(PRESETS[args.preset].get(
                "search_bn_images", 2000), args.train_subset)} if args.preset else {}
            train(TrainConfig(**{**preset, "model": args.model, "train_subset": args.train_subset,
                                 "test_subset": args.test_subset, "batch_size": args.batch_size, "cycles": args.cycles,
                                 "threads": args.threads, "bn_samples": args.train_subset, "run_dir": folder,
                                 "name": "eta", "progress": True}))
    finally:
        progress_module.SweepProgress.eta, progress_module.SweepProgress.end_sweep = original_eta, original_end

    end = sweep_ends[-1]
    for report in reports:
        report["actual"] = end - report["seconds"]
        report["error"] = ((report["eta"] - report["actual"]) / report["actual"]
                           if report["eta"] is not None and report["actual"] > 0 else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "eta.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(reports[0]))
        writer.writeheader()
        writer.writerows([{key: (round(value, 3) if isinstance(value, float) else value) for key, value in row.items()}
                          for row in reports])
    print(f"\n{args.model}{f' (preset {args.preset})' if args.preset else ''}, {args.train_subset} training examples, batch {args.batch_size}, {args.cycles} cycle(s): "
          f"{end:.0f} s of sweeps")
    print(f"{'sweep':>5} {'tensor':<12} {'at s':>7} {'ETA s':>8} {'actual s':>9} {'error':>7}")
    firsts = {}
    for report in reports:
        firsts.setdefault(report["sweep"], report)
    for sweep, report in firsts.items():
        eta_text = f"{report['eta']:.0f}" if report["eta"] is not None else "?"
        error = f"{report['error']:+.0%}" if report["error"] is not None else ""
        print(f"{sweep:>5} {report['tensor']:<12} {report['seconds']:7.0f} {eta_text:>8} {report['actual']:9.0f} {error:>7}")
    after_first = [report for report in reports if report["sweep"] >= 1 and report["actual"] >= args.tail * end]
    errors = [abs(report["error"]) for report in after_first if report["error"] is not None]
    missing = sum(report["eta"] is None for report in after_first)
    worst = max(errors) if errors else float("nan")
    print(f"after the first sweep, while {args.tail:.0%} of the run remains: {len(after_first)} reports, {missing} "
          f"without an ETA, largest |ETA - actual| / actual {worst:.1%} (tolerance {args.tolerance:.0%}); "
          f"{out / 'eta.csv'}")
    return 0 if errors and not missing and worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
