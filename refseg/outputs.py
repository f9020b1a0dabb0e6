"""Writing a command's output files: never over an input, never half a set, modes from the umask.

Every file a command writes goes through an OutputSet. Outputs are planned
before any heavy work, so a bad name costs nothing and writes nothing:

    outs = OutputSet(inputs=[("--image", "photo.png")])
    outs.plan("overlay.jpg", "--out", image="rgb")   # OutputError now if it is an input,
    outs.plan("mask.png", "--mask-out", image="mask")  # collides, or has a suffix Pillow
    ...                                               # cannot write (lossy: masks refused)
    with outs:                                        # inside: each file goes to a hidden temp
        outs.save_image("overlay.jpg", overlay_img)   # file beside its destination
        outs.save_image("mask.png", mask_img)
    # leaving the block renames every temp file into place; an exception removes them all

A planned output is refused when it is the same file as an input (same path,
through a symlink or a hard link), when it replaces an existing file inside
an input folder, when two planned outputs name the same file (compared
case-insensitively: they would collide on macOS and Windows), or when it is
an existing folder. Files end up with mode 0o666 & ~umask, like any other
tool's (a temp file from mkstemp is 0o600).
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

PathLike = Union[str, os.PathLike]

# formats whose pixels read back exactly (WEBP saved with lossless=True): a mask must use one
LOSSLESS = {"PNG", "BMP", "DIB", "TIFF", "GIF", "PPM", "TGA", "WEBP", "SGI", "PCX", "IM", "QOI"}


class OutputError(ValueError):
    """An output that would overwrite an input or another output, or that cannot be written as named."""


def file_mode() -> int:
    """0o666 & ~umask: the mode a new file gets from open()."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@functools.lru_cache(maxsize=None)
def _probe(fmt: str, kind: str, options: tuple) -> Optional[str]:
    """None if Pillow writes a `kind` image as `fmt`, else why not."""
    from PIL import Image

    try:
        Image.new("L" if kind == "mask" else "RGB", (2, 2)).save(io.BytesIO(), format=fmt, **dict(options))
    except Exception as e:  # noqa: BLE001  (any failure means this format cannot hold the image)
        return str(e) or type(e).__name__
    return None


def image_format(path: PathLike, kind: str = "rgb", label: str = "output") -> Tuple[str, dict]:
    """(Pillow format, save options) that the suffix of `path` names.

    kind: "rgb" (an overlay; any format Pillow writes RGB in) or "mask" (a
    0/255 grey mask; lossless formats only). Raises OutputError naming the
    flag and the path for an unknown suffix, a lossy format for a mask, or a
    format that cannot hold the image.
    """
    from PIL import Image

    path = Path(path)
    Image.init()
    ext = path.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        hint = ".png" if kind == "mask" else ".png or .jpg"
        what = f"suffix {ext!r}" if ext else "no suffix"
        raise OutputError(f"{label} {path}: {what} names no image format Pillow can write; use {hint}")
    if kind == "mask" and fmt not in LOSSLESS:
        raise OutputError(f"{label} {path}: {fmt} is lossy and would change the mask's pixels; use .png")
    options = {"lossless": True} if fmt == "WEBP" and kind == "mask" else {"quality": 95} if fmt == "JPEG" else {}
    why = _probe(fmt, kind, tuple(sorted(options.items())))
    if why is not None:
        raise OutputError(f"{label} {path}: Pillow cannot write this image as {fmt} ({why})")
    return fmt, options


def _key(path: Path) -> str:
    """A name for collision checks: the absolute path with its folder resolved, case-folded."""
    return os.path.normcase(str(path.parent.resolve() / path.name)).casefold()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def model_inputs(label: str, name_or_path: PathLike) -> Tuple[list, list]:
    """(files, folders) a model argument reads: a checkpoint file and its JSON card, or a run/checkpoint folder."""
    path = Path(name_or_path)
    if path.is_dir():
        return [], [(label, path)]
    if path.is_file():
        files = [(label, path)]
        card = path.with_suffix(".json")
        return (files + [(label, card)] if card.is_file() and card != path else files), []
    return [], []


