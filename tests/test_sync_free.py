"""The sync-free engine (the GPU path, run on the CPU here) against the reference: losses, decisions, final
weights, progress counts, the non-finite stop, and no host-device synchronization inside a sweep."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rso.engines import ENGINES, SyncFreeEngine, make_engine
from rso.engines.sync_free import HostReads
from rso.models import build_model
from rso.search.candidates import gaussian_steps
from rso.search.loop import NonFiniteLossError, run_sweep
from rso.search.visit import visit_order
from engine_checks import compare_visits
from test_engines import mnist, randomize, run_cycle, small_nets  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest


def authors_structure() -> nn.Sequential:
    """The authors' layer order, small: conv -> [avgpool] -> BN(eps 1e-3) -> ReLU opening the next layer, no
    ReLU after the last BN, global max pooling, dense without bias."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3, eps=1e-3), nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.AvgPool2d(2), nn.BatchNorm2d(3, eps=1e-3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, eps=1e-3),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 10, bias=False))


def nets() -> dict[str, nn.Sequential]:
    return {**small_nets(), "authors": authors_structure()}


@pytest.mark.parametrize("name", list(nets()))
def test_losses_equal_reference_float64(name, mnist):
    """Loss for loss through score/commit (the same layer math as the sweep), with the reference's choices."""
    images, labels = mnist
    model = randomize(nets()[name], seed=1).double()
    assert SyncFreeEngine.supports(model)
    accepted = sum(compare_visits(model, target, images.double(), labels, 32, SyncFreeEngine(), visits=16)[1]
                   for target in visit_order(model))
    assert accepted > 0


BUILDERS = {
    "oneconv-tiny": lambda: randomize(small_nets()["oneconv-tiny"], seed=4),
    "convnet": lambda: build_model("convnet", torch.Generator().manual_seed(4), depth=2, channels=3),
    "authors": lambda: randomize(authors_structure(), seed=4),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_full_cycle_identical(name, mnist):
    """One cycle of whole sync-free sweeps, same seed: identical decisions and bit-identical final weights."""
    images, labels = mnist
    images = images.double()
    weight_decay = 0.0 if name == "convnet" else 1e-4
    reference_model, model = BUILDERS[name]().double(), BUILDERS[name]().double()
    expected = run_cycle(reference_model, "reference", images, labels, 32, seed=5, weight_decay=weight_decay)
    got = run_cycle(model, "sync-free", images, labels, 32, seed=5, weight_decay=weight_decay)
    assert [d[:2] for d in got] == [d[:2] for d in expected]
    assert sum(d[1] for d in got) > 0
    for (_, _, a), (_, _, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-12)
    for (key, a), (_, b) in zip(reference_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), key


def sweep(model, target, images, labels, engine, seed=7, **options):
    return run_sweep(model, target, images, labels, engine, sigma=target.sigma, batch_size=24, sampler=gaussian_steps,
                     generator=torch.Generator().manual_seed(seed), **options)


def test_no_host_sync_inside_a_sweep(mnist):
    """Every call that makes the host wait for the device is recorded during whole sweeps: the only ones are
    the progress reads, one per ``report_every`` visits."""
    images, labels = mnist
    model = randomize(authors_structure(), seed=2)
    probe = HostReads()
    with probe:                       # the instrument sees what it must: value reads, bool tests, masks
        x = torch.ones(3)
        x.sum().item(), bool(x[0] > 0), x[x > 0], x.tolist(), float(x[1]), torch.nonzero(x)
    assert probe.calls == ["item", "__bool__", "__getitem__[bool]", "tolist", "__float__", "nonzero"]
    for target in visit_order(model)[:4]:     # dense head, conv weight, BN beta, BN gamma
        engine = SyncFreeEngine(report_every=10)
        engine.watch = HostReads()
        reports = []
        stats = sweep(model, target, images, labels, engine, progress=lambda *report: reports.append(report))
        reads = -(-target.numel // 10)
        assert engine.watch.calls == ["tolist"] * reads, target.name
        assert len(reports) == reads and sum(visits for visits, _, _ in reports) == stats.visits == target.numel


def test_progress_and_counts_match_the_per_visit_loop(mnist):
    images, labels = mnist
    for engine_name in ("reference", "sync-free"):
        model = randomize(small_nets()["conv-bn-pools"], seed=3).double()
        target = visit_order(model)[2]            # the last conv's weights: 108 visits
        reports = []
        stats = sweep(model, target, images.double(), labels, make_engine(engine_name),
                      progress=lambda visits, loss, accepted: reports.append((visits, loss, accepted)))
        assert sum(visits for visits, _, _ in reports) == stats.visits == target.numel
        assert sum(accepted for _, _, accepted in reports) == stats.accepted
        if engine_name == "reference":
            expected = (stats.accepted, stats.loss_sum, model.state_dict())
    assert stats.accepted == expected[0] and 0 < stats.accepted < target.numel
    assert stats.loss_sum == pytest.approx(expected[1], rel=1e-12)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[2][key]), key


def test_non_finite_losses_stop_where_the_loop_stops(mnist):
    """A chunk whose losses are all NaN: the sync-free sweep freezes at that visit on the device and raises at
    the next read, with the weights and the message of the per-visit loop."""
    images, labels = mnist
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(7))
    images = images.double().clone()
    images[order[2 * 24]] = float("nan")          # one example of chunk 2: visits 2, 6, 10, ... all NaN
    errors, weights = [], []
    for engine_name in ("reference", "sync-free"):
        model = randomize(small_nets()["conv-bn-pools"], seed=3).double()
        target = visit_order(model)[2]
        with pytest.raises(NonFiniteLossError) as error:
            sweep(model, target, images, labels, make_engine(engine_name))
        errors.append(str(error.value).split(" (losses")[0])
        weights.append(target.parameter.detach().clone())
    assert errors[0] == errors[1] == f"every candidate loss is non-finite at {target.name}[2]"
    assert torch.equal(weights[0], weights[1])


