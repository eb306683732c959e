"""What every MNIST experiment shares: flags, running a list of configs, CSVs, plots and tables with provenance.

An experiment builds a list of :class:`Run` (a label, the columns that describe it, a :class:`TrainConfig`)
and hands it to :func:`run_all`, which trains each one under ``runs/experiments/<name>/`` (one TensorBoard
run per config and seed), and returns one :class:`Result` per run. The helpers below turn results into
``history.csv`` (one row per evaluation), ``runs.csv`` (one row per run), PNG plots and Markdown tables,
each tied to the command, the git commit and the machine that produced it (``provenance.json``), recorded
when the experiment starts; every row also names the code of the run that produced it (its ``code`` column:
``<commit>`` or ``<commit>-dirty``, joined by ``+`` over the sessions of a resumed run).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rso import provenance as rso_provenance
from rso.provenance import UNRECORDED
from rso.config import TrainConfig
from rso.data import MNIST, load_mnist
from rso.engines import ENGINES
from rso.models import build_model, count_weights
from rso.train import train

# The course project's OneConv/TwoConv numbers, quoted from ../shared/docs/reference.md section 2 (10 rounds).
COURSE_PROJECT = [
    # (model, batch, accuracy after 10 rounds, seconds for 10 rounds or None when not reported)
    ("oneconv", 32, 0.8075, 212.0),
    ("oneconv", 64, 0.8353, None),
    ("oneconv", 256, 0.8929, 1641.0),
    ("oneconv", 512, 0.9152, 2834.0),
    ("oneconv", 1024, 0.9148, 5046.0),
    ("twoconv", 1000, 0.9604, 36464.0),
]
COURSE_LABEL = "course project (reference.md)"

COLORS = {"rso": "tab:blue", "sgd": "tab:orange", "adam": "tab:green"}


# ---- flags -----------------------------------------------------------------------------------------
class ExperimentParser(argparse.ArgumentParser):
    """Parsing the flags is when an experiment starts: its provenance is recorded then (``args.start``),
    not when its results are written, so a commit made while it ran is not credited with its rows."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        parsed.start = start_provenance(parsed.experiment, args)
        return parsed


def parser(name: str, description: str, default_seeds: int = 1) -> argparse.ArgumentParser:
    """The flags every experiment takes; experiments add their own budget flags."""
    module = name.replace("-", "_")
    result = ExperimentParser(prog=f"python -m experiments.{module}", description=description)
    result.add_argument("--quick", action="store_true", help="seconds-long variant on data slices (for the tests)")
    result.add_argument("--seeds", type=int, default=None,
                        help=f"seeds 0..N-1 for every config (default {default_seeds}; 1 with --quick)")
    result.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    result.add_argument("--run-dir", default=f"runs/experiments/{module}",
                        help="parent folder of this experiment's TensorBoard runs")
    result.add_argument("--out", default=f"results/{module}", help="folder for the CSV, PNG and Markdown outputs")
    result.add_argument("--engine", default="auto", help=f"scoring engine: auto, {', '.join(ENGINES)} (default auto)")
    result.add_argument("--train-subset", type=int, default=None, help="use the first N training examples")
    result.add_argument("--test-subset", type=int, default=None, help="use the first N test examples")
    result.add_argument("--no-progress", dest="progress", action="store_false", help="no per-run progress bars")
    result.set_defaults(default_seeds=default_seeds, experiment=module)
    return result


def seeds(args: argparse.Namespace) -> list[int]:
    count = args.seeds if args.seeds is not None else (1 if args.quick else args.default_seeds)
    if count < 1:
        raise SystemExit(f"--seeds must be positive, got {count}")
    return list(range(count))


