"""Input embeddings: patches, timesteps, 2-D sin-cos positions, class labels, captions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jdit.nn.layers import Array, Dense, DType, Initializer, normal, xavier_uniform


def timestep_sinusoid(
    t: Array, dim: int = 256, *, max_period: float = 10000.0, freq_shift: float = 0.0
) -> Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosine half first.

    Frequencies are ``exp(-ln(max_period) * k / (dim/2 - freq_shift))``. PixArt and the official
    DiT use ``freq_shift=0``; diffusers' DiT uses 1 (``downscale_freq_shift=1``).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """``[sin(p·ω), cos(p·ω)]`` with ``ω_k = 10000^(-k/(embed_dim/2))``, in float64."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_1d(embed_dim: int, length: int) -> np.ndarray:
    """``(length, embed_dim)`` float32 sin-cos embedding of the positions ``0 .. length-1``
    (sines in the first half): Latte's temporal position embedding of the frames."""
    if embed_dim % 2:
        raise ValueError(f"1-D sin-cos position embedding needs an even embed_dim, got {embed_dim}")
    return _sincos_1d(embed_dim, np.arange(length)).astype(np.float32)


def sincos_pos_embed_factors(
    embed_dim: int, grid_hw: tuple[int, int], base_size: int, interpolation_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The two halves of PixArt's 2-D sin-cos embedding: ``(emb_w (w, D/2), emb_h (h, D/2))``.

    Both axes are stretched to span ``[0, base_size / interpolation_scale)`` whatever the grid,
    and the first half of the channels encodes the column (x) coordinate, exactly as the
    official code and diffusers do (positions in float32, sin/cos in float64).
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    h, w = grid_hw
    scale = np.float32(interpolation_scale)
    pos_h = np.arange(h, dtype=np.float32) / np.float32(h / base_size) / scale
    pos_w = np.arange(w, dtype=np.float32) / np.float32(w / base_size) / scale
    return (
        _sincos_1d(embed_dim // 2, pos_w).astype(np.float32),
        _sincos_1d(embed_dim // 2, pos_h).astype(np.float32),
    )


def sincos_pos_embed_2d(
    embed_dim: int, grid_hw: tuple[int, int], base_size: int, interpolation_scale: float = 1.0
) -> Array:
    """Position embedding ``(h*w, embed_dim)`` for a row-major token grid, float32.

    Built in the graph from two small separable factors, so a 2K grid does not embed a large
    constant in the compiled program.
    """
    emb_w, emb_h = sincos_pos_embed_factors(embed_dim, grid_hw, base_size, interpolation_scale)
    h, w = grid_hw
    half = embed_dim // 2
    cols = jnp.broadcast_to(jnp.asarray(emb_w)[None, :, :], (h, w, half))
    rows = jnp.broadcast_to(jnp.asarray(emb_h)[:, None, :], (h, w, half))
    return jnp.concatenate([cols, rows], axis=-1).reshape(h * w, embed_dim)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p×p`` patches of NHWC latents projected to ``hidden_size`` tokens.

    Equivalent to a stride-``p`` convolution with kernel ``(p, p, C, D)`` (the layout of
    ``nn.Conv``); written as a reshape and one matmul. Tokens come out row-major over the grid.
    """

    hidden_size: int
    patch_size: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hh, ww, c = x.shape
        p = self.patch_size
        # PyTorch initialises this conv like an nn.Linear over the flattened patch (xavier).
        def kernel_init(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
            return xavier_uniform(key, (p * p * c, self.hidden_size), dtype).reshape(shape)

        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(kernel_init, (None, None, None, "embed")),
            (p, p, c, self.hidden_size),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            (self.hidden_size,),
            self.param_dtype,
        )
        x = x.astype(self.dtype).reshape(b, hh // p, p, ww // p, p, c)
        y = jnp.einsum(
            "bhpwqc,pqcd->bhwd", x, kernel.astype(self.dtype), precision=self.precision
        )
        y = y + bias.astype(self.dtype)
        return y.reshape(b, (hh // p) * (ww // p), self.hidden_size)


def unpatchify(x: Array, grid_hw: tuple[int, int], patch_size: int, channels: int) -> Array:
    """Inverse of :class:`PatchEmbed` for the output head: ``(B, h*w, p*p*C) -> (B, H, W, C)``.

    Each token's features are ordered ``(p_row, p_col, channel)``, as in PixArt and DiT.
    """
    b = x.shape[0]
    h, w = grid_hw
    p = patch_size
    x = x.reshape(b, h, w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, channels)


class TimestepEmbedder(nn.Module):
    """Sinusoid of ``frequency_dim`` channels, then ``Dense -> SiLU -> Dense``.

    Also PixArt-α's ``SizeEmbedder``: applied to every scalar of a ``(B, n)`` input, giving
    ``(B, n * hidden_size)`` (height, width and aspect-ratio micro-conditions).
    """

    hidden_size: int
    frequency_dim: int = 256
    freq_shift: float = 0.0
    out_axis: str | None = "embed"
    kernel_init: Initializer = normal(0.02)
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, t: Array) -> Array:
        batch_shape = t.shape
        emb = timestep_sinusoid(t.reshape(-1), self.frequency_dim, freq_shift=self.freq_shift)
        # The conditioning path stays in float32: it is tiny and feeds every block's modulation.
        common = dict(
            kernel_init=self.kernel_init, param_dtype=self.param_dtype, precision=self.precision
        )
        h = Dense(self.hidden_size, (None,), ("mlp",), name="linear_1", **common)(emb)
        h = Dense(self.hidden_size, ("mlp",), (self.out_axis,), name="linear_2", **common)(
            nn.silu(h)
        )
        if len(batch_shape) > 1:
            h = h.reshape(batch_shape[0], -1)
        return h


class LabelEmbedder(nn.Module):
    """Class-label table with one extra row, index ``num_classes``, for the null class (CFG)."""

    num_classes: int
    hidden_size: int
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, labels: Array) -> Array:
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(normal(0.02), ("classes", "embed")),
            (self.num_classes + 1, self.hidden_size),
            self.param_dtype,
        )
        return jnp.take(table, labels, axis=0).astype(jnp.float32)

