"""The oracle comparison the engine tests share: score sampled visits with an engine and the reference,
accept the reference's choice, and report the worst relative loss difference."""

from __future__ import annotations

import torch

from rso.engines import ChunkPartition, ReferenceEngine, fixed_statistics
from rso.search.candidates import candidate_values, gaussian_steps, select_candidate
from rso.search.visit import visit_order


def compare_visits(model, target, images, labels, batch_size, fast, *, visits=24, seed=0, rtol=1e-9,
                   order="increasing", fixed_images=None, weight_decay=1e-3, generator=None):
    """Score sampled elements of ``target`` with ``fast`` and the reference (BN layers below ``target`` fixed
    from ``fixed_images`` when given), accept the reference's choice, compare the losses. ``generator``
    (default: seeded with ``seed``) draws the chunk partition, the elements and the steps.
    Returns (worst relative difference, accepted count)."""
    generator = generator or torch.Generator().manual_seed(seed)
    partition = ChunkPartition(torch.randperm(len(labels), generator=generator), batch_size)
    fixed = None if fixed_images is None else fixed_statistics(model, fixed_images, target.module)
    reference = ReferenceEngine()
    reference.begin_sweep(model, target, images, labels, partition, fixed)
    fast.begin_sweep(model, target, images, labels, partition, fixed)
    count = min(visits, target.numel)
    indices = torch.randperm(target.numel, generator=generator)[:count]
    indices = indices.sort().values if order == "increasing" else indices
    steps = gaussian_steps(target.sigma, count, generator) * 3
    flat = target.parameter.data.view(-1)
    worst = 0.0
    accepted = 0
    for visit, (index, step) in enumerate(zip(indices.tolist(), steps.tolist())):
        chunk = visit % partition.n_chunks
        current = flat[index].item()
        values = candidate_values(current, step, weight_decay).to(flat.dtype).to(torch.float64)
        expected = reference.score(index, values, chunk)
        got = fast.score(index, values, chunk)
        worst = max(worst, float(((got - expected).abs() / expected.abs()).max()))
        chosen = values[select_candidate(expected)].item()
        if chosen != current:
            flat[index] = chosen
            accepted += 1
            reference.commit(index, chosen, chunk)
            fast.commit(index, chosen, chunk)
    fast.end_sweep()
    assert worst <= rtol, f"{target.name}: worst relative difference {worst:.3g}"
    return worst, accepted


def compare_every_tensor(model, images, labels, batch_size, make_engine, *, fixed_images=None, visits=12, seed=0,
                         rtol=1e-9, weight_decay=1e-4) -> float:
    """:func:`compare_visits` over every tensor in visiting order (one generator throughout, a fresh engine
    from ``make_engine()`` per tensor); at least one candidate accepted. Returns the worst difference."""
    generator = torch.Generator().manual_seed(seed)
    worst, accepted = 0.0, 0
    for target in visit_order(model):
        difference, count = compare_visits(model, target, images, labels, batch_size, make_engine(), visits=visits,
                                           rtol=rtol, fixed_images=fixed_images, weight_decay=weight_decay,
                                           generator=generator)
        worst, accepted = max(worst, difference), accepted + count
    assert accepted > 0
    return worst
