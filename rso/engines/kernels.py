"""numba CPU kernels of the fast engine: the output layer's whole sweep in one compiled loop.

For the output layer ``z = W h + b`` the candidates of a visit to ``W[j, i]`` differ from the cached logits in
column ``j`` only, by ``(v - w) h_i``, so a visit costs O(batch x classes): per example the log-sum-exp of the
other classes is shared by the three candidates. Accepting adds ``(v - w) h_i`` to column ``j`` of every
chunk's cached logits. The loop replays :func:`rso.search.loop.visit_each_weight` exactly: same candidate
values, same choice rule (lowest finite loss, ties keep the earlier candidate), same writes, same statistics.

The kernel is serial: a visit is ~10^4 flops, below what a parallel region costs to start, and it keeps
numba's thread pool idle while torch's runs the rest (the two cores are never oversubscribed).
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; without it the torch path is used
    numba = None


def available() -> bool:
    return numba is not None


def set_threads(count: int) -> None:
    """Match numba's pool to torch's so the two never ask for more threads than cores."""
    if numba is not None:
        torch_threads = torch.get_num_threads()
        numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
        # note: starting numba's pool resets the OpenMP thread count torch uses; put torch's back
        torch.set_num_threads(torch_threads)


def _dense_head_loop(features, logits, labels, chunk_of_visit, row_of_visit, column_of_visit, values, current,
                     choices, losses):
    """Returns -1, or the visit at which no candidate had a finite loss and value (losses filled up to it).

    Layouts are (chunk, feature, example) and (chunk, class, example): a visit reads feature ``i`` and an
    accept updates class ``j`` along contiguous memory.
    """
    classes, batch = logits.shape[1], logits.shape[2]
    n_chunks = logits.shape[0]
    candidates = values.shape[1]
    for t in range(values.shape[0]):
        k, j, i = chunk_of_visit[t], row_of_visit[t], column_of_visit[t]
        for c in range(candidates):
            losses[t, c] = 0.0
        for b in range(batch):
            x = features[k, i, b] if i >= 0 else 1.0
            top = -math.inf
            for l in range(classes):
                if l != j and logits[k, l, b] > top:
                    top = logits[k, l, b]
            rest = 0.0
            for l in range(classes):
                if l != j:
                    rest += math.exp(logits[k, l, b] - top)
            y = labels[k, b]
            for c in range(candidates):
                zj = logits[k, j, b] + (values[t, c] - current[t]) * x
                high = max(top, zj)
                lse = high + math.log(rest * math.exp(top - high) + math.exp(zj - high))
                losses[t, c] += lse - (zj if y == j else logits[k, y, b])
        best, choice = math.inf, -1
        for c in range(candidates):   # the lowest finite loss of a finite value (select_candidate's rule)
            value = losses[t, c]
            if value < best and value > -math.inf and math.isfinite(values[t, c]):
                best, choice = value, c
        choices[t] = choice
        if choice < 0:
            return t
        delta = values[t, choice] - current[t]
        if values[t, choice] != current[t]:
            for kk in range(n_chunks):
                if i >= 0:
                    for b in range(batch):
                        logits[kk, j, b] += delta * features[kk, i, b]
                else:
                    for b in range(batch):
                        logits[kk, j, b] += delta
    return -1


if numba is not None:
    _dense_head_loop = numba.njit(cache=True, fastmath=False)(_dense_head_loop)


def dense_head_sweep(engine, chunks: torch.Tensor, steps: torch.Tensor, weight_decay: float, stats, progress,
                     report_every: int = 16, start_visit: int = 0, checkpoint=None) -> None:
    """The output layer's sweep for :class:`rso.engines.fast.FastEngine`, identical to the per-visit loop.

    It runs visits ``start_visit..numel-1`` in blocks; after each block the block's weights are written and
    ``checkpoint(visits_done, stats)`` is called (a checkpoint taken there resumes at that visit).
    """
    from rso.search.loop import NonFiniteLossError, VisitRecorder

    target = engine.target
    flat = target.parameter.data.view(-1)
    dtype = target.parameter.dtype
    numel = target.numel
    # candidate_values(current, step, weight_decay).to(dtype).to(float64), for every visit at once: each
    # element is visited once per sweep, so ``current`` is its value before its visit (elements before
    # ``start_visit`` are not visited again)
    current = flat.detach().cpu().to(torch.float64)
    w0 = current * (1.0 - weight_decay)
    steps = steps.to(torch.float64)
    values = torch.stack([w0, w0 + steps, w0 - steps], dim=1).to(dtype).to(torch.float64)
    used = sorted(set(chunks.tolist()))
    position = {chunk: p for p, chunk in enumerate(used)}
    states = [engine._chunk(chunk) for chunk in used]
    features = torch.stack([state.inputs for state in states]).transpose(1, 2).contiguous().cpu().numpy()
    logits = torch.stack([state.next_output for state in states]).transpose(1, 2).cpu().to(torch.float64)
    logits = logits.contiguous().numpy()
    labels = torch.stack([state.labels for state in states]).cpu().numpy()
    chunk_of_visit = np.array([position[chunk] for chunk in chunks.tolist()], dtype=np.int64)
    indices = np.arange(numel, dtype=np.int64)
    if target.kind == "weight":
        row_of_visit, column_of_visit = indices // engine.layer.in_features, indices % engine.layer.in_features
    else:
        row_of_visit, column_of_visit = indices, np.full(numel, -1, dtype=np.int64)
    choices = np.full(numel, -1, dtype=np.int64)
    losses = np.zeros((numel, values.shape[1]), dtype=np.float64)
    values_array, current_array = values.numpy(), current.numpy()
    recorder = VisitRecorder(stats, progress, engine.partition.batch_size, numel, report_every)
    # the loop runs in blocks of visits so that progress is reported (and checkpoints taken) during the sweep,
    # not only at its end; the cached logits carry the accepted changes from block to block
    block = max(report_every, 1024)
    failed, done = -1, start_visit
    while done < numel and failed < 0:
        end = min(numel, done + block)
        part = slice(done, end)
        stop = _dense_head_loop(features, logits, labels, chunk_of_visit[part], row_of_visit[part],
                                column_of_visit[part], values_array[part], current_array[part], choices[part],
                                losses[part])
        finished = end if stop < 0 else done + stop
        for t in range(done, finished):
            choice = int(choices[t])
            recorder.record(t, choice, float(losses[t, choice]))
        # the block's writes, in the loop's order and arithmetic
        taken = torch.from_numpy(choices[done:finished])
        chosen = values[torch.arange(done, finished), taken]
        changed = chosen != current[done:finished]
        flat[done:finished][changed] = chosen[changed].to(dtype).to(flat.device)
        failed = -1 if stop < 0 else done + stop
        done = finished
        if failed < 0 and checkpoint is not None:
            checkpoint(done, stats)
    if failed >= 0:
        raise NonFiniteLossError(
            f"every candidate loss is non-finite at {target.name}[{failed}] (losses {losses[failed].tolist()}); "
            "the weights or the learning setup diverged")


# ------------------------------------------------------------------------------------------------------------
# The suffix and the next conv layer, channels-last (NHWC), for the inner layers' sweeps.
#
# PyTorch's eager CPU operators run BN -> ReLU -> pooling as three or four passes over tensors of tens of MB,
# and a convolution with one input channel (the next layer fed a one-channel change) as slowly as a full
# 16-channel one. Here BN's batch statistics are one pass, normalization + ReLU + pooling a second one, and
# the one-channel convolution a stencil that adds its taps to the cached output.

def _channel_moments(x, parts):
    """Per-channel sums of ``x - shift`` and of its square over (N, S) of an (N, S, C) array, in float64.

    ``shift`` is the first example's value (numerically safer than raw sums when the mean is large).
    Returns (sums (parts, 2, C), shift (C,)); the partial sums of ``parts`` blocks of examples run in parallel.
    """
    n, s, c = x.shape
    shift = np.empty(c, np.float64)
    for k in range(c):
        shift[k] = x[0, 0, k]
    sums = np.zeros((parts, 2, c), np.float64)
    step = (n + parts - 1) // parts
    for p in numba.prange(parts):
        first = np.zeros(c, np.float64)
        second = np.zeros(c, np.float64)
        for i in range(p * step, min(n, (p + 1) * step)):
            for j in range(s):
                for k in range(c):
                    v = x[i, j, k] - shift[k]
                    first[k] += v
                    second[k] += v * v
        for k in range(c):
            sums[p, 0, k] = first[k]
            sums[p, 1, k] = second[k]
    return sums, shift


def _channel_moments_rows(x, parts):
    """:func:`_channel_moments` for an (N, C, S) array (a contiguous NCHW tensor): each (example, channel)
    row is summed on its own, then added to the channel's total (two-level summation)."""
    n, c, s = x.shape
    shift = np.empty(c, np.float64)
    for k in range(c):
        shift[k] = x[0, k, 0]
    sums = np.zeros((parts, 2, c), np.float64)
    step = (n + parts - 1) // parts
    for p in numba.prange(parts):
        for i in range(p * step, min(n, (p + 1) * step)):
            for k in range(c):
                center = shift[k]
                first = 0.0
                second = 0.0
                for j in range(s):
                    v = x[i, k, j] - center
                    first += v
                    second += v * v
                sums[p, 0, k] += first
                sums[p, 1, k] += second
    return sums, shift


