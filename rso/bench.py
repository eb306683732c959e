"""Benchmark of the scoring engines: microseconds per weight visit, per tensor; the projected time of one full
cycle; the ratio; peak memory; achieved FLOP rate next to a matmul/conv rate measured in the same run.

    python -m rso.bench                      # paper6 at batch 5000 and oneconv at batch 512, current device
    python -m rso.bench --quick              # fewer samples (a smoke test)
    python -m rso.bench --threads 2          # both engines with two torch threads

For each tensor of the visit order the fast engine runs the first consecutive visits of a real sweep (row-major
order, chunk ``j mod n_chunks``, accepts written back) after filling its per-chunk caches: the first visit of
every chunk in the first output channel (these move the chunk's caches onto a channel) and ``--fast-visits``
more. A sweep is projected as ``cache setup + first visits x their mean time + the other visits x theirs``. Sweeps the fast engine runs as one fused
loop (the output layer on CPU) are timed in full. The reference engine's cost per visit does not depend on
the tensor (three full forward passes), so it is sampled on a few tensors and its mean is used for all.
The figures go to ``results/bench/bench.json`` and ``results/bench/bench.txt``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from rso.data import load_mnist
from rso.engines import FastEngine, ReferenceEngine
from rso.models import build_model
from rso.search.candidates import candidate_values, gaussian_steps, select_candidate
from rso.search.loop import SweepStats, draw_sweep
from rso.search.visit import visit_order

CASES = (("paper6", 5000), ("oneconv", 512))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()   # note: timing needs the queued kernels finished


def visit(engine, target, index: int, step: float, chunk: int, weight_decay: float = 0.0) -> None:
    """One weight visit, as rso.search.loop.visit_each_weight does it."""
    flat = target.parameter.data.view(-1)
    current = flat[index].item()
    values = candidate_values(current, step, weight_decay).to(target.parameter.dtype).to(torch.float64)
    losses = engine.score(index, values, chunk)
    chosen = values[select_candidate(losses)].item()
    if chosen != current:
        flat[index] = chosen
        engine.commit(index, chosen, chunk)


def measure_tensor(engine, model, target, images, labels, batch_size, visits, seed, device):
    # note: the fast engine's cost per visit depends on the layer, not on the element (weight, bias or BN)
    """(seconds per visit, projected seconds per sweep, measured visits, flops per visit or None)."""
    generator = torch.Generator().manual_seed(seed)
    partition, chunks, steps = draw_sweep(target, len(labels), batch_size, target.sigma, gaussian_steps, generator)
    partition.order = partition.order.to(device)
    engine.begin_sweep(model, target, images, labels, partition)
    try:
        if isinstance(engine, FastEngine) and engine.plan.head_only and engine.use_numba():
            start = time.perf_counter()
            engine.run_sweep(chunks, steps, 0.0, SweepStats(target.name, target.sigma), None)
            sync(device)
            seconds = time.perf_counter() - start
            return seconds / target.numel, seconds, target.numel, None
        fast = isinstance(engine, FastEngine)
        # Visit j of a sweep (row-major, chunk j mod n_chunks) is the first of its chunk in its output channel
        # when j mod per_channel < n_chunks: the chunk's caches then move onto the channel (a one-channel
        # convolution), while later visits only add the accepted steps. The two kinds are timed apart and
        # weighted as in a whole sweep: n_channels x min(per_channel, n_chunks) first visits.
        per_channel = engine._per_channel if fast else target.numel
        first_kind = min(per_channel, partition.n_chunks) if fast else 0
        count = min(target.numel, first_kind + visits)
        setup = 0.0
        if fast:
            used = min(partition.n_chunks, count)
            start = time.perf_counter()
            engine.prebuild(list(range(used)))
            for chunk in range(used):
                engine._chunk(chunk)
            sync(device)
            setup = (time.perf_counter() - start) / used * min(partition.n_chunks, target.numel)
        steps_list, chunks_list = steps.tolist(), chunks.tolist()
        times: dict[bool, list[float]] = {True: [], False: []}
        for index in range(count):
            start = time.perf_counter()
            visit(engine, target, index, steps_list[index], chunks_list[index])
            sync(device)
            times[index % per_channel < first_kind].append(time.perf_counter() - start)
        first_visits = target.numel // per_channel * first_kind
        first_cost = sum(times[True]) / len(times[True]) if times[True] else 0.0
        steady_cost = sum(times[False]) / len(times[False]) if times[False] else first_cost
        sweep_visits = first_visits * first_cost + (target.numel - first_visits) * steady_cost
        per_visit = sweep_visits / target.numel
        flops = None
        if count < target.numel:
            with FlopCounterMode(display=False) as counter:
                visit(engine, target, count, steps_list[count], chunks_list[count])
            flops = counter.get_total_flops()
        return per_visit, setup + sweep_visits, count, flops
    finally:
        engine.end_sweep()


def peak_rates(device: torch.device, dtype: torch.dtype) -> dict:
    """GFLOP/s of a 2048^3 matmul and of paper6's widest conv (16->16, 3x3, 28x28) on this machine, now."""
    def best(fn, flops, repeats=3):
        fn()
        sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return flops / min(times) / 1e9
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    x = torch.randn(1000, 16, 28, 28, device=device, dtype=dtype)
    w = torch.randn(16, 16, 3, 3, device=device, dtype=dtype)
    with torch.no_grad():
        return {"matmul_gflops": best(lambda: a @ a, 2 * 2048 ** 3),
                "conv_gflops": best(lambda: F.conv2d(x, w, padding=1), 2 * 1000 * 28 * 28 * 16 * 16 * 9)}


