"""How fast reference-bank prompts fit through a trained teacher (LRB-WREL stage 2), to choose --wrel-bank-iters / -lr.

    python benchmarks/wrel_bank_fit.py --model lts-synthref --data data/natural-small-s0 --split val
    python benchmarks/wrel_bank_fit.py --model runs/wrel-p10/stage1-teacher --data data/aerial-small-s0

Takes --n sentences of a split, replaces each by its class name (what
`refseg weaken` does to a weak ref), and prints the teacher's mean IoU
(letterboxed, logits > 0) with the accurate text, with the class name alone,
and with the class name + bank prompts after every few Adam steps of
stage 2 (engine/wrel.py: same initialisation, loss and optimiser), for each
learning rate, with the seconds per step.
"""

import argparse
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lts-synthref", help="shipped name or run / checkpoint folder (the teacher)")
    ap.add_argument("--data", default="data/natural-small-s0")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=16, help="sentences (every 4th of the split's first 4n)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.03])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--every", type=int, default=5, help="print the IoU every this many steps")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import refseg
    from refseg.data import load_refer
    from refseg.data.dataset import RefSegDataset, collate
    from refseg.engine.evaluate_core import unique_images
    from refseg.engine.wrel import PROMPT_INIT_STD
    from refseg.losses import lts_loss
    from refseg.modeling.bank import class_name_tokens, encode_with_prompts

    torch.set_num_threads(args.threads)
    model = refseg.load(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    ds = RefSegDataset(load_refer(args.data), args.split, model.image_size, "full")
    rows = list(range(0, 4 * args.n, 4))[:len(ds)]
    items = collate([ds[i] for i in rows])
    names = [ds.samples[i].class_name for i in rows]
    images, index = unique_images(items)
    gt = items["mask"] > 0.5

    def iou(out) -> float:
        pred = out["mask_logits"].detach() > 0
        return float(((pred & gt).flatten(1).sum(1) / (pred | gt).flatten(1).sum(1).clamp(min=1)).mean())

    with torch.no_grad():
        vis = model.encode_image(images)
        accurate = iou(model.decode(vis, model.encode_text(items["text"]), index))
        class_only = iou(model.decode(vis, model.encode_text(names), index))
    print(f"{len(rows)} {args.split} sentences: IoU accurate text {accurate:.3f}, class name only {class_only:.3f}")
    ids, mask = class_name_tokens(model.text, names, images.device)
    for lr in args.lr:
        generator = torch.Generator().manual_seed(0)
        prompts = (torch.randn(len(rows), args.prompts, model.text.dim, generator=generator) * PROMPT_INIT_STD)
        prompts.requires_grad_(True)
        optimizer = torch.optim.Adam([prompts], lr=lr)
        start, marks = time.perf_counter(), []
        for step in range(args.iters + 1):
            out = model.decode(vis, encode_with_prompts(model.text, ids, mask, prompts), index)
            if step % args.every == 0 or step == args.iters:
                marks.append(f"{step}: {iou(out):.3f}")
            if step == args.iters:
                break
            loss = lts_loss(out, items)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds = (time.perf_counter() - start) / args.iters
        print(f"lr {lr:g}: IoU after step  {'  '.join(marks)}  ({seconds:.2f} s/step)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
