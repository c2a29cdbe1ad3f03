"""jdit: diffusion transformers in JAX/Flax."""

from jdit import diffusion, models, nn, sampling, text, weights

__version__ = "0.1.0"
__all__ = ["autoencoders", "diffusion", "models", "nn", "pipelines", "sampling", "text",
           "weights", "__version__"]


def __getattr__(name: str):
    # The autoencoders and pipelines load on first use (they pull in more than models need).
    if name in ("autoencoders", "pipelines"):
        import importlib

        return importlib.import_module(f"jdit.{name}")
    raise AttributeError(f"module 'jdit' has no attribute {name!r}")