def forward_flops(model, images) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def bench_case(name, batch_size, data, device, dtype, fast_visits, small_visits, reference_visits, reference_tensors,
               seed):
    torch.manual_seed(seed)
    images = data.train_images.to(device, dtype)
    labels = data.train_labels.to(device)
    original = build_model(name, torch.Generator().manual_seed(seed)).to(device, dtype)
    targets = visit_order(original)
    names = [target.name for target in targets]
    rows = {target.name: {"numel": target.numel} for target in targets}
    # fast engine: every tensor
    model = copy.deepcopy(original)
    for position, target in enumerate(visit_order(model)):
        visits = fast_visits if target.kind == "weight" else small_visits
        per_visit, sweep, count, flops = measure_tensor(FastEngine(), model, target, images, labels, batch_size,
                                                        visits, seed + position, device)
        rows[target.name].update(fast_us=per_visit * 1e6, fast_sweep_s=sweep, fast_visits=count, fast_flops=flops)
        print(f"  {name} {target.name:>12}: fast {per_visit * 1e6:12.1f} us/visit ({count} visits)", flush=True)
    # reference engine: a few tensors, the mean for all
    model = copy.deepcopy(original)
    model_targets = visit_order(model)
    picks = sorted({0, len(model_targets) - 1, *range(0, len(model_targets), max(1, len(model_targets) // reference_tensors))})
    picks = picks[:reference_tensors]
    samples = []
    for position in picks:
        target = model_targets[position]
        per_visit, _, count, _ = measure_tensor(ReferenceEngine(), model, target, images, labels, batch_size,
                                                reference_visits, seed + position, device)
        rows[target.name].update(reference_us_measured=per_visit * 1e6, reference_visits=count)
        samples.append((per_visit, count))
        print(f"  {name} {target.name:>12}: reference {per_visit * 1e6:12.1f} us/visit ({count} visits)", flush=True)
    reference_per_visit = sum(s * c for s, c in samples) / sum(c for _, c in samples)
    reference_flops_per_visit = 3 * forward_flops(original, images[:batch_size])
    for row in rows.values():
        row["reference_us"] = reference_per_visit * 1e6
        row["speedup"] = row["reference_us"] / row["fast_us"]
    weights = sum(row["numel"] for row in rows.values())
    fast_cycle = sum(row["fast_sweep_s"] for row in rows.values())
    reference_cycle = reference_per_visit * weights
    counted = [row for row in rows.values() if row["fast_flops"] is not None]
    fast_flops_cycle = sum(row["fast_flops"] * row["numel"] for row in counted)
    fast_seconds_counted = sum(row["fast_us"] * 1e-6 * row["numel"] for row in counted)
    return {
        "model": name, "batch_size": batch_size, "weights_per_cycle": weights, "tensors": names, "rows": rows,
        "reference_cycle_s": reference_cycle, "fast_cycle_s": fast_cycle, "speedup": reference_cycle / fast_cycle,
        "reference_gflops": reference_flops_per_visit / reference_per_visit / 1e9,
        "fast_gflops": fast_flops_cycle / fast_seconds_counted / 1e9 if fast_seconds_counted else None,
        "peak_memory_gb": peak_memory_gb(device),
    }


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device)}
    try:
        import numba
        info.update(numba=numba.__version__, numba_threads=numba.get_num_threads())
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(results: list[dict]) -> str:
    lines = []
    for case in results:
        lines.append(f"{case['model']} batch {case['batch_size']} ({case['weights_per_cycle']} weights a cycle)")
        lines.append(f"  {'tensor':>12} {'numel':>6} {'reference us':>13} {'fast us':>11} {'speedup':>8} {'fast sweep s':>13}")
        for name in case["tensors"]:
            row = case["rows"][name]
            lines.append(f"  {name:>12} {row['numel']:>6} {row['reference_us']:>13.0f} {row['fast_us']:>11.1f} "
                         f"{row['speedup']:>8.1f} {row['fast_sweep_s']:>13.2f}")
        fast_rate = f"{case['fast_gflops']:.1f}" if case["fast_gflops"] else "n/a"
        lines.append(f"  cycle: reference {case['reference_cycle_s']:.0f} s, fast {case['fast_cycle_s']:.1f} s, "
                     f"ratio {case['speedup']:.1f}x; peak memory {case['peak_memory_gb']:.2f} GB; "
                     f"GFLOP/s reference {case['reference_gflops']:.1f}, fast {fast_rate}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m rso.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--fast-visits", type=int, default=12,
                        help="visits timed per weight tensor (fast engine) after the first visit of each chunk "
                             "in the first output channel")
    parser.add_argument("--small-visits", type=int, default=3, help="visits per bias/BN tensor (fast engine)")
    parser.add_argument("--reference-visits", type=int, default=2, help="visits per sampled tensor (reference)")
    parser.add_argument("--reference-tensors", type=int, default=3, help="tensors the reference is sampled on")
    parser.add_argument("--train-subset", type=int, default=None, help="training examples (default all 60000)")
    parser.add_argument("--models", default="paper6,oneconv", help="comma-separated subset of paper6,oneconv")
    parser.add_argument("--output", default="results/bench", help="folder for bench.json and bench.txt")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 6000 examples, few visits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both engines (default 1: on these shared 2-core machines one "
                             "thread per process measured faster for both engines; use 2 on an idle machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.fast_visits, args.small_visits, args.reference_visits, args.reference_tensors = 4, 2, 1, 1
        args.train_subset = args.train_subset or 6000
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    data = load_mnist(os.environ.get("RSO_DATA_DIR"), train_subset=args.train_subset, test_subset=1)
    started = time.perf_counter()
    rates = peak_rates(device, dtype)
    print(f"machine: matmul {rates['matmul_gflops']:.1f} GFLOP/s, conv {rates['conv_gflops']:.1f} GFLOP/s", flush=True)
    wanted = args.models.split(",")
    results = [bench_case(name, batch, data, device, dtype, args.fast_visits, args.small_visits, args.reference_visits,
                          args.reference_tensors, args.seed) for name, batch in CASES if name in wanted]
    text = table(results)
    print(text)
    summary = [f"{case['model']} batch {case['batch_size']} {device.type}: fast engine {case['speedup']:.1f}x "
               f"faster than reference per cycle" for case in results]
    report = {"command": "python -m rso.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": commit(), "machine": machine(device), "dtype": args.dtype,
              "train_examples": len(data.train_labels), "rates": rates, "results": results,
              "summary": summary, "seconds": time.perf_counter() - started}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "bench.txt").write_text(
        f"# {report['command']} at commit {report['commit']}\n# {json.dumps(report['machine'])}\n"
        f"# matmul {rates['matmul_gflops']:.1f} GFLOP/s, conv {rates['conv_gflops']:.1f} GFLOP/s\n"
        + text + "\n" + "\n".join(summary) + "\n")
    for line in reversed(summary):   # the paper6 line last
        print(line)
    return report


if __name__ == "__main__":
    main()
