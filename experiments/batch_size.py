"""RSO's test accuracy and time per cycle against the mini-batch size, beside the course project's numbers.

    python -m experiments.batch_size                        # oneconv at 32..5000 and twoconv at 1000
    python -m experiments.batch_size --cycles 3 --batches 32,256,1024
    python -m experiments.batch_size --quick                # a tiny convnet on data slices: a smoke test

The course project (STMO-ZOO, Julia, reference.md section 2) trained OneConv at batch 32..1024 and TwoConv at
1000 for 10 rounds, with 3 full forward passes per weight; its numbers are quoted beside ours, labelled as
theirs. Ours may run fewer cycles than their 10 rounds: the table says how many.
"""

from __future__ import annotations

import sys

from experiments import common
from experiments.common import COURSE_LABEL, COURSE_PROJECT, Run
from rso.config import TrainConfig
from rso.train import exit_status


def build_runs(args) -> list[Run]:
    budget = dict(max_seconds=args.max_minutes * 60 if args.max_minutes else None, eval_every="cycle")
    if args.quick:
        tiny = dict(model="convnet", depth=1, channels=4, train_subset=args.train_subset or 1000,
                    test_subset=args.test_subset or 500, cycles=1)
        return [Run(f"convnet-1x4 batch {b}", TrainConfig(batch_size=b, **tiny, **budget), {"batch_size": b})
                for b in (32, 100)]
    runs = [Run(f"oneconv batch {b}", TrainConfig(model="oneconv", batch_size=b, cycles=args.cycles, **budget),
                {"batch_size": b}) for b in args.batches]
    if args.twoconv:
        runs.append(Run("twoconv batch 1000", TrainConfig(model="twoconv", batch_size=1000, cycles=args.cycles, **budget),
                        {"batch_size": 1000}))
    return runs


def summarize(finals: list[dict]) -> str:
    body = []
    for label, rows in common.group(finals).items():
        model, batch = rows[0]["model"], int(rows[0]["batch_size"])
        theirs = [c for c in COURSE_PROJECT if c[0] == model and c[1] == batch]
        their_acc = f"{theirs[0][2]:.4f}" if theirs else "-"
        their_time = (f"{theirs[0][3]:.0f} s ({theirs[0][3] / 10:.0f} s/round)" if theirs and theirs[0][3] else "-")
        body.append([model, batch, rows[0]["cycles_or_epochs_done"], common.mean_spread([r["test_accuracy"] for r in rows]),
                     common.mean_spread([r["seconds_per_cycle_or_epoch"] for r in rows], 1),
                     common.mean_spread([r["seconds"] for r in rows], 1), their_acc, their_time])
    # course-project rows we did not run, so their whole table stays visible
    ran = {(rows[0]["model"], int(rows[0]["batch_size"])) for rows in common.group(finals).values()}
    for model, batch, accuracy, seconds in COURSE_PROJECT:
        if (model, batch) not in ran:
            body.append([model, batch, "not run", "-", "-", "-", f"{accuracy:.4f}",
                         f"{seconds:.0f} s ({seconds / 10:.0f} s/round)" if seconds else "-"])
    return common.markdown_table(
        ["model", "batch", "our cycles", "our test accuracy", "our seconds / cycle", "our training seconds",
         f"{COURSE_LABEL}: accuracy after 10 rounds", f"{COURSE_LABEL}: time for 10 rounds"], body)


def plot(finals: list[dict], record: dict, path) -> None:
    plt = common.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for model, marker in (("oneconv", "o"), ("twoconv", "s"), ("convnet", "^")):
        rows = [r for r in finals if r["model"] == model]
        if rows:
            groups = common.group(rows, "batch_size")
            batches = sorted(groups, key=int)
            mean = lambda key, b: sum(float(r[key]) for r in groups[b]) / len(groups[b])  # noqa: E731
            xs = [int(b) for b in batches]
            left.plot(xs, [mean("test_accuracy", b) for b in batches], marker=marker,
                      label=f"ours, {model}, {rows[0]['cycles_or_epochs_done']} cycle(s)")
            right.plot(xs, [mean("seconds_per_cycle_or_epoch", b) for b in batches], marker=marker, label=f"ours, {model}")
        theirs = [c for c in COURSE_PROJECT if c[0] == model]
        if theirs and rows:
            left.plot([c[1] for c in theirs], [c[2] for c in theirs], marker=marker, linestyle="--", color="gray",
                      label=f"{COURSE_LABEL}, {model}, 10 rounds")
            timed = [c for c in theirs if c[3]]
            right.plot([c[1] for c in timed], [c[3] / 10 for c in timed], marker=marker, linestyle="--", color="gray",
                       label=f"{COURSE_LABEL}, {model}")
    for axis, label in ((left, "test accuracy"), (right, "seconds per cycle (round)")):
        axis.set_xscale("log")
        axis.set_xlabel("mini-batch size")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    right.set_yscale("log")
    figure.suptitle("RSO: batch size vs accuracy and time per cycle", fontsize=10)
    common.footer(figure, record)
    common.save(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("batch_size", " ".join(__doc__.split("\n\n")[0].split()), default_seeds=1)
    parser.add_argument("--batches", type=lambda text: [int(v) for v in text.split(",") if v],
                        default=[32, 64, 256, 512, 1024, 5000], help="oneconv batch sizes (default 32,64,256,512,1024,5000)")
    parser.add_argument("--cycles", type=int, default=1, help="RSO cycles per run (default 1; the course ran 10 rounds)")
    parser.add_argument("--no-twoconv", dest="twoconv", action="store_false", help="skip twoconv at batch 1000")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-time cap per run")
    args = parser.parse_args(argv)
    out = common.prepare(args)
    runs = build_runs(args)
    results, history, finals = common.run_and_write(runs, args, out)
    what = (f"{len(runs)} configs x seeds {common.seeds(args)}: " + ", ".join(run.label for run in runs)
            + f"; {runs[0].config.cycles} cycle(s) each; {common.data_description(runs[0].config, args)}")
    record = common.provenance(args, argv, what)
    plot(finals, record, out / "batch_size.png")
    common.write_outputs(out, "RSO batch size: accuracy and time per cycle, beside the course project", record,
                         summarize(finals) + "\n![batch size chart](batch_size.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
