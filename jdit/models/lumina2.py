"""Lumina-Image 2.0 (Unified Next-DiT): caption and image tokens in one self-attention sequence.

The caption (Gemma-2-2B features: RMSNorm, Linear) runs through unmodulated *context refiner*
blocks and the image patches through timestep-modulated *noise refiner* blocks; then ``depth``
modulated blocks attend over [caption; image] jointly. There is no cross-attention. Every block
has GQA self-attention with a per-head RMSNorm on q and k and 3-axis interleaved rotary
positions, a SwiGLU FFN, sandwich RMSNorms (before and after each sublayer), scale-only
modulation ``1 + scale`` and tanh gates. Facts and weight names: ``docs/models.md`` and
``jdit/weights/lumina2.py``.

jdit's conventions, not Lumina's:
- ``t = 1000·σ`` with ``x_t = (1−σ)·x0 + σ·ε`` as in every jdit flow model. The module feeds
  Lumina its own time ``1 − t/1000`` (0 = noise; float32, as the diffusers pipeline computes it)
  and returns the velocity ``ε − x0``: Lumina's output (``x0 − ε``) negated.
- Static shapes: padded caption tokens stay in the joint sequence and are masked as keys
  (diffusers drops them; with explicit positions the result is the same). ``context_mask`` must
  be a right-padded prefix (ones, then zeros): its count of ones is the caption length.
- Rotary positions: caption token k → (k, 0, 0); image token (row r, column c) → (n, r, c) with
  n the sample's caption length. ``axes_lens`` (the reference's table sizes) is recorded only:
  jdit sizes its tables from the input shapes.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.models.checks import check_context, check_latents, check_vector
from jdit.nn.attention import KV_NAMES, Q_NAMES, dot_product_attention
from jdit.nn.embeddings import PatchEmbed, TimestepEmbedder, unpatchify
from jdit.nn.layers import (
    MLP_NAMES,
    TOKEN_NAMES,
    Array,
    Dense,
    DType,
    RMSNorm,
    constrain,
    layer_norm,
    zeros,
)
from jdit.nn.modulation import AdaLNModulation
from jdit.nn.rotary import apply_rotary_interleaved, rotary_cos_sin
from jdit.nn.stack import run_blocks

ROPE_THETA = 10000.0
QK_NORM_EPS = 1e-5  # fixed in the reference, whatever norm_eps is
Rope = tuple[Array, Array]  # (cos, sin), each (B, L, head_dim / 2) float32


class Lumina2Attention(nn.Module):
    """GQA self-attention: q, k, v without bias, RMSNorm of each head of q and k (one (head_dim,)
    scale shared by the heads), rotary positions, then query head h reads kv head h // n_rep."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, rope: Rope, kv_mask: Array | None) -> Array:
        hd, dt = self.head_dim, self.dtype
        common = dict(use_bias=False, dtype=dt, param_dtype=self.param_dtype,
                      precision=self.precision)
        q = Dense((self.num_heads, hd), ("embed",), ("heads", "kv"), name="q", **common)(x)
        k = Dense((self.num_kv_heads, hd), ("embed",), ("heads", "kv"), name="k", **common)(x)
        v = Dense((self.num_kv_heads, hd), ("embed",), ("heads", "kv"), name="v", **common)(x)
        norm = dict(eps=QK_NORM_EPS, axis_name="kv", param_dtype=self.param_dtype)
        q = RMSNorm(**norm, name="q_norm")(q.astype(jnp.float32))  # float32 through the rotation
        k = RMSNorm(**norm, name="k_norm")(k.astype(jnp.float32))
        q = apply_rotary_interleaved(q, *rope).astype(dt)
        k = apply_rotary_interleaved(k, *rope).astype(dt)
        n_rep = self.num_heads // self.num_kv_heads
        k, v = jnp.repeat(k, n_rep, axis=2), jnp.repeat(v, n_rep, axis=2)
        q, k, v = constrain(q, Q_NAMES), constrain(k, KV_NAMES), constrain(v, KV_NAMES)
        o = dot_product_attention(q, k, v, kv_mask, impl=self.attention_impl,
                                  precision=self.precision)
        return Dense(x.shape[-1], ("heads", "kv"), ("embed",), name="out", **common)(
            constrain(o, Q_NAMES))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) · up(x))`` without biases (Lumina's w1 = gate, w3 = up, w2 = down)."""

    hidden_features: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        common = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      precision=self.precision)
        f = self.hidden_features
        gate = Dense(f, ("embed",), ("mlp",), name="gate", **common)(x)
        up = Dense(f, ("embed",), ("mlp",), name="up", **common)(x)
        h = nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
        h = constrain(h.astype(self.dtype), MLP_NAMES)
        return Dense(x.shape[-1], ("mlp",), ("embed",), name="down", **common)(h)


