"""What could a perfect gather reach with colour-only entities? A ceiling for SaG's shatter stage.

    python benchmarks/sag_ceiling.py --data data/natural-small-s0 --split val --images 100

Clusters the letterboxed image's cells (mean RGB per --stride cell; no learning, no
encoder) into --clusters colour clusters with k-means (seeded), then, with
--components, splits every cluster into its 4-connected components. For each
referent of the first --images images of the split, counted once per object as
in benchmarks/sag_slots.py (an object's cells: those its mask covers at least
half), it takes the entity of best IoU and scores:
  - best IoU (mean, share above 0.5);
  - oracle PointM: the entity's cell nearest its centroid falls inside the object;
  - colour recon MSE (per image): each cell's colour against its entity's mean colour, in
    the units of SaG's rgb reconstruction term, to read beside a trained model's train/recon.
The same metrics as sag_slots.py prints for a trained model's slots, so the two
read side by side: slots far below this ceiling are the shatter stage's fault.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sag_slots import referents_by_image  # benchmarks/ is on sys.path when this script runs

from refseg.methods.sag.model import RGB_SCALE


def kmeans(x: torch.Tensor, k: int, iters: int = 30, gen=None) -> torch.Tensor:
    """x (N, C) -> assignment (N,) int64, Lloyd's algorithm from k random points."""
    centres = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(iters):
        a = torch.cdist(x, centres).argmin(1)
        for j in range(len(centres)):
            if (a == j).any():
                centres[j] = x[a == j].mean(0)
    return torch.cdist(x, centres).argmin(1)


def entities(image: torch.Tensor, stride: int, clusters: int, components: bool, gen):
    """(3, S, S) uint8 -> ((h, w) int64 entity id per cell, colour reconstruction MSE): the MSE of every
    cell's colour against its entity's mean colour, in SaG's colour units ((c - 0.5) / RGB_SCALE), the
    figure SaG's rgb reconstruction term reports."""
    from scipy import ndimage

    cells = F.avg_pool2d(image.float()[None] / 255, stride)[0]  # (3, h, w)
    h, w = cells.shape[-2:]
    a = kmeans(cells.reshape(3, -1).T, clusters, gen=gen).view(h, w).numpy()
    out = a.astype(np.int64)
    if components:
        out, n = np.zeros((h, w), np.int64), 0
        for c in np.unique(a):
            lab, m = ndimage.label(a == c)
            out[lab > 0] = lab[lab > 0] + n
            n += m
    ent = torch.from_numpy(out)
    colour = ((cells - 0.5) / RGB_SCALE).reshape(3, -1).T  # (N, 3)
    flat = ent.flatten()
    means = torch.stack([colour[flat == e].mean(0) for e in range(int(flat.max()) + 1)])  # unused ids give NaN rows
    return ent, float((colour - means[flat]).pow(2).mean())


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
    by_image = referents_by_image(ds, args.images)
    print(f"{args.data} {args.split}: {len(by_image)} images, K = {args.clusters} colour clusters")
    for stride in (16, 8):
        for components in (False, True):
            gen = torch.Generator().manual_seed(args.seed)
            best, hit, mse = [], [], []
            for refs in by_image.values():
                items = [ds[r] for r in refs.values()]
                ent, err = entities(items[0]["image"], stride, args.clusters, components, gen)
                mse.append(err)
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
                  f"(> 0.5: {100 * np.mean(np.array(best) > 0.5):.1f} %)  oracle PointM {100 * np.mean(hit):.1f} %  "
                  f"colour recon MSE {np.mean(mse):.3f}")


if __name__ == "__main__":
    main()
