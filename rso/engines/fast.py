"""The fast engine: exact candidate losses from cached lower layers and one-channel incremental updates.

For a sweep over a tensor of layer ``d`` (a Conv2d/Linear weight or bias, or a BatchNorm gamma/beta) and a
fixed chunk partition, per chunk ``k``::

    X_k  = layers[:d](x_k)                       cached once: nothing below d changes during the sweep
    Q_k  = the next linear layer's output         (the logits when no linear layer follows)
    A_k  = channel c of the per-channel block after d, for the current weights

A visit to an element of output channel ``c`` (conv ``(c, i, r, s)``, dense ``(c, i)``, bias ``c``, BN ``c``)
changes channel ``c`` only, up to the next linear layer ``n``::

    P_v   = P_c + (v - w) * basis                 basis = X_i shifted by (r, s) (conv) | X_i (dense) | 1 (bias)
    A_v   = block_c(P_v)                          BN with this channel's batch statistics, ReLU, pooling
    Q_v   = Q_k + n(A_v - A_c)  restricted to input channel c of n     (or: column c of the logits := A_v)
    F(v)  = CE(suffix(Q_v))                       the layers after n, once per candidate, in full

which equals the full forward pass up to rounding (float64: ~1e-15 relative). Accepted changes update the
visited chunk's P and A at once and the other chunks' lazily, from a log of changed channels, when they are
next visited. Q lags behind: it holds channel ``c`` as ``A_q`` (an earlier A), candidates use
``Q_v = Q_k + n(A_v - A_q)``, and Q catches up (``+= n(A_c - A_q)``, one pass) only when the chunk moves to
another channel, not on every accepted step. BN always uses the chunk's batch statistics (never the running
ones), as in the reference.

The output layer is the closed-form special case (``z_c += (v - w) x_i``, O(batch x classes) per visit); on
CPU its whole sweep runs inside one numba function (``rso.engines.kernels``), with the same decisions as the
per-visit loop. On CPU, numba kernels also feed the next conv its one-channel change (a stencil added to the
cached output, in place for a chunk's cache; for a candidate it also sums the moments of the BN after it,
``rso.engines.fused``) and run each BN -> ReLU -> pooling group of the suffix in two passes over a
channels-last tensor (one when the moments came with the stencil). Everything else is PyTorch operators, so the same code runs on CUDA;
``kernels="torch"`` selects that path on CPU too. In the suffix, a conv that a 2x2 average pooling follows runs
as one stride-2 conv with the folded kernel (``plan.PooledConv``, equal up to rounding): paper6's conv3 then
costs 0.4x, and conv1's sweep about 0.8x.

Within a channel, a chunk's cached preactivation follows accepted changes by adding their steps (``P +=
(v - w) * basis``, as a candidate is formed; on the numba path all the steps pending for a chunk in one pass);
only a move to another channel costs a one-channel convolution.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from rso.distributed import LOCAL, World
from rso.engines.base import (ChunkPartition, FixedStatistics, ScoringEngine, channels_last, return_freed_memory,
                              summed_cross_entropy)
from rso.engines.plan import (ChannelOps, PooledConv, SweepPlan, _foldable, fold_pooled_convs, group_channel_ops,
                              plan_sweep, unsupported_reason)
from rso.search.visit import BATCHNORMS, SearchTarget

KERNELS = ("auto", "numba", "torch")
_ALLOCATOR_TUNED = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory for large tensors instead of returning it to the kernel.

    Every candidate allocates tensors of tens of MB; by default glibc serves those with fresh ``mmap`` pages,
    and the page faults (costly in a VM) made elementwise ops and convolutions 1.5-5x slower than with
    reused memory. ``mallopt(M_MMAP_MAX, 0)`` and a large trim threshold keep them in the heap. Process-wide,
    once, on Linux/glibc only; ``RSO_NO_MALLOPT=1`` leaves the allocator alone. Returns whether it is in effect.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("RSO_NO_MALLOPT") == "1" or not sys.platform.startswith("linux"):
        return _ALLOCATOR_TUNED
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))
    except (OSError, AttributeError):
        pass
    return _ALLOCATOR_TUNED
SUFFIX_PRECISIONS = (None, "bfloat16")


@dataclass(frozen=True)
class _Change:
    """An accepted change: its output channel, its flat element, and new - old value (as score() forms it)."""

    channel: int
    index: int
    step: torch.Tensor


@dataclass
class _Chunk:
    """One chunk's caches for the current sweep."""

    inputs: torch.Tensor          # X: input of the searched layer
    labels: torch.Tensor
    next_output: torch.Tensor     # Q: output of the next linear layer (or the logits), see ``in_next``
    channel: int = -1             # the channel whose block output ``block_output`` holds
    block_output: torch.Tensor | None = None     # A: (B, 1, ...) for ``channel``, current weights
    preactivation: torch.Tensor | None = None    # P: (B, 1, ...) for ``channel``, current weights
    in_next: torch.Tensor | None = None          # the block output of ``channel`` that Q includes (deferred)
    span: tuple[int, int] = (0, 1)               # (offset, size) of ``channel`` in the next layer's input
    synced: int = 0               # length of the change log the caches include
    current_loss: float | None = None   # the chunk's loss under the weights of log length ``loss_version``
    loss_version: int = -1
    block_stale: bool = False     # ``block_output`` lags ``preactivation``: the next score() derives it


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _fold_next_pooling(plan: SweepPlan) -> SweepPlan:
    """``plan`` with its next layer folded with a 2x2 average pooling right after it (``plan.PooledConv``;
    the pooling leaves the suffix): the next layer's cached output, each candidate's one-channel change and the
    BN moments after it then cover a quarter of the pixels (paper6's conv1 and conv3 when the tensor below them
    is searched). ``plan.layers`` and ``next_index`` stay the model's."""
    if plan.next_layer is None or not plan.suffix or not _foldable(plan.next_layer, plan.suffix[0]):
        return plan
    return replace(plan, next_layer=PooledConv(plan.next_layer), suffix=plan.suffix[1:])


