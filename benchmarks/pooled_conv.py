"""Time a conv followed by a 2x2 average pooling against the one stride-2 conv it folds into
(``rso.engines.plan.PooledConv``), at paper6's conv3 shape (16 -> 16 channels, 3x3, 14x14 input), one thread,
channels-last, as the fast engine runs it; and the largest difference between the two outputs.

    python benchmarks/pooled_conv.py [--batch 5000] [--dtype float32]

Prints the machine, each time (best of 7) and the ratio measured in this run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rso.engines.fast import keep_freed_memory  # noqa: E402
from rso.engines.plan import PooledConv  # noqa: E402


def best_of(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False).to(dtype).requires_grad_(False)
    folded = PooledConv(conv)
    x = torch.randn(args.batch, 16, 14, 14, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = best_of(lambda: F.avg_pool2d(conv(x), 2))
        fused = best_of(lambda: folded(x))
        difference = (F.avg_pool2d(conv(x), 2) - folded(x)).abs().max().item()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, {args.dtype}, "
          f"batch {args.batch}")
    print(f"conv 3x3 + avg_pool2d(2): {plain * 1e3:.1f} ms; PooledConv (4x4, stride 2): {fused * 1e3:.1f} ms; "
          f"ratio {fused / plain:.2f}; largest difference {difference:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
