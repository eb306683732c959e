"""Every listed minimum has its value and is a local minimum within the domain; bad input is refused."""

import itertools
import math

import pytest
import torch

from rso.functions import FUNCTIONS, get_function

CASES = [
    (name, dim, index)
    for name, entry in FUNCTIONS.items()
    for dim in ([entry.dim] if entry.dim is not None else [entry.min_dim if entry.min_dim > 1 else 1, 3])
    for index in range(len(entry.minima(dim)))
]


def directions(dim: int) -> torch.Tensor:
    """Axis and diagonal unit directions: 2 dim + (3^dim - 1 - 2 dim) of them."""
    rows = [v for v in itertools.product((-1.0, 0.0, 1.0), repeat=dim) if any(v)]
    vectors = torch.tensor(rows, dtype=torch.float64)
    return vectors / vectors.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("name, dim, index", CASES)
def test_minimum_value_and_local_minimality(name, dim, index):
    entry = FUNCTIONS[name]
    minimum = entry.minima(dim)[index]
    point = torch.tensor(minimum.point, dtype=torch.float64)
    value = float(entry(point))
    assert value == pytest.approx(minimum.value, abs=1e-6), f"{name} at {minimum.point}"

    box = entry.domain(dim)
    span = float((box[:, 1] - box[:, 0]).min())
    for radius in (1e-4 * span, 1e-3 * span):
        neighbours = point + radius * directions(dim)
        inside = ((neighbours >= box[:, 0]) & (neighbours <= box[:, 1])).all(dim=1)
        neighbours = neighbours[inside]  # one-sided at the boundary (Eggholder)
        assert len(neighbours) > 0
        assert (entry(neighbours) >= value - 1e-9).all(), f"{name}: a neighbour at radius {radius} is lower"


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_global_minimum_is_the_lowest_on_a_grid(name):
    # A coarse grid over the domain never beats the listed global minimum (it would if the data were wrong).
    entry = FUNCTIONS[name]
    dim = entry.plot_dim
    box = entry.domain(dim)
    axes = [torch.linspace(float(lo), float(hi), 201 if dim == 2 else 4001, dtype=torch.float64) for lo, hi in box]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dim)
    assert float(entry(grid).min()) >= entry.global_minimum_value(dim) - 1e-9


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_batched_and_differentiable(name):
    entry = FUNCTIONS[name]
    dim = entry.plot_dim
    box = entry.domain(dim)
    generator = torch.Generator().manual_seed(0)
    x = (box[:, 0] + (box[:, 1] - box[:, 0]) * torch.rand(5, 3, dim, generator=generator, dtype=torch.float64)).requires_grad_()
    values = entry(x)
    assert values.shape == (5, 3)
    # Batched equals one-by-one.
    one = entry(x[2, 1].detach())
    assert float(one) == pytest.approx(float(values[2, 1].detach()), rel=1e-12)
    (grad,) = torch.autograd.grad(values.sum(), x)
    assert torch.isfinite(grad).all()
    # Gradient matches central differences at one point (skip kinks of |.| by using a generic random point).
    point = x[0, 0].detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(entry(point), point)
    point, h = point.detach(), 1e-6
    steps = torch.eye(dim, dtype=torch.float64) * h
    numeric = torch.stack([(entry(point + e) - entry(point - e)) / (2 * h) for e in steps])
    assert torch.allclose(g, numeric, rtol=1e-4, atol=1e-4)


def test_gradient_is_zero_at_smooth_minima():
    for name in ("ackley", "rastrigin", "rosenbrock", "himmelblau", "booth", "qubic"):
        entry = FUNCTIONS[name]
        for minimum in entry.minima():
            x = torch.tensor(minimum.point, dtype=torch.float64, requires_grad=True)
            (grad,) = torch.autograd.grad(entry(x), x)
            assert grad.abs().max() < 1e-6, (name, minimum.point, grad)


def test_multimodal_surface_facts():
    f = get_function("multimodal")
    minima = f.minima()
    assert len(minima) == 10
    assert all(m.value == pytest.approx(-12 / 7) for m in minima)
    assert all(math.cos(m.point[0]) == pytest.approx(-5 / 7) for m in minima)
    assert float(f(torch.tensor([5 * math.pi, 5 * math.pi]))) == pytest.approx(-1.6)


def test_qubic_local_minimum_is_marked_local():
    kinds = {m.kind for m in get_function("qubic").minima()}
    assert kinds == {"global", "local"}


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="unknown function 'nope'"):
        get_function("nope")
    with pytest.raises(ValueError, match="dimension 2 only, got dimension 3"):
        get_function("himmelblau")(torch.zeros(3))
    with pytest.raises(ValueError, match="dimension >= 2"):
        get_function("rosenbrock")(torch.zeros(1))
    with pytest.raises(ValueError, match=r"outside the domain of branin: coordinate 1 = -1"):
        get_function("branin").check_point([0.0, -1.0])
    assert get_function("ackley").check_point([1.0, 2.0, 3.0]).tolist() == [1.0, 2.0, 3.0]
