"""The fast engine's numba kernels against the PyTorch operators they replace (the oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rso.engines import kernels
from rso.engines.plan import ChannelOps, PooledConv, fold_pooled_convs, group_channel_ops

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


def run_layers(x: torch.Tensor, layers) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, nn.BatchNorm2d):
            x = F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
        else:
            x = layer(x)
    return x


def batchnorm(channels: int, seed: int, dtype) -> nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    layer = nn.BatchNorm2d(channels).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.5 * torch.randn(channels, generator=generator))
        layer.bias.copy_(0.5 * torch.randn(channels, generator=generator))
    return layer


@pytest.mark.parametrize("kernel, padding, dilation, bias", [(3, (1, 1), (1, 1), False), (3, (0, 0), (1, 1), True),
                                                       ((3, 2), (2, 1), (1, 1), True), (3, (2, 2), (2, 2), False),
                                                       (1, (0, 0), (1, 1), True)])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_one_output_channel_conv_equals_torch(kernel, padding, dilation, bias, dtype, rtol):
    """The preactivation of the channel a chunk moves to (kernels.one_output_channel_conv) against F.conv2d."""
    generator = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(5, 3, kernel, padding=padding, dilation=dilation, bias=bias).to(dtype)
    with torch.no_grad():
        conv.weight.normal_(generator=generator)
        if bias:
            conv.bias.normal_(generator=generator)
    x = torch.randn(4, 5, 9, 8, generator=generator, dtype=dtype)
    for channel in range(3):
        weight, b = conv.weight[channel:channel + 1], None if not bias else conv.bias[channel:channel + 1]
        want = F.conv2d(x, weight, b, 1, padding, dilation)
        got = kernels.one_output_channel_conv(x, weight, b, padding, dilation)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want.detach(), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("size", [(14, 14), (7, 9), (6, 5)])
@pytest.mark.parametrize("kernel, padding, bias", [(3, 1, False), (3, 0, True), (1, 0, True), (5, 2, False)])
def test_a_conv_and_the_average_pooling_after_it_fold_into_one_strided_conv(size, kernel, padding, bias):
    """PooledConv against avg_pool2d(conv2d(x)) in float64: the same output shape (odd sizes included: the
    pooling drops the last row/column) and values to rounding; the layers are not changed."""
    generator = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(4, 5, kernel, padding=padding, bias=bias).double()
    with torch.no_grad():
        conv.weight.normal_(generator=generator)
        if bias:
            conv.bias.normal_(generator=generator)
    kept = conv.weight.detach().clone()
    x = torch.randn(3, 4, *size, generator=generator, dtype=torch.float64)
    want = F.avg_pool2d(conv(x), 2)
    folded = PooledConv(conv)
    got = folded(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == want.shape and tuple(folded.stride) == (2, 2) and folded.kernel_size == (kernel + 1,) * 2
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(conv.weight, kept) and not list(folded.children())


def test_only_a_stride_1_conv_before_a_plain_2x2_average_pooling_folds():
    conv, avg, relu, bn = nn.Conv2d(2, 2, 3, padding=1), nn.AvgPool2d(2), nn.ReLU(), nn.BatchNorm2d(2)
    folded = fold_pooled_convs([conv, avg, bn, relu, conv, relu, avg])
    assert [type(layer) for layer in folded] == [PooledConv, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.AvgPool2d]
    kept = [nn.Conv2d(2, 2, 3, stride=2), nn.AvgPool2d(2), nn.Conv2d(2, 2, 3, dilation=2), nn.AvgPool2d(2),
            nn.Conv2d(2, 2, 3), nn.AvgPool2d(3), nn.Conv2d(2, 2, 3, padding="same"), nn.AvgPool2d(2),
            nn.Conv2d(2, 2, 3), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3, groups=2), nn.AvgPool2d(2)]
    assert fold_pooled_convs(kept) == kept


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("pattern", ["bn", "bn-relu", "bn-relu-avg", "bn-relu-max", "bn-relu-global", "relu-max",
                                     "avg", "bn-global"])
def test_channel_ops_equal_torch(pattern, size, dtype, rtol):
    channels = 5
    pools = {"avg": nn.AvgPool2d(2), "max": nn.MaxPool2d(2), "global": nn.AdaptiveAvgPool2d(1)}
    layers = []
    for part in pattern.split("-"):
        layers.append(batchnorm(channels, size, dtype) if part == "bn" else nn.ReLU() if part == "relu"
                      else pools[part])
    grouped = group_channel_ops(layers)
    assert len(grouped) == 1 and isinstance(grouped[0], ChannelOps)
    generator = torch.Generator().manual_seed(0)
    # a large common offset: the statistics must not lose the variance to cancellation
    x = (3.0 + 0.1 * torch.randn(6, channels, size, size, generator=generator, dtype=dtype))
    with torch.no_grad():
        expected = run_layers(x, layers)
        got = kernels.channel_ops(x, grouped[0])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("layers", [[nn.ReLU()], [nn.ReLU(), nn.MaxPool2d(2)], [nn.MaxPool2d(2)],
                                    [nn.ReLU(), nn.AvgPool2d(2)]], ids=["relu", "relu-max", "max", "relu-avg"])
@pytest.mark.parametrize("row, column", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channel_ops_keep_nan(layers, row, column, dtype):
    """A NaN activation stays NaN through ReLU and pooling wherever it sits in the window (as torch's), so a
    diverged candidate never looks finite; in float32 too (the ReLU compares with a zero of the dtype)."""
    x = torch.randn(4, 3, 4, 4, dtype=dtype)
    x[1, 2, row, column] = float("nan")
    ops = group_channel_ops(layers)[0]
    got = kernels.channel_ops(x, ops)
    torch.testing.assert_close(got, run_layers(x, layers), equal_nan=True)
    assert torch.isnan(got[1, 2, 0, 0] if len(layers) > 1 or ops.pool != "none" else got[1, 2, row, column])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channel_ops_relu_is_torchs_bit_for_bit(dtype):
    """ReLU alone: the same values as torch.relu in the input's dtype, subnormals included (no widening). (The
    sign of a zero may differ from torch's: -0.0 == 0.0.)"""
    x = torch.tensor([[[[-0.0, 0.0, -1.5, 1e-38], [3.25, -1e-30, 2.0 ** -140, -2.0 ** -140]]]], dtype=dtype)
    got = kernels.channel_ops(x, group_channel_ops([nn.ReLU()])[0])
    assert torch.equal(got, torch.relu(x)) and got.dtype == dtype


def test_grouping():
    bn, relu, avg, gap = nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1)
    conv, flatten, dense = nn.Conv2d(3, 3, 3), nn.Flatten(), nn.Linear(3, 2)
    grouped = group_channel_ops([bn, relu, avg, conv, bn, relu, gap, flatten, dense])
    assert [type(item) for item in grouped] == [ChannelOps, nn.Conv2d, ChannelOps, nn.Flatten, nn.Linear]
    assert (grouped[0].pool, grouped[0].relu, grouped[2].pool) == ("avg2", True, "global")
    # what the kernels do not compute exactly stays as PyTorch layers
    odd = [nn.AvgPool2d(3), nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2, padding=1), nn.AdaptiveAvgPool2d(2)]
    assert group_channel_ops(odd) == odd
    # another order: pooling before BN is two groups
    grouped = group_channel_ops([avg, bn, relu])
    assert [item.layers for item in grouped] == [(avg,), (bn, relu)]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("stride, padding, dilation, kernel", [
    (1, 1, 1, 3), (2, 1, 1, 3), (1, 0, 1, 3), (1, 2, 2, 3), (1, 0, 1, 1), ((1, 2), (0, 1), 1, (3, 2))])
