"""ARLON's semantic injection: coarse latents → adapter features → an adaptive norm in every DiT
block (after its temporal attention), zero-gated so the pretrained DiT starts unchanged.

    feats = LatentAdapter(width=D)(latent_tokens(coarse, patch_size=2))   # (B, T, N, D)
    h = SemanticInjection()(h, feats)                                      # (B, T, N, D)

``latent_tokens`` cuts the coarse latent (B, T, H, W, C) into the video DiT's patches, features
ordered (pt, row, column, channel) like ``jdit.nn.video_patch.VideoPatchEmbed``, so token ``n``
of the adapter output sits at the DiT's token ``n``.

Adapter (ARLON: "projection + latent adapter, N × [MLP, GELU, MLP] + residual"):

    a_0 = P c + b_P,    a_{i+1} = a_i + W2_i · GELU(W1_i · a_i + b1_i) + b2_i

(tanh-approximated GELU, jdit's ``Mlp``; hidden width ``mlp_ratio · D``; no norms, as the paper
lists none.)

Injection (ARLON: "adaptive norm", token-wise scale and shift from the coarse features, a
zero-initialised gate). For DiT tokens ``h`` (..., D) and features ``a`` (..., Dc) at the same
token positions:

    [β; γ] = W_m a + b_m                 (shift and scale, per token; Xavier init)
    g      = W_g a + b_g                 (gate, per token and channel; W_g = b_g = 0 at init)
    out    = h + g ⊙ (LN(h) ⊙ (1 + γ) + β)

``LN`` has no affine parameters (eps 1e-6) and runs in float32. With ``g = 0`` the output is
``h`` exactly, and the gate's gradient ``∂L/∂out ⊙ (LN(h)(1 + γ) + β)`` is non-zero from the
first step. Choices where the paper is silent: the gate is predicted from the features (not a
constant per channel) so it can open only where the coarse plan says something; no SiLU before
``W_m`` (the adapter already ends in a non-linear residual stack).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.layers import MLP_NAMES, Array, Dense, DType, Mlp, constrain, layer_norm, zeros

VIDEO_TOKEN_NAMES = ("batch", "time", "length", "act_embed")
VIDEO_MLP_NAMES = ("batch", "time", "length", "act_mlp")


def _names(ndim: int, video: tuple, tokens: tuple) -> tuple:
    return video if ndim == 4 else tokens if ndim == 3 else (None,) * ndim


def latent_tokens(latent: Array, patch_size: int, temporal_patch_size: int = 1) -> Array:
    """(B, T, H, W, C) → (B, T/pt, (H/p)(W/p), pt·p·p·C): the DiT's patches, row-major."""
    if latent.ndim != 5:
        raise ValueError(f"latent_tokens expects a coarse latent (B, T, H, W, C), got shape "
                         f"{latent.shape}")
    b, t, h, w, c = latent.shape
    p, pt = patch_size, temporal_patch_size
    if t % pt or h % p or w % p:
        raise ValueError(f"latent_tokens: coarse latent {t}x{h}x{w} (frames x height x width) "
                         f"is not divisible by the DiT's patches {pt}x{p}x{p}")
    x = latent.reshape(b, t // pt, pt, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, t // pt, (h // p) * (w // p), pt * p * p * c)


class LatentAdapter(nn.Module):
    """Projection to ``width`` then ``num_blocks`` residual MLP blocks: (..., Dc) → (..., width)
    float32 (see the module docstring)."""

    width: int
    num_blocks: int = 2
    mlp_ratio: float = 1.0
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, c: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        names = _names(c.ndim, VIDEO_TOKEN_NAMES, ("batch", "length", "act_embed"))
        hidden = _names(c.ndim, VIDEO_MLP_NAMES, MLP_NAMES)
        a = Dense(self.width, (None,), ("embed",), name="proj", **common)(c)
        a = constrain(a.astype(jnp.float32), names)
        for i in range(self.num_blocks):
            mlp = Mlp(int(self.width * self.mlp_ratio), self.width, hidden_names=hidden,
                      name=f"block_{i}", **common)
            a = constrain(a + mlp(a).astype(jnp.float32), names)
        return a

    def example_inputs(self, batch: int = 1, channels: int = 4) -> dict[str, Array]:
        return {"c": jnp.zeros((batch, 2, 4, channels), jnp.float32)}


class SemanticInjection(nn.Module):
    """``h + g(a) ⊙ (LN(h)(1 + γ(a)) + β(a))`` with a zero-initialised gate ``g``: the identity at
    initialisation. ``h`` (..., D) DiT tokens, ``a`` (..., Dc) features at the same positions;
    returns ``h``'s shape and dtype."""

    eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, h: Array, a: Array) -> Array:
        if h.shape[:-1] != a.shape[:-1]:
            raise ValueError(f"SemanticInjection: DiT tokens {h.shape} and coarse features "
                             f"{a.shape} must share every axis but the last (the same tokens)")
        d = h.shape[-1]
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = Dense((2, d), ("embed",), (None, "modulation"), name="modulation", **common)(a)
        gate = Dense(d, ("embed",), ("modulation",), kernel_init=zeros, name="gate",
                     **common)(a)
        shift, scale = mod[..., 0, :].astype(jnp.float32), mod[..., 1, :].astype(jnp.float32)
        inject = layer_norm(h, self.eps) * (1.0 + scale) + shift
        out = h.astype(jnp.float32) + gate.astype(jnp.float32) * inject
        return constrain(out.astype(h.dtype),
                         _names(h.ndim, VIDEO_TOKEN_NAMES, ("batch", "length", "act_embed")))

    def example_inputs(self, batch: int = 1, width: int = 8) -> dict[str, Array]:
        x = jnp.zeros((batch, 2, 4, width), jnp.float32)
        return {"h": x, "a": x}

