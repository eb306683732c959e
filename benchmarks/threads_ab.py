"""Which torch/numba thread count holds up on a shared machine: the same sweeps with 1 thread and with all
cores, in turn, in fresh processes, under whatever else runs (and optionally ``--busy N`` extra busy loops).

    python benchmarks/threads_ab.py                          # oneconv, batch 1000: conv sweep + dense sweep
    python benchmarks/threads_ab.py --busy 2 --repeats 5     # with two competing busy processes of its own

Prints each run's wall time, the medians, the ratio and the load average: with small operations, a thread
that waits for a busy core stalls the whole operation, so all-cores can lose far more than the CPU share.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from rso.engines import kernels
    kernels.set_threads(args.threads)
    from rso.data import load_mnist
    from rso.engines import make_engine
    from rso.models import build_model
    from rso.search.candidates import gaussian_steps
    from rso.search.loop import run_sweep
    from rso.search.visit import visit_order

    data = load_mnist(args.data_dir, train_subset=args.train_subset, test_subset=10, download=False)
    model = build_model(args.model, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    seconds = {}
    for target in visit_order(model):
        start = time.perf_counter()
        run_sweep(model, target, data.train_images, data.train_labels, make_engine("auto", model), sigma=target.sigma,
                  batch_size=args.batch_size, sampler=gaussian_steps, generator=generator)
        seconds[target.name] = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="oneconv")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--train-subset", type=int, default=60000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--many", type=int, default=os.cpu_count(), help="the all-cores thread count (cpu count)")
    parser.add_argument("--busy", type=int, default=0, help="extra busy-loop processes to run meanwhile (0)")
    parser.add_argument("--data-dir", default=os.environ.get("RSO_DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    # a snapshot of the package, so that edits made while the benchmark runs do not leak into it
    snapshot = Path(tempfile.mkdtemp(prefix="threads-ab-"))
    shutil.copytree(ROOT / "rso", snapshot / "rso", ignore=shutil.ignore_patterns("__pycache__"))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        load_before = os.getloadavg()
        runs: dict[int, list[dict]] = {1: [], args.many: []}
        for repeat in range(args.repeats):
            for threads in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
                flags = [f"--model={args.model}", f"--batch-size={args.batch_size}", f"--threads={threads}",
                         f"--train-subset={args.train_subset}", f"--data-dir={args.data_dir}", "--worker"]
                env = {**os.environ, "PYTHONPATH": str(snapshot), "OMP_NUM_THREADS": str(threads)}
                done = subprocess.run([sys.executable, __file__, *flags], env=env, check=True, capture_output=True,
                                      text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs[threads].append(result)
                parts = ", ".join(f"{name} {value:.2f} s" for name, value in result["seconds"].items())
                print(f"  repeat {repeat + 1} {threads} thread(s): {parts}", flush=True)
        load_after = os.getloadavg()
    finally:
        for process in busy:
            process.kill()
        shutil.rmtree(snapshot, ignore_errors=True)
    total = {threads: statistics.median(sum(run["seconds"].values()) for run in results) for threads, results in runs.items()}
    print(f"{args.model} batch {args.batch_size}, one cycle's sweeps x {args.repeats} repeats, {args.busy} extra busy "
          f"processes, load average {load_before[0]:.1f} -> {load_after[0]:.1f}, {os.cpu_count()} cores")
    print(f"1 thread: {total[1]:.2f} s (median); {args.many} threads: {total[args.many]:.2f} s; "
          f"1 thread is {total[args.many] / total[1]:.2f}x the speed of {args.many}")


if __name__ == "__main__":
    main()
