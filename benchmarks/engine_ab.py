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
    """The ``rso`` package of ``revision`` (git archive), kept under the system's temporary folder by commit
    so that a later run reuses its compiled numba kernels (``folder`` is unused then)."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    kept = Path(tempfile.gettempdir()) / "rso-engine-ab" / commit
    if not (kept / "rso").is_dir():
        archive = subprocess.run(["git", "archive", commit, "rso"], cwd=ROOT, check=True, capture_output=True).stdout
        partial = kept.with_name(commit + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(partial, filter="data")
        partial.rename(kept)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="main", help="git revision to compare with (main)")
    parser.add_argument("--between", default=None, help="comma-separated revisions to time too, in order")
    parser.add_argument("--candidate", default=None, help="git revision to time instead of this working tree")
    parser.add_argument("--in-place", action="store_true",
                        help="time this working tree where it is (its compiled numba cache is reused; do not edit it "
                             "meanwhile) instead of a snapshot")
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
             if key not in ("worker", "baseline", "between", "candidate", "in_place", "repeats")]
    with tempfile.TemporaryDirectory() as scratch:
        # every variant is a snapshot, so that edits made while the benchmark runs do not leak into it
        trees = {args.baseline: export_revision(args.baseline, Path(scratch) / "0")}
        for position, revision in enumerate(filter(None, (args.between or "").split(","))):
            trees[revision] = export_revision(revision, Path(scratch) / str(position + 1))
        snapshot = Path(scratch) / "tree"
        if args.candidate:
            trees[args.candidate] = export_revision(args.candidate, snapshot)
        elif args.in_place:
            trees["this tree"] = ROOT
        else:
            shutil.copytree(ROOT / "rso", snapshot / "rso", ignore=shutil.ignore_patterns("__pycache__"))
            trees["this tree"] = snapshot
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
                print(f"  repeat {repeat + 1} {name[:12]:12s} {run['per_visit'] * 1e3:8.1f} ms/visit wall "
                      f"{run['cpu_per_visit'] * 1e3:8.1f} ms/visit cpu  decisions {run['decisions']} "
                      f"weights {run['weights']}", flush=True)
        load_after = os.getloadavg()
    wall = {name: statistics.median(run["per_visit"] for run in results) for name, results in runs.items()}
    cpu = {name: statistics.median(run["cpu_per_visit"] for run in results) for name, results in runs.items()}
    same = all(len({run[key] for results in runs.values() for run in results}) == 1 for key in ("decisions", "weights"))
    print(f"{args.model} {args.tensor} batch {args.batch_size} x {args.chunks} chunks {args.dtype} {args.threads} "
          f"thread(s), {args.visits} visits x {args.repeats} repeats (medians), load average {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f} on {os.cpu_count()} cores")
    names = list(trees)
    for previous, name in zip(names, names[1:]):
        print(f"{name[:12]} vs {previous[:12]}: {cpu[previous] * 1e3:.1f} -> {cpu[name] * 1e3:.1f} ms/visit cpu time, "
              f"{cpu[previous] / cpu[name]:.2f}x cpu, {wall[previous] / wall[name]:.2f}x wall")
    print(f"{names[-1][:12]} vs {names[0][:12]}: {cpu[names[0]] / cpu[names[-1]]:.2f}x cpu time, "
          f"{wall[names[0]] / wall[names[-1]]:.2f}x wall; same decisions and bit-identical weights in every run: "
          f"{'yes' if same else 'NO'}")

if __name__ == "__main__":
    main()
