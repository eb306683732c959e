"""Standard optimization test functions as batched, differentiable torch functions.

Every function takes ``x`` of shape ``(..., d)`` and returns ``(...)``; it works in any floating dtype and
is differentiable by autograd. Each one is registered in :data:`FUNCTIONS` with a one-line description,
its domain, the dimensions it accepts and its known minima as data (:class:`Minimum`), so tests and plots
iterate the registry instead of repeating numbers.

Minima are the literature values (reference section 5), quoted with the digits needed for the tests;
``kind = "local"`` marks a known non-global minimum worth showing (the qubic's trap at 0.9601).

>>> import torch
>>> f = get_function("himmelblau")
>>> float(f(torch.tensor([3.0, 2.0])))
0.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Minimum:
    """A known minimum: its point, its value, whether it is global, and a note where the fact needs one."""

    point: tuple[float, ...]
    value: float
    kind: str = "global"
    note: str = ""


@dataclass(frozen=True)
class Objective:
    """A test function with its domain, the dimensions it accepts, and its known minima.

    ``dim`` is the fixed dimension, or ``None`` for functions defined for any ``d >= min_dim``
    (their domain is the box ``bounds[0]`` in every coordinate, and their minima depend on ``d``).
    """

    name: str
    description: str
    formula: Callable[[Tensor], Tensor] = field(repr=False)
    bounds: tuple[tuple[float, float], ...]
    minima_for: Callable[[int], list[Minimum]] = field(repr=False)
    dim: int | None = None
    min_dim: int = 1
    note: str = ""

    @property
    def plot_dim(self) -> int:
        """The dimension used for pictures: the fixed one, else 2 (1 when only 1-D makes sense)."""
        return self.dim if self.dim is not None else max(2, self.min_dim)

    def check_dim(self, dim: int) -> int:
        if self.dim is not None and dim != self.dim:
            raise ValueError(f"{self.name} is defined for dimension {self.dim} only, got dimension {dim}")
        if dim < self.min_dim:
            raise ValueError(f"{self.name} needs dimension >= {self.min_dim}, got dimension {dim}")
        return dim

    def domain(self, dim: int | None = None) -> Tensor:
        """``(dim, 2)`` float64 tensor of lower and upper bounds."""
        dim = self.check_dim(self.plot_dim if dim is None else dim)
        rows = self.bounds if self.dim is not None else self.bounds * dim
        return torch.tensor(rows, dtype=torch.float64)

    def minima(self, dim: int | None = None) -> list[Minimum]:
        dim = self.check_dim(self.plot_dim if dim is None else dim)
        return self.minima_for(dim)

    def global_minimum_value(self, dim: int | None = None) -> float:
        return min(m.value for m in self.minima(dim) if m.kind == "global")

    def check_point(self, x, name: str = "start") -> Tensor:
        """Validate a point (dimension, finite, inside the domain) and return it as a float64 tensor."""
        point = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
        self.check_dim(point.numel())
        if not torch.isfinite(point).all():
            raise ValueError(f"{name} {point.tolist()} is not finite")
        box = self.domain(point.numel())
        outside = (point < box[:, 0]) | (point > box[:, 1])
        if outside.any():
            i = int(outside.nonzero()[0])
            raise ValueError(
                f"{name} {point.tolist()} is outside the domain of {self.name}: coordinate {i} = {point[i].item():g} "
                f"is not in [{box[i, 0].item():g}, {box[i, 1].item():g}]"
            )
        return point

    def __call__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x, dtype=torch.float64)
        if x.dim() == 0:
            x = x.reshape(1)
        self.check_dim(x.shape[-1])
        return self.formula(x)


# ---- formulas: x has shape (..., d) ----------------------------------------------------------------------


def ackley(x: Tensor, a: float = 20.0, b: float = 0.2, c: float = 2 * math.pi) -> Tensor:
    # note: the tiny constant keeps the gradient finite (zero) at the minimum, where sqrt has slope infinity;
    # it changes f(0) by about 1e-29.
    radius = torch.sqrt((x * x).mean(-1) + 1e-30)
    return -a * torch.exp(-b * radius) - torch.exp(torch.cos(c * x).mean(-1)) + a + math.e


def rastrigin(x: Tensor) -> Tensor:
    return 10.0 * x.shape[-1] + (x * x - 10.0 * torch.cos(2 * math.pi * x)).sum(-1)


def rosenbrock(x: Tensor) -> Tensor:
    head, tail = x[..., :-1], x[..., 1:]
    return (100.0 * (tail - head * head) ** 2 + (1.0 - head) ** 2).sum(-1)


def griewank(x: Tensor) -> Tensor:
    index = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    return 1.0 + (x * x).sum(-1) / 4000.0 - torch.cos(x / torch.sqrt(index)).prod(-1)


def styblinski_tang(x: Tensor) -> Tensor:
    return 0.5 * (x**4 - 16.0 * x * x + 5.0 * x).sum(-1)


def himmelblau(x: Tensor) -> Tensor:
    u, v = x[..., 0], x[..., 1]
    return (u * u + v - 11.0) ** 2 + (u + v * v - 7.0) ** 2


def beale(x: Tensor) -> Tensor:
    u, v = x[..., 0], x[..., 1]
    return (1.5 - u + u * v) ** 2 + (2.25 - u + u * v * v) ** 2 + (2.625 - u + u * v**3) ** 2


def six_hump_camel(x: Tensor) -> Tensor:
    u, v = x[..., 0], x[..., 1]
    return (4.0 - 2.1 * u * u + u**4 / 3.0) * u * u + u * v + (-4.0 + 4.0 * v * v) * v * v


def booth(x: Tensor) -> Tensor:
    u, v = x[..., 0], x[..., 1]
    return (u + 2.0 * v - 7.0) ** 2 + (2.0 * u + v - 5.0) ** 2


def goldstein_price(x: Tensor) -> Tensor:
    u, v = x[..., 0], x[..., 1]
    first = 1.0 + (u + v + 1.0) ** 2 * (19.0 - 14.0 * u + 3.0 * u * u - 14.0 * v + 6.0 * u * v + 3.0 * v * v)
    second = 30.0 + (2.0 * u - 3.0 * v) ** 2 * (18.0 - 32.0 * u + 12.0 * u * u + 48.0 * v - 36.0 * u * v + 27.0 * v * v)
    return first * second


def branin(x: Tensor) -> Tensor:
    u, v = x[..., 0], x[..., 1]
    b, c, t = 5.1 / (4 * math.pi**2), 5.0 / math.pi, 1.0 / (8 * math.pi)
    return (v - b * u * u + c * u - 6.0) ** 2 + 10.0 * (1.0 - t) * torch.cos(u) + 10.0


def eggholder(x: Tensor) -> Tensor:
    u, v = x[..., 0], x[..., 1]
    return -(v + 47.0) * torch.sin(torch.sqrt(torch.abs(u / 2.0 + v + 47.0))) - u * torch.sin(
        torch.sqrt(torch.abs(u - (v + 47.0)))
    )


def qubic(x: Tensor) -> Tensor:
    u = x[..., 0]
    return u**4 - 2.0 * u * u + 0.3 * u


MULTIMODAL_A, MULTIMODAL_PHI = 0.7, math.pi


def multimodal(x: Tensor) -> Tensor:
    """The course surface: 2 + a - 2 cos x cos y - 3 + 0.1 |x - 5 pi| |y - 5 pi| - a cos(phi - 2 x)."""
    u, v = x[..., 0], x[..., 1]
    a, phi, centre = MULTIMODAL_A, MULTIMODAL_PHI, 5 * math.pi
    return (
        2.0 + a - 2.0 * torch.cos(u) * torch.cos(v) - 3.0
        + 0.1 * torch.abs(u - centre) * torch.abs(v - centre)
        - a * torch.cos(phi - 2.0 * u)
    )


# ---- minima ------------------------------------------------------------------------------------------------


def _at_origin(dim: int) -> list[Minimum]:
    return [Minimum((0.0,) * dim, 0.0)]


def _fixed(*minima: Minimum) -> Callable[[int], list[Minimum]]:
    return lambda dim: list(minima)


STYBLINSKI_TANG_X = -2.903534027771178
STYBLINSKI_TANG_F = -39.16616570377142  # per coordinate


def _multimodal_minima(dim: int) -> list[Minimum]:
    # On y = 5 pi the penalty term vanishes and z = -1 + 2 cos x + 2 a cos^2 x, smallest at cos x = -1/(2a) = -5/7,
    # giving -1 - 1/(2a) = -12/7. Off that line z grows (the kink |y - 5 pi| and -2 cos x cos y), so in the
    # domain [0, 10 pi]^2 these are ten minima on one valley floor, each with the same value.
    angle = math.acos(-1.0 / (2 * MULTIMODAL_A))
    xs = sorted(x for k in range(6) for x in (angle + 2 * math.pi * k, 2 * math.pi * k - angle) if 0 <= x <= 10 * math.pi)
    value = -1.0 - 1.0 / (2 * MULTIMODAL_A)
    note = "one of the points on the line y = 5 pi where cos x = -5/7; all share the value -12/7"
    return [Minimum((x, 5 * math.pi), value, "global", note) for x in xs]


_ENTRIES = [
    Objective(
        "ackley", "Ackley (a=20, b=0.2, c=2 pi): a nearly flat outer region with a deep hole at 0",
        ackley, ((-32.768, 32.768),), _at_origin,
    ),
    Objective("rastrigin", "Rastrigin: a bowl covered by a regular grid of local minima", rastrigin, ((-5.12, 5.12),), _at_origin),
    Objective(
        "rosenbrock", "Rosenbrock: a long curved valley, minimum at (1, ..., 1)", rosenbrock, ((-5.0, 10.0),),
        lambda dim: [Minimum((1.0,) * dim, 0.0)], min_dim=2,
    ),
    Objective("griewank", "Griewank: a wide bowl with fine product-of-cosines ripples", griewank, ((-600.0, 600.0),), _at_origin),
    Objective(
        "styblinski-tang", "Styblinski-Tang: separable, 2^d local minima, minimum -39.166 d", styblinski_tang, ((-5.0, 5.0),),
        lambda dim: [Minimum((STYBLINSKI_TANG_X,) * dim, STYBLINSKI_TANG_F * dim)],
    ),
    Objective(
        "himmelblau", "Himmelblau: four global minima of value 0", himmelblau, ((-6.0, 6.0), (-6.0, 6.0)),
        _fixed(
            Minimum((3.0, 2.0), 0.0),
            Minimum((-2.805118086952745, 3.131312518250573), 0.0),
            Minimum((-3.779310253377747, -3.283185991286170), 0.0),
            Minimum((3.584428340330492, -1.848126526964404), 0.0),
        ),
        dim=2,
    ),
    Objective(
        "beale", "Beale: flat plateaus and sharp ridges, minimum at (3, 0.5)", beale, ((-4.5, 4.5), (-4.5, 4.5)),
        _fixed(Minimum((3.0, 0.5), 0.0)), dim=2,
    ),
    Objective(
        "six-hump-camel", "Six-hump camel: six local minima, two global", six_hump_camel, ((-3.0, 3.0), (-2.0, 2.0)),
        _fixed(
            Minimum((0.0898420131003, -0.712656403020), -1.031628453489877),
            Minimum((-0.0898420131003, 0.712656403020), -1.031628453489877),
        ),
        dim=2,
    ),
    Objective("booth", "Booth: a tilted quadratic bowl, minimum at (1, 3)", booth, ((-10.0, 10.0), (-10.0, 10.0)),
              _fixed(Minimum((1.0, 3.0), 0.0)), dim=2),
    Objective(
        "goldstein-price", "Goldstein-Price: several local minima, global value 3 at (0, -1)", goldstein_price,
        ((-2.0, 2.0), (-2.0, 2.0)), _fixed(Minimum((0.0, -1.0), 3.0)), dim=2,
    ),
    Objective(
        "branin", "Branin (Branin-Hoo): three global minima of value 5 / (4 pi)", branin, ((-5.0, 10.0), (0.0, 15.0)),
        _fixed(
            Minimum((-math.pi, 12.275), 5 / (4 * math.pi)),
            Minimum((math.pi, 2.275), 5 / (4 * math.pi)),
            Minimum((3 * math.pi, 2.475), 5 / (4 * math.pi)),
        ),
        dim=2,
    ),
    Objective(
        "eggholder", "Eggholder: very rugged; the global minimum lies on the domain's edge", eggholder,
        ((-512.0, 512.0), (-512.0, 512.0)),
        _fixed(Minimum((512.0, 404.2318049938646), -959.6406627208507, "global", "on the boundary x = 512: a minimum within the domain only")),
        dim=2,
    ),
    Objective(
        "qubic", "the 1-D qubic x^4 - 2 x^2 + 0.3 x: a global and a shallower local minimum", qubic, ((-2.0, 2.0),),
        _fixed(
            Minimum((-1.0355787140888542,), -1.3054284837439158),
            Minimum((0.9601495555191059,), -0.705853518971737, "local", "the trap next to the start 0.96"),
        ),
        dim=1,
    ),
    Objective(
        "multimodal", "the course's multimodal surface (a = 0.7, phi = pi); minimum -12/7 along y = 5 pi", multimodal,
        ((0.0, 10 * math.pi), (0.0, 10 * math.pi)), _multimodal_minima, dim=2,
        note="minima are the ten points of [0, 10 pi]^2 on y = 5 pi with cos x = -5/7; at (5 pi, 5 pi) the value is -1.6",
    ),
]

FUNCTIONS: dict[str, Objective] = {entry.name: entry for entry in _ENTRIES}


def get_function(name: str) -> Objective:
    try:
        return FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown function {name!r}; choose one of {', '.join(FUNCTIONS)}") from None


def describe() -> str:
    """One line per function, for ``--help`` and the README."""
    return "\n".join(f"{name:16s} {entry.description}" for name, entry in FUNCTIONS.items())