class OutputSet:
    """The files one command writes, written all-or-nothing (see the module docstring).

    inputs: (label, path) of files the command reads. input_folders: (label,
    folder) whose existing files must not be replaced. Labels name the flag
    in error messages ("--image", "--data").
    """

    def __init__(self, inputs: Iterable[Tuple[str, PathLike]] = (),
                 input_folders: Iterable[Tuple[str, PathLike]] = ()):
        self.inputs = [(label, Path(p)) for label, p in inputs if p is not None]
        self.input_folders = [(label, Path(p)) for label, p in input_folders if p is not None]
        self._planned: Dict[str, Tuple[Path, str, Optional[str]]] = {}  # key -> (path, label, image kind)
        self._temps: Dict[str, str] = {}  # key -> temp file written
        self._made_dirs: List[Path] = []

    # ---- planning ----------------------------------------------------------------------------

    def plan(self, path: PathLike, label: str, image: Optional[str] = None) -> Path:
        """Register an output; raises OutputError if it may not be written (see the module docstring).

        label: who asks for it, for messages ("--out", "image 'a.png'").
        image: None (any bytes), "rgb" or "mask" (checked with image_format).
        """
        path = Path(path)
        if os.path.lexists(path):
            for in_label, p in self.inputs:
                if _same(path, p):
                    raise OutputError(f"{label} {path} is the input {in_label} {p}; refusing to overwrite it")
            for in_label, folder in self.input_folders:
                if _inside(path, folder):
                    raise OutputError(f"{label} {path} would replace a file in the input folder "
                                      f"{in_label} {folder}; write the outputs elsewhere")
        if path.is_dir():
            raise OutputError(f"{label} {path}: is a folder, not a file")
        key = _key(path)
        if key in self._planned:
            other = self._planned[key][1]
            raise OutputError(f"{other} and {label} would both write {path}")
        if image is not None:
            image_format(path, image, label)
        self._planned[key] = (path, label, image)
        return path

    # ---- writing -------------------------------------------------------------------------------

    def _temp(self, path: PathLike) -> str:
        path = Path(path)
        key = _key(path)
        if key not in self._planned:
            self.plan(path, "output")
        missing = []
        for parent in [path.parent, *path.parent.parents]:
            if parent.exists():
                break
            missing.append(parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._made_dirs.extend(reversed(missing))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        old = self._temps.pop(key, None)
        if old:
            Path(old).unlink(missing_ok=True)
        self._temps[key] = tmp
        return tmp

    def save_image(self, path: PathLike, img) -> None:
        """Write a PIL image in the format its suffix names (planned now as an overlay if it was not)."""
        key = _key(Path(path))
        if key not in self._planned:
            self.plan(path, "output", image="rgb")
        _, _, kind = self._planned[key]
        fmt, options = image_format(path, kind or "rgb")
        img.save(self._temp(path), format=fmt, **options)

    def write_bytes(self, path: PathLike, data: bytes) -> None:
        Path(self._temp(path)).write_bytes(data)

    def write_text(self, path: PathLike, text: str) -> None:
        Path(self._temp(path)).write_text(text, encoding="utf-8")

    def open_text(self, path: PathLike):
        """A text file object (UTF-8) on the output's temp file; close it before commit."""
        return open(self._temp(path), "w", encoding="utf-8")

    def write_with(self, path: PathLike, write) -> None:
        """`write(tmp_path)` fills the output's temp file (for writers that take a file name)."""
        write(self._temp(path))

    # ---- finishing -----------------------------------------------------------------------------

    def commit(self) -> List[Path]:
        """Rename every written temp file into place (mode 0o666 & ~umask); returns the paths."""
        mode = file_mode()
        done = []
        try:
            for key, tmp in list(self._temps.items()):
                os.chmod(tmp, mode)
            for key, tmp in list(self._temps.items()):
                path = self._planned[key][0]
                os.replace(tmp, path)
                del self._temps[key]
                done.append(path)
        except BaseException:
            self.abort()
            raise
        return done

    def abort(self) -> None:
        """Remove every temp file and the folders this set created (if empty)."""
        for tmp in self._temps.values():
            Path(tmp).unlink(missing_ok=True)
        self._temps.clear()
        for folder in reversed(self._made_dirs):
            try:
                folder.rmdir()
            except OSError:
                pass
        self._made_dirs.clear()

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(str(a.resolve())) == os.path.normcase(str(b.resolve()))


def write_file(path: PathLike, write, inputs: Iterable[Tuple[str, PathLike]] = (), label: str = "output") -> Path:
    """One file written atomically: `write(tmp_path)` fills a temp file beside `path`, renamed into place."""
    outs = OutputSet(inputs)
    outs.plan(path, label)
    with outs:
        outs.write_with(path, write)
    return Path(path)


def write_text(path: PathLike, text: str, inputs: Iterable[Tuple[str, PathLike]] = (), label: str = "output") -> Path:
    """One text file (UTF-8) written atomically (see write_file)."""
    return write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), inputs, label)


def save_image(img, path: PathLike, kind: str = "rgb", inputs: Iterable[Tuple[str, PathLike]] = (),
               label: str = "output") -> Path:
    """One image written atomically, in the format its suffix names (kind "mask": lossless only)."""
    outs = OutputSet(inputs)
    outs.plan(path, label, image=kind)
    with outs:
        outs.save_image(path, img)
    return Path(path)


def check_folder_output(folder: PathLike, inputs: Iterable[Tuple[str, Optional[PathLike]]],
                        label: str = "--out") -> None:
    """Refuse an output folder that is an input or holds one (replacing it would delete the input).

    inputs: (label, path) of files or folders read; None paths are skipped.
    """
    out = Path(folder).resolve()
    for in_label, p in inputs:
        if p is None:
            continue
        resolved = Path(p).resolve()
        if resolved == out or out in resolved.parents:
            raise OutputError(f"{label} {folder} would replace the input {in_label} {p}; write it elsewhere")
