"""Dense projections and norms with logical axis names on every parameter.

Every parameter is created through :func:`flax.linen.with_logical_partitioning`, so a model can
be sharded by a rule table (:mod:`jdit.parallel.rules`) without touching model code. The
logical names used across jdit are listed in :data:`LOGICAL_AXES`; activations are constrained
by :func:`constrain` with the names of ``jdit.parallel.rules.ACTIVATION_AXES``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

# Logical axis names. A rule table maps each one to mesh axes (or to None: replicated).
LOGICAL_AXES: dict[str, str] = {
    "embed": "the model width D (residual stream)",
    "mlp": "hidden width of MLPs and of the conditioning embedders",
    "heads": "attention heads",
    "kv": "per-head feature dimension",
    "modulation": "the n*D output of adaLN modulation layers",
    "caption": "input width of caption features (e.g. 4096 for T5-XXL)",
    "classes": "rows of a class-label embedding table",
    "layers": "the stacked layer axis of scanned blocks",
    "vocab": "rows of a token-embedding table (T5)",
}

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def normal(stddev: float) -> Initializer:
    return nn.initializers.normal(stddev=stddev)


def scaled_randn(scale: float) -> Initializer:
    """Standard normal times ``scale`` (PixArt's ``randn(n, D) / sqrt(D)`` tables)."""

    def init(key: Array, shape: Sequence[int], dtype: DType = jnp.float32) -> Array:
        return jax.random.normal(key, shape, dtype) * scale

    return init


# LoRA dropout while tracing a training step (jdit.lora.training sets it): the rate applied to
# the input of every adapter, with the "lora_dropout" RNG stream.
_LORA_DROPOUT: contextvars.ContextVar[float] = contextvars.ContextVar("lora_dropout", default=0.0)


@contextlib.contextmanager
def lora_dropout(rate: float) -> Iterator[None]:
    """Trace adapters with dropout ``rate`` on their input (``rngs={"lora_dropout": key}``)."""
    token = _LORA_DROPOUT.set(float(rate))
    try:
        yield
    finally:
        _LORA_DROPOUT.reset(token)


class Dense(nn.Module):
    """``y = x · kernel + bias`` contracting the last ``len(in_axes)`` input dims.

    A low-rank adapter beside the kernel (``lora_a`` (*input dims, r), ``lora_b`` (r, *features)
    in the same parameter scope, put there by :func:`jdit.lora.apply`) adds ``(x · A) · B``
    without forming ``A · B``: the model files need no change for LoRA.

    ``features`` is the output shape (an int or a tuple, e.g. ``(3, heads, head_dim)`` for a fused
    QKV projection); the kernel has shape ``input_dims + features`` and the logical names
    ``in_axes + out_axes``. The initializer sees the flattened ``(fan_in, fan_out)`` shape, so
    Xavier bounds match a PyTorch ``nn.Linear`` of the same fused size.
    """

    features: int | tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    use_bias: bool = True
    kernel_init: Initializer = xavier_uniform
    bias_init: Initializer = zeros
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        if len(features) != len(self.out_axes):
            raise ValueError(f"{self.name}: features {features} need {len(features)} out_axes")
        n_in = len(self.in_axes)
        in_shape = tuple(x.shape[-n_in:])
        fan_in, fan_out = math.prod(in_shape), math.prod(features)

        def kernel_init(key: Array, shape: Sequence[int], dtype: DType = jnp.float32) -> Array:
            return self.kernel_init(key, (fan_in, fan_out), dtype).reshape(shape)

        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(kernel_init, self.in_axes + self.out_axes),
            in_shape + features,
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(
            x, kernel.astype(self.dtype), (contract, ((), ())), precision=self.precision
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(self.bias_init, self.out_axes),
                features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        if self.has_variable("params", "lora_a"):
            y = y + self._adapter(x, n_in)
        return y

    def _adapter(self, x: Array, n_in: int) -> Array:
        a = self.get_variable("params", "lora_a").astype(self.dtype)
        b = self.get_variable("params", "lora_b").astype(self.dtype)
        rate = _LORA_DROPOUT.get()
        if rate > 0.0:
            keep = jax.random.bernoulli(self.make_rng("lora_dropout"), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        h = jax.lax.dot_general(x, a, (contract, ((), ())), precision=self.precision)
        return jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())),
                                   precision=self.precision)


def layer_norm(x: Array, eps: float) -> Array:
    """Parameter-free LayerNorm over the last axis, computed and returned in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class AffineLayerNorm(nn.Module):
    """LayerNorm with a learned scale and bias (PyTorch ``nn.LayerNorm`` default eps 1e-5)."""

    eps: float = 1e-5
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(ones, ("embed",)), (d,), self.param_dtype
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(zeros, ("embed",)), (d,), self.param_dtype
        )
        y = layer_norm(x, self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale, computed in float32 (diffusers ``RMSNorm``;
    SANA's caption norm and its QK-norm across heads). ``scale_init`` is SANA's
    ``scale_factor`` (0.01 for the official caption norm)."""

    eps: float = 1e-5
    scale_init: float = 1.0
    axis_name: str | None = "embed"
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.scale_init),
                                         (self.axis_name,)),
            (x.shape[-1],), self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


TOKEN_NAMES = ("batch", "length", "act_embed")  # the residual stream (B, L, D)
MLP_NAMES = ("batch", "length", "act_mlp")  # an MLP's hidden layer (B, L, F)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Sharding constraint by logical activation names (``jdit.parallel.rules.ACTIVATION_AXES``).

    A no-op unless a mesh and a rule table are active (``Partitioner.activate()``), so models
    run unchanged on one device.
    """
    return nn.with_logical_constraint(x, names)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN modulation ``x * (1 + scale) + shift`` (shift/scale broadcast over tokens)."""
    return x * (1.0 + scale) + shift


class Mlp(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``: the transformer MLP and PixArt's caption projection."""

    hidden_features: int
    out_features: int
    in_axis: str | None = "embed"
    hidden_axis: str | None = "mlp"
    out_axis: str | None = "embed"
    fc1_init: Initializer = xavier_uniform
    fc2_init: Initializer = xavier_uniform
    hidden_names: tuple[str | None, ...] | None = None  # activation names of the hidden layer
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        h = Dense(
            self.hidden_features, (self.in_axis,), (self.hidden_axis,),
            kernel_init=self.fc1_init, name="fc1", **common,
        )(x)
        h = jax.nn.gelu(h, approximate=True)
        if self.hidden_names is not None:
            h = constrain(h, self.hidden_names)
        return Dense(
            self.out_features, (self.hidden_axis,), (self.out_axis,),
            kernel_init=self.fc2_init, name="fc2", **common,
        )(h)
