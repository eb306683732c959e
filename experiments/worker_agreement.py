"""Do 1 and N workers take the same decisions? One RSO cycle of a model at the engine level, with every visit's
choice recorded, once in one process and once in N gloo workers; prints how many decisions differ.

    python -m experiments.worker_agreement --model paper6 --batch-size 1000 --train-subset 4000 --dtype float32

In float64 the answer is none (``tests/test_distributed.py`` holds it to that); in float32 the chunk's BN
statistics and loss sums are added in another order, and a near-tie between candidates can go the other way.
After the first differing decision the weights differ, so later decisions are not comparable one to one: both
the first differing visit and the total are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from rso import distributed
from rso.data import load_mnist
from rso.engines import make_engine
from rso.models import build_model
from rso.search.candidates import gaussian_steps, select_candidate
from rso.search.loop import run_sweep
from rso.search.visit import visit_order


def cycle_choices(spec: dict, world=distributed.LOCAL) -> list[int]:
    """Every visit's chosen candidate over one cycle (output layer first), as the search loop chooses."""
    data = load_mnist(os.environ.get("RSO_DATA_DIR"), train_subset=spec["train_subset"], test_subset=1,
                      download=False)
    dtype = getattr(torch, spec["dtype"])
    images, labels = data.train_images.to(dtype), data.train_labels
    model = build_model(spec["model"], torch.Generator().manual_seed(spec["seed"]), depth=spec["depth"],
                        channels=spec["channels"]).to(dtype)
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    choices: list[int] = []
    for target in visit_order(model):
        engine = make_engine(spec["engine"], model, world=world if world.size > 1 else None)
        score = engine.score

        def recording_score(index, values, chunk, score=score):
            losses = score(index, values, chunk)
            choices.append(select_candidate(losses))
            return losses

        engine.score = recording_score
        engine.run_sweep = None   # the per-visit loop for every tensor, so every choice is recorded
        run_sweep(model, target, images, labels, engine, sigma=target.sigma, batch_size=spec["batch_size"],
                  sampler=gaussian_steps, generator=generator)
    return choices


def _worker(spec: dict, output: str) -> int:
    world = distributed.init_world(torch.device("cpu")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 \
        else distributed.LOCAL
    try:
        distributed.set_threads(1)
        choices = cycle_choices(spec, world)
        if world.is_main:
            Path(output).write_text(json.dumps(choices))
    finally:
        distributed.close_world(world)
    return 0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.worker_agreement", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", default="paper6")
    parser.add_argument("--engine", default="fast")
    parser.add_argument("--depth", type=int, default=6, help="convnet: conv layers (6)")
    parser.add_argument("--channels", type=int, default=16, help="convnet: channels (16)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--train-subset", type=int, default=4000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec = {"model": args.model, "engine": args.engine, "depth": args.depth, "channels": args.channels, "batch_size": args.batch_size,
            "train_subset": args.train_subset, "dtype": args.dtype, "seed": args.seed}
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for workers in (1, args.workers):
            output = Path(folder) / f"{workers}.json"
            if distributed.launch(workers, _worker, (spec, str(output))) != 0:
                raise SystemExit(f"error: the {workers}-worker cycle failed")
            runs[workers] = json.loads(output.read_text())
    one, many = runs[1], runs[args.workers]
    differing = [index for index, (a, b) in enumerate(zip(one, many)) if a != b]
    first = differing[0] if differing else None
    result = {**spec, "workers": args.workers, "visits": len(one), "differing": len(differing), "first": first,
              "accepted_1": sum(choice != 0 for choice in one),
              f"accepted_{args.workers}": sum(choice != 0 for choice in many)}
    print(f"{args.model} batch {args.batch_size} {args.dtype}, {args.engine} engine, one cycle of {len(one)} visits: "
          f"{len(differing)} decisions differ between 1 and {args.workers} workers"
          + (f" (the first at visit {first})" if differing else ""))
    return result


if __name__ == "__main__":
    main()
