"""RSO ablations, one change at a time from the default: annealing off; sampler uniform U(-2s, 2s) or fixed
{-s, 0, s}; input-first visiting order; one chunk per layer sweep instead of a fresh chunk per weight;
the authors' weight decay 1e-4.

    python -m experiments.ablations                   # oneconv on full MNIST, batch 1000, 3 cycles
    python -m experiments.ablations --quick           # a tiny convnet on data slices: a smoke test
"""

from __future__ import annotations

import sys

from experiments import common
from experiments.common import Run
from rso.config import TrainConfig
from rso.train import exit_status

# (label, what the variant changes from the default TrainConfig)
VARIANTS = [
    ("default (anneal, Gaussian, output-first, chunk per weight, no decay)", {}),
    ("annealing off", {"anneal": False}),
    ("sampler uniform U(-2s, 2s)", {"sampler": "uniform"}),
    ("sampler fixed {-s, 0, s}", {"sampler": "fixed"}),
    ("order input-first", {"order": "input-first"}),
    ("one chunk per layer sweep", {"chunking": "per-sweep"}),
    ("weight decay 1e-4", {"weight_decay": 1e-4}),
]


def build_runs(args) -> list[Run]:
    budget = dict(max_seconds=args.max_minutes * 60 if args.max_minutes else None, eval_every="cycle")
    if args.quick:
        base = dict(model="convnet", depth=1, channels=4, train_subset=args.train_subset or 1000,
                    test_subset=args.test_subset or 500, batch_size=100, cycles=2)
    else:
        base = dict(model=args.model, batch_size=args.batch, cycles=args.cycles)
    return [Run(label, TrainConfig(**base, **budget, **change), {"variant": label}) for label, change in VARIANTS]


def summarize(finals: list[dict]) -> str:
    groups = common.group(finals)
    default = [float(r["test_accuracy"]) for r in groups[VARIANTS[0][0]]]
    baseline = sum(default) / len(default)
    body = []
    for label, rows in groups.items():
        accuracy = [float(r["test_accuracy"]) for r in rows]
        body.append([label, rows[0]["cycles_or_epochs_done"], common.mean_spread(accuracy),
                     f"{sum(accuracy) / len(accuracy) - baseline:+.4f}",
                     common.mean_spread([r["test_loss"] for r in rows]),
                     common.mean_spread([r["seconds"] for r in rows], 1)])
    return common.markdown_table(["variant", "cycles", "test accuracy", "vs default", "test loss", "training seconds"], body)


def plot(finals: list[dict], record: dict, path) -> None:
    plt = common.pyplot()
    groups = common.group(finals)
    labels = list(groups)
    means = [sum(float(r["test_accuracy"]) for r in groups[k]) / len(groups[k]) for k in labels]
    spread = [max(float(r["test_accuracy"]) for r in groups[k]) - min(float(r["test_accuracy"]) for r in groups[k])
              for k in labels]
    figure, axis = plt.subplots(figsize=(8, 3.6))
    axis.barh(range(len(labels)), means, xerr=[s / 2 for s in spread], color="tab:blue", alpha=0.8)
    axis.set_yticks(range(len(labels)), [label.split(" (")[0] for label in labels], fontsize=8)
    axis.invert_yaxis()
    low = min(means)
    axis.set_xlim(max(0.0, low - 0.05), min(1.0, max(means) + 0.02))
    for index, value in enumerate(means):
        axis.text(value, index, f" {value:.4f}", va="center", fontsize=7)
    axis.set_xlabel("test accuracy (bar: mean over seeds, whisker: half the range)")
    first = finals[0]
    axis.set_title(f"RSO ablations on {first['model']}, batch {first['batch_size']}, "
                   f"{first['cycles_or_epochs_done']} cycle(s)", fontsize=10)
    axis.grid(alpha=0.3, axis="x")
    common.footer(figure, record)
    common.save(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("ablations", " ".join(__doc__.split("\n\n")[0].split()), default_seeds=1)
    parser.add_argument("--model", default="oneconv", help="model (default oneconv)")
    parser.add_argument("--batch", type=int, default=1000, help="RSO mini-batch (default 1000)")
    parser.add_argument("--cycles", type=int, default=3, help="RSO cycles (default 3)")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-time cap per run")
    args = parser.parse_args(argv)
    out = common.prepare(args)
    runs = build_runs(args)
    results, history, finals = common.run_and_write(runs, args, out)
    first = runs[0].config
    what = (f"{len(runs)} variants of RSO on {first.model}, batch {first.batch_size}, {first.cycles} cycle(s); "
            f"seeds {common.seeds(args)}; {common.data_description(first, args)}")
    record = common.provenance(args, argv, what)
    plot(finals, record, out / "ablations.png")
    common.plot_curves(history, [("cycles_or_epochs", "RSO cycles", False)], out / "ablation_curves.png", record,
                       "RSO ablations: test accuracy after every cycle", color_key="label")
    common.write_outputs(out, "RSO ablations: one change at a time", record,
                         summarize(finals) + "\n![ablations](ablations.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