def prepare(args: argparse.Namespace) -> Path:
    """Apply the machine flags, check the engine name, make the output folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine not in ("auto", *ENGINES):
        raise SystemExit(f"unknown engine {args.engine!r}; choose one of auto, {', '.join(ENGINES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---- running ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """One config to train; ``columns`` describe it in the CSV and tables (e.g. {"batch_size": 512})."""

    label: str
    config: TrainConfig
    columns: dict = field(default_factory=dict)


@dataclass
class Result:
    run: Run
    seed: int
    metrics: dict           # what train() returned, less the history
    history: list[dict]     # per evaluation
    weights_per_cycle: int  # RSO visits per cycle = scalar weights (backprop: weights updated per step)

    @property
    def optimizer(self) -> str:
        return self.run.config.optimizer


_DATA_CACHE: dict[tuple, MNIST] = {}


def mnist(train_subset: int | None, test_subset: int | None, transform: str = "standardize") -> MNIST:
    key = (train_subset, test_subset, transform)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_mnist(None, train_subset, test_subset, transform=transform)
    return _DATA_CACHE[key]


def data_description(config: TrainConfig, args: argparse.Namespace) -> str:
    train_subset = config.train_subset or args.train_subset
    test_subset = config.test_subset or args.test_subset
    return (f"train examples: {'first ' + str(train_subset) if train_subset else 'all 60000'}, "
            f"test examples: {'first ' + str(test_subset) if test_subset else 'all 10000'}")


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-")


_WARMED: set[tuple] = set()


def warm_up(config: TrainConfig) -> None:
    """Compile the engine's numba kernels on a throwaway tiny run, so the first timed run is not charged for it."""
    key = (config.engine, config.dtype)
    if config.optimizer != "rso" or key in _WARMED:
        return
    _WARMED.add(key)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        tiny = TrainConfig(model="convnet", depth=1, channels=2, batch_size=32, cycles=1, bn_samples=256,
                           engine=config.engine, dtype=config.dtype, threads=config.threads, progress=False,
                           run_dir=folder, name="warm-up")
        started = time.perf_counter()
        quiet = open(os.devnull, "w")
        stdout, sys.stdout = sys.stdout, quiet
        try:
            train(tiny, data=mnist(256, 100))
        finally:
            sys.stdout = stdout
            quiet.close()
        print(f"warm-up (engine {config.engine}, JIT compile, not counted): {time.perf_counter() - started:.1f} s", flush=True)


def run_all(runs: list[Run], args: argparse.Namespace, seed_list: list[int] | None = None) -> list[Result]:
    """Train every run for every seed under ``args.run_dir``; print one line per finished run.

    The first RSO run is preceded by an untimed warm-up, so numba's compile time does not land in its seconds.
    """
    seed_list = seed_list if seed_list is not None else seeds(args)
    results = []
    total = len(runs) * len(seed_list)
    started = time.perf_counter()
    for run in runs:
        for seed in seed_list:
            config = replace(run.config, seed=seed, run_dir=args.run_dir, engine=args.engine,
                             threads=args.threads, progress=args.progress,
                             name=run.config.name or slug(f"{run.label}-seed{seed}"),
                             train_subset=run.config.train_subset or args.train_subset,
                             test_subset=run.config.test_subset or args.test_subset)
            warm_up(config)
            data = mnist(config.train_subset, config.test_subset, config.resolved_input_transform())
            print(f"[{len(results) + 1}/{total}] {run.label} seed {seed}: {config.optimizer} on {config.model}, "
                  f"batch {config.batch_size}, " + (f"{config.cycles} cycles" if config.optimizer == "rso"
                                                    else f"{config.epochs} epochs") + f", {len(data.train_labels)} train examples",
                  flush=True)
            metrics = train(config, data=data)
            history = metrics.pop("history")
            n_weights = count_weights(build_model(config.model, None, **config.model_options()))
            results.append(Result(run, seed, metrics, history, n_weights))
            print(f"    test accuracy {metrics['test_accuracy']:.4f} in {metrics['seconds']:.1f} s of training "
                  f"({time.perf_counter() - started:.0f} s elapsed)", flush=True)
    return results


