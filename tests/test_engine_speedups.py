"""The fast engine's single-process speedups: each against the plain reference or the PyTorch operators."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rso.engines import FastEngine, make_engine
from rso.engines.fast import FastEngine as _FastEngine
from rso.models import he_init_
from rso.search.candidates import gaussian_steps
from rso.search.loop import run_sweep
from rso.search.visit import visit_order


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest


def conv_net() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Conv2d(4, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 10))
    return he_init_(model, torch.Generator().manual_seed(3)).double()


def count_calls(monkeypatch, method: str, counted=lambda *args, **kwargs: True) -> list:
    """A list that gets one entry per call of ``FastEngine.<method>`` whose arguments ``counted`` accepts
    (clear it to restart the count); the method runs as before."""
    calls = []
    original = getattr(_FastEngine, method)

    def counting(self, *args, **kwargs):
        if counted(*args, **kwargs):
            calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_FastEngine, method, counting)
    return calls


@pytest.mark.parametrize("kernels", ["torch", "numba"])
def test_next_layer_output_follows_once_per_channel(kernels, monkeypatch):
    """Accepted steps leave the next layer's cached output behind until the chunk moves to another channel:
    one update per channel left, not one per accepted step, with the reference's decisions and weights."""
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(40, 1, 8, 8, generator=generator, dtype=torch.float64), torch.arange(40) % 10
    updates = count_calls(monkeypatch, "_through_next",
                          lambda *args, **kwargs: kwargs.get("update") or (len(args) > 6 and args[6]))
    results = {}
    for engine_name in ("reference", "fast"):
        model = conv_net()
        target = next(t for t in visit_order(model) if t.name == "0.weight")   # the first conv: 3 channels x 9
        engine = make_engine(engine_name, model, **({"kernels": kernels} if engine_name == "fast" else {}))
        updates.clear()
        stats = run_sweep(model, target, images, labels, engine, sigma=target.sigma * 3, batch_size=40,
                          sampler=gaussian_steps, generator=torch.Generator().manual_seed(1), chunking="per-sweep")
        results[engine_name] = (stats.accepted, model[0].weight.detach().clone(), len(updates))
    accepted, weights, count = results["fast"]
    assert accepted == results["reference"][0] and torch.equal(weights, results["reference"][1])
    assert accepted > 6 and count <= 2     # one chunk, 3 channels: at most two moves


# ------------------------------------------------------------------------------------ fused numba kernels
numba_only = pytest.mark.skipif(not __import__("rso.engines.kernels", fromlist=["available"]).available(),
                                reason="numba is not installed")


def one_channel_change(dtype, kernel=3, padding=1, dilation=1, seed=1, stride=1):
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, bias=True).to(dtype)
    inputs = torch.randn(7, 4, 10, 12, generator=generator, dtype=dtype)
    new = inputs[:, 2:3] + torch.randn(7, 1, 10, 12, generator=generator, dtype=dtype)
    new[:, :, ::2] = inputs[:, 2:3, ::2]          # unchanged pixels: zero change
    changed = inputs.clone()
    changed[:, 2:3] = new
    with torch.no_grad():
        base = layer(inputs).contiguous(memory_format=torch.channels_last)
        expected = layer(changed)
    return layer, base, new, inputs[:, 2:3], expected


@numba_only
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kernel, padding, dilation, stride", [(3, 1, 1, 1), (3, 0, 1, 1), (3, 2, 2, 1), (1, 0, 1, 1),
                                                         ((3, 2), (0, 1), 1, 1), (4, 1, 1, 2), (3, 1, 1, 2)])
def test_next_conv_equals_torch_and_the_unfused_kernel(kernel, padding, dilation, stride, dtype, rtol):
    """Strides 1 and 2 (a conv folded with the pooling after it, plan.PooledConv, is stride 2)."""
    from rso.engines import fused, kernels

    layer, base, new, old, expected = one_channel_change(dtype, kernel, padding, dilation, stride=stride)
    assert fused.fits(layer)
    out = torch.empty_like(base)
    assert fused.next_conv(base, new, old, layer, 2, out) is None
    torch.testing.assert_close(out, expected, rtol=rtol, atol=rtol)
    # the same taps in the same order as the stencil it replaces: bit-identical
    assert torch.equal(out, kernels.add_one_channel_conv(base, new, old, layer, 2))
    # in place, as a chunk's cache is updated
    copy = base.clone()
    fused.next_conv(copy, new, old, layer, 2, copy)
    assert torch.equal(copy, out)


