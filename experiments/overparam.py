"""Reproduce the overparameterization table of the reference (section 3) and report ours beside it.

    python -m experiments.overparam            # the full table (a few minutes on 2 CPU cores)
    python -m experiments.overparam --quick    # tiny networks and few epochs: a smoke test

Writes ``table.md`` and ``runs.csv`` into ``--out`` (default results/overparam). Network rows are run for
several seeds, because one seed can land anywhere; every number in the table comes from this run.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from experiments._provenance import header
from rso.overparam import OverparamConfig, run
from rso.train import exit_status


@dataclass
class Row:
    label: str
    reference: str
    config: OverparamConfig
    seeds: tuple[int, ...] = (0,)


def rows(quick: bool) -> list[Row]:
    net = dict(in_features=8, hidden=16, epochs=20, fit_lr=1e-2, fit_seconds=3) if quick else {}
    seeds = (0,) if quick else (0, 1, 2)
    big = dict(hidden=1024) if not quick else {}
    cap = dict(max_seconds=300.0) if not quick else {}  # mlp17 at hidden 1024: ~0.3 s per epoch on 2 cores
    big_seeds = (0,)  # one seed: the 18M-parameter mlp17 is the slow row
    direct_epochs = dict(epochs=20) if quick else {}
    return [
        Row("Ackley 1-D, x0 = 10", "x = 9.99495, f = 17.29193 (stuck)", OverparamConfig("ackley", (10.0,), "direct", **direct_epochs)),
        Row("Ackley 1-D, x0 = 10", "mlp9, in 128, hidden 512: x = 0.00026, f = 0.00104",
            OverparamConfig("ackley", (10.0,), "mlp9", **net), seeds),
        Row("Ackley 1-D, x0 = 10", "(not in the reference)",
            OverparamConfig("ackley", (10.0,), "direct", optimizer="rso", lr=2.0, epochs=20 if quick else 100)),
        Row("qubic, x0 = 0.96", "x = 0.96015, f = -0.70585", OverparamConfig("qubic", (0.96,), "direct", **direct_epochs)),
        Row("qubic, x0 = 0.96", "mlp17, hidden 1024: x = 0.96234, f = -0.70584 (fails too)",
            OverparamConfig("qubic", (0.96,), "mlp17", **{**net, **big, **cap}), big_seeds),
        Row("qubic, x0 = 0.96", "(not in the reference)",
            OverparamConfig("qubic", (0.96,), "direct", optimizer="rso", lr=1.0, epochs=20 if quick else 100)),
        Row("six-hump camel, x0 = (2, 2)", "6000 epochs: (1.6, 0.6), f = 2.108",
            OverparamConfig("six-hump-camel", (2.0, 2.0), "direct", epochs=50 if quick else 6000)),
        Row("six-hump camel, x0 = (2, 2)", "mlp9, 500 epochs: (0.0898, -0.7126), f = -1.0316",
            OverparamConfig("six-hump-camel", (2.0, 2.0), "mlp9", **net), seeds),
        Row("six-hump camel, x0 = (2, 2)", "(not in the reference)",
            OverparamConfig("six-hump-camel", (2.0, 2.0), "direct", optimizer="rso", lr=1.0, epochs=20 if quick else 100)),
    ]


def method(config: OverparamConfig) -> str:
    what = "x directly" if config.model == "direct" else f"{config.model} (in {config.in_features}, hidden {config.hidden})"
    step = f"sigma {config.lr:g}, annealed" if config.optimizer == "rso" else f"lr {config.lr:g}"
    return f"{what}, {config.optimizer} {step}, {config.epochs} epochs"


def fmt_x(x: list[float]) -> str:
    return "(" + ", ".join(f"{v:.5f}" for v in x) + ")" if len(x) > 1 else f"{x[0]:.5f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.overparam", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="tiny networks, few epochs (for the tests)")
    parser.add_argument("--out", default="results/overparam")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    lines = [
        header("Overparameterized optimization: the reference's table and ours"),
        "Reference: nepfaff/nn_optimization README as quoted in ../shared/docs/reference.md section 3. "
        "Ours: Adam lr 5e-4 unless stated; networks first fit their output to x0 (MSE < 1e-6), then minimize f. "
        "RSO rows optimize x directly, 3 evaluations per coordinate per epoch (cycle).\n",
        "| function, start | method (ours) | reference | seed | our x | our f | epochs run | fit MSE | seconds | stopped by |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    records = []
    for row in rows(args.quick):
        for seed in row.seeds:
            config = replace(row.config, seed=seed)
            result = run(config)
            fit = "-" if result.fit_mse is None else f"{result.fit_mse:.1e} ({result.fit_steps} steps)"
            lines.append(
                f"| {row.label} | {method(config)} | {row.reference} | {seed} | {fmt_x(result.x)} | {result.f:.5f} | "
                f"{result.epochs_run} | {fit} | {result.seconds:.1f} | {result.stop_reason} |"
            )
            records.append([row.label, config.model, config.optimizer, seed, *[";".join(f"{v:.9g}" for v in result.x)],
                            f"{result.f:.9g}", result.epochs_run, result.fit_mse, f"{result.seconds:.2f}", result.stop_reason])
            print(lines[-1], flush=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "model", "optimizer", "seed", "x", "f", "epochs_run", "fit_mse", "seconds", "stop_reason"])
        writer.writerows(records)
    print(out / "table.md")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
