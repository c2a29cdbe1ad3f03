"""jdit: diffusion transformers in JAX/Flax."""

from jdit import diffusion, models, nn, sampling, weights

__version__ = "0.1.0"
__all__ = ["diffusion", "models", "nn", "sampling", "weights", "__version__"]
