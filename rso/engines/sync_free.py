"""The sync-free engine: the fast engine's incremental scoring written as device tensor ops only, so a whole
layer sweep runs without the host reading a device value, and on CUDA each visit is one replayed CUDA graph.

For a sweep over a tensor of layer ``d`` (a Conv2d/Linear weight or bias, or a BatchNorm gamma/beta), with
the ``n`` chunks the sweep uses stacked on the device (``rso.engines.plan`` says where ``d`` sits)::

    X[i, k]  = input channel i of layer d on chunk k                 cached: nothing below d changes
    P[c, k]  = output channel c of layer d on chunk k                current weights
    A[c, k]  = block(P[c, k])                                         BN with chunk k's statistics, ReLU, pooling

A visit ``j`` (element ``e`` of output channel ``c``, chunk ``k``, step ``dw``) is, with every index read from
device tables by a device counter::

    v      = [w0, w0 + dw, w0 - dw],  w0 = w_e (1 - weight_decay)     float64, rounded to the tensor's dtype
    P_v    = P[c, k] + (v - w_e) basis_e(X[:, k])                     three columns (BN: gamma/beta := v)
    Q_k    = next(A[:, k])                                            the next linear layer's output
    Q_v    = Q_k + next_c(A_v - A[c, k]),  A_v = block(P_v)           one input channel changes
    F(v)   = CE(suffix(Q_v))                                          three candidates in one grouped pass
    choice = argmin over the finite F(v)                              first wins ties: w0 wins every tie
    w_e   <- v[choice];  P[c, :] += (w_e' - w_e) basis_e(X);  A[c, :] = block(P[c, :])   every chunk at once

which equals the reference's full forward passes up to rounding. Nothing is branched on: a rejected visit
adds a zero step (exact), and a visit whose three losses are all non-finite keeps the weight and clears a
device flag that freezes every later visit, so the state when the host next reads is the state in which the
per-visit loop stops with its error (:class:`rso.search.loop.NonFiniteLossError`). The sweep's counts
(accepted visits, loss sum, last loss, first failure) accumulate in one small device tensor that the host
reads every ``report_every`` visits for progress: those reads are the only host-device synchronizations of
a sweep (``HostReads`` counts them in the tests; ``make gpu-check`` counts them with CUDA's sync debug mode).

The three candidates run the layers after the next one as one batch in a stacked layout: channels
``[k C, (k + 1) C)`` hold candidate ``k`` (convolutions with ``groups=3``, BN on 3C channels), so every
candidate keeps its own batch statistics.

On CUDA (``graphs="auto"``) a sweep runs two eager visits on a side stream, captures one visit as a CUDA graph
(all inputs are buffers allocated before the capture; the visit counter lives on the device) and replays it
for the remaining visits: no allocation and one launch per visit. While searching, TF32 is off for
convolutions and matmuls and cuDNN is asked for deterministic algorithms (the previous settings come back at
the end of the sweep).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from rso.engines.base import ChunkPartition, ScoringEngine, batch_statistics
from rso.engines.plan import plan_sweep, unsupported_reason
from rso.search.visit import BATCHNORMS, SearchTarget

N_CANDIDATES = 3
GRAPHS = ("auto", "on", "off")
WARMUP_VISITS = 2

# Tensor methods and functions that make the host wait for the device (a value read, or a result whose shape
# depends on values).
SYNCING = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "cpu",
                     "numpy", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal",
                     "allclose", "is_nonzero"})


class HostReads(TorchFunctionMode):
    """Records every torch call that synchronizes the host with the device (``SYNCING``, boolean-mask indexing
    and copies to the CPU of device tensors), on any device, so a CPU test sees what a GPU run would wait on."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in SYNCING:
            self.calls.append(name)
        elif name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in
                                           (args[1] if isinstance(args[1], tuple) else (args[1],))):
            self.calls.append("__getitem__[bool]")
        elif name == "to" and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu" and any(
                (isinstance(a, torch.device) and a.type == "cpu") or (isinstance(a, str) and a == "cpu") for a in (*args[1:], *kwargs.values())):
            self.calls.append("to(cpu)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def exact_search_settings() -> None:
    """TF32 off for convolutions and matmuls (it flips decisions as bf16 does), deterministic cuDNN algorithms,
    no autotuning; the previous settings are restored on exit."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark)
    cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = False, False, True, False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


def _pads(layer: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """The zero padding before row 0 and column 0 of the searched conv's input."""
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return 0, 0
        return tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size))   # 'same'
    return tuple(layer.padding)


