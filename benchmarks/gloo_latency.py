"""What one small gather costs the workers of a run, by gloo worker-thread count: idle, and between equal
slices of convolution work (as in a visit, where each BN layer's statistics are gathered between convs).

    python benchmarks/gloo_latency.py                 # 2 workers; the default group, then 1 and 2 threads
    python benchmarks/gloo_latency.py --segments 400 --segment-ms 20

``rso.distributed.init_world`` gathers through its own gloo backend with ``RSO_GLOO_THREADS`` worker threads
(default 1; 0 means the default process group, which has gloo's default of 2). For each setting this starts
fresh workers and prints, for rank 0: an idle gather's wall time and CPU time (all the process's threads),
then the wall time of ``--segments`` convolution slices with a gather after each, minus the same slices with
no gathers, per gather. On a 2-core machine the CPU that gloo's threads take comes out of the convolutions.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rso import distributed  # noqa: E402


def work(segments: int, segment_ms: float, idle: int, rounds: int) -> int:
    world = distributed.init_world(torch.device("cpu"))
    try:
        distributed.set_threads(1)
        from rso.engines.fast import keep_freed_memory

        keep_freed_memory()     # as the engine does: no fresh pages (and their faults) for each conv output
        small = torch.randn(3, 3, 32, dtype=torch.float64)     # three candidates' (count, mean, variance)
        for _ in range(100):
            world.gather(small)
        cpu, began = time.process_time(), time.perf_counter()
        for _ in range(idle):
            world.gather(small)
        idle_wall = (time.perf_counter() - began) / idle
        idle_cpu = (time.process_time() - cpu) / idle

        x = torch.randn(64, 16, 14, 14)
        weight = torch.randn(32, 16, 3, 3)
        torch.conv2d(x, weight, padding=1)
        began = time.perf_counter()
        for _ in range(5):
            torch.conv2d(x, weight, padding=1)
        one = (time.perf_counter() - began) / 5
        repeat = world.gather(torch.tensor([max(1.0, segment_ms / 1e3 / one)]))[0, 0]   # rank 0's count
        repeat = int(repeat)

        def run(with_gathers: bool) -> float:
            world.gather(small)
            began = time.perf_counter()
            for _ in range(segments):
                for _ in range(repeat):
                    torch.conv2d(x, weight, padding=1)
                if with_gathers:
                    world.gather(small)
            world.gather(small)     # both ranks end together
            return time.perf_counter() - began

        extra = []
        for _ in range(rounds):     # alternated, so drift hits both
            plain = run(False)
            gathered = run(True)
            extra.append((gathered - plain) / segments)
        if world.is_main:
            threads = os.environ.get("RSO_GLOO_THREADS", "1")
            label = "default group (2 threads)" if threads.strip() == "0" else f"{threads} thread(s)"
            print(f"{label:>26}: idle gather {idle_wall * 1e6:6.0f} us wall, {idle_cpu * 1e6:6.0f} us CPU;"
                  f" between {segment_ms:.0f} ms conv slices {statistics.median(extra) * 1e6:6.0f} us a gather"
                  f" (median of {rounds}: {', '.join(f'{e * 1e6:.0f}' for e in extra)})", flush=True)
        return 0
    finally:
        distributed.close_world(world)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--segments", type=int, default=200, help="conv slices a round (default 200)")
    parser.add_argument("--segment-ms", type=float, default=25.0, help="milliseconds of conv a slice (default 25)")
    parser.add_argument("--idle", type=int, default=2000, help="idle gathers timed (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds with and without gathers")
    parser.add_argument("--threads", default="0,1,2", help="RSO_GLOO_THREADS settings, in turn (default 0,1,2)")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be at least 2")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.workers} workers,"
          f" 1 torch thread each", flush=True)
    for threads in args.threads.split(","):
        os.environ["RSO_GLOO_THREADS"] = threads.strip()
        code = distributed.launch(args.workers, work, (args.segments, args.segment_ms, args.idle, args.rounds))
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