@numba_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pool", ["none", "avg2"])
@pytest.mark.parametrize("kernel, padding, stride", [(3, 1, 1), ((3, 2), (0, 1), 1), (4, 1, 2), (1, 0, 1)])
def test_next_conv_moments_equal_the_moments_pass(pool, dtype, kernel, padding, stride):
    """The moments computed while the conv output is written are those of the separate pass (bit for bit),
    and BN normalized with them equals torch's (after 2x2 average pooling for ``avg2``). Each kernel size has
    its own compiled stencil (fused._stencil_kernels); the output is the unfused kernel's, bit for bit."""
    from rso.engines import fused, kernels
    from rso.engines.plan import group_channel_ops

    layer, base, new, old, expected = one_channel_change(dtype, kernel, padding, stride=stride)
    out = torch.empty_like(base)
    sums, shift, count = fused.next_conv(base, new, old, layer, 2, out, pool=pool)
    assert torch.equal(out, kernels.add_one_channel_conv(base, new, old, layer, 2))
    pooled = out if pool == "none" else nn.AvgPool2d(2)(out)
    reference_sums, reference_shift, reference_count = kernels.batch_moments(
        kernels.channel_ops(out, group_channel_ops([nn.AvgPool2d(2)])[0]) if pool == "avg2" else out)
    assert count == reference_count == pooled.shape[0] * pooled.shape[2] * pooled.shape[3]
    assert np_equal(shift, reference_shift) and np_equal(sums, reference_sums)
    bn = nn.BatchNorm2d(6).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 6))
        bn.bias.copy_(torch.linspace(-0.3, 0.3, 6))
    ops = group_channel_ops([bn, nn.ReLU()])[0]
    got = kernels.channel_ops(kernels.channel_ops(out, group_channel_ops([nn.AvgPool2d(2)])[0]) if pool == "avg2"
                              else out, ops, moments=(sums, shift, count))
    want = torch.relu(torch.nn.functional.batch_norm(pooled, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want.detach(), rtol=tolerance, atol=tolerance)


def np_equal(a, b) -> bool:
    import numpy as np
    return a.shape == b.shape and bool(np.array_equal(a, b))


@numba_only
def test_next_conv_rejects_layouts():
    from rso.engines import fused

    layer, base, new, old, _ = one_channel_change(torch.float64)
    with pytest.raises(ValueError, match="channels-last"):
        fused.next_conv(base, new, old, layer, 2, torch.empty(base.shape, dtype=base.dtype))
    with pytest.raises(ValueError, match="not fused"):
        fused.next_conv(base, new, old, layer, 2, torch.empty_like(base), pool="max2")
    assert fused.fits(nn.Conv2d(2, 2, 3, stride=2)) and not fused.fits(nn.Conv2d(2, 2, 3, padding="same"))
    assert not fused.fits(nn.Conv2d(2, 2, 3, groups=2))


@numba_only
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("pattern", ["bn-relu", "bn-relu-avg", "bn-relu-max", "avg-bn-relu", "bn", "relu-max",
                                     "avg-bn", "bn-avg"])
@pytest.mark.parametrize("tap", [(0, 0), (-1, 1), (1, -1), None], ids=["center", "up-right", "down-left", "bias"])
def test_channel_block_equals_torch(pattern, tap, dtype, rtol):
    """The searched channel's fused block, for 3 candidates ``P + step_k * basis``, equals PyTorch's operators
    on the formed preactivations, including pooling before BN and BN without ReLU (the authors' order)."""
    from rso.engines import fused

    generator = torch.Generator().manual_seed(4)
    bn = nn.BatchNorm2d(5).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
        bn.bias.copy_(torch.linspace(-0.3, 0.3, 5))
    parts = {"bn": bn, "relu": nn.ReLU(), "avg": nn.AvgPool2d(2), "max": nn.MaxPool2d(2)}
    layers = [parts[name] for name in pattern.split("-")]
    block = fused.channel_block(layers)
    assert block is not None and block.pool_first == pattern.startswith("avg-bn")
    channel = 3
    pre = 2.0 + torch.randn(6, 1, 8, 10, generator=generator, dtype=dtype)     # a large common offset
    inputs = torch.randn(6, 1, 8, 10, generator=generator, dtype=dtype)
    steps = torch.tensor([0.0, 0.7, -0.7], dtype=dtype)
    if tap is None:
        basis, source = torch.ones(1, 1, 1, 1, dtype=dtype), None
    else:
        padded = torch.nn.functional.pad(inputs, (1, 1, 1, 1))
        basis, source = padded[:, :, 1 + tap[0]:9 + tap[0], 1 + tap[1]:11 + tap[1]], inputs
    candidates = pre + steps.view(1, 3, 1, 1) * basis
    x = candidates
    with torch.no_grad():
        for layer in layers:
            if layer is bn:
                x = torch.nn.functional.batch_norm(x, None, None, bn.weight[channel].expand(3), bn.bias[channel].expand(3),
                                                   True, 0.0, bn.eps)
            else:
                x = layer(x)
    values, moments = fused.block_values(pre, source, steps, tap or (0, 0), block)
    assert (moments is None) == (block.batchnorm is None)
    got = fused.block_output(values, block, channel, moments)
    assert got.shape == x.shape
    torch.testing.assert_close(got, x, rtol=rtol, atol=rtol)
    # each candidate's output is one contiguous (N, 1, H', W') slab, as the next conv's kernel reads it
    assert got[:, 1:2].is_contiguous()


def test_channel_block_patterns():
    from rso.engines import fused

    bn, relu, avg, mx = nn.BatchNorm2d(2), nn.ReLU(), nn.AvgPool2d(2), nn.MaxPool2d(2)
    assert fused.channel_block([avg, bn, relu]) == fused.ChannelBlock(True, bn, True, "none")
    assert fused.channel_block([bn, relu, mx]) == fused.ChannelBlock(False, bn, True, "max2")
    # what the kernel does not do stays with PyTorch's operators
    for layers in ([bn, nn.AdaptiveMaxPool2d(1), nn.Flatten()], [bn, relu, nn.AdaptiveAvgPool2d(1), nn.Flatten()],
                   [relu, bn], [nn.AvgPool2d(3), bn], [avg, relu]):
        assert fused.channel_block(layers) is None, layers


def test_one_thread_by_default(tmp_path, mnist_small):
    """A run without --threads uses DEFAULT_THREADS (one) whatever torch had; --threads N still sets N."""
    from rso.config import DEFAULT_THREADS, TrainConfig
    from rso.train import Trainer

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Trainer(TrainConfig(run_dir=str(tmp_path), name="default", progress=False), data=mnist_small)
        assert torch.get_num_threads() == DEFAULT_THREADS == 1
        Trainer(TrainConfig(run_dir=str(tmp_path), name="two", threads=2, progress=False), data=mnist_small)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("padding, kernel", [((1, 1), 3), ((0, 0), 3), ((2, 1), 3), ((1, 1), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_step_added_without_padding_equals_the_padded_basis(padding, kernel, dtype):
    """_plus_step (a shifted rectangle of the input channel added to a copy, or in place) against the plain
    ``pre + step * basis``, for every element of the kernel: the same values, bit for bit."""
    generator = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 2, kernel, padding=padding, bias=False)
    engine = _FastEngine()
    engine.layer, engine._per_channel, engine._shifted_basis = conv, 3 * kernel * kernel, True   # as begin_sweep
    engine.target = type("Target", (), {"kind": "weight"})()
    inputs = torch.randn(5, 3, 6, 7, generator=generator, dtype=dtype)
    out_h, out_w = 6 + 2 * padding[0] - kernel + 1, 7 + 2 * padding[1] - kernel + 1
    pre = torch.randn(5, 1, out_h, out_w, generator=generator, dtype=dtype)
    running = pre.clone()
    for index in range(2 * engine._per_channel):
        step = torch.randn((), generator=generator, dtype=dtype)
        plain = pre + step * engine._basis(inputs, index)
        kept = pre.clone()
        assert torch.equal(engine._plus_step(pre, inputs, index, step), plain), index
        assert torch.equal(pre, kept)      # a copy: the cached tensor is not touched
        want = running + step * engine._basis(inputs, index)
        assert engine._plus_step(running, inputs, index, step, in_place=True) is running
        assert torch.equal(running, want), index


@pytest.mark.parametrize("padding, kernel", [((1, 1), 3), ((0, 0), 3), ((2, 1), 3), ((1, 1), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steps_added_in_one_pass_equal_adding_them_one_at_a_time(padding, kernel, dtype):
    """The numba pass that adds a chunk's pending steps at once (fused.add_shifted_steps, via _plus_steps)
    against _plus_step one step after another: bit for bit, for runs of 1..9 steps over taps of the kernel and
    several input channels, into a new tensor and in place."""
    pytest.importorskip("numba")
    generator = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(3, 2, kernel, padding=padding, bias=False).to(dtype)
    engine = _FastEngine()
    engine.layer, engine._per_channel, engine._shifted_basis = conv, 3 * kernel * kernel, True   # as begin_sweep
    engine._numba_path = True
    engine.target = type("Target", (), {"kind": "weight"})()
    inputs = torch.randn(5, 3, 6, 7, generator=generator, dtype=dtype)
    out_h, out_w = 6 + 2 * padding[0] - kernel + 1, 7 + 2 * padding[1] - kernel + 1
    pre = torch.randn(5, 1, out_h, out_w, generator=generator, dtype=dtype)
    indices = torch.randperm(2 * engine._per_channel, generator=generator).tolist()
    for count in range(1, 10):
        steps = [(index, torch.randn((), generator=generator, dtype=dtype)) for index in indices[:count]]
        kept, want = pre.clone(), pre.clone()
        for index, step in steps:
            want = engine._plus_step(want, inputs, index, step)
        got = engine._plus_steps(pre, inputs, steps)
        assert got.data_ptr() != pre.data_ptr() and torch.equal(pre, kept)
        assert torch.equal(got, want), count
        engine._numba_path = False      # the PyTorch loop it falls back to: the same
        assert torch.equal(engine._plus_steps(pre, inputs, steps), want)
        engine._numba_path = True
        own = pre.clone()               # in place, as _sync adds them to a chunk's own tensor
        assert engine._plus_steps(own, inputs, steps, in_place=True) is own and torch.equal(own, want)
        indices = indices[count:] + indices[:count]


@pytest.mark.parametrize("engine_name", ["fast", "prefix-cache"])
def test_a_chunk_is_released_after_its_last_visit_of_the_sweep(engine_name, monkeypatch):
    """A BN sweep of 4 visits over 3 chunks (chunk j mod 3): chunks 1 and 2 are dropped right after their only
    visit, chunk 0 after its second. Still the reference's decisions and weights."""
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(60, 1, 8, 8, generator=generator, dtype=torch.float64), torch.arange(60) % 10
    results = {}
    for name in ("reference", engine_name):
        model = conv_net()
        target = next(t for t in visit_order(model) if t.name == "4.bias")   # the second BN: 4 channels
        engine = make_engine(name, model)
        released, real = [], type(engine).release
        if name != "reference":
            def cached(engine=engine):
                return engine.chunks if name == "fast" else engine.cache

            def release(self, chunk, real=real, released=released, cached=cached):
                assert chunk in cached(), "released a chunk that has no cache"
                released.append(chunk)
                real(self, chunk)
                assert chunk not in cached()

            monkeypatch.setattr(type(engine), "release", release)
        stats = run_sweep(model, target, images, labels, engine, sigma=target.sigma * 3, batch_size=20,
                          sampler=gaussian_steps, generator=torch.Generator().manual_seed(1))
        monkeypatch.undo()
        results[name] = (stats.accepted, model[4].bias.detach().clone(), released)
    assert results[engine_name][0] == results["reference"][0]
    assert torch.equal(results[engine_name][1], results["reference"][1])
    assert results[engine_name][2] == [1, 2, 0]


class _CountingWorld:
    """A world of one that counts ``combine_moments`` calls (the collectives several workers would make)."""

    size, rank, is_main = 1, 0, True

    def __init__(self):
        from rso.distributed import LOCAL
        self.local, self.calls = LOCAL, 0

    def combine_moments(self, count, mean, variance):
        self.calls += 1
        return mean, variance

    def __getattr__(self, name):
        return getattr(self.local, name)


@numba_only
@pytest.mark.parametrize("tensor", ["0.weight", "1.weight", "3.weight"])
def test_candidates_side_by_side_score_as_one_at_a_time(tensor):
    """With several workers the candidates run the suffix side by side (one reduction per BN for all of them).
    Forced on in one process: the same losses bit for bit, the same decisions and weights as one candidate
    at a time and as the reference, and fewer reductions."""
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(48, 1, 8, 8, generator=generator, dtype=torch.float64), torch.arange(48) % 10
    results = {}
    for mode in ("reference", "one-at-a-time", "side-by-side"):
        model = conv_net()
        target = next(t for t in visit_order(model) if t.name == tensor)
        world = _CountingWorld()
        engine = make_engine("reference", model) if mode == "reference" else FastEngine(kernels="numba", world=world)
        scores = []
        if mode != "reference":
            begin = engine.begin_sweep

            def begin_sweep(*args, engine=engine, begin=begin, lockstep=mode == "side-by-side", **kwargs):
                begin(*args, **kwargs)
                engine._lockstep = lockstep
            engine.begin_sweep = begin_sweep
            score = engine.score
            engine.score = lambda *args, score=score: scores.append(score(*args)) or scores[-1]
        stats = run_sweep(model, target, images, labels, engine, sigma=target.sigma * 3, batch_size=16,
                          sampler=gaussian_steps, generator=torch.Generator().manual_seed(1))
        results[mode] = (stats.accepted, target.parameter.detach().clone(), scores, world.calls)
    accepted, weights, scores, calls = results["side-by-side"]
    assert accepted == results["reference"][0] > 0
    assert torch.equal(weights, results["reference"][1])
    assert torch.equal(torch.stack(scores), torch.stack(results["one-at-a-time"][2]))
    assert calls < results["one-at-a-time"][3]


@pytest.mark.parametrize("kernels", ["torch", "numba"])
def test_cache_fill_with_folded_pooling_equals_the_layers(kernels):
    """A chunk's caches (the searched layer's input, the next linear layer's output) are filled with each conv
    that a 2x2 average pooling follows run as one stride-2 conv (plan.PooledConv), below the searched layer,
    at it and as the next layer: the same values as the model's own layers, in float64 up to rounding, for
    every tensor of a narrow copy of the authors' net (poolings after conv1 and conv3)."""
    from rso.engines.base import ChunkPartition, batch_statistics
    from rso.engines.plan import PooledConv
    from rso.models import authors_convnet

    model = he_init_(authors_convnet(depth=6, channels=3), torch.Generator().manual_seed(5)).double()
    images = torch.randn(24, 1, 12, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    labels = torch.randint(0, 10, (24,), generator=torch.Generator().manual_seed(7))
    folded = 0
    for target in visit_order(model):
        engine = FastEngine(kernels=kernels)
        partition = ChunkPartition(torch.randperm(24, generator=torch.Generator().manual_seed(8)), 12)
        engine.begin_sweep(model, target, images, labels, partition)
        try:
            state = engine._chunk(1)
            plan = engine.plan
            folded += sum(isinstance(layer, PooledConv) for layer in engine._below)
            stop = plan.next_index + 1 + isinstance(plan.next_layer, PooledConv)   # its pooling folded in
            with batch_statistics(model):
                inputs = nn.Sequential(*plan.layers[:plan.searched])(images[partition.indices(1)])
                next_output = nn.Sequential(*plan.layers[plan.searched:stop])(inputs)
            torch.testing.assert_close(state.inputs, inputs, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(state.next_output, next_output, rtol=1e-10, atol=1e-12)
        finally:
            engine.end_sweep()
    assert folded > 0    # the pooled convs below a searched layer did run folded


def test_a_one_channel_input_gives_a_channels_last_conv_output():
    """The images (one channel): the engine's convolutions write channels-last, which the BN pass after them
    reads without a copy, with the values of an NCHW convolution."""
    from rso.engines.base import channels_last

    images = torch.randn(6, 1, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = channels_last(images)
    assert x.data_ptr() == images.data_ptr() and torch.equal(x, images)
    out = torch.nn.functional.conv2d(x, weight, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(images, weight, padding=1), rtol=1e-12, atol=1e-12)
    wide = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert channels_last(wide).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("chunking", ["per-sweep", "per-visit"])
def test_a_chunk_left_behind_by_its_accepted_step_scores_as_the_reference(chunking, monkeypatch):
    """On the fused numba path an accepted step leaves its chunk one step behind (with several chunks), and the
    chunk's next sync adds it: the reference's decisions and weights, bit for bit in float64. Candidate 0's
    loss, known after every visit when the sweep stays on one chunk and there is no weight decay, is never
    recomputed: 3 suffix passes for the first visit and 2 for each one after it."""
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(40, 1, 8, 8, generator=generator, dtype=torch.float64), torch.arange(40) % 10
    passes = count_calls(monkeypatch, "_run_suffix")
    results = {}
    for engine_name in ("reference", "fast"):
        model = conv_net()
        target = next(t for t in visit_order(model) if t.name == "3.weight")   # the second conv: 4 channels x 27
        engine = make_engine(engine_name, model, **({"kernels": "numba"} if engine_name == "fast" else {}))
        passes.clear()
        stats = run_sweep(model, target, images, labels, engine, sigma=target.sigma * 3, batch_size=10,
                          sampler=gaussian_steps, generator=torch.Generator().manual_seed(1), chunking=chunking)
        results[engine_name] = (stats.accepted, model[3].weight.detach().clone())
        if engine_name == "fast":
            assert engine._channel_block is not None or not engine.use_numba()   # the fused path ran
    assert results["fast"][0] == results["reference"][0] > 10
    assert torch.equal(results["fast"][1], results["reference"][1])
    if chunking == "per-sweep":
        assert len(passes) == 3 + 2 * (target.numel - 1)
