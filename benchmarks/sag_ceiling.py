"""What could a perfect gather reach with colour-only entities? A ceiling for SaG's shatter stage.

    python benchmarks/sag_ceiling.py --data data/natural-small-s0 --split val --images 100

Clusters the letterboxed image's cells (mean RGB per --stride cell; no learning, no
encoder) into --clusters colour clusters with k-means (seeded), then, with
--components, splits every cluster into its 4-connected components. For each
referent of the first --images images of the split, counted once per object as
in benchmarks/sag_slots.py (an object's cells: those its mask covers at least
half), it takes the entity of best IoU and scores:
  - best IoU (mean, share above 0.5);
  - oracle PointM: the entity's cell nearest its centroid falls inside the object.
The same metrics as sag_slots.py prints for a trained model's slots, so the two
read side by side: slots far below this ceiling are the shatter stage's fault.
"""

import argparse
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F


def kmeans(x: torch.Tensor, k: int, iters: int = 30, gen=None) -> torch.Tensor:
    """x (N, C) -> assignment (N,) int64, Lloyd's algorithm from k random points."""
    centres = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(iters):
        a = torch.cdist(x, centres).argmin(1)
        for j in range(len(centres)):
            if (a == j).any():
                centres[j] = x[a == j].mean(0)
    return torch.cdist(x, centres).argmin(1)


def entities(image: torch.Tensor, stride: int, clusters: int, components: bool, gen) -> torch.Tensor:
    """(3, S, S) uint8 -> (h, w) int64 entity id per cell."""
    from scipy import ndimage

    cells = F.avg_pool2d(image.float()[None] / 255, stride)[0]  # (3, h, w)
    h, w = cells.shape[-2:]
    a = kmeans(cells.reshape(3, -1).T, clusters, gen=gen).view(h, w).numpy()
    if not components:
        return torch.from_numpy(a)
    out, n = np.zeros((h, w), np.int64), 0
    for c in np.unique(a):
        lab, m = ndimage.label(a == c)
        out[lab > 0] = lab[lab > 0] + n
        n += m
    return torch.from_numpy(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/natural-small-s0")
    ap.add_argument("--split", default="val")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from refseg.data import load_refer
    from refseg.data.dataset import RefSegDataset

    ds = RefSegDataset(load_refer(args.data), args.split, size=args.size, supervision="full")
    by_image = OrderedDict()
    for row, s in enumerate(ds.samples):
        if s.no_target:
            continue
        refs = by_image.setdefault(s.image_id, {})
        if len(by_image) > args.images:
            del by_image[s.image_id]
            break
        refs.setdefault(s.ann_id, row)
    print(f"{args.data} {args.split}: {len(by_image)} images, K = {args.clusters} colour clusters")
    for stride in (16, 8):
        for components in (False, True):
            gen = torch.Generator().manual_seed(args.seed)
            best, hit = [], []
            for refs in by_image.values():
                items = [ds[r] for r in refs.values()]
                ent = entities(items[0]["image"], stride, args.clusters, components, gen)
                ids = torch.unique(ent)
                for it in items:
                    cells = F.avg_pool2d(it["mask"][None].float(), stride)[0, 0] >= 0.5
                    if not cells.any():
                        continue
                    ious = torch.stack([((ent == e) & cells).sum() / ((ent == e) | cells).sum() for e in ids]).float()
                    e = ids[int(ious.argmax())]
                    best.append(float(ious.max()))
                    idx = (ent == e).nonzero().float()
                    y, x = idx[(idx - idx.mean(0)).norm(dim=1).argmin()].long().tolist()
                    hit.append(bool(cells[y, x]))
            what = "colour k-means" + (" + connected components" if components else "")
            print(f"  stride {stride:2d} {what:40s} objects {len(best):4d}  best IoU {np.mean(best):.3f} "
                  f"(> 0.5: {100 * np.mean(np.array(best) > 0.5):.1f} %)  oracle PointM {100 * np.mean(hit):.1f} %")


if __name__ == "__main__":
    main()
