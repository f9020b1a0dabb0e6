"""Time one LTS head training step on cached-shaped inputs (no encoders run).

    python benchmarks/lts_step.py                      # batch 32 sentences from 4 images, 2 threads
    python benchmarks/lts_step.py --no-stride2 --bf16  # other settings

Inputs are random tensors shaped like EfficientNet-Lite0 + MiniLM cached
features at 320 px; a step = forward + lts_loss + backward + AdamW step.
Prints the median (and best) step time and samples/s over ``--steps`` timed
steps, the step's FLOPs, and a reference fp32 matmul rate measured just
before, to tell a quiet machine from a busy one (2 quiet cores of the dev
machine: ~100 GFLOP/s; other processes on the cores can slow every figure
several-fold).
"""

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from refseg.methods.lts.loss import lts_loss
from refseg.methods.lts import LTSHead
from refseg.modeling.text import TextFeatures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="sentences per step")
    ap.add_argument("--images", type=int, default=4, help="distinct images per step")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-stride2", action="store_true", help="leave out the stride-2 map")
    ap.add_argument("--bf16", action="store_true", help="CPU autocast to bfloat16")
    ap.add_argument("--head-kwargs", default="{}", help='LTSHead arguments as JSON, e.g. \'{"depth": 3}\'')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    strides = (4, 8, 16, 32) if args.no_stride2 else (2, 4, 8, 16, 32)
    channels = {2: 16, 4: 24, 8: 40, 16: 112, 32: 320}
    head = LTSHead([channels[s] for s in strides], strides, 384, **json.loads(args.head_kwargs))
    n_params = sum(p.numel() for p in head.parameters())
    opt = torch.optim.AdamW(head.parameters(), lr=3e-4)

    B, S, L = args.batch, args.size, 24
    vis = [torch.randn(args.images, channels[s], S // s, S // s) for s in strides]
    lengths = torch.randint(5, 13, (B,))
    mask = torch.arange(L)[None] < lengths[:, None]  # (B, L)
    txt = TextFeatures(torch.randn(B, L, 384), mask, torch.randn(B, 384))
    index = torch.randint(0, args.images, (B,))
    gt = torch.zeros(B, 1, S, S)
    for b in range(B):
        y, x = torch.randint(20, S - 60, (2,)).tolist()
        gt[b, :, y : y + 40, x : x + 40] = 1
    batch = {"mask": gt, "no_target": torch.zeros(B, dtype=torch.bool)}

    with FlopCounterMode(display=False) as flops:
        lts_loss(head(vis, txt, index), batch)["loss"].backward()
    head.zero_grad(set_to_none=True)
    reference = matmul_gflops()

    times = []
    for step in range(args.steps + 2):
        t0 = time.perf_counter()
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        with amp:
            out = head(vis, txt, index)
            losses = lts_loss(out, batch)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    print(
        f"LTSHead {args.head_kwargs} strides={strides} params={n_params / 1e6:.2f}M "
        f"bf16={args.bf16} threads={args.threads}: batch {B} ({args.images} images) "
        f"step {t * 1000:.0f} ms (min {min(times) * 1000:.0f}), {B / t:.1f} samples/s; "
        f"{flops.get_total_flops() / 1e9:.1f} GFLOP/step; reference matmul {reference:.0f} GFLOP/s"
    )


def matmul_gflops(n: int = 20) -> float:
    """fp32 (12800 x 128) @ (128 x 512) rate, best of n: how fast the cores are right now."""
    a, b = torch.randn(12800, 128), torch.randn(128, 512)
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 12800 * 128 * 512 / best / 1e9


if __name__ == "__main__":
    main()
