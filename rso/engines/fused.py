"""numba kernels that fuse the fast engine's memory-bound passes over a candidate's tensors (CPU).

The next conv's one-channel change (``Q + n(new - old)``) and the batch moments of the BN that follows it
are one pass over the next layer's output here instead of two: each example's output is computed with the
output channels innermost (one short vector of taps per input pixel) and its moments are added while it is
still in cache. The moments are returned as sums, not applied: the normalization is a separate pass
(:func:`rso.engines.kernels.channel_ops` with ``moments=``), so a reduction over processes can sit between.

The arithmetic is that of the unfused kernels (taps in the same order, moments over the same blocks of
examples in the same order, the same shift), so the results are bit-identical to them.
"""

from __future__ import annotations

import numpy as np
import torch

from rso.engines.kernels import POOL_CODES, numba

FUSED_POOLS = ("none", "avg2")      # pooling between the next conv and its BN that the moments follow


def _conv_example(base, new, old, weight, padding, dilation, i, padded, acc, out):
    """``out[i] = base[i] + conv(new[i] - old[i])`` for a stride-1 conv, output channels innermost.

    ``padded`` is a zero-bordered scratch image (its border is never written), ``acc`` one pixel's taps.
    """
    out_h, out_w, o = base.shape[1], base.shape[2], base.shape[3]
    in_h, in_w = new.shape[1], new.shape[2]
    kh, kw = weight.shape[0], weight.shape[1]
    for y in range(in_h):
        for x in range(in_w):
            padded[y + padding[0], x + padding[1]] = new[i, y, x] - old[i, y, x]
    for y in range(out_h):
        for x in range(out_w):
            for k in range(o):
                acc[k] = 0.0
            for r in range(kh):
                for s in range(kw):
                    d = padded[y + r * dilation[0], x + s * dilation[1]]
                    for k in range(o):
                        acc[k] += d * weight[r, s, k]
            for k in range(o):
                out[i, y, x, k] = base[i, y, x, k] + acc[k]


def _moment_value(out, i, h, w, k, pool, cell):
    """The BN input at (i, h, w, k): the conv output, or its 2x2 average as the avg2 pooling kernel rounds it
    (summed in float64, stored in the tensor's dtype: ``cell`` is a one-element array of that dtype)."""
    if pool == 1:
        cell[0] = (((np.float64(out[i, 2 * h, 2 * w, k]) + out[i, 2 * h, 2 * w + 1, k]) + out[i, 2 * h + 1, 2 * w, k])
                   + out[i, 2 * h + 1, 2 * w + 1, k]) * 0.25
        return np.float64(cell[0])
    return np.float64(out[i, h, w, k])


def _next_conv_moments(base, new, old, weight, padding, dilation, pool, out, parts):
    """:func:`_conv_example` for every example, and the per-channel sums of the BN input minus a shift and of
    its square over (N, H', W'), in ``parts`` blocks of examples (as ``kernels._channel_moments``).

    Returns (sums (parts, 2, O), shift (O,)): the shift is the first example's first BN input value.
    """
    n, out_h, out_w, o = base.shape
    in_h, in_w = new.shape[1], new.shape[2]
    rows, wide = in_h + 2 * padding[0], in_w + 2 * padding[1]
    bn_h, bn_w = (out_h // 2, out_w // 2) if pool == 1 else (out_h, out_w)
    padded = np.zeros((rows, wide), base.dtype)
    acc = np.empty(o, base.dtype)
    _conv_example(base, new, old, weight, padding, dilation, 0, padded, acc, out)
    shift = np.empty(o, np.float64)
    cell = np.empty(1, base.dtype)
    for k in range(o):
        shift[k] = _moment_value(out, 0, 0, 0, k, pool, cell)
    sums = np.zeros((parts, 2, o), np.float64)
    step = (n + parts - 1) // parts
    for p in numba.prange(parts):
        scratch = np.zeros((rows, wide), base.dtype)
        taps = np.empty(o, base.dtype)
        rounded = np.empty(1, base.dtype)
        first = np.zeros(o, np.float64)
        second = np.zeros(o, np.float64)
        for i in range(p * step, min(n, (p + 1) * step)):
            if i > 0:
                _conv_example(base, new, old, weight, padding, dilation, i, scratch, taps, out)
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


def _next_conv(base, new, old, weight, padding, dilation, out):
    """:func:`_conv_example` for every example, in parallel (no moments: a cache update)."""
    n, o = base.shape[0], base.shape[3]
    rows, wide = new.shape[1] + 2 * padding[0], new.shape[2] + 2 * padding[1]
    for i in numba.prange(n):
        padded = np.zeros((rows, wide), base.dtype)
        acc = np.empty(o, base.dtype)
        _conv_example(base, new, old, weight, padding, dilation, i, padded, acc, out)


if numba is not None:
    _conv_example = numba.njit(cache=True, inline="always")(_conv_example)
    _moment_value = numba.njit(cache=True, inline="always")(_moment_value)
    _next_conv_moments = numba.njit(cache=True, parallel=True)(_next_conv_moments)
    _next_conv = numba.njit(cache=True, parallel=True)(_next_conv)


def fits(layer) -> bool:
    """Whether :func:`next_conv` computes this Conv2d's one-channel change (stride 1, numeric padding)."""
    return (tuple(layer.stride) == (1, 1) and isinstance(layer.padding, tuple) and layer.groups == 1)


def next_conv(base: torch.Tensor, new: torch.Tensor, old: torch.Tensor, layer, channel: int, out: torch.Tensor,
              pool: str | None = None):
    """``out = base + conv(new - old)`` for a change of input channel ``channel`` of the stride-1 Conv2d
    ``layer`` (``base`` holds its bias); ``base`` and ``out`` channels-last (N, O, OH, OW), ``new``/``old``
    (N, 1, H, W). ``out`` may be ``base`` (in place).

    ``pool``: also return the moments ``(sums, shift, count)`` of the BN input that follows, the output
    itself (``"none"``) or its 2x2 average (``"avg2"``); ``None``: no moments (returns ``None``).
    """
    if not (base.is_contiguous(memory_format=torch.channels_last) and out.is_contiguous(memory_format=torch.channels_last)
            and out.shape == base.shape):
        raise ValueError("base and out must be channels-last tensors of the same shape")
    source = base.permute(0, 2, 3, 1).numpy()
    result = out.permute(0, 2, 3, 1).numpy()
    weight = layer.weight.detach()[:, channel].permute(1, 2, 0).contiguous().numpy()
    new, old = new[:, 0].contiguous().numpy(), old[:, 0].contiguous().numpy()
    padding, dilation = tuple(layer.padding), tuple(layer.dilation)
    if pool is None:
        _next_conv(source, new, old, weight, padding, dilation, result)
        return None
    code = POOL_CODES[pool]
    if pool not in FUSED_POOLS:
        raise ValueError(f"moments after pooling {pool!r} are not fused; choose one of {', '.join(FUSED_POOLS)}")
    sums, shift = _next_conv_moments(source, new, old, weight, padding, dilation, code, result,
                                     numba.get_num_threads())
    n, height, width = source.shape[:3]
    count = n * (height // 2) * (width // 2) if code == 1 else n * height * width
    return sums, shift, count
