"""The optimizer family: course numbers, descent on a quadratic, the custom optimizers against torch, RSO."""

import math

import pytest
import torch

from rso.optim import OPTIMIZERS, RSO, SCHEDULES, AdagradDecay, NoisySGD, make_optimizer, make_schedule, optimizer_step


def scalar(value):
    return torch.nn.Parameter(torch.tensor([float(value)], dtype=torch.float64))


@pytest.mark.parametrize("lr, expected", [(0.2, 0.060466), (0.05, 3.486784), (0.9, 1.073742)])
def test_course_gradient_descent_on_x_squared(lr, expected):
    x = scalar(10.0)
    optimizer = make_optimizer("sgd", [x], lr=lr)
    for _ in range(10):
        optimizer_step(optimizer, lambda: (x * x).sum())
    assert float(x.detach()) == pytest.approx(expected, abs=5e-7)


def test_course_local_minimum_of_x_cos():
    # f(x) = x cos(0.15 pi x) from x = 10 with eta 2 stops in the local minimum near -1.528166.
    x = scalar(10.0)
    optimizer = make_optimizer("sgd", [x], lr=2.0)
    for _ in range(10):
        optimizer_step(optimizer, lambda: (x * torch.cos(0.15 * math.pi * x)).sum())
    assert float(x.detach()) == pytest.approx(-1.528166, abs=5e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_every_optimizer_lowers_a_convex_quadratic(name, scale):
    # The course's f = scale x1^2 + 2 x2^2 from (-5, -2).
    x = torch.nn.Parameter(torch.tensor([-5.0, -2.0], dtype=torch.float64))
    weights = torch.tensor([scale, 2.0], dtype=torch.float64)
    loss_fn = lambda: (weights * x * x).sum()  # noqa: E731
    start = float(loss_fn().detach())
    optimizer = make_optimizer(name, [x], lr=0.5 if name == "rso" else None, generator=torch.Generator().manual_seed(0))
    for _ in range(300):  # AdaDelta, with no learning-rate knob, is the slow one
        optimizer_step(optimizer, loss_fn)
    final = float(loss_fn().detach())
    assert final < 0.5 * start, f"{name}: {start} -> {final}"


def test_adagrad_decay_with_r_zero_is_torch_adagrad():
    a = torch.nn.Parameter(torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdagradDecay([a], lr=0.3, decay=0.0)
    theirs = torch.optim.Adagrad([b], lr=0.3, initial_accumulator_value=1.0, eps=1e-10)
    for _ in range(25):
        optimizer_step(ours, lambda: (a**4).sum())
        optimizer_step(theirs, lambda: (b**4).sum())
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_adagrad_decay_follows_its_formula():
    x = scalar(2.0)
    optimizer = AdagradDecay([x], lr=0.1, decay=0.5, eps=0.0)
    gsum, value = 1.0, 2.0
    for _ in range(3):
        grad = 2 * value
        gsum = gsum + grad**2 - 0.5 * gsum
        value = value - 0.1 * grad / math.sqrt(gsum)
        optimizer_step(optimizer, lambda: (x * x).sum())
        assert float(x.detach()) == pytest.approx(value, rel=1e-12)


def test_noisy_sgd_without_noise_is_sgd_and_noise_is_reproducible():
    a, b = scalar(4.0), scalar(4.0)
    noiseless, plain = NoisySGD([a], lr=0.1, noise=0.0), torch.optim.SGD([b], lr=0.1)
    for _ in range(5):
        optimizer_step(noiseless, lambda: (a * a).sum())
        optimizer_step(plain, lambda: (b * b).sum())
    assert float(a.detach()) == pytest.approx(float(b.detach()), abs=1e-15)

    runs = []
    for _ in range(2):
        x = scalar(4.0)
        optimizer = NoisySGD([x], lr=0.1, noise=1.0, generator=torch.Generator().manual_seed(3))
        for _ in range(5):
            optimizer_step(optimizer, lambda: (x * x).sum())
        runs.append(float(x.detach()))
    assert runs[0] == runs[1] and runs[0] != pytest.approx(float(b.detach()))


def test_schedules_follow_the_course_formulas():
    x = scalar(1.0)
    values = {}
    for name in SCHEDULES:
        optimizer = torch.optim.SGD([x], lr=1.0)
        schedule = make_schedule(name, optimizer, steps=30)
        for _ in range(5):
            optimizer.step()
            schedule.step()
        values[name] = optimizer.param_groups[0]["lr"]
    assert values["constant"] == pytest.approx(1.0)
    assert values["exponential"] == pytest.approx(math.exp(-0.5))
    assert values["polynomial"] == pytest.approx(1.5**-0.5)
    assert values["piecewise"] == pytest.approx(1.0)  # first milestone at step 10


# ---- RSO --------------------------------------------------------------------------------------------------


def tiny_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    inputs = torch.randn(16, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(16, 2, generator=generator, dtype=torch.float64)
    return model, lambda: ((model(inputs) - targets) ** 2).mean()


def test_rso_never_increases_a_deterministic_loss():
    model, loss_fn = tiny_problem()
    optimizer = RSO(model.parameters(), sigma=0.3, seed=1)
    previous = loss_fn().item()
    first = previous
    for _ in range(4):
        returned = optimizer.step(loss_fn)
        now = loss_fn().item()
        assert isinstance(returned, torch.Tensor) and returned.item() == pytest.approx(now, rel=1e-12)
        assert now <= previous + 1e-15
        previous = now
    assert previous < 0.8 * first
    assert optimizer.evaluations == 4 * 3 * sum(p.numel() for p in model.parameters())


def test_rso_state_dict_round_trip_continues_identically():
    model_a, loss_a = tiny_problem()
    model_b, loss_b = tiny_problem()
    a = RSO(model_a.parameters(), sigma=0.3, cycles=4, seed=7)
    b = RSO(model_b.parameters(), sigma=0.3, cycles=4, seed=7)
    a.step(loss_a)
    b.step(loss_b)
    saved = b.state_dict()
    # A fresh optimizer with another seed, loaded mid-way, must continue exactly like `a`.
    c = RSO(model_b.parameters(), sigma=0.3, cycles=4, seed=999)
    c.load_state_dict(saved)
    assert c.cycle == 1
    for _ in range(3):
        a.step(loss_a)
        c.step(loss_b)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    # And a different seed really does give a different run (the test above could fail).
    model_d, loss_d = tiny_problem()
    d = RSO(model_d.parameters(), sigma=0.3, cycles=4, seed=999)
    for _ in range(4):
        d.step(loss_d)
    assert not all(torch.equal(pa, pd) for pa, pd in zip(model_a.parameters(), model_d.parameters()))


def test_rso_sigma_defaults_and_annealing():
    model, _ = tiny_problem()
    optimizer = RSO(model.parameters(), cycles=10)
    first_weight, first_bias = model[0].weight, model[0].bias
    group = optimizer.param_groups[0]
    assert optimizer.base_sigma(first_weight, group) == pytest.approx(math.sqrt(2 / 3))
    assert optimizer.base_sigma(first_bias, group) == pytest.approx(0.167)
    assert optimizer.current_sigma(first_weight, optimizer.param_groups[0]) == pytest.approx(math.sqrt(2 / 3))
    optimizer.cycle = 9
    assert optimizer.current_sigma(first_weight, optimizer.param_groups[0]) == pytest.approx(math.sqrt(2 / 3) * 0.19)


def test_rso_visiting_order():
    model, _ = tiny_problem()
    params = list(model.parameters())
    output_first = [p for _, p in RSO(model.parameters(), order="output-first").visit_order()]
    input_first = [p for _, p in RSO(model.parameters(), order="input-first").visit_order()]
    assert output_first == params[::-1] and input_first == params


def test_rso_ties_keep_the_current_weight_and_hook_runs_per_scalar():
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    visits = []
    optimizer = RSO([x], sigma=1.0)
    optimizer.step(lambda: torch.tensor(5.0), before_visit=lambda: visits.append(1))
    assert x.tolist() == [1.0, 2.0] and len(visits) == 2


def test_rso_weight_decay_shrinks_on_a_flat_loss():
    x = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    RSO([x], sigma=1.0, weight_decay=0.1).step(lambda: torch.tensor(0.0))
    assert float(x.detach()) == pytest.approx(0.9)


def test_rso_errors():
    x = scalar(1.0)
    with pytest.raises(ValueError, match="closure"):
        RSO([x], sigma=1.0).step()
    with pytest.raises(RuntimeError, match="non-finite"):
        RSO([x], sigma=1.0).step(lambda: torch.tensor(float("nan")))
    assert float(x.detach()) == 1.0
    for kwargs, fragment in [({"sigma": -1.0}, "sigma"), ({"order": "sideways"}, "sideways"), ({"sampler": "cauchy"}, "cauchy"),
                             ({"cycles": 0}, "cycles"), ({"weight_decay": 1.5}, "weight_decay")]:
        with pytest.raises(ValueError, match=fragment):
            RSO([x], **kwargs)


def test_registry_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="unknown optimizer 'adamw2'"):
        make_optimizer("adamw2", [scalar(1.0)])
    with pytest.raises(ValueError, match="lr must be positive, got -0.1"):
        make_optimizer("sgd", [scalar(1.0)], lr=-0.1)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        make_schedule("cosine", torch.optim.SGD([scalar(1.0)], lr=0.1))
    assert all(isinstance(description, str) and description for _, description in OPTIMIZERS.values())


def test_rso_for_model_uses_the_trainers_visit_order_and_sigmas():
    from rso.models import build_model
    from rso.optim import RSO
    from rso.search.visit import visit_order

    model = build_model("convnet", torch.Generator().manual_seed(0), depth=2, channels=3)
    optimizer = RSO.for_model(model, cycles=2)
    names = {id(p): n for n, p in model.named_parameters()}
    visited = [(names[id(p)], optimizer.base_sigma(p, group)) for group, p in optimizer.visit_order()]
    expected = [(t.name, t.sigma) for t in visit_order(model)]
    assert visited == expected and visited[1][0] == "3.weight" and visited[2][0] == "4.bias"
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    from rso.engines import batch_statistics

    @torch.no_grad()  # RSO runs the closure under enable_grad (like LBFGS); this one needs no graph
    def closure():
        with batch_statistics(model):
            return torch.nn.functional.cross_entropy(model(x), y)

    before = closure().item()
    assert optimizer.step(closure) < before
