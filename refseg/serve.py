"""One server for refseg: a REST API and a Gradio demo in the same FastAPI app.

    app = create_app()                 # every shipped model; the demo mounted at /
    uvicorn.run(app, host="127.0.0.1", port=7860)      # or: refseg demo

REST API (all answers JSON; errors are ``{"error": {"code": ..., "message": ...}}``):

    GET  /health     {"status": "ok", "version", "default_model", "loaded": [names]}
    GET  /models     {"default": name, "models": [{"name", "shipped", "loaded"}]}
    POST /segment    multipart form: ``image`` (a file), ``text`` (one field per expression,
                     repeat it for several), optional ``model`` (a name from /models)
                     -> {"model", "width", "height", "results": [{"text", "score", "no_target",
                         "no_target_prob", "area", "point": [x, y], "bbox": [x, y, w, h] | null,
                         "rle": {"size": [H, W], "counts": str}, "mask_png": base64 PNG (0/255)}],
                         "timing_ms": {"decode", "model"}}

    400 missing_image, missing_text, bad_form (not multipart)   404 unknown_model
    413 request_too_large (body over ``max_upload_bytes``), image_too_large (over ``max_pixels``)
    415 not_an_image (unrecognised bytes)
    422 bad_image (undecodable), empty_text, bad_text (a file sent as 'text'), too_many_texts
    503 model_unavailable (a registered model failed to load)

Text fields are read as UTF-8; a field that is not valid UTF-8 is read as
Latin-1 (Starlette's rule), so it gets an answer, not an error. Expressions
of any length are accepted: the tokenizer keeps the first ``max_length``
tokens.

Load: the server listens on 127.0.0.1 unless told otherwise (``refseg demo
--host``). An upload's header is checked as soon as it has arrived (413 /
415 at once, whatever the queue), then at most ``max_concurrent`` REST
requests decode an image and run a model at once; the others wait in the
event loop with their upload spooled (to disk above 1 MiB), holding no
thread. Memory therefore stays bounded by about ``max_concurrent`` decoded
images of at most ``max_pixels`` each (plus one for the demo, whose
Gradio queue runs one request at a time). A slow or stalled upload holds
neither a thread nor a slot. The model names a request may give are only
those the server was started with: a name is never a path.

Masks are at the uploaded image's full resolution (EXIF orientation applied);
``rle`` is COCO RLE (column-major, pycocotools ``counts`` string). The demo at
``/`` runs the same code: upload an image, type expressions one per line,
pick a model; the examples are the test split of a SynthRef ``tiny`` data
set generated on first start into ``cache_dir`` (a few seconds).

Nothing is fetched from the network: Gradio analytics are off, the theme
uses local/system fonts, no share link is made.
"""

import asyncio
import base64
import io
import os
import threading
import time
from pathlib import Path
from typing import BinaryIO, Dict, List, Mapping, Optional, Sequence, Union

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported anywhere

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000
MAX_TEXTS = 32
MAX_CONCURRENT = 2
EXAMPLES_SEED = 0


def default_cache_dir() -> Path:
    """``$REFSEG_CACHE`` or ``~/.cache/refseg``."""
    return Path(os.environ.get("REFSEG_CACHE", Path.home() / ".cache" / "refseg"))