def test_one_channel_conv_equal_torch(stride, padding, dilation, kernel, dtype, rtol):
    generator = torch.Generator().manual_seed(1)
    layer = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, bias=False).to(dtype)
    inputs = torch.randn(5, 4, 9, 10, generator=generator, dtype=dtype)
    new = torch.randn(5, 1, 9, 10, generator=generator, dtype=dtype)
    new[:, :, ::2] = inputs[:, 2:3, ::2]          # unchanged pixels: zero change, skipped by the kernel
    with torch.no_grad():
        base = layer(inputs)
        changed = inputs.clone()
        changed[:, 2:3] = new
        expected = layer(changed)
        got = kernels.add_one_channel_conv(base, new, inputs[:, 2:3], layer, 2)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol)


def test_one_channel_conv_in_place():
    """A chunk's cache is updated in place (out=base); candidates write into a reused buffer."""
    generator = torch.Generator().manual_seed(2)
    layer = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    inputs = torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64)
    new = torch.randn(2, 1, 6, 6, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(torch.cat([inputs[:, :1], new, inputs[:, 2:]], dim=1))
        base = layer(inputs).contiguous(memory_format=torch.channels_last)
        got = kernels.add_one_channel_conv(base, new, inputs[:, 1:2], layer, 1, out=base)
    assert got is base
    torch.testing.assert_close(base, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="channels-last"):
        kernels.add_one_channel_conv(base, new, inputs[:, 1:2], layer, 1, out=torch.empty(2, 4, 6, 6,
                                                                                           dtype=torch.float64))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-9)])