class FastEngine(ScoringEngine):
    """Cached prefix, one-channel incremental deltas, full suffix per candidate; exact up to rounding.

    ``kernels``: ``auto`` (numba on CPU where it helps, PyTorch operators otherwise), ``numba`` or ``torch``.
    ``suffix_precision``: ``None`` (default, exact) or ``"bfloat16"``: the layers after the next linear layer
    run under autocast. That may change decisions, so it is off by default and never what the tests check.
    """

    name = "fast"

    def __init__(self, kernels: str = "auto", suffix_precision: str | None = None, world: World = LOCAL):
        if kernels not in KERNELS:
            raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
        if suffix_precision not in SUFFIX_PRECISIONS:
            raise ValueError(f"unknown suffix precision {suffix_precision!r}; choose None or bfloat16")
        self.kernels = kernels
        self.suffix_precision = suffix_precision
        self.world = world
        if kernels != "torch":
            from rso.engines import kernels as numba_kernels
            numba_kernels.set_threads(torch.get_num_threads())

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return unsupported_reason(model) is None

    # ----------------------------------------------------------------------------------------- sweep state
    def begin_sweep(self, model: nn.Module, target: SearchTarget, images: torch.Tensor, labels: torch.Tensor,
                    partition: ChunkPartition, fixed: FixedStatistics | None = None) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fast engine cannot score this model: {reason}; use --engine reference or auto")
        super().begin_sweep(model, target, images, labels, partition, fixed)
        self.plan: SweepPlan = _fold_next_pooling(plan_sweep(model, target))
        self.layer = self.plan.layers[self.plan.searched]
        self._below = fold_pooled_convs(self.plan.layers[:self.plan.searched])   # fixed during the sweep
        self.start = target.parameter.detach().clone()     # the tensor as the sweep found it
        self.chunks: dict[int, _Chunk] = {}
        self.log: list[_Change] = []                        # every accepted change, in order
        self.values = target.parameter.detach().clone().view(-1)   # the tensor as the engine last saw it
        self.first_change: dict[int, int] = {}              # channel -> log position of its first change
        self._last = None
        self._buffers: dict[str, torch.Tensor] = {}
        self.device = images.device
        self.dtype = target.parameter.dtype
        if self.device.type == "cpu":
            keep_freed_memory()
        # on CPU, numba kernels do the next conv's one-channel change and the suffix's BN/ReLU/pooling runs
        self._numba_path = self.use_numba() and self.suffix_precision is None
        layer = self.layer
        # a weight's basis is a shifted copy of one input channel (stride 1, no dilation, numeric padding)
        self._shifted_basis = (target.kind == "weight" and isinstance(layer, nn.Conv2d)
                               and tuple(layer.stride) == (1, 1) and tuple(layer.dilation) == (1, 1)
                               and isinstance(layer.padding, tuple))
        spatial_suffix = isinstance(self.plan.next_layer, nn.Conv2d)
        # a conv that a 2x2 average pooling follows runs as one stride-2 conv (plan.PooledConv: 0.4x the time)
        suffix = fold_pooled_convs(self.plan.suffix)
        self._suffix = group_channel_ops(suffix) if self._numba_path and spatial_suffix else suffix
        self._fused_pool = self._moments_with_next_conv()
        # several workers, numba path, no autocast: the candidates run the suffix side by side (one collective
        # per BN for all of them); one process keeps one candidate at a time (less memory, nothing to gain)
        self._lockstep = self.world.size > 1 and self._numba_path and spatial_suffix
        self._channel_block = self._fused_channel_block()
        self._block_buffer: torch.Tensor | None = None
        self._block_values: torch.Tensor | None = None      # the candidates' BN inputs (fused.block_values)
        self._visited_chunks = partition.n_chunks           # the chunks the sweep visits (run_sweep knows)
        if isinstance(self.layer, nn.Conv2d) and target.kind == "weight":
            _, fan_in, height, width = self.layer.weight.shape
            self._per_channel = fan_in * height * width
        elif isinstance(self.layer, nn.Linear) and target.kind == "weight":
            self._per_channel = self.layer.in_features
        else:
            self._per_channel = 1

    def _moments_with_next_conv(self) -> str | None:
        """Whether a candidate's next-conv pass also sums the moments of the BN after it (numba path):
        ``"none"`` when the BN takes the conv output, ``"avg2"`` when a 2x2 average pooling sits between,
        ``None`` when the moments stay a pass of their own."""
        from rso.engines import fused
        layer, suffix = self.plan.next_layer, self._suffix
        if not (self._numba_path and isinstance(layer, nn.Conv2d) and fused.fits(layer) and suffix):
            return None
        first = suffix[0]
        if isinstance(first, ChannelOps) and first.batchnorm is not None:
            return "none"
        if (isinstance(first, ChannelOps) and first.batchnorm is None and not first.relu and first.pool == "avg2"
                and len(suffix) > 1 and isinstance(suffix[1], ChannelOps) and suffix[1].batchnorm is not None):
            return "avg2"
        return None

    def _fused_channel_block(self):
        """The searched conv channel's block as one numba kernel (``rso.engines.fused.ChannelBlock``), or
        ``None`` when PyTorch's operators run it (BN or Linear searched, a strided conv, a Flatten in the block)."""
        layer, kind = self.layer, self.target.kind
        if not (self._numba_path and isinstance(layer, nn.Conv2d) and kind in ("weight", "bias")):
            return None
        if kind == "weight" and not self._shifted_basis:
            return None
        from rso.engines import fused
        return fused.channel_block(self.plan.block)

    def _basis_source(self, inputs: torch.Tensor, index: int) -> tuple[torch.Tensor | None, tuple[int, int]]:
        """What :meth:`_basis` shifts, for the fused block: (input channel, (row, column) shift) or (None, -)
        for a bias (basis 1)."""
        if self.target.kind != "weight":
            return None, (0, 0)
        source, shift = self._tap(index)
        return inputs[:, source:source + 1], shift

    def _tap(self, index: int) -> tuple[int, tuple[int, int]]:
        """A conv weight's (input channel, (row, column) shift of its basis)."""
        _, _, height, width = self.layer.weight.shape
        source, offset = divmod(index % self._per_channel, height * width)
        row, column = divmod(offset, width)
        pad_h, pad_w = self.layer.padding
        return source, (row - pad_h, column - pad_w)

    def release(self, chunk: int) -> None:
        self.chunks.pop(chunk, None)
        if self._last is not None and self._last[0] == chunk:
            self._last = None

    def end_sweep(self) -> None:
        self.chunks = {}
        self._buffers = {}
        self._block_buffer = self._block_values = None
        self._last = None
        return_freed_memory()

    def use_numba(self) -> bool:
        if self.kernels == "torch" or self.device.type != "cpu":
            return False
        if self.kernels == "auto" or self.kernels == "numba":
            from rso.engines import kernels
            return kernels.available()
        return False

    # ------------------------------------------------------------------------------------ the layer math
    @torch.no_grad()
    def _chunk(self, chunk: int) -> _Chunk:
        state = self.chunks.get(chunk)
        if state is None:
            rows = self.partition.indices(chunk)
            with self.world.batch_statistics(self.model, self.fixed):
                x, y = self._forward_to_next(self.images[rows])
            y = self._next_layout(y)
            state = _Chunk(x, self.labels[rows], y, synced=len(self.log))
            self.chunks[chunk] = state
        return state

    def _forward_to_next(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input of the searched layer, output of the next linear layer) for the examples ``x``.

        A conv that a 2x2 average pooling follows runs as one :class:`PooledConv`, below the searched layer
        and above it (the searched layer's folded from its weights as they are now): paper6's conv1 at 28x28
        is most of a cache fill, and folded it takes 0.4x the work; the values are the same up to rounding."""
        plan = self.plan
        x = self._forward(self._below, x)
        upward = fold_pooled_convs(plan.layers[plan.searched:plan.next_index])
        y = self._forward(upward + ([] if plan.next_layer is None else [plan.next_layer]), x)
        if self._numba_path and x.dim() == 4:
            x = x.contiguous()     # the one-channel passes read an input channel as a contiguous plane
        return x, y

    def _forward(self, layers, x: torch.Tensor) -> torch.Tensor:
        """``layers`` on ``x`` (BN on the chunk's statistics, or the fixed ones). On the numba path each
        BN -> ReLU -> pooling run is :func:`rso.engines.kernels.channel_ops` (two passes instead of three or
        four; one with fixed BN statistics) and the convolutions run channels-last: the sweeps of paper6's BN
        layers, mostly cache fill, took 0.6-0.9x the time in the bench (results/bench, one worker). The values
        are the PyTorch layers' up to rounding."""
        if not (self._numba_path and x.dim() == 4):
            for layer in layers:
                x = layer(x)
            return x
        from rso.engines.kernels import channel_ops, fixed_affine
        combine = self.world.combine_moments if self.world.size > 1 else None
        for group in group_channel_ops(list(layers)):
            if isinstance(group, ChannelOps) and (group.batchnorm is None or group.batchnorm not in self.fixed):
                x = channel_ops(x, group, combine_moments=combine)
            elif isinstance(group, ChannelOps):   # BN with fixed statistics (--search-bn fixed-below)
                x = channel_ops(x, group, affine=fixed_affine(group.batchnorm, *self.fixed[group.batchnorm]))
            elif isinstance(group, nn.Conv2d):
                x = self._suffix_layer(group, x)
            else:
                x = group(x)
        return x

    @torch.no_grad()
    def prebuild(self, chunks: list[int], block: int = 8192) -> None:
        """Fill the caches of ``chunks`` in a few large batches: only where no BN below the next linear layer
        normalizes with its chunk's statistics, so an example's activations do not depend on the rest of its
        chunk (e.g. a dense head, or BN layers with fixed statistics)."""
        below = self.plan.layers[:self.plan.next_index + 1]
        wanted = [chunk for chunk in chunks if chunk not in self.chunks]
        if len(wanted) < 2 or any(isinstance(layer, BATCHNORMS) and layer not in self.fixed for layer in below):
            return
        rows = torch.cat([self.partition.indices(chunk) for chunk in wanted])
        inputs, outputs = [], []
        with self.world.batch_statistics(self.model, self.fixed):
            for start in range(0, len(rows), block):
                x, y = self._forward_to_next(self.images[rows[start:start + block]])
                inputs.append(x)
                outputs.append(y)
        inputs, outputs = torch.cat(inputs), torch.cat(outputs)
        ends = torch.tensor([len(self.partition.indices(chunk)) for chunk in wanted]).cumsum(0).tolist()
        for position, chunk in enumerate(wanted):
            part = slice(ends[position - 1] if position else 0, ends[position])
            self.chunks[chunk] = _Chunk(inputs[part], self.labels[rows[part]], self._next_layout(outputs[part]),
                                        synced=len(self.log))

    def _next_layout(self, next_output: torch.Tensor) -> torch.Tensor:
        """The cached next-layer output in the layout its updates use: channels-last for the numba kernels."""
        if self._numba_path and isinstance(self.plan.next_layer, nn.Conv2d):
            return next_output.contiguous(memory_format=torch.channels_last)
        return next_output

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A channels-last (N, C, H, W) tensor of ``shape``, reused by every candidate of the sweep."""
        buffer = self._buffers.get(name)
        if buffer is None or tuple(buffer.shape) != tuple(shape):
            buffer = torch.empty(shape, dtype=self.dtype, device=self.device, memory_format=torch.channels_last)
            self._buffers[name] = buffer
        return buffer

    def _locate(self, index: int) -> int:
        return index // self._per_channel

    def _preactivation(self, inputs: torch.Tensor, channel: int, tensor: torch.Tensor) -> torch.Tensor:
        """Channel ``channel`` of the searched layer's output, (B, 1, ...), with ``tensor`` as the searched tensor."""
        layer, kind = self.layer, self.target.kind
        if isinstance(layer, BATCHNORMS):
            return inputs[:, channel:channel + 1]
        weight = tensor if kind == "weight" else layer.weight
        bias = tensor if kind == "bias" else layer.bias
        weight = weight[channel:channel + 1]
        bias = None if bias is None else bias[channel:channel + 1]
        if isinstance(layer, nn.Conv2d):
            if self._shifted_basis and self._numba_path and inputs.is_contiguous():
                from rso.engines.kernels import one_output_channel_conv
                return one_output_channel_conv(inputs, weight, bias, layer.padding, layer.dilation)
            return F.conv2d(inputs, weight, bias, layer.stride, layer.padding, layer.dilation)
        return F.linear(inputs, weight, bias)

    def _plus_step(self, pre: torch.Tensor, inputs: torch.Tensor, index: int, step: torch.Tensor,
                   in_place: bool = False) -> torch.Tensor:
        """``pre + step * self._basis(inputs, index)``, with the same roundings (zeros may change sign): in a new
        tensor, or with ``in_place`` in ``pre`` itself (a tensor the caller owns, aliased by no cache). Where the
        basis is a shifted copy of one input channel, only the rectangle the shift covers is added: no padded
        copy of the channel and no full-size product (an accepted step reaches every chunk's cache this way,
        so this runs about 8 times a conv1 visit; the copy costs about as much as the sum)."""
        if not self._shifted_basis:
            return pre.add_(step * self._basis(inputs, index)) if in_place else pre + step * self._basis(inputs, index)
        channel, (dy, dx) = self._basis_source(inputs, index)
        (in_h, in_w), (out_h, out_w) = inputs.shape[2:], pre.shape[2:]
        # basis[y, x] = channel[y + dy, x + dx] inside the input, else 0
        y0, y1 = max(0, -dy), min(out_h, in_h - dy)
        x0, x1 = max(0, -dx), min(out_w, in_w - dx)
        out = pre if in_place else pre.clone()
        if y0 < y1 and x0 < x1:
            out[:, :, y0:y1, x0:x1] += step * channel[:, :, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
        return out

    def _plus_steps(self, pre: torch.Tensor, inputs: torch.Tensor, steps: list[tuple[int, torch.Tensor]],
                    in_place: bool = False) -> torch.Tensor:
        """``pre`` plus each ``(index, step)`` of ``steps`` in order, as :meth:`_plus_step` one at a time (the
        same roundings): in a new tensor, or with ``in_place`` in ``pre`` (a tensor the caller owns). On the
        numba path with a shifted basis, one pass over ``pre`` (``fused.add_shifted_steps``): a chunk catching
        up on the steps accepted since its last visit (about 8 at a conv1 visit) reads and writes its
        preactivation once, not once per step."""
        if self._numba_path and self._shifted_basis and pre.is_contiguous() and inputs.is_contiguous():
            from rso.engines import fused
            taps = [(source, *shift) for source, shift in (self._tap(index) for index, _ in steps)]
            return fused.add_shifted_steps(pre, inputs, taps, torch.stack([step for _, step in steps]),
                                           out=pre if in_place else None)
        for position, (index, step) in enumerate(steps):
            pre = self._plus_step(pre, inputs, index, step, in_place=in_place or position > 0)
        return pre

    def _cache_block(self, pre: torch.Tensor, channel: int) -> tuple[torch.Tensor, int, int]:
        """:meth:`_block` of a chunk's own preactivation ``pre`` (N, 1, ...): with the fused kernels that score
        the candidates where they do (a candidate of step 0, basis 1), else PyTorch's operators."""
        block = self._channel_block
        if block is None:
            return self._block(pre, channel, None)
        from rso.engines import fused
        values, moments = fused.block_values(pre, None, torch.zeros(1, dtype=pre.dtype), (0, 0), block)
        combine = self.world.combine_moments if self.world.size > 1 else None
        return fused.block_output(values, block, channel, moments, None, combine), channel, 1

    def _basis(self, inputs: torch.Tensor, index: int) -> torch.Tensor | float:
        """d(preactivation of the changed channel) / d(element ``index``): (B, 1, ...) or 1."""
        if self.target.kind != "weight":
            return 1.0
        layer = self.layer
        rest = index % self._per_channel
        if isinstance(layer, nn.Linear):
            return inputs[:, rest:rest + 1]
        _, _, height, width = layer.weight.shape
        source, offset = divmod(rest, height * width)
        if self._shifted_basis:
            # a shifted copy of the input channel: exact, and far cheaper than a 1x1-channel convolution
            row, column = divmod(offset, width)
            (pad_h, pad_w), (in_h, in_w) = layer.padding, inputs.shape[2:]
            padded = F.pad(inputs[:, source:source + 1], (pad_w, pad_w, pad_h, pad_h))
            out_h, out_w = in_h + 2 * pad_h - height + 1, in_w + 2 * pad_w - width + 1
            return padded[:, :, row:row + out_h, column:column + out_w]
        unit = torch.zeros(1, 1, height, width, dtype=inputs.dtype, device=inputs.device)
        unit.view(-1)[offset] = 1.0
        return F.conv2d(inputs[:, source:source + 1], unit, None, layer.stride, layer.padding, layer.dilation)

    def _bn_override(self, channel: int, values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight, bias) of the searched BN for channel ``channel``, one entry per candidate in ``values``."""
        layer, count = self.layer, values.numel()
        if self.target.kind == "bn_gamma":
            bias = None if layer.bias is None else layer.bias[channel].expand(count).contiguous()
            return values, bias
        weight = None if layer.weight is None else layer.weight[channel].expand(count).contiguous()
        return weight, values

    def _block(self, pre: torch.Tensor, channel: int, override) -> tuple[torch.Tensor, int, int]:
        """Run the per-channel block on ``pre`` (B, K, ...): one column per candidate.

        Returns the block output (B, K, H, W) or (B, K, S) and, for a flat output, the slice ``offset, size``
        of the next layer's input features it occupies.
        """
        x, spatial, offset, size = pre, self.plan.spatial, channel, 1
        count = x.shape[1]
        if not spatial and x.dim() == 2:
            x = x.unsqueeze(2)
        for layer in self.plan.block:
            if isinstance(layer, BATCHNORMS):
                if layer is self.layer:
                    weight, bias = override
                elif spatial:
                    weight = None if layer.weight is None else layer.weight[channel].expand(count).contiguous()
                    bias = None if layer.bias is None else layer.bias[channel].expand(count).contiguous()
                else:
                    weight = None if layer.weight is None else layer.weight[offset:offset + size].repeat(count)
                    bias = None if layer.bias is None else layer.bias[offset:offset + size].repeat(count)
                shape = x.shape
                if layer is self.layer and count > 1 and x.stride(1) == 0:
                    # the candidates share the channel's values (an expand): its statistics once, not per column
                    x = self.world.batch_norm_columns(x, weight, bias, layer.eps)
                    continue
                flat = x if spatial else x.reshape(shape[0], -1)
                x = self.world.batch_norm(flat, weight, bias, layer.eps).view(shape)
            elif isinstance(layer, nn.ReLU):
                x = F.relu(x)
            elif isinstance(layer, nn.Flatten):
                size = x.shape[2] * x.shape[3]
                x = x.reshape(x.shape[0], count, size)
                offset, spatial = channel * size, False
            elif isinstance(layer, nn.Identity):
                pass
            else:  # pooling: acts on each of the K columns as on a channel
                x = layer(x)
        if spatial and self.plan.next_layer is None:
            raise ValueError("the block ends spatial with no layer after it")
        return x, offset, size

    def _through_next(self, next_output: torch.Tensor, old: torch.Tensor, new: torch.Tensor, channel: int,
                      offset: int, size: int, update: bool = False, key: str = "next") -> torch.Tensor:
        """The next linear layer's output (K, B, ...) when its input channel changes from ``old`` to ``new``.

        ``update``: the result replaces ``next_output`` (a chunk's cache); the numba path then writes it in
        place, otherwise into a buffer reused by the next candidate. Both keep the big allocations of a sweep
        fixed (fresh ones fragment the heap that ``keep_freed_memory`` keeps).
        """
        layer = self.plan.next_layer
        count = new.shape[1]
        if layer is None:   # the block output is the logits: replace its columns
            out = next_output.unsqueeze(0).repeat(count, *([1] * next_output.dim()))
            out[:, :, offset:offset + size] = new.transpose(0, 1)
            return out
        if isinstance(layer, nn.Conv2d) and self._numba_path and count == 1 and isinstance(layer.padding, tuple):
            from rso.engines import fused
            from rso.engines.kernels import add_one_channel_conv
            out = next_output if update else self._buffer(key, next_output.shape)
            if fused.fits(layer):
                fused.next_conv(next_output, new, old, layer, channel, out)
                return out.unsqueeze(0)
            return add_one_channel_conv(next_output, new, old, layer, channel, out).unsqueeze(0)
        delta = new - old
        if isinstance(layer, nn.Conv2d):
            batch, _, height, width = delta.shape
            delta = delta.transpose(0, 1).reshape(count * batch, 1, height, width)
            change = F.conv2d(delta, layer.weight[:, channel:channel + 1], None, layer.stride, layer.padding,
                              layer.dilation)
            return change.view(count, batch, *change.shape[1:]).add_(next_output.unsqueeze(0))
        change = torch.matmul(delta.transpose(0, 1), layer.weight[:, offset:offset + size].t())
        return change.add_(next_output.unsqueeze(0))

    def _channel_output(self, state: _Chunk, channel: int, tensor: torch.Tensor):
        """(block output, preactivation) of ``channel`` with ``tensor`` as the searched tensor: (B, 1, ...)."""
        pre = self._preactivation(state.inputs, channel, tensor)
        override = self._bn_override(channel, tensor[channel:channel + 1]) if isinstance(self.layer, BATCHNORMS) else None
        out, offset, size = self._block(pre, channel, override)
        return out, pre, offset, size

    @torch.no_grad()
    def _sync(self, state: _Chunk, chunk: int, channel: int) -> None:
        """Bring the chunk's caches up to the current weights and onto ``channel``.

        The next layer's output Q follows the searched channel lazily: while the chunk stays on a channel,
        accepted steps change only its preactivation and block output, and candidates are scored against Q
        plus the change from ``in_next`` (what Q includes) to the candidate; Q catches up, in one one-channel
        pass, when the chunk moves to another channel (``_flush``). Exact: the next layer is linear.
        """
        current = self.target.parameter.detach()
        pending = self.log[state.synced:]
        for changed in dict.fromkeys(change.channel for change in pending):
            if changed == state.channel and state.block_output is not None:
                if isinstance(self.layer, BATCHNORMS):
                    state.block_output = self._channel_output(state, changed, current)[0]
                else:
                    # add the accepted steps to the cached preactivation, as score() does for a candidate
                    # (a fresh one-channel convolution costs far more at 28x28); in place unless the block
                    # output (or what Q holds) is the preactivation itself (a block with nothing in it)
                    steps = [(change.index, change.step) for change in pending if change.channel == changed]
                    own = not any(_same_memory(state.preactivation, other)
                                  for other in (state.block_output, state.in_next) if other is not None)
                    state.preactivation = self._plus_steps(state.preactivation, state.inputs, steps, in_place=own)
                    if self._channel_block is not None:
                        # derived with the visit's candidates (see score): one BN reduction fewer a visit
                        state.block_stale = True
                    else:
                        state.block_output = self._cache_block(state.preactivation, changed)[0]
            elif self.first_change[changed] >= state.synced:
                # Q holds this channel as the sweep found it
                self._flush(state)
                if self._numba_path and self._shifted_basis:
                    # the current channel from the old one's preactivation plus the steps accepted on it this
                    # sweep, in one pass (what score() and the caches do with steps; a second one-channel conv
                    # costs about twice that at paper6's conv1)
                    old, pre, offset, size = self._channel_output(state, changed, self.start)
                    steps = [(change.index, change.step) for change in self.log if change.channel == changed]
                    pre = self._plus_steps(pre, state.inputs, steps, in_place=not _same_memory(pre, old))
                    new = self._block(pre, changed, None)[0]
                else:
                    old = self._channel_output(state, changed, self.start)[0]
                    new, pre, offset, size = self._channel_output(state, changed, current)
                state.channel, state.in_next, state.block_output, state.preactivation = changed, old, new, pre
                state.span = (offset, size)
            else:   # the channel changed before and after the last sync (not row-major order): start over
                del self.chunks[chunk]
                fresh = self._chunk(chunk)
                state.__dict__.update(fresh.__dict__)
                self.chunks[chunk] = state
                break
        if state.channel != channel or state.block_output is None:
            self._flush(state)
            new, pre, offset, size = self._channel_output(state, channel, current)
            state.channel, state.in_next, state.block_output, state.preactivation = channel, new, new, pre
            state.span = (offset, size)
        state.synced = len(self.log)

    @torch.no_grad()
    def _flush(self, state: _Chunk) -> None:
        """Bring the next layer's output up to the cached channel's current block output."""
        if state.block_stale:
            state.block_output = self._cache_block(state.preactivation, state.channel)[0]
            state.block_stale = False
        if state.block_output is not None and state.in_next is not state.block_output:
            offset, size = state.span
            state.next_output = self._through_next(state.next_output, state.in_next, state.block_output,
                                                   state.channel, offset, size, True)[0]
        state.in_next = state.block_output

    @torch.no_grad()
    def _candidate_loss(self, state: _Chunk, out: torch.Tensor, k: int, channel: int, offset: int,
                        size: int) -> float:
        """Loss of candidate ``k`` of ``out`` (the block outputs): through the next layer, then the suffix.

        One candidate at a time, so only one copy of the next layer's output is alive (memory).
        """
        next_output, moments = self._next_output(state, out, k, channel, offset, size)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.suffix_precision == "bfloat16"
                    else torch.autocast(self.device.type, enabled=False))
        with autocast:
            logits = self._run_suffix(next_output, moments, owned=True)   # a scratch buffer of ours
        return summed_cross_entropy(logits, state.labels).item()

    def _next_output(self, state: _Chunk, out: torch.Tensor, k: int, channel: int, offset: int, size: int,
                     key: str = "next") -> tuple[torch.Tensor, tuple | None]:
        """Candidate ``k``'s next-layer output (in the buffer ``key``) and, when the next conv's pass also sums
        them, this process's moments of the BN after it."""
        if self._fused_pool is not None:
            from rso.engines import fused
            next_output = self._buffer(key, state.next_output.shape)
            return next_output, fused.next_conv(state.next_output, out[:, k:k + 1], state.in_next,
                                                self.plan.next_layer, channel, next_output, self._fused_pool)
        return self._through_next(state.next_output, state.in_next, out[:, k:k + 1], channel, offset, size,
                                  key=key)[0], None

    def _candidate_losses(self, state: _Chunk, out: torch.Tensor, ks: list[int], channel: int, offset: int,
                          size: int) -> list[float]:
        """:meth:`_candidate_loss` of the candidates ``ks`` run side by side through the suffix, so that each BN
        of the suffix reduces the candidates' statistics over the workers in one collective, not one each.
        Same arithmetic per candidate; holds one copy of each suffix tensor per candidate (used with several
        workers only, where a collective's wait costs more than the memory)."""
        xs, moments = zip(*(self._next_output(state, out, k, channel, offset, size, key=f"next{k}") for k in ks))
        logits = self._run_suffixes(list(xs), list(moments), ks, owned=True)   # scratch buffers of ours
        return [summed_cross_entropy(x, state.labels).item() for x in logits]

    def _run_suffixes(self, xs: list[torch.Tensor], moments: list, ks: list[int], owned: bool = False) -> list[torch.Tensor]:
        """:meth:`_run_suffix` for several candidates layer by layer: one ``combine_moments`` per BN group."""
        from rso.engines.kernels import channel_ops_many
        xs = list(xs)
        for position, layer in enumerate(self._suffix):
            if isinstance(layer, ChannelOps):
                given = moments if layer.batchnorm is not None else None
                moments = [None] * len(xs) if layer.batchnorm is not None else moments
                buffers = [self._group_output(layer, x, owned, f"suffix{position}.{k}") for x, k in zip(xs, ks)]
                xs = channel_ops_many(xs, layer, buffers, self.world.combine_moments, given)
                owned = True
                continue
            xs = [self._suffix_layer(layer, x) for x in xs]
            owned = owned or not isinstance(layer, (nn.Flatten, nn.Identity))
        return xs

    def _group_output(self, group: ChannelOps, x: torch.Tensor, owned: bool, key: str):
        """Where a channel group of the suffix writes: over its input when that is ours (a scratch buffer or a
        conv's fresh output) and keeps its shape (no pooling): the pass then reads and writes the same memory,
        with no second tensor's lines to fetch. Else a buffer of the sweep (``key``)."""
        if owned and group.pool == "none" and x.is_contiguous(memory_format=torch.channels_last):
            return lambda shape: x
        return lambda shape: self._buffer(key, shape)

    def _suffix_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One layer of the suffix that is not a fused channel group, on a tensor the caller may not own:
        convolutions channels-last (about twice the rate of NCHW for 16-channel 3x3 convs on CPU; the same
        values up to rounding), BN on this batch's statistics over every worker's share."""
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(channels_last(x), layer.weight, layer.bias, layer.stride, layer.padding,
                            layer.dilation, layer.groups)
        if isinstance(layer, BATCHNORMS):
            return self.world.batch_norm(x, layer.weight, layer.bias, layer.eps)
        if isinstance(layer, nn.ReLU):
            return F.relu(x)    # never in place, whatever the module says: x may be a cache
        return layer(x)

    def _run_suffix(self, x: torch.Tensor, moments=None, owned: bool = False) -> torch.Tensor:
        """The layers after the next linear layer (:meth:`_suffix_layer`); ``x`` is left unchanged unless
        ``owned`` (a scratch tensor the caller gives up). ``moments``: those of the first BN's input, when the
        next conv's pass computed them."""
        for position, layer in enumerate(self._suffix):
            if isinstance(layer, ChannelOps):
                from rso.engines.kernels import channel_ops
                given, moments = (moments, None) if layer.batchnorm is not None else (None, moments)
                x = channel_ops(x, layer, self._group_output(layer, x, owned, f"suffix{position}"),
                                self.world.combine_moments, given)
                owned = True
                continue
            if isinstance(layer, nn.ReLU) and owned:
                x = F.relu_(x)
                continue
            x = self._suffix_layer(layer, x)
            # ReLU, conv, BN and pooling make a new tensor; Flatten/Identity a view of the same ownership
            owned = owned or not isinstance(layer, (nn.Flatten, nn.Identity))
        return x

    # ------------------------------------------------------------------------------------------ interface
    @torch.no_grad()
    def score(self, index: int, values: torch.Tensor, chunk: int) -> torch.Tensor:
        state = self._chunk(chunk)
        channel = self._locate(index)
        self._sync(state, chunk, channel)
        candidates = values.to(self.device, self.dtype)
        count = candidates.numel()
        steps = None
        if isinstance(self.layer, BATCHNORMS):
            pre = state.preactivation.expand(-1, count, *state.preactivation.shape[2:])
            out, offset, size = self._block(pre, channel, self._bn_override(channel, candidates))
        elif self._channel_block is not None:
            # numba: the candidates' preactivations (never formed), BN moments, then BN/ReLU/pooling, in two passes
            from rso.engines import fused
            steps = candidates - self.target.parameter.detach().view(-1)[index]
            source, tap = self._basis_source(state.inputs, index)
            source = None if source is None else source.contiguous()   # read by both passes: copied once
            block = self._channel_block
            # a stale cached block output (steps accepted in other chunks since) is a candidate of step 0:
            # candidate 0 when it is the current weight, else one more; its BN moments share the reduction
            stale = state.block_stale
            own = 0 if stale and steps[0].item() == 0 else count
            scored_steps = torch.cat([steps, steps.new_zeros(1)]) if stale and own == count else steps
            # each candidate's BN input once (the moments summed as it is written), then the block from it
            self._block_values, moments = fused.block_values(state.preactivation, source, scored_steps, tap, block,
                                                             self._block_values)
            out = fused.block_output(self._block_values, block, channel, moments, self._block_buffer,
                                     self.world.combine_moments if self.world.size > 1 else None)
            self._block_buffer = out.transpose(0, 1)
            if stale:
                state.block_output, state.block_stale = out[:, own:own + 1].clone(), False
                out = out[:, :count]
            pre, offset, size = None, channel, 1
        else:
            current = self.target.parameter.detach().view(-1)[index]
            shape = (1, count) + (1,) * (state.preactivation.dim() - 2)
            pre = state.preactivation + (candidates - current).view(shape) * self._basis(state.inputs, index)
            out, offset, size = self._block(pre, channel, None)
        # candidate 0 is often the current weight (no weight decay); when no change was accepted since this
        # chunk's loss was last computed, that loss is candidate 0's, and its suffix pass is skipped
        unchanged = values[0].item() == self.target.parameter.detach().view(-1)[index].item()
        known = state.current_loss if unchanged and state.loss_version == len(self.log) else None
        losses = torch.zeros(count, dtype=torch.float64)
        scored = [k for k in range(count) if k > 0 or known is None]
        if self._lockstep and len(scored) > 1:
            for k, loss in zip(scored, self._candidate_losses(state, out, scored, channel, offset, size)):
                losses[k] = loss
        else:
            for k in scored:
                losses[k] = self._candidate_loss(state, out, k, channel, offset, size)
        losses = self.world.sum(losses)     # this rank's share of the chunk -> the chunk's losses
        if known is not None:
            losses[0] = known
        if unchanged:
            state.current_loss, state.loss_version = losses[0].item(), len(self.log)
        self._last = (chunk, index, values.tolist(), out, pre, losses, offset, size, steps)
        return losses

    def commit(self, index: int, value: float, chunk: int) -> None:
        channel = self._locate(index)
        self.first_change.setdefault(channel, len(self.log))
        new = torch.tensor(value, dtype=self.dtype, device=self.device)
        step = new - self.values[index]     # as score() computes a candidate's step
        self.values[index] = new
        self.log.append(_Change(channel, index, step))
        last, self._last = self._last, None
        if last is not None and last[0] == chunk and last[1] == index and value in last[2]:
            k = last[2].index(value)
            state = self.chunks[chunk]
            if state.synced == len(self.log) - 1:   # the caches were current when scored: take the candidate's
                # (the next layer's output follows when the chunk leaves the channel, see _sync)
                state.current_loss, state.loss_version = last[5][k].item(), len(self.log)
                if last[4] is None and self._visited_chunks > 1:
                    # the fused block did not form the preactivation: the chunk stays one step behind, and its
                    # next _sync adds this step with the other chunks' since, in the one pass it makes anyway
                    # (the same sums, one pass over the channel fewer; its block output is derived then too).
                    # A sweep on one chunk keeps the eager update: its next visit would sync at once.
                    return
                state.block_output = last[3][:, k:k + 1].clone()
                if last[4] is not None:
                    state.preactivation = last[4][:, k:k + 1].clone()
                else:   # the fused block did not form it: the same arithmetic as the candidate's
                    state.preactivation = self._plus_steps(state.preactivation, state.inputs, [(index, last[8][k])])
                state.synced = len(self.log)

    def run_sweep(self, chunks: torch.Tensor, steps: torch.Tensor, weight_decay: float, stats, progress,
                  start_visit: int = 0, checkpoint=None) -> None:
        """The whole sweep (from ``start_visit``): the fused numba loop for the output layer on CPU, the
        per-visit loop otherwise. Caches are built from the weights as they are, so a sweep resumed at a visit
        starts from fresh caches."""
        from rso.search.loop import visit_each_weight
        visited = sorted(set(chunks.tolist()))
        self._visited_chunks = len(visited)
        self.prebuild(visited)
        resumable = {"start_visit": start_visit, "checkpoint": checkpoint}
        if self.plan.head_only and self.use_numba() and self.world.size == 1:
            # (the fused loop decides inside numba; with several workers each visit's losses are reduced first)
            from rso.engines.kernels import dense_head_sweep
            dense_head_sweep(self, chunks, steps, weight_decay, stats, progress, **resumable)
        else:
            visit_each_weight(self, self.target, chunks, steps, weight_decay, stats, progress, **resumable)