def _nan_max(a, b):
    """max that returns NaN when either argument is NaN, as torch's max pooling does."""
    return a if (a != a or a >= b) else b


def _relu_pool_window(a, b, d, e, relu, pool):
    """One 2x2 window (a b / d e) after an optional ReLU: its average (pool 1) or NaN-keeping max (pool 2),
    in float64."""
    a, b, d, e = np.float64(a), np.float64(b), np.float64(d), np.float64(e)
    if relu:
        a, b, d, e = max(a, 0.0), max(b, 0.0), max(d, 0.0), max(e, 0.0)
    if pool == 1:
        return (((a + b) + d) + e) * 0.25
    return _nan_max(_nan_max(a, b), _nan_max(d, e))


def _affine_relu_pool(x, scale, bias, relu, pool, out):
    """``out = pool(relu(x * scale + bias))`` for NHWC ``x``; pool 0 none, 1 avg 2x2, 2 max 2x2, 3 global avg,
    4 global max (NaN anywhere in a channel gives NaN, as torch's max pooling)."""
    n, height, width, c = x.shape
    zero = np.zeros(1, x.dtype)[0]     # a ReLU against a float64 0.0 would widen every float32 value first
    for i in numba.prange(n):
        if pool == 0:
            for h in range(height):
                for w in range(width):
                    for k in range(c):
                        y = x[i, h, w, k] * scale[k] + bias[k]
                        out[i, h, w, k] = max(y, zero) if relu else y
        elif pool == 3:
            acc = np.zeros(c, np.float64)
            for h in range(height):
                for w in range(width):
                    for k in range(c):
                        y = x[i, h, w, k] * scale[k] + bias[k]
                        acc[k] += max(y, zero) if relu else y
            for k in range(c):
                out[i, 0, 0, k] = acc[k] / (height * width)
        elif pool == 4:
            top = np.full(c, -np.inf, x.dtype)
            for h in range(height):
                for w in range(width):
                    for k in range(c):
                        y = x[i, h, w, k] * scale[k] + bias[k]
                        if relu:
                            y = max(y, zero)
                        top[k] = _nan_max(top[k], y)
            for k in range(c):
                out[i, 0, 0, k] = top[k]
        else:
            for h in range(out.shape[1]):
                for w in range(out.shape[2]):
                    for k in range(c):
                        out[i, h, w, k] = _relu_pool_window(x[i, 2 * h, 2 * w, k] * scale[k] + bias[k],
                                                            x[i, 2 * h, 2 * w + 1, k] * scale[k] + bias[k],
                                                            x[i, 2 * h + 1, 2 * w, k] * scale[k] + bias[k],
                                                            x[i, 2 * h + 1, 2 * w + 1, k] * scale[k] + bias[k],
                                                            relu, pool)


