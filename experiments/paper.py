"""The authors' MNIST configuration (paper6, batch 5000, annealed over 50 cycles, weight decay 1e-4, BN below the
searched layer fixed from 2000 images, centered inputs: ``rso.config.PRESETS["authors"]``), resumable, with the
test accuracy after every cycle, so the "98% after 5 cycles" claim can be checked.

    python -m experiments.paper                        # start, or continue, runs/experiments/paper/paper6-authors-batch5000-seed0
    python -m experiments.paper --max-minutes 60       # stop after 60 minutes of training (summed over resumes)
    python -m experiments.paper --harvest              # no training: write the results of what the run has reached
    python -m experiments.paper --harvest --save-run   # ... and keep its checkpoint in results/paper/run/ (committed)
    python -m experiments.paper --quick                # a tiny net of the authors' pattern on data slices, interrupted and resumed

Re-running the command continues from the last checkpoint (saved after every layer sweep), or, on a machine
without the run folder, from the copy in ``results/paper/run/`` that ``--save-run`` keeps; ``--cycles`` and
``--max-minutes`` may change between sessions. The annealing schedule depends on ``--cycles``, so the
faithful setting keeps the paper's 50 even when fewer cycles can run; the table says how many ran.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

from experiments import common
from rso.checkpoint import load_checkpoint
from rso.config import PRESETS, TrainConfig
from rso.evaluate import evaluate_checkpoint as evaluate_saved_weights
from rso.models import build_model, count_weights
from rso.search.visit import visit_order
from rso.provenance import UNRECORDED
from rso.train import exit_status, run_code, train
from rso.train import main as train_main

PAPER_CLAIMS = "paper: 98% after 5 cycles; 99.12% after 50 cycles (SGD 99.27% after 50 epochs)"


def paper_config(args) -> tuple[TrainConfig, dict]:
    """The config and the resumable overrides (what a continued run takes from this invocation)."""
    authors = {**PRESETS["authors"], "preset": "authors"}
    if args.weight_decay is not None:
        authors["weight_decay"] = args.weight_decay
    if args.quick:
        config = TrainConfig(**{**authors, "model": "authors-convnet", "depth": 2, "channels": 2, "batch_size": 200,
                                "cycles": args.cycles or 2, "train_subset": args.train_subset or 1000,
                                "test_subset": args.test_subset or 500, "bn_samples": 1000, "search_bn_images": 500})
    else:
        config = TrainConfig(**{**authors, "cycles": args.cycles or authors["cycles"],
                                "train_subset": args.train_subset, "test_subset": args.test_subset})
    name = args.name or f"{config.model}-authors-batch{config.batch_size}-seed{args.seed}"
    overrides = dict(cycles=config.cycles, max_seconds=args.max_minutes * 60 if args.max_minutes else None,
                     eval_every=args.eval_every, engine=args.engine, threads=args.threads, progress=args.progress,
                     name=name, run_dir=args.run_dir, resume_if_exists=True)
    config = TrainConfig(**{**config.to_dict(), "seed": args.seed, "widths": tuple(config.widths), **overrides})
    given = {key: value for key, value in overrides.items() if value is not None}
    return config, given


def code_between(sessions: list[dict], low: int, high: int) -> str | None:
    """The code of the sessions that trained visits ``low..high`` (each session from its ``at_step`` to the
    next one's), ``unrecorded`` first when visits before the first recorded session count; ``None`` when the
    checkpoint records no sessions."""
    if not sessions:
        return None
    starts = [session.get("at_step", 0) for session in sessions]
    codes = [UNRECORDED] if low < starts[0] else []
    for position, session in enumerate(sessions):
        end = starts[position + 1] if position + 1 < len(sessions) else float("inf")
        if starts[position] < high and end > low:
            codes.append(session.get("code", UNRECORDED))
    return "+".join(dict.fromkeys(codes)) or UNRECORDED


def per_cycle_rows(history: list[dict], weights: int, sessions: list[dict] | None = None) -> list[dict]:
    """The evaluation at the end of each cycle, and the latest one if a cycle is in progress; ``code`` names
    the code of every session that trained the visits since the row before (from the checkpoint's sessions)."""
    rows = []
    for entry in history:
        cycles = entry["step"] / weights
        complete = abs(cycles - round(cycles)) < 1e-9
        rows.append({"cycle": round(cycles, 3), "complete_cycle": complete, "weight_visits": entry["step"],
                     "forward_samples": entry["forward_samples"], "seconds": entry["seconds"],
                     "accepted": entry["accepted"], "train_loss": round(entry["train_loss"], 6),
                     "test_accuracy": entry["test_accuracy"], "test_loss": round(entry["test_loss"], 6),
                     "last_sweep": entry.get("target", ""), "code": entry.get("code", UNRECORDED)})
    ends = [row for row in rows if row["complete_cycle"]]
    if rows and not rows[-1]["complete_cycle"]:
        ends.append(rows[-1])
    low = 0
    for row in ends:
        row["code"] = code_between(sessions or [], low, row["weight_visits"]) or row["code"]
        low = row["weight_visits"]
    return ends


def evaluate_checkpoint(state: dict, config: TrainConfig) -> dict | None:
    """A history entry for the checkpoint's weights when the run stopped between evaluations (else None).

    The run saves after every layer sweep but evaluates after every cycle, so a harvest in mid-cycle evaluates
    the saved weights itself, the same way (BN statistics from ``bn_samples`` training examples, then the test set).
    """
    progress = state["progress"]
    history = progress["history"]
    inside = state.get("sweep") or {}          # a checkpoint saved inside a sweep: its weights include those visits
    in_sweep = int(inside.get("visit", 0))
    if progress["visits"] + in_sweep == 0 or (history and history[-1]["step"] == progress["visits"] and not in_sweep):
        return None
    data = common.mnist(config.train_subset, config.test_subset, config.resolved_input_transform())
    # a checkpoint saved between evaluations has stale BN statistics: rso.evaluate recomputes them
    result = evaluate_saved_weights({**state, "bn_statistics_step": None}, data, config.bn_samples)
    accuracy, test_loss = result["test_accuracy"], result["test_loss"]
    targets = visit_order(build_model(config.model, None, **config.model_options()))
    partial = (f" and {in_sweep} of {targets[progress['target_index']].numel} visits of the next "
               f"({targets[progress['target_index']].name})" if in_sweep else "")
    return {"step": progress["visits"] + in_sweep,
            "seconds": round(progress["seconds"] + float(inside.get("seconds", 0.0)), 3),
            "forward_samples": progress["forward_samples"] + in_sweep * 3 * config.batch_size,
            "accepted": progress["accepted"] + int(inside.get("accepted", 0)),
            "train_loss": float("nan"), "test_accuracy": accuracy, "test_loss": test_loss,
            "target": f"{progress['target_index']} of {len(targets)} layer sweeps of cycle "
                      f"{progress['cycle'] + 1} done{partial}; checkpoint evaluated at harvest"}


def sessions_text(state: dict) -> str:
    """The training sessions a checkpoint records (its start and every resume): when, at which code, from which visit."""
    sessions = state.get("provenance") or []
    if not sessions:
        return "the checkpoint records no training sessions (written before provenance was recorded; the run's meta.json names the commits of its start and resumes)"
    return "trained in " + ", ".join(f"{session.get('started', '?')} at {session.get('code', UNRECORDED)} "
                                     f"from visit {session.get('at_step', 0)}" for session in sessions)


def report(out: Path, config: TrainConfig, state: dict, record_args, argv, status: str) -> list[dict]:
    record_args.engine = config.engine  # the engine the run was trained with, not this invocation's default
    progress = state["progress"]
    weights = count_weights(build_model(config.model, None, **config.model_options()))
    history = list(progress["history"])
    extra = evaluate_checkpoint(state, config)
    if extra is not None:
        history.append({**extra, "code": run_code(state.get("provenance") or [])})
    rows = per_cycle_rows(history, weights, state.get("provenance") or [])
    common.write_csv(out / "per_cycle.csv", rows)
    common.write_csv(out / "history.csv", [{"weight_visits": e["step"], "cycles": round(e["step"] / weights, 4), **e}
                                           for e in history])
    complete = sum(row["complete_cycle"] for row in rows)
    what = (f"{config.model}, batch {config.batch_size}, annealing schedule over {config.cycles} cycles, seed {config.seed}, "
            f"weight decay {config.weight_decay:g}, inputs {config.resolved_input_transform()}, BN during the search "
            f"{config.search_bn}" + (f" ({config.search_bn_images} images)" if config.search_bn == "fixed-below" else "")
            + f"; {complete} complete cycle(s) ran "
            f"({progress['visits']} weight visits, {progress['seconds']:.0f} s of training); {status}; "
            f"{common.data_description(config, record_args)}")
    what += "; " + sessions_text(state)
    record = common.provenance(record_args, argv, what, row_codes=[row["code"] for row in rows])
    record["sessions"] = [{key: session.get(key) for key in ("started", "command", "code", "at_step", "changed")}
                          for session in state.get("provenance") or []]
    body = [[f"{row['cycle']:.0f}" if row["complete_cycle"] else f"{row['cycle']:.3f} (in progress)",
             f"{row['test_accuracy']:.4f}", f"{row['test_loss']:.4f}",
             "–" if math.isnan(row["train_loss"]) else f"{row['train_loss']:.4f}", row["weight_visits"],
             f"{float(row['forward_samples']):.3g}", f"{row['seconds']:.0f}", row["code"]] for row in rows]
    partial = "" if not rows or rows[-1]["complete_cycle"] else (
        f" The last row is a cycle in progress ({rows[-1]['last_sweep']}; {progress['visits']} of "
        f"{(complete + 1) * weights} weight visits).")
    summary = (f"{complete} complete cycle(s) of {config.cycles} planned ran ({status}).{partial} {PAPER_CLAIMS}.\n\n"
               + common.markdown_table(["cycle", "test accuracy", "test loss", "train loss (mini-batch)",
                                        "weight visits", "forward samples", "training seconds", "code"], body)
               + "\nTest accuracy after each cycle uses BN statistics recomputed on "
               f"{config.bn_samples} training examples.\n")
    if history:
        plt = common.pyplot()
        figure, axis = plt.subplots(figsize=(6, 3.6))
        axis.plot([e["step"] / weights for e in history], [e["test_accuracy"] for e in history], marker="o",
                  color=common.COLORS["rso"], label=f"RSO {config.model}, batch {config.batch_size}")
        axis.axhline(0.98, color="gray", linestyle="--", linewidth=0.8, label="paper: 98% after 5 cycles")
        axis.set_xlabel("cycles")
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        axis.set_title("The paper's configuration: test accuracy per cycle", fontsize=10)
        common.footer(figure, record)
        common.save(figure, out / "accuracy_per_cycle.png")
        summary += "\n![accuracy per cycle](accuracy_per_cycle.png)\n"
    common.write_outputs(out, f"The authors' configuration: {config.model}, batch {config.batch_size}", record, summary)
    return rows


SAVED_RUN = "run"
SAVED_FILES = ("checkpoint.pt", "config.json", "meta.json", "log.txt")


def save_run(folder: Path, saved: Path) -> None:
    """Copy what resumes the run (and says how it got there) next to its results."""
    saved.mkdir(parents=True, exist_ok=True)
    for name in SAVED_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, saved / name)
    print(f"saved the run's checkpoint and records in {saved}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("paper", " ".join(__doc__.split("\n\n")[0].split()), default_seeds=1)
    parser.add_argument("--cycles", type=int, default=None, help="cycles (default 50, the paper's; sets the annealing)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this much training (summed over resumes)")
    parser.add_argument("--eval-every", choices=["sweep", "cycle"], default="cycle",
                        help="evaluate after every cycle (default) or every layer sweep")
    parser.add_argument("--weight-decay", type=float, default=None, help="RSO weight decay (default 1e-4, the authors' code)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="run name under --run-dir (default <model>-batch<b>-seed<s>)")
    parser.add_argument("--harvest", action="store_true", help="do not train: report what the run's checkpoint holds")
    parser.add_argument("--save-run", action="store_true",
                        help=f"also copy the run's checkpoint, config, meta and log into <out>/{SAVED_RUN}/ (small: "
                             "about 100 KB for paper6), from where a later session on another machine continues it")
    parser.add_argument("--fresh", action="store_true", help=f"never continue from <out>/{SAVED_RUN}/")
    parser.add_argument("--workers", type=int, default=1,
                        help="score every chunk in N local processes (rso.train --workers N; same decisions in "
                             "float64): the fastest exact CPU setup is one worker per core")
    args = parser.parse_args(argv)
    out = common.prepare(args)
    config, given = paper_config(args)
    checkpoint = Path(config.run_dir) / config.name / "checkpoint.pt"
    if args.harvest:
        if not checkpoint.is_file():
            raise SystemExit(f"no checkpoint at {checkpoint}: nothing to harvest")
        state = load_checkpoint(checkpoint)
        saved = TrainConfig.from_dict(state["config"])
        done = state["progress"]["cycle"]
        report(out, saved, state, args, argv, f"harvested from {checkpoint} with {done} cycle(s) done")
        if args.save_run:
            save_run(checkpoint.parent, out / SAVED_RUN)
        return 0
    saved_run = out / SAVED_RUN
    if not checkpoint.is_file() and (saved_run / "checkpoint.pt").is_file() and not args.fresh:
        # a run longer than a session (and a machine) goes on from the copy committed with its results
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        for path in saved_run.iterdir():
            shutil.copy2(path, checkpoint.parent / path.name)
        print(f"seeded {checkpoint.parent} from {saved_run} (the run's committed checkpoint)", flush=True)
    print(f"{'continuing' if checkpoint.is_file() else 'starting'} {checkpoint.parent}", flush=True)
    if args.workers > 1:
        code = train_main(worker_flags(config, args.workers))
        if not checkpoint.is_file():
            return code
        state = load_checkpoint(checkpoint)
        saved = TrainConfig.from_dict(state["config"])
        status = (f"{args.workers} workers; " + ("ended (planned cycles or budget)" if code == 0 else
                                                 f"stopped with exit status {code}; the checkpoint continues it"))
    else:
        data = common.mnist(config.train_subset, config.test_subset, config.resolved_input_transform())
        metrics = train(config, given=given, data=data)
        state = load_checkpoint(checkpoint)
        saved = TrainConfig.from_dict(state["config"])
        status = (f"stopped: {metrics['stopped_by']}" if metrics.get("stopped_by") else "finished the planned cycles"
                  ) + f"; final test accuracy {metrics['test_accuracy']:.4f} with BN statistics over the whole training set"
        code = 0
    report(out, saved, state, args, argv, status)
    if args.save_run:
        save_run(checkpoint.parent, out / SAVED_RUN)
    return code


def worker_flags(config: TrainConfig, workers: int) -> list[str]:
    """``python -m rso.train`` flags for this experiment's run with ``workers`` processes: every field this
    experiment sets (the preset's, and --quick's slices), so the launcher's workers build the same config."""
    flags = ["--preset", "authors", "--model", config.model, "--depth", str(config.depth), "--channels",
             str(config.channels), "--batch-size", str(config.batch_size), "--cycles", str(config.cycles),
             "--weight-decay", repr(config.weight_decay), "--bn-samples", str(config.bn_samples),
             "--search-bn", config.search_bn, "--search-bn-images", str(config.search_bn_images),
             "--seed", str(config.seed), "--eval-every", config.eval_every, "--engine", config.engine,
             "--run-dir", str(config.run_dir), "--name", config.name, "--resume-if-exists", "--workers", str(workers)]
    for flag, value in (("--train-subset", config.train_subset), ("--test-subset", config.test_subset),
                        ("--max-seconds", config.max_seconds), ("--threads", config.threads)):
        if value is not None:
            flags += [flag, str(value)]
    if not config.progress:
        flags.append("--no-progress")
    return flags


if __name__ == "__main__":
    sys.exit(exit_status(main))
