"""ARLON's latent VQ-VAE: video latents → a grid of discrete tokens → a blurry "coarse latent".

    vq = LatentVQVAE(channels=4, codebook_size=512, temporal_factor=4, spatial_factor=8)
    params = jdit.nn.init_params(vq, jax.random.key(0))
    idx = vq.apply({"params": params}, x, method="encode")       # (B, T/4, H/8, W/8) int32
    coarse = vq.apply({"params": params}, idx, method="decode")  # (B, T, H, W, C)
    loss, metrics = vq_loss(vq, params, x)

ARLON (arXiv 2410.20502) compresses the 3-D VAE's latents a further 4×8×8 (or 4×16×16) into
tokens that its AR model predicts; the paper gives neither the network nor the quantiser. The
choices here (for ``docs/video.md``):

- **Network**: non-overlapping ``(ft, fs, fs)`` patches (features ordered ``(time, row, col,
  channel)``) → Dense → ``num_blocks`` pre-norm residual blocks (LayerNorm → 3-D convolution
  ``kernel_size`` → GELU → Dense) on the token grid → LayerNorm → Dense to ``code_dim``; the
  decoder mirrors it and un-patchifies. One token per patch keeps the grid exactly the AR
  model's sequence; the 3×3×3 convolutions give codes neighbourhood context; at toy scale it
  trains in seconds on a CPU.
- **Quantiser**: factorised, l2-normalised codes (ViT-VQGAN's recipe for codebook usage):
  the encoder output and the codebook rows are projected onto the unit sphere in a small
  ``code_dim`` and matched by nearest neighbour (= highest cosine). Straight-through estimator
  ``z_q = z + sg(e − z)``; codebook loss ``‖sg(z) − e‖²`` plus commitment ``β ‖z − sg(e)‖²``
  (β = 0.25), means over every element (VQGAN's convention). No EMA updates: the codebook
  learns from its loss only.
- **Bad tokens**: :func:`check_tokens` (host side, at API boundaries) raises for codes outside
  ``[0, K)`` or a grid of the wrong shape. Inside a jitted ``decode`` a code outside the
  codebook cannot raise; it decodes to NaN so it is never silently clamped to a real code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jdit.nn.layers import AffineLayerNorm, Array, Dense, DType, constrain, xavier_uniform

GRID_NAMES = ("batch", "time", None, None, "act_embed")  # (B, t, h, w, D)


def check_tokens(indices: Any, codebook_size: int, grid: Sequence[int] | None = None) -> None:
    """Raise ValueError unless ``indices`` are integer codes in ``[0, codebook_size)``, laid out
    (B, t, h, w) or, flattened, (B, t·h·w) when ``grid`` = (t, h, w) is given. Host side: call it
    where tokens enter (AR output handed to the VQ decoder, files, user input)."""
    arr = np.asarray(indices)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integer codes, got dtype {arr.dtype}")
    if grid is not None:
        grid = tuple(int(g) for g in grid)
        if arr.shape[1:] not in (grid, (math.prod(grid),)):
            raise ValueError(f"tokens of shape {arr.shape} do not fit the token grid {grid}: "
                             f"expected (B, {', '.join(map(str, grid))}) or (B, "
                             f"{math.prod(grid)}) (AR tokens from another grid or model?)")
    if arr.size and (arr.min() < 0 or arr.max() >= codebook_size):
        bad = arr[(arr < 0) | (arr >= codebook_size)]
        raise ValueError(f"token {int(bad.flat[0])} is outside the codebook [0, {codebook_size})"
                         f" ({bad.size} of {arr.size} tokens): AR tokens from another codebook "
                         "size?")


def tokens_to_grid(tokens: Array, grid: Sequence[int]) -> Array:
    """Flat AR tokens (B, t·h·w) → the VQ grid (B, t, h, w), row-major (time, row, column)."""
    grid = tuple(int(g) for g in grid)
    if tokens.ndim != 2 or tokens.shape[1] != math.prod(grid):
        raise ValueError(f"tokens of shape {tokens.shape} cannot fill the grid {grid}: expected "
                         f"(B, {math.prod(grid)})")
    return tokens.reshape(tokens.shape[0], *grid)


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def vector_quantize(z: Array, codebook: Array) -> tuple[Array, Array, Array]:
    """Nearest codebook row of each vector ``z`` (..., d) in ``codebook`` (K, d).

    Returns ``(z_st, indices, z_q)``: ``z_q`` the chosen rows, ``z_st = z + sg(z_q − z)`` (its
    value is ``z_q``; its gradient flows to ``z`` unchanged, and none to the codebook).
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    dist = (jnp.sum(jnp.square(z), -1, keepdims=True) - 2.0 * z @ codebook.T
            + jnp.sum(jnp.square(codebook), -1))
    indices = jnp.argmin(jax.lax.stop_gradient(dist), axis=-1).astype(jnp.int32)
    z_q = jnp.take(codebook, indices, axis=0)
    return z + jax.lax.stop_gradient(z_q - z), indices, z_q


