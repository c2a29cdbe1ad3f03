"""Video patches: (B, T, H, W, C) latents <-> tokens (B, T', h·w, D), frames and tokens apart.

SANA-Video embeds ``pt×p×p`` patches with a strided ``Conv3d`` and its output head emits
``pt·p·p·C`` features per token; both keep the frame axis separate from the spatial tokens, so
activations can be constrained ("batch", "time", "length", "act_embed").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.layers import Array, DType, xavier_uniform


class VideoPatchEmbed(nn.Module):
    """Non-overlapping ``pt×p×p`` patches of (B, T, H, W, C) latents -> (B, T/pt, (H/p)(W/p), D).

    A stride-``(pt, p, p)`` 3-D convolution (diffusers' ``Conv3d`` patch embedding) written as a
    reshape and one matmul; kernel (pt, p, p, C, D). Frames and tokens stay separate axes.
    """

    hidden_size: int
    patch_size: int
    temporal_patch_size: int = 1
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, tt, hh, ww, c = x.shape
        p, pt = self.patch_size, self.temporal_patch_size

        def kernel_init(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
            return xavier_uniform(key, (pt * p * p * c, self.hidden_size), dtype).reshape(shape)

        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(kernel_init, (None, None, None, None, "embed")),
            (pt, p, p, c, self.hidden_size),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            (self.hidden_size,),
            self.param_dtype,
        )
        x = x.astype(self.dtype).reshape(b, tt // pt, pt, hh // p, p, ww // p, p, c)
        y = jnp.einsum(
            "btshpwqc,spqcd->bthwd", x, kernel.astype(self.dtype), precision=self.precision
        )
        y = y + bias.astype(self.dtype)
        return y.reshape(b, tt // pt, (hh // p) * (ww // p), self.hidden_size)


def unpatchify_video(x: Array, grid_thw: tuple[int, int, int], patch_size: int,
                     temporal_patch_size: int, channels: int) -> Array:
    """Inverse of :class:`VideoPatchEmbed` for the output head: (B, T', h·w, pt·p·p·C) ->
    (B, T'·pt, h·p, w·p, C); each token's features ordered (pt, p_row, p_col, channel)."""
    b = x.shape[0]
    t, h, w = grid_thw
    p, pt = patch_size, temporal_patch_size
    x = x.reshape(b, t, h, w, pt, p, p, channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, t * pt, h * p, w * p, channels)
