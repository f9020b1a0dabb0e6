"""How well and how fast reference-bank prompts fit through a trained teacher (LRB-WREL stage 2), per site.

    python benchmarks/wrel_bank_fit.py --model lts-synthref --data data/natural-small-s0 --split val
    python benchmarks/wrel_bank_fit.py --model runs/wrel-p10/stage1-teacher --data data/aerial-small-s0 \\
        --site features encoder --lr 0.01 0.03 --iters 30 --n 256

Takes --n sentences of a split, replaces each by its class name (what
`refseg weaken` does to a weak ref), and prints the teacher's mean IoU
(letterboxed, logits > 0) with the accurate text and with the class name
alone; then, for each site and learning rate, the IoU with the class name +
bank prompts after every few Adam steps of stage 2 (refseg/methods/wrel/train.py: same
initialisation, loss, optimiser and text path, all --n refs in one batch,
as stage 2 does with --wrel-bank-batch n), and the cost: seconds per step
and milliseconds per ref and step, measured in this one process, so that
the sites compare fairly. Sites: `encoder` and `features` as in
refseg/methods/wrel/bank.py; `features-abs` is the alternative to `features` not taken
(the prompts are absolute output-space vectors from N(0, 0.02^2), not
offsets from the class name's sentence vector). The class-name features
of site features are rounded to fp16, as the feature cache stores them.
The peak resident memory of the process is printed at the end.
"""

import argparse
import resource
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lts-synthref", help="shipped name or run / checkpoint folder (the teacher)")
    ap.add_argument("--data", default="data/natural-small-s0")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=64, help="sentences (every --stride-th of the split), one batch")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--site", nargs="+", default=["features", "encoder"],
                    choices=["encoder", "features", "features-abs"])
    ap.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.03])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--every", type=int, default=5, help="print the IoU every this many steps")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import refseg
    from refseg.data import load_refer
    from refseg.data.dataset import RefSegDataset, collate
    from refseg.engine.evaluate_core import unique_images
    from refseg.methods.wrel.train import PROMPT_INIT_STD, bank_text
    from refseg.methods.lts.loss import lts_loss
    from refseg.methods.wrel.bank import append_prompt_features, class_name_tokens
    from refseg.modeling.text import TextFeatures

    torch.set_num_threads(args.threads)
    model = refseg.load(args.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ds = RefSegDataset(load_refer(args.data), args.split, model.image_size, "full")
    rows = list(range(0, args.stride * args.n, args.stride))[:len(ds)]
    items = collate([ds[i] for i in rows])
    names = [ds.samples[i].class_name for i in rows]
    images, index = unique_images(items)
    gt = items["mask"] > 0.5

    def iou(out) -> float:
        pred = out["mask_logits"].detach() > 0
        return float(((pred & gt).flatten(1).sum(1) / (pred | gt).flatten(1).sum(1).clamp(min=1)).mean())

    with torch.no_grad():
        maps = [model.encode_image(images[i:i + 16]) for i in range(0, len(images), 16)]
        vis = [torch.cat(level).half().float() for level in zip(*maps)]  # as the feature cache stores them
        accurate = iou(model.decode(vis, model.encode_text(items["text"]), index))
        cached = model.encode_text(names)
        cached = TextFeatures(cached.tokens.half().float(), cached.mask, cached.sentence.half().float())
        class_only = iou(model.decode(vis, cached, index))
    print(f"{len(rows)} {args.split} sentences of {len(images)} images, {args.prompts} prompts, "
          f"{args.threads} threads: IoU accurate text {accurate:.3f}, class name only {class_only:.3f}")
    ids, mask = class_name_tokens(model.text, names, images.device)

    def text_of(site: str, prompts: torch.Tensor) -> TextFeatures:
        if site == "features-abs":
            return append_prompt_features(cached, prompts)
        return bank_text(site, model.text, ids, mask, cached, prompts)

    for site in args.site:
        for lr in args.lr:
            generator = torch.Generator().manual_seed(0)
            prompts = torch.randn(len(rows), args.prompts, model.text.dim, generator=generator) * PROMPT_INIT_STD
            prompts.requires_grad_(True)
            optimizer = torch.optim.Adam([prompts], lr=lr)
            marks, seconds = [], 0.0
            for step in range(args.iters + 1):
                start = time.perf_counter()
                out = model.decode(vis, text_of(site, prompts), index)
                if step < args.iters:
                    loss = lts_loss(out, items)["loss"]
                    optimizer.zero_grad()
                    (loss * len(rows)).backward()
                    optimizer.step()
                    seconds += time.perf_counter() - start
                if step % args.every == 0 or step == args.iters:
                    marks.append(f"{step}: {iou(out):.3f}")
            per_step = seconds / args.iters
            print(f"{site:12s} lr {lr:g}: IoU after step  {'  '.join(marks)}  "
                  f"({per_step:.2f} s/step, {1000 * per_step / len(rows):.1f} ms/ref/step)", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB (Linux)
    print(f"peak resident memory {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
