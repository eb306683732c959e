"""Time the first visits of one real sweep of paper6 (cache fills included) with 1 or N workers, and count the
collectives each visit makes: the quick A/B for a change to the distributed path.

    python benchmarks/sweep_sample.py --tensor 14.weight --visits 300 --workers 2

Prints, per rank, the seconds for the sampled visits (with the chunk caches they fill), the collectives per
visit and the seconds spent in them (waiting for the other ranks included), and rso.bench's projection of the
whole sweep from the sample. Needs MNIST (RSO_DATA_DIR or ../shared/data).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rso import distributed  # noqa: E402


def load_target(model_name: str, tensor: str):
    """MNIST's 60,000 training images (float) and labels, ``model_name`` built from seed 0, and its tensor
    ``tensor`` (a SearchTarget); exits naming the model's tensors when it has no such tensor."""
    from rso.data import load_mnist
    from rso.models import build_model
    from rso.search.visit import visit_order

    data = load_mnist(os.environ.get("RSO_DATA_DIR"), train_subset=60000, test_subset=1, download=False)
    model = build_model(model_name, torch.Generator().manual_seed(0))
    targets = {target.name: target for target in visit_order(model)}
    if tensor not in targets:   # (printed here: a worker process's exit status would lose the message)
        print(f"error: {model_name} has no tensor {tensor!r}; its tensors: {', '.join(targets)}", file=sys.stderr,
              flush=True)
        raise SystemExit(2)
    return data.train_images.float(), data.train_labels, model, targets[tensor]


def run_workers(workers: int, work, spec: tuple) -> int:
    """``work(*spec)`` in this process (1 worker) or in ``workers`` local processes (gloo); MNIST from
    RSO_DATA_DIR, else ../shared/data beside the repository."""
    if "RSO_DATA_DIR" not in os.environ:
        os.environ["RSO_DATA_DIR"] = str(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    return work(*spec) if workers == 1 else distributed.launch(workers, work, spec)


def sample(tensor: str, visits: int, batch_size: int, model_name: str) -> int:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = distributed.init_world(torch.device("cpu")) if size > 1 else distributed.LOCAL
    try:
        distributed.set_threads(1)
        from rso.bench import sweep_sample
        from rso.engines import FastEngine

        images, labels, model, target = load_target(model_name, tensor)
        few = 8 * world.size    # compile the numba kernels before anything is timed
        sweep_sample(FastEngine(world=world), model, target, images[:few], labels[:few], few, 0,
                     torch.device("cpu"), 4, world)
        spent = {"seconds": 0.0, "calls": 0}
        gather = world.gather

        def timed(local):
            began = time.perf_counter()
            try:
                return gather(local)
            finally:
                spent["seconds"] += time.perf_counter() - began
                spent["calls"] += 1
        world.gather = timed
        began = time.perf_counter()
        result = sweep_sample(FastEngine(world=world), model, target, images, labels, batch_size, 1,
                              torch.device("cpu"), visits, world)
        seconds = time.perf_counter() - began
        print(f"rank {world.rank}/{world.size}: {tensor} {result['visits']} visits (with their cache fills) in "
              f"{seconds:.2f} s; {spent['calls'] / result['visits']:.1f} collectives a visit, {spent['seconds']:.2f} s "
              f"in them; projected sweep {result['sweep_s']:.1f} s", flush=True)
    finally:
        distributed.close_world(world)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensor", default="14.weight")
    parser.add_argument("--visits", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--model", default="paper6")
    args = parser.parse_args(argv)
    return run_workers(args.workers, sample, (args.tensor, args.visits, args.batch_size, args.model))


if __name__ == "__main__":
    sys.exit(main())
