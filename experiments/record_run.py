"""Record a finished training run into ``results/``: its config, meta, log and final metrics, plus an
independent re-evaluation of its checkpoint, so the README quotes files a command produced.

    python -m experiments.record_run runs/mnist-rso results/mnist_rso
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
from rso.train import exit_status

COPIED = ("config.json", "meta.json", "log.txt", "final.json")


def record(run: Path, out: Path, data_dir: str | None = None) -> dict:
    missing = [name for name in COPIED if not (run / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{run}: not a finished run (missing {', '.join(missing)})")
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copy(run / name, out / name)
    state = load_checkpoint(run)
    result = evaluate_checkpoint(state, load_mnist(data_dir, transform=input_transform_of(state)))
    final = json.loads((run / "final.json").read_text())
    accuracy = result["test_accuracy"]
    check = {"checkpoint": str(run / "checkpoint.pt"), "independent_test_accuracy": accuracy,
             "independent_test_loss": result["test_loss"], "reported_test_accuracy": final["test_accuracy"],
             "agree": abs(accuracy - final["test_accuracy"]) < 1e-9, "test_examples": result["test_examples"]}
    (out / "independent_evaluation.json").write_text(json.dumps(check, indent=2) + "\n")
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.record_run", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder (runs/<name>)")
    parser.add_argument("out", type=Path, help="where to record it (results/<name>)")
    parser.add_argument("--data-dir", help="folder holding MNIST/raw (default $RSO_DATA_DIR, else ./data)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        check = record(args.run, args.out, args.data_dir)
    except (FileNotFoundError, CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(check, indent=2))
    return 0 if check["agree"] else 1


if __name__ == "__main__":
    sys.exit(exit_status(main))
