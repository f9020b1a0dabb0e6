"""Are a SaG model's slots object-centric? The shatter stage's own metric, read from ground-truth masks.

    python benchmarks/sag_slots.py --model runs/sag-small/hard/last --data data/natural-small-s0 --split val
    python benchmarks/sag_slots.py --model sag-synthref --images 100 --json slots.json

SaG's masks are relevance-weighted slot attention maps, so they can only be
as good as the slots: if no slot covers the referent, no choice of slots can
give its mask. For each of the first --images images of --split (every
distinct referent of the split in those images counts once), on the
head's stride-16 grid:
  - each cell goes to its most attending slot (argmax of the slot attention);
    an object's cells are the cells its letterboxed mask covers at least half;
  - best-slot IoU: the highest IoU between an object's cells and one slot's
    cells (mean, and the share of objects above 0.5: "a slot is this object");
  - oracle PointM: with the slot of best IoU chosen for every object (what a
    perfect gather could do), does that slot's attention peak fall inside
    the object? An upper bound on the PointM of the current slots;
  - slots used: distinct argmax slots per image (mean), out of K.
Also prints the model's own PointM on those referents (its first sentence
each), for comparison. Training never reads masks; this script does, to
judge the slots, like the val metrics do.
"""

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path


def referents_by_image(ds, images: int) -> "OrderedDict":
    """The first ``images`` images of a RefSegDataset's split (in sample order) ->
    OrderedDict image_id -> {ann_id: the first dataset row of that referent}; no-target rows left out."""
    by_image = OrderedDict()
    for row, s in enumerate(ds.samples):
        if s.no_target:
            continue
        refs = by_image.setdefault(s.image_id, {})
        if len(by_image) > images:
            del by_image[s.image_id]
            break
        refs.setdefault(s.ann_id, row)
    return by_image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a SaG checkpoint / run folder or shipped name")
    ap.add_argument("--data", default="data/natural-small-s0", help="refer-format folder")
    ap.add_argument("--split", default="val")
    ap.add_argument("--images", type=int, default=100, help="how many images of the split (in order)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    import refseg
    from refseg.data import load_refer
    from refseg.data.dataset import RefSegDataset

    torch.set_num_threads(args.threads)
    model = refseg.load(args.model).eval()
    if not hasattr(model.head, "shatter"):
        raise SystemExit(f"{args.model}: not a SaG model (its head has no slots)")
    ds = RefSegDataset(load_refer(args.data), args.split, size=model.image_size, supervision="full")
    by_image = referents_by_image(ds, args.images)

    best_iou, oracle_hit, own_hit, used = [], [], [], []
    with torch.no_grad():
        for image_id, refs in by_image.items():
            items = [ds[row] for row in refs.values()]
            vis = model.encode_image(items[0]["image"][None])
            txt = model.encode_text([it["text"] for it in items])
            out = model.decode(vis, txt, torch.zeros(len(items), dtype=torch.long))
            attn = out["slot_attn"][0]  # (K, h, w), softmax over slots at each cell
            K, h, w = attn.shape
            cell_slot = attn.argmax(0)  # (h, w)
            used.append(len(torch.unique(cell_slot)))
            stride = model.image_size // h
            for b, it in enumerate(items):
                cells = F.avg_pool2d(it["mask"][None].float(), stride)[0, 0] >= 0.5  # (h, w)
                if not bool(cells.any()):
                    continue  # smaller than half a cell: no cell is this object's
                ious = torch.stack([((cell_slot == k) & cells).sum() / ((cell_slot == k) | cells).sum()
                                    for k in range(K)]).float()  # (K,)
                k = int(ious.argmax())
                best_iou.append(float(ious[k]))
                peak = int(attn[k].flatten().argmax())
                oracle_hit.append(bool(cells.flatten()[peak]))
                prior = out["prior_logits"][b, 0]  # (h, w), the model's own response map
                own_hit.append(bool(cells.flatten()[int(prior.flatten().argmax())]))

    if not best_iou:
        raise SystemExit(f"{args.data} {args.split}: no referent covers half a grid cell in the first {args.images} images")
    figures = {
        "model": str(args.model), "data": str(Path(args.data).resolve()), "split": args.split,
        "images": len(by_image), "objects": len(best_iou),
        "best_slot_iou_mean": float(np.mean(best_iou)),
        "best_slot_iou_above_0.5": float(np.mean(np.array(best_iou) > 0.5)),
        "oracle_pointm": float(np.mean(oracle_hit)), "model_pointm_grid": float(np.mean(own_hit)),
        "slots_used_mean": float(np.mean(used)), "num_slots": int(K),
    }
    print(f"{figures['objects']} referents in {figures['images']} {args.split} images of {args.data}, "
          f"{h} x {w} grid, K = {K} slots")
    print(f"  best-slot IoU       mean {figures['best_slot_iou_mean']:.3f}, "
          f"above 0.5 for {100 * figures['best_slot_iou_above_0.5']:.1f} % of referents")
    print(f"  oracle PointM       {100 * figures['oracle_pointm']:.1f} %  (best slot chosen for every referent)")
    print(f"  model PointM (grid) {100 * figures['model_pointm_grid']:.1f} %  (its own relevance, first sentence)")
    print(f"  slots used / image  {figures['slots_used_mean']:.1f} of {K}")
    if args.json:
        from refseg.engine.evaluate import write_json_atomic

        write_json_atomic(figures, Path(args.json))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
