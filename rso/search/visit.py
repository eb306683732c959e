"""What the search visits, in which order, with which sigma.

The authors' code groups each conv/dense layer with the BatchNorm that follows it and visits the groups from
the output back to the input: ``dense -> conv5 -> beta5 -> gamma5 -> conv4 -> ... -> conv0 -> beta0 -> gamma0``.
Inside a tensor the order is row-major: output channel, input channel, kernel row, kernel column.
Sigma is the layer's He std ``sqrt(2 / fan_in)`` for weights and biases, and a fixed value (0.167) for BN.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rso.search.schedule import he_std

ORDERS = ("output-first", "input-first")
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class SearchTarget:
    """One parameter tensor the search sweeps over."""

    name: str            # the parameter's name in ``model.named_parameters()``
    parameter: nn.Parameter
    module: nn.Module    # the module that owns it
    kind: str            # "weight", "bias", "bn_beta" or "bn_gamma"
    sigma: float         # the initial (un-annealed) step size

    @property
    def numel(self) -> int:
        return self.parameter.numel()


def layer_sigma(module: nn.Module, kind: str, bn_sigma: float) -> float:
    if kind.startswith("bn_"):
        return bn_sigma
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() > 1:
        return he_std(weight[0].numel())
    return 0.1


def visit_order(model: nn.Module, order: str = "output-first", bn_sigma: float = 0.167) -> list[SearchTarget]:
    """The parameter tensors of ``model`` in the order one cycle visits them."""
    if order not in ORDERS:
        raise ValueError(f"unknown visiting order {order!r}; choose one of {', '.join(ORDERS)}")
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    groups: list[list[SearchTarget]] = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, BATCHNORMS):
            targets = [SearchTarget(names[id(module.bias)], module.bias, module, "bn_beta", bn_sigma),
                       SearchTarget(names[id(module.weight)], module.weight, module, "bn_gamma", bn_sigma)]
            if groups and groups[-1][0].kind in ("weight", "bias") and not isinstance(groups[-1][0].module, BATCHNORMS):
                groups[-1].extend(targets)   # the BN that follows a conv/dense layer belongs to its group
            else:
                groups.append(targets)
            continue
        targets = []
        for attribute, kind in (("weight", "weight"), ("bias", "bias")):
            parameter = getattr(module, attribute, None)
            if isinstance(parameter, nn.Parameter):
                targets.append(SearchTarget(names[id(parameter)], parameter, module, kind,
                                            layer_sigma(module, kind, bn_sigma)))
        for name, parameter in module.named_parameters(recurse=False):  # anything else a custom module owns
            if all(parameter is not target.parameter for target in targets):
                targets.append(SearchTarget(names[id(parameter)], parameter, module, name,
                                            float(parameter.detach().std()) if parameter.numel() > 1 else 0.1))
        groups.append(targets)
    if order == "output-first":
        groups.reverse()
    return [target for group in groups for target in group]
