"""Time `refseg train` steps with and without the frozen-encoder feature cache.

    python benchmarks/train_step.py                                 # SynthRef tiny, batch 32, real LTS
    python benchmarks/train_step.py --data DIR --images-per-batch 0 --steps 5

Runs the engine's own step (engine/train.py: StepModule + loss + backward +
clip + AdamW) on the same batches two ways:
- cached: features from engine/cache.py, the step runs `model.decode` only;
- uncached: items read and letterboxed by RefSegDataset, the step runs the
  encoders on the batch's unique images and sentences, then decode.
Prints the median seconds per step (uncached split into data loading and
compute), samples/s, the ratio, and the one-off cache build time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _generate_tiny(folder: Path) -> Path:
    from refseg.cli import main as cli

    out = folder / "synthref-tiny"
    if cli(["make-data", "--preset", "tiny", "--seed", "0", "--out", str(out)]) != 0:
        raise SystemExit("could not generate SynthRef tiny")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="refer folder (default: generate SynthRef tiny in a temp folder)")
    ap.add_argument("--model", default="lts")
    ap.add_argument("--model-kwargs", default="{}", help="JSON")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images-per-batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-uncached", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from refseg.data.dataset import RefSegDataset, collate
    from refseg.data.refer import load_refer
    from refseg.engine import cache as feature_cache
    from refseg.engine.config import TrainConfig
    from refseg.engine.sampler import GroupBatchSampler
    from refseg.engine.optim import make_optimizer
    from refseg.engine.train import StepModule, build_model, loss_function, set_train_mode, to_step_batch

    tmp = tempfile.TemporaryDirectory()
    data_dir = Path(args.data) if args.data else _generate_tiny(Path(tmp.name))
    cfg = TrainConfig(model=args.model, model_kwargs=json.loads(args.model_kwargs), data=str(data_dir),
                      size=args.size, batch_size=args.batch_size, images_per_batch=args.images_per_batch)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ds = RefSegDataset(load_refer(data_dir), "train", args.size, "full")
    n_batches = args.warmup + args.steps
    sampler = GroupBatchSampler([s.image_id for s in ds.samples], args.batch_size, args.images_per_batch, seed=0)
    batches = sampler.batches(0)
    if len(batches) < n_batches:
        raise SystemExit(f"{data_dir} gives {len(batches)} batches of {args.batch_size}; need {n_batches}")
    batches = batches[:n_batches]
    n_images = [len({ds.samples[i].image_id for i in b}) for b in batches]
    loss_fn = loss_function(cfg)
    step_module = StepModule(model)
    opt = make_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(batch) -> float:
        t0 = time.perf_counter()
        out = step_module(batch)
        loss = loss_fn(out, batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return time.perf_counter() - t0

    # cached
    t0 = time.perf_counter()
    cache = feature_cache.build_cache(model, ds, device, progress=True)
    build_s = time.perf_counter() - t0
    set_train_mode(model)
    cached, cached_data = [], []
    for i, rows in enumerate(batches):
        t0 = time.perf_counter()
        batch = cache.batch(rows, device)
        load = time.perf_counter() - t0
        dt = step(batch)
        if i >= args.warmup:
            cached.append(load + dt)
            cached_data.append(load)

    # uncached
    uncached, uncached_data = [], []
    if not args.skip_uncached:
        loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate))
        for i in range(n_batches):
            t0 = time.perf_counter()
            batch = to_step_batch(next(loader), device)
            load = time.perf_counter() - t0
            dt = step(batch)
            if i >= args.warmup:
                uncached.append(load + dt)
                uncached_data.append(load)

    med = statistics.median
    print(f"model {args.model}: {n_trainable / 1e6:.2f} M trainable parameters; data {data_dir}")
    print(f"batch {args.batch_size} sentences, {statistics.mean(n_images):.1f} distinct images per batch "
          f"(images_per_batch={args.images_per_batch}), size {args.size}, {args.threads} threads, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"cache build: {len(cache)} sentences / {cache.meta['n_images']} images in {build_s:.1f} s "
          f"({cache.nbytes() / 2**20:.0f} MiB)")
    print(f"cached   step: {med(cached):.3f} s  ({med(cached_data):.3f} s reading the cache)  "
          f"{args.batch_size / med(cached):.1f} samples/s")
    if uncached:
        print(f"uncached step: {med(uncached):.3f} s  ({med(uncached_data):.3f} s loading images)  "
              f"{args.batch_size / med(uncached):.1f} samples/s")
        print(f"uncached / cached: {med(uncached) / med(cached):.1f}x")
    tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
