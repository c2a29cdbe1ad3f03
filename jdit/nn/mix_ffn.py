"""SANA's Mix-FFN (GLUMBConv): 1×1 expansion → SiLU → depthwise 3×3 → GLU → 1×1 projection.

The depthwise 3×3 convolution over the token grid (zero padding) is what gives a NoPE model its
sense of position. The expansion's 2F channels are held as (2, F), value half first and gate
half second (PyTorch's ``chunk(2)`` order), so a tensor-parallel split of F keeps each value
channel on the device of its gate.

SANA-Video's variant (``GLUMBTempConv``) runs the same FFN on every frame of a video and adds a
residual temporal convolution over the frame axis (``frames``, ``temporal_kernel``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.layers import Array, Dense, DType, constrain

HIDDEN_NAMES = ("batch", None, None, None, "act_mlp")  # (B, h, w, 2, F)
VIDEO_HIDDEN_NAMES = ("batch", "time", None, None, None, "act_mlp")  # (B, T, h, w, 2, F)
VIDEO_NAMES = ("batch", "time", "length", "act_embed")  # (B, T, h·w, C)


def depthwise_conv(x: Array, kernel: Array, bias: Array, lead: int = 1) -> Array:
    """x (*lead, h, w, *C): ``lead`` leading axes (B; or B, T for video); kernel (k, k, *C) with
    k odd; zero 'same' padding. k² shifted multiply-adds, which XLA fuses into one pass on every
    backend. Video keeps B and T apart (not one B·T axis): frames split unevenly over a mesh
    axis cannot be merged with the batch without gathering them."""
    k = kernel.shape[0]
    h, w, r = x.shape[lead], x.shape[lead + 1], k // 2
    xp = jnp.pad(x, [(0, 0)] * lead + [(r, r), (r, r)] + [(0, 0)] * (x.ndim - lead - 2))
    out, at = bias, (slice(None),) * lead
    for i in range(k):
        for j in range(k):
            out = out + xp[(*at, slice(i, i + h), slice(j, j + w))] * kernel[i, j]
    return out


class DepthwiseConv(nn.Module):
    """Per-channel k×k convolution with bias over (B, h, w, *C), zero 'same' padding.
    Initialised as PyTorch's Conv2d (fan-in k²): U(±1/k)."""

    axes: tuple[str | None, ...]  # logical names of the channel dims
    kernel_size: int = 3
    param_dtype: DType = jnp.float32
    dtype: DType = jnp.float32
    lead: int = 1  # leading axes before (h, w): 1 (B), 2 for video (B, T)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels, k = x.shape[self.lead + 2:], self.kernel_size
        if k < 1 or k % 2 == 0:
            raise ValueError(f"DepthwiseConv: kernel_size must be odd, got {k}")

        def init(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
            return jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)

        kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, None, *self.axes)),
                            (k, k, *channels), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(init, self.axes), channels,
                          self.param_dtype)
        return depthwise_conv(x, kernel.astype(self.dtype), bias.astype(self.dtype), self.lead)


class TemporalConv(nn.Module):
    """A full (channel-mixing) convolution of k taps over the frame axis of (B, T, L, C), zero
    'same' padding, no bias: SANA-Video's ``conv_temp``. Zero-initialised, as SANA-Video starts
    it, so a video model grown from an image model begins as that model frame by frame."""

    kernel_size: int = 3
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, (t, c) = self.kernel_size, (x.shape[1], x.shape[-1])
        if k < 1 or k % 2 == 0:
            raise ValueError(f"TemporalConv: kernel_size must be odd, got {k}")
        # the input side is split like the second layer of every D -> D map (an MLP's "mlp")
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), (None, "mlp", "embed")), (k, c, c), self.param_dtype)
        kernel, r = kernel.astype(self.dtype), k // 2
        xp = jnp.pad(x.astype(self.dtype), [(0, 0), (r, r), (0, 0), (0, 0)])
        out = 0.0
        for i in range(k):
            out = out + jnp.einsum("btlc,cd->btld", xp[:, i : i + t], kernel[i],
                                   precision=self.precision)
        return out


class MixFFN(nn.Module):
    """tokens (B, h·w, C) on a (h, w) grid -> (B, h·w, out_features).

    Video (``frames`` > 1 or ``temporal_kernel``): tokens (B, T·h·w, C), frame-major; the
    spatial FFN runs on each frame, then ``x + TemporalConv(x)`` over the frames (SANA-Video).
    """

    hidden_features: int
    out_features: int
    grid_hw: tuple[int, int]
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None
    frames: int = 1
    temporal_kernel: int = 0  # 0: none; SANA-Video: 3

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, shape = x.shape[0], x.shape
        f = self.hidden_features
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        video = self.frames > 1 or self.temporal_kernel > 0
        if video:  # (B, T, h·w, C) throughout: frames split over a mesh axis stay split
            x = constrain(x.reshape(b, self.frames, -1, x.shape[-1]), VIDEO_NAMES)
        h = Dense((2, f), ("embed",), (None, "mlp"), name="conv_inverted", **common)(x)
        if video:  # every frame on its own grid (B, T, h, w, 2, F)
            h = constrain(jax.nn.silu(h).reshape(b, self.frames, *self.grid_hw, 2, f),
                          VIDEO_HIDDEN_NAMES)
        else:
            h = constrain(jax.nn.silu(h).reshape(b, *self.grid_hw, 2, f), HIDDEN_NAMES)
        h = DepthwiseConv((None, "mlp"), 3, self.param_dtype, self.dtype, 2 if video else 1,
                          name="conv_depth")(h)
        h = h[..., 0, :] * jax.nn.silu(h[..., 1, :])
        out = Dense(self.out_features, ("mlp",), ("embed",), use_bias=False, name="conv_point",
                    **common)(h.reshape(*x.shape[:-1], f))
        if self.temporal_kernel:
            out = constrain(out, VIDEO_NAMES)
            out = out + TemporalConv(self.temporal_kernel, name="conv_temp", **common)(out)
        return out.reshape(*shape[:-1], self.out_features)