class ApiError(Exception):
    """A client error with its HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def open_image(data: Union[bytes, BinaryIO], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Parse only the header of an image file (bytes or a binary file object); no pixel is decoded.

    Raises ApiError: 400 empty, 415 not an image, 413 too many pixels.
    """
    if isinstance(data, (bytes, bytearray)):
        data = io.BytesIO(data)
    data.seek(0)
    if not data.read(1):
        raise ApiError(400, "missing_image", "the 'image' file is empty")
    data.seek(0)
    try:
        img = Image.open(data)
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_too_large", f"image has too many pixels ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ApiError(415, "not_an_image", "the 'image' file is not an image format Pillow can read") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ApiError(413, "image_too_large",
                       f"image is {w}x{h} = {w * h / 1e6:.1f} MP; the limit is {max_pixels / 1e6:g} MP")
    return img


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes of an image file -> (H, W, 3) uint8 RGB (EXIF orientation applied).

    The pixel count is checked from the header, before any pixel is decoded.
    Raises ApiError: 400 empty, 415 not an image, 413 too many pixels, 422 undecodable.
    """
    from refseg.data.image import ImageReadError, load_image_rgb

    img = open_image(data, max_pixels)
    try:
        img.load()
        return load_image_rgb(img)
    except (ImageReadError, OSError, SyntaxError, ValueError) as e:
        raise ApiError(422, "bad_image", f"the {img.format} image could not be decoded: {e}") from None


def parse_texts(values: Sequence[str]) -> List[str]:
    """Form values -> stripped expressions; raises ApiError when none, one empty, or too many."""
    if not values:
        raise ApiError(400, "missing_text", "give at least one 'text' field (one per expression)")
    if not all(isinstance(v, str) for v in values):
        raise ApiError(422, "bad_text", "'text' must be form fields, not files")
    texts = [v.strip() for v in values]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise ApiError(422, "empty_text", f"'text' field(s) {empty} are empty")
    if len(texts) > MAX_TEXTS:
        raise ApiError(422, "too_many_texts", f"{len(texts)} expressions; at most {MAX_TEXTS} per request")
    return texts


ModelSource = Union[str, Path, "torch.nn.Module"]  # noqa: F821


class ModelPool:
    """Predictors by name, each loaded on first use and guarded by its own lock.

    models: name -> a shipped model name, a checkpoint path, or a ready model
      (an ``nn.Module`` with encode_image / encode_text / decode).
    A Predictor caches one image, so ``segment`` holds the model's lock from
    ``set_image`` to the end of ``predict``.
    """

    def __init__(self, models: Mapping[str, ModelSource], default: str, mask_threshold: float = 0.5):
        if default not in models:
            raise KeyError(f"default model {default!r} is not among {list(models)}")
        self.sources = dict(models)
        self.default = default
        self.mask_threshold = mask_threshold
        self._predictors: Dict[str, object] = {}
        self._locks = {name: threading.Lock() for name in self.sources}

    def names(self) -> List[str]:
        return list(self.sources)

    def loaded(self) -> List[str]:
        return [n for n in self.sources if n in self._predictors]

    def preload(self, name: Optional[str] = None) -> None:
        """Load ``name`` (default: the default model) now rather than on its first request."""
        name = self.resolve(name)
        with self._locks[name]:
            self._predictor(name)

    def _predictor(self, name: str):
        """The Predictor of a resolved ``name``; the caller holds its lock."""
        from refseg.predictor import Predictor

        if name not in self._predictors:
            source = self.sources[name]
            if isinstance(source, (str, Path)):
                import refseg

                try:
                    source = refseg.load(source)
                except Exception as e:  # noqa: BLE001  (any load failure is the server's, reported as 503)
                    raise ApiError(503, "model_unavailable", f"model {name!r} failed to load: {e}") from None
            self._predictors[name] = Predictor(source, mask_threshold=self.mask_threshold)
        return self._predictors[name]

    def resolve(self, name: Optional[str]) -> str:
        """A registered model name (the default for None or ""); 404 for anything else, paths included."""
        name = (name or "").strip() or self.default
        if name not in self.sources:
            raise ApiError(404, "unknown_model", f"unknown model {name!r}; available: {self.names()}")
        return name

    def segment(self, name: Optional[str], rgb: np.ndarray, texts: Sequence[str]):
        """(H, W, 3) uint8 image + expressions -> refseg.predictor.Prediction, with the model's lock held."""
        name = self.resolve(name)
        with self._locks[name]:
            predictor = self._predictor(name)
            predictor.set_image(rgb)
            try:
                return predictor.predict(list(texts))
            finally:
                predictor.reset_image()  # do not keep the last upload in memory


