"""refseg: referring image segmentation under every supervision budget.

    import refseg
    predictor = refseg.load_predictor("lts-synthref")  # ONNX Runtime when installed, else PyTorch
    predictor.set_image("photo.jpg")
    masks = predictor.predict("the red star left of the blue circle").masks

    model = refseg.load("lts-synthref")            # the PyTorch model (training, export, any device)
    predictor = refseg.Predictor(model)            # the PyTorch backend
"""

from refseg.hub import available_models, load

__version__ = "0.1.0"

__all__ = ["available_models", "load", "load_predictor", "Predictor", "__version__"]


def __getattr__(name):
    # Predictor and load_predictor pull in torch or onnxruntime; import them on first use.
    if name == "Predictor":
        from refseg.predictor import Predictor

        return Predictor
    if name == "load_predictor":
        from refseg.backends import load_predictor

        return load_predictor
    raise AttributeError(f"module 'refseg' has no attribute {name!r}")
