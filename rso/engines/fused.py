"""numba kernels that fuse the fast engine's memory-bound passes over a candidate's tensors (CPU).

The next conv's one-channel change (``Q + n(new - old)``) and the batch moments of the BN that follows it
are one pass over the next layer's output here instead of two: each example's output is computed with the
output channels innermost (a pixel's taps summed in registers for every channel,
:func:`_stencil_kernels`) and its moments are added while it is still in cache. The moments are returned as
sums, not applied: the normalization is a separate pass (:func:`rso.engines.kernels.channel_ops` with
``moments=``), so a reduction over processes can sit between.

The arithmetic is that of the unfused kernels (taps in the same order, moments over the same blocks of
examples in the same order, the same shift), so the results are bit-identical to them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rso.engines.kernels import POOL_CODES, batchnorm_affine, numba

FUSED_POOLS = ("none", "avg2")      # pooling between the next conv and its BN that the moments follow


def _conv_example(base, new, old, weight, stride, padding, dilation, i, padded, values, zero, kh, kw, out):
    """``out[i] = base[i] + conv(new[i] - old[i])``, output channels innermost (see :func:`_stencil_kernels`:
    inlined there, ``kh`` and ``kw`` are constants).

    ``padded`` is a zero-bordered scratch image (its border is never written), ``values`` one pixel's taps,
    ``zero`` a zero of the tensors' dtype.
    """
    out_h, out_w, o = base.shape[1], base.shape[2], base.shape[3]
    in_h, in_w = new.shape[1], new.shape[2]
    for y in range(in_h):
        for x in range(in_w):
            padded[y + padding[0], x + padding[1]] = new[i, y, x] - old[i, y, x]
    for y in range(out_h):
        for x in range(out_w):
            for r in range(kh):
                for s in range(kw):
                    values[r * kw + s] = padded[y * stride[0] + r * dilation[0], x * stride[1] + s * dilation[1]]
            for k in range(o):
                acc = zero
                for t in range(kh * kw):
                    acc += values[t] * weight[t // kw, t % kw, k]
                out[i, y, x, k] = base[i, y, x, k] + acc


@functools.cache    # made once per kernel size and process
def _stencil_kernels(kh: int, kw: int):
    """(next_conv, next_conv_moments) for a (kh, kw) conv kernel, compiled with the tap count as a constant.

    A pixel's taps are then gathered into a small array and summed for each output channel by a loop of
    constant length (which LLVM unrolls), with the output channels innermost: one vector loop that keeps its
    sum in registers. A loop over the taps with the channels inside it instead stores and reloads every
    channel's sum once per tap: ``python benchmarks/next_conv.py`` measured it 2.6-3.3x slower at paper6's
    three shapes (batch 2500, float32, one thread). The sums are the same: taps in the same order (row,
    column), each added to a sum that starts at zero, then added to ``base``.
    """
    taps = kh * kw

    def next_conv_moments(base, new, old, weight, stride, padding, dilation, pool, out, parts):
        """``_conv_example`` for every example, and the per-channel sums of the BN input minus a shift and of
        its square over (N, H', W'), in ``parts`` blocks of examples (as ``kernels._channel_moments``).

        Returns (sums (parts, 2, O), shift (O,)): the shift is the first example's first BN input value.
        """
        n, out_h, out_w, o = base.shape
        in_h, in_w = new.shape[1], new.shape[2]
        rows, wide = in_h + 2 * padding[0], in_w + 2 * padding[1]
        bn_h, bn_w = (out_h // 2, out_w // 2) if pool == 1 else (out_h, out_w)
        zero = np.zeros(1, base.dtype)[0]
        padded = np.zeros((rows, wide), base.dtype)
        values = np.empty(taps, base.dtype)
        _conv_example(base, new, old, weight, stride, padding, dilation, 0, padded, values, zero, kh, kw, out)
        shift = np.empty(o, np.float64)
        cell = np.empty(1, base.dtype)
        for k in range(o):
            shift[k] = _moment_value(out, 0, 0, 0, k, pool, cell)
        sums = np.zeros((parts, 2, o), np.float64)
        step = (n + parts - 1) // parts
        for p in numba.prange(parts):
            scratch = np.zeros((rows, wide), base.dtype)
            pixel = np.empty(taps, base.dtype)
            rounded = np.empty(1, base.dtype)
            first = np.zeros(o, np.float64)
            second = np.zeros(o, np.float64)
            for i in range(p * step, min(n, (p + 1) * step)):
                if i > 0:
                    _conv_example(base, new, old, weight, stride, padding, dilation, i, scratch, pixel, zero, kh, kw, out)
                for h in range(bn_h):
                    for w in range(bn_w):
                        for k in range(o):
                            v = _moment_value(out, i, h, w, k, pool, rounded) - shift[k]
                            first[k] += v
                            second[k] += v * v
            for k in range(o):
                sums[p, 0, k] = first[k]
                sums[p, 1, k] = second[k]
        return sums, shift

    def next_conv(base, new, old, weight, stride, padding, dilation, out):
        """``_conv_example`` for every example, in parallel (no moments: a cache update)."""
        n = base.shape[0]
        rows, wide = new.shape[1] + 2 * padding[0], new.shape[2] + 2 * padding[1]
        zero = np.zeros(1, base.dtype)[0]
        for i in numba.prange(n):
            padded = np.zeros((rows, wide), base.dtype)
            values = np.empty(taps, base.dtype)
            _conv_example(base, new, old, weight, stride, padding, dilation, i, padded, values, zero, kh, kw, out)

    if numba is None:
        raise RuntimeError("the next-conv stencil is a numba kernel: install numba")
    # numba caches a closure's compiled code per value of its constants, as long as they are plain values (the
    # kernels it calls are module globals, not closure variables). Each kernel size gets a name of its own:
    # with one name, the sizes shared one cache index and one symbol name, and a process that loaded two
    # sizes from the cache could fail in the second ("SystemError: ... returned a result with an exception
    # set", from "NRT_adapt_ndarray_to_python: descr is NULL"; seen once the cache had been rewritten by
    # several processes and versions)
    for kernel in (next_conv, next_conv_moments):
        kernel.__name__ = f"{kernel.__name__}_{kh}x{kw}"
        kernel.__qualname__ = f"{kernel.__qualname__}_{kh}x{kw}"
    return (numba.njit(cache=True, parallel=True)(next_conv),
            numba.njit(cache=True, parallel=True)(next_conv_moments))


def _moment_value(out, i, h, w, k, pool, cell):
    """The BN input at (i, h, w, k): the conv output, or its 2x2 average as the avg2 pooling kernel rounds it
    (summed in float64, stored in the tensor's dtype: ``cell`` is a one-element array of that dtype)."""
    if pool == 1:
        cell[0] = (((np.float64(out[i, 2 * h, 2 * w, k]) + out[i, 2 * h, 2 * w + 1, k]) + out[i, 2 * h + 1, 2 * w, k])
                   + out[i, 2 * h + 1, 2 * w + 1, k]) * 0.25
        return np.float64(cell[0])
    return np.float64(out[i, h, w, k])


if numba is not None:
    _conv_example = numba.njit(cache=True, inline="always")(_conv_example)
    _moment_value = numba.njit(cache=True, inline="always")(_moment_value)


def fits(layer) -> bool:
    """Whether :func:`next_conv` computes this Conv2d's one-channel change (numeric padding, no groups)."""
    return isinstance(layer.padding, tuple) and layer.groups == 1


def next_conv(base: torch.Tensor, new: torch.Tensor, old: torch.Tensor, layer, channel: int, out: torch.Tensor,
              pool: str | None = None):
    """``out = base + conv(new - old)`` for a change of input channel ``channel`` of the Conv2d
    ``layer`` (``base`` holds its bias); ``base`` and ``out`` channels-last (N, O, OH, OW), ``new``/``old``
    (N, 1, H, W). ``out`` may be ``base`` (in place).

    ``pool``: also return the moments ``(sums, shift, count)`` of the BN input that follows, the output
    itself (``"none"``) or its 2x2 average (``"avg2"``); ``None``: no moments (returns ``None``).
    """
    if not (base.is_contiguous(memory_format=torch.channels_last) and out.is_contiguous(memory_format=torch.channels_last)
            and out.shape == base.shape):
        raise ValueError("base and out must be channels-last tensors of the same shape")
    if layer.weight.dtype != base.dtype or new.dtype != base.dtype or old.dtype != base.dtype:
        raise ValueError(f"the layer, base, new and old must share one dtype (the sums round to it): "
                         f"{layer.weight.dtype}, {base.dtype}, {new.dtype}, {old.dtype}")
    source = base.permute(0, 2, 3, 1).numpy()
    result = out.permute(0, 2, 3, 1).numpy()
    weight = layer.weight.detach()[:, channel].permute(1, 2, 0).contiguous().numpy()
    new, old = new[:, 0].contiguous().numpy(), old[:, 0].contiguous().numpy()
    stride, padding, dilation = tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation)
    _next_conv, _next_conv_moments = _stencil_kernels(*weight.shape[:2])
    if pool is None:
        _next_conv(source, new, old, weight, stride, padding, dilation, result)
        return None
    code = POOL_CODES[pool]
    if pool not in FUSED_POOLS:
        raise ValueError(f"moments after pooling {pool!r} are not fused; choose one of {', '.join(FUSED_POOLS)}")
    sums, shift = _next_conv_moments(source, new, old, weight, stride, padding, dilation, code, result,
                                     numba.get_num_threads())
    n, height, width = source.shape[:3]
    count = n * (height // 2) * (width // 2) if code == 1 else n * height * width
    return sums, shift, count


# ------------------------------------------------------------------------------------------------------------
# The searched channel's block: [2x2 average pooling] -> [BN] -> [ReLU] -> [2x2 pooling], for K candidates.
#
# A candidate's preactivation is ``P + step_k * basis`` (basis: the input channel shifted by the tap, or 1 for
# a bias); PyTorch's eager operators form it (K copies), pad the basis, and run BN, ReLU and pooling as separate
# passes. Here it is two passes over P and the input channel: the moments of every candidate's BN input, then
# the normalized, rectified, pooled outputs, written candidate by candidate (K, B, H', W').

def _block_value(pre, inputs, unit, i, y, x, step, row, column):
    """``P + step * basis`` at pixel (y, x) of example i; the basis is input pixel (y + row, x + column)
    (zero outside the image, where the sum is P itself) or 1 (``unit``)."""
    if unit:
        return pre[i, y, x] + step
    iy, ix = y + row, x + column
    if 0 <= iy < inputs.shape[1] and 0 <= ix < inputs.shape[2]:
        return pre[i, y, x] + step * inputs[i, iy, ix]
    return pre[i, y, x]


def _block_input(pre, inputs, unit, i, h, w, step, row, column, pool_first, cell):
    """The BN input of the block at (h, w): the candidate's preactivation, or its 2x2 average (``pool_first``,
    summed in float64 and stored in the tensor's dtype through ``cell``, as the pooling kernel does)."""
    if pool_first:
        cell[0] = (((np.float64(_block_value(pre, inputs, unit, i, 2 * h, 2 * w, step, row, column))
                     + _block_value(pre, inputs, unit, i, 2 * h, 2 * w + 1, step, row, column))
                    + _block_value(pre, inputs, unit, i, 2 * h + 1, 2 * w, step, row, column))
                   + _block_value(pre, inputs, unit, i, 2 * h + 1, 2 * w + 1, step, row, column)) * 0.25
        return cell[0]
    return _block_value(pre, inputs, unit, i, h, w, step, row, column)


def _block_values(pre, inputs, unit, steps, row, column, pool_first, values, parts):
    """``values[k]`` = candidate k's BN input, (K, N, H', W'); and per candidate the sums of it minus a shift
    and of the square, over (N, H', W'), in ``parts`` blocks of examples. Returns (sums (parts, 2, K), shift
    (K,)): the shift is the first example's first value."""
    n, height, width = pre.shape
    if pool_first:
        height, width = height // 2, width // 2
    count = steps.shape[0]
    cell = np.empty(1, pre.dtype)
    shift = np.empty(count, np.float64)
    for k in range(count):
        shift[k] = _block_input(pre, inputs, unit, 0, 0, 0, steps[k], row, column, pool_first, cell)
    sums = np.zeros((parts, 2, count), np.float64)
    step = (n + parts - 1) // parts
    for p in numba.prange(parts):
        rounded = np.empty(1, pre.dtype)
        for k in range(count):
            first, second = 0.0, 0.0
            for i in range(p * step, min(n, (p + 1) * step)):
                for h in range(height):
                    for w in range(width):
                        x = _block_input(pre, inputs, unit, i, h, w, steps[k], row, column, pool_first, rounded)
                        values[k, i, h, w] = x
                        v = x - shift[k]
                        first += v
                        second += v * v
            sums[p, 0, k] = first
            sums[p, 1, k] = second
    return sums, shift


def _block_output(values, scale, bias, relu, pool, out):
    """``out[k] = pool(relu(values[k] * scale[k] + bias[k]))`` for every candidate k, ``values`` being the BN
    inputs :func:`_block_values` wrote; pool 0 none, 1 avg 2x2, 2 max 2x2. ``out`` is (K, N, H', W')."""
    count, n = values.shape[0], values.shape[1]
    for i in numba.prange(n):
        for k in range(count):
            plane = values[k, i]
            if pool == 0:
                for h in range(out.shape[2]):
                    for w in range(out.shape[3]):
                        y = plane[h, w] * scale[k] + bias[k]
                        out[k, i, h, w] = max(y, 0.0) if relu else y
            else:
                for h in range(out.shape[2]):
                    for w in range(out.shape[3]):
                        out[k, i, h, w] = _relu_pool_window(plane[2 * h, 2 * w] * scale[k] + bias[k],
                                                            plane[2 * h, 2 * w + 1] * scale[k] + bias[k],
                                                            plane[2 * h + 1, 2 * w] * scale[k] + bias[k],
                                                            plane[2 * h + 1, 2 * w + 1] * scale[k] + bias[k],
                                                            relu, pool)


def _add_shifted_steps(pre, inputs, sources, rows, columns, steps, copy, out, height, width, in_h, in_w):
    """``out = pre + steps[0] * basis_0 + steps[1] * basis_1 + ...``, added one step after another (the
    roundings of adding them one at a time), basis j being input channel ``sources[j]`` shifted by
    ``(rows[j], columns[j])`` (zero outside the input). ``copy``: ``out`` is not ``pre`` and starts as it.

    ``pre``/``out`` are (N, H*W) and ``inputs`` (N, C, H_in*W_in), flattened: each row segment is a loop over
    unsigned offsets, which LLVM vectorizes without per-row slices (about 1.3-1.6x faster than slices at
    paper6's conv1, batch 2500, measured with a throwaway script).
    """
    n = pre.shape[0]
    for i in numba.prange(n):
        plane = out[i]
        if copy:
            plane[:] = pre[i]
        for j in range(steps.shape[0]):
            dy, dx, step = rows[j], columns[j], steps[j]
            x0, x1 = max(0, -dx), min(width, in_w - dx)
            if x1 <= x0:
                continue
            channel = inputs[i, sources[j]]
            length = numba.uint64(x1 - x0)
            for y in range(max(0, -dy), min(height, in_h - dy)):
                target = numba.uint64(y * width + x0)
                source = numba.uint64((y + dy) * in_w + x0 + dx)
                for x in range(length):
                    plane[target + x] = plane[target + x] + step * channel[source + x]


if numba is not None:
    from rso.engines.kernels import _relu_pool_window
    _add_shifted_steps = numba.njit(cache=True, parallel=True)(_add_shifted_steps)
    _block_value = numba.njit(cache=True, inline="always")(_block_value)
    _block_input = numba.njit(cache=True, inline="always")(_block_input)
    _block_values = numba.njit(cache=True, parallel=True)(_block_values)
    _block_output = numba.njit(cache=True, parallel=True)(_block_output)


@dataclass(frozen=True)
class ChannelBlock:
    """The searched channel's block as the kernels run it: [avg 2x2] -> [BN] -> [ReLU] -> [avg/max 2x2]."""

    pool_first: bool
    batchnorm: nn.BatchNorm2d | None
    relu: bool
    pool: str          # "none", "avg2" or "max2"


def channel_block(layers) -> ChannelBlock | None:
    """``layers`` (a sweep plan's block after a searched Conv2d) as a :class:`ChannelBlock`, or ``None`` when
    it is not of that form (a Flatten, global pooling, another order): the PyTorch operators run it then."""
    from rso.engines.plan import _pool_kind

    layers = [layer for layer in layers if not isinstance(layer, nn.Identity)]
    position, pool_first, batchnorm, relu, pool = 0, False, None, False, "none"
    if (len(layers) > 1 and _pool_kind(layers[0]) == "avg2" and isinstance(layers[1], nn.BatchNorm2d)):
        pool_first, position = True, 1
    if position < len(layers) and isinstance(layers[position], nn.BatchNorm2d):
        batchnorm, position = layers[position], position + 1
    if position < len(layers) and isinstance(layers[position], nn.ReLU):
        relu, position = True, position + 1
    if position < len(layers) and _pool_kind(layers[position]) in ("avg2", "max2"):
        pool, position = _pool_kind(layers[position]), position + 1
    return ChannelBlock(pool_first, batchnorm, relu, pool) if position == len(layers) else None


def block_values(pre: torch.Tensor, inputs: torch.Tensor | None, steps: torch.Tensor, tap: tuple[int, int],
                 block: ChannelBlock, out: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple | None]:
    """Each candidate's BN input, (K, N, H', W') (into ``out`` when it has that shape), the candidate's
    preactivation being ``pre + steps[k] * basis``: ``pre`` (N, 1, H, W) contiguous, ``inputs`` the searched
    conv's input channel (N, 1, H_in, W_in) (``None``: a bias, basis 1), ``tap`` the basis's shift (kernel row
    - padding, kernel column - padding). With it, in the same pass, when the block has a BN, the moments of
    each candidate's BN input ``(sums (parts, 2, K), shift (K,), count)`` over this process's examples (else
    ``None``). :func:`block_output` then reads the values instead of forming them a second time."""
    source, basis, unit = _block_arrays(pre, inputs)
    n, height, width = source.shape
    if block.pool_first:
        height, width = height // 2, width // 2
    shape = (steps.shape[0], n, height, width)
    if out is None or tuple(out.shape) != shape or out.dtype != pre.dtype or not out.is_contiguous():
        out = torch.empty(shape, dtype=pre.dtype)
    sums, shift = _block_values(source, basis, unit, steps.numpy(), tap[0], tap[1], block.pool_first, out.numpy(),
                                numba.get_num_threads())
    return out, (None if block.batchnorm is None else (sums, shift, n * height * width))


def block_output(values: torch.Tensor, block: ChannelBlock, channel: int, moments, out: torch.Tensor | None = None,
                 combine_moments=None) -> torch.Tensor:
    """The block's output for every candidate, (N, K, H', W') (a view of a (K, N, H', W') tensor, ``out``
    when given), from :func:`block_values`' BN inputs, normalized with its ``moments`` (this process's
    examples; with several workers ``combine_moments`` (``World.combine_moments``) makes them the chunk's)."""
    count, n, height, width = values.shape
    if block.pool != "none":
        height, width = height // 2, width // 2
    if block.batchnorm is not None:
        scale, bias = batchnorm_affine(block.batchnorm, *moments, channel=channel, combine_moments=combine_moments)
    else:
        scale, bias = np.ones(count), np.zeros(count)
    if out is None or tuple(out.shape) != (count, n, height, width):
        out = torch.empty((count, n, height, width), dtype=values.dtype)
    array = values.numpy()
    _block_output(array, scale.astype(array.dtype), bias.astype(array.dtype), block.relu, POOL_CODES[block.pool],
                  out.numpy())
    return out.transpose(0, 1)


def _block_arrays(pre: torch.Tensor, inputs: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(preactivation (N, H, W), basis source (N, H_in, W_in) or a placeholder, whether the basis is 1)."""
    source = pre[:, 0].contiguous().numpy()
    if inputs is None:
        return source, np.zeros((1, 1, 1), source.dtype), True
    return source, inputs[:, 0].contiguous().numpy(), False


def add_shifted_steps(pre: torch.Tensor, inputs: torch.Tensor, taps: list[tuple[int, int, int]],
                      steps: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``pre`` (N, 1, H, W) plus each step times its shifted input channel, in one pass: ``taps`` holds
    (input channel, row shift, column shift) per step, ``inputs`` is the searched conv's (N, C, H_in, W_in)
    input (contiguous). Into ``out`` (contiguous; may be ``pre``: in place) or a new tensor. Bit for bit the
    sum that adding the steps one at a time gives (``FastEngine._plus_step``)."""
    if not (pre.is_contiguous() and inputs.is_contiguous() and (out is None or out.is_contiguous())):
        raise ValueError("pre, inputs and out must be contiguous")
    copy = out is None or out.data_ptr() != pre.data_ptr()
    out = torch.empty_like(pre) if out is None else out
    sources, rows, columns = (np.array(column, dtype=np.int64) for column in zip(*taps))
    n, _, height, width = pre.shape
    in_h, in_w = inputs.shape[2], inputs.shape[3]
    _add_shifted_steps(pre.reshape(n, height * width).numpy(), inputs.reshape(n, inputs.shape[1], in_h * in_w).numpy(),
                       sources, rows, columns, steps.to(pre.dtype).numpy(), copy,
                       out.view(n, height * width).numpy(), height, width, in_h, in_w)
    return out
