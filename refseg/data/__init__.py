"""refer-format data: loading, images, letterboxing and the torch Dataset.

`RefSegDataset` and `collate` need torch; they are imported on first use so
that light commands (`refseg stats`, `refseg make-data`) start without it.
"""

from refseg.data.image import ImageReadError, load_image_rgb
from refseg.data.refer import ReferData, ReferFileNotFoundError, ReferFormatError, Sample, load_refer
from refseg.data.transforms import Letterbox, LetterboxParams

__all__ = [
    "ImageReadError",
    "Letterbox",
    "LetterboxParams",
    "ReferData",
    "ReferFileNotFoundError",
    "ReferFormatError",
    "RefSegDataset",
    "Sample",
    "collate",
    "load_image_rgb",
    "load_refer",
]


def __getattr__(name):
    if name in ("RefSegDataset", "collate"):
        from refseg.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'refseg.data' has no attribute {name!r}")
