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


def depthwise_conv(x: Array, kernel: Array, bias: Array) -> Array:
    """x (B, h, w, *C); kernel (k, k, *C) with k odd; zero 'same' padding. k² shifted
    multiply-adds, which XLA fuses into one pass on every backend."""
    k = kernel.shape[0]
    h, w, r = x.shape[1], x.shape[2], k // 2
    xp = jnp.pad(x, [(0, 0), (r, r), (r, r)] + [(0, 0)] * (x.ndim - 3))
    out = bias
    for i in range(k):
        for j in range(k):
            out = out + xp[:, i : i + h, j : j + w] * kernel[i, j]
    return out


class DepthwiseConv(nn.Module):
    """Per-channel k×k convolution with bias over (B, h, w, *C), zero 'same' padding.
    Initialised as PyTorch's Conv2d (fan-in k²): U(±1/k)."""

    axes: tuple[str | None, ...]  # logical names of the channel dims
    kernel_size: int = 3
    param_dtype: DType = jnp.float32
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels, k = x.shape[3:], self.kernel_size
        if k < 1 or k % 2 == 0:
            raise ValueError(f"DepthwiseConv: kernel_size must be odd, got {k}")

        def init(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
            return jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)

        kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, None, *self.axes)),
                            (k, k, *channels), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(init, self.axes), channels,
                          self.param_dtype)
        return depthwise_conv(x, kernel.astype(self.dtype), bias.astype(self.dtype))


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
        h = DepthwiseConv((None, "mlp"), 3, self.param_dtype, self.dtype, name="conv_depth")(h)
        h = h[..., 0, :] * jax.nn.silu(h[..., 1, :])
        return Dense(self.out_features, ("mlp",), ("embed",), use_bias=False, name="conv_point",
                     **common)(h.reshape(b, -1, f))