def _add_one_channel_conv(base, new, old, weight, stride, padding, dilation, out):
    """``out = base + conv(new - old)`` where ``new - old`` is one input channel (N, H, W) and ``weight`` that
    channel's taps (KH, KW, O) of the conv; ``base`` and ``out`` NHWC (N, OH, OW, O)."""
    n, out_h, out_w, o = base.shape
    in_h, in_w = new.shape[1], new.shape[2]
    kh, kw = weight.shape[0], weight.shape[1]
    for i in numba.prange(n):
        delta = np.empty((in_h, in_w), base.dtype)
        for y in range(in_h):
            for x in range(in_w):
                delta[y, x] = new[i, y, x] - old[i, y, x]
        change = np.zeros((out_h, out_w, o), base.dtype)
        for y in range(out_h):
            for r in range(kh):
                iy = y * stride[0] - padding[0] + r * dilation[0]
                if iy < 0 or iy >= in_h:
                    continue
                for s in range(kw):
                    for x in range(out_w):
                        ix = x * stride[1] - padding[1] + s * dilation[1]
                        if ix < 0 or ix >= in_w:
                            continue
                        d = delta[iy, ix]
                        for k in range(o):
                            change[y, x, k] += d * weight[r, s, k]
        for y in range(out_h):
            for x in range(out_w):
                for k in range(o):
                    out[i, y, x, k] = base[i, y, x, k] + change[y, x, k]


