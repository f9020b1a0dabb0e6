"""refseg: referring image segmentation under every supervision budget."""

__version__ = "0.1.0"
