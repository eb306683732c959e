"""Where a candidate is scored: interchangeable engines behind :class:`ScoringEngine`, chosen by name."""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from rso.engines.base import (SEARCH_BN_MODES, ChunkPartition, FixedStatistics, ScoringEngine, batch_statistics,
                              fixed_statistics, summed_cross_entropy)
from rso.engines.fast import FastEngine
from rso.engines.prefix import PrefixCacheEngine
from rso.engines.reference import ReferenceEngine
from rso.engines.sync_free import SyncFreeEngine

# name -> (factory, one-line description)
ENGINES: dict[str, tuple[Callable[..., ScoringEngine], str]] = {
    "reference": (ReferenceEngine, "one full forward pass per candidate; any model; the test oracle"),
    "fast": (FastEngine, "cached lower layers, one-channel incremental deltas, numba CPU kernels; exact"),
    "prefix-cache": (PrefixCacheEngine, "cached input of the searched layer, every candidate forwarded from it "
                                        "(the authors' scheme; the bench's anchor); exact"),
    "sync-free": (SyncFreeEngine, "the fast engine's scoring as device tensor ops: no host sync in a sweep, "
                                  "CUDA graphs on CUDA; exact"),
}


def make_engine(name: str, model: nn.Module | None = None, **options) -> ScoringEngine:
    """Build engine ``name``; ``auto`` picks the fast engine where it supports ``model``, else the reference."""
    if name == "auto":
        name = "fast" if "fast" in ENGINES and model is not None and ENGINES["fast"][0].supports(model) else "reference"
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of auto, {', '.join(ENGINES)}")
    factory = ENGINES[name][0]
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(inspect.signature(factory).parameters))
    if unknown:
        raise ValueError(f"the {name} engine takes no option {', '.join(unknown)}")
    return factory(**given)


__all__ = ["ENGINES", "SEARCH_BN_MODES", "ChunkPartition", "FastEngine", "FixedStatistics", "PrefixCacheEngine",
           "ReferenceEngine", "ScoringEngine", "SyncFreeEngine", "batch_statistics", "fixed_statistics", "make_engine",
           "summed_cross_entropy"]
