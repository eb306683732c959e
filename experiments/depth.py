"""RSO on the convnet family with 1 to 6 conv layers (paper6-cbr's design: 3x3 conv, BN, ReLU, avg-pool after
conv1 and conv3, GAP, dense; not the authors' exact paper6), with an SGD run per depth on the same data for reference.

    python -m experiments.depth                              # depths 1..6, 16 channels, 1 cycle each
    python -m experiments.depth --channels 8 --train-subset 10000 --cycles 2
    python -m experiments.depth --quick                      # 2 channels, depths 1-2, data slices
"""

from __future__ import annotations

import sys

from experiments import common
from experiments.common import Run
from rso.config import TrainConfig
from rso.train import exit_status


def build_runs(args) -> list[Run]:
    budget = dict(max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    depths = [1, 2] if args.quick else args.depths
    channels = 2 if args.quick else args.channels
    data = dict(train_subset=args.train_subset or 1000, test_subset=args.test_subset or 500) if args.quick else {}
    cycles, epochs = (1, 1) if args.quick else (args.cycles, args.sgd_epochs)
    batch = 100 if args.quick else args.batch
    runs = []
    for depth in depths:
        model = dict(model="convnet", depth=depth, channels=channels, **data, **budget)
        runs.append(Run(f"RSO depth {depth}", TrainConfig(optimizer="rso", batch_size=batch, cycles=cycles,
                                                         eval_every="cycle", **model), {"depth": depth}))
        if args.sgd:
            runs.append(Run(f"SGD depth {depth}", TrainConfig(optimizer="sgd", batch_size=args.sgd_batch if not args.quick else 50,
                                                             epochs=epochs, lr=0.05, **model), {"depth": depth}))
    return runs


def summarize(finals: list[dict]) -> str:
    body = []
    depths = sorted({int(r["depth"]) for r in finals})
    for depth in depths:
        rso = [r for r in finals if int(r["depth"]) == depth and r["optimizer"] == "rso"]
        sgd = [r for r in finals if int(r["depth"]) == depth and r["optimizer"] == "sgd"]
        body.append([depth, rso[0]["weights"] if rso else "-", rso[0]["cycles_or_epochs_done"] if rso else "-",
                     common.mean_spread([r["test_accuracy"] for r in rso]),
                     common.mean_spread([r["seconds_per_cycle_or_epoch"] for r in rso], 1),
                     sgd[0]["cycles_or_epochs_done"] if sgd else "-", common.mean_spread([r["test_accuracy"] for r in sgd]),
                     common.mean_spread([r["seconds_per_cycle_or_epoch"] for r in sgd], 1)])
    return common.markdown_table(["conv layers", "weights (incl. BN)", "RSO cycles", "RSO test accuracy",
                                  "RSO seconds / cycle", "SGD epochs", "SGD test accuracy", "SGD seconds / epoch"], body)


def plot(finals: list[dict], record: dict, path) -> None:
    plt = common.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for optimizer in ("rso", "sgd"):
        rows = [r for r in finals if r["optimizer"] == optimizer]
        if not rows:
            continue
        groups = common.group(rows, "depth")
        depths = sorted(groups, key=int)
        mean = lambda key, d: sum(float(r[key]) for r in groups[d]) / len(groups[d])  # noqa: E731
        unit = "cycle" if optimizer == "rso" else "epoch"
        left.plot([int(d) for d in depths], [mean("test_accuracy", d) for d in depths], marker="o",
                  color=common.COLORS[optimizer], label=f"{optimizer.upper()}, {rows[0]['cycles_or_epochs_done']} {unit}(s)")
        right.plot([int(d) for d in depths], [mean("seconds_per_cycle_or_epoch", d) for d in depths], marker="o",
                   color=common.COLORS[optimizer], label=f"{optimizer.upper()} seconds per {unit}")
    left.set_ylabel("test accuracy")
    right.set_ylabel("seconds")
    right.set_yscale("log")
    for axis in (left, right):
        axis.set_xlabel("conv layers")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("Depth: the convnet family (conv-BN-ReLU) with 1..6 conv layers", fontsize=10)
    common.footer(figure, record)
    common.save(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("depth", " ".join(__doc__.split("\n\n")[0].split()), default_seeds=1)
    parser.add_argument("--depths", type=lambda text: [int(v) for v in text.split(",") if v], default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--channels", type=int, default=16, help="channels per conv (default 16, the paper's)")
    parser.add_argument("--batch", type=int, default=1000, help="RSO mini-batch (default 1000)")
    parser.add_argument("--cycles", type=int, default=1, help="RSO cycles (default 1)")
    parser.add_argument("--sgd-epochs", type=int, default=1, help="SGD epochs per depth (default 1)")
    parser.add_argument("--sgd-batch", type=int, default=100, help="SGD mini-batch (default 100)")
    parser.add_argument("--no-sgd", dest="sgd", action="store_false", help="RSO only")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-time cap per run")
    args = parser.parse_args(argv)
    out = common.prepare(args)
    runs = build_runs(args)
    results, history, finals = common.run_and_write(runs, args, out)
    first = runs[0].config
    what = (f"convnet depths {sorted({r.config.depth for r in runs})}, {first.channels} channels; RSO batch {first.batch_size}, "
            f"{first.cycles} cycle(s)" + (f"; SGD {runs[1].config.epochs} epoch(s)" if args.sgd else "")
            + f"; seeds {common.seeds(args)}; {common.data_description(first, args)}")
    record = common.provenance(args, argv, what)
    plot(finals, record, out / "depth.png")
    common.write_outputs(out, "Depth: 1 to 6 conv layers of the convnet family (paper6-cbr's conv-BN-ReLU design)", record,
                         summarize(finals) + "\n![depth chart](depth.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