def code_statistics(indices: Array, codebook_size: int) -> dict[str, Array]:
    """Perplexity ``exp(H(p))`` of the codes' frequencies ``p`` and the fraction of codes used."""
    p = jnp.mean(jax.nn.one_hot(indices.reshape(-1), codebook_size, dtype=jnp.float32), axis=0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"perplexity": jnp.exp(entropy), "usage": jnp.mean((p > 0).astype(jnp.float32))}


class Conv3D(nn.Module):
    """'Same' 3-D convolution over (B, t, h, w, C) with zero padding; kernel (kt, k, k, C, F)."""

    features: int
    kernel_size: tuple[int, int, int]
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ks, c = tuple(self.kernel_size), x.shape[-1]
        if any(k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f"Conv3D: kernel_size must be odd, got {ks}")

        def init(key: Array, shape: Sequence[int], dtype: DType = jnp.float32) -> Array:
            return xavier_uniform(key, (math.prod(ks) * c, self.features), dtype).reshape(shape)

        kernel = self.param("kernel", nn.with_logical_partitioning(
            init, (None, None, None, "embed", "mlp")), (*ks, c, self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                          (self.features,), self.param_dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (1, 1, 1), "SAME",
            dimension_numbers=("NTHWC", "THWIO", "NTHWC"))
        return y + bias.astype(self.dtype)


class ResBlock3D(nn.Module):
    """``x + Dense(GELU(Conv3D(LN(x))))`` on the token grid."""

    hidden: int
    kernel_size: tuple[int, int, int]
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = AffineLayerNorm(1e-6, self.param_dtype, name="norm")(x)
        h = jax.nn.gelu(Conv3D(self.hidden, self.kernel_size, name="conv", **common)(h))
        h = Dense(x.shape[-1], ("mlp",), ("embed",), name="out", **common)(h)
        return constrain(x + h.astype(x.dtype), GRID_NAMES)


class GridStack(nn.Module):
    """Dense in → residual blocks → LayerNorm → Dense out, on (B, t, h, w, ·) grids."""

    width: int
    out_features: int
    num_blocks: int
    hidden: int
    kernel_size: tuple[int, int, int]
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.width, (None,), ("embed",), name="proj_in", **common)(x)
        for i in range(self.num_blocks):
            x = ResBlock3D(self.hidden, self.kernel_size, name=f"block_{i}", **common)(x)
        x = AffineLayerNorm(1e-6, self.param_dtype, name="norm_out")(x)
        return Dense(self.out_features, ("embed",), (None,), name="proj_out", **common)(x)


