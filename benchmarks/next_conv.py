"""Time the fast engine's next-conv stencil (``rso.engines.fused.next_conv``: ``Q + conv(new - old)`` for one
changed input channel, with the moments of the BN after it) against the loop order it replaced and against
oneDNN's one-input-channel conv, at paper6's shapes, one thread, channels-last.

    python benchmarks/next_conv.py [--batch 2500] [--dtype float32]

The replaced order (kept here only to compare) ran the taps outside the output channels and so stored and
reloaded every channel's sum once per tap; the kernel now sums a pixel's taps for each channel in registers.
Both give the same values bit for bit (checked here). The default batch is one worker's share of a 5000
chunk with 2 workers. Prints the machine, each time (best of 7) and the ratios measured in this run.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rso.engines import fused  # noqa: E402
from rso.engines.fast import keep_freed_memory  # noqa: E402
from rso.engines.kernels import numba  # noqa: E402
from pooled_conv import best_of  # noqa: E402  (best of 7, after one warm-up)

# (what paper6 sweeps, the next conv's input size, its kernel, its stride): a conv that a 2x2 average pooling
# follows runs folded into one stride-2 4x4 conv (rso.engines.plan.PooledConv)
SHAPES = [("3.weight (conv1) -> conv2", 14, 3, 1), ("0.weight (conv0) -> conv1+pool", 28, 4, 2),
          ("7.weight (conv2) -> conv3+pool", 14, 4, 2)]


def _taps_outside(base, new, old, weight, stride, padding, dilation, out):
    """The replaced loop order: for each pixel, taps outside, output channels inside, the sums in an array."""
    n, out_h, out_w, o = base.shape
    in_h, in_w = new.shape[1], new.shape[2]
    kh, kw = weight.shape[0], weight.shape[1]
    rows, wide = in_h + 2 * padding[0], in_w + 2 * padding[1]
    for i in numba.prange(n):
        padded = np.zeros((rows, wide), base.dtype)
        acc = np.empty(o, base.dtype)
        for y in range(in_h):
            for x in range(in_w):
                padded[y + padding[0], x + padding[1]] = new[i, y, x] - old[i, y, x]
        for y in range(out_h):
            for x in range(out_w):
                for k in range(o):
                    acc[k] = 0.0
                for r in range(kh):
                    for s in range(kw):
                        d = padded[y * stride[0] + r * dilation[0], x * stride[1] + s * dilation[1]]
                        for k in range(o):
                            acc[k] += d * weight[r, s, k]
                for k in range(o):
                    out[i, y, x, k] = base[i, y, x, k] + acc[k]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2500)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args(argv)
    if numba is None:
        print("numba is not installed: the stencil is a numba kernel", file=sys.stderr)
        return 2
    keep_freed_memory()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    taps_outside = numba.njit(parallel=True)(_taps_outside)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, numba {numba.__version__}, "
          f"1 thread, {args.dtype}, batch {args.batch}")
    for name, size, kernel, stride in SHAPES:
        layer = nn.Conv2d(16, 16, kernel, stride=stride, padding=1, bias=False).to(dtype).requires_grad_(False)
        out_size = (size + 2 - kernel) // stride + 1
        base = torch.randn(args.batch, 16, out_size, out_size, generator=generator, dtype=dtype)
        base = base.contiguous(memory_format=torch.channels_last)
        new, old = (torch.randn(args.batch, 1, size, size, generator=generator, dtype=dtype) for _ in range(2))
        out, previous = torch.empty_like(base), torch.empty_like(base)
        weight = layer.weight[:, 3].permute(1, 2, 0).contiguous().numpy()
        arrays = (base.permute(0, 2, 3, 1).numpy(), new[:, 0].numpy(), old[:, 0].numpy(), weight, (stride, stride),
                  (1, 1), (1, 1), previous.permute(0, 2, 3, 1).numpy())
        now = best_of(lambda: fused.next_conv(base, new, old, layer, 3, out))
        with_moments = best_of(lambda: fused.next_conv(base, new, old, layer, 3, out, pool="none"))
        before = best_of(lambda: taps_outside(*arrays))
        change = (new - old).contiguous(memory_format=torch.channels_last)
        one_channel = layer.weight[:, 3:4].contiguous()
        onednn = best_of(lambda: torch.add(base, F.conv2d(change, one_channel, stride=stride, padding=1)))
        same = torch.equal(out, previous)
        print(f"{name}: stencil {now * 1e3:.1f} ms (with BN moments {with_moments * 1e3:.1f} ms); replaced loop "
              f"order {before * 1e3:.1f} ms (ratio {before / now:.2f}, bit-identical: {same}); oneDNN 1-channel "
              f"conv + add {onednn * 1e3:.1f} ms")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
