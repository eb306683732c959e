"""RSO, SGD and Adam on the same model and data: test accuracy against cycles/epochs, weight updates,
forward-pass samples and wall-clock time.

    python -m experiments.compare                 # oneconv on full MNIST, 3 seeds (see --help for the budget)
    python -m experiments.compare --quick         # a tiny convnet on data slices: a smoke test

Counting, as ``rso.train`` does: a weight update is one scalar weight visited by RSO, and for backprop
``steps * n_weights`` (every step updates every weight). Forward samples: RSO scores 3 candidates per visit on
its mini-batch (3 * batch per visit); backprop pays a forward and a backward pass (counted 2 * batch per step).
Every optimizer is evaluated the same way (BN recalibrated on training data, then the test set).
"""

from __future__ import annotations

import sys

from experiments import common
from experiments.common import Run
from rso.config import TrainConfig
from rso.train import exit_status


def build_runs(args) -> list[Run]:
    if args.quick:
        model = dict(model="convnet", depth=1, channels=4, train_subset=args.train_subset or 1000,
                     test_subset=args.test_subset or 500)
        rso_batch, sgd_batch = 100, 50
    else:
        model = dict(model=args.model, depth=args.depth, channels=args.channels)
        rso_batch, sgd_batch = args.rso_batch, args.sgd_batch
    budget = dict(max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    cycles = 1 if args.quick else args.cycles
    epochs = 1 if args.quick else args.epochs
    return [
        Run(f"RSO batch {rso_batch}", TrainConfig(optimizer="rso", batch_size=rso_batch, cycles=cycles, **model, **budget)),
        Run(f"SGD batch {sgd_batch} lr {args.sgd_lr:g}",
            TrainConfig(optimizer="sgd", batch_size=sgd_batch, epochs=epochs, lr=args.sgd_lr, momentum=0.9, **model, **budget)),
        Run(f"Adam batch {sgd_batch} lr {args.adam_lr:g}",
            TrainConfig(optimizer="adam", batch_size=sgd_batch, epochs=epochs, lr=args.adam_lr, **model, **budget)),
    ]


def first_reaching(rows: list[dict], threshold: float) -> dict | None:
    """The first evaluation of one run at or above ``threshold`` (evaluations are per sweep / per epoch)."""
    for row in rows:
        if float(row["test_accuracy"]) >= threshold:
            return row
    return None


def summarize(history: list[dict], finals: list[dict]) -> tuple[str, str]:
    by_label = common.group(finals)
    body = []
    for label, rows in by_label.items():
        body.append([label, rows[0]["model"], rows[0]["cycles_or_epochs_done"],
                     common.mean_spread([r["test_accuracy"] for r in rows]),
                     f"{float(rows[0]['weight_updates']):.3g}", f"{float(rows[0]['forward_samples']):.3g}",
                     common.mean_spread([r["seconds"] for r in rows], 1)])
    summary = common.markdown_table(
        ["run", "model", "cycles / epochs", "test accuracy (mean ± std over seeds)", "weight updates",
         "forward samples", "training seconds"], body)

    # The headline comparison: what each optimizer paid to first reach RSO's final accuracy.
    rso_finals = [float(r["test_accuracy"]) for r in finals if r["optimizer"] == "rso"]
    details = ""
    if rso_finals:
        threshold = min(rso_finals)
        runs = common.group([{**row, "_run": f"{row['label']}|{row['seed']}"} for row in history], "_run")
        body = []
        for key, rows in runs.items():
            hit = first_reaching(rows, threshold)
            body.append([rows[0]["label"], rows[0]["seed"]] + (
                [hit["cycles_or_epochs"], f"{float(hit['weight_updates']):.3g}", f"{float(hit['forward_samples']):.3g}",
                 f"{float(hit['seconds']):.1f}", f"{float(hit['test_accuracy']):.4f}"] if hit else ["not reached"] + ["-"] * 4))
        details = (f"\n## Cost to first reach {threshold:.4f} test accuracy (RSO's lowest final accuracy over seeds)\n\n"
                   "Evaluations are after every RSO layer sweep and after every backprop epoch, so backprop's figures "
                   "are upper bounds at epoch granularity.\n\n" + common.markdown_table(
                       ["run", "seed", "cycles / epochs", "weight updates", "forward samples", "seconds", "accuracy then"], body))
    return summary, details


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("compare", " ".join(__doc__.split("\n\n")[0].split()), default_seeds=3)
    parser.add_argument("--model", default="oneconv", help="model for all optimizers (default oneconv)")
    parser.add_argument("--depth", type=int, default=6, help="convnet depth")
    parser.add_argument("--channels", type=int, default=16, help="convnet channels")
    parser.add_argument("--cycles", type=int, default=5, help="RSO cycles (default 5)")
    parser.add_argument("--epochs", type=int, default=5, help="SGD/Adam epochs (default 5)")
    parser.add_argument("--rso-batch", type=int, default=1000, help="RSO mini-batch (default 1000)")
    parser.add_argument("--sgd-batch", type=int, default=100, help="SGD/Adam mini-batch (default 100)")
    parser.add_argument("--sgd-lr", type=float, default=0.05, help="SGD learning rate, momentum 0.9 (default 0.05)")
    parser.add_argument("--adam-lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-time cap per run")
    args = parser.parse_args(argv)
    out = common.prepare(args)
    runs = build_runs(args)
    results, history, finals = common.run_and_write(runs, args, out)
    what = "; ".join(f"{run.label}: {run.config.model}, " + (f"{run.config.cycles} cycles" if run.config.optimizer == "rso"
                                                           else f"{run.config.epochs} epochs") for run in runs)
    what += f"; seeds {common.seeds(args)}; {common.data_description(runs[0].config, args)}"
    record = common.provenance(args, argv, what)
    common.plot_curves(history, [("cycles_or_epochs", "RSO cycles / backprop epochs", False),
                                 ("weight_updates", "scalar weight updates", True),
                                 ("forward_samples", "forward-pass samples", True),
                                 ("seconds", "training seconds (this machine)", True)],
                       out / "accuracy_curves.png", record, f"RSO vs backprop on {runs[0].config.model}")
    summary, details = summarize(history, finals)
    common.write_outputs(out, "RSO vs SGD vs Adam: same model, same data, same evaluation", record,
                         summary + "\n![accuracy curves](accuracy_curves.png)\n", details)
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
