"""Record a finished training run into ``results/``: its config, meta, log and final metrics, plus an
independent re-evaluation of its checkpoint, so the README quotes files a command produced. Or copy an
experiment's output folder (one with ``provenance.json``, e.g. written with ``--out /tmp/...``) into
``results/``, keeping its provenance.

    python -m experiments.record_run runs/mnist-rso results/mnist_rso
    python -m experiments.record_run /tmp/compare10 results/compare

Either way the destination gets ``recorded.json``: where it was copied from, when, by which command at which
code, and, for a run, every session that trained it (its start and each resume, from the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from rso.checkpoint import CheckpointError, input_transform_of, load_checkpoint
from rso.data import DataError, load_mnist
from rso.evaluate import evaluate_checkpoint
from rso.provenance import start_record
from rso.train import exit_status

COPIED = ("config.json", "meta.json", "log.txt", "final.json")
RECORD = "recorded.json"


def copy_record(source: Path, out: Path, argv: list[str] | None, sessions: list[dict] | None = None) -> dict:
    """Write ``out/recorded.json``: this copy appended to the copies already recorded at the source."""
    earlier = json.loads((source / RECORD).read_text()).get("copies", []) if (source / RECORD).is_file() else []
    now = start_record(" ".join(["python -m experiments.record_run", *(sys.argv[1:] if argv is None else argv)]))
    copy = {"from": str(source.resolve()), "at": now["started"], "command": now["command"], "code": now["code"],
            "host": now["machine"].get("host")}
    record = {"copies": [*earlier, copy]}
    if sessions is not None:
        record["sessions"] = [{key: session.get(key) for key in ("started", "command", "code", "changed", "at_step")}
                              for session in sessions]
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def copy_results(source: Path, out: Path, argv: list[str] | None = None) -> dict:
    """Copy an experiment's output folder (CSV, PNG, Markdown, provenance.json) into ``out``."""
    if not (source / "provenance.json").is_file():
        raise FileNotFoundError(f"{source}: no provenance.json (not an experiment's output folder)")
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != RECORD:
            shutil.copy(path, out / path.name)
    return copy_record(source, out, argv)


def record(run: Path, out: Path, data_dir: str | None = None, argv: list[str] | None = None) -> dict:
    missing = [name for name in COPIED if not (run / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{run}: not a finished run (missing {', '.join(missing)})")
    state = load_checkpoint(run)
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copy(run / name, out / name)
    copy_record(run, out, argv, sessions=state.get("provenance") or [])
    result = evaluate_checkpoint(state, load_mnist(data_dir, transform=input_transform_of(state)))
    final = json.loads((run / "final.json").read_text())
    accuracy = result["test_accuracy"]
    check = {"checkpoint": str(run / "checkpoint.pt"), "independent_test_accuracy": accuracy,
             "independent_test_loss": result["test_loss"], "reported_test_accuracy": final["test_accuracy"],
             "agree": abs(accuracy - final["test_accuracy"]) < 1e-9, "test_examples": result["test_examples"]}
    (out / "independent_evaluation.json").write_text(json.dumps(check, indent=2) + "\n")
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.record_run", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("run", type=Path, help="the run folder (runs/<name>) or an experiment's output folder")
    parser.add_argument("out", type=Path, help="where to record it (results/<name>)")
    parser.add_argument("--data-dir", help="folder holding MNIST/raw (default $RSO_DATA_DIR, else ./data)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        if (args.run / "provenance.json").is_file() and not (args.run / "checkpoint.pt").is_file():
            copied = copy_results(args.run, args.out, argv)
            print(f"copied {args.run} to {args.out}; {args.out / RECORD}: {json.dumps(copied['copies'][-1])}")
            return 0
        check = record(args.run, args.out, args.data_dir, argv)
    except (FileNotFoundError, CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(check, indent=2))
    return 0 if check["agree"] else 1


if __name__ == "__main__":
    sys.exit(exit_status(main))
