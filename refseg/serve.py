"""One server for refseg: a REST API and a Gradio demo in the same FastAPI app.

    app = create_app({"lts-synthref": "lts-synthref"})   # the models clients may name; the demo at /
    uvicorn.run(app, host="127.0.0.1", port=7860, **server_options())   # or: refseg demo

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
    408 request_timeout (the body did not arrive within ``body_timeout`` seconds)
    413 request_too_large (body over ``max_upload_bytes``), image_too_large (over ``max_pixels``)
    415 not_an_image (unrecognised bytes)
    422 bad_image (undecodable), empty_text, bad_text (a file sent as 'text'), text_too_long
        (over MAX_TEXT_CHARS characters), too_many_texts (over MAX_TEXTS, or more than
        ``max_work`` mask pixels in all: width x height x expressions)
    500 internal_error   503 model_unavailable (a model failed to load), model_failed (it gave NaN / inf)

Text fields are read as UTF-8; a field that is not valid UTF-8 is read as
Latin-1 (Starlette's rule), so it gets an answer, not an error.

Limits, the same on every route (REST and the demo's Gradio API):
  - every request body is at most ``max_upload_bytes`` (Content-Length, then
    the bytes counted as they arrive) and must arrive within ``body_timeout``
    seconds; a connection must send a complete request head within
    ``head_timeout`` seconds and is closed after ``keep_alive`` idle seconds
    (``server_options``);
  - an image's pixel count is read from its header before any pixel is
    decoded; expressions are at most MAX_TEXTS per request and
    MAX_TEXT_CHARS characters each, and width x height x expressions is at
    most ``max_work``;
  - at most ``max_concurrent`` requests (REST and demo together) decode an
    image and run a model at once; the others wait in the event loop holding
    no thread. A request's expressions run in chunks whose full-resolution
    logits fit in CHUNK_BYTES, each mask is encoded as soon as it is made, so
    one request's memory is about 3 bytes per pixel for the image plus a few
    times 4 bytes per pixel for the chunk, whatever the number of expressions;
  - the model names a request may give are only those the server was created
    with (``refseg demo --model A --model B``); a name is never a path.

The demo reads only what the client uploaded: uploads go to a private folder
(removed at shutdown; non-image uploads deleted at once, the rest after
UPLOAD_KEEP_S seconds), a file path sent through the Gradio API is accepted
only inside that folder (symlinks resolved), and the file routes serve
nothing else.

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
import contextlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Mapping, Optional, Sequence, Union

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported anywhere

import numpy as np
from PIL import Image

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000
MAX_TEXTS = 32
MAX_TEXT_CHARS = 1000
MAX_WORK = 400_000_000  # mask pixels per request: width x height x expressions
MAX_CONCURRENT = 2
CHUNK_BYTES = 64 * 2**20  # full-resolution float32 logits held at once per request
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5.0
UPLOAD_KEEP_S = 600
DEMO_QUEUE = 16
EXAMPLES_SEED = 0

log = logging.getLogger("refseg.serve")


def default_cache_dir() -> Path:
    """``$REFSEG_CACHE`` or ``~/.cache/refseg``."""
    return Path(os.environ.get("REFSEG_CACHE", Path.home() / ".cache" / "refseg"))


class ApiError(Exception):
    """A client error with its HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _json_error(status: int, code: str, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def open_image(data: Union[bytes, BinaryIO, str, Path], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Parse only the header of an image file (bytes, a binary file object or a path); no pixel is decoded.

    Raises ApiError: 400 empty, 415 not an image (whatever Pillow raises on the
    header), 413 too many pixels.
    """
    if isinstance(data, (str, Path)):
        data = io.BytesIO(Path(data).read_bytes())
    elif isinstance(data, (bytes, bytearray)):
        data = io.BytesIO(data)
    data.seek(0)
    if not data.read(1):
        raise ApiError(400, "missing_image", "the 'image' file is empty")
    data.seek(0)
    try:
        img = Image.open(data)
        w, h = (int(v) for v in img.size)
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_too_large", f"image has too many pixels ({e})") from None
    except Exception:  # noqa: BLE001  (a crafted header may raise anything in any of Pillow's parsers)
        raise ApiError(415, "not_an_image", "the 'image' file is not an image format Pillow can read") from None
    if w < 1 or h < 1:
        raise ApiError(422, "bad_image", f"the {img.format} image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ApiError(413, "image_too_large",
                       f"image is {w}x{h} = {w * h / 1e6:.1f} MP; the limit is {max_pixels / 1e6:g} MP")
    return img


def decode_image(data: Union[bytes, BinaryIO, str, Path], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB (EXIF orientation applied).

    The pixel count is checked from the header, before any pixel is decoded.
    Raises ApiError: 400 empty, 415 not an image, 413 too many pixels, 422 undecodable.
    """
    from refseg.data.image import load_image_rgb

    img = open_image(data, max_pixels)
    try:
        img.load()
        rgb = load_image_rgb(img)
    except MemoryError:
        raise ApiError(413, "image_too_large", f"the {img.format} image needs more memory than the server has") from None
    except Exception as e:  # noqa: BLE001  (a crafted body may raise anything in any of Pillow's decoders)
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ApiError(422, "bad_image", f"the {img.format} image could not be decoded: {msg}") from None
    if rgb.ndim != 3 or rgb.shape[0] * rgb.shape[1] > max_pixels:  # a decoder that disagrees with its header
        raise ApiError(422, "bad_image", f"the {img.format} image decodes to another size than its header says")
    return rgb


def parse_texts(values: Sequence[str]) -> List[str]:
    """Form values -> stripped expressions; ApiError when none, one empty or too long, or too many."""
    if not values:
        raise ApiError(400, "missing_text", "give at least one 'text' field (one per expression)")
    if not all(isinstance(v, str) for v in values):
        raise ApiError(422, "bad_text", "'text' must be form fields, not files")
    if len(values) > MAX_TEXTS:
        raise ApiError(422, "too_many_texts", f"{len(values)} expressions; at most {MAX_TEXTS} per request")
    texts = [v.strip() for v in values]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise ApiError(422, "empty_text", f"'text' field(s) {empty} are empty")
    long = [i for i, t in enumerate(texts) if len(t) > MAX_TEXT_CHARS]
    if long:
        raise ApiError(422, "text_too_long", f"'text' field(s) {long} are over {MAX_TEXT_CHARS} characters")
    return texts


def check_work(width: int, height: int, n_texts: int, max_work: int = MAX_WORK) -> None:
    """ApiError 422 when width x height x expressions is over ``max_work`` mask pixels."""
    if width * height * n_texts > max_work:
        most = max(1, max_work // max(1, width * height))
        raise ApiError(422, "too_many_texts", f"{n_texts} expressions on a {width}x{height} image; at most {most} "
                       f"on an image this size ({max_work / 1e6:g} MP of masks per request)")


ModelSource = Union[str, Path, "torch.nn.Module"]  # noqa: F821


class ModelPool:
    """Predictors by name, each loaded on first use and guarded by its own lock.

    models: name -> a shipped model name, a checkpoint path, or a ready model
      (an ``nn.Module`` with encode_image / encode_text / decode). Only these
      names can ever be loaded.
    A Predictor caches one image, so ``segment`` holds the model's lock from
    ``set_image`` to the end of the last expression.
    backend: "auto", "onnx", "torch" or None ($REFSEG_BACKEND, else "auto"); see refseg.backends.
    """

    def __init__(self, models: Mapping[str, ModelSource], default: str, mask_threshold: float = 0.5,
                 backend: Optional[str] = None):
        if default not in models:
            raise KeyError(f"default model {default!r} is not among {list(models)}")
        self.sources = dict(models)
        self.default = default
        self.mask_threshold = mask_threshold
        self.backend = backend
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
        from refseg.backends import load_predictor

        if name not in self._predictors:
            source = self.sources[name]
            try:
                predictor = load_predictor(source, backend=self.backend, mask_threshold=self.mask_threshold,
                                           report=log.warning, on_build=log.warning)
            except Exception as e:  # noqa: BLE001  (any load failure is the server's, reported as 503)
                if not isinstance(source, (str, Path)):
                    raise
                msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
                raise ApiError(503, "model_unavailable", f"model {name!r} failed to load: {msg}") from None
            self._predictors[name] = predictor
        return self._predictors[name]

    def resolve(self, name: Optional[str]) -> str:
        """A registered model name (the default for None or ""); 404 for anything else, paths included."""
        if name is not None and not isinstance(name, str):
            raise ApiError(422, "bad_model", "'model' must be a model name (a string)")
        name = (name or "").strip() or self.default
        if name not in self.sources:
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise ApiError(404, "unknown_model", f"unknown model {shown!r}; available: {self.names()}")
        return name

    def segment(self, name: Optional[str], rgb: np.ndarray, texts: Sequence[str], each: Callable) -> list:
        """Segment ``texts`` in ``rgb`` (H, W, 3) uint8 with the model's lock held; returns [each(...)] in order.

        each(text, mask (H, W) bool, score, no_target, no_target_prob, point (x, y)) is called for one
        expression as soon as its chunk is done, so only one chunk's full-resolution logits (at most
        CHUNK_BYTES, or one expression's) exist at a time. ApiError 503 model_failed when the model's
        outputs are not finite.
        """
        from refseg.predictor import ModelOutputError

        name = self.resolve(name)
        h, w = rgb.shape[:2]
        per_chunk = max(1, CHUNK_BYTES // (4 * h * w))
        out = []
        with self._locks[name]:
            predictor = self._predictor(name)
            try:
                predictor.set_image(rgb)
                for start in range(0, len(texts), per_chunk):
                    chunk = list(texts[start : start + per_chunk])
                    pred = predictor.predict(chunk)
                    if not (np.isfinite(pred.no_target_prob).all() and np.isfinite(pred.logits).all()):
                        raise ApiError(503, "model_failed", f"model {name!r} gave non-finite outputs (NaN or inf) "
                                       "for this image")
                    for k, text in enumerate(chunk):
                        out.append(each(text, pred.masks[k], float(pred.scores[k]), bool(pred.no_target[k]),
                                        float(pred.no_target_prob[k]), [int(v) for v in pred.points[k]]))
                    del pred
            except ModelOutputError as e:
                raise ApiError(503, "model_failed", f"model {name!r} failed on this image: "
                               f"{str(e).splitlines()[0][:200]}") from None
            finally:
                predictor.reset_image()  # do not keep the last upload in memory
        return out


def mask_record(mask: np.ndarray) -> dict:
    """(H, W) bool -> area, bbox [x, y, w, h] (None when empty), COCO RLE and a base64 0/255 PNG.

    Uses about one extra byte per pixel (no per-pixel index arrays).
    """
    from pycocotools import mask as mask_utils

    mask = np.ascontiguousarray(mask, dtype=bool)
    rle = mask_utils.encode(np.asfortranarray(mask.view(np.uint8)))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    bbox = None
    if cols.size:
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    buf = io.BytesIO()
    Image.fromarray(mask).convert("L").save(buf, format="PNG")
    return {"area": int(np.count_nonzero(mask)), "bbox": bbox,
            "rle": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "mask_png": base64.b64encode(buf.getvalue()).decode("ascii")}


def result_record(text: str, mask: np.ndarray, score: float, no_target: bool, no_target_prob: float,
                  point: list) -> dict:
    """One expression's entry of a /segment answer."""
    return {"text": text, "score": round(score, 4), "no_target": no_target,
            "no_target_prob": round(no_target_prob, 4), "point": point, **mask_record(mask)}


class RequestGuard:
    """ASGI middleware, on every HTTP route: 413 for a body over ``max_bytes``, 408 for one slower than ``timeout`` s.

    Checks Content-Length first, then counts the bytes actually received
    (chunked uploads), so an oversized body is never read whole; the deadline
    runs from the start of the request to the body's last byte (a stalled
    upload is answered and its connection closed).
    """

    class _TooLarge(Exception):
        pass

    class _TooSlow(Exception):
        pass

    def __init__(self, app, max_bytes: int, timeout: float = BODY_TIMEOUT_S):
        self.app, self.max_bytes, self.timeout = app, int(max_bytes), float(timeout)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            msg = f"request body is over the {self.max_bytes / 2**20:g} MiB limit"
            return await _json_error(413, "request_too_large", msg)(scope, receive, send)
        seen, started, done = 0, False, False
        deadline = time.monotonic() + self.timeout

        async def guarded_receive():
            nonlocal seen, done
            if done:  # the body is in: what follows is waiting for a disconnect, with no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise self._TooSlow() from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._TooLarge()
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except self._TooLarge:
            if not started:
                msg = f"request body is over the {self.max_bytes / 2**20:g} MiB limit"
                await _json_error(413, "request_too_large", msg)(scope, receive, send)
        except self._TooSlow:
            if not started:
                msg = f"the request body did not arrive within {self.timeout:g} s"
                response = _json_error(408, "request_timeout", msg)
                response.headers["connection"] = "close"
                await response(scope, receive, send)


def server_options(head_timeout: float = HEAD_TIMEOUT_S, keep_alive: float = KEEP_ALIVE_S,
                   max_connections: Optional[int] = None) -> dict:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` that bound connections.

    An h11 protocol that closes a connection whose request head is not complete
    within ``head_timeout`` seconds (uvicorn itself waits forever), idle
    keep-alive connections closed after ``keep_alive`` s, request heads of at
    most 16 KiB, and requests beyond ``max_connections`` open connections
    answered 503 (default: the open-file limit less a reserve, which
    ``raise_open_file_limit`` raises to the hard limit).
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineH11(H11Protocol):
        """uvicorn's h11 protocol with a deadline on each request head."""

        _head_timer = None
        _head_cycle = None

        def _arm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            cycle = self._head_cycle = self.cycle

            def expire():
                self._head_timer = None
                if self.cycle is cycle and not self.transport.is_closing():  # no new request began: close
                    self.transport.close()

            self._head_timer = self.loop.call_later(head_timeout, expire)

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing() and (self._head_timer is None or self._head_cycle is not self.cycle):
                self._arm_head_deadline()

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    if max_connections is None:
        try:
            import resource

            max_connections = max(16, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 128)
        except (ImportError, OSError, ValueError):
            max_connections = 1000
    return {"http": HeadDeadlineH11, "timeout_keep_alive": keep_alive, "limit_concurrency": max_connections,
            "h11_max_incomplete_event_size": 16 * 1024}


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (where allowed); returns the soft limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return -1


def _inside(path: Union[str, Path], folder: Path) -> bool:
    """True when ``path``, symlinks resolved, is ``folder`` or lies inside it (``folder`` already resolved)."""
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError):
        return False
    return real == folder or folder in real.parents


class UploadGuard:
    """ASGI middleware for the demo's Gradio routes: they read and serve only this server's own uploads.

    - the file routes (``/gradio_api/file=...``, ``/file/...``, ``/proxy=...``) answer 404 for
      any path outside ``folder`` (symlinks and ``..`` resolved) and for URLs;
    - ``/gradio_api/upload`` is refused (507) while ``folder`` holds over ``quota`` bytes, and an
      upload that is not an image (header only, as for /segment) is deleted at once and answered
      415 / 413 / 400 as /segment would.
    """

    FILE_MARKERS = ("/file=", "/file/", "/proxy=")

    def __init__(self, app, folder: Path, quota: int, max_pixels: int):
        self.app, self.folder, self.quota, self.max_pixels = app, Path(folder), int(quota), int(max_pixels)

    def _used(self) -> int:
        total = 0
        for root, _, files in os.walk(self.folder):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, f)).st_size
        return total

    def _remove(self, path: str) -> None:
        if not _inside(path, self.folder):
            return
        with contextlib.suppress(OSError):
            os.remove(path)
        parent = Path(path).parent
        if parent != self.folder and _inside(parent, self.folder):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        for marker in self.FILE_MARKERS:
            at = path.find(marker)
            if at >= 0 and (at == 0 or path[:at] in ("/gradio_api", "/api")):
                target = path[at + len(marker):]
                if marker == "/proxy=" or "://" in target or not _inside(target, self.folder):
                    return await _json_error(404, "not_found", "no such file")(scope, receive, send)
                return await self.app(scope, receive, send)
        if path.rstrip("/") != "/gradio_api/upload" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self._used() > self.quota:
            return await _json_error(507, "upload_quota", "the server's upload space is full; try again later")(
                scope, receive, send)
        start, chunks = None, []

        async def capture(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start is None:
            return
        if start["status"] == 200:
            try:
                paths = [p for p in json.loads(body) if isinstance(p, str)]
            except ValueError:
                paths = []
            for p in paths:
                try:
                    if not _inside(p, self.folder):
                        raise ApiError(400, "bad_upload", "the upload was not stored in the upload folder")
                    open_image(p, self.max_pixels)
                except ApiError as e:
                    for q in paths:
                        self._remove(q)
                    return await _json_error(e.status, e.code, e.message)(scope, receive, send)
        await send(start)
        await send({"type": "http.response.body", "body": body})


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


def display_resizer(h: int, w: int, min_width: int = 512, max_side: int = 2048) -> Callable:
    """f(array, nearest) resizing an (h, w[, 3]) image or mask for the demo's overlay: small images
    upscaled by an integer factor (nearest) so captions fit under them, huge ones shrunk to ``max_side``."""
    if w < min_width:
        k = -(-min_width // w)  # ceil
        return lambda a, nearest=True: np.repeat(np.repeat(a, k, axis=0), k, axis=1)
    if max(h, w) > max_side:
        size = (max(1, round(w * max_side / max(h, w))), max(1, round(h * max_side / max(h, w))))

        def shrink(a, nearest=True):
            img = Image.fromarray(a)
            if img.mode == "1":
                return np.asarray(img.convert("L").resize(size, Image.Resampling.NEAREST)) > 127
            return np.asarray(img.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR))

        return shrink
    return lambda a, nearest=True: a


def for_display(rgb: np.ndarray, masks: Sequence[np.ndarray], min_width: int = 512, max_side: int = 2048):
    """Image and masks resized for the demo's overlay (see ``display_resizer``)."""
    resize = display_resizer(*rgb.shape[:2], min_width=min_width, max_side=max_side)
    return resize(rgb, False), [resize(m) for m in masks]


def build_demo(pool: ModelPool, examples: Sequence[Sequence[str]] = (), segment: Optional[Callable] = None):
    """The Gradio Blocks: image + expressions (one per line) + model -> captioned overlay and a table.

    segment: ``async (image payload, text block, model name) -> (overlay, rows)``, the handler;
    it receives the raw inputs (no Gradio preprocessing) and must validate them (``create_app``'s does).
    """
    import gradio as gr

    with gr.Blocks(title="refseg demo", analytics_enabled=False, delete_cache=(60, UPLOAD_KEEP_S)) as demo:
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
        if segment is not None:
            # preprocess=False: Gradio neither opens nor decodes the upload; the handler checks it first
            button.click(segment, [image, text, model], [result, table], api_name="segment", preprocess=False)
            text.submit(segment, [image, text, model], [result, table], api_name=False, preprocess=False)
    return demo


_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "object", "required": ["code", "message"],
                 "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
_RESULT_SCHEMA = {
    "type": "object",
    "required": ["text", "score", "no_target", "no_target_prob", "point", "area", "bbox", "rle", "mask_png"],
    "properties": {
        "text": {"type": "string", "description": "the expression, as sent"},
        "score": {"type": "number", "description": "mean foreground probability inside the mask (0 if empty)"},
        "no_target": {"type": "boolean", "description": "the model's decision that the expression names nothing"},
        "no_target_prob": {"type": "number"},
        "point": {"type": "array", "items": {"type": "integer"}, "description": "[x, y] of the response map's peak"},
        "area": {"type": "integer", "description": "mask pixels"},
        "bbox": {"type": ["array", "null"], "items": {"type": "integer"}, "description": "[x, y, w, h] or null"},
        "rle": {"type": "object", "description": "COCO RLE of the mask: size [h, w], compressed counts",
                "properties": {"size": {"type": "array", "items": {"type": "integer"}}, "counts": {"type": "string"}}},
        "mask_png": {"type": "string", "description": "base64 of a 0/255 PNG of the mask"},
    },
}
SEGMENT_OPENAPI = {  # /segment reads its multipart form itself (limits first), so its schema is written out here
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "text"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "one image file (any format Pillow reads)"},
            "text": {"type": "array", "items": {"type": "string"},
                     "description": f"expressions, one form field each (at most {MAX_TEXTS})"},
            "model": {"type": "string", "description": "a model the server was started with (default: its first)"},
        }}}}},
    "responses": {
        "200": {"description": "one result per expression", "content": {"application/json": {"schema": {
            "type": "object", "required": ["model", "width", "height", "results", "timing_ms"],
            "properties": {"model": {"type": "string"}, "width": {"type": "integer"}, "height": {"type": "integer"},
                           "results": {"type": "array", "items": _RESULT_SCHEMA},
                           "timing_ms": {"type": "object", "additionalProperties": {"type": "number"}}}}}}},
        "4XX": {"description": "bad input (400 form, 413 too large, 415 not an image, 422 limits)",
                "content": {"application/json": {"schema": _ERROR_SCHEMA}}},
        "5XX": {"description": "the model failed (503 model_failed) or the server did (500)",
                "content": {"application/json": {"schema": _ERROR_SCHEMA}}},
    },
}


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
    max_work: int = MAX_WORK,
    body_timeout: float = BODY_TIMEOUT_S,
    backend: Optional[str] = None,
):
    """The FastAPI app: the REST API, and the Gradio demo at ``/`` when ``demo``.

    models: name -> shipped name / checkpoint path / model object: the only
      models requests may name (default: the shipped ``lts-synthref``, or the
      first shipped model). default: the model used when a request names none
      (default: ``lts-synthref`` if present, else the first).
    cache_dir: where the demo's example data is generated (``default_cache_dir()``).
    max_concurrent: requests decoding + segmenting at once, REST and demo together.
    max_work: mask pixels per request (width x height x expressions).
    body_timeout: seconds within which a request body must have arrived (408).
    backend: the predictors' backend (refseg.backends: "auto", "onnx", "torch"; None: $REFSEG_BACKEND, else auto).
    See the module docstring for the limits.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    import refseg

    if models is None:
        shipped_names = refseg.available_models()
        first = "lts-synthref" if "lts-synthref" in shipped_names else next(iter(shipped_names), None)
        models = {first: first} if first else {}
    if not models:
        raise ValueError("no model to serve: none is shipped in refseg/weights; pass a checkpoint path (--model PATH)")
    default = default or ("lts-synthref" if "lts-synthref" in models else next(iter(models)))
    for name, value in (("max_concurrent", max_concurrent), ("max_upload_bytes", max_upload_bytes),
                        ("max_pixels", max_pixels), ("max_work", max_work)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if not (isinstance(body_timeout, (int, float)) and math.isfinite(body_timeout) and body_timeout > 0):
        raise ValueError(f"body_timeout must be a number of seconds > 0, got {body_timeout!r}")
    pool = ModelPool(models, default, mask_threshold, backend=backend)
    shipped = set(refseg.available_models())

    app = FastAPI(title="refseg", version=refseg.__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.pool = pool
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

    def run_model(name: str, source, texts: List[str], each: Callable) -> tuple:
        """In a worker thread holding a slot: decode ``source`` (bytes, file or path), segment; (rgb, records, timing)."""
        start = time.perf_counter()
        rgb = decode_image(source, max_pixels)
        decoded = time.perf_counter()
        try:
            records = pool.segment(name, rgb, texts, lambda *a: each(rgb, *a))
        except ApiError:
            raise
        except Exception:  # noqa: BLE001  (logged here; the client gets a JSON 500, never a traceback)
            log.exception("segment failed")
            raise ApiError(500, "internal_error", "the server failed on this request; it was logged") from None
        done = time.perf_counter()
        return rgb, records, {"decode": round((decoded - start) * 1e3, 1), "model": round((done - decoded) * 1e3, 1)}

    @app.post("/segment", summary="Segment what each expression names in an image",
              openapi_extra=SEGMENT_OPENAPI)
    async def segment(request: Request):
        try:
            form = await request.form(max_files=1, max_fields=4 * MAX_TEXTS)
        except (RequestGuard._TooLarge, RequestGuard._TooSlow):
            raise
        except Exception as e:  # noqa: BLE001  (malformed multipart, too many parts ...)
            raise ApiError(400, "bad_form", f"expected a multipart/form-data body: {e}") from None
        try:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "missing_image", "no 'image' file in the form (multipart field 'image')")
            texts = parse_texts(form.getlist("text"))
            name = pool.resolve(form.get("model") if isinstance(form.get("model"), str) else None)
            img = await run_in_threadpool(open_image, upload.file, max_pixels)  # 4xx now, not after the queue
            check_work(*img.size, len(texts), max_work)

            def work():
                upload.file.seek(0)
                rgb, results, timing = run_model(name, upload.file, texts,
                                                 lambda rgb, *a: result_record(*a))
                return {"model": name, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "results": results,
                        "timing_ms": timing}

            async with slots():
                return await run_in_threadpool(work)
        finally:
            await form.close()  # the spooled upload is deleted now, not when collected

    if not demo:
        app.add_middleware(RequestGuard, max_bytes=max_upload_bytes, timeout=body_timeout)
        return app

    import gradio as gr

    from refseg.vis import overlay

    upload_dir = Path(tempfile.mkdtemp(prefix="refseg-demo-", dir=os.environ.get("REFSEG_DEMO_TMP"))).resolve()
    # Gradio stores uploads, example copies and results under GRADIO_TEMP_DIR (read when a Blocks and its
    # routes are made, and when a client's file path is checked): this app's private folder
    os.environ["GRADIO_TEMP_DIR"] = str(upload_dir)
    app.state.upload_dir = upload_dir

    async def segment_demo(image, text_block, model_name):
        """The demo's handler: raw inputs (no Gradio preprocessing) -> (overlay, table rows); gr.Error on bad input."""
        try:
            path = image.get("path") if isinstance(image, dict) else None
            if image is None or path is None:
                raise ApiError(400, "missing_image", "Upload an image first.")
            if not isinstance(path, str) or not _inside(path, upload_dir) or not os.path.isfile(path):
                raise ApiError(403, "not_uploaded", "Only an image uploaded to this page can be segmented; "
                               "upload it again.")
            if not isinstance(text_block, str):
                raise ApiError(422, "bad_text", "The expressions must be text.")
            texts = parse_texts([line for line in text_block.splitlines() if line.strip()][: MAX_TEXTS + 1])
            name = pool.resolve(model_name)
            img = await run_in_threadpool(open_image, path, max_pixels)
            check_work(*img.size, len(texts), max_work)
            shown: list = []

            def each(rgb, text, mask, score, no_target, no_target_prob, point):
                if not shown:
                    shown.append(display_resizer(*rgb.shape[:2]))
                return text, score, no_target, no_target_prob, int(np.count_nonzero(mask)), shown[0](mask)

            def work():
                rgb, rows, _ = run_model(name, path, texts, each)
                captions = [f"{t}  [{'no target' if nt else f'score {s:.2f}'}]" for t, s, nt, *_ in rows]
                picture = overlay(shown[0](rgb, False), [r[-1] for r in rows], captions)
                return picture, [[t, round(s, 3), nt, round(p, 3), area] for t, s, nt, p, area, _ in rows]

            async with slots():
                return await run_in_threadpool(work)
        except ApiError as e:
            raise gr.Error(e.message) from None

    shown_examples = ensure_examples(cache_dir or default_cache_dir()) if examples else []
    blocks = build_demo(pool, shown_examples, segment_demo)
    blocks.queue(max_size=DEMO_QUEUE, api_open=False)  # no /run/ route (it answers errors with HTTP 500)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    app = gr.mount_gradio_app(app, blocks, path="/", footer_links=["api", "settings"], theme=theme,
                              max_file_size=max_upload_bytes, ssr_mode=False, mcp_server=False,
                              allowed_paths=[], blocked_paths=[])
    # Gradio checks the file paths a client sends (only its upload folder) once its app counts as launched;
    # a mounted app never is, so it is marked so here
    blocks.has_launched = True
    app.add_middleware(UploadGuard, folder=upload_dir, quota=64 * max_upload_bytes, max_pixels=max_pixels)
    app.add_middleware(RequestGuard, max_bytes=max_upload_bytes, timeout=body_timeout)
    app.state.upload_dir = upload_dir
    app.state.pool = pool
    weakref.finalize(app, shutil.rmtree, str(upload_dir), True)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a):
        try:
            async with inner(a) as state:
                yield state
        finally:
            shutil.rmtree(upload_dir, ignore_errors=True)

    app.router.lifespan_context = lifespan
    return app