def _add_taps(row, padded, taps, wide, dilation):
    """``row += sum over taps (r, s) of taps[r, s] * padded[shifted by r rows and s columns]``, taps in order:
    ``padded`` is a zero-bordered image flattened with its row length ``wide``, ``row`` the flattened output
    (``len(row)`` values: the columns between rows are computed and dropped by the caller). Each tap is one
    long shifted axpy."""
    span = row.shape[0]
    for r in range(taps.shape[0]):
        for s in range(taps.shape[1]):
            tap = taps[r, s]
            offset = r * dilation[0] * wide + s * dilation[1]
            source = padded[offset:offset + span]
            for p in range(span):    # note: slices (not offset indices) let LLVM vectorize this loop
                row[p] += source[p] * tap


def _add_one_channel_conv_unit_stride(base, new, old, weight, padding, dilation, out):
    """:func:`_add_one_channel_conv` for stride 1, as long contiguous row updates: the change image is padded
    and flattened with its padded row length, so every tap is one shifted axpy over all output pixels (the
    columns between rows are computed and dropped). ``weight`` is (O, KH, KW) here."""
    n, out_h, out_w, o = base.shape
    in_h, in_w = new.shape[1], new.shape[2]
    wide = in_w + 2 * padding[1]
    rows = in_h + 2 * padding[0]
    span = (out_h - 1) * wide + out_w
    for i in numba.prange(n):
        padded = np.zeros(rows * wide, base.dtype)
        for y in range(in_h):
            for x in range(in_w):
                padded[(y + padding[0]) * wide + x + padding[1]] = new[i, y, x] - old[i, y, x]
        change = np.zeros((o, span), base.dtype)
        for k in range(o):
            _add_taps(change[k], padded, weight[k], wide, dilation)
        for y in range(out_h):
            for x in range(out_w):
                for k in range(o):
                    out[i, y, x, k] = base[i, y, x, k] + change[k, y * wide + x]


