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
    """Returns -1, or the visit at which every candidate loss was non-finite (losses filled up to it).

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
        for c in range(candidates):
            value = losses[t, c]
            if value == value and value < best:
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
                     report_every: int = 16) -> None:
    """The output layer's sweep for :class:`rso.engines.fast.FastEngine`, identical to the per-visit loop."""
    from rso.search.loop import NonFiniteLossError, VisitRecorder

    target = engine.target
    flat = target.parameter.data.view(-1)
    dtype = target.parameter.dtype
    numel = target.numel
    # candidate_values(current, step, weight_decay).to(dtype).to(float64), for every visit at once: each
    # element is visited once per sweep, so ``current`` is its value at the start of the sweep
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
    failed = _dense_head_loop(features, logits, labels, chunk_of_visit, row_of_visit, column_of_visit,
                              values.numpy(), current.numpy(), choices, losses)
    done = numel if failed < 0 else failed
    # the writes and the statistics, in the loop's order and arithmetic
    taken = torch.from_numpy(choices[:done])
    chosen = values[torch.arange(done), taken]
    changed = chosen != current[:done]
    flat[:done][changed] = chosen[changed].to(dtype).to(flat.device)
    recorder = VisitRecorder(stats, progress, engine.partition.batch_size, numel, report_every)
    for t in range(done):
        choice = int(choices[t])
        recorder.record(t, choice, float(losses[t, choice]))
    if failed >= 0:
        raise NonFiniteLossError(
            f"every candidate loss is non-finite at {target.name}[{failed}] (losses {losses[failed].tolist()}); "
            "the weights or the learning setup diverged")
