"""`refseg demo`: serve the Gradio demo at / and the REST API (/health, /models, /segment) on one port.

    refseg demo                                   # every shipped model, http://127.0.0.1:7860
    refseg demo --model runs/lts/best --port 8000 # a checkpoint of your own (added to the shipped ones)
    curl -F image=@photo.png -F text="the red star" http://127.0.0.1:7860/segment

See refseg/serve.py for the API and its error codes.
"""

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="TCP port")
    p.add_argument("--model", default=None,
                   help="default model: a shipped name or a checkpoint/run path (default: lts-synthref)")
    p.add_argument("--cache-dir", default=None,
                   help="where the example data is generated (default: $REFSEG_CACHE or ~/.cache/refseg)")
    p.add_argument("--no-examples", action="store_true", help="do not generate or show the SynthRef examples")
    p.add_argument("--no-demo", action="store_true", help="serve the REST API only")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body accepted, MiB (413 above)")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="largest image accepted, megapixels (413 above)")
    p.add_argument("--max-concurrent", type=int, default=2,
                   help="requests decoding and segmenting at once; the rest wait (bounds memory)")
    p.add_argument("--threshold", type=float, default=0.5, help="mask probability threshold")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")


def _name_for(path: Path) -> str:
    """What clients see for a checkpoint path: the file stem, the run folder, or RUN/best (no server paths)."""
    path = path.resolve()
    if path.suffix == ".safetensors":
        return path.stem
    return f"{path.parent.name}/{path.name}" if path.name in ("best", "last") else path.name


def main(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import gradio  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"refseg demo: error: {e.name} is not installed; pip install 'refseg[demo]'", file=sys.stderr)
        return 2
    import torch

    import refseg
    from refseg.serve import ApiError, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    models = {name: name for name in refseg.available_models()}
    default = args.model
    if default is not None and default not in models:
        if not Path(default).exists():
            print(f"refseg demo: error: {default!r} is neither a shipped model "
                  f"({', '.join(models) or 'none'}) nor an existing path", file=sys.stderr)
            return 2
        name = _name_for(Path(default))
        name = name if name not in models else default
        models[name] = default
        default = name
    if not models:
        print("refseg demo: error: no model is shipped in refseg/weights; pass --model PATH "
              "(a checkpoint or run folder)", file=sys.stderr)
        return 2
    try:
        app = create_app(models, default=default, demo=not args.no_demo, cache_dir=args.cache_dir,
                         examples=not args.no_examples, max_upload_bytes=int(args.max_upload_mb * 2**20),
                         max_pixels=int(args.max_megapixels * 1e6), mask_threshold=args.threshold,
                         max_concurrent=args.max_concurrent)
        app.state.pool.preload()  # a broken default model fails here, not on the first request
    except (ApiError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"refseg demo: error: {e}", file=sys.stderr)
        return 1
    print(f"refseg demo: http://{args.host}:{args.port}/  (REST: POST /segment, GET /health, GET /models; "
          f"default model {app.state.pool.default})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
