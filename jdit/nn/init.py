"""Parameters of a module from its own example inputs: real arrays, or only their shapes.

Every jdit module (models, text encoders, autoencoders) has ``example_inputs()``, the smallest
inputs that trace it; these helpers are the one place that initialises from them, and the
one that turns initial weights into random ones for tests.
"""

from __future__ import annotations

import functools
import math
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


@functools.partial(jax.jit, static_argnames="scale")
def perturbed(params: Any, rng: jax.Array, scale: float = 0.05) -> Any:
    """``params`` with ``scale`` × N(0, 1) noise added to every leaf: random weights everywhere,
    the zero-initialised output layers included (what parity tests and benchmarks need). One
    draw sliced over the leaves: a draw per leaf takes XLA seconds to compile."""
    leaves, tree = jax.tree.flatten(params)
    sizes = [math.prod(p.shape) for p in leaves]
    noise = jax.random.normal(rng, (sum(sizes),))
    out, start = [], 0
    for p, size in zip(leaves, sizes, strict=True):
        out.append(p + (scale * noise[start:start + size]).reshape(p.shape).astype(p.dtype))
        start += size
    return jax.tree.unflatten(tree, out)
