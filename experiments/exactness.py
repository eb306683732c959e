"""How exactly the fast engine agrees with the reference: the worst relative loss difference in float64, and
how many accept decisions differ in float32 over a full cycle (the figures the README quotes).

    python -m experiments.exactness                    # oneconv, batch 100 on the first 2000 images, 1 cycle
    python -m experiments.exactness --quick            # a small net on data slices (seconds; the tests run it)

Both engines run in lockstep over one full cycle: for every visit both score the same three candidates on the
same chunk; the reference's choice is kept (so the two never drift apart), and a visit where the fast
engine's losses would have chosen another candidate counts as a differing decision. The run of decisions is
the trainer's (``rso.search.loop.draw_sweep``: the shuffle, the chunk of each visit, every step), seeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from experiments import common
from rso.data import load_mnist
from rso.engines import FastEngine, ReferenceEngine
from rso.models import build_model
from rso.search.candidates import candidate_values, gaussian_steps, select_candidate
from rso.search.loop import draw_sweep
from rso.search.schedule import annealed_sigma
from rso.search.visit import visit_order


@dataclass
class Agreement:
    """Fast vs reference over one lockstep cycle."""

    dtype: str
    visits: int = 0
    differing_decisions: int = 0
    worst_relative_difference: float = 0.0
    worst_tensor: str = ""
    per_tensor: dict = field(default_factory=dict)   # name -> [visits, differing decisions, worst relative]


def lockstep_cycle(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0,
                   fast: FastEngine | None = None, weight_decay: float = 0.0, cycles: int = 1,
                   visits_per_tensor: int | None = None) -> Agreement:
    """Score every visit of one cycle (cycle 0 of ``cycles``: its sigma) with both engines; follow the reference."""
    dtype = next(model.parameters()).dtype
    images = images.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    result = Agreement(str(dtype).removeprefix("torch."))
    reference = ReferenceEngine()
    fast = fast or FastEngine()
    for target in visit_order(model):
        sigma = annealed_sigma(target.sigma, 0, cycles)
        partition, chunks, steps = draw_sweep(target, len(labels), batch_size, sigma, gaussian_steps, generator)
        reference.begin_sweep(model, target, images, labels, partition)
        fast.begin_sweep(model, target, images, labels, partition)
        flat = target.parameter.data.view(-1)
        count = target.numel if visits_per_tensor is None else min(visits_per_tensor, target.numel)
        differing, worst = 0, 0.0
        try:
            for index in range(count):
                chunk = int(chunks[index])
                current = flat[index].item()
                values = candidate_values(current, float(steps[index]), weight_decay).to(dtype).to(torch.float64)
                expected = reference.score(index, values, chunk)
                got = fast.score(index, values, chunk)
                worst = max(worst, float(((got - expected).abs() / expected.abs()).max()))
                choice = select_candidate(expected)
                differing += select_candidate(got) != choice
                chosen = values[choice].item()
                if chosen != current:
                    flat[index] = chosen
                    reference.commit(index, chosen, chunk)
                    fast.commit(index, chosen, chunk)
        finally:
            fast.end_sweep()
            reference.end_sweep()
        result.per_tensor[target.name] = [count, differing, worst]
        result.visits += count
        result.differing_decisions += differing
        if worst >= result.worst_relative_difference:
            result.worst_relative_difference, result.worst_tensor = worst, target.name
    return result


def measure(model_name: str, data, batch_size: int, dtype: torch.dtype, seed: int, **options) -> Agreement:
    model = build_model(model_name, torch.Generator().manual_seed(seed), **options).to(dtype)
    return lockstep_cycle(model, data.train_images, data.train_labels, batch_size, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.exactness", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="a small convnet on 512 images (seconds)")
    parser.add_argument("--model", default="oneconv", help="model (default oneconv, the default run's)")
    parser.add_argument("--batch", type=int, default=100, help="mini-batch (default 100)")
    parser.add_argument("--train-subset", type=int, default=2000, help="first N training images (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default="results/exactness", help="output folder (default results/exactness)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start_record = common.start_provenance("exactness", argv)
    if args.quick:
        args.model, args.batch, args.train_subset = "convnet", 64, 512
    options = dict(depth=2, channels=3) if args.quick else {}
    data = load_mnist(None, args.train_subset, 10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dtype in (torch.float64, torch.float32):
        started = time.perf_counter()
        found = measure(args.model, data, args.batch, dtype, args.seed, **options)
        rows.append({**{k: v for k, v in asdict(found).items() if k != "per_tensor"}, "model": args.model,
                     "batch_size": args.batch, "train_examples": len(data.train_labels), "seed": args.seed,
                     "seconds": round(time.perf_counter() - started, 1), "code": start_record["code"]})
        print(f"{args.model} {found.dtype}: {found.differing_decisions} of {found.visits} decisions differ; "
              f"worst relative loss difference {found.worst_relative_difference:.2g} ({found.worst_tensor})",
              flush=True)
        (out / f"per_tensor_{found.dtype}.json").write_text(json.dumps(found.per_tensor, indent=1) + "\n")
    common.write_csv(out / "agreement.csv", rows)
    body = [[row["dtype"], f"{row['differing_decisions']} of {row['visits']}", f"{row['worst_relative_difference']:.2g}",
             row["worst_tensor"], row["code"]] for row in rows]
    summary = (f"Fast vs reference engine in lockstep over one full cycle of `{args.model}`, batch {args.batch}, "
               f"first {len(data.train_labels)} training images, seed {args.seed}:\n\n"
               + common.markdown_table(["dtype", "differing accept decisions", "worst relative loss difference",
                                        "in tensor", "code"], body))
    record = common.provenance(argparse.Namespace(experiment="exactness", engine="fast vs reference"), argv,
                               f"{args.model}, batch {args.batch}, one lockstep cycle in float64 and float32",
                               start=start_record)
    common.write_outputs(out, "Fast engine vs reference: agreement", record, summary)
    return 0


if __name__ == "__main__":
    from rso.train import exit_status

    sys.exit(exit_status(main))