# ---- tables of numbers -----------------------------------------------------------------------------
def history_rows(results: list[Result]) -> list[dict]:
    """One row per evaluation, with the x axes of the comparison: cycles/epochs, weight updates, samples, time."""
    rows = []
    for result in results:
        config = result.run.config
        for entry in result.history:
            epochs = entry["step"] / result.weights_per_cycle if config.optimizer == "rso" else entry.get("epoch")
            rows.append({"label": result.run.label, **result.run.columns, "optimizer": config.optimizer,
                         "model": config.model, "batch_size": config.batch_size, "seed": result.seed,
                         "cycles_or_epochs": round(float(epochs), 4), "weight_updates": entry["step"],
                         "forward_samples": entry["forward_samples"], "seconds": entry["seconds"],
                         "train_loss": round(entry["train_loss"], 6), "test_accuracy": entry["test_accuracy"],
                         "test_loss": round(entry["test_loss"], 6), "target": entry.get("target", ""),
                         "code": entry.get("code", UNRECORDED)})
    return rows


def run_rows(results: list[Result]) -> list[dict]:
    """One row per run: its description and final metrics (BN statistics over the whole training slice)."""
    rows = []
    for result in results:
        config, metrics = result.run.config, result.metrics
        done = metrics.get("cycles_done", metrics.get("epochs_done"))
        seconds_per = metrics["seconds"] / done if done else float("nan")
        rows.append({"label": result.run.label, **result.run.columns, "optimizer": config.optimizer,
                     "model": config.model, "batch_size": config.batch_size, "seed": result.seed,
                     "weights": result.weights_per_cycle, "cycles_or_epochs_done": done,
                     "test_accuracy": metrics["test_accuracy"], "test_loss": round(metrics["test_loss"], 6),
                     "weight_updates": metrics["visits"], "forward_samples": metrics["forward_samples"],
                     "seconds": metrics["seconds"], "seconds_per_cycle_or_epoch": round(seconds_per, 2),
                     "stopped_by": metrics.get("stopped_by") or "", "run_folder": metrics["run_folder"],
                     "code": metrics.get("code", UNRECORDED)})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def run_and_write(runs: list[Run], args: argparse.Namespace, out: Path) -> tuple[list[Result], list[dict], list[dict]]:
    """Run every config for every seed, write ``history.csv`` and ``runs.csv`` into ``out``."""
    results = run_all(runs, args)
    history, finals = history_rows(results), run_rows(results)
    args.row_codes = [row["code"] for row in finals]   # provenance() puts them in the tables
    write_csv(out / "history.csv", history)
    write_csv(out / "runs.csv", finals)
    return results, history, finals


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def mean_spread(values: list[float], digits: int = 4) -> str:
    """``mean ± std (n)`` over seeds; a single value is printed as is."""
    values = [float(value) for value in values if value is not None and not math.isnan(float(value))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} (n={len(values)})"


def group(rows: list[dict], key: str = "label") -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


