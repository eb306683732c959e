"""``make gpu-check``: the GPU path checked and timed on one CUDA device, in under 8 minutes, into one folder.

    python -m rso.gpu_check                          # CUDA; outputs to $OUT, else results/gpu
    python -m rso.gpu_check --device cpu --quick     # the same stages on tiny nets (a smoke test, in the tests)

Stages, each in its own process (a crash or hang in one leaves the others' results), each writing
``<stage>.json`` and ``<stage>.log``; ``summary.json`` and ``summary.md`` are rewritten after every stage:

1. ``environment``: torch, CUDA, cuDNN, the device, the packages, the data folder.
2. ``exactness``: the sync-free engine on the device in float64 against the CPU in float64, sweep by sweep
   over one cycle from the same weights and the same random draws: ``oneconv`` against the reference engine,
   the paper network on a few thousand examples against the fast engine (which the tests hold to the
   reference, decision for decision). After a sweep that differs the CPU takes the device's weights, so each
   sweep is compared from the same start; the CPU side stops at its time budget.
3. ``syncs``: sweeps on the device under CUDA's sync debug mode and ``HostReads``: syncs seen vs progress reads;
   one sweep run twice from the same weights (bitwise repeatable?) and once without graphs (the same weights?).
4. ``bench``: the paper network at batch 5000 per tensor: setup and per-visit seconds (two truncated sweeps),
   the projected cycle, peak memory.
5. ``rso-bench``: ``python -m rso.bench`` on the device (the fast and reference engines), as far as its time allows.
6. ``paper``: the paper configuration (``paper6``, batch 5000, the defaults of ``rso.train``) with the
   sync-free engine for as many cycles as the remaining minutes allow: seconds and test accuracy per cycle.

MNIST is read from ``--data-dir`` (default ``$RSO_DATA_DIR``, else ``./data``), never downloaded. When graph
capture fails, a stage is run again with ``--graphs off`` if time allows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

STAGES = ("environment", "exactness", "syncs", "bench", "rso-bench", "paper")
# seconds each stage may take at most (full run); the paper stage gets what is left
BUDGETS = {"environment": 60, "exactness": 150, "syncs": 45, "bench": 100, "rso-bench": 45}
QUICK_BUDGETS = {"environment": 240, "exactness": 240, "syncs": 240, "bench": 240, "rso-bench": 0}   # a loaded CI box
PAPER_MIN_SECONDS = 60          # the other stages leave the paper stage at least this much
RSO_BENCH_ONLY_ABOVE = 200      # rso.bench runs only when this much time is left (the paper stage comes first)


def _stage_options(args) -> dict:
    """Sizes of each stage: the real check, or tiny nets for ``--quick``."""
    if args.quick:
        return {"exact_cases": [("convnet", {"depth": 1, "channels": 2}, 120, 40, "reference", 20),
                                ("convnet", {"depth": 2, "channels": 2}, 120, 40, "fast", 20)],
                "sync_model": ("convnet", {"depth": 2, "channels": 2}), "sync_train": 120, "sync_batch": 40,
                "bench_model": ("convnet", {"depth": 2, "channels": 2}), "bench_train": 200, "bench_batch": 100,
                "bench_visits": (4, 12), "paper_model": ("convnet", {"depth": 1, "channels": 2}),
                "paper_train": 200, "paper_test": 100, "paper_batch": 100, "paper_cycles": 1,
                "paper_config": {"model": "convnet", "depth": 1, "channels": 2, "batch_size": 100, "cycles": 1,
                                 "train_subset": 200, "test_subset": 100, "bn_samples": 200}}
    return {"exact_cases": [("oneconv", {}, 2000, 250, "reference", 30),
                            ("paper6", {}, 3000, 1000, "fast", 45)],
            "sync_model": ("paper6", {}), "sync_train": 3000, "sync_batch": 1000,
            "bench_model": ("paper6", {}), "bench_train": None, "bench_batch": 5000, "bench_visits": (16, 80),
            "paper_model": ("paper6", {}), "paper_train": None, "paper_test": None, "paper_batch": 5000,
            "paper_cycles": 50, "paper_config": {"model": "paper6", "batch_size": 5000, "cycles": 50}}


# ----------------------------------------------------------------------------------------------- helpers
def _load(args, train_subset, test_subset=1):
    from rso.data import load_mnist
    return load_mnist(args.data_dir, train_subset=train_subset, test_subset=test_subset, download=False)


def _device(args):
    import torch
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    return device


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()   # note: timing needs the queued kernels finished


def _build(name, options, seed, device, dtype):
    import torch
    from rso.models import build_model
    return build_model(name, torch.Generator().manual_seed(seed), **options).to(device, dtype)


def _partial(args, result: dict) -> None:
    """What a stage has so far, kept if the stage is killed at its time limit."""
    (Path(args.out) / f"{args.stage}.partial.json").write_text(json.dumps(result, indent=1, default=str))


def _sweep(model, target, data, engine, sigma, batch, generator):
    from rso.search.candidates import gaussian_steps
    from rso.search.loop import run_sweep
    return run_sweep(model, target, data.train_images, data.train_labels, engine, sigma=sigma, batch_size=batch,
                     sampler=gaussian_steps, generator=generator)


# -------------------------------------------------------------------------------------------------- stages
def stage_environment(args, options) -> dict:
    import torch
    result = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "data_dir": str(args.data_dir)}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        result.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                      memory_gib=round(properties.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version())
    for package in ("numpy", "numba", "tqdm", "tensorboard"):
        try:
            module = __import__(package)
            result[package] = getattr(module, "__version__", "present")
        except ImportError:
            result[package] = None
    try:
        from rso.runs import git_revision
        result["git"] = git_revision()
    except Exception as error:  # noqa: BLE001 - provenance only
        result["git"] = f"unknown ({error})"
    raw = Path(args.data_dir) / "MNIST" / "raw"
    result["mnist_files"] = sorted(path.name for path in raw.glob("*")) if raw.is_dir() else []
    data = _load(args, 1000 if args.quick else None, 1000 if args.quick else None)
    result["mnist"] = {"train": len(data.train_labels), "test": len(data.test_labels)}
    return result


def _lockstep(args, name, model_options, n_train, batch, reference, cpu_budget) -> dict:
    """One cycle on the device (sync-free, float64) and on the CPU (``reference`` engine, float64), sweep by sweep."""
    import torch
    from rso.engines import SyncFreeEngine, make_engine
    from rso.search.visit import visit_order

    device = _device(args)
    data = _load(args, n_train)
    cpu_data = data.to(torch.device("cpu"), torch.float64)
    device_data = data.to(device, torch.float64)
    cpu_model = _build(name, model_options, 0, "cpu", torch.float64)
    device_model = copy.deepcopy(cpu_model).to(device)
    cpu_generator, device_generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    rows, spent, compared = [], 0.0, True
    graph_errors = set()
    for cpu_target, device_target in zip(visit_order(cpu_model), visit_order(device_model)):
        engine = SyncFreeEngine(graphs=args.graphs)
        start = time.perf_counter()
        device_stats = _sweep(device_model, device_target, device_data, engine, device_target.sigma, batch,
                              device_generator)
        _sync(device)
        row = {"tensor": device_target.name, "visits": device_target.numel, "device_accepted": device_stats.accepted,
               "device_seconds": round(time.perf_counter() - start, 3)}
        if engine.graph_error:
            graph_errors.add(engine.graph_error)
        if compared and spent < cpu_budget:
            start = time.perf_counter()
            cpu_stats = _sweep(cpu_model, cpu_target, cpu_data, make_engine(reference, cpu_model), cpu_target.sigma,
                               batch, cpu_generator)
            spent += time.perf_counter() - start
            got = device_target.parameter.detach().cpu()
            differing = int((got != cpu_target.parameter.detach()).sum())
            row.update(cpu_accepted=cpu_stats.accepted, cpu_seconds=round(time.perf_counter() - start, 3),
                       identical=differing == 0 and cpu_stats.accepted == device_stats.accepted,
                       differing_elements=differing,
                       max_abs_difference=float((got - cpu_target.parameter.detach()).abs().max()))
            if differing:          # compare the next sweep from the same start
                with torch.no_grad():
                    cpu_target.parameter.copy_(got)
        elif compared:
            compared = False       # the CPU's budget is spent; its generator no longer follows the device's
        rows.append(row)
        _partial(args, {"cases": [*args.done_cases, _lockstep_summary(name, model_options, n_train, batch, reference,
                                                                      rows, graph_errors)]})
    return _lockstep_summary(name, model_options, n_train, batch, reference, rows, graph_errors)


def _lockstep_summary(name, model_options, n_train, batch, reference, rows, graph_errors) -> dict:
    checked = [row for row in rows if "identical" in row]
    return {"model": name, "options": model_options, "train_examples": n_train, "batch": batch,
            "reference": reference, "sweeps": len(rows), "sweeps_compared": len(checked),
            "visits_compared": sum(row["visits"] for row in checked),
            "sweeps_identical": sum(row["identical"] for row in checked),
            "decisions_identical": all(row["identical"] for row in checked) and bool(checked),
            "device_cycle_seconds": round(sum(row["device_seconds"] for row in rows), 2),
            "graph_errors": sorted(graph_errors), "rows": rows}


def stage_exactness(args, options) -> dict:
    args.done_cases = []
    for case in options["exact_cases"]:
        try:
            args.done_cases.append(_lockstep(args, *case))
        except Exception as error:  # noqa: BLE001 - the other case still runs
            traceback.print_exc()
            args.done_cases.append({"model": case[0], "reference": case[4], "error": f"{type(error).__name__}: {error}",
                                    "sweeps": 0, "sweeps_compared": 0, "sweeps_identical": 0, "visits_compared": 0,
                                    "decisions_identical": False, "device_cycle_seconds": None, "rows": []})
    return {"cases": args.done_cases}


class _CudaSyncWarnings:
    """CUDA's sync debug mode set to warn, and the warnings counted (CUDA only)."""

    def __enter__(self):
        import torch
        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        import torch
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        syncs = [record for record in self.records if "synchroniz" in str(record.message)]
        self.messages = [str(record.message) for record in syncs]
        self.origins = sorted({f"{Path(record.filename).name}:{record.lineno}" for record in syncs})
        return False


