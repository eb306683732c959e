"""Time the fast engine's cache fill of paper6 sweeps in one process: ``begin_sweep`` and every chunk's caches
(the layers below the searched one and up to the next linear layer), all 60,000 MNIST training examples at
batch 5000, one thread.

    python benchmarks/cache_fill.py [--tensors 18.bias,3.weight,0.weight]

Prints the machine and the seconds per tensor; the first tensor is filled once before anything is timed (the
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
    began = time.perf_counter()
    engine.begin_sweep(model, target, images, labels, partition)
    try:
        engine.prebuild(sorted(set(chunks.tolist())))   # as run_sweep does (only where no BN is below)
        for chunk in range(partition.n_chunks):
            engine._chunk(chunk)
        return time.perf_counter() - began
    finally:
        engine.end_sweep()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", default="18.bias,3.weight,0.weight")
    parser.add_argument("--batch-size", type=int, default=5000)
    args = parser.parse_args()
    from sweep_sample import load_target
    from rso.engines import FastEngine
    from rso.search.visit import visit_order

    if "RSO_DATA_DIR" not in os.environ:
        os.environ["RSO_DATA_DIR"] = str(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    distributed.set_threads(1)
    names = args.tensors.split(",")
    images, labels, model, _ = load_target("paper6", names[0])
    targets = {target.name: target for target in visit_order(model)}
    unknown = [name for name in names if name not in targets]
    if unknown:
        parser.error(f"paper6 has no tensor {', '.join(unknown)}; its tensors: {', '.join(targets)}")
    print(f"# {platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"batch {args.batch_size}, all {len(labels)} examples")
    fill(FastEngine(), model, targets[names[0]], images, labels, args.batch_size)   # compile or load the kernels
    for name in names:
        seconds = fill(FastEngine(), model, targets[name], images, labels, args.batch_size)
        print(f"{name}: cache fill of every chunk {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
