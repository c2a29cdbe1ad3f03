"""SANA's Mix-FFN (GLUMBConv): 1×1 expansion → SiLU → depthwise 3×3 → GLU → 1×1 projection.

The depthwise 3×3 convolution over the token grid (zero padding) is what gives a NoPE model its
sense of position. The expansion's 2F channels are held as (2, F), value half first and gate
half second (PyTorch's ``chunk(2)`` order), so a tensor-parallel split of F keeps each value
channel on the device of its gate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.layers import Array, Dense, DType, constrain

HIDDEN_NAMES = ("batch", None, None, None, "act_mlp")  # (B, h, w, 2, F)


def depthwise_conv3x3(x: Array, kernel: Array, bias: Array) -> Array:
    """x (B, h, w, *C); kernel (3, 3, *C); zero 'same' padding. Nine shifted multiply-adds, which
    XLA fuses into one pass on every backend."""
    h, w = x.shape[1], x.shape[2]
    pad = [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 3)
    xp = jnp.pad(x, pad)
    out = bias
    for i in range(3):
        for j in range(3):
            out = out + xp[:, i : i + h, j : j + w] * kernel[i, j]
    return out


class DepthwiseConv3x3(nn.Module):
    """Per-channel 3×3 convolution with bias over (B, h, w, *C), zero 'same' padding.
    Initialised as PyTorch's Conv2d (fan-in 9): U(±1/3)."""

    axes: tuple[str | None, ...]  # logical names of the channel dims
    param_dtype: DType = jnp.float32
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[3:]

        def init(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
            return jax.random.uniform(key, shape, dtype, -1.0 / 3.0, 1.0 / 3.0)

        kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, None, *self.axes)),
                            (3, 3, *channels), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(init, self.axes), channels,
                          self.param_dtype)
        return depthwise_conv3x3(x, kernel.astype(self.dtype), bias.astype(self.dtype))


class MixFFN(nn.Module):
    """tokens (B, h·w, C) on a (h, w) grid -> (B, h·w, out_features)."""

    hidden_features: int
    out_features: int
    grid_hw: tuple[int, int]
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b = x.shape[0]
        f = self.hidden_features
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        h = Dense((2, f), ("embed",), (None, "mlp"), name="conv_inverted", **common)(x)
        h = constrain(jax.nn.silu(h).reshape(b, *self.grid_hw, 2, f), HIDDEN_NAMES)
        h = DepthwiseConv3x3((None, "mlp"), self.param_dtype, self.dtype, name="conv_depth")(h)
        h = h[..., 0, :] * jax.nn.silu(h[..., 1, :])
        return Dense(self.out_features, ("mlp",), ("embed",), use_bias=False, name="conv_point",
                     **common)(h.reshape(b, -1, f))