def _one_output_channel_conv(inputs, weight, bias, padding, dilation, out):
    """``out[i] = bias + sum over input channels c of conv(inputs[i, c], weight[c])`` for a stride-1 conv with
    one output channel: ``inputs`` NCHW (N, C, H, W), ``weight`` (C, KH, KW), ``out`` (N, OH, OW). Each channel
    is padded and flattened with its padded row length, so every tap is one long shifted axpy (the columns
    between rows are computed and dropped), channels then taps in order."""
    n, channels, in_h, in_w = inputs.shape
    out_h, out_w = out.shape[1], out.shape[2]
    wide = in_w + 2 * padding[1]
    rows = in_h + 2 * padding[0]
    span = (out_h - 1) * wide + out_w
    for i in numba.prange(n):
        padded = np.zeros(rows * wide, out.dtype)
        total = np.zeros(span, out.dtype)
        for c in range(channels):
            for y in range(in_h):
                line = padded[(y + padding[0]) * wide + padding[1]:(y + padding[0]) * wide + padding[1] + in_w]
                plane = inputs[i, c, y]
                for x in range(in_w):
                    line[x] = plane[x]
            _add_taps(total, padded, weight[c], wide, dilation)
        for y in range(out_h):
            for x in range(out_w):
                out[i, y, x] = total[y * wide + x] + bias


if numba is not None:
    _add_taps = numba.njit(cache=True, inline="always")(_add_taps)
    _one_output_channel_conv = numba.njit(cache=True, parallel=True)(_one_output_channel_conv)
    _nan_max = numba.njit(cache=True, inline="always")(_nan_max)
    _relu_pool_window = numba.njit(cache=True, inline="always")(_relu_pool_window)
    _channel_moments = numba.njit(cache=True, parallel=True)(_channel_moments)
    _channel_moments_rows = numba.njit(cache=True, parallel=True)(_channel_moments_rows)
    _affine_relu_pool = numba.njit(cache=True, parallel=True)(_affine_relu_pool)
    _add_one_channel_conv = numba.njit(cache=True, parallel=True)(_add_one_channel_conv)
    _add_one_channel_conv_unit_stride = numba.njit(cache=True, parallel=True)(_add_one_channel_conv_unit_stride)

POOL_CODES = {"none": 0, "avg2": 1, "max2": 2, "global": 3, "global-max": 4}


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """The (N, H, W, C) view of a channels-last (N, C, H, W) tensor, made contiguous if it is not."""
    return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def channel_ops(x: torch.Tensor, ops, buffer=None, combine_moments=None, moments=None, affine=None) -> torch.Tensor:
    """Run a :class:`rso.engines.plan.ChannelOps` group (BN with batch statistics, ReLU, pooling) on the
    (N, C, H, W) tensor ``x``; returns a channels-last (N, C, H', W') tensor. Same values as the PyTorch
    layers up to rounding. ``buffer(shape)``, when given, supplies the (channels-last) output tensor.
    ``combine_moments(count, mean, variance)``, when given, turns this process's BN statistics into the whole
    chunk's (:meth:`rso.distributed.World.combine_moments`). ``moments``: this process's ``(sums, shift,
    count)`` when already computed (by :func:`batch_moments` or a fused kernel); the moments pass is skipped.
    ``affine``: the BN's per-channel ``(scale, bias)`` when its statistics are fixed (:func:`fixed_affine`)."""
    return channel_ops_many([x], ops, None if buffer is None else [buffer], combine_moments, [moments],
                            None if affine is None else [affine])[0]