class Lumina2Block(nn.Module):
    """Sandwich-normed attention and SwiGLU. Modulated (noise refiner, main layers):
    ``x + tanh(g_msa)·norm2(attn(norm1(x)·(1 + s_msa)))``, then the same for the FFN with
    ``ffn_norm1/2``, ``s_mlp``, ``g_mlp``; the four vectors come from ``Dense(SiLU(temb))`` in
    the order s_msa, g_msa, s_mlp, g_mlp. Unmodulated (context refiner): no scales, no gates."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden: int
    norm_eps: float
    modulated: bool = True
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, temb: Array | None, rope: Rope,
                 kv_mask: Array | None) -> tuple[Array, None]:
        d, dt = self.hidden_size, self.dtype
        common = dict(dtype=dt, param_dtype=self.param_dtype, precision=self.precision)

        def norm(name: str, h: Array) -> Array:  # float32 in and out
            return RMSNorm(self.norm_eps, param_dtype=self.param_dtype, name=name)(
                h.astype(jnp.float32))

        x = constrain(x, TOKEN_NAMES)
        scale_msa = gate_msa = scale_mlp = gate_mlp = None
        if self.modulated:
            mods = AdaLNModulation(4, d, param_dtype=self.param_dtype, precision=self.precision,
                                   name="adaln")(temb)
            scale_msa, gate_msa, scale_mlp, gate_mlp = (mods[:, i:i + 1] for i in range(4))

        def residual(x: Array, h: Array, gate: Array | None) -> Array:
            return x + (h if gate is None else jnp.tanh(gate) * h)

        def scaled(h: Array, scale: Array | None) -> Array:
            return (h if scale is None else h * (1.0 + scale)).astype(dt)

        h = Lumina2Attention(self.num_heads, self.num_kv_heads, d // self.num_heads,
                             self.attention_impl, name="attn", **common)(
            scaled(norm("norm1", x), scale_msa), rope, kv_mask)
        x = residual(x, norm("norm2", h), gate_msa)
        h = SwiGLU(self.ffn_hidden, name="ffn", **common)(scaled(norm("ffn_norm1", x), scale_mlp))
        x = residual(x, norm("ffn_norm2", h), gate_mlp)
        return constrain(x, TOKEN_NAMES), None


class Lumina2Refiner(nn.Module):
    """``depth`` blocks under one name (``context_refiner``, ``noise_refiner``); two in the
    release, so never scanned (only the main layers follow ``scan_layers``)."""

    depth: int
    block: tuple[tuple[str, Any], ...]  # Lumina2Block fields (a hashable dict)
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x: Array, temb: Array | None, rope: Rope, kv_mask: Array | None) -> Array:
        return run_blocks(Lumina2Block, [{}] * self.depth, dict(self.block), x, temb, rope,
                          kv_mask, remat=self.remat_policy)


class Lumina2FinalLayer(nn.Module):
    """``Dense(LayerNorm(x) · (1 + scale))``: LayerNorm eps 1e-6 without affine, a scale from
    ``Dense(SiLU(temb))`` (no shift, no gate), output zero-initialised."""

    hidden_size: int
    out_features: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        scale = AdaLNModulation(1, self.hidden_size, param_dtype=self.param_dtype,
                                precision=self.precision, name="adaln")(temb)
        h = layer_norm(x, 1e-6) * (1.0 + scale)
        return Dense(self.out_features, ("embed",), (None,), kernel_init=zeros, dtype=self.dtype,
                     param_dtype=self.param_dtype, precision=self.precision, name="linear")(h)


class Lumina2(nn.Module):
    """Lumina-Image 2.0 transformer. ``apply(vars, x, t, context=c, context_mask=m)``.

    x: (B, H, W, in_channels) NHWC latents (FLUX VAE: 16 channels); t: (B,) in [0, 1000]
    (1000·σ); context: (B, L, caption_channels) text features (Gemma-2-2B's second-to-last
    hidden states: 2304); context_mask: (B, L), 1 keeps a token, right-padded. Returns
    (B, H, W, out_channels) float32: the flow velocity ε − x0.
    """

    JOINT_ATTENTION: ClassVar[bool] = True  # caption and image tokens are one sequence
    input_size: int = 128  # latent side at the training resolution (1024 px); not in the math
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 2304
    depth: int = 26
    refiner_depth: int = 2  # blocks of each refiner (context and noise)
    num_heads: int = 24
    num_kv_heads: int = 8
    multiple_of: int = 256  # the FFN width rounds up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    axes_dim_rope: tuple[int, ...] = (32, 32, 32)  # head channels per axis (caption, row, col)
    axes_lens: tuple[int, ...] = (300, 512, 512)
    caption_channels: int = 2304
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    dtype: DType = jnp.float32  # compute dtype; norms, RoPE, softmax and conditioning in float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @property
    def conditioning_size(self) -> int:
        """Width of the timestep embedding: min(D, 1024)."""
        return min(self.hidden_size, 1024)

    @property
    def ffn_hidden(self) -> int:
        """4·D (times ``ffn_dim_multiplier``, truncated), rounded up to ``multiple_of``."""
        inner = 4 * self.hidden_size
        if self.ffn_dim_multiplier is not None:
            inner = int(self.ffn_dim_multiplier * inner)
        return self.multiple_of * math.ceil(inner / self.multiple_of)

    def per_layer(self) -> list[dict[str, Any]]:
        return [{} for _ in range(self.depth)]

    def example_inputs(self, batch: int = 1, caption_length: int = 8) -> dict[str, Array]:
        s = self.input_size
        return dict(
            x=jnp.zeros((batch, s, s, self.in_channels)),
            t=jnp.zeros((batch,)),
            context=jnp.zeros((batch, caption_length, self.caption_channels)),
            context_mask=jnp.ones((batch, caption_length), jnp.int32),
        )

    def check_config(self) -> None:
        d, heads, kv = self.hidden_size, self.num_heads, self.num_kv_heads
        if heads < 1 or d % heads:
            raise ValueError(f"Lumina2: hidden_size {d} must be divisible by num_heads {heads}")
        if kv < 1 or heads % kv:
            raise ValueError(f"Lumina2: num_heads {heads} must be a multiple of num_kv_heads {kv}")
        axes = tuple(self.axes_dim_rope)
        if len(axes) != 3 or any(a < 0 or a % 2 for a in axes) or sum(axes) != d // heads:
            raise ValueError(f"Lumina2: axes_dim_rope {axes} must be three even numbers summing "
                             f"to the head dim {d // heads} (hidden_size / num_heads)")
        if len(tuple(self.axes_lens)) != 3:
            raise ValueError(f"Lumina2: axes_lens {self.axes_lens} must have three entries")
        if self.depth < 1 or self.refiner_depth < 0 or self.patch_size < 1:
            raise ValueError(f"Lumina2: depth and patch_size must be >= 1 and refiner_depth >= 0, "
                             f"got {self.depth}, {self.patch_size}, {self.refiner_depth}")
        if self.multiple_of < 1 or (self.ffn_dim_multiplier or 1.0) <= 0:
            raise ValueError(f"Lumina2: multiple_of ({self.multiple_of}) and ffn_dim_multiplier "
                             f"({self.ffn_dim_multiplier}) must be positive")

    def positions(self, caption_lengths: Array, caption_slots: int,
                  grid: tuple[int, int]) -> Array:
        """Rotary position ids (B, caption_slots + h·w, 3) of the joint sequence: caption slot
        k → (k, 0, 0) (padded slots too: they are masked), image token (r, c) → (n_b, r, c)."""
        b, (h, w) = caption_lengths.shape[0], grid
        k = jnp.arange(caption_slots, dtype=jnp.int32)
        caption = jnp.stack([k, jnp.zeros_like(k), jnp.zeros_like(k)], axis=-1)
        rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.int32),
                                  jnp.arange(w, dtype=jnp.int32), indexing="ij")
        image = jnp.stack([jnp.broadcast_to(caption_lengths[:, None], (b, h * w)),
                           jnp.broadcast_to(rows.reshape(1, -1), (b, h * w)),
                           jnp.broadcast_to(cols.reshape(1, -1), (b, h * w))], axis=-1)
        return jnp.concatenate([jnp.broadcast_to(caption, (b, caption_slots, 3)), image], axis=1)

    @nn.compact
    def __call__(self, x: Array, t: Array, context: Array,
                 context_mask: Array | None = None) -> Array:
        self.check_config()
        grid = check_latents("Lumina2", x, self.in_channels, self.patch_size)
        b = x.shape[0]
        check_vector("Lumina2", "t", t, (b,))
        check_context("Lumina2", context, context_mask, b, self.caption_channels)
        d, p, n_cap = self.hidden_size, self.patch_size, context.shape[1]
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        mask = (jnp.ones((b, n_cap), bool) if context_mask is None
                else context_mask.astype(bool))

        lumina_t = 1.0 - t.astype(jnp.float32) / 1000.0  # Lumina's time: 0 = noise
        temb = TimestepEmbedder(self.conditioning_size, name="t_embedder",
                                param_dtype=self.param_dtype, precision=self.precision)(lumina_t)
        # Padded slots are zeroed so that whatever a caller left there stays finite.
        context = jnp.where(mask[..., None], context, jnp.zeros_like(context))
        context = RMSNorm(self.norm_eps, axis_name="caption", param_dtype=self.param_dtype,
                          name="caption_norm")(context)
        caption = Dense(d, ("caption",), ("embed",), name="caption_projection", **common)(context)
        image = PatchEmbed(d, p, name="x_embedder", **common)(x)

        lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
        cos, sin = rotary_cos_sin(self.positions(lengths, n_cap, grid), self.axes_dim_rope,
                                  (n_cap + 1, *grid), ROPE_THETA)
        cap_rope, img_rope = (cos[:, :n_cap], sin[:, :n_cap]), (cos[:, n_cap:], sin[:, n_cap:])
        block = dict(hidden_size=d, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                     ffn_hidden=self.ffn_hidden, norm_eps=self.norm_eps,
                     attention_impl=self.attention_impl, **common)
        refiner = dict(depth=self.refiner_depth, remat_policy=self.remat_policy)
        key_mask = None if context_mask is None else mask
        caption = Lumina2Refiner(block=tuple(dict(block, modulated=False).items()),
                                 name="context_refiner", **refiner)(
            caption.astype(jnp.float32), None, cap_rope, key_mask)
        image = Lumina2Refiner(block=tuple(block.items()), name="noise_refiner", **refiner)(
            image.astype(jnp.float32), temb, img_rope, None)

        joint = jnp.concatenate([caption, image], axis=1)
        if key_mask is not None:
            key_mask = jnp.concatenate([key_mask, jnp.ones(image.shape[:2], bool)], axis=1)
        joint = run_blocks(Lumina2Block, self.per_layer(), block, joint, temb, (cos, sin),
                           key_mask, scan=self.scan_layers, remat=self.remat_policy)
        out = Lumina2FinalLayer(d, p * p * self.out_channels, name="final_layer", **common)(
            joint[:, n_cap:], temb)
        return -unpatchify(out.astype(jnp.float32), grid, p, self.out_channels)
