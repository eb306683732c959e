"""The authors' MNIST network (``paper6``), their input transform and their BN handling during the search:
each against a hand-written computation in this file, and the fast engine against the reference on it."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rso.config import PRESETS, TrainConfig
from rso.data import load_mnist
from rso.engines import ChunkPartition, FastEngine, ReferenceEngine, batch_statistics, fixed_statistics
from rso.models import INPUT_TRANSFORMS, authors_convnet, build_model, he_init_
from rso.search.candidates import gaussian_steps
from rso.search.loop import run_sweep
from rso.search.visit import visit_order

from engine_checks import compare_every_tensor  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest


def authors_forward(weights: dict, x: torch.Tensor, statistics: dict | None = None) -> torch.Tensor:
    """The ``forward`` of the authors' ``CNN_ND`` written out by hand (MXNet ops as torch functionals).

    ``weights``: conv0..conv5 (16, C, 3, 3), gamma0..5, beta0..5, dense (16, 10) as in their code (x @ W).
    ``statistics``: per layer (mean, variance) for inference-mode BN; None: each BN uses the batch's statistics.
    """
    for layer in range(6):
        if layer > 0:
            x = torch.maximum(x, torch.zeros_like(x))
        x = F.conv2d(x, weights[f"conv{layer}"], padding=1)
        if layer in (1, 3):
            x = F.avg_pool2d(x, 2, 2)
        if statistics is None:
            mean, variance = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        else:
            mean, variance = statistics[layer]
        x = (x - mean[None, :, None, None]) / torch.sqrt(variance[None, :, None, None] + 1e-3)
        x = x * weights[f"gamma{layer}"][None, :, None, None] + weights[f"beta{layer}"][None, :, None, None]
    x = x.amax(dim=(2, 3))
    return x @ weights["dense"]


def random_authors_weights(model: nn.Sequential, seed: int) -> dict:
    """Random weights (BN gamma/beta too) written into ``model``, returned in the authors' layout."""
    generator = torch.Generator().manual_seed(seed)
    he_init_(model, generator)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    norms = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    weights = {}
    with torch.no_grad():
        for layer, (conv, norm) in enumerate(zip(convs, norms)):
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=generator, dtype=norm.weight.dtype))
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=generator, dtype=norm.bias.dtype))
            weights[f"conv{layer}"] = conv.weight.clone()
            weights[f"gamma{layer}"], weights[f"beta{layer}"] = norm.weight.clone(), norm.bias.clone()
    weights["dense"] = model[-1].weight.detach().t().clone()   # their dense matrix is (features, classes)
    return weights


def test_paper6_is_the_authors_network_layer_for_layer():
    model = build_model("paper6")
    kinds = [type(m).__name__ for m in model]
    expected = ["Conv2d", "BatchNorm2d"]
    for layer in range(1, 6):
        expected += ["ReLU", "Conv2d"] + (["AvgPool2d"] if layer in (1, 3) else []) + ["BatchNorm2d"]
    expected += ["AdaptiveMaxPool2d", "Flatten", "Linear"]
    assert kinds == expected
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    norms = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None and c.out_channels == 16 for c in convs)
    assert all(n.eps == 1e-3 for n in norms)
    assert model[-1].bias is None and model[-1].in_features == 16
    assert sum(m.weight.numel() for m in convs) + model[-1].weight.numel() == 11824   # reference.md
    assert sum(p.numel() for m in norms for p in m.parameters()) == 192
    assert INPUT_TRANSFORMS["paper6"] == "center" and INPUT_TRANSFORMS["paper6-cbr"] == "standardize"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper6_forward_equals_the_hand_written_authors_forward(dtype):
    model = build_model("paper6").to(dtype)
    weights = random_authors_weights(model, seed=3)
    x = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(4), dtype=dtype)
    tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    with torch.no_grad(), batch_statistics(model):
        torch.testing.assert_close(model(x), authors_forward(weights, x), **tolerance)
    # inference mode with given moving statistics, as the authors evaluate
    norms = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    generator = torch.Generator().manual_seed(5)
    statistics = {layer: (torch.randn(16, generator=generator, dtype=dtype),
                          torch.rand(16, generator=generator, dtype=dtype) + 0.5) for layer in range(6)}
    for layer, norm in enumerate(norms):
        norm.running_mean.copy_(statistics[layer][0])
        norm.running_var.copy_(statistics[layer][1])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), authors_forward(weights, x, statistics), **tolerance)


