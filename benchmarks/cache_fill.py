"""Time the fast engine's cache fill of paper6 sweeps, in one process or N: ``begin_sweep`` and every chunk's caches
(the layers below the searched one and up to the next linear layer), all 60,000 MNIST training examples at
batch 5000, one thread per worker.

    python benchmarks/cache_fill.py [--tensors 18.bias,3.weight,0.weight] [--workers 2]

Prints the machine and the seconds per tensor (with several workers, rank 0's, each rank holding its share of
every chunk and BN statistics gathered over the ranks); the first tensor is filled once before anything is timed (the
numba kernels compile or load). Needs MNIST (RSO_DATA_DIR or ../shared/data).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rso import distributed  # noqa: E402


def fill(engine, model, target, images, labels, batch_size: int) -> float:
    from rso.search.candidates import gaussian_steps
    from rso.search.loop import draw_sweep

    partition, chunks, _ = draw_sweep(target, len(labels), batch_size, target.sigma, gaussian_steps,
                                      torch.Generator().manual_seed(1))
    partition.world = engine.world      # each rank holds its share of every chunk
    began = time.perf_counter()
    engine.begin_sweep(model, target, images, labels, partition)
    try:
        engine.prebuild(sorted(set(chunks.tolist())))   # as run_sweep does (only where no BN is below)
        for chunk in range(partition.n_chunks):
            engine._chunk(chunk)
        return time.perf_counter() - began
    finally:
        engine.end_sweep()


def fills(names: list[str], batch_size: int) -> int:
    from sweep_sample import load_target
    from rso.engines import FastEngine
    from rso.search.visit import visit_order

    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = distributed.init_world(torch.device("cpu")) if size > 1 else distributed.LOCAL
    try:
        distributed.set_threads(1)
        images, labels, model, _ = load_target("paper6", names[0])
        targets = {target.name: target for target in visit_order(model)}
        if world.is_main:
            print(f"# {platform.machine()}, torch {torch.__version__}, {world.size} worker(s), 1 thread each, "
                  f"batch {batch_size}, all {len(labels)} examples", flush=True)
        # compile or load the kernels first
        fill(FastEngine(world=world), model, targets[names[0]], images, labels, batch_size)
        for name in names:
            seconds = fill(FastEngine(world=world), model, targets[name], images, labels, batch_size)
            if world.is_main:
                print(f"{name}: cache fill of every chunk {seconds:.2f} s", flush=True)
        return 0
    finally:
        distributed.close_world(world)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", default="18.bias,3.weight,0.weight")
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    from sweep_sample import run_workers
    from rso.search.visit import visit_order
    from rso.models import build_model

    names = args.tensors.split(",")
    known = [target.name for target in visit_order(build_model("paper6"))]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"paper6 has no tensor {', '.join(unknown)}; its tensors: {', '.join(known)}")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return run_workers(args.workers, fills, (names, args.batch_size))


if __name__ == "__main__":
    sys.exit(main())
