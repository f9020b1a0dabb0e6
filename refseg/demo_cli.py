"""`refseg demo`: serve the Gradio demo at / and the REST API (/health, /models, /segment) on one port.

    refseg demo                                   # the shipped lts-synthref, http://127.0.0.1:7860
    refseg demo --model runs/lts/best --port 8000 # a checkpoint of your own
    refseg demo --model lts-synthref --model lts-aerial   # two models; requests may name either
    curl -F image=@photo.png -F text="the red star" http://127.0.0.1:7860/segment

Only the models given with --model (the first is the default) can be named
by a request and loaded. See refseg/serve.py for the API, its limits and
its error codes. Bad options exit with status 2 and a one-line message.
"""

import argparse
import math
import sys
import threading
from pathlib import Path


def _number(kind, low, what):
    """An argparse type: ``kind`` (int or float), finite and >= ``low``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a {what} >= {low}")
        return value

    return parse


def _port(text: str) -> int:
    value = _number(int, 0, "port number")(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is at most 65535")
    return value


def _probability(text: str) -> float:
    value = _number(float, 0.0, "probability")(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be strictly between 0 and 1")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=7860, help="TCP port")
    p.add_argument("--model", action="append", default=None,
                   help="a model to serve: a shipped name or a checkpoint/run path; repeat for several "
                        "(the first is the default; only these can be requested). Default: lts-synthref")
    p.add_argument("--cache-dir", default=None,
                   help="where the example data is generated (default: $REFSEG_CACHE or ~/.cache/refseg)")
    p.add_argument("--no-examples", action="store_true", help="do not generate or show the SynthRef examples")
    p.add_argument("--no-demo", action="store_true", help="serve the REST API only")
    p.add_argument("--max-upload-mb", type=_number(float, 0.001, "size in MiB"), default=10.0,
                   help="largest request body accepted, MiB (413 above)")
    p.add_argument("--max-megapixels", type=_number(float, 0.0001, "number of megapixels"), default=40.0,
                   help="largest image accepted, megapixels (413 above)")
    p.add_argument("--max-concurrent", type=_number(int, 1, "whole number"), default=2,
                   help="requests decoding and segmenting at once, REST and demo together (bounds memory)")
    p.add_argument("--max-work-megapixels", type=_number(float, 0.0001, "number of megapixels"), default=400.0,
                   help="mask pixels per request: width x height x expressions (422 above)")
    p.add_argument("--threshold", type=_probability, default=0.5, help="mask probability threshold")
    p.add_argument("--threads", type=_number(int, 0, "whole number"), default=0,
                   help="torch threads (0: leave the default)")
    p.add_argument("--backend", choices=("auto", "onnx", "torch"), default=None,
                   help="auto: ONNX Runtime graphs (built on first use, cached per model) when onnxruntime is "
                        "installed, else PyTorch; onnx or torch: that one (default: $REFSEG_BACKEND, else auto)")


def _name_for(path: Path) -> str:
    """What clients see for a checkpoint path: the file stem, the run folder, or RUN/best (no server paths)."""
    path = path.resolve()
    if path.suffix == ".safetensors":
        return path.stem
    return f"{path.parent.name}/{path.name}" if path.name in ("best", "last") else path.name


def _preload(pool) -> None:
    """Load the default model in a background thread; a failure is logged (requests then get 503)."""
    try:
        pool.preload()
    except Exception as e:  # noqa: BLE001  (the server keeps answering /health; /segment reports 503)
        print(f"refseg demo: error: {getattr(e, 'message', e)}", file=sys.stderr, flush=True)


def _error(msg: str) -> int:
    print(f"refseg demo: error: {msg}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import gradio  # noqa: F401
        import uvicorn
    except ImportError as e:
        return _error(f"{e.name} is not installed; pip install 'refseg[demo]'")
    import refseg
    from refseg.serve import ApiError, create_app, raise_open_file_limit, server_options

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    shipped = refseg.available_models()
    wanted = args.model or ["lts-synthref" if "lts-synthref" in shipped else next(iter(shipped), None)]
    if wanted == [None]:
        return _error("no model is shipped in refseg/weights; pass --model PATH (a checkpoint or run folder)")
    models = {}
    for given in wanted:
        if given in shipped:
            name = given
        elif Path(given).exists():
            name = _name_for(Path(given))
        else:
            return _error(f"{given!r} is neither a shipped model ({', '.join(shipped) or 'none'}) nor an existing path")
        if name in models and models[name] != given:
            return _error(f"two --model values are both called {name!r}; rename one checkpoint")
        models[name] = given
    default = next(iter(models))
    try:
        app = create_app(models, default=default, demo=not args.no_demo, cache_dir=args.cache_dir,
                         examples=not args.no_examples, max_upload_bytes=int(args.max_upload_mb * 2**20),
                         max_pixels=max(1, int(args.max_megapixels * 1e6)), mask_threshold=args.threshold,
                         max_concurrent=args.max_concurrent, max_work=max(1, int(args.max_work_megapixels * 1e6)),
                         backend=args.backend)
        from refseg.backends import needs_build

        if needs_build(models[default], args.backend):  # the first use of this model: its ONNX graphs are built
            threading.Thread(target=_preload, args=(app.state.pool,), daemon=True).start()
            print(f"refseg demo: building the ONNX Runtime graphs of {default} in the background (once, then "
                  "cached); requests wait for them", flush=True)
        else:
            app.state.pool.preload()  # a broken default model fails here, not on the first request
    except ApiError as e:
        return _error(e.message)
    except (FileNotFoundError, ValueError, KeyError) as e:
        return _error(str(e).strip("'\""))
    raise_open_file_limit()
    print(f"refseg demo: http://{args.host}:{args.port}/  (REST: POST /segment, GET /health, GET /models; "
          f"models {', '.join(models)}, default {default})", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", **server_options())
    except SystemExit as e:  # uvicorn exits when it cannot listen (port in use, no permission)
        if e.code in (0, None):
            return 0
        return _error(f"cannot listen on {args.host}:{args.port} (see the message above)")
    return 0
