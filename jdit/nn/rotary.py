"""Multi-axis rotary positions with interleaved pairs (Lumina-Image 2.0; FLUX uses the same form;
SANA-Video's Wan-style 3-D positions over (frames, rows, columns) too).

A head vector of ``sum(axes_dim)`` channels is split into one slice per position axis; slice
``a`` rotates with the token's coordinate on axis ``a``. Channels pair up *adjacently*
(``x[2j]``, ``x[2j+1]``) and pair ``j`` of an axis of ``d`` channels turns by
``pos · theta^(-2j/d)``. This is not the half-split (``rotate_half``) convention of Llama.

The cosines and sines come from per-axis tables computed in float64 on the host and gathered by
integer position, so a position of several hundred keeps full float32 accuracy (a float32 angle
``pos · freq`` would lose about 3e-5 rad there).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jdit.nn.layers import Array


def rotary_table(dim: int, length: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)``, each (length, dim/2) float32, for positions ``0 .. length-1``."""
    if dim % 2:
        raise ValueError(f"a rotary axis needs an even number of channels, got {dim}")
    freqs = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.arange(length, dtype=np.float64)[:, None] * freqs[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotary_cos_sin(positions: Array, axes_dim: Sequence[int], axes_len: Sequence[int],
                   theta: float = 10000.0) -> tuple[Array, Array]:
    """Cosines and sines for integer ``positions`` (..., n_axes): each (..., sum(axes_dim)/2).

    ``axes_len[a]`` bounds the coordinates of axis ``a`` (the table size; static). Positions
    outside ``[0, axes_len[a])`` are clamped by the gather, so callers size the tables from
    their static shapes.
    """
    if positions.shape[-1] != len(axes_dim) or len(axes_len) != len(axes_dim):
        raise ValueError(f"positions with {positions.shape[-1]} axes, axes_dim {tuple(axes_dim)} "
                         f"and axes_len {tuple(axes_len)} must agree in length")
    cos, sin = [], []
    for a, (dim, length) in enumerate(zip(axes_dim, axes_len, strict=True)):
        c, s = rotary_table(dim, length, theta)
        index = positions[..., a]
        cos.append(jnp.take(jnp.asarray(c), index, axis=0))
        sin.append(jnp.take(jnp.asarray(s), index, axis=0))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rotary_interleaved(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate adjacent channel pairs of ``x`` (B, L, H, D) by (B, L, D/2) angles, in float32.

    ``out[2j] = x[2j]·cos_j − x[2j+1]·sin_j``, ``out[2j+1] = x[2j]·sin_j + x[2j+1]·cos_j``;
    returned in ``x``'s dtype.
    """
    b, n, h, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, n, h, d // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([real * c - imag * s, real * s + imag * c], axis=-1)
    return out.reshape(b, n, h, d).astype(x.dtype)


def wan_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Channels per (time, height, width) axis of Wan's 3-D rotary positions (SANA-Video):
    height and width get ``2·(head_dim // 6)`` each, time the rest (112 -> (40, 36, 36))."""
    if head_dim % 2:
        raise ValueError(f"3-D rotary positions need an even head dimension, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rotary_grid(grid: Sequence[int], axes_dim: Sequence[int],
                theta: float = 10000.0) -> tuple[Array, Array]:
    """Cosines and sines ``(prod(grid), sum(axes_dim)/2)`` for the tokens of a row-major grid
    (a video's (frames, rows, columns)); token ``(i, j, ...)`` has coordinate ``i`` on axis 0.

    Built in the graph from the small per-axis tables by broadcasting, so a long video does not
    embed a large constant in the compiled program.
    """
    if len(grid) != len(axes_dim):
        raise ValueError(f"grid {tuple(grid)} and axes_dim {tuple(axes_dim)} differ in length")
    n = len(grid)
    cos, sin = [], []
    for a, (dim, length) in enumerate(zip(axes_dim, grid, strict=True)):
        c, s = rotary_table(dim, length, theta)
        shape = [1] * n + [dim // 2]
        shape[a] = length
        full = (*grid, dim // 2)
        cos.append(jnp.broadcast_to(jnp.asarray(c).reshape(shape), full))
        sin.append(jnp.broadcast_to(jnp.asarray(s).reshape(shape), full))
    size = int(np.prod(grid))
    return (jnp.concatenate(cos, axis=-1).reshape(size, -1),
            jnp.concatenate(sin, axis=-1).reshape(size, -1))