class LatentVQVAE(nn.Module):
    """Video latents (B, T, H, W, C) ↔ tokens (B, T/ft, H/fs, W/fs) from ``codebook_size`` codes.

    ``__call__(x) -> (reconstruction, indices, aux)``; aux holds ``codebook_loss``,
    ``commitment_loss`` (unweighted), ``perplexity`` and ``usage``. ``encode(x) -> indices``;
    ``decode(indices) -> coarse`` (B, T, H, W, C) float32.
    """

    channels: int
    codebook_size: int = 512
    code_dim: int = 16
    temporal_factor: int = 4
    spatial_factor: int = 8
    width: int = 128
    num_blocks: int = 2
    mlp_ratio: float = 2.0
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    beta: float = 0.25
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self) -> None:
        common = dict(num_blocks=self.num_blocks, hidden=int(self.width * self.mlp_ratio),
                      kernel_size=tuple(self.kernel_size), dtype=self.dtype,
                      param_dtype=self.param_dtype)
        self.encoder = GridStack(self.width, self.code_dim, **common)
        self.decoder = GridStack(self.width, self.patch_features, **common)
        self.codebook = self.param("codebook", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", None)),
            (self.codebook_size, self.code_dim), self.param_dtype)

    @property
    def patch_features(self) -> int:
        return self.temporal_factor * self.spatial_factor ** 2 * self.channels

    def token_grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """(t, h, w) of the tokens of latents shaped (B, T, H, W, C) (or (T, H, W, C))."""
        t, h, w = tuple(latent_shape)[-4:-1]
        self._check_sizes(t, h, w)
        return t // self.temporal_factor, h // self.spatial_factor, w // self.spatial_factor

    def example_inputs(self, batch: int = 1) -> dict[str, Array]:
        ft, fs = self.temporal_factor, self.spatial_factor
        return {"x": jnp.zeros((batch, ft, fs, fs, self.channels), jnp.float32)}

    def _check_sizes(self, t: int, h: int, w: int) -> None:
        ft, fs = self.temporal_factor, self.spatial_factor
        if t % ft:
            raise ValueError(f"LatentVQVAE: {t} latent frames are not a multiple of the temporal "
                             f"factor {ft} (expected a multiple of {ft})")
        if h % fs or w % fs:
            raise ValueError(f"LatentVQVAE: latent size {h}x{w} is not a multiple of the spatial "
                             f"factor {fs} (expected height and width multiples of {fs})")

    def _check_latents(self, x: Array) -> None:
        if x.ndim != 5 or x.shape[-1] != self.channels:
            raise ValueError(f"LatentVQVAE expects latents (B, T, H, W, {self.channels}), got "
                             f"shape {x.shape}")
        self._check_sizes(*x.shape[1:4])

    def _patchify(self, x: Array) -> Array:
        b, t, h, w, c = x.shape
        ft, fs = self.temporal_factor, self.spatial_factor
        x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b, t // ft, h // fs, w // fs, self.patch_features)

    def _unpatchify(self, y: Array) -> Array:
        b, t, h, w, _ = y.shape
        ft, fs, c = self.temporal_factor, self.spatial_factor, self.channels
        y = y.reshape(b, t, h, w, ft, fs, fs, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return y.reshape(b, t * ft, h * fs, w * fs, c)

    def _encode(self, x: Array) -> tuple[Array, Array, Array]:
        self._check_latents(x)
        z = l2_normalize(self.encoder(self._patchify(x.astype(self.dtype))))
        return (z,) + vector_quantize(z, l2_normalize(self.codebook))[:2]

    def encode(self, x: Array) -> Array:
        """Latents (B, T, H, W, C) → token indices (B, T/ft, H/fs, W/fs) int32."""
        return self._encode(x)[2]

    def _decode_codes(self, codes: Array) -> Array:
        return self._unpatchify(self.decoder(codes.astype(self.dtype))).astype(jnp.float32)

    def decode(self, indices: Array) -> Array:
        """Token indices (B, t, h, w) → the coarse latent (B, t·ft, h·fs, w·fs, C) float32.

        Concrete indices are checked (:func:`check_tokens`); traced ones outside the codebook
        decode to NaN."""
        if indices.ndim != 4:
            raise ValueError(f"LatentVQVAE.decode expects a token grid (B, t, h, w), got shape "
                             f"{indices.shape} (flat AR tokens: reshape with tokens_to_grid)")
        if not jnp.issubdtype(indices.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer codes, got dtype {indices.dtype}")
        if not isinstance(indices, jax.core.Tracer):
            check_tokens(indices, self.codebook_size)
        codes = jnp.take(l2_normalize(self.codebook), indices, axis=0, mode="fill",
                         fill_value=jnp.nan)
        return self._decode_codes(codes)

    def __call__(self, x: Array) -> tuple[Array, Array, dict[str, Array]]:
        z, z_st, indices = self._encode(x)
        e = jnp.take(l2_normalize(self.codebook), indices, axis=0)  # with the codebook's gradient
        sg = jax.lax.stop_gradient
        aux = {"codebook_loss": jnp.mean(jnp.square(sg(z) - e)),
               "commitment_loss": jnp.mean(jnp.square(z - sg(e))),
               **code_statistics(indices, self.codebook_size)}
        return self._decode_codes(z_st), indices, aux


def restart_dead_codes(model: LatentVQVAE, params: Any, x: Array, rng: Array) -> Any:
    """``params`` with every code that no token of ``x`` chose moved onto one of the encoder
    outputs of ``x`` its code represents worst (largest quantisation error).

    A VQ-VAE on mostly empty frames collapses to a few codes (the background); restarting the
    dead codes on the worst-served vectors (SoundStream's and Jukebox's remedy) gives the objects
    codes of their own. Call it every few hundred steps during training; jittable.
    """
    vq = {"params": params}
    z, _, indices = model.apply(vq, x, method=lambda m, v: m._encode(v))
    z = z.reshape(-1, z.shape[-1])
    codebook = l2_normalize(params["codebook"])
    err = jnp.sum(jnp.square(z - jnp.take(codebook, indices.reshape(-1), axis=0)), -1)
    counts = jnp.bincount(indices.reshape(-1), length=model.codebook_size)
    # the worst-served vectors first, a little noise so that equal errors spread out
    order = jnp.argsort(-(err + 1e-6 * jax.random.uniform(rng, err.shape)))
    dead = counts == 0
    slot = jnp.cumsum(dead) - 1  # dead code j takes the slot-th worst vector
    picks = jnp.take(z, jnp.take(order, slot % z.shape[0]), axis=0)
    new = jnp.where(dead[:, None], picks.astype(params["codebook"].dtype), params["codebook"])
    return {**params, "codebook": new}


def vq_loss(model: LatentVQVAE, params: Any, x: Array) -> tuple[Array, dict[str, Array]]:
    """``mse(recon, x) + codebook_loss + β · commitment_loss`` and the metrics (every term,
    ``perplexity``, ``usage``): what a VQ-VAE training step differentiates."""
    recon, _, aux = model.apply({"params": params}, x)
    mse = jnp.mean(jnp.square(recon - x.astype(jnp.float32)))
    loss = mse + aux["codebook_loss"] + model.beta * aux["commitment_loss"]
    return loss, {"loss": loss, "recon_mse": mse, **aux}
