"""Test accuracy, with BN statistics recomputed over training data first.

During the RSO search BN normalizes with each chunk's own statistics and its running statistics are never
updated, so before measuring test accuracy the running statistics are recomputed from the current weights
(a cumulative average over training batches, as torch.optim.swa_utils.update_bn does) and the model is
evaluated in eval mode. ``python -m rso.evaluate RUN`` re-evaluates a saved checkpoint independently.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from rso.search.visit import BATCHNORMS


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 2000) -> None:
    """Recompute every BN layer's running mean/var as the average over ``images`` in batches."""
    norms = [module for module in model.modules() if isinstance(module, BATCHNORMS)]
    if not norms:
        return
    saved = [(module, module.momentum, module.training, module.track_running_stats) for module in norms]
    try:
        for module in norms:
            module.reset_running_stats()
            module.momentum = None  # cumulative moving average: every batch weighs the same
            module.track_running_stats = True
            module.train()
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    finally:
        for module, momentum, training, track in saved:
            module.momentum = momentum
            module.track_running_stats = track
            module.train(training)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 2000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    try:
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size])
            target = labels[start:start + batch_size]
            correct += int((logits.argmax(dim=1) == target).sum())
            loss += float(torch.nn.functional.cross_entropy(logits.double(), target, reduction="sum"))
    finally:
        model.train(was_training)
    return correct / len(labels), loss / len(labels)


def bn_statistics_current(state: dict) -> bool:
    """Whether a checkpoint's BN running statistics were computed from the weights it holds.

    Training saves after every layer sweep but recomputes BN statistics only when it evaluates, so a
    checkpoint saved between evaluations carries statistics of earlier weights.
    """
    progress = state.get("progress") or {}
    return state.get("bn_statistics_step") == progress.get("visits")


def evaluate_checkpoint(state: dict, data, bn_samples: int | None = None) -> dict:
    """Test accuracy and loss of a checkpoint's model, as the run measures it.

    Where the checkpoint's BN statistics are stale (see :func:`bn_statistics_current`) they are recomputed
    first, from the first ``bn_samples`` training examples (all of them when None).
    """
    from rso.checkpoint import input_transform_of, model_from_checkpoint

    expected = input_transform_of(state)
    if getattr(data, "transform", "standardize") != expected:
        raise ValueError(f"the checkpoint's model takes inputs transformed by {expected!r}, but the data was "
                         f"loaded with {data.transform!r}")
    model = model_from_checkpoint(state)
    dtype = next(model.parameters()).dtype
    has_batchnorm = any(isinstance(module, BATCHNORMS) for module in model.modules())
    recomputed = has_batchnorm and not bn_statistics_current(state)
    if recomputed:
        recalibrate_batchnorm(model, data.train_images[:bn_samples].to(dtype))
    accuracy, loss = evaluate(model, data.test_images.to(dtype), data.test_labels)
    return {"test_accuracy": accuracy, "test_loss": loss, "test_examples": len(data.test_labels),
            "bn_statistics_recomputed_from": (min(bn_samples or len(data.train_labels), len(data.train_labels))
                                              if recomputed else None)}


def main(argv: list[str] | None = None) -> int:
    from rso.checkpoint import CheckpointError, input_transform_of, load_checkpoint
    from rso.data import DataError, load_mnist

    parser = argparse.ArgumentParser(prog="python -m rso.evaluate",
                                     description="Evaluate a saved checkpoint on the MNIST test set, independently of training.")
    parser.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    parser.add_argument("--data-dir", help="folder holding MNIST/raw (default $RSO_DATA_DIR, else ./data)")
    parser.add_argument("--test-subset", type=int, help="first N test examples (default: all)")
    parser.add_argument("--bn-samples", type=int, default=None,
                        help="training examples for recomputing stale BN statistics (default: all)")
    args = parser.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint)
        data = load_mnist(args.data_dir, test_subset=args.test_subset, download=False,
                          transform=input_transform_of(state))
        result = evaluate_checkpoint(state, data, args.bn_samples)
    except (CheckpointError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    note = (f"; BN statistics recomputed from {result['bn_statistics_recomputed_from']} training examples "
            "(the checkpoint was saved between evaluations)" if result["bn_statistics_recomputed_from"] else "")
    print(f"test accuracy {result['test_accuracy']:.4f}  test loss {result['test_loss']:.4f}  "
          f"({result['test_examples']} examples{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
