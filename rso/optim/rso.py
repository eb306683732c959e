"""RSO (Random Search Optimization) as a ``torch.optim.Optimizer`` for any parameters.

One call to ``step(closure)`` is one *cycle*: every scalar of every searched parameter is visited once, in order::

    for each parameter tensor P that requires grad (order: output-first = reverse registration order, or input-first):
        sigma <- lr * annealed_sigma(sigma_P, cycle, cycles)     (lr: P's param group; no annealing when cycles is None)
        for each scalar w of P (logical row-major order: output channel, input channel, kernel row, column):
            before_visit()                                   (optional: e.g. draw the next mini-batch)
            dw ~ sampler(sigma)
            w0 <- w (1 - weight_decay)
            keep argmin over {L(w0), L(w0 + dw), L(w0 - dw)}  (ties keep w0; NaN, +inf and -inf never win)

where ``L`` is ``closure()`` with the scalar set to the candidate. The closure runs under ``torch.enable_grad``,
as LBFGS runs it, so the standard closure (``zero_grad(); loss = f(); loss.backward(); return loss``) works. RSO
never reads gradients: a closure decorated with ``@torch.no_grad()`` and without ``backward`` gives the same
result faster, since no graph is recorded for each candidate (``optimizer_step`` in :mod:`rso.optim` does this).
A model with BatchNorm in train mode would update its running statistics on every candidate, rejected ones
included: evaluate such a model inside ``rso.engines.batch_statistics(model)``, as the MNIST trainer does.
"output-first" here is the reverse of the parameters' registration order, so a BN layer's beta and gamma come
before the conv they follow; the MNIST trainer's :func:`rso.search.visit.visit_order` visits the conv first, as
the authors' code does. Biases take ``vector_sigma``, where the trainer gives them their layer's He std.
:meth:`RSO.for_model` builds the optimizer with the trainer's order and sigmas instead. This is
the reference scoring: three full evaluations per scalar, nothing cached. Candidates come from
:func:`rso.search.candidate_values` and the choice from :func:`rso.search.select_candidate`, the same rule
as the MNIST trainer.

Differences from the paper, on purpose: the paper's sigma is ``std(W_d)`` at init; here ``sigma=None`` takes
the He std ``sqrt(2 / fan_in)`` of a tensor with 2 or more dimensions (what the authors' code uses) and
``vector_sigma`` (0.167, the authors' value for BN parameters) for vectors and scalars. After ``cycles``
cycles the last cycle's sigma is kept.

Step size and torch's schedulers. Every param group has an ``lr`` (default 1.0): a factor on that group's
sigma, read at every step, so ``torch.optim.lr_scheduler`` schedulers (StepLR, LinearLR, ReduceLROnPlateau, ...)
drive the step size as they do for SGD; ``group['sigma']`` and the other group options can be edited between
steps too (nothing is cached). The built-in annealing ``cycles=C`` is the paper's: the factor
``0.1 + 0.9 (C - c) / C`` in cycle ``c = 0..C-1``. It is the same as ``cycles=None`` with
``LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=C)`` stepped once per cycle, except after ``C``
cycles: the built-in keeps the last cycle's factor ``0.1 + 0.9 / C``, LinearLR stays at 0.1. Use one or the
other; given both, the two factors multiply. The registry (``make_optimizer("rso", params, lr=s)``) maps its
``lr`` to ``sigma=s`` and leaves the group's ``lr`` factor at 1.0 for schedulers.

State. The search state lives in ``self.state["rso"]`` (``cycle``, ``evaluations``: closure calls so far, and
``order``), so ``state_dict()``, ``pickle`` and ``copy.deepcopy`` carry it as torch carries any optimizer
state. The generator is an attribute; ``pickle`` and ``deepcopy`` copy it, and ``state_dict()`` adds its state
as ``state["rso"]["generator_state"]`` through a state-dict post-hook registered at construction (so later
post-hooks and load pre-hooks see it); a load post-hook puts it back into the generator. A loaded or copied
optimizer therefore continues exactly as the original would. State dicts written before param groups had
``lr`` (extra state at the top level under ``"rso"``, a ``sigma`` copy per parameter) still load.

A step is all or nothing: if the closure, ``before_visit`` or a non-finite cycle raises part-way, every
parameter, the generator and the counters are put back as they were before the step, and the error goes on.
Parameters with ``requires_grad=False`` and zero-size parameters are left alone. Non-contiguous and
channels-last parameters are searched in the same logical order as a contiguous copy. ``step`` returns the
loss the closure returned for the last accepted candidate (detached when it is a tensor): the loss after the
cycle, where LBFGS returns the loss before its step; with nothing to search it calls the closure once.

Conformance with torch's own optimizer checks (``tests/test_optim_conformance.py``, modelled on
``TestOptimRenewed`` and ``common_optimizers.py``, with LBFGS beside RSO). These do not apply, and why:

- foreach / fused / differentiable / capturable variants: there is one implementation, the reference loop;
  scoring never goes through gradients, and every candidate is a host-side comparison (``float(closure())``),
  a device sync that a CUDA graph cannot capture.
- ``maximize``: RSO minimizes the closure; return ``-loss`` to maximize.
- sparse, zero or ``None`` gradients: RSO never reads ``.grad``. The analogue, "a constant loss leaves every
  parameter alone", is checked.
- complex parameters (``test_complex``, ``test_complex_2d``): refused at construction with a ValueError; search
  a real copy (``torch.view_as_real``) instead, which is what torch does inside its own optimizers.
- stepping without a closure, and ``test_load_nontensor_step`` (RSO keeps no per-parameter ``step``).
- multi-GPU and mixed-device checks: not run, no GPU is available to the tests (the random steps come from the
  CPU generator and each candidate is written into the parameter wherever it lives).
- param-group checks run on RSO alone: LBFGS accepts one param group. The deepcopy of LBFGS with its
  parameters cannot step in torch 2.13 (``_params`` is not pickled); the suite records that as an expected failure.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from rso.search import annealed_sigma, candidate_values, get_sampler, he_std, select_candidate
from rso.search.visit import visit_order

ORDERS = {
    "output-first": "reverse registration order: the layer nearest the loss first (BN parameters before their conv)",
    "input-first": "registration order: the first layer first",
}


class RSO(Optimizer):
    def __init__(
        self,
        params,
        sigma: float | None = None,
        cycles: int | None = None,
        final_fraction: float = 0.1,
        anneal: bool = True,
        weight_decay: float = 0.0,
        sampler: str = "gaussian",
        vector_sigma: float = 0.167,
        order: str = "output-first",
        generator: torch.Generator | None = None,
        seed: int = 0,
        lr: float | torch.Tensor = 1.0,
    ):
        _check_order(order)
        defaults = dict(
            lr=lr, sigma=sigma, cycles=cycles, final_fraction=final_fraction, anneal=anneal,
            weight_decay=weight_decay, sampler=sampler, vector_sigma=vector_sigma,
        )
        super().__init__(params, defaults)  # validates every group through add_param_group
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.state["rso"] = {"cycle": 0, "evaluations": 0, "order": order}
        _register_state_hooks(self)

    @classmethod
    def for_model(cls, model: torch.nn.Module, order: str = "output-first", bn_sigma: float = 0.167, **options) -> "RSO":
        """RSO over ``model`` with the MNIST trainer's visiting order and sigmas (:func:`rso.search.visit.visit_order`).

        Each conv/dense layer is visited before the beta and gamma of the BN that follows it, as in the authors'
        code; weights and biases take their layer's He std, BN parameters ``bn_sigma``.
        """
        if "sigma" in options:
            raise ValueError("for_model takes the sigmas from the model; use RSO(params, sigma=...) for one sigma")
        targets = visit_order(model, order, bn_sigma)
        groups = [{"params": [target.parameter], "sigma": target.sigma} for target in targets]
        return cls(groups, order="input-first", **options)  # the groups are already in visiting order

    # ---- the search state, kept in self.state["rso"] so torch's state_dict/pickle/deepcopy carry it ----------

    @property
    def cycle(self) -> int:
        return self.state["rso"]["cycle"]

    @cycle.setter
    def cycle(self, value: int) -> None:
        self.state["rso"] = {**self.state["rso"], "cycle": int(value)}

    @property
    def evaluations(self) -> int:
        return self.state["rso"]["evaluations"]

    @evaluations.setter
    def evaluations(self, value: int) -> None:
        self.state["rso"] = {**self.state["rso"], "evaluations": int(value)}

    @property
    def order(self) -> str:
        return self.state["rso"]["order"]

    @order.setter
    def order(self, value: str) -> None:
        _check_order(value)
        self.state["rso"] = {**self.state["rso"], "order": value}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["generator"] = self.generator  # torch's optimizers pickle only defaults, state and param_groups
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict, with state and param_groups only
        for group in self.param_groups:
            group.setdefault("lr", 1.0)  # groups saved before lr existed
        _register_state_hooks(self)

    # ---- param groups ----------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, after checking the group's options and refusing complex parameters."""
        if isinstance(param_group, dict):
            params = param_group.get("params")
            if isinstance(params, torch.Tensor):
                params = [params]
            elif params is not None and not isinstance(params, set):  # torch refuses sets itself
                params = list(params)
            if params is not None:
                param_group["params"] = params
                for item in params:
                    tensor = item[1] if isinstance(item, tuple) and len(item) == 2 else item
                    if isinstance(tensor, torch.Tensor) and tensor.is_complex():
                        raise ValueError(
                            f"RSO searches real parameters; got a {tensor.dtype} parameter of shape {tuple(tensor.shape)}: "
                            "search a real copy (torch.view_as_real) instead"
                        )
            _check_options({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @staticmethod
    def base_sigma(p: torch.Tensor, group: dict) -> float:
        """The group's ``sigma``, or the He std of a tensor with 2+ dimensions, or ``vector_sigma``."""
        if group["sigma"] is not None:
            return float(group["sigma"])
        fan_in = math.prod(p.shape[1:])
        if p.dim() >= 2 and fan_in > 0:
            return he_std(fan_in)
        return float(group["vector_sigma"])

    def current_sigma(self, p: torch.Tensor, group: dict) -> float:
        """The sigma of ``p`` in this cycle: ``lr`` times the (annealed) base sigma."""
        sigma = self.base_sigma(p, group)
        cycles = group["cycles"]
        if cycles is not None:
            sigma = annealed_sigma(sigma, min(self.cycle, cycles - 1), cycles, group["final_fraction"], group["anneal"])
        return float(group["lr"]) * sigma

    def visit_order(self) -> list[tuple[dict, torch.Tensor]]:
        """The (group, parameter) pairs one cycle searches: those that require grad and hold a scalar."""
        pairs = [(group, p) for group in self.param_groups for p in group["params"] if p.requires_grad and p.numel() > 0]
        return pairs[::-1] if self.order == "output-first" else pairs

    # ---- the step ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, before_visit: Callable[[], None] | None = None):
        """Run one cycle over all scalars; return the closure's loss for the last accepted candidate."""
        if closure is None:
            raise ValueError("RSO.step needs a closure that returns the loss (it is called 3 times per scalar)")
        closure = torch.enable_grad()(closure)
        for group in self.param_groups:
            _check_options(group)  # edits made since the last step are checked before anything changes
        pairs = self.visit_order()
        if not pairs:
            loss = closure()
            self.evaluations += 1
            return _detached(loss)
        saved = [p.detach().clone() for _, p in pairs]
        generator_state = self.generator.get_state()
        try:
            loss, evaluations = self._cycle(pairs, closure, before_visit)
        except BaseException:
            for (_, p), copy in zip(pairs, saved):
                p.copy_(copy)
            self.generator.set_state(generator_state)
            raise
        self.state["rso"] = {**self.state["rso"], "cycle": self.cycle + 1, "evaluations": self.evaluations + evaluations}
        return loss

    def _cycle(self, pairs, closure, before_visit):
        loss, evaluations = None, 0
        losses = torch.empty(3, dtype=torch.float64)
        for group, p in pairs:
            sampler = get_sampler(group["sampler"])
            steps = sampler(self.current_sigma(p, group), p.numel(), self.generator)
            flat = p.view(-1) if p.is_contiguous() else None
            for j in range(p.numel()):
                if before_visit is not None:
                    before_visit()
                # note: non-contiguous and channels-last tensors are indexed by position, in the same logical order
                target, key = (flat, j) if flat is not None else (p, _unravel(j, p.shape))
                original = float(target[key])
                values = candidate_values(original, float(steps[j]), group["weight_decay"])
                returned = []
                for k in range(3):
                    target[key] = values[k]
                    returned.append(closure())
                    losses[k] = _loss_value(returned[-1])
                evaluations += 3
                losses[~torch.isfinite(losses)] = float("nan")  # select_candidate skips NaN; -inf must not win either
                choice = select_candidate(losses)
                if choice < 0:
                    target[key] = original
                    raise RuntimeError(
                        f"RSO: every candidate loss was non-finite ({[_loss_value(r) for r in returned]}) "
                        f"at a scalar of a parameter of shape {tuple(p.shape)}; the step was undone"
                    )
                target[key] = values[choice]
                loss = _detached(returned[choice])
        return loss, evaluations


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")


def _check_options(group: dict[str, Any]) -> None:
    """One clear ValueError for the first bad option of a param group."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not (math.isfinite(float(lr)) and float(lr) >= 0.0):
        raise ValueError(f"lr must be finite and non-negative (it scales sigma), got {float(lr)}")
    sigma = group["sigma"]
    if sigma is not None and not _positive_finite(sigma):
        raise ValueError(f"sigma must be positive and finite, or None, got {sigma}")
    cycles = group["cycles"]
    if cycles is not None and (isinstance(cycles, bool) or not isinstance(cycles, int) or cycles <= 0):
        raise ValueError(f"cycles must be a positive integer or None, got {cycles!r}")
    if not 0.0 < group["final_fraction"] <= 1.0:
        raise ValueError(f"final_fraction must be in (0, 1], got {group['final_fraction']}")
    if not 0.0 <= group["weight_decay"] < 1.0:
        raise ValueError(f"weight_decay must be in [0, 1), got {group['weight_decay']}")
    if not _positive_finite(group["vector_sigma"]):
        raise ValueError(f"vector_sigma must be positive and finite, got {group['vector_sigma']}")
    get_sampler(group["sampler"])  # raises a ValueError naming the choices


def _positive_finite(value) -> bool:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and value > 0.0


def _loss_value(loss) -> float:
    if isinstance(loss, torch.Tensor) and loss.numel() != 1:
        raise ValueError(f"RSO: the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
    return float(loss)


def _detached(loss):
    return loss.detach() if isinstance(loss, torch.Tensor) else loss


def _unravel(index: int, shape: torch.Size) -> tuple[int, ...]:
    position = []
    for size in reversed(shape):
        index, rest = divmod(index, size)
        position.append(rest)
    return tuple(reversed(position))


# ---- the generator's state through torch's state-dict hooks ------------------------------------------------------


def _add_generator_state(optimizer: RSO, state_dict: dict[str, Any]) -> None:
    """State-dict post-hook: the generator's state joins the search state (a copy; self.state keeps none)."""
    state_dict["state"]["rso"] = {**state_dict["state"]["rso"], "generator_state": optimizer.generator.get_state()}


def _upgrade_legacy_state_dict(optimizer: RSO, state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """Load pre-hook: state dicts written before groups had ``lr`` kept the search state at the top level."""
    legacy = state_dict.get("rso")
    if legacy is None:
        if "rso" not in state_dict.get("state", {}):
            raise ValueError("not an RSO state dict: its 'state' has no 'rso' entry (cycle, evaluations, order, generator state)")
        return None
    state = {}
    for key, value in state_dict["state"].items():
        if isinstance(key, int) and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "sigma"}  # the stale copy of the group's sigma
            if not value:
                continue
        state[key] = value
    state["rso"] = {"cycle": legacy["cycle"], "evaluations": legacy["evaluations"], "order": legacy["order"],
                    "generator_state": legacy["generator_state"]}
    upgraded = {key: value for key, value in state_dict.items() if key != "rso"}
    upgraded["state"] = state
    return upgraded


def _take_generator_state(optimizer: RSO) -> None:
    """Load post-hook: the saved generator state goes back into the generator, the counters into a fresh dict."""
    extra = dict(optimizer.state["rso"])
    generator_state = extra.pop("generator_state", None)
    if generator_state is not None:
        optimizer.generator.set_state(generator_state.detach().cpu().clone())
    _check_order(extra["order"])
    optimizer.state["rso"] = {"cycle": int(extra["cycle"]), "evaluations": int(extra["evaluations"]), "order": extra["order"]}


def _register_state_hooks(optimizer: RSO) -> None:
    """Register the hooks once (``__setstate__`` runs on every load and after unpickling, which drops hooks)."""
    if _add_generator_state not in optimizer._optimizer_state_dict_post_hooks.values():
        optimizer.register_state_dict_post_hook(_add_generator_state, prepend=True)
    if _upgrade_legacy_state_dict not in optimizer._optimizer_load_state_dict_pre_hooks.values():
        optimizer.register_load_state_dict_pre_hook(_upgrade_legacy_state_dict, prepend=True)
    if _take_generator_state not in optimizer._optimizer_load_state_dict_post_hooks.values():
        optimizer.register_load_state_dict_post_hook(_take_generator_state, prepend=True)


def rso_parameters(module: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
    """The parameters RSO should search: those that require grad (frozen ones are left alone)."""
    return [p for p in module.parameters() if p.requires_grad]