def channel_ops_many(xs: list[torch.Tensor], ops, buffers=None, combine_moments=None,
                     moments=None, affines=None) -> list[torch.Tensor]:
    """:func:`channel_ops` on tensors of one shape (a visit's candidates) with one ``combine_moments`` call
    for all of them: with several workers, one collective for the candidates instead of one each. Each
    result is what :func:`channel_ops` gives it alone (the reduction is elementwise)."""
    moments = moments if moments is not None else [None] * len(xs)
    if ops.batchnorm is not None and affines is None:
        stats = [given if given is not None else batch_moments(x) for x, given in zip(xs, moments)]
        affines = batchnorm_affines(ops.batchnorm, stats, combine_moments=combine_moments)
    pool = POOL_CODES[ops.pool]
    outs = []
    for position, x in enumerate(xs):
        source = _nhwc(x)
        n, height, width, c = source.shape
        array = source.numpy()
        scale, bias = affines[position] if ops.batchnorm is not None else (np.ones(c), np.zeros(c))
        shape = {0: (n, height, width, c), 3: (n, 1, 1, c), 4: (n, 1, 1, c)}.get(pool, (n, height // 2, width // 2, c))
        shape = (shape[0], shape[3], shape[1], shape[2])
        out = (buffers[position](shape) if buffers is not None else
               torch.empty(shape, dtype=x.dtype, memory_format=torch.channels_last))
        _affine_relu_pool(array, scale.astype(array.dtype), bias.astype(array.dtype), ops.relu, pool,
                          _nhwc(out).numpy())
        outs.append(out)
    return outs


def fixed_affine(layer, mean: torch.Tensor, variance: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """BN ``layer`` with fixed statistics as per-channel ``x * scale + bias`` (float64), for :func:`channel_ops`."""
    mean, variance = mean.detach().cpu().double().numpy(), variance.detach().cpu().double().numpy()
    return _scale_bias(mean, variance, layer.eps, *_bn_parameters(layer))


def batch_moments(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel ``(sums (parts, 2, C), shift (C,), count)`` of the (N, C, ...) tensor ``x``: sums of
    ``x - shift`` and of its square over the examples and pixels (see :func:`_channel_moments`). Read in the
    layout ``x`` has: a contiguous NCHW (or (N, C) / (N, C, L)) tensor is not copied to channels-last."""
    parts = numba.get_num_threads()
    if x.shape[0] == 0 or x.numel() == 0:   # a worker with no example of this chunk: contributes nothing
        return np.zeros((parts, 2, x.shape[1]), np.float64), np.zeros(x.shape[1], np.float64), 0
    if x.dim() >= 3 and x.is_contiguous():
        rows = x.detach().reshape(x.shape[0], x.shape[1], -1)
        if rows.shape[2] > 1 or x.shape[1] == 1:
            sums, shift = _channel_moments_rows(rows.numpy(), parts)
            return sums, shift, rows.shape[0] * rows.shape[2]
    if x.dim() == 2:
        x = x.unsqueeze(2).unsqueeze(3)
    elif x.dim() == 3:
        x = x.unsqueeze(3)
    source = _nhwc(x.detach())
    n, height, width, c = source.shape
    sums, shift = _channel_moments(source.numpy().reshape(n, height * width, c), parts)
    return sums, shift, n * height * width


def moments(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel (mean, biased variance) in float64 and the count per channel, of the (N, C, ...) tensor
    ``x``, in one pass (:func:`batch_moments`)."""
    sums, shift, count = batch_moments(x)
    return (*_mean_variance(sums, shift, count), count)


def _mean_variance(sums: np.ndarray, shift: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, biased variance) from :func:`batch_moments`' sums (zeros for a count of 0: no examples)."""
    first, second = sums[:, 0].sum(axis=0) / max(count, 1), sums[:, 1].sum(axis=0) / max(count, 1)
    return shift + first, np.maximum(second - first * first, 0.0)


def _bn_parameters(layer, part=slice(None)) -> tuple[np.ndarray | None, np.ndarray | None]:
    """BN ``layer``'s (weight, bias) in float64, entries ``part``; ``None`` where it has none."""
    weight = None if layer.weight is None else layer.weight.detach().cpu().double().numpy()[part]
    bias = None if layer.bias is None else layer.bias.detach().cpu().double().numpy()[part]
    return weight, bias


def _scale_bias(mean, variance, eps: float, weight, bias_term) -> tuple[np.ndarray, np.ndarray]:
    """Normalization by (mean, variance), then the affine (weight, bias), as one ``x * scale + bias``."""
    scale = 1.0 / np.sqrt(variance + eps)
    if weight is not None:
        scale = scale * weight
    bias = -mean * scale
    if bias_term is not None:
        bias = bias + bias_term
    return scale, bias


def batchnorm_affine(layer, sums: np.ndarray, shift: np.ndarray, count: int,
                     channel: int | None = None, combine_moments=None) -> tuple[np.ndarray, np.ndarray]:
    """BN with batch statistics as ``x * scale + bias`` per column of the moments (a channel, or with
    ``channel`` given, a candidate of that one channel), from the moments of its input (``combine_moments``:
    see :func:`channel_ops`)."""
    return batchnorm_affines(layer, [(sums, shift, count)], channel, combine_moments)[0]


def batchnorm_affines(layer, stats: list, channel: int | None = None,
                      combine_moments=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`batchnorm_affine` for several ``(sums, shift, count)`` of one count, with one
    ``combine_moments`` call for all of them (its reduction is elementwise: the same values as one call each)."""
    means, variances = map(list, zip(*(_mean_variance(*stat) for stat in stats)))
    if combine_moments is not None:
        counts = {count for _, _, count in stats}
        if len(counts) != 1:
            raise ValueError(f"moments of different counts cannot be combined in one call: {sorted(counts)}")
        sizes = np.cumsum([len(mean) for mean in means])[:-1]
        mean, variance = combine_moments(counts.pop(), np.concatenate(means), np.concatenate(variances))
        means, variances = np.split(np.asarray(mean), sizes), np.split(np.asarray(variance), sizes)
    parameters = _bn_parameters(layer, slice(None) if channel is None else channel)
    return [_scale_bias(mean, variance, layer.eps, *parameters) for mean, variance in zip(means, variances)]


def add_one_channel_conv(base: torch.Tensor, new: torch.Tensor, old: torch.Tensor, layer, channel: int,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """``base + conv(new - old)`` for a change ``new - old`` (N, 1, H, W) of input channel ``channel`` of the
    Conv2d ``layer`` (no bias: ``base`` already has it); ``base`` (N, O, OH, OW). Written into ``out`` (a
    channels-last tensor shaped like ``base``; may be ``base`` itself) or a new channels-last tensor."""
    target = _nhwc(base)
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, memory_format=torch.channels_last)
    if not out.is_contiguous(memory_format=torch.channels_last) or out.shape != base.shape:
        raise ValueError("out must be a channels-last tensor shaped like base")
    weight = layer.weight.detach()[:, channel]
    new, old = new[:, 0].contiguous().numpy(), old[:, 0].contiguous().numpy()
    result = out.permute(0, 2, 3, 1).numpy()
    if tuple(layer.stride) == (1, 1):
        _add_one_channel_conv_unit_stride(target.numpy(), new, old, weight.contiguous().numpy(), layer.padding,
                                          layer.dilation, result)
    else:
        _add_one_channel_conv(target.numpy(), new, old, weight.permute(1, 2, 0).contiguous().numpy(), layer.stride,
                              layer.padding, layer.dilation, result)
    return out


def one_output_channel_conv(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding,
                            dilation) -> torch.Tensor:
    """``F.conv2d(inputs, weight, bias, 1, padding, dilation)`` for ONE output channel (``weight`` (1, C, KH, KW))
    of a contiguous NCHW ``inputs``, up to rounding: the fast engine's preactivation of a channel it moves to.
    oneDNN computes a one-channel conv at a few GFLOP/s (paper6's conv1 at batch 5000: about 0.2 s a move)."""
    n, _, in_h, in_w = inputs.shape
    _, _, kh, kw = weight.shape
    out_h = in_h + 2 * padding[0] - dilation[0] * (kh - 1)
    out_w = in_w + 2 * padding[1] - dilation[1] * (kw - 1)
    out = torch.empty((n, 1, out_h, out_w), dtype=inputs.dtype)
    value = 0.0 if bias is None else float(bias.detach().reshape(-1)[0])
    _one_output_channel_conv(inputs.numpy(), weight[0].detach().contiguous().numpy(), value, tuple(padding),
                             tuple(dilation), out[:, 0].numpy())
    return out
