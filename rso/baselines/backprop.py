"""The backprop baselines (SGD with momentum, Adam) on the same model, data and evaluation as RSO.

Steps are logged in scalar weight updates, the unit RSO's weight visits use: one optimizer step updates
every weight, so it counts ``n_weights`` updates. Forward samples count forward plus backward as two.
"""

from __future__ import annotations


import torch
from torch import nn


def make_optimizer(name: str, parameters, lr: float, momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    raise ValueError(f"unknown backprop optimizer {name!r}; choose sgd or adam")


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                batch_size: int, generator: torch.Generator, progress=None) -> tuple[float, int]:
    """One epoch over a fresh shuffle (drop-last chunks, as RSO's partition); returns (mean loss, steps)."""
    model.train()
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    n_batches = len(labels) // batch_size
    total = 0.0
    for batch in range(n_batches):
        rows = order[batch * batch_size:(batch + 1) * batch_size]
        loss = nn.functional.cross_entropy(model(images[rows]), labels[rows])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss.item()}) at step {batch} of the epoch; "
                                     "lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        if progress is not None:
            progress(loss.item())
    return total / max(n_batches, 1), n_batches


