"""jdit: diffusion transformers in JAX/Flax."""

from jdit import models, nn, weights

__version__ = "0.1.0"
__all__ = ["models", "nn", "weights", "__version__"]