def test_float32_sweep_agrees_with_the_reference(mnist):
    """float32: the same candidates, losses equal to float32 rounding (decisions may differ on near-ties)."""
    images, labels = mnist
    model = randomize(build_model("convnet", depth=2, channels=3), seed=3)
    for target in visit_order(model):
        compare_visits(model, target, images, labels, 32, SyncFreeEngine(), visits=8, rtol=2e-5)


def test_registry_and_options():
    assert "sync-free" in ENGINES and SyncFreeEngine.supports(build_model("paper6"))
    assert isinstance(make_engine("sync-free", build_model("oneconv")), SyncFreeEngine)
    with pytest.raises(ValueError, match="graphs"):
        SyncFreeEngine(graphs="always")
    with pytest.raises(ValueError, match="report_every"):
        SyncFreeEngine(report_every=0)
    from rso.distributed import World
    with pytest.raises(ValueError, match="scores in one process"):
        make_engine("sync-free", build_model("oneconv"), world=World(rank=0, size=2))
    unsupported = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    assert not SyncFreeEngine.supports(unsupported)


def test_graphs_on_needs_cuda(mnist):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the GPU check covers graphs")
    images, labels = mnist
    model = randomize(small_nets()["oneconv-tiny"], seed=1)
    target = visit_order(model)[0]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        sweep(model, target, images, labels, SyncFreeEngine(graphs="on"))
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_full_cycle_identical_with_bn_fixed_below(mnist):
    """The authors' BN handling (statistics of the first images fixed below the searched layer): one cycle,
    identical decisions and weights."""
    images, labels = mnist
    images = images.double()
    results = []
    for engine_name in ("reference", "sync-free"):
        model = randomize(authors_structure(), seed=6).double()
        generator, accepted = torch.Generator().manual_seed(8), []
        for target in visit_order(model):
            stats = run_sweep(model, target, images, labels, make_engine(engine_name, model), sigma=target.sigma,
                              batch_size=32, sampler=gaussian_steps, generator=generator, weight_decay=1e-4,
                              fixed_bn_images=images[:40])
            accepted.append(stats.accepted)
        results.append((accepted, model.state_dict()))
    assert results[0][0] == results[1][0] and sum(results[0][0]) > 0
    for key, value in results[0][1].items():
        assert torch.equal(value, results[1][1][key]), key