def mask_record(mask: np.ndarray) -> dict:
    """(H, W) bool -> area, bbox [x, y, w, h] (None when empty), COCO RLE and a base64 0/255 PNG."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    bbox = None
    if xs.size:
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return {"area": int(mask.sum()), "bbox": bbox,
            "rle": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "mask_png": base64.b64encode(buf.getvalue()).decode("ascii")}


def segment_response(model: str, rgb: np.ndarray, texts: Sequence[str], pred, timing: dict) -> dict:
    results = []
    for k, text in enumerate(texts):
        results.append({"text": text, "score": round(float(pred.scores[k]), 4), "no_target": bool(pred.no_target[k]),
                        "no_target_prob": round(float(pred.no_target_prob[k]), 4),
                        "point": [int(v) for v in pred.points[k]], **mask_record(pred.masks[k])})
    return {"model": model, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "results": results,
            "timing_ms": timing}


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes`` on ``paths``.

    Checks Content-Length first, then counts the bytes actually received
    (chunked uploads), so an oversized body is never read whole.
    """

    class _TooLarge(Exception):
        pass

    def __init__(self, app, max_bytes: int, paths: Sequence[str]):
        self.app, self.max_bytes, self.paths = app, int(max_bytes), tuple(paths)

    async def _reject(self, send) -> None:
        from starlette.responses import JSONResponse

        msg = f"request body is over the {self.max_bytes / 2**20:g} MiB limit"
        response = JSONResponse({"error": {"code": "request_too_large", "message": msg}}, status_code=413)
        await response({"type": "http"}, None, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except self._TooLarge:
            if not started:
                await self._reject(send)


def ensure_examples(cache_dir: Union[str, Path], n_images: int = 4, per_image: int = 3) -> List[List[str]]:
    """[[image path, "expr\\nexpr"], ...] from the test split of a SynthRef tiny set, generated once into cache_dir."""
    from refseg.data import load_refer
    from refseg.data.synthref.generate import generate

    folder = Path(cache_dir) / f"synthref-natural-tiny-s{EXAMPLES_SEED}"
    if not (folder / "synthref.json").exists():
        try:
            generate(folder, domain="natural", preset="tiny", seed=EXAMPLES_SEED, workers=1)
        except FileExistsError:  # another process finished it first
            pass
    data = load_refer(folder)
    by_image: Dict[int, List[str]] = {}
    for s in data.samples("test"):
        texts = by_image.setdefault(s.image_id, [])
        if len(texts) < per_image and s.text not in texts:
            texts.append(s.text)
    examples = []
    for image_id, texts in list(by_image.items())[:n_images]:
        examples.append([str(data.images_dir / data.images[image_id]["file_name"]), "\n".join(texts)])
    return examples


def for_display(rgb: np.ndarray, masks: Sequence[np.ndarray], min_width: int = 512, max_side: int = 2048):
    """Image and masks resized for the demo's overlay: small images upscaled by an integer
    factor (nearest) so captions fit under them, huge ones shrunk to ``max_side``."""
    h, w = rgb.shape[:2]
    if w < min_width:
        k = -(-min_width // w)  # ceil
        grow = lambda a: np.repeat(np.repeat(a, k, axis=0), k, axis=1)  # noqa: E731
        return grow(rgb), [grow(m) for m in masks]
    if max(h, w) > max_side:
        size = (max(1, round(w * max_side / max(h, w))), max(1, round(h * max_side / max(h, w))))
        small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        return small, [np.asarray(Image.fromarray(m).resize(size, Image.Resampling.NEAREST)) for m in masks]
    return rgb, list(masks)


def build_demo(pool: ModelPool, examples: Sequence[Sequence[str]] = (), max_pixels: int = MAX_PIXELS):
    """The Gradio Blocks: image + expressions (one per line) + model -> captioned overlay and a table."""
    import gradio as gr

    from refseg.vis import overlay

    def run(image_path, text_block, model_name):
        if not image_path:
            raise gr.Error("Upload an image first.")
        texts = [line.strip() for line in (text_block or "").splitlines() if line.strip()]
        try:
            texts = parse_texts(texts)
            rgb = decode_image(Path(image_path).read_bytes(), max_pixels)
            pred = pool.segment(model_name, rgb, texts)
        except ApiError as e:
            raise gr.Error(e.message) from None
        captions = [f"{t}  [{'no target' if nt else f'score {s:.2f}'}]"
                    for t, s, nt in zip(texts, pred.scores, pred.no_target)]
        rows = [[t, round(float(s), 3), bool(nt), round(float(p), 3), int(m.sum())]
                for t, s, nt, p, m in zip(texts, pred.scores, pred.no_target, pred.no_target_prob, pred.masks)]
        return overlay(*for_display(rgb, list(pred.masks)), captions), rows

    with gr.Blocks(title="refseg demo", analytics_enabled=False) as demo:
        gr.Markdown("## refseg: referring image segmentation\nUpload an image, type what to segment "
                    "(one expression per line) and press **Segment**. "
                    "The REST API is at `POST /segment` (see `/health`, `/models`).")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                 elem_id="input-image")
                text = gr.Textbox(lines=3, label="Expressions (one per line)", placeholder="the red star\n"
                                  "the blue circle left of the green square", elem_id="expressions")
                model = gr.Dropdown(choices=pool.names(), value=pool.default, label="Model", elem_id="model")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                result = gr.Image(label="Result", format="png", interactive=False, elem_id="result")
                table = gr.Dataframe(headers=["expression", "score", "no target", "P(no target)", "area (px)"],
                                     interactive=False, elem_id="scores")
        if examples:
            gr.Examples(examples=[list(e) for e in examples], inputs=[image, text], cache_examples=False,
                        label="Examples (SynthRef tiny, test split)")
        button.click(run, [image, text, model], [result, table], api_name="segment")
        text.submit(run, [image, text, model], [result, table], api_name=False)
    return demo


def create_app(
    models: Optional[Mapping[str, ModelSource]] = None,
    default: Optional[str] = None,
    demo: bool = True,
    cache_dir: Union[str, Path, None] = None,
    examples: bool = True,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    mask_threshold: float = 0.5,
    max_concurrent: int = MAX_CONCURRENT,
):
    """The FastAPI app: the REST API, and the Gradio demo at ``/`` when ``demo``.

    models: name -> shipped name / checkpoint path / model object; default:
      every shipped model. default: the model used when a request names none
      (default: ``lts-synthref`` if present, else the first).
    cache_dir: where the demo's example data is generated (``default_cache_dir()``).
    max_concurrent: requests decoding + segmenting at once (see the module docstring).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    import refseg

    if models is None:
        models = {name: name for name in refseg.available_models()}
    if not models:
        raise ValueError("no model to serve: none is shipped in refseg/weights; pass a checkpoint path (--model PATH)")
    default = default or ("lts-synthref" if "lts-synthref" in models else next(iter(models)))
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
    pool = ModelPool(models, default, mask_threshold)
    shipped = set(refseg.available_models())

    app = FastAPI(title="refseg", version=refseg.__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.pool = pool
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes, paths=["/segment"])
    per_loop: Dict[int, asyncio.Semaphore] = {}

    def slots() -> asyncio.Semaphore:
        """The semaphore of the running event loop (one per loop: a test client may start several)."""
        loop = id(asyncio.get_running_loop())
        if loop not in per_loop:
            per_loop.clear()
            per_loop[loop] = asyncio.Semaphore(max_concurrent)
        return per_loop[loop]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status)

    @app.get("/health")
    def health():
        return {"status": "ok", "version": refseg.__version__, "default_model": pool.default, "loaded": pool.loaded()}

    @app.get("/models")
    def list_models():
        return {"default": pool.default,
                "models": [{"name": n, "shipped": n in shipped, "loaded": n in pool.loaded()} for n in pool.names()]}

    @app.post("/segment")
    async def segment(request: Request):
        try:
            form = await request.form(max_files=1, max_fields=4 * MAX_TEXTS)
        except BodyLimit._TooLarge:
            raise
        except Exception as e:  # noqa: BLE001  (malformed multipart, too many parts ...)
            raise ApiError(400, "bad_form", f"expected a multipart/form-data body: {e}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing_image", "no 'image' file in the form (multipart field 'image')")
        texts = parse_texts(form.getlist("text"))
        name = pool.resolve(form.get("model") if isinstance(form.get("model"), str) else None)

        await run_in_threadpool(open_image, upload.file, max_pixels)  # 400 / 413 / 415 now, not after the queue

        def work():  # in a worker thread, holding a slot: the upload is read and decoded only now
            start = time.perf_counter()
            upload.file.seek(0)
            rgb = decode_image(upload.file.read(), max_pixels)
            decoded = time.perf_counter()
            pred = pool.segment(name, rgb, texts)
            done = time.perf_counter()
            timing = {"decode": round((decoded - start) * 1e3, 1), "model": round((done - decoded) * 1e3, 1)}
            return segment_response(name, rgb, texts, pred, timing)

        async with slots():
            return await run_in_threadpool(work)

    if demo:
        import gradio as gr

        shown = ensure_examples(cache_dir or default_cache_dir()) if examples else []
        blocks = build_demo(pool, shown, max_pixels)
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"])
        app = gr.mount_gradio_app(app, blocks, path="/", footer_links=["api", "settings"], theme=theme,
                                  max_file_size=max_upload_bytes, ssr_mode=False, mcp_server=False)
    return app
