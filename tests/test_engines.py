"""The fast engine against the reference (the oracle): loss for loss, decision for decision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rso.data import load_mnist
from rso.engines import ENGINES, ChunkPartition, FastEngine, PrefixCacheEngine, ReferenceEngine, make_engine
from rso.models import build_model, he_init_
from rso.search.candidates import gaussian_steps
from rso.search.loop import run_sweep
from rso.search.visit import visit_order

from engine_checks import compare_visits  # noqa: E402  (tests/ is on sys.path under pytest)



pytestmark = pytest.mark.usefixtures("one_thread")   # conftest


@pytest.fixture(scope="module")
def mnist(data_dir):
    """96 real training images (conftest's data_dir fails, never skips, when MNIST is missing)."""
    data = load_mnist(data_dir, train_subset=96, test_subset=1, download=False)
    return data.train_images, data.train_labels


def small_nets() -> dict[str, nn.Sequential]:
    """Tiny nets covering every supported layer kind and layout."""
    return {
        "conv-bn-pools": nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(3, 10)),
        "oneconv-like": nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(392, 10)),
        "strided-flat-bn": nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                         nn.BatchNorm1d(392), nn.Linear(392, 10)),
        "oneconv-tiny": nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Flatten(), nn.Linear(98, 10)),
        "same-padding": nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.BatchNorm2d(2), nn.ReLU(),
                                      nn.Conv2d(2, 3, 3, padding="same", bias=False), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Flatten(), nn.Linear(3 * 14 * 14, 10)),
        # a conv straight into a conv (an empty block), and convs that an average pooling follows (folded);
        # no bias before the BN (its candidates' losses would differ by rounding only: ties, no decision)
        "stacked-convs": nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1, bias=False),
                                       nn.AvgPool2d(2),
                                       nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1), nn.AvgPool2d(2),
                                       nn.Flatten(), nn.Linear(2 * 7 * 7, 10)),
        "mlp-bn": nn.Sequential(nn.Flatten(), nn.Linear(784, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5),
                                nn.ReLU(), nn.Linear(5, 10)),
    }