def test_center_transform_is_the_authors(data_dir):
    """Pixels / 255 minus the mean of all 60,000 training images' pixels (read here from the raw file)."""
    raw = data_dir / "MNIST" / "raw"
    name = "train-images-idx3-ubyte"
    path = raw / name if (raw / name).is_file() else raw / (name + ".gz")
    content = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    pixels = np.frombuffer(content, dtype=np.uint8, offset=16).reshape(60000, 28, 28)
    mean = pixels.astype(np.float64).mean() / 255.0
    data = load_mnist(data_dir, train_subset=50, test_subset=50, download=False, transform="center")
    assert data.transform == "center"
    expected = torch.from_numpy(pixels[:50].astype(np.float32) / np.float32(255.0)) - float(mean)
    torch.testing.assert_close(data.train_images[:, 0], expected, rtol=0, atol=1e-6)
    assert 0.12 < mean < 0.14       # MNIST's well-known 0.1307
    with pytest.raises(ValueError, match="unknown input transform 'whiten'"):
        load_mnist(data_dir, train_subset=5, test_subset=5, download=False, transform="whiten")


def test_fixed_statistics_are_the_authors_reset(mnist_small):
    """Each BN below the searched layer: mean and biased variance of its input over the images, in one
    training-mode forward pass (the authors' momentum-0 reset), computed here by the hand-written forward."""
    model = build_model("paper6").double()
    weights = random_authors_weights(model, seed=6)
    images = mnist_small.train_images[:300].double()
    conv4 = [m for m in model if isinstance(m, nn.Conv2d)][4]
    statistics = fixed_statistics(model, images, conv4)
    norms = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    assert set(statistics) == set(norms[:4])
    x = images
    for layer in range(4):
        if layer > 0:
            x = x.clamp_min(0)
        x = F.conv2d(x, weights[f"conv{layer}"], padding=1)
        if layer in (1, 3):
            x = F.avg_pool2d(x, 2)
        mean, variance = x.mean((0, 2, 3)), ((x - x.mean((0, 2, 3), keepdim=True)) ** 2).mean((0, 2, 3))
        torch.testing.assert_close(statistics[norms[layer]][0], mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(statistics[norms[layer]][1], variance, rtol=1e-12, atol=1e-12)
        x = (x - mean[None, :, None, None]) / torch.sqrt(variance[None, :, None, None] + 1e-3)
        x = x * weights[f"gamma{layer}"][None, :, None, None] + weights[f"beta{layer}"][None, :, None, None]
    # inside the context, the fixed layers normalize with these statistics; the model's own are put back
    before = [n.running_mean.clone() for n in norms]
    with torch.no_grad(), batch_statistics(model, statistics):
        chunk = mnist_small.train_images[300:340].double()
        got = model(chunk)
    assert all(torch.equal(a, n.running_mean) for a, n in zip(before, norms))
    assert all(n.training for n in norms)
    fixed_then_batch = {layer: statistics[norms[layer]] for layer in range(4)}
    x = chunk
    for layer in range(6):
        if layer > 0:
            x = x.clamp_min(0)
        x = F.conv2d(x, weights[f"conv{layer}"], padding=1)
        if layer in (1, 3):
            x = F.avg_pool2d(x, 2)
        mean, variance = fixed_then_batch.get(layer, (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)))
        x = (x - mean[None, :, None, None]) / torch.sqrt(variance[None, :, None, None] + 1e-3)
        x = x * weights[f"gamma{layer}"][None, :, None, None] + weights[f"beta{layer}"][None, :, None, None]
    torch.testing.assert_close(got, x.amax(dim=(2, 3)) @ weights["dense"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("search_bn", ["chunk", "fixed-below"])
@pytest.mark.parametrize("kernels", ["torch", "numba"])
def test_fast_equals_reference_on_the_authors_pattern_float64(kernels, search_bn, mnist_small):
    """A narrow copy of paper6 (3 channels), random weights, real MNIST chunks: every tensor, both BN modes."""
    model = authors_convnet(depth=6, channels=3).double()
    random_authors_weights(model, seed=7)
    images, labels = mnist_small.train_images[:96].double(), mnist_small.train_labels[:96]
    fixed_images = mnist_small.train_images[1000:1200].double() if search_bn == "fixed-below" else None
    compare_every_tensor(model, images, labels, 32, lambda: FastEngine(kernels=kernels), fixed_images=fixed_images)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_fast_equals_reference_on_paper6_at_real_width(dtype, rtol, mnist_small):
    """paper6 itself (16 channels) at batch 250 on real MNIST: two visits of every tensor (its BN layers below the
    searched one fixed, the authors' handling; the chunk-statistics mode is covered on the narrow copy)."""
    model = build_model("paper6", torch.Generator().manual_seed(8)).to(dtype)
    images, labels = mnist_small.train_images[:500].to(dtype), mnist_small.train_labels[:500]
    worst = compare_every_tensor(model, images, labels, 250, lambda: FastEngine(kernels="auto"), visits=2, seed=1, rtol=rtol,
                            fixed_images=mnist_small.train_images[1000:1500].to(dtype))
    print(f"paper6 {dtype}: worst relative loss difference fast vs reference {worst:.3g}")


def run_cycle(model, engine, images, labels, fixed_images, kernels=None):
    generator = torch.Generator().manual_seed(9)
    decisions = []
    for target in visit_order(model):
        options = {} if kernels is None else {"kernels": kernels}
        scorer = ReferenceEngine() if engine == "reference" else FastEngine(**options)
        stats = run_sweep(model, target, images, labels, scorer, sigma=target.sigma, batch_size=32,
                          sampler=gaussian_steps, generator=generator, weight_decay=1e-4,
                          fixed_bn_images=fixed_images)
        decisions.append((target.name, stats.visits, stats.accepted))
    return decisions


@pytest.mark.parametrize("search_bn", ["chunk", "fixed-below"])
def test_full_cycle_identical_on_the_authors_pattern(search_bn, mnist_small):
    """One whole cycle (every weight of every tensor): identical decisions and bit-identical weights, float64,
    on the numba and the torch kernel paths."""
    images, labels = mnist_small.train_images[:64].double(), mnist_small.train_labels[:64]
    fixed_images = mnist_small.train_images[500:600].double() if search_bn == "fixed-below" else None

    def build():
        model = authors_convnet(depth=6, channels=2).double()
        random_authors_weights(model, seed=10)
        return model

    reference_model = build()
    expected = run_cycle(reference_model, "reference", images, labels, fixed_images)
    assert sum(accepted for _, _, accepted in expected) > 0
    for kernels in ("numba", "torch"):
        fast_model = build()
        assert run_cycle(fast_model, "fast", images, labels, fixed_images, kernels) == expected, kernels
        for (key, a), (_, b) in zip(reference_model.state_dict().items(), fast_model.state_dict().items()):
            assert torch.equal(a, b), (kernels, key)


def test_fixed_below_changes_what_the_search_sees(mnist_small):
    """The two BN modes score the same candidates differently below the searched layer (the option is live)."""
    model = authors_convnet(depth=3, channels=2).double()
    random_authors_weights(model, seed=11)
    target = next(t for t in visit_order(model) if t.module is model[-1])      # the dense layer
    partition = ChunkPartition(torch.arange(64), 32)
    images, labels = mnist_small.train_images[:64].double(), mnist_small.train_labels[:64]
    losses = []
    for fixed in (None, fixed_statistics(model, mnist_small.train_images[500:700].double(), target.module)):
        engine = ReferenceEngine()
        engine.begin_sweep(model, target, images, labels, partition, fixed)
        losses.append(engine.score(0, torch.tensor([0.1, 0.2], dtype=torch.float64), 0))
    assert not torch.allclose(losses[0], losses[1])


def test_authors_preset_records_every_choice():
    from rso.config import parse_args

    config, given, _ = parse_args(["--preset", "authors", "--cycles", "7"])
    assert config.cycles == 7 and config.preset == "authors"
    for key, value in PRESETS["authors"].items():
        if key != "cycles":
            assert getattr(config, key) == value, key
    assert (config.model, config.batch_size, config.weight_decay, config.search_bn, config.search_bn_images,
            config.input_transform) == ("paper6", 5000, 1e-4, "fixed-below", 2000, "center")
    assert TrainConfig(model="paper6").resolved_input_transform() == "center"
    assert TrainConfig(model="oneconv").resolved_input_transform() == "standardize"
    assert math.isclose(PRESETS["authors"]["final_sigma_fraction"], 0.1)
