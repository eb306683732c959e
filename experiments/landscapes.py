"""The optimizer family and RSO on the 2-D test functions: contour plots, surfaces, a GIF race, a table.

    python -m experiments.landscapes            # all setups below (a few minutes on 2 CPU cores)
    python -m experiments.landscapes --quick    # one function, few steps: a smoke test

Every picture is made by the same code path as ``python -m rso.landscape`` (this script builds its
arguments). Gradient optimizers clip the gradient norm at 5, as in the course notes, so that steep
functions do not throw them out of the picture; step sizes are the registry's defaults times a
per-function scale, RSO's sigma is set per function. Writes into ``--out`` (default results/landscapes):
``<function>_contour.png``, ``<function>_surface.png``, ``<function>_trajectories.csv``, the GIF for the
setups that ask for one, and ``table.md`` with the final point and value of every optimizer.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments._provenance import header
from rso.functions import get_function
from rso.landscape import build_parser, run_command
from rso.optim import OPTIMIZERS
from rso.train import exit_status

FAMILY = list(OPTIMIZERS)  # sgd, momentum, nesterov, adagrad, rmsprop, adadelta, adam, adagrad-decay, noisy-sgd, rso
DEFAULT_LRS = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.5, "rmsprop": 0.05, "adam": 0.1,
               "adagrad-decay": 0.5, "noisy-sgd": 0.05}  # adadelta has no real learning rate: kept at 1.0


@dataclass
class Setup:
    function: str
    start: str
    steps: int
    lr_scale: float
    rso_sigma: float
    gif: bool = False
    extent: str | None = None
    optimizers: list[str] = field(default_factory=lambda: list(FAMILY))

    def argv(self, out: Path, steps: int | None = None, frames: int = 60) -> list[str]:
        argv = ["--function", self.function, f"--start={self.start}", "--steps", str(steps or self.steps),
                "--optimizers", ",".join(self.optimizers), "--clip-grad-norm", "5", "--out", str(out), "--dpi", "80",
                "--frames", str(frames), "--lr", f"rso={self.rso_sigma}"]
        for name, lr in DEFAULT_LRS.items():
            if name in self.optimizers:
                argv += ["--lr", f"{name}={lr * self.lr_scale:g}"]
        if self.extent:
            argv += [f"--extent={self.extent}"]
        if self.gif:
            argv.append("--gif")
        return argv


SETUPS = [
    Setup("multimodal", "0.6pi,1.9pi", 300, 1.0, 1.0, gif=True),
    Setup("himmelblau", "-0.5,-5", 100, 0.1, 1.0),
    Setup("six-hump-camel", "2,2", 100, 0.1, 0.5, extent="-2.5,2.5,-1.5,2.5"),
    Setup("rosenbrock", "-1.5,2.5", 300, 0.02, 0.5, extent="-2,2,-1,3"),
    Setup("rastrigin", "4.2,3.6", 100, 0.1, 1.0),
    Setup("branin", "0,14", 100, 0.3, 1.0),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.landscapes", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="one function, three optimizers, 10 steps, 5 GIF frames (for the tests)")
    parser.add_argument("--out", default="results/landscapes")
    parser.add_argument("--tensorboard", default=None, metavar="RUN_DIR", help="also log the figures to TensorBoard")
    args = parser.parse_args(argv)
    out = Path(args.out)
    setups = SETUPS
    if args.quick:
        setups = [Setup("multimodal", "0.6pi,1.9pi", 10, 1.0, 1.0, gif=True, optimizers=["sgd", "adam", "rso"])]

    lines = [
        header("The optimizer family and RSO on 2-D test functions"),
        "Each optimizer runs the stated number of steps from the start (RSO: cycles, 3 evaluations per "
        "coordinate each, sigma annealed to a tenth); gradient norms clipped at 5. Final point and value below; "
        "pictures next to this file.\n",
        "| function | start | steps | optimizer | step size | final x | final f | global min f |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setup in setups:
        command = setup.argv(out, steps=10 if args.quick else None, frames=5 if args.quick else 60)
        if args.tensorboard:
            command += ["--tensorboard", args.tensorboard]
        written = run_command(build_parser().parse_args(command))
        objective = get_function(setup.function)
        best = objective.global_minimum_value()
        finals = {}
        with (out / f"{setup.function}_trajectories.csv").open() as handle:
            for row in csv.DictReader(handle):
                finals[row["optimizer"]] = row  # the last row of each optimizer wins
        for name in setup.optimizers:
            row = finals[name]
            x = ", ".join(f"{float(row[k]):.4f}" for k in ("x1", "x2"))
            lr = setup.rso_sigma if name == "rso" else DEFAULT_LRS.get(name, 1.0) * (setup.lr_scale if name in DEFAULT_LRS else 1.0)
            kind = "sigma" if name == "rso" else "lr"
            lines.append(f"| {setup.function} | ({setup.start}) | {row['step']} | {name} | {kind} {lr:g} | ({x}) | {float(row['f']):.5f} | {best:.5f} |")
        print(f"{setup.function}: " + ", ".join(str(p) for p in written), flush=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print(out / "table.md")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny 2-D problems: threads only add overhead
    sys.exit(exit_status(main))