class _Watch:
    def __init__(self, cuda: bool):
        from rso.engines.sync_free import HostReads
        self.reads, self.cuda = HostReads(), _CudaSyncWarnings() if cuda else None

    def __enter__(self):
        if self.cuda:
            self.cuda.__enter__()
        self.reads.__enter__()
        return self

    def __exit__(self, *exc):
        self.reads.__exit__(*exc)
        if self.cuda:
            self.cuda.__exit__(*exc)
        return False


def stage_syncs(args, options) -> dict:
    import torch
    from rso.engines import SyncFreeEngine
    from rso.search.visit import visit_order

    device = _device(args)
    data = _load(args, options["sync_train"]).to(device, torch.float32)
    name, model_options = options["sync_model"]
    model = _build(name, model_options, 0, device, torch.float32)
    rows = []
    for target in visit_order(model)[:4]:
        for graphs in (["off", args.graphs] if device.type == "cuda" and args.graphs != "off" else ["off"]):
            engine = SyncFreeEngine(graphs=graphs, report_every=50)
            engine.stop_after = 120
            engine.watch = _Watch(device.type == "cuda")
            stats = _sweep(model, target, data, engine, target.sigma, options["sync_batch"], torch.Generator().manual_seed(2))
            reads = -(-stats.visits // 50)
            rows.append({"tensor": target.name, "graphs": graphs, "visits": stats.visits, "progress_reads": reads,
                         "host_reads": len(engine.watch.reads.calls), "host_read_kinds": sorted(set(engine.watch.reads.calls)),
                         "cuda_sync_warnings": None if engine.watch.cuda is None else len(engine.watch.cuda.messages),
                         "cuda_sync_origins": None if engine.watch.cuda is None else engine.watch.cuda.origins[:10],
                         "graph_replays": engine.graphs_replayed, "graph_error": engine.graph_error})
    # with graphs, the capture itself synchronizes once per sweep (torch.cuda.graph does): counted apart
    ok = all(row["host_reads"] == row["progress_reads"] and
             (row["graphs"] != "off" or row["cuda_sync_warnings"] in (None, row["progress_reads"])) for row in rows)
    for row in rows:
        if row["graphs"] != "off" and row["cuda_sync_warnings"] is not None:
            row["syncs_beyond_progress_reads"] = row["cuda_sync_warnings"] - row["progress_reads"]
    # the same sweep from the same weights and draws: twice with graphs (or eagerly), once eagerly
    target = visit_order(model)[1]
    start = target.parameter.detach().clone()
    weights = {}
    for run, graphs in (("first", args.graphs), ("second", args.graphs), ("eager", "off")):
        with torch.no_grad():
            target.parameter.copy_(start)
        engine = SyncFreeEngine(graphs=graphs)
        engine.stop_after = 200
        _sweep(model, target, data, engine, target.sigma, options["sync_batch"], torch.Generator().manual_seed(4))
        weights[run] = target.parameter.detach().clone()
    repeat = {"tensor": target.name, "visits": min(200, target.numel),
              "changed_elements": int((weights["first"] != start).sum()),
              "bitwise_repeatable": bool(torch.equal(weights["first"], weights["second"])),
              "graphs_equal_eager": bool(torch.equal(weights["first"], weights["eager"]))}
    return {"model": name, "syncs_only_at_progress_reads": ok, "repeat": repeat, "rows": rows}


def stage_bench(args, options) -> dict:
    import torch
    from rso.engines import SyncFreeEngine
    from rso.search.visit import visit_order

    device = _device(args)
    name, model_options = options["bench_model"]
    batch = options["bench_batch"]
    data = _load(args, options["bench_train"]).to(device, torch.float32)
    model = _build(name, model_options, 0, device, torch.float32)
    generator = torch.Generator().manual_seed(3)
    first, second = options["bench_visits"]
    rows = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for target in visit_order(model):
        timings = []
        for visits in ((first, second) if target.numel > second else (None,)):
            engine = SyncFreeEngine(graphs=args.graphs)
            engine.stop_after = visits
            _sync(device)
            start = time.perf_counter()
            _sweep(model, target, data, engine, target.sigma, batch, generator)
            _sync(device)
            timings.append(time.perf_counter() - start)
        if len(timings) == 2:
            per_visit = (timings[1] - timings[0]) / (second - first)
            setup = max(timings[0] - first * per_visit, 0.0)
            projected, measured = setup + target.numel * per_visit, False
        else:
            per_visit, setup, projected, measured = timings[0] / target.numel, None, timings[0], True
        rows.append({"tensor": target.name, "visits": target.numel, "setup_seconds": setup,
                     "microseconds_per_visit": round(per_visit * 1e6, 1), "sweep_seconds": round(projected, 3),
                     "measured_whole_sweep": measured, "graph_error": engine.graph_error})
        _partial(args, {"model": name, "rows": rows})
    result = {"model": name, "batch": batch, "train_examples": len(data.train_labels), "dtype": "float32",
              "projected_cycle_seconds": round(sum(row["sweep_seconds"] for row in rows), 2), "rows": rows}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return result


def stage_rso_bench(args, options, seconds) -> dict:
    output = Path(args.out) / "rso_bench"
    # one worker: the multi-process fast engine is the distributed issue's (NCCL across ranks on one GPU is not the point)
    command = [sys.executable, "-m", "rso.bench", "--device", args.device, "--models", "paper6", "--workers", "1",
               "--output", str(output)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(seconds - 5, 5),
                              env={**os.environ, "RSO_DATA_DIR": str(args.data_dir)})
        return {"command": " ".join(command[1:]), "returncode": done.returncode, "output_tail": done.stdout[-3000:],
                "stderr_tail": done.stderr[-2000:]}
    except subprocess.TimeoutExpired as error:
        return {"command": " ".join(command[1:]), "returncode": None, "timed_out_after_seconds": seconds,
                "output_tail": (error.stdout or b"")[-3000:].decode(errors="replace") if isinstance(error.stdout, bytes)
                else str(error.stdout or "")[-3000:]}


def stage_paper(args, options, seconds) -> dict:
    """The paper configuration run by ``rso.train``'s Trainer (its ``authors`` preset where it has one) with the
    sync-free engine, evaluated every cycle, until ``seconds`` run out; without tqdm/tensorboard on the machine,
    the same search by a plain loop."""
    try:
        from rso.train import Trainer
    except ImportError as error:
        result = _paper_loop(args, options, seconds)
        result["trainer_unavailable"] = f"{type(error).__name__}: {error}"
        return result
    from dataclasses import fields

    import rso.config
    presets = getattr(rso.config, "PRESETS", {})
    preset = {} if args.quick or "authors" not in presets else {**presets["authors"], "preset": "authors"}
    wanted = {**options["paper_config"], **preset, "engine": "sync-free", "device": args.device, "eval_every": "cycle",
              "max_seconds": max(seconds - 45, 5), "run_dir": str(Path(args.out) / "runs"), "name": "paper",
              "progress": False, "data_dir": str(args.data_dir), "download": False, "threads": args.threads}
    names = {field.name for field in fields(rso.config.TrainConfig)}
    config = rso.config.TrainConfig(**{key: value for key, value in wanted.items() if key in names and value is not None})
    trainer = Trainer(config)
    metrics = trainer.run()
    cycles, previous = [], 0.0
    for entry in metrics.get("history", []):
        cycles.append({"cycle": int(entry.get("cycle", len(cycles))) + 1, "complete": True,
                       "search_seconds": round(entry["seconds"] - previous, 2), "seconds_total": entry["seconds"],
                       "accepted_total": entry.get("accepted"), "train_loss": entry.get("train_loss"),
                       "test_accuracy": entry["test_accuracy"], "test_loss": entry.get("test_loss")})
        previous = entry["seconds"]
    return {"runner": "rso.train.Trainer", "config": {key: value for key, value in config.__dict__.items()},
            "final": {key: value for key, value in metrics.items() if key != "history"}, "cycles": cycles}


def _paper_loop(args, options, seconds) -> dict:
    """The paper configuration with the sync-free engine until ``seconds`` run out; written after every cycle."""
    import torch
    from rso.config import TrainConfig
    from rso.engines import SyncFreeEngine
    from rso.evaluate import evaluate, recalibrate_batchnorm
    from rso.search.candidates import get_sampler
    from rso.search.loop import run_sweep
    from rso.search.schedule import annealed_sigma
    from rso.search.visit import visit_order

    deadline = time.perf_counter() + seconds
    device = _device(args)
    config = TrainConfig()
    name, model_options = options["paper_model"]
    batch, cycles = options["paper_batch"], options["paper_cycles"]
    data = _load(args, options["paper_train"], options["paper_test"]).to(device, torch.float32)
    generator = torch.Generator().manual_seed(config.seed)
    model = _build(name, model_options, config.seed, device, torch.float32)
    targets = visit_order(model, config.order, config.bn_sigma)
    sampler = get_sampler(config.sampler)
    result = {"model": name, "batch": batch, "cycles_planned": cycles, "engine": "sync-free", "dtype": "float32",
              "weight_decay": config.weight_decay, "bn_samples": config.bn_samples, "cycles": []}
    last_cycle = None
    for cycle in range(cycles):
        if last_cycle is not None and time.perf_counter() + last_cycle > deadline:
            break
        start, engine = time.perf_counter(), SyncFreeEngine(graphs=args.graphs)
        accepted = visits = 0
        loss = float("nan")
        complete = True
        for target in targets:
            if time.perf_counter() > deadline:
                complete = False
                break
            sigma = annealed_sigma(target.sigma, cycle, cycles, config.final_sigma_fraction, config.anneal)
            stats = run_sweep(model, target, data.train_images, data.train_labels, engine, sigma=sigma, batch_size=batch,
                              sampler=sampler, generator=generator, weight_decay=config.weight_decay,
                              chunking=config.chunking)
            accepted, visits, loss = accepted + stats.accepted, visits + stats.visits, stats.mean_loss
        _sync(device)
        search_seconds = time.perf_counter() - start
        start = time.perf_counter()
        recalibrate_batchnorm(model, data.train_images[:config.bn_samples])
        accuracy, test_loss = evaluate(model, data.test_images, data.test_labels)
        result["cycles"].append({"cycle": cycle + 1, "complete": complete, "visits": visits, "accepted": accepted,
                                 "search_seconds": round(search_seconds, 2), "last_sweep_loss": loss,
                                 "test_accuracy": accuracy, "test_loss": test_loss,
                                 "eval_seconds": round(time.perf_counter() - start, 2),
                                 "graph_error": engine.graph_error})
        _partial(args, result)
        last_cycle = search_seconds + time.perf_counter() - start
        if not complete:
            break
    return result


# ------------------------------------------------------------------------------------------ orchestration
def run_stage(args) -> int:
    """``--stage NAME``: one stage in this process; its result goes to ``<out>/<stage>.json``."""
    options = _stage_options(args)
    os.environ["RSO_CUDA_GRAPHS"] = args.graphs       # engines built without an explicit setting (the Trainer's)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        if args.stage == "rso-bench":
            result = stage_rso_bench(args, options, args.seconds)
        elif args.stage == "paper":
            result = stage_paper(args, options, args.seconds)
        else:
            result = globals()[f"stage_{args.stage}"](args, options)
        result = {"stage": args.stage, "ok": True, "graphs": args.graphs, "seconds": round(time.perf_counter() - started, 2),
                  **result}
        status = 0
    except Exception as error:  # noqa: BLE001 - reported in the stage's JSON; the orchestrator goes on
        traceback.print_exc()
        result = {"stage": args.stage, "ok": False, "graphs": args.graphs, "error": f"{type(error).__name__}: {error}",
                  "seconds": round(time.perf_counter() - started, 2)}
        status = 1
    (Path(args.out) / f"{args.stage}.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({key: value for key, value in result.items() if key not in ("rows", "cases", "cycles")}, default=str))
    return status


def _summary_lines(results: dict) -> list[str]:
    lines = ["# GPU check", ""]
    environment = results.get("environment", {})
    lines.append(f"- device: {environment.get('device', 'cpu')}, torch {environment.get('torch')}, CUDA "
                 f"{environment.get('cuda')}, cuDNN {environment.get('cudnn')}, git {environment.get('git')}")
    for stage in STAGES:
        result = results.get(stage)
        if result is None:
            lines.append(f"- {stage}: not run")
            continue
        if not result.get("ok"):
            lines.append(f"- {stage}: FAILED ({result.get('error')}) after {result.get('seconds')} s")
            continue
        text = f"- {stage} ({result.get('seconds')} s, graphs {result.get('graphs')})"
        try:
            text += _stage_line(stage, result)
        except (KeyError, TypeError, ValueError) as error:
            text += f": (incomplete result: {error!r})"
        lines.append(text + (f" [{result['note']}]" if result.get("note") else ""))
    return lines


def _stage_line(stage: str, result: dict) -> str:
    """The figures of one stage's result for the summary."""
    if stage == "exactness":
        return ": " + "; ".join(
            f"{case['model']} float64 vs CPU {case['reference']}: {case['sweeps_identical']}/{case['sweeps_compared']} "
            f"sweeps identical ({case['visits_compared']} visits compared of {sum(r['visits'] for r in case['rows'])}), "
            f"device cycle {case['device_cycle_seconds']} s" + (f" (FAILED: {case['error']})" if case.get("error") else "")
            for case in result["cases"])
    if stage == "syncs":
        repeat = result["repeat"]
        return (f": host syncs only at progress reads: {result['syncs_only_at_progress_reads']}; a sweep run twice "
                f"bitwise identical: {repeat['bitwise_repeatable']}, graphs = eager: {repeat['graphs_equal_eager']}")
    if stage == "bench":
        return (f": {result['model']} batch {result['batch']} projected cycle {result['projected_cycle_seconds']} s"
                f", peak {result.get('peak_memory_gib')} GiB")
    if stage == "rso-bench":
        return f": return code {result.get('returncode')}"
    if stage == "paper":
        return ": " + ", ".join(f"cycle {row['cycle']}{'' if row['complete'] else ' (partial)'} "
                                f"{row['search_seconds']} s acc {row['test_accuracy']:.4f}" for row in result["cycles"])
    return ""


def orchestrate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = start + args.minutes * 60
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    results: dict[str, dict] = {}
    log = open(out / "gpu_check.log", "a")

    def say(text: str) -> None:
        line = f"[{time.perf_counter() - start:6.1f} s] {text}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    say(f"gpu-check: device {args.device}, out {out}, data {args.data_dir}, {args.minutes} min, quick {args.quick}")
    for stage in STAGES:
        left = deadline - time.perf_counter()
        if stage == "paper":
            seconds = left - 15
            if seconds < (5 if args.quick else PAPER_MIN_SECONDS):
                say(f"{stage}: skipped, {left:.0f} s left")
                continue
        else:
            seconds = min(budgets[stage], left - (10 if args.quick else PAPER_MIN_SECONDS))
            if budgets[stage] == 0 or seconds < 5 or (stage == "rso-bench" and left < RSO_BENCH_ONLY_ABOVE):
                say(f"{stage}: skipped ({'not in --quick' if budgets[stage] == 0 else f'{left:.0f} s left'})")
                continue
        for graphs in ([args.graphs, "off"] if args.graphs != "off" else ["off"]):
            results[stage] = _run_in_process(args, stage, graphs, seconds, say)
            seconds = min(seconds, deadline - time.perf_counter() - (15 if stage == "paper" else PAPER_MIN_SECONDS))
            if results[stage].get("ok") or graphs == "off" or seconds < 20:
                break
            say(f"{stage}: again with --graphs off")
        (out / "summary.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "summary.md").write_text("\n".join(_summary_lines(results)) + "\n")
    say(f"done in {time.perf_counter() - start:.0f} s; summary in {out / 'summary.md'}")
    log.close()
    print("\n".join(_summary_lines(results)))
    return 0 if all(result.get("ok") for result in results.values()) else 1


def _run_in_process(args, stage: str, graphs: str, seconds: float, say) -> dict:
    """Run one stage in a fresh process, killed at its time limit; its result, or what it had when killed."""
    out = Path(args.out)
    command = [sys.executable, "-m", "rso.gpu_check", "--stage", stage, "--out", str(out), "--device", args.device,
               "--data-dir", str(args.data_dir), "--graphs", graphs, "--seconds", str(int(seconds))]
    command += (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])
    path, partial = out / f"{stage}.json", out / f"{stage}.partial.json"
    path.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    say(f"{stage}: start (graphs {graphs}, at most {seconds:.0f} s)")
    status = None
    with open(out / f"{stage}.log", "a") as stage_log:
        try:
            status = subprocess.run(command, stdout=stage_log, stderr=subprocess.STDOUT,
                                    timeout=seconds + (30 if stage == "paper" else 15)).returncode
        except subprocess.TimeoutExpired:
            say(f"{stage}: killed at its time limit")
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        try:
            result = {**json.loads(partial.read_text()), "stage": stage, "ok": True, "graphs": graphs,
                      "note": f"stopped at its time limit (exit status {status}); the results up to then"}
        except (OSError, ValueError):
            result = {"stage": stage, "ok": False, "graphs": graphs,
                      "error": f"no result (exit status {status}); see {stage}.log"}
    say(f"{stage}: {'ok' if result.get('ok') else 'FAILED: ' + str(result.get('error'))}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rso.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--out", default=os.environ.get("OUT") or "results/gpu", help="output folder ($OUT, else results/gpu)")
    parser.add_argument("--data-dir", default=os.environ.get("RSO_DATA_DIR") or "data",
                        help="folder holding MNIST/raw ($RSO_DATA_DIR, else ./data); never downloads")
    parser.add_argument("--minutes", type=float, default=7.5, help="time for all stages (7.5)")
    parser.add_argument("--quick", action="store_true", help="tiny nets and slices: a smoke test of every stage")
    parser.add_argument("--graphs", default="auto", choices=["auto", "on", "off"], help="CUDA graphs (auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --quick)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.threads is None:
        args.threads = 1
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    if args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        parser.error(f"no MNIST in {args.data_dir}/MNIST/raw (set RSO_DATA_DIR or --data-dir; make gpu-data copies it "
                     "into ./data)")
    if args.stage:
        return run_stage(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
