"""Parameters of a module from its own example inputs: real arrays, or only their shapes.

Every jdit module (models, text encoders, autoencoders) has ``example_inputs()``, the smallest
inputs that trace it; these two helpers are the one place that initialises from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import linen as nn


def init_params(module: nn.Module, rng: jax.Array, inputs: Mapping[str, Any] | None = None, *,
                boxed: bool = False) -> Any:
    """Freshly initialised parameters (the originals' initialisation). ``inputs`` default to
    ``module.example_inputs()``; ``boxed=True`` keeps the ``nn.Partitioned`` boxes that carry
    the logical axis names. Compiled as one program (op by op, a model's init takes several
    times longer)."""
    inputs = module.example_inputs() if inputs is None else inputs
    params = jax.jit(module.init)(rng, **inputs)["params"]
    return params if boxed else nn.meta.unbox(params)


def abstract_params(module: nn.Module, *, boxed: bool = False) -> Any:
    """The parameters' shapes and dtypes (``jax.ShapeDtypeStruct`` leaves); nothing is
    allocated. ``boxed=True`` keeps the logical-axis boxes (what sharding rules read)."""
    return jax.eval_shape(lambda: init_params(module, jax.random.key(0), boxed=boxed))
