"""Benchmark of the scoring engines, side by side in one run: seconds per layer sweep and per cycle for the
fast engine with 1 worker and with N workers, the prefix-cache scorer (what the authors' code does) and the
reference; peak memory per worker; a full ``oneconv`` cycle measured outright beside its projection.

    python -m rso.bench                       # paper6 at batch 5000 and oneconv at batch 512, 2 workers
    python -m rso.bench --quick               # a smoke test on a slice, written to a scratch folder
    python -m rso.bench --workers 4 --models paper6

What is timed (every configuration runs in fresh processes, one torch and one numba thread per worker):

- fast engine, 1 and N workers: for every tensor, a contiguous sample from the start of a real sweep (row-major
  order, chunk ``j mod n_chunks``, accepts written back, caches filled when a chunk is first visited, as in a
  run): the first output channel, the first visits of the second one (channel moves) and ``--extra-visits``
  more. Visits are classed as chunk first visits (cache fills), channel moves and the rest; the sweep is
  projected as the sum over classes of (visits of that class in the whole sweep) x (their mean time in the
  sample). Tensors the sample covers (biases, BN) and fused sweeps (the output layer) are timed whole.
  The two run ``--repeats`` times (default 2), alternated (1 worker, N, 1, N): the table shows the mean, and a
  line gives each pair's cycles and ratio (this machine's speed drifts by 10-20% within an hour).
- prefix-cache: the first ``--prefix-visits`` visits of each tensor's sweep after filling the caches of the
  chunks they use; projected as (fill time per chunk x chunks) + (visits x mean visit time).
- reference: three full forward passes per visit whatever the tensor: ``--reference-visits`` visits on
  ``--reference-tensors`` tensors, their mean for every weight.
- the convolution floor: the convolutions every candidate must run (the next layer's one changed input channel,
  every conv after it in full), each timed at this machine's rate for its shape, summed over a cycle; with N
  workers divided by the measured parallel ceiling. No engine can score a cycle exactly in less.
- ``--full-cycle`` models (default oneconv): one whole cycle (every sweep, as the trainer runs it) with the fast
  engine, 1 and N workers, measured outright, beside the projection above.

Results go to ``results/bench/bench.json`` and ``bench.txt`` (``--quick``: a scratch folder, never there). The
header records the load average: on a shared machine every ratio is measured in one run, but not at rest.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rso import distributed
from rso.data import load_mnist
from rso.engines import FastEngine, PrefixCacheEngine, ReferenceEngine
from rso.models import build_model
from rso.search.candidates import candidate_values, gaussian_steps, select_candidate
from rso.search.loop import SweepStats, draw_sweep, last_visits, run_sweep
from rso.search.visit import visit_order

CASES = (("paper6", 5000), ("oneconv", 512))
DEFAULT_OUTPUT = "results/bench"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()   # note: timing needs the queued kernels finished


def visit(engine, target, index: int, step: float, chunk: int, weight_decay: float = 0.0,
          last: bool = False) -> None:
    """One weight visit, as rso.search.loop.visit_each_weight does it (``last``: the sweep's last visit to
    ``chunk``, after which the loop lets the engine drop the chunk's caches)."""
    flat = target.parameter.data.view(-1)
    current = flat[index].item()
    values = candidate_values(current, step, weight_decay).to(target.parameter.dtype).to(torch.float64)
    losses = engine.score(index, values, chunk)
    chosen = values[select_candidate(losses)].item()
    if chosen != current:
        flat[index] = chosen
        engine.commit(index, chosen, chunk)
    if last:
        engine.release(chunk)


def per_channel(model, target) -> int:
    """Elements of ``target`` that share one output channel (a conv/dense weight row), else 1."""
    parameter = target.parameter
    return parameter[0].numel() if target.kind == "weight" and parameter.dim() > 1 else 1


def visit_class(index: int, channel_size: int, n_chunks: int) -> str:
    """``fill``: a chunk's first visit of the sweep; ``move``: a chunk's first visit in a later channel; ``rest``."""
    if index < n_chunks:
        return "fill"
    return "move" if index % channel_size < n_chunks else "rest"


def project(times: list[float], numel: int, channel_size: int, n_chunks: int) -> float:
    """A whole sweep from the times of its first ``len(times)`` visits (see the module docstring)."""
    if len(times) >= numel:
        return sum(times)
    counts: dict[str, int] = {}
    for index in range(numel):
        kind = visit_class(index, channel_size, n_chunks)
        counts[kind] = counts.get(kind, 0) + 1
    sampled: dict[str, list[float]] = {}
    for index, seconds in enumerate(times):
        sampled.setdefault(visit_class(index, channel_size, n_chunks), []).append(seconds)
    fallback = sum(times) / len(times)
    return sum(count * (sum(sampled[kind]) / len(sampled[kind]) if kind in sampled else fallback)
               for kind, count in counts.items())


def sweep_sample(engine, model, target, images, labels, batch_size, seed, device, count: int | None,
                 world=distributed.LOCAL) -> dict:
    """Time the first ``count`` visits (all when ``None``) of a real sweep of ``target``."""
    generator = torch.Generator().manual_seed(seed)
    partition, chunks, steps = draw_sweep(target, len(labels), batch_size, target.sigma, gaussian_steps, generator)
    partition.order = partition.order.to(device)
    partition.world = world
    channel_size = per_channel(model, target)
    start = time.perf_counter()
    engine.begin_sweep(model, target, images, labels, partition)
    try:
        fused = isinstance(engine, FastEngine) and engine.plan.head_only and engine.use_numba() and world.size == 1
        if fused:    # the output layer's sweep is one numba loop: timed whole
            engine.run_sweep(chunks, steps, 0.0, SweepStats(target.name, target.sigma), None)
            sync(device)
            seconds = time.perf_counter() - start
            return {"sweep_s": seconds, "visits": target.numel, "whole": True}
        if isinstance(engine, FastEngine):
            engine.prebuild(sorted(set(chunks.tolist())))   # as run_sweep does (only where no BN is below)
        setup = time.perf_counter() - start
        count = target.numel if count is None else min(count, target.numel)
        steps_list, chunks_list = steps.tolist(), chunks.tolist()
        last_visit = last_visits(chunks_list)
        times = []
        for index in range(count):
            began = time.perf_counter()
            visit(engine, target, index, steps_list[index], chunks_list[index],
                  last=last_visit[chunks_list[index]] == index)
            sync(device)
            times.append(time.perf_counter() - began)
        sweep = setup + project(times, target.numel, channel_size, partition.n_chunks)
        return {"sweep_s": sweep, "visits": count, "whole": count == target.numel}
    finally:
        engine.end_sweep()


def prefix_sample(model, target, images, labels, batch_size, seed, device, visits: int, world) -> dict:
    """Prefix-cache: fill the caches of the chunks the first ``visits`` visits use, then time those visits."""
    generator = torch.Generator().manual_seed(seed)
    partition, chunks, steps = draw_sweep(target, len(labels), batch_size, target.sigma, gaussian_steps, generator)
    partition.order = partition.order.to(device)
    partition.world = world
    engine = PrefixCacheEngine(world)
    engine.begin_sweep(model, target, images, labels, partition)
    try:
        count = min(visits, target.numel)
        used = sorted(set(chunks[:count].tolist()))
        start = time.perf_counter()
        for chunk in used:
            engine._inputs(chunk)
        sync(device)
        fill = (time.perf_counter() - start) / len(used)
        times = []
        for index in range(count):
            began = time.perf_counter()
            visit(engine, target, index, float(steps[index]), int(chunks[index]))
            sync(device)
            times.append(time.perf_counter() - began)
        total_chunks = len(set(chunks.tolist()))
        return {"sweep_s": fill * total_chunks + sum(times) / count * target.numel, "visits": count,
                "whole": False}
    finally:
        engine.end_sweep()


def measure(spec: dict, world=distributed.LOCAL) -> dict:
    """One configuration (``spec['engine']``: fast, prefix-cache, reference, or ``cycle``: a whole fast cycle)."""
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    data = load_mnist(os.environ.get("RSO_DATA_DIR"), train_subset=spec["train_subset"], test_subset=1,
                      download=False)
    images, labels = data.train_images.to(device, dtype), data.train_labels.to(device)
    model = build_model(spec["model"], torch.Generator().manual_seed(spec["seed"])).to(device, dtype)
    targets = visit_order(model)
    rows: dict[str, dict] = {}
    if spec["engine"] in ("fast", "cycle"):   # compile (or load) the numba kernels before anything is timed
        warm = copy.deepcopy(model)
        few = 4 * world.size
        for target in visit_order(warm):
            sweep_sample(FastEngine(world=world), warm, target, images[:4 * few], labels[:4 * few], few, 0,
                         device, 2, world)
    started = time.perf_counter()
    if spec["engine"] == "cycle":
        generator = torch.Generator().manual_seed(spec["seed"])
        engine = FastEngine(world=world)
        for target in targets:
            stats = run_sweep(model, target, images, labels, engine, sigma=target.sigma,
                              batch_size=spec["batch_size"], sampler=gaussian_steps, generator=generator)
            rows[target.name] = {"sweep_s": stats.seconds, "visits": stats.visits, "whole": True}
        return {"rows": rows, "seconds": time.perf_counter() - started}
    if spec["engine"] == "reference":
        picks = sorted({round(i * (len(targets) - 1) / max(1, spec["reference_tensors"] - 1))
                        for i in range(spec["reference_tensors"])})
        for position in picks:
            target = targets[position]
            result = sweep_sample(ReferenceEngine(world), model, target, images, labels, spec["batch_size"],
                                  spec["seed"] + position, device, spec["reference_visits"], world)
            result["per_visit_s"] = result.pop("sweep_s") / target.numel
            rows[target.name] = result
        return {"rows": rows, "seconds": time.perf_counter() - started}
    for position, target in enumerate(targets):
        seed = spec["seed"] + position
        if spec["engine"] == "prefix-cache":
            rows[target.name] = prefix_sample(model, target, images, labels, spec["batch_size"], seed, device,
                                              spec["prefix_visits"], world)
        else:
            n_chunks = len(labels) // spec["batch_size"]
            size = per_channel(model, target)
            count = max(n_chunks, size + min(size, n_chunks)) + spec["extra_visits"]
            rows[target.name] = sweep_sample(FastEngine(world=world), model, target, images, labels,
                                             spec["batch_size"], seed, device, count, world)
        if world.is_main:
            row = rows[target.name]
            print(f"    {spec['label']:>22} {target.name:>10}: {row['sweep_s']:9.2f} s a sweep "
                  f"({'whole' if row['whole'] else str(row['visits']) + ' visits sampled'})", flush=True)
    return {"rows": rows, "seconds": time.perf_counter() - started}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def _measure_worker(spec: dict, output: str) -> int:
    """One rank of a configuration: measure, gather every rank's peak memory, rank 0 writes ``output``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(spec["device"])
    world = distributed.init_world(device) if size > 1 else distributed.LOCAL
    try:
        distributed.set_threads(spec["threads"])
        result = measure(spec, world)
        peaks = world.gather(torch.tensor([peak_memory_gb(device)]))[:, 0].tolist()
        if world.is_main:
            Path(output).write_text(json.dumps({**result, "peak_memory_gb": peaks}))
    finally:
        distributed.close_world(world)
    return 0


def run_configuration(spec: dict, workers: int) -> dict:
    """``spec`` in ``workers`` fresh processes (so each peak memory is its own)."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "result.json"
        status = distributed.launch(workers, _measure_worker, (spec, str(output)))
        if status != 0 or not output.is_file():
            raise SystemExit(f"error: the bench configuration {spec['label']} failed (exit status {status})")
        return json.loads(output.read_text())


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


def _conv_rate_in_process(barrier, results, dtype_name: str) -> None:
    torch.set_num_threads(1)
    x = torch.randn(1000, 16, 28, 28, dtype=getattr(torch, dtype_name))
    w = torch.randn(16, 16, 3, 3, dtype=getattr(torch, dtype_name))
    with torch.no_grad():
        F.conv2d(x, w, padding=1)
        barrier.wait()
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < 3.0:
            F.conv2d(x, w, padding=1)
            count += 1
        results.put(count * 2 * 1000 * 28 * 28 * 16 * 16 * 9 / (time.perf_counter() - start) / 1e9)


def parallel_ceiling(workers: int, dtype: torch.dtype) -> dict:
    """What ``workers`` processes can gain over one on this machine: the conv above, one thread each, for 3 s
    in 1 process and then in ``workers`` processes at once (a VM's vCPUs may share physical cores or memory
    bandwidth, which caps what N workers can reach whatever the code does)."""
    context = multiprocessing.get_context("spawn")
    rates = {}
    for count in sorted({1, workers}):
        barrier, results = context.Barrier(count), context.Queue()
        processes = [context.Process(target=_conv_rate_in_process, args=(barrier, results, str(dtype).split(".")[-1]))
                     for _ in range(count)]
        for process in processes:
            process.start()
        total = sum(results.get(timeout=120) for _ in processes)
        for process in processes:
            process.join()
        rates[count] = total
    return {"workers": workers, "one_process_gflops": rates[1], "all_processes_gflops": rates[workers],
            "ratio": rates[workers] / rates[1]}


def conv_floor(name: str, batch_size: int, device: torch.device, dtype: torch.dtype, candidates: int = 3,
               repeats: int = 3) -> dict:
    """The least time a fast-engine cycle of ``name`` can take here, one worker: the convolutions that every
    candidate of every visit must run, each timed now at this machine's rate for its own shape (one thread,
    the faster of NCHW and channels-last; a conv that a 2x2 average pooling follows folded with it, as the
    engine runs it), and nothing else (no BN, pooling, losses, Python or collectives).

    A visit changes one channel of the searched layer's output, so the next conv or linear layer sees one
    changed input channel (its work divided by its input channels) and every conv after it sees a change in
    every channel: those run in full, for each of the ``candidates`` (3: candidate 0 is recomputed too, as
    the fast engine does unless the chunk's current loss is still known, and always under weight decay).
    Linear layers are left out (a dense head is a few hundred multiply-adds per example)."""
    from rso.engines.fast import keep_freed_memory
    from rso.engines.plan import PooledConv, _foldable, plan_sweep

    keep_freed_memory()     # as the engine runs (fresh pages for every output made convs up to 1.5x slower)

    model = build_model(name).to(device, dtype).eval()
    layers = list(model)
    inputs: dict[int, tuple[int, ...]] = {}
    handles = [layer.register_forward_hook(lambda module, args, output, i=i: inputs.__setitem__(i, args[0].shape[1:]))
               for i, layer in enumerate(layers) if isinstance(layer, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28, device=device, dtype=dtype))
    for handle in handles:
        handle.remove()
    size = min(batch_size, 2000)     # examples per timed call: large enough for the per-example rate

    def seconds_per_example(conv, shape) -> float:
        x = torch.randn(size, *shape, device=device, dtype=dtype)
        best = float("inf")
        for layout in (torch.contiguous_format, torch.channels_last):
            xl, wl = x.contiguous(memory_format=layout), conv.weight.detach().contiguous(memory_format=layout)
            with torch.no_grad():
                for attempt in range(repeats + 1):
                    sync(device)
                    start = time.perf_counter()
                    F.conv2d(xl, wl, None, conv.stride, conv.padding, conv.dilation, conv.groups)
                    sync(device)
                    if attempt:      # the first call warms up
                        best = min(best, time.perf_counter() - start)
        return best / size
    # a conv in full (the suffix) runs as the engine runs it: folded with a 2x2 average pooling after it
    per_example: dict[int, float] = {}
    in_full: dict[int, float] = {}
    for i, shape in inputs.items():
        per_example[i] = seconds_per_example(layers[i], shape)
        in_full[i] = per_example[i]
        if i + 1 < len(layers) and _foldable(layers[i], layers[i + 1]):
            in_full[i] = seconds_per_example(PooledConv(layers[i]), shape)
    per_tensor = {}
    for target in visit_order(model):
        plan = plan_sweep(model, target)
        seconds = 0.0
        if plan.next_layer is not None and plan.next_index in per_example:   # folded too, as the engine does
            seconds += in_full[plan.next_index] / plan.next_layer.in_channels
        seconds += sum(in_full.get(i, 0.0) for i in range(plan.next_index + 1, len(layers)))
        per_tensor[target.name] = target.numel * candidates * batch_size * seconds
    return {"candidates": candidates, "conv_s_per_example": {str(i): v for i, v in per_example.items()},
            "pooled_conv_s_per_example": {str(i): in_full[i] for i in in_full if in_full[i] != per_example[i]},
            "per_tensor_s": per_tensor, "cycle_s": sum(per_tensor.values())}


def merge_runs(runs: list[dict]) -> dict:
    """Several runs of one configuration as one: each tensor's mean seconds (its runs' in ``runs_s``), each
    run's cycle in ``cycle_runs_s``, the highest peak memory per worker."""
    rows = {}
    for tensor, first in runs[0]["rows"].items():
        seconds = [run["rows"][tensor]["sweep_s"] for run in runs]
        rows[tensor] = {**first, "sweep_s": sum(seconds) / len(seconds), "runs_s": seconds}
    merged = {"rows": rows, "seconds": sum(run["seconds"] for run in runs),
              "cycle_runs_s": [sum(row["sweep_s"] for row in run["rows"].values()) for run in runs]}
    if all("peak_memory_gb" in run for run in runs):
        merged["peak_memory_gb"] = [max(values) for values in zip(*(run["peak_memory_gb"] for run in runs))]
    return merged


def bench_case(name: str, batch_size: int, args, device: torch.device, ceiling: dict | None = None) -> dict:
    """Every configuration of one model and batch size; ``ceiling``: :func:`parallel_ceiling`'s measurement,
    which divides the convolution floor for N workers (N when not measured)."""
    base = {"model": name, "batch_size": batch_size, "device": str(device), "dtype": args.dtype, "seed": args.seed,
            "train_subset": args.train_subset, "threads": args.threads, "extra_visits": args.extra_visits,
            "prefix_visits": args.prefix_visits, "reference_visits": args.reference_visits,
            "reference_tensors": args.reference_tensors}
    n = args.workers
    configurations = {"fast_1": ({**base, "engine": "fast", "label": "fast engine 1 worker"}, 1),
                      f"fast_{n}": ({**base, "engine": "fast", "label": f"fast engine {n} workers"}, n),
                      "prefix": ({**base, "engine": "prefix-cache", "label": "prefix-cache"}, 1),
                      "reference": ({**base, "engine": "reference", "label": "reference"}, 1)}
    if name in args.full_cycle:
        configurations["cycle_1"] = ({**base, "engine": "cycle", "label": "fast 1 worker, full cycle"}, 1)
        configurations[f"cycle_{n}"] = ({**base, "engine": "cycle", "label": f"fast {n} workers, full cycle"}, n)
    results = {}
    # the fast engine on 1 and on N workers, alternated --repeats times: the machine's speed drifts over a
    # bench, and a ratio of two runs minutes apart carried that drift; the table shows each run's mean
    repeats = args.repeats
    fast = list(dict.fromkeys(["fast_1", f"fast_{n}"]))     # (one entry with --workers 1)
    runs = {key: [] for key in fast}
    for repeat in range(repeats):
        for key in fast:
            spec, workers = configurations[key]
            print(f"  {name} batch {batch_size}: {spec['label']}"
                  + (f" (run {repeat + 1} of {repeats}, alternated)" if repeats > 1 else ""), flush=True)
            runs[key].append(run_configuration(spec, workers))
    for key in fast:
        results[key] = merge_runs(runs[key])
    for key, (spec, workers) in configurations.items():
        if key in fast:
            continue
        print(f"  {name} batch {batch_size}: {spec['label']}", flush=True)
        results[key] = run_configuration(spec, workers)
    model = build_model(name)
    targets = visit_order(model)
    weights = sum(target.numel for target in targets)
    reference_rows = results["reference"]["rows"]
    reference_per_visit = sum(row["per_visit_s"] * row["visits"] for row in reference_rows.values()) / \
        sum(row["visits"] for row in reference_rows.values())
    cycle = {key: sum(row["sweep_s"] for row in result["rows"].values())
             for key, result in results.items() if key != "reference"}
    cycle["reference"] = reference_per_visit * weights
    case = {"model": name, "batch_size": batch_size, "workers": n, "weights_per_cycle": weights,
            "tensors": [target.name for target in targets], "numel": {t.name: t.numel for t in targets},
            "configurations": results, "cycle_s": cycle, "reference_per_visit_s": reference_per_visit,
            "peak_memory_gb": {key: result["peak_memory_gb"] for key, result in results.items()}}
    floor = conv_floor(name, batch_size, device, getattr(torch, args.dtype))
    floor["workers_cycle_s"] = floor["cycle_s"] / (ceiling["ratio"] if ceiling else n)
    case["conv_floor"] = floor
    for key in ("cycle_1", f"cycle_{n}"):
        if key in cycle:
            projected = cycle["fast_" + key.split("_")[1]]
            case.setdefault("projection_vs_measured", {})[key] = (projected - cycle[key]) / cycle[key]
    return case


def table(case: dict) -> str:
    n = case["workers"]
    keys = [("fast_1", "fast 1w"), (f"fast_{n}", f"fast {n}w"), ("prefix", "prefix-cache")]
    lines = [f"{case['model']} batch {case['batch_size']} ({case['weights_per_cycle']} weights a cycle): "
             "seconds per sweep (* timed whole, else projected from a contiguous sample)"]
    lines.append(f"  {'tensor':>10} {'numel':>6}" + "".join(f" {label:>14}" for _, label in keys))
    for name in case["tensors"]:
        cells = []
        for key, _ in keys:
            row = case["configurations"][key]["rows"][name]
            cells.append(f"{row['sweep_s']:>13.2f}{'*' if row['whole'] else ' '}")
        lines.append(f"  {name:>10} {case['numel'][name]:>6} " + " ".join(cells))
    cycle = case["cycle_s"]
    lines.append(f"  cycle: fast 1 worker {cycle['fast_1']:.1f} s, fast {n} workers {cycle[f'fast_{n}']:.1f} s, "
                 f"prefix-cache {cycle['prefix']:.1f} s, reference {cycle['reference']:.0f} s "
                 f"({case['reference_per_visit_s']:.3f} s a visit, sampled)")
    runs_1, runs_n = (case["configurations"][key].get("cycle_runs_s", []) for key in ("fast_1", f"fast_{n}"))
    if n > 1 and len(runs_1) > 1 and len(runs_1) == len(runs_n):
        pairs = ", ".join(f"{one:.1f} / {many:.1f} s ({one / many:.2f}x)" for one, many in zip(runs_1, runs_n))
        lines.append(f"  fast 1 worker / {n} workers, run by run (alternated; the cycle above is their mean): {pairs}")
    for key, error in case.get("projection_vs_measured", {}).items():
        workers = key.split("_")[1]
        lines.append(f"  full cycle measured outright, fast {workers} worker(s): {cycle[key]:.1f} s; the projection "
                     f"{cycle['fast_' + workers]:.1f} s is {100 * error:+.0f}% from it")
    floor = case.get("conv_floor")
    if floor:
        ratios = (f"; the fast engine takes {cycle['fast_1'] / floor['cycle_s']:.1f}x and "
                  f"{cycle[f'fast_{n}'] / floor['workers_cycle_s']:.1f}x that" if floor["cycle_s"] > 0 else
                  " (no conv follows the next layer of any searched tensor)")
        lines.append(f"  convolution floor (every candidate's convs at this machine's measured rates, nothing else): "
                     f"{floor['cycle_s']:.1f} s a cycle on 1 worker, {floor['workers_cycle_s']:.1f} s on {n}{ratios}")
    memory = ", ".join(f"{key} " + "/".join(f"{value:.2f}" for value in values)
                       for key, values in case["peak_memory_gb"].items())
    lines.append(f"  peak memory per worker (GB): {memory}")
    return "\n".join(lines)


def summary_lines(case: dict, device: torch.device) -> list[str]:
    n, cycle = case["workers"], case["cycle_s"]
    head = f"{case['model']} batch {case['batch_size']} {device.type}: fast engine"
    return [f"{head} 1 worker {cycle['reference'] / cycle['fast_1']:.1f}x reference, "
            f"{cycle['prefix'] / cycle['fast_1']:.1f}x prefix-cache",
            f"{head} {n} workers {cycle['reference'] / cycle[f'fast_{n}']:.1f}x reference, "
            f"{cycle['prefix'] / cycle[f'fast_{n}']:.1f}x prefix-cache, "
            f"{cycle['fast_1'] / cycle[f'fast_{n}']:.1f}x one worker"]


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m rso.bench", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--workers", type=int, default=2, help="workers of the multi-process fast engine (2)")
    parser.add_argument("--threads", type=int, default=1, help="torch/numba threads per worker (1)")
    parser.add_argument("--extra-visits", type=int, default=8,
                        help="fast engine: visits sampled after the first channel and the second one's moves (8)")
    parser.add_argument("--prefix-visits", type=int, default=3, help="prefix-cache: visits timed per tensor (3)")
    parser.add_argument("--reference-visits", type=int, default=2, help="reference: visits per sampled tensor (2)")
    parser.add_argument("--reference-tensors", type=int, default=3, help="reference: tensors sampled (3)")
    parser.add_argument("--train-subset", type=int, default=None, help="training examples (default all 60000)")
    parser.add_argument("--batch-size", type=int, default=None, help="one batch size for every model "
                        "(default: paper6 5000, oneconv 512)")
    parser.add_argument("--models", default="paper6,oneconv", help="comma-separated subset of paper6,oneconv")
    parser.add_argument("--full-cycle", default="oneconv",
                        help="models whose whole fast-engine cycle is also measured outright (oneconv)")
    parser.add_argument("--output", default=None, help=f"folder for bench.json and bench.txt ({DEFAULT_OUTPUT}; "
                        "--quick: a scratch folder)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 6000 examples, few visits, "
                        "written to a scratch folder")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the fast engine on 1 and on N workers, "
                        "alternated; the table shows their mean (2; --quick: 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be positive")
    if args.quick:
        args.extra_visits, args.prefix_visits, args.reference_visits, args.reference_tensors = 2, 2, 1, 1
        args.repeats = 1
        args.train_subset = args.train_subset or 6000
        if args.output is not None and Path(args.output).resolve() == Path(DEFAULT_OUTPUT).resolve():
            parser.error(f"--quick never writes over the committed {DEFAULT_OUTPUT}")
        args.output = args.output or tempfile.mkdtemp(prefix="rso-bench-quick-")
    output = Path(args.output or DEFAULT_OUTPUT)
    args.full_cycle = [name for name in args.full_cycle.split(",") if name]
    distributed.set_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    started = time.perf_counter()
    load_start = os.getloadavg()
    rates = peak_rates(device, dtype)
    ceiling = parallel_ceiling(args.workers, dtype) if device.type == "cpu" and args.workers > 1 else None
    scaling = (f"; {args.workers} processes of that conv at once reach {ceiling['ratio']:.2f}x one process's "
               f"throughput (the ceiling for {args.workers} workers here)" if ceiling else "")
    print(f"machine: matmul {rates['matmul_gflops']:.1f} GFLOP/s, conv {rates['conv_gflops']:.1f} GFLOP/s{scaling}; "
          f"load average {load_start[0]:.1f} on {os.cpu_count()} cores", flush=True)
    results = [bench_case(name, args.batch_size or batch, args, device, ceiling) for name, batch in CASES
               if name in args.models.split(",")]
    load_end = os.getloadavg()
    texts = [table(case) for case in results]
    summary = [line for case in results for line in summary_lines(case, device)]
    # the end figure includes the bench's own workers; only the start says whether other jobs were running
    load = (f"load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end (its own workers "
            f"included), on {os.cpu_count()} cores"
            + (" (a loaded machine: other jobs ran)" if load_start[0] > 0.5 * (os.cpu_count() or 1) else ""))
    command = "python -m rso.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command.strip(), "commit": commit(), "machine": machine(device), "dtype": args.dtype,
              "threads_per_worker": args.threads, "train_examples": args.train_subset or 60000, "rates": rates,
              "parallel_ceiling": ceiling,
              "load_average": {"start": load_start, "end": load_end}, "results": results, "summary": summary,
              "seconds": time.perf_counter() - started}
    output.mkdir(parents=True, exist_ok=True)
    (output / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    text = "\n".join(texts)
    print(text)
    (output / "bench.txt").write_text(
        f"# {report['command']} at commit {report['commit']}\n# {json.dumps(report['machine'])}\n"
        f"# matmul {rates['matmul_gflops']:.1f} GFLOP/s, conv {rates['conv_gflops']:.1f} GFLOP/s{scaling}; {load}; "
        f"{args.threads} thread(s) per worker\n" + text + "\n" + "\n".join(summary) + "\n")
    print(f"# {load}; written to {output}")
    for line in summary:
        print(line)
    return report


if __name__ == "__main__":
    main()
