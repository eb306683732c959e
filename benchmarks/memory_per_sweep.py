"""Resident memory per layer sweep of the fast engine: paper6 at batch 5000 on all 60,000 examples, one process.

For every tensor in visiting order the engine fills the caches of every chunk (one visit each; a chunk that the
sweep's visits ``j`` (chunk ``j mod n_chunks``) do not come back to is released after it, as the loop does), then
ends the sweep; the line gives the peak resident memory of that sweep (VmHWM, reset per tensor through
/proc/self/clear_refs) and what stays resident after it. ``--keep-freed`` skips the engine's return of freed
memory to the system (malloc_trim), to compare. Linux only.

    python benchmarks/memory_per_sweep.py [--search-bn fixed-below] [--keep-freed]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import rso.engines.base as base  # noqa: E402
import rso.engines.fast as fast  # noqa: E402
from rso.data import load_mnist  # noqa: E402
from rso.engines import ChunkPartition, FastEngine, fixed_statistics  # noqa: E402
from rso.models import build_model  # noqa: E402
from rso.search.candidates import candidate_values  # noqa: E402
from rso.search.visit import visit_order  # noqa: E402


def status_gb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 2 ** 20
    raise SystemExit(f"error: no {key} in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="paper6")
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--search-bn", choices=["chunk", "fixed-below"], default="chunk")
    parser.add_argument("--keep-freed", action="store_true", help="do not return freed memory after each sweep")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if args.keep_freed:
        fast.return_freed_memory = base.return_freed_memory = lambda: None
    torch.set_num_threads(1)
    data = load_mnist(args.data_dir, transform="center")
    model = build_model(args.model, torch.Generator().manual_seed(0))
    images, labels = data.train_images, data.train_labels
    print(f"{args.model} batch {args.batch_size}, {len(labels)} examples, BN {args.search_bn}, "
          f"{'freed memory kept' if args.keep_freed else 'freed memory returned'}; start {status_gb('VmRSS:'):.2f} GB")
    for target in visit_order(model):
        Path("/proc/self/clear_refs").write_text("5")    # reset VmHWM
        started = time.perf_counter()
        partition = ChunkPartition(torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)),
                                   args.batch_size)
        fixed = fixed_statistics(model, images[:2000], target.module) if args.search_bn == "fixed-below" else None
        engine = FastEngine()
        engine.begin_sweep(model, target, images, labels, partition, fixed)
        flat = target.parameter.data.view(-1)
        for chunk in range(partition.n_chunks):
            index = chunk % target.numel
            values = candidate_values(flat[index].item(), 0.01, 1e-4).to(flat.dtype).to(torch.float64)
            engine.score(index, values, chunk)
            if chunk + partition.n_chunks >= target.numel:   # as the loop: a chunk the sweep will not visit again
                engine.release(chunk)
        peak = status_gb("VmHWM:")
        engine.end_sweep()
        print(f"{target.name:>10}: peak {peak:.2f} GB, resident after the sweep {status_gb('VmRSS:'):.2f} GB "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
