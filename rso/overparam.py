"""Overparameterized optimization: minimize f(x) directly, or through a network whose output is x.

The network takes no data: its input is a learned vector (uniform init) and its output has ``dim(x)``
entries (reference section 3, after nepfaff/nn_optimization). A run has two phases:

1. fit: train the network so that its output equals the start point ``x0`` (MSE with Adam, until the MSE is
   below ``fit_tolerance`` or ``fit_seconds`` / ``fit_steps`` run out). Skipped for ``model = "direct"``.
2. minimize: ``epochs`` steps of the chosen optimizer (any name of :data:`rso.optim.OPTIMIZERS`, RSO too) on
   ``f(output)``, stopped early by the shared :class:`rso.stopping.StoppingCriteria` if asked.

Models (:data:`MODELS`):

- ``direct``: x itself is the parameter.
- ``mlp9``: 9 Linear layers with ReLU; the input vector is concatenated back in after the 4th.
- ``mlp17``: 17 weight-normed Linear layers: 4 blocks of 4 with dense skips (each block sees the input
  vector and the outputs of all earlier blocks), then the output layer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rso.functions import get_function
from rso.optim import GRADIENT_FREE, make_optimizer, optimizer_step
from rso.stopping import StoppingCriteria


class Direct(nn.Module):
    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.x = nn.Parameter(start.clone())

    def forward(self) -> torch.Tensor:
        return self.x


class MLP9(nn.Module):
    """9 Linear layers with ReLU; the learned input is concatenated back in after the 4th (NeRF-style)."""

    def __init__(self, out_features: int, in_features: int = 128, hidden: int = 512):
        super().__init__()
        self.input = nn.Parameter(torch.rand(in_features))
        widths_in = [in_features, hidden, hidden, hidden, hidden + in_features, hidden, hidden, hidden, hidden]
        widths_out = [hidden] * 8 + [out_features]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths_in, widths_out))

    def forward(self) -> torch.Tensor:
        h = self.input
        for index, layer in enumerate(self.layers):
            if index == 4:
                h = torch.cat([h, self.input])
            h = layer(h)
            if index < len(self.layers) - 1:
                h = torch.relu(h)
        return h


class MLP17(nn.Module):
    """17 weight-normed Linear layers: 4 blocks of 4 with dense skips, then the output layer."""

    def __init__(self, out_features: int, in_features: int = 128, hidden: int = 1024, blocks: int = 4, depth: int = 4):
        super().__init__()
        weight_norm = nn.utils.parametrizations.weight_norm
        self.input = nn.Parameter(torch.rand(in_features))
        self.blocks = nn.ModuleList()
        for b in range(blocks):
            first = in_features + b * hidden
            layers = [weight_norm(nn.Linear(first if k == 0 else hidden, hidden)) for k in range(depth)]
            self.blocks.append(nn.ModuleList(layers))
        self.output = weight_norm(nn.Linear(hidden, out_features))

    def forward(self) -> torch.Tensor:
        features = [self.input]
        for block in self.blocks:
            h = torch.cat(features)
            for layer in block:
                h = torch.relu(layer(h))
            features.append(h)
        return self.output(features[-1])


MODELS = {
    "direct": "optimize x itself",
    "mlp9": "9 Linear + ReLU layers, learned input re-concatenated after the 4th",
    "mlp17": "17 weight-normed Linear layers in 4 blocks with dense skips",
}


@dataclass
class OverparamConfig:
    function: str = "ackley"
    start: tuple[float, ...] = (10.0,)
    model: str = "direct"
    in_features: int = 128
    hidden: int = 512
    optimizer: str = "adam"
    lr: float = 5e-4  # for RSO: sigma
    epochs: int = 500
    fit_tolerance: float = 1e-6
    fit_seconds: float = 60.0
    fit_steps: int = 20_000
    fit_lr: float = 1e-3
    max_seconds: float | None = None  # wall-time cap of the minimize phase
    seed: int = 0
    optimizer_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        for name in ("in_features", "hidden", "epochs", "fit_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "fit_tolerance", "fit_seconds", "fit_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


@dataclass
class OverparamResult:
    config: dict
    x: list[float]
    f: float
    fit_mse: float | None
    fit_steps: int
    epochs_run: int
    stop_reason: str | None
    seconds: float
    losses: list[float]


def build_model(config: OverparamConfig, start: torch.Tensor) -> nn.Module:
    # The model's own init draws from the global RNG; fork it so the user's global state is left alone.
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        if config.model == "direct":
            return Direct(start)
        if config.model == "mlp9":
            return MLP9(start.numel(), config.in_features, config.hidden)
        return MLP17(start.numel(), config.in_features, config.hidden)


def fit_to_start(model: nn.Module, start: torch.Tensor, config: OverparamConfig) -> tuple[float, int]:
    """Adam on ``MSE(model(), start)`` until below ``fit_tolerance`` or out of steps / seconds."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.fit_lr)
    target = start.to(torch.float32)
    began, mse, steps = time.monotonic(), float("inf"), 0
    while steps < config.fit_steps and time.monotonic() - began < config.fit_seconds:
        optimizer.zero_grad(set_to_none=True)
        loss = ((model() - target) ** 2).mean()
        mse = float(loss.detach())
        if mse < config.fit_tolerance:
            break
        loss.backward()
        optimizer.step()
        steps += 1
    return mse, steps


def run(config: OverparamConfig) -> OverparamResult:
    objective = get_function(config.function)
    start = objective.check_point(config.start)
    model = build_model(config, start if config.model == "direct" else start.float())
    fit_mse, fit_steps = (None, 0) if config.model == "direct" else fit_to_start(model, start, config)

    def loss_fn() -> torch.Tensor:
        return objective(model().to(torch.float64))

    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(config.seed)
    options = dict(config.optimizer_options)
    if config.optimizer in GRADIENT_FREE:
        options.setdefault("cycles", config.epochs)
    optimizer = make_optimizer(config.optimizer, params, lr=config.lr, generator=generator, **options)
    stopping = StoppingCriteria(max_iterations=config.epochs, max_seconds=config.max_seconds)
    stopping.start()
    began, losses, reason, epoch = time.monotonic(), [], None, -1
    for epoch in range(config.epochs):
        optimizer_step(optimizer, loss_fn)
        with torch.no_grad():
            loss = float(loss_fn())
        losses.append(loss)
        reason = stopping.update(epoch, loss)
        if reason is not None:
            break
    with torch.no_grad():
        x = model().detach().to(torch.float64)
    return OverparamResult(
        config=asdict(config), x=x.tolist(), f=float(objective(x)), fit_mse=fit_mse, fit_steps=fit_steps,
        epochs_run=epoch + 1, stop_reason=reason, seconds=time.monotonic() - began, losses=losses,
    )