def markdown_table(headers: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


# ---- provenance ------------------------------------------------------------------------------------
def machine() -> str:
    return (f"{rso_provenance.machine_line(rso_provenance.machine())}; {platform.system()} {platform.machine()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}")


def command(experiment: str, argv: list[str] | None) -> str:
    given = sys.argv[1:] if argv is None else argv
    return " ".join([f"python -m experiments.{experiment}", *given])


def start_provenance(experiment: str, argv: list[str] | None) -> dict:
    """The record taken when an experiment starts (:func:`rso.provenance.start_record`)."""
    return rso_provenance.start_record(command(experiment, argv))


def commit_text(record: dict) -> str:
    """``abc1234`` or ``abc1234 (with uncommitted changes: a.py, b.py)``."""
    if record["commit"] == "unknown":
        return "unknown (not a git checkout)"
    changed = record.get("changed") or []
    return record["short"] + (f" (with uncommitted changes: {', '.join(changed[:8])}"
                              f"{', ...' if len(changed) > 8 else ''})" if record.get("dirty") else "")


def provenance(args: argparse.Namespace, argv: list[str] | None, what_ran: str, start: dict | None = None,
               row_codes: list[str] | None = None) -> dict:
    """What ``provenance.json`` holds: the command, the commit when the experiment STARTED (and the one when it
    wrote its results, if they differ), the machine, and which code produced each row of its tables."""
    start = start or getattr(args, "start", None) or start_provenance(args.experiment, argv)
    now = rso_provenance.git_state()
    row_codes = row_codes if row_codes is not None else getattr(args, "row_codes", None)
    record = {"command": start["command"], "git_commit": commit_text(start), "code": start["code"],
              "commit": start["commit"], "dirty": start["dirty"], "changed": start["changed"],
              "machine": machine(), "started": start["started"],
              "produced": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "engine": args.engine, "what_ran": what_ran, "versions": start["versions"]}
    if now["commit"] != start["commit"] or now["dirty"] != start["dirty"]:
        record["code_when_written"] = rso_provenance.code_label(now)
    if row_codes is not None:
        record["row_codes"] = list(row_codes)
    return record


def code_note(record: dict) -> str:
    """The sentence every table carries about the code of its rows (see :func:`rso.provenance.describe_codes`)."""
    codes = record.get("row_codes")
    note = rso_provenance.describe_codes(codes) if codes is not None else f"Code: {record['git_commit']}."
    if record.get("code_when_written"):
        note += (f" The experiment started at {record['code']} and wrote its results at "
                 f"{record['code_when_written']}.")
    return note


def header(title: str, record: dict) -> str:
    return (f"# {title}\n\n- command: `{record['command']}`\n- git commit at start: {record['git_commit']}\n"
            f"- machine: {record['machine']}\n- started: {record.get('started', '?')}; produced: {record['produced']}\n"
            f"- what ran: {record['what_ran']}\n\n")


def write_outputs(out: Path, title: str, record: dict, summary: str, details: str = "") -> None:
    """``table.md`` (provenance header + summary + details), ``summary.md`` (for the README, ending with the
    sentence on which code produced its rows), ``provenance.json``."""
    summary = summary.rstrip("\n") + "\n\n" + code_note(record) + "\n"
    (out / "summary.md").write_text(summary)
    (out / "table.md").write_text(header(title, record) + summary + ("\n" + details if details else ""))
    (out / "provenance.json").write_text(json.dumps({"title": title, **record}, indent=2) + "\n")
    print(f"wrote {out / 'table.md'}", flush=True)


# ---- plots -----------------------------------------------------------------------------------------
def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def footer(figure, record: dict) -> None:
    figure.text(0.01, 0.005, f"{record['command']} @ {record.get('code', record['git_commit'])}", fontsize=6, color="gray")


def save(figure, path: Path) -> Path:
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    figure.savefig(path, dpi=90)
    pyplot().close(figure)
    print(f"wrote {path}", flush=True)
    return path


def plot_curves(rows: list[dict], axes_spec: list[tuple[str, str, bool]], path: Path, record: dict,
                title: str, color_key: str = "optimizer") -> Path:
    """Test accuracy against each x of ``axes_spec`` [(column, axis label, log scale)], one line per run and seed.

    All optimizers share each panel's axes, so RSO and SGD can be read off against the same x.
    """
    plt = pyplot()
    columns = min(len(axes_spec), 2)
    lines = -(-len(axes_spec) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.6 * columns, 3.4 * lines), squeeze=False)
    axes = [list(axes.flat)]
    runs = group([{**row, "_run": f"{row['label']}|{row['seed']}"} for row in rows], "_run")
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(row["label"] for row in rows))
    for axis, (column, axis_label, log) in zip(axes[0], axes_spec):
        shown = set()
        for key, points in runs.items():
            label = points[0]["label"]
            color = COLORS.get(points[0].get(color_key), None) if color_key == "optimizer" else None
            color = color or palette[labels.index(label) % len(palette)]
            xs = [float(point[column]) for point in points]
            ys = [float(point["test_accuracy"]) for point in points]
            axis.plot(xs, ys, marker="." if len(xs) < 40 else None, color=color, alpha=0.85,
                      label=None if label in shown else label)
            shown.add(label)
        axis.set_xlabel(axis_label)
        axis.set_ylabel("test accuracy")
        if log:
            axis.set_xscale("log")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    footer(figure, record)
    return save(figure, path)


__all__ = ["COURSE_LABEL", "COURSE_PROJECT", "Result", "Run", "group", "history_rows", "markdown_table",
           "mean_spread", "parser", "plot_curves", "prepare", "provenance", "read_csv", "run_all", "run_rows",
           "save", "seeds", "write_csv", "write_outputs"]
