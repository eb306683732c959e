"""Pictures of optimization landscapes with optimizer trajectories: curves, contours, surfaces, a GIF race.

    python -m rso.landscape --function himmelblau --optimizers sgd,momentum,adam,rso --start=-1,-1 \\
        --steps 100 --out results/landscapes/demo --gif [--tensorboard runs/landscape]

1-D functions get a curve with the trajectories on it; 2-D functions a contour plot and a 3-D surface;
functions of any dimension are drawn in 2-D (``--dim`` to choose 1). Each optimizer starts from the same
point and runs ``--steps`` steps (for RSO a step is one cycle over all coordinates, 3 evaluations each).
Files are PNG and, with ``--gif``, an animated GIF written by matplotlib's Pillow writer (no ffmpeg).
With ``--tensorboard DIR`` the same figures go into TensorBoard as images, and f along each trajectory as
scalars. The core functions (:func:`trajectory`, :func:`contour_figure`, ...) are importable.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rso.functions import Objective, describe, get_function
from rso.optim import OPTIMIZERS, make_optimizer, make_schedule, optimizer_step, SCHEDULES

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black"]


@dataclass
class Trajectory:
    name: str
    points: torch.Tensor  # (steps + 1, dim), float64, the start first
    values: torch.Tensor  # (steps + 1,)

    @property
    def final_point(self) -> list[float]:
        return self.points[-1].tolist()

    @property
    def final_value(self) -> float:
        return float(self.values[-1])


def trajectory(
    objective: Objective,
    start,
    optimizer: str,
    steps: int,
    lr: float | None = None,
    seed: int = 0,
    clip_grad_norm: float | None = None,
    schedule: str = "constant",
    **options,
) -> Trajectory:
    """Run ``optimizer`` on ``objective`` from ``start`` for ``steps`` steps and record every point.

    The run stops early (and the trajectory is shorter) if the point or the loss stops being finite.
    """
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    point = objective.check_point(start)
    x = torch.nn.Parameter(point.clone())
    generator = torch.Generator().manual_seed(seed)
    if optimizer == "rso":
        options.setdefault("cycles", max(steps, 1))
    opt = make_optimizer(optimizer, [x], lr=lr, generator=generator, **options)
    scheduler = make_schedule(schedule, opt, steps=steps) if optimizer != "rso" else None
    points = [point.clone()]
    for _ in range(steps):
        optimizer_step(opt, lambda: objective(x), clip_grad_norm=clip_grad_norm)
        if scheduler is not None:
            scheduler.step()
        now = x.detach().clone()
        if not torch.isfinite(now).all():
            break
        points.append(now)
    stacked = torch.stack(points)
    with torch.no_grad():
        values = objective(stacked)
    finite = torch.isfinite(values)
    if not finite.all():
        keep = int(finite.long().cumprod(0).sum())
        stacked, values = stacked[:keep], values[:keep]
    return Trajectory(optimizer, stacked, values)


# ---- figures ----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(objective: Objective, box: torch.Tensor, resolution: int):
    xs = torch.linspace(float(box[0, 0]), float(box[0, 1]), resolution, dtype=torch.float64)
    ys = torch.linspace(float(box[1, 0]), float(box[1, 1]), resolution, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    with torch.no_grad():
        z = objective(torch.stack([gx, gy], dim=-1))
    return gx.numpy(), gy.numpy(), z.numpy()


def _levels(z, count: int = 30):
    import numpy as np

    # Quantile levels: readable on functions whose range spans many decades (Rosenbrock, Goldstein-Price).
    levels = np.unique(np.quantile(z, np.linspace(0.0, 1.0, count)))
    return levels if len(levels) > 1 else count


def _minima_marks(ax, objective: Objective, dim: int) -> None:
    for minimum in objective.minima(dim):
        if len(minimum.point) == 2:
            ax.plot(*minimum.point, marker="*", color="gold", markeredgecolor="black", markersize=11, linestyle="none")


def _title(objective: Objective, start) -> str:
    return f"{objective.name} from {tuple(round(float(v), 3) for v in start)}"


def curve_figure(objective: Objective, trajectories: list[Trajectory], box: torch.Tensor, upto: int | None = None):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = torch.linspace(float(box[0, 0]), float(box[0, 1]), 600, dtype=torch.float64)
    with torch.no_grad():
        ax.plot(xs.numpy(), objective(xs[:, None]).numpy(), color="0.4", linewidth=1.2)
    for index, run in enumerate(trajectories):
        end = len(run.points) if upto is None else min(upto, len(run.points))
        ax.plot(run.points[:end, 0].numpy(), run.values[:end].numpy(), "o-", markersize=3, linewidth=0.8,
                color=COLORS[index % len(COLORS)], label=f"{run.name}: f={run.values[end - 1].item():.4g}")
    ax.set_xlim(float(box[0, 0]), float(box[0, 1]))
    ax.set_xlabel("x")
    ax.set_ylabel("f(x)")
    if trajectories:
        ax.set_title(_title(objective, trajectories[0].points[0]))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def contour_figure(objective: Objective, trajectories: list[Trajectory], box: torch.Tensor, upto: int | None = None, resolution: int = 200):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    gx, gy, z = _grid(objective, box, resolution)
    ax.contour(gx, gy, z, levels=_levels(z), cmap="viridis", linewidths=0.7)
    _minima_marks(ax, objective, 2)
    for index, run in enumerate(trajectories):
        end = len(run.points) if upto is None else min(upto, len(run.points))
        pts = run.points[:end].numpy()
        color = COLORS[index % len(COLORS)]
        ax.plot(pts[:, 0], pts[:, 1], "-", color=color, linewidth=1.2, label=f"{run.name}: f={run.values[end - 1].item():.4g}")
        ax.plot(pts[-1, 0], pts[-1, 1], "o", color=color, markersize=5)
    if trajectories:
        ax.plot(*trajectories[0].points[0].tolist(), "ks", markersize=6)
        ax.set_title(_title(objective, trajectories[0].points[0]))
        ax.legend(fontsize=7, loc="best")
    ax.set_xlim(float(box[0, 0]), float(box[0, 1]))
    ax.set_ylim(float(box[1, 0]), float(box[1, 1]))
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    fig.tight_layout()
    return fig


def surface_figure(objective: Objective, trajectories: list[Trajectory], box: torch.Tensor, resolution: int = 80):
    plt = _pyplot()
    fig = plt.figure(figsize=(7, 6))
    ax = fig.add_subplot(projection="3d")
    gx, gy, z = _grid(objective, box, resolution)
    ax.plot_surface(gx, gy, z, cmap="viridis", alpha=0.6, linewidth=0, antialiased=True)
    for index, run in enumerate(trajectories):
        pts, vals = run.points.numpy(), run.values.numpy()
        inside = ((pts >= box[:, 0].numpy()) & (pts <= box[:, 1].numpy())).all(axis=1)
        ax.plot(pts[inside, 0], pts[inside, 1], vals[inside], "-", color=COLORS[index % len(COLORS)], linewidth=1.5, label=run.name)
    if trajectories:
        ax.set_title(_title(objective, trajectories[0].points[0]))
        ax.legend(fontsize=7)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    fig.tight_layout()
    return fig


def save_gif(objective: Objective, trajectories: list[Trajectory], box: torch.Tensor, path: Path, frames: int = 60, dpi: int = 60, fps: int = 12) -> Path:
    """The race as an animated GIF (matplotlib's PillowWriter): the trajectories grow frame by frame."""
    plt = _pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter

    two_d = box.shape[0] == 2
    empty = [Trajectory(run.name, run.points[:1], run.values[:1]) for run in trajectories]
    fig = (contour_figure(objective, empty, box, resolution=120) if two_d else curve_figure(objective, empty, box))
    ax = fig.axes[0]
    lines = ax.lines[-2 * len(trajectories):] if two_d else ax.lines[-len(trajectories):]
    paths = lines[0::2] if two_d else lines
    heads = lines[1::2] if two_d else [None] * len(trajectories)
    longest = max((len(run.points) for run in trajectories), default=1)
    stops = sorted({max(1, round(longest * (k + 1) / frames)) for k in range(frames)})
    legend_texts = ax.get_legend().get_texts() if ax.get_legend() else []

    def draw(upto: int):
        for index, run in enumerate(trajectories):
            end = min(upto, len(run.points))
            pts, vals = run.points[:end].numpy(), run.values[:end].numpy()
            if two_d:
                paths[index].set_data(pts[:, 0], pts[:, 1])
                heads[index].set_data(pts[-1:, 0], pts[-1:, 1])
            else:
                paths[index].set_data(pts[:, 0], vals)
            if index < len(legend_texts):
                legend_texts[index].set_text(f"{run.name}: f={vals[-1]:.4g}")
        return lines

    animation = FuncAnimation(fig, draw, frames=stops, blit=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    animation.save(path, writer=PillowWriter(fps=fps), dpi=dpi)
    plt.close(fig)
    return path


# ---- the command ------------------------------------------------------------------------------------------


def parse_start(text: str) -> list[float]:
    try:
        return [float(eval_number(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"start {text!r} is not a comma-separated list of numbers (pi is allowed, e.g. 0.6pi)") from None


def eval_number(text: str) -> float:
    """A float, optionally a multiple of pi: '1.5', '-2', 'pi', '0.6pi', '1.9*pi'."""
    text = text.strip().lower().replace("*", "")
    if text.endswith("pi"):
        head = text[:-2]
        factor = 1.0 if head in ("", "+") else -1.0 if head == "-" else float(head)
        return factor * math.pi
    return float(text)


def parse_lrs(items: list[str]) -> dict[str, float]:
    lrs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in OPTIMIZERS:
            raise ValueError(f"--lr takes NAME=VALUE with NAME one of {', '.join(OPTIMIZERS)}, got {item!r}")
        lrs[name] = float(value)
    return lrs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rso.landscape",
        description="Draw a test function with the trajectories of chosen optimizers from a chosen start.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="functions:\n" + describe() + "\n\noptimizers:\n" + "\n".join(f"{k:14s} {v[1]}" for k, v in OPTIMIZERS.items()),
    )
    parser.add_argument("--function", default="himmelblau", help="test function name (see below)")
    parser.add_argument("--optimizers", default="sgd,momentum,adam,rso", help="comma-separated optimizer names")
    parser.add_argument("--start", default=None, help="start point, comma-separated; 'pi' multiples allowed (default: a corner of the domain)")
    parser.add_argument("--dim", type=int, default=None, help="dimension for functions of any dimension (1 or 2 to draw)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (RSO: cycles)")
    parser.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE", help="step size for one optimizer (RSO: sigma); repeatable")
    parser.add_argument("--schedule", default="constant", choices=list(SCHEDULES), help="learning-rate schedule for the gradient optimizers")
    parser.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm (the course uses 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plots", default="auto", help="comma-separated: curve, contour, surface (auto: by dimension)")
    parser.add_argument("--extent", default=None, help="x1min,x1max[,x2min,x2max]: the plotted box (default: the domain)")
    parser.add_argument("--gif", action="store_true", help="also write an animated GIF of the race")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--out", default="results/landscapes", help="output folder")
    parser.add_argument("--tensorboard", default=None, metavar="RUN_DIR", help="also log the figures to this TensorBoard run folder")
    return parser


def default_start(objective: Objective, dim: int) -> list[float]:
    box = objective.domain(dim)
    return (box[:, 0] + 0.8 * (box[:, 1] - box[:, 0])).tolist()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        written = run_command(args)
    except ValueError as error:
        parser.error(str(error))
    for path in written:
        print(path)
    return 0


def run_command(args: argparse.Namespace) -> list[Path]:
    objective = get_function(args.function)
    dim = args.dim if args.dim is not None else objective.plot_dim
    objective.check_dim(dim)
    if dim not in (1, 2):
        raise ValueError(f"can only draw dimension 1 or 2, got --dim {dim}")
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    for name in names:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    lrs = parse_lrs(args.lr)
    start = parse_start(args.start) if args.start is not None else default_start(objective, dim)
    objective.check_point(start)
    box = objective.domain(dim)
    if args.extent is not None:
        values = [eval_number(v) for v in args.extent.split(",")]
        if len(values) != 2 * dim or any(values[2 * i] >= values[2 * i + 1] for i in range(dim)):
            raise ValueError(f"--extent needs {2 * dim} numbers min,max per axis with min < max, got {args.extent!r}")
        box = torch.tensor(values, dtype=torch.float64).reshape(dim, 2)
    plots = ["curve"] if dim == 1 else ["contour", "surface"]
    if args.plots != "auto":
        plots = [p.strip() for p in args.plots.split(",") if p.strip()]
        allowed = {"curve"} if dim == 1 else {"contour", "surface"}
        bad = [p for p in plots if p not in allowed]
        if bad:
            raise ValueError(f"plot {bad[0]!r} is not available in dimension {dim}; choose from {', '.join(sorted(allowed))}")

    runs = [
        trajectory(objective, start, name, args.steps, lr=lrs.get(name), seed=args.seed, clip_grad_norm=args.clip_grad_norm,
                   schedule=args.schedule)
        for name in names
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = objective.name
    plt = _pyplot()
    figures = {}
    for kind in plots:
        builder = {"curve": curve_figure, "contour": contour_figure, "surface": surface_figure}[kind]
        figures[kind] = builder(objective, runs, box)
    written = []
    for kind, fig in figures.items():
        path = out / f"{stem}_{kind}.png"
        fig.savefig(path, dpi=args.dpi)
        written.append(path)
    csv_path = out / f"{stem}_trajectories.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["optimizer", "step"] + [f"x{i + 1}" for i in range(dim)] + ["f"])
        for run in runs:
            for step, (p, v) in enumerate(zip(run.points.tolist(), run.values.tolist())):
                writer.writerow([run.name, step] + [f"{c:.9g}" for c in p] + [f"{v:.9g}"])
    written.append(csv_path)
    if args.gif:
        written.append(save_gif(objective, runs, box, out / f"{stem}_race.gif", frames=args.frames, dpi=60))
    if args.tensorboard:
        log_to_tensorboard(args.tensorboard, stem, figures, runs)
    for fig in figures.values():
        plt.close(fig)
    return written


def log_to_tensorboard(run_dir: str, tag: str, figures: dict, runs: list[Trajectory]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # pragma: no cover - tensorboard is a dependency
        raise ValueError(f"--tensorboard needs the tensorboard package ({error}); pip install tensorboard") from None
    writer = SummaryWriter(run_dir)
    for kind, fig in figures.items():
        writer.add_figure(f"{tag}/{kind}", fig, close=False)
    for run in runs:
        for step, value in enumerate(run.values.tolist()):
            writer.add_scalar(f"{tag}/{run.name}", value, step)
    writer.close()


if __name__ == "__main__":
    sys.exit(main())
