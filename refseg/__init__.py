"""refseg: referring image segmentation under every supervision budget.

    import refseg
    model = refseg.load("lts-synthref")
    predictor = refseg.Predictor(model)
    predictor.set_image("photo.jpg")
    masks = predictor.predict("the red star left of the blue circle").masks
"""

from refseg.hub import available_models, load

__version__ = "0.1.0"

__all__ = ["available_models", "load", "Predictor", "__version__"]


def __getattr__(name):
    # Predictor pulls in torch and the image stack; import it on first use.
    if name == "Predictor":
        from refseg.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'refseg' has no attribute {name!r}")
