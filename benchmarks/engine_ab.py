"""A/B speed of the fast engine: this working tree against a git revision, on the same visits, in one run.

    python benchmarks/engine_ab.py --baseline main                      # paper6 conv2, batch 5000, 2 channels
    python benchmarks/engine_ab.py --baseline HEAD~1 --tensor 3.weight --visits 144 --repeats 5

Each repetition runs the baseline and this tree in turn (A B, then B A, ...), each in a fresh process with one
torch and one numba thread, on the same seeded model, chunk partition and steps: the visits ``0..visits-1`` of
the tensor in the loop's order (chunk ``j mod n_chunks``), so the sample holds every chunk's first visit and the
moves from channel to channel. Only the visits after each chunk's first one are timed (the first fills the
chunk's cache, the same work in both). Prints the medians, the ratio, the load average before and after (the
machines are shared: read the ratio, not the seconds), and whether both took the same decisions and ended
with bit-identical weights. CPU time (the process's, one thread) is printed beside wall time: on a loaded
machine it tracks the work done far better than wall time does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    """Runs inside the variant's tree (PYTHONPATH): prints one JSON line."""
    import time

    import torch

    torch.set_num_threads(args.threads)
    from rso.engines import kernels
    kernels.set_threads(args.threads)
    from rso.data import load_mnist
    from rso.engines import FastEngine
    from rso.models import build_model
    from rso.search.candidates import candidate_values, gaussian_steps, select_candidate
    from rso.search.loop import draw_sweep
    from rso.search.visit import visit_order

    dtype = getattr(torch, args.dtype)
    data = load_mnist(args.data_dir, train_subset=args.chunks * args.batch_size, test_subset=10, download=False)
    images = data.train_images.to(dtype)
    model = build_model(args.model, torch.Generator().manual_seed(args.seed)).to(dtype)
    target = {t.name: t for t in visit_order(model)}[args.tensor]
    generator = torch.Generator().manual_seed(args.seed + 1)
    partition, chunks, steps = draw_sweep(target, len(data.train_labels), args.batch_size, target.sigma,
                                          gaussian_steps, generator)
    engine = FastEngine(kernels=args.kernels)
    engine.begin_sweep(model, target, images, data.train_labels, partition)
    flat = target.parameter.data.view(-1)
    choices, elapsed, cpu = [], 0.0, 0.0
    for index in range(min(args.visits, target.numel)):
        start, start_cpu = time.perf_counter(), time.process_time()
        chunk = int(chunks[index])
        current = flat[index].item()
        values = candidate_values(current, steps[index].item(), args.weight_decay).to(dtype).to(torch.float64)
        losses = engine.score(index, values, chunk)
        choice = select_candidate(losses)
        chosen = values[choice].item()
        if chosen != current:
            flat[index] = chosen
            engine.commit(index, chosen, chunk)
        if index >= partition.n_chunks:
            elapsed += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
        choices.append(choice)
    timed = min(args.visits, target.numel) - partition.n_chunks
    print(json.dumps({"seconds": elapsed, "per_visit": elapsed / timed, "cpu_per_visit": cpu / timed, "accepted": sum(c != 0 for c in choices),
                      "decisions": hashlib.sha1(bytes(choices)).hexdigest()[:12],
                      "weights": hashlib.sha1(flat.numpy().tobytes()).hexdigest()[:12]}))


def export_revision(revision: str, folder: Path) -> Path:
    """The ``rso`` package of ``revision`` under ``folder`` (git archive)."""
    archive = subprocess.run(["git", "archive", revision, "rso"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="main", help="git revision to compare with (main)")
    parser.add_argument("--candidate", default=None, help="git revision to time instead of this working tree")
    parser.add_argument("--model", default="paper6")
    parser.add_argument("--tensor", default="7.weight", help="parameter name (7.weight: paper6 conv2)")
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--chunks", type=int, default=12, help="chunks in the training slice (12: all of MNIST at 5000)")
    parser.add_argument("--visits", type=int, default=288, help="visits from the tensor's start (288: two conv2 channels)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--kernels", default="auto", choices=["auto", "numba", "torch"])
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("RSO_DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
             if key not in ("worker", "baseline", "candidate", "repeats")]
    with tempfile.TemporaryDirectory() as scratch:
        # a snapshot of this tree too, so that edits made while the benchmark runs do not leak into it
        snapshot = Path(scratch) / "tree"
        if args.candidate:
            export_revision(args.candidate, snapshot)
        else:
            shutil.copytree(ROOT / "rso", snapshot / "rso", ignore=shutil.ignore_patterns("__pycache__"))
        trees = {"baseline": export_revision(args.baseline, Path(scratch) / "baseline"), "this tree": snapshot}
        load_before = os.getloadavg()
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for repeat in range(args.repeats):
            order = list(trees) if repeat % 2 == 0 else list(trees)[::-1]
            for name in order:
                env = {**os.environ, "PYTHONPATH": str(trees[name]), "OMP_NUM_THREADS": str(args.threads)}
                done = subprocess.run([sys.executable, __file__, "--worker", *flags], env=env, check=True,
                                      capture_output=True, text=True)
                runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                run = runs[name][-1]
                print(f"  repeat {repeat + 1} {name:9s} {run['per_visit'] * 1e3:8.1f} ms/visit wall "
                      f"{run['cpu_per_visit'] * 1e3:8.1f} ms/visit cpu  decisions {run['decisions']}", flush=True)
        load_after = os.getloadavg()
    median = {name: statistics.median(run["per_visit"] for run in results) for name, results in runs.items()}
    median_cpu = {name: statistics.median(run["cpu_per_visit"] for run in results) for name, results in runs.items()}
    same = all(len({run[key] for results in runs.values() for run in results}) == 1 for key in ("decisions", "weights"))
    print(f"{args.model} {args.tensor} batch {args.batch_size} {args.dtype} {args.threads} thread(s), "
          f"{args.visits} visits x {args.repeats} repeats, load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"baseline {args.baseline}: {median['baseline'] * 1e3:.1f} ms/visit (median); "
          f"{args.candidate or 'this tree'}: {median['this tree'] * 1e3:.1f} ms/visit; speedup {median['baseline'] / median['this tree']:.2f}x wall, "
          f"{median_cpu['baseline'] / median_cpu['this tree']:.2f}x cpu time "
          f"({median_cpu['baseline'] * 1e3:.1f} -> {median_cpu['this tree'] * 1e3:.1f} ms/visit); "
          f"same decisions and bit-identical weights: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