@pytest.mark.parametrize("shape, layout", [((6, 5, 9, 7), "nchw"), ((6, 5, 9, 7), "channels_last"),
                                           ((6, 1, 9, 7), "nchw"), ((6, 5, 1, 1), "nchw"), ((6, 5), "nchw"),
                                           ((6, 5, 11), "nchw"), ((6, 5, 9, 7), "strided")])
def test_moments_equal_float64_var_mean(shape, layout, dtype, rtol):
    """The per-channel moments a worker contributes to a chunk's BN statistics, in every layout they are
    asked of, against float64 ``var_mean`` (large mean, small spread: the case raw sums get wrong)."""
    generator = torch.Generator().manual_seed(3)
    x = 40.0 + 0.01 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], dim=1)[:, ::2]
    mean, variance, count = kernels.moments(x)
    dims = [0] + list(range(2, x.dim()))
    want_variance, want_mean = torch.var_mean(x.to(torch.float64), dim=dims, unbiased=False)
    assert count == x.numel() // x.shape[1]
    torch.testing.assert_close(torch.from_numpy(mean), want_mean, rtol=rtol, atol=0)
    torch.testing.assert_close(torch.from_numpy(variance), want_variance, rtol=1e3 * rtol, atol=0)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("pool", ["none", "avg", "max"])
def test_channel_ops_with_fixed_statistics_equal_torch(pool, dtype, rtol):
    """A BN -> ReLU -> pooling run whose BN normalizes with fixed statistics (``--search-bn fixed-below``):
    one pass with :func:`kernels.fixed_affine` against PyTorch's inference-mode BN and the layers after it."""
    generator = torch.Generator().manual_seed(5)
    bn = batchnorm(4, 2, dtype)
    layers = [bn, nn.ReLU()] + ({"avg": [nn.AvgPool2d(2)], "max": [nn.MaxPool2d(2)]}.get(pool, []))
    (group,) = group_channel_ops(layers)
    x = torch.randn(6, 4, 8, 8, generator=generator, dtype=dtype)
    mean, variance = 0.3 * torch.randn(4, generator=generator, dtype=dtype), 0.5 + torch.rand(4, generator=generator, dtype=dtype)
    want = F.batch_norm(x, mean, variance, bn.weight, bn.bias, False, 0.0, bn.eps)
    for layer in layers[1:]:
        want = layer(want)
    got = kernels.channel_ops(x, group, affine=kernels.fixed_affine(bn, mean, variance))
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol)
