"""How far the int8 text graph (`refseg export --int8-text`) moves a model's masks, on a refer split.

    python benchmarks/int8_text_parity.py --model lts-synthref --data data/natural-small-s0 --split val --max-samples 1500

Exports the model (float and int8 text graphs) into a temporary folder, runs
OnnxPredictor with each text graph on the first --max-samples sentences of the
split, and prints: the IoU between the two predictions of each sentence (mean,
the share of identical masks, the share below 0.5 IoU: "picked another
object"), and mIoU / oIoU of each against the ground truth (refseg.metrics).
A missing --data folder is generated (SynthRef natural small, seed 0, as
benchmarks/lts_synthref.py does).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lts-synthref", help="shipped name or checkpoint/run path")
    ap.add_argument("--data", default="data/natural-small-s0", help="refer-format folder")
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-samples", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    import refseg
    from refseg.data import load_refer
    from refseg.export import OnnxPredictor, export_onnx
    from refseg.metrics import RISMetrics

    torch.set_num_threads(args.threads)
    if not (Path(args.data) / "synthref.json").exists():
        from refseg.cli import main as cli

        print(f"{args.data}: generating SynthRef natural small, seed 0", file=sys.stderr)
        if cli(["make-data", "--domain", "natural", "--preset", "small", "--seed", "0", "--out", args.data]) != 0:
            return 1
    data = load_refer(args.data)
    samples = data.samples(args.split)[: args.max_samples]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        export_onnx(refseg.load(args.model), out, int8_text=True)
        predictors = {k: OnnxPredictor(out, threads=args.threads, int8_text=k == "int8") for k in ("float", "int8")}
        metrics = {k: RISMetrics() for k in predictors}
        pair_iou, start = [], time.perf_counter()
        for image_id in dict.fromkeys(s.image_id for s in samples):
            group = [s for s in samples if s.image_id == image_id]
            image = data.load_image(image_id)
            results = {}
            for k, p in predictors.items():
                p.set_image(image)
                results[k] = p.predict([s.text for s in group])
            for j, s in enumerate(group):
                gt = data.get_mask(s.ann_id, image_id=image_id).astype(bool)
                for k in predictors:
                    metrics[k].update(results[k].masks[j], gt, no_target=s.no_target)
                a, b = results["float"].masks[j], results["int8"].masks[j]
                union = (a | b).sum()
                pair_iou.append(1.0 if union == 0 else (a & b).sum() / union)
    pair_iou = np.asarray(pair_iou)
    print(f"model {args.model}, {args.data} {args.split}: {len(pair_iou)} sentences, "
          f"{time.perf_counter() - start:.0f} s, {args.threads} threads")
    print(f"float vs int8 text masks: mean IoU {pair_iou.mean():.4f}, identical {np.mean(pair_iou == 1):.1%}, "
          f"IoU < 0.5 (another object) {np.mean(pair_iou < 0.5):.1%}")
    for k, m in metrics.items():
        r = m.compute()
        print(f"{k:6s} text graph: mIoU {100 * r['mIoU']:.2f}  oIoU {100 * r['oIoU']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