def randomize(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    he_init_(model, generator)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model


@pytest.mark.parametrize("kernels", ["torch", "numba"])
@pytest.mark.parametrize("name", list(small_nets()))
def test_losses_equal_reference_float64(name, kernels, mnist):
    images, labels = mnist
    model = randomize(small_nets()[name], seed=1).double()
    images = images.double()
    assert FastEngine.supports(model)
    total_accepted = 0
    for target in visit_order(model):
        _, accepted = compare_visits(model, target, images, labels, 32, FastEngine(kernels=kernels), visits=20)
        total_accepted += accepted
    assert total_accepted > 0   # the incremental cache updates were exercised


@pytest.mark.parametrize("name", list(small_nets()))
def test_prefix_cache_engine_equals_reference_float64(name, mnist):
    """The bench's anchor (cached prefix, full forward from the searched layer) is exact too."""
    images, labels = mnist
    model = randomize(small_nets()[name], seed=1).double()
    for target in visit_order(model):
        compare_visits(model, target, images.double(), labels, 32, PrefixCacheEngine(), visits=6)


@pytest.mark.parametrize("kernels", ["torch", "numba"])
def test_losses_equal_reference_out_of_order(kernels, mnist):
    """Visits in no particular order (not the loop's row-major one) still give exact losses."""
    images, labels = mnist
    model = randomize(small_nets()["conv-bn-pools"], seed=2).double()
    for target in visit_order(model)[1:4]:
        compare_visits(model, target, images.double(), labels, 32, FastEngine(kernels=kernels), visits=30,
                       order="random")


@pytest.mark.parametrize("kernels", ["torch", "numba"])
def test_losses_float32_agree(kernels, mnist):
    images, labels = mnist
    model = randomize(build_model("convnet", depth=3, channels=4), seed=3)
    for target in visit_order(model):
        compare_visits(model, target, images, labels, 48, FastEngine(kernels=kernels), visits=8, rtol=2e-5)


def run_cycle(model, engine_name, images, labels, batch_size, seed, weight_decay=1e-4, **options):
    generator = torch.Generator().manual_seed(seed)
    decisions = []
    for target in visit_order(model):
        engine = make_engine(engine_name, model, **options)
        stats = run_sweep(model, target, images, labels, engine, sigma=target.sigma, batch_size=batch_size,
                          sampler=gaussian_steps, generator=generator, weight_decay=weight_decay)
        decisions.append((stats.visits, stats.accepted, stats.loss_sum))
    return decisions


@pytest.mark.parametrize("name", ["convnet", "oneconv-tiny", "stacked-convs"])
def test_full_cycle_identical(name, mnist):
    """One cycle with the same seed: identical accept decisions and final weights (float64), for the numba
    output-layer sweep and for the PyTorch-operators path (the one CUDA runs)."""
    images, labels = mnist
    images = images.double()

    def build():
        if name == "convnet":
            return build_model("convnet", torch.Generator().manual_seed(4), depth=2, channels=3).double()
        return randomize(small_nets()[name], seed=4).double()

    # no weight decay for the convnet: candidate 0 is then the current weight and its loss is reused
    weight_decay = 0.0 if name == "convnet" else 1e-4
    reference_model = build()
    expected = run_cycle(reference_model, "reference", images, labels, 32, seed=5, weight_decay=weight_decay)
    for kernels in ("auto", "torch"):
        fast_model = build()
        got = run_cycle(fast_model, "fast", images, labels, 32, seed=5, weight_decay=weight_decay,
                        kernels=kernels)
        assert [d[:2] for d in got] == [d[:2] for d in expected], kernels
        for (_, _, a), (_, _, b) in zip(got, expected):
            assert a == pytest.approx(b, rel=1e-12)
        for (key, a), (_, b) in zip(reference_model.state_dict().items(), fast_model.state_dict().items()):
            assert torch.equal(a, b), (kernels, key)


def test_float32_full_cycle_counts_differing_decisions(data_dir):
    """One full cycle of a small convnet in float32, both engines in lockstep (experiments.exactness): how many
    accept decisions the fast engine's rounding would flip, bounded; float64 flips none. The float32 losses
    really do differ (so the count measures something), and reduced precision in the suffix flips many."""
    from experiments.exactness import lockstep_cycle

    data = load_mnist(data_dir, train_subset=512, test_subset=1, download=False)

    def cycle(dtype, **engine):
        model = build_model("convnet", torch.Generator().manual_seed(0), depth=2, channels=3).to(dtype)
        return lockstep_cycle(model, data.train_images, data.train_labels, 64, seed=0, fast=FastEngine(**engine))

    exact, single = cycle(torch.float64), cycle(torch.float32)
    assert exact.visits == single.visits == 150
    assert exact.differing_decisions == 0 and exact.worst_relative_difference < 1e-12
    assert 1e-10 < single.worst_relative_difference < 2e-6
    assert single.differing_decisions <= 2        # measured: 0 of 150 (python -m experiments.exactness --quick)
    coarse = cycle(torch.float32, suffix_precision="bfloat16")
    assert coarse.differing_decisions > single.differing_decisions


def test_registry_and_auto():
    assert "fast" in ENGINES
    assert ENGINES["fast"][0].supports(build_model("paper6"))
    assert ENGINES["fast"][0].supports(build_model("oneconv"))
    assert isinstance(make_engine("auto", build_model("mlp")), FastEngine)
    unsupported = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    assert not FastEngine.supports(unsupported)
    assert isinstance(make_engine("auto", unsupported), ReferenceEngine)
    with pytest.raises(ValueError):
        FastEngine(kernels="cuda-only")


def test_fused_head_sweep_reports_progress_during_the_sweep(mnist, monkeypatch):
    """The output layer's numba sweep runs in blocks and reports progress between them (not all at the end),
    with the same counts and decisions as the per-visit loop."""
    from rso.engines import kernels as numba_kernels

    images, labels = mnist
    blocks_run = []
    loop = numba_kernels._dense_head_loop
    monkeypatch.setattr(numba_kernels, "_dense_head_loop", lambda *args: blocks_run.append(1) or loop(*args))
    reports = {}
    for kernels in ("numba", "torch"):
        model = build_model("mlp", torch.Generator().manual_seed(6), widths=(300,))
        target = visit_order(model)[0]          # the 10 x 300 output weights: 3000 visits
        assert target.numel == 3000
        calls = []
        stats = run_sweep(model, target, images, labels, FastEngine(kernels=kernels), sigma=target.sigma,
                          batch_size=32, sampler=gaussian_steps, generator=torch.Generator().manual_seed(7),
                          progress=lambda visits, loss, accepted: calls.append((visits, accepted, len(blocks_run))))
        assert sum(visits for visits, _, _ in calls) == stats.visits == 3000
        assert sum(accepted for _, accepted, _ in calls) == stats.accepted
        reports[kernels] = (calls, stats.accepted, model[-1].weight.detach().clone())
    numba_calls = reports["numba"][0]
    assert len(blocks_run) == 3 and numba_calls[0][2] == 1    # the first report came after the first block
    assert len(numba_calls) == len(reports["torch"][0])
    assert reports["numba"][1] == reports["torch"][1]
    assert torch.equal(reports["numba"][2], reports["torch"][2])


@pytest.mark.parametrize("decay", [0.0, 1e-3])
@pytest.mark.parametrize("kernels", ["torch", "numba"])
def test_a_rejected_visit_then_another_chunks_step_with_an_empty_block(kernels, decay, mnist):
    """A searched conv straight into the next conv (an empty block: the chunk's block output IS its
    preactivation): chunk 0 rejects, chunk 1 accepts a step in the same channel, chunk 0 then catches up on
    it (added in place only where nothing else holds the tensor), then both move to the next channel. With
    ``decay`` candidate 0 is not the current weight (the chunk's block output is then a candidate of its own).
    Losses as the reference's."""
    images, labels = mnist
    model = randomize(small_nets()["stacked-convs"], seed=4).double()
    target = next(t for t in visit_order(model) if t.name == "0.weight")
    partition = ChunkPartition(torch.arange(len(labels)), 32)
    fast, reference = FastEngine(kernels=kernels), ReferenceEngine()
    for engine in (fast, reference):
        engine.begin_sweep(model, target, images.double(), labels, partition)
    flat = target.parameter.data.view(-1)
    for index, chunk, accept in [(0, 0, False), (1, 1, True), (2, 0, True), (3, 1, False), (4, 0, False),
                                 (5, 1, True), (10, 0, True), (11, 1, False), (12, 0, False)]:
        current = flat[index].item() * (1 - decay)
        values = torch.tensor([current, current + 0.3, current - 0.3], dtype=torch.float64)
        expected = reference.score(index, values, chunk)
        torch.testing.assert_close(fast.score(index, values, chunk), expected, rtol=1e-10, atol=0)
        if accept:
            flat[index] = values[1]
            for engine in (fast, reference):
                engine.commit(index, values[1].item(), chunk)
