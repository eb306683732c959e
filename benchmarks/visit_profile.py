"""Profile steady visits of one real paper6 sweep (every chunk's cache already filled) with 1 or N workers: where
a visit's time goes, function by function.

    python benchmarks/visit_profile.py --tensor 3.weight --warm 200 --visits 150 --workers 2

Runs the sweep's first ``--warm`` visits unprofiled (they fill the caches), then profiles the next ``--visits``
with cProfile on every rank. Each rank prints its milliseconds a visit, the time a visit spends waiting in
collectives (for the slower rank, mostly) and, rank 0 only, the functions that took the most time of their
own, in milliseconds a visit. cProfile adds a little to every Python call. Needs MNIST (RSO_DATA_DIR or
../shared/data).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rso import distributed  # noqa: E402
from sweep_sample import load_target, run_workers  # noqa: E402


def profile(tensor: str, warm: int, visits: int, batch_size: int, model_name: str, top: int) -> int:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = distributed.init_world(torch.device("cpu")) if size > 1 else distributed.LOCAL
    try:
        distributed.set_threads(1)
        from rso.bench import draw_sweep, gaussian_steps, last_visits, visit
        from rso.engines import FastEngine

        images, labels, model, target = load_target(model_name, tensor)
        if warm + visits > target.numel:
            print(f"error: {tensor} has {target.numel} weights: --warm + --visits must not exceed it",
                  file=sys.stderr, flush=True)
            raise SystemExit(2)
        partition, chunks, steps = draw_sweep(target, len(labels), batch_size, target.sigma, gaussian_steps,
                                              torch.Generator().manual_seed(1))
        partition.world = world
        engine = FastEngine(world=world)
        engine.begin_sweep(model, target, images, labels, partition)
        step_list, chunk_list = steps.tolist(), chunks.tolist()
        engine.prebuild(sorted(set(chunk_list)))    # as run_sweep does
        last = last_visits(chunk_list)

        def run(start: int, stop: int) -> None:
            for index in range(start, stop):
                visit(engine, target, index, step_list[index], chunk_list[index],
                      last=last[chunk_list[index]] == index)

        try:
            run(0, warm)    # fills the caches and compiles the numba kernels
            profiler = cProfile.Profile()
            profiler.enable()
            began = time.perf_counter()
            run(warm, warm + visits)
            seconds = time.perf_counter() - began
            profiler.disable()
        finally:
            engine.end_sweep()
        stats = pstats.Stats(profiler)
        waits = [row[2] for key, row in stats.stats.items() if key[2].endswith("c10d.wait>")]
        if world.size > 1 and not waits:
            print(f"rank {world.rank}: warning: no collective's wait found in the profile (torch names it "
                  "differently here), so the waiting below reads 0", file=sys.stderr, flush=True)
        waiting = sum(waits)
        print(f"rank {world.rank}/{world.size}: {tensor} visits {warm}-{warm + visits - 1}: "
              f"{seconds / visits * 1e3:.1f} ms a visit, {waiting / visits * 1e3:.1f} ms of it waiting in "
              f"collectives", flush=True)
        if world.is_main:
            print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread per worker, "
                  f"batch {batch_size}; own time per visit (ms), rank 0:")
            rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
            for (filename, line, name), row in rows:
                where = name if filename == "~" else f"{Path(filename).name}:{line}({name})"
                print(f"  {row[2] / visits * 1e3:7.2f}  {row[1]:6d} calls  {where}")
    finally:
        distributed.close_world(world)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensor", default="3.weight")
    parser.add_argument("--warm", type=int, default=200, help="visits run first, unprofiled (cache fills)")
    parser.add_argument("--visits", type=int, default=150, help="visits profiled")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--model", default="paper6")
    parser.add_argument("--top", type=int, default=15, help="functions listed")
    args = parser.parse_args(argv)
    if args.warm < 1 or args.visits < 1 or args.workers < 1:
        parser.error("--warm, --visits and --workers must be >= 1 (the warm visits compile the kernels)")
    return run_workers(args.workers, profile, (args.tensor, args.warm, args.visits, args.batch_size, args.model,
                                               args.top))


if __name__ == "__main__":
    sys.exit(main())