class SyncFreeEngine(ScoringEngine):
    """Exact incremental scoring with every visit on the device; see the module docstring.

    ``graphs``: ``auto`` (CUDA graphs on CUDA), ``on`` (CUDA graphs, an error elsewhere) or ``off``; by default
    ``$RSO_CUDA_GRAPHS``, else ``auto``.
    ``report_every``: visits between two progress reads (the only host-device syncs of a sweep).
    """

    name = "sync-free"

    def __init__(self, graphs: str | None = None, report_every: int = 256, world=None):
        if world is not None and world.size > 1:
            raise ValueError("the sync-free engine scores in one process; several workers (--workers, torchrun) "
                             "need the fast or prefix-cache engine")
        graphs = graphs or os.environ.get("RSO_CUDA_GRAPHS") or "auto"
        if graphs not in GRAPHS:
            raise ValueError(f"unknown graphs setting {graphs!r}; choose one of {', '.join(GRAPHS)}")
        if report_every < 1:
            raise ValueError(f"report_every must be positive, got {report_every}")
        self.graphs, self.report_every = graphs, report_every
        self.watch: contextlib.AbstractContextManager | None = None   # wraps the visits of run_sweep (HostReads)
        self.graph_error: str | None = None          # why the last sweep ran without a graph, if it failed to capture
        self.graphs_replayed = 0
        self.stop_after: int | None = None           # benchmarks: end a sweep after this many visits

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return unsupported_reason(model) is None

    # ----------------------------------------------------------------------------------------- sweep state
    def begin_sweep(self, model: nn.Module, target: SearchTarget, images: torch.Tensor, labels: torch.Tensor,
                    partition: ChunkPartition, fixed: dict | None = None) -> None:
        """``fixed``: BN layers below the target that normalize with given statistics (see ``batch_statistics``)."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the sync-free engine cannot score this model: {reason}; use --engine reference or auto")
        super().begin_sweep(model, target, images, labels, partition)
        self.fixed = fixed or {}
        self.plan = plan_sweep(model, target)
        self.layer = self.plan.layers[self.plan.searched]
        self.device, self.dtype = images.device, target.parameter.dtype
        self.flat = target.parameter.detach().view(-1)
        self.values = self.flat.clone()          # the tensor as the engine last saw it (score/commit interface)
        self.slots: dict[int, int] | None = None
        self._settings = exact_search_settings()
        self._settings.__enter__()
        if isinstance(self.layer, nn.Conv2d) and target.kind == "weight":
            _, fan_in, height, width = self.layer.weight.shape
            self.per_channel = fan_in * height * width
        elif isinstance(self.layer, nn.Linear) and target.kind == "weight":
            self.per_channel = self.layer.in_features
        else:
            self.per_channel = 1

    def end_sweep(self) -> None:
        for name in ("X", "P", "A", "labels_", "table", "shifts", "steps", "stats", "counter", "suffix_params",
                     "feature_range", "slots"):
            self.__dict__.pop(name, None)
        settings = self.__dict__.pop("_settings", None)
        if settings is not None:
            settings.__exit__(None, None, None)

    # ---------------------------------------------------------------------------------------- the caches
    @torch.no_grad()
    def _prepare(self, used: list[int]) -> None:
        """Stack the caches of chunks ``used`` (slot ``s`` holds chunk ``used[s]``) and the sweep's constants."""
        plan, layer, kind = self.plan, self.layer, self.target.kind
        self.slots = {chunk: slot for slot, chunk in enumerate(used)}
        self.n = n = len(used)
        self.batch = batch = self.partition.batch_size
        inputs, outputs = [], []
        # the layers below the searched one: each chunk's statistics, or the fixed ones where given
        with batch_statistics(self.model, self.fixed) if self.fixed else batch_statistics(self.model):
            for chunk in used:
                x = self.images[self.partition.indices(chunk)]
                for module in plan.layers[:plan.searched]:
                    x = module(x)
                inputs.append(x)
                outputs.append(x if isinstance(layer, BATCHNORMS) else layer(x))
        self.labels_ = torch.stack([self.labels[self.partition.indices(chunk)] for chunk in used])   # (n, B)
        out = torch.stack(outputs)                           # (n, B, C, *sp)
        self.channels = out.shape[2]
        self.P = out.movedim(2, 0).contiguous()              # (C, n, B, *sp)
        self.spatial_shape = tuple(out.shape[3:])
        del outputs
        if kind == "weight" and isinstance(layer, nn.Conv2d):
            x = torch.stack(inputs)                          # (n, B, Cin, H, W)
            height, width = x.shape[3:]
            out_h, out_w = self.spatial_shape
            (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
            pad_h, pad_w = _pads(layer, height, width)
            padded_h = max(height + pad_h, (out_h - 1) * sh + (kh - 1) * dh + 1)
            padded_w = max(width + pad_w, (out_w - 1) * sw + (kw - 1) * dw + 1)
            x = F.pad(x, (pad_w, padded_w - width - pad_w, pad_h, padded_h - height - pad_h))
            self.X = x.movedim(2, 0).reshape(x.shape[2], n * batch, padded_h * padded_w).contiguous()
            rows = torch.arange(out_h, device=self.device) * sh
            columns = torch.arange(out_w, device=self.device) * sw
            # shifts[r kw + s] = where output pixel (oh, ow) reads its input for kernel offset (r, s)
            self.shifts = torch.stack([((rows + r * dh)[:, None] * padded_w + (columns + s * dw)[None, :]).reshape(-1)
                                       for r in range(kh) for s in range(kw)])
        elif kind == "weight":                                # Linear: (F_in, n B)
            self.X = torch.stack(inputs).movedim(2, 0).reshape(-1, n * batch).contiguous()
        del inputs
        # the block output A for every channel, through the same per-column code as the updates
        first = self._block(self.P[0].movedim(0, 1), torch.zeros(1, dtype=torch.long, device=self.device))
        self.block_shape = tuple(first.shape[2:])
        self.A = torch.empty((self.channels, n, batch, *self.block_shape), dtype=self.dtype, device=self.device)
        for channel in range(self.channels):
            index = torch.full((1,), channel, dtype=torch.long, device=self.device)
            self.A[channel] = self._block(self.P[channel].movedim(0, 1), index).movedim(1, 0)
        # features per channel in the next layer's flat input (1 before a Flatten; h w after one)
        self.per_feature = math.prod(self.block_shape) if len(self.block_shape) != 2 else 1
        self.feature_range = torch.arange(self.per_feature, device=self.device)
        self.suffix_params = self._stack_suffix_params()

    def _stack_suffix_params(self) -> list:
        """The suffix's parameters repeated for the three stacked candidates (frozen during the sweep)."""
        params = []
        for module in self.plan.suffix:
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(module, (nn.Conv2d, *BATCHNORMS)):
                repeat = (N_CANDIDATES,) + (1,) * (weight.dim() - 1) if weight is not None else None
                params.append((None if weight is None else weight.detach().repeat(*repeat),
                               None if bias is None else bias.detach().repeat(N_CANDIDATES)))
            else:
                params.append((weight, bias))
        return params

    def _visit_table(self, chunks: torch.Tensor) -> torch.Tensor:
        """Per visit (row): element, channel, input channel/feature, kernel offset, chunk slot, row c n + slot."""
        numel = self.target.numel
        element = torch.arange(numel)
        channel, rest = element // self.per_channel, element % self.per_channel
        if isinstance(self.layer, nn.Conv2d) and self.target.kind == "weight":
            kh, kw = self.layer.kernel_size
            source, offset = rest // (kh * kw), rest % (kh * kw)
        else:
            source, offset = rest, torch.zeros_like(rest)
        slot = torch.tensor([self.slots[chunk] for chunk in chunks.tolist()], dtype=torch.long)
        table = torch.stack([element, channel, source, offset, slot, channel * self.n + slot], dim=1)
        return table.to(self.device)

    # ------------------------------------------------------------------------------------- the layer math
    def _block(self, x: torch.Tensor, channel: torch.Tensor, override=None) -> torch.Tensor:
        """The per-channel block on ``x`` (B, M, *sp): M columns, each channel ``channel`` of some chunk or
        candidate. ``override``: (gamma, beta), one per column, for the searched BatchNorm."""
        columns = x.shape[1]
        features = None                                  # set after a Flatten: this channel's input features
        for module in self.plan.block:
            if isinstance(module, BATCHNORMS):
                if module is self.layer:
                    weight, bias = override if override is not None else self._bn_columns(channel, columns)
                elif features is None:
                    weight = None if module.weight is None else \
                        module.weight.detach().index_select(0, channel).expand(columns).contiguous()
                    bias = None if module.bias is None else \
                        module.bias.detach().index_select(0, channel).expand(columns).contiguous()
                else:   # after a Flatten: this channel's features, for each column
                    weight = None if module.weight is None else \
                        module.weight.detach().index_select(0, features).repeat(columns)
                    bias = None if module.bias is None else module.bias.detach().index_select(0, features).repeat(columns)
                shape = x.shape
                flat = x if features is None else x.reshape(shape[0], -1)
                x = F.batch_norm(flat, None, None, weight, bias, True, 0.0, module.eps).view(shape)
            elif isinstance(module, nn.ReLU):
                x = F.relu(x)
            elif isinstance(module, nn.Flatten):
                x = x.reshape(x.shape[0], columns, -1)
                features = channel * x.shape[2] + torch.arange(x.shape[2], device=x.device)
            elif isinstance(module, nn.Identity):
                pass
            else:   # pooling acts on each column as on a channel
                x = module(x)
        return x

    def _bn_columns(self, channel: torch.Tensor, columns: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(gamma, beta) of the searched BatchNorm's channel ``channel``, current values, for ``columns`` columns."""
        layer = self.layer
        weight = None if layer.weight is None else layer.weight.detach().index_select(0, channel).expand(columns).contiguous()
        bias = None if layer.bias is None else layer.bias.detach().index_select(0, channel).expand(columns).contiguous()
        return weight, bias

    def _basis(self, source: torch.Tensor, offset: torch.Tensor) -> torch.Tensor | float:
        """d(P[c, :]) / d(element): (n, B, *sp) for every chunk, or 1 for a bias."""
        if self.target.kind != "weight":
            return 1.0
        rows = self.X.index_select(0, source)[0]                   # (n B, H_p W_p) or (n B,)
        if isinstance(self.layer, nn.Conv2d):
            rows = rows.index_select(1, self.shifts.index_select(0, offset)[0])
        return rows.view(self.n, self.batch, *self.spatial_shape)

    def _next_output(self, slot: torch.Tensor) -> torch.Tensor:
        """Q_k: the next linear layer's output on chunk ``slot`` for the current weights (the logits when no
        linear layer follows): (B, C', H', W') or (B, F)."""
        blocks = self.A.index_select(1, slot)[:, 0].movedim(0, 1)   # (B, C, *block)
        layer = self.plan.next_layer
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(blocks, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
        flat = blocks.reshape(self.batch, -1)
        return flat if layer is None else F.linear(flat, layer.weight, layer.bias)

    def _candidate_inputs(self, slot, channel, features, new_blocks, old_block) -> torch.Tensor:
        """The suffix's input for each candidate, stacked: (B, K C', H', W') or (B, K, F)."""
        layer, count = self.plan.next_layer, new_blocks.shape[1]
        current = self._next_output(slot)
        if layer is None:      # the block output is the logits: replace this channel's columns
            logits = current.unsqueeze(1).repeat(1, count, 1)
            return logits.index_copy_(2, features, new_blocks.reshape(self.batch, count, -1))
        delta = new_blocks - old_block
        if isinstance(layer, nn.Conv2d):
            weight = layer.weight.detach().index_select(1, channel).repeat(count, 1, 1, 1)
            change = F.conv2d(delta, weight, None, layer.stride, layer.padding, layer.dilation, groups=count)
            return change.add_(current.repeat(1, count, 1, 1))
        change = F.linear(delta.reshape(self.batch, count, -1), layer.weight.detach().index_select(1, features))
        return change.add_(current.unsqueeze(1))

    def _suffix(self, x: torch.Tensor) -> torch.Tensor:
        """The layers after the next one, on the K stacked candidates; returns logits (B, K, classes)."""
        count = N_CANDIDATES
        for module, (weight, bias) in zip(self.plan.suffix, self.suffix_params):
            if isinstance(module, nn.Conv2d):
                x = F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, groups=count)
            elif isinstance(module, nn.BatchNorm2d):
                x = F.batch_norm(x, None, None, weight, bias, True, 0.0, module.eps)
            elif isinstance(module, nn.BatchNorm1d):
                shape = x.shape
                x = F.batch_norm(x.reshape(shape[0], -1), None, None, weight, bias, True, 0.0, module.eps).view(shape)
            elif isinstance(module, nn.Linear):
                x = F.linear(x, weight, bias)
            elif isinstance(module, nn.ReLU):
                x = F.relu(x)
            elif isinstance(module, nn.Flatten):
                x = x.reshape(x.shape[0], count, -1)
            elif isinstance(module, nn.Identity):
                pass
            else:
                x = module(x)
        return x

    def _losses(self, element, channel, source, offset, slot, row, values, current, basis) -> torch.Tensor:
        """Summed float64 cross-entropy of the candidate ``values`` (K, the tensor's dtype) on chunk ``slot``."""
        features = channel * self.per_feature + self.feature_range
        count = values.shape[0]
        pre = self.P.view(self.channels * self.n, self.batch, *self.spatial_shape).index_select(0, row)
        pre = pre.movedim(0, 1)                                  # (B, 1, *sp)
        view = (1, count) + (1,) * len(self.spatial_shape)
        if isinstance(self.layer, BATCHNORMS):
            gamma, beta = self._bn_columns(channel, count)
            override = (values, beta) if self.target.kind == "bn_gamma" else (gamma, values)
            candidates = pre.expand(-1, count, *self.spatial_shape)
        else:
            override = None
            step_basis = basis if isinstance(basis, float) else basis.index_select(0, slot).movedim(0, 1)
            candidates = pre + (values - current).view(view) * step_basis
        new_blocks = self._block(candidates, channel, override)
        old_block = self.A.view(self.channels * self.n, self.batch, *self.block_shape).index_select(0, row).movedim(0, 1)
        stacked = self._candidate_inputs(slot, channel, features, new_blocks, old_block)
        logits = self._suffix(stacked)
        labels = self.labels_.index_select(0, slot)[0]
        losses = F.cross_entropy(logits.to(torch.float64).transpose(1, 2), labels.unsqueeze(1).expand(-1, count),
                                 reduction="none")
        return losses.sum(0)

    def _update(self, channel: torch.Tensor, step: torch.Tensor, basis) -> None:
        """Every chunk's caches of ``channel`` after its element moved by ``step`` (zero: unchanged, exactly)."""
        rows = self.P.view(self.channels, -1).index_select(0, channel).view(self.n, self.batch, *self.spatial_shape)
        if not isinstance(self.layer, BATCHNORMS):
            rows = rows + step.view((1,) * rows.dim()) * basis
            self.P.view(self.channels, -1).index_copy_(0, channel, rows.reshape(1, -1))
        blocks = self._block(rows.movedim(0, 1), channel)        # (B, n, *block)
        self.A.view(self.channels, -1).index_copy_(0, channel, blocks.movedim(1, 0).reshape(1, -1))

    # ---------------------------------------------------------------------------- the sync-free sweep
    def _visit(self) -> None:
        """One visit, entirely on the device: what is visited comes from ``table`` at ``counter``."""
        row = self.table.index_select(0, self.counter)[0]
        element, channel, source, offset, slot, cache_row = (row[i:i + 1] for i in range(6))
        current = self.flat.index_select(0, element)
        start = current.to(torch.float64) * self.keep
        step = self.steps.index_select(0, self.counter)
        values = torch.cat([start, start + step, start - step]).to(self.dtype)
        basis = self._basis(source, offset)
        losses = self._losses(element, channel, source, offset, slot, cache_row, values, current, basis)
        finite = torch.isfinite(losses) & torch.isfinite(values)   # select_candidate's rule
        masked = torch.where(finite, losses, self.infinity)
        choice = torch.argmin(masked).view(1)
        alive = self.stats[7:8] > 0
        any_finite = finite.any().view(1)
        ok = alive & any_finite
        new = torch.where(ok, values.index_select(0, choice), current)
        self.flat.index_copy_(0, element, new)
        self._update(channel, new - current, basis)
        chosen = masked.index_select(0, choice) / self.batch
        stats = self.stats
        stats[0:1].add_((ok & (choice != 0)).to(torch.float64))
        stats[1:2].add_(torch.where(ok, chosen, self.zero))
        stats[2:3].copy_(chosen)
        failing = alive & ~any_finite
        stats[3:4].copy_(torch.where(failing, element.to(torch.float64), stats[3:4]))
        stats[4:7].copy_(torch.where(failing, losses, stats[4:7]))
        stats[7:8].copy_(ok.to(torch.float64))
        self.counter.add_(1)

    def _capture(self) -> Callable[[], None]:
        """One visit captured as a CUDA graph (its buffers are the engine's), replayed per visit."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._visit()
        self._graph = graph
        return graph.replay

    @torch.no_grad()
    def run_sweep(self, chunks: torch.Tensor, steps: torch.Tensor, weight_decay: float, stats, progress) -> None:
        from rso.search.loop import NonFiniteLossError

        if self.slots is None:
            self._prepare(sorted(set(chunks.tolist())))
        numel = self.target.numel if self.stop_after is None else min(self.stop_after, self.target.numel)
        self.table = self._visit_table(chunks)
        self.steps = steps.to(self.device, torch.float64)
        self.keep = 1.0 - weight_decay
        self.counter = torch.zeros(1, dtype=torch.long, device=self.device)
        self.stats = torch.zeros(8, dtype=torch.float64, device=self.device)
        self.stats[3], self.stats[7] = -1.0, 1.0
        self.infinity = torch.full((1,), math.inf, dtype=torch.float64, device=self.device)
        self.zero = torch.zeros(1, dtype=torch.float64, device=self.device)
        use_graphs = self.device.type == "cuda" and self.graphs in ("auto", "on") and numel > WARMUP_VISITS + 1
        if self.graphs == "on" and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device (use graphs='auto' or 'off')")
        self.graph_error, self._graph = None, None
        side = torch.cuda.Stream() if use_graphs else None
        run, replaying = self._visit, False
        reported = accepted_reported = 0
        with self.watch if self.watch is not None else contextlib.nullcontext():
            for visit in range(numel):
                if use_graphs and visit < WARMUP_VISITS:
                    # warm-up visits on a side stream, as torch.cuda.graphs asks before a capture
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        run()
                    torch.cuda.current_stream().wait_stream(side)
                else:
                    if use_graphs and visit == WARMUP_VISITS:
                        try:
                            run, replaying = self._capture(), True
                        except Exception as error:      # noqa: BLE001 - captured or not, the visit is the same
                            if self.graphs == "on":
                                raise
                            self.graph_error = f"{type(error).__name__}: {error}"
                    run()
                    self.graphs_replayed += replaying
                if visit + 1 - reported >= self.report_every or visit == numel - 1:
                    values = self.stats.tolist()            # note: the progress read, a host-device sync
                    done = visit + 1
                    if values[3] >= 0:
                        index = int(values[3])
                        stats.visits, stats.accepted, stats.loss_sum = index, int(values[0]), values[1]
                        raise NonFiniteLossError(
                            f"every candidate loss is non-finite at {self.target.name}[{index}] "
                            f"(losses {values[4:7]}); the weights or the learning setup diverged")
                    stats.visits, stats.accepted, stats.loss_sum = done, int(values[0]), values[1]
                    if progress is not None:
                        progress(done - reported, values[2], stats.accepted - accepted_reported)
                    reported, accepted_reported = done, stats.accepted
        self._graph = None

    # ------------------------------------------------------------------ the per-visit interface (score/commit)
    def _indices(self, index: int, chunk: int) -> tuple[torch.Tensor, ...]:
        if self.slots is None:
            self._prepare(list(range(self.partition.n_chunks)))
        channel, rest = divmod(index, self.per_channel)
        if isinstance(self.layer, nn.Conv2d) and self.target.kind == "weight":
            source, offset = divmod(rest, self.layer.kernel_size[0] * self.layer.kernel_size[1])
        else:
            source, offset = rest, 0
        slot = self.slots[chunk]
        return tuple(torch.tensor([value], dtype=torch.long, device=self.device)
                     for value in (index, channel, source, offset, slot, channel * self.n + slot))

    @torch.no_grad()
    def score(self, index: int, values: torch.Tensor, chunk: int) -> torch.Tensor:
        element, channel, source, offset, slot, row = self._indices(index, chunk)
        basis = self._basis(source, offset)
        candidates = values.to(self.device, self.dtype)
        if candidates.numel() != N_CANDIDATES:
            raise ValueError(f"the sync-free engine scores {N_CANDIDATES} candidates at a time, got {candidates.numel()}")
        current = self.values.index_select(0, element)
        return self._losses(element, channel, source, offset, slot, row, candidates, current, basis).cpu()

    @torch.no_grad()
    def commit(self, index: int, value: float, chunk: int) -> None:
        _, channel, source, offset, _, _ = self._indices(index, chunk)
        new = torch.tensor([value], dtype=self.dtype, device=self.device)
        step = new - self.values[index:index + 1]
        self.values[index:index + 1] = new
        self._update(channel, step, self._basis(source, offset))
