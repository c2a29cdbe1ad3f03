"""SANA-Video: SANA's linear DiT over video latents (diffusers ``SanaVideoTransformer3DModel``).

Blocks as SANA's (adaLN-single, linear self-attention, an ungated softmax cross-attention to the
caption, Mix-FFN) with three changes for video:
- 3-D rotary positions (Wan's split of a head into time, height and width channels) applied to
  relu(q) and relu(k) inside the linear attention; the denominator keeps the un-rotated
  features, so it stays positive (:func:`jdit.nn.linear_attention.linear_attention_chunk`);
- the Mix-FFN runs on every frame and adds a residual 3-tap convolution over the frames
  (:class:`jdit.nn.mix_ffn.TemporalConv`);
- ``pt×p×p`` patches (:mod:`jdit.nn.video_patch`), frames and tokens kept as separate axes, so
  activations carry ("batch", "time", "length", "act_embed") and the ``context`` mesh axis can
  split the frames.
Timesteps may be given per latent frame (diffusers' image-to-video pipeline holds the
conditioning frame at t = 0 this way). Facts and weight names: ``docs/video.md`` and
``jdit/weights/sana_video.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.models.checks import check_context, check_vector
from jdit.nn.attention import CrossAttention
from jdit.nn.embeddings import TimestepEmbedder
from jdit.nn.layers import (
    Array,
    Dense,
    DType,
    Mlp,
    RMSNorm,
    constrain,
    layer_norm,
    modulate,
    normal,
    zeros,
)
from jdit.nn.linear_attention import LinearSelfAttention
from jdit.nn.mix_ffn import VIDEO_NAMES, MixFFN
from jdit.nn.modulation import AdaLNModulation, scale_shift_table
from jdit.nn.rotary import rotary_grid, wan_axes_dim
from jdit.nn.stack import run_blocks
from jdit.nn.video_patch import VideoPatchEmbed, unpatchify_video


class SanaVideoBlock(nn.Module):
    """Linear self-attention with 3-D rotary positions, cross-attention (no norm, no gate) and
    the temporal Mix-FFN, on the residual stream (B, T, L, D) of T frames of L tokens."""

    hidden_size: int
    num_heads: int  # linear self-attention heads
    cross_num_heads: int
    cross_head_dim: int
    mlp_ratio: float
    grid_hw: tuple[int, int]
    qk_norm: bool = True
    qkv_bias: bool = False
    linear_eps: float = 1e-15
    temporal_kernel: int = 3
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, context: Array, context_mask: Array | None, t0: Array,
                 rotary: tuple[Array, Array]) -> tuple[Array, None]:
        """t0: (B, T or 1, 6, D), the shared timestep modulation (per frame or per video);
        rotary: (cos, sin), each (1, T·L, head_dim / 2)."""
        b, frames, length, d = x.shape
        dt, flat = self.dtype, (b, frames * length, d)
        common = dict(dtype=dt, param_dtype=self.param_dtype, precision=self.precision)
        x = constrain(x, VIDEO_NAMES)
        mods = scale_shift_table(self, 6, d, self.param_dtype)[None, None] + t0
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            mods[:, :, i : i + 1] for i in range(6))  # each (B, T or 1, 1, D)
        h = modulate(layer_norm(x, 1e-6), shift_msa, scale_msa).astype(dt)
        h = LinearSelfAttention(
            self.num_heads, d // self.num_heads, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm,
            eps=self.linear_eps, attention_impl=self.attention_impl, name="attn", **common,
        )(h.reshape(flat), rotary=rotary)
        x = x + gate_msa * h.reshape(x.shape).astype(jnp.float32)
        h = CrossAttention(
            self.cross_num_heads, self.cross_head_dim, qk_norm=self.qk_norm, out_init=zeros,
            attention_impl=self.attention_impl, name="cross_attn", **common,
        )(x.reshape(flat).astype(dt), context, context_mask)
        x = x + h.reshape(x.shape).astype(jnp.float32)
        h = modulate(layer_norm(x, 1e-6), shift_mlp, scale_mlp).astype(dt)
        h = MixFFN(int(d * self.mlp_ratio), d, self.grid_hw, frames=frames,
                   temporal_kernel=self.temporal_kernel, name="mlp", **common)(h.reshape(flat))
        x = x + gate_mlp * h.reshape(x.shape).astype(jnp.float32)
        return constrain(x, VIDEO_NAMES), None


class VideoFinalLayer(nn.Module):
    """``LN -> modulate -> Dense(pt·p·p·C_out)`` with adaLN-single's (2, D) table plus the
    timestep embedding, per frame when the timesteps are; the output Dense starts at zero."""

    hidden_size: int
    out_features: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        """x (B, T, L, D); temb (B, T or 1, D)."""
        mods = scale_shift_table(self, 2, self.hidden_size, self.param_dtype)[None, None] \
            + temb[:, :, None, :]
        h = modulate(layer_norm(x, 1e-6), mods[:, :, 0:1], mods[:, :, 1:2])
        return Dense(self.out_features, ("embed",), (None,), kernel_init=zeros, dtype=self.dtype,
                     param_dtype=self.param_dtype, precision=self.precision, name="linear")(h)


class SanaVideo(nn.Module):
    """SANA-Video transformer. ``apply(vars, x, t, context=c, context_mask=m)``.

    x: (B, T, H, W, in_channels) latents, channels last (Wan 2.1 VAE: 16 channels; T latent
    frames, a multiple of ``temporal_patch_size``); t: (B,) timesteps in [0, 1000] (flow
    matching: 1000·σ), or (B, T / temporal_patch_size), one per latent frame; context:
    (B, L, caption_channels) text features (Gemma-2: 2304); context_mask: (B, L), 1 keeps a
    token. Returns (B, T, H, W, out_channels) float32: the flow velocity.
    """

    input_size: int = 60  # latent height at the training resolution (480 px / 8)
    input_width: int = 104  # latent width at the training resolution (832 px / 8)
    input_frames: int = 21  # latent frames at the training length (81 frames: 1 + 80 / 4)
    patch_size: int = 2
    temporal_patch_size: int = 1
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 2240
    depth: int = 20
    num_heads: int = 20  # linear self-attention heads (head dim 112)
    cross_num_heads: int = 20
    cross_head_dim: int = 112
    mlp_ratio: float = 3.0
    caption_channels: int = 2304
    qk_norm: bool = True
    qkv_bias: bool = False
    temporal_kernel: int = 3  # taps of the Mix-FFN's temporal convolution
    rope_max_len: int = 1024  # rotary tables' length per axis (diffusers' rope_max_seq_len)
    linear_eps: float = 1e-15
    caption_norm_init: float = 1.0
    guidance_embeds: bool = False  # the guidance scale embedded like t (none published)
    guidance_embeds_scale: float = 0.1  # the guidance scale is embedded times this
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    def per_layer(self) -> list[dict[str, Any]]:
        return [{} for _ in range(self.depth)]

    def example_inputs(self, batch: int = 1, caption_length: int = 8) -> dict[str, Array]:
        inputs = dict(
            x=jnp.zeros((batch, self.input_frames, self.input_size, self.input_width,
                         self.in_channels)),
            t=jnp.zeros((batch,)),
            context=jnp.zeros((batch, caption_length, self.caption_channels)),
            context_mask=jnp.ones((batch, caption_length), jnp.int32),
        )
        if self.guidance_embeds:
            inputs["guidance"] = jnp.full((batch,), 4.5)
        return inputs

    def check_config(self) -> None:
        name = "SanaVideo"
        if self.depth < 1 or self.patch_size < 1 or self.temporal_patch_size < 1:
            raise ValueError(f"{name}: depth, patch_size and temporal_patch_size must be >= 1, "
                             f"got {self.depth}, {self.patch_size}, {self.temporal_patch_size}")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"{name}: hidden_size {self.hidden_size} must be divisible by "
                             f"num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"{name}: the linear-attention head dim "
                             f"{self.hidden_size // self.num_heads} must be even (3-D rotary "
                             f"positions rotate channel pairs)")
        if self.cross_num_heads < 1 or self.cross_head_dim < 1:
            raise ValueError(f"{name}: cross_num_heads and cross_head_dim must be >= 1")
        if self.temporal_kernel < 0 or (self.temporal_kernel and self.temporal_kernel % 2 == 0):
            raise ValueError(f"{name}: temporal_kernel must be 0 (none) or odd, got "
                             f"{self.temporal_kernel}")
        if self.input_frames < 1 or self.input_frames % self.temporal_patch_size:
            raise ValueError(f"{name}: input_frames {self.input_frames} must be a positive "
                             f"multiple of temporal_patch_size {self.temporal_patch_size}")
        if self.rope_max_len < 1:
            raise ValueError(f"{name}: rope_max_len must be >= 1, got {self.rope_max_len}")

    def check_latents(self, x: Any) -> tuple[int, int, int]:
        """The token grid (T', h, w) of (B, T, H, W, C) latents, or a ValueError."""
        name, c, p, pt = "SanaVideo", self.in_channels, self.patch_size, self.temporal_patch_size
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 5:
            raise ValueError(f"{name}: x must be video latents of shape (B, T, H, W, {c}), "
                             f"channels last, got shape {shape}")
        _, frames, h, w, got = shape
        if got != c:
            raise ValueError(f"{name}: x must have {c} channels in the last axis (B, T, H, W, "
                             f"C), got shape {shape}")
        if frames < 1 or frames % pt:
            raise ValueError(f"{name}: the number of latent frames T={frames} must be a "
                             f"positive multiple of temporal_patch_size {pt}")
        if h % p or w % p:
            raise ValueError(f"{name}: latent height and width must be multiples of patch_size "
                             f"{p}, got {h}x{w}")
        grid = (frames // pt, h // p, w // p)
        if max(grid) > self.rope_max_len:
            raise ValueError(f"{name}: the token grid {grid} (frames, rows, columns) exceeds "
                             f"the rotary tables' length rope_max_len={self.rope_max_len}")
        return grid

    def embed_time(self, t: Array, guidance: Array | None, batch: int, frames: int
                   ) -> Array:
        """The timestep embedding, (B, 1, D) for one t per video or (B, T', D) per frame."""
        if t.shape not in ((batch,), (batch, frames)):
            raise ValueError(f"SanaVideo: t must have shape ({batch},) or ({batch}, {frames}) "
                             f"(one per latent frame after temporal patching), got {t.shape}")
        cond = dict(param_dtype=self.param_dtype, precision=self.precision)
        temb = TimestepEmbedder(self.hidden_size, name="t_embedder", **cond)(t.reshape(-1))
        temb = temb.reshape(batch, -1, self.hidden_size)
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("SanaVideo: this model embeds the guidance scale "
                                 "(guidance_embeds): pass guidance=, one scale per video")
            check_vector("SanaVideo", "guidance", guidance, (batch,))
            g = TimestepEmbedder(self.hidden_size, name="guidance_embedder", **cond)(
                guidance.astype(jnp.float32) * self.guidance_embeds_scale)
            temb = temb + g[:, None, :]
        elif guidance is not None:
            raise ValueError("SanaVideo: guidance= is for models with guidance_embeds; this one "
                             "is guided by classifier-free guidance")
        return temb

    @nn.compact
    def __call__(self, x: Array, t: Array, context: Array, context_mask: Array | None = None,
                 guidance: Array | None = None) -> Array:
        """``guidance`` (B,): the guidance scale of a model with ``guidance_embeds``, unscaled."""
        self.check_config()
        grid = self.check_latents(x)
        b = x.shape[0]
        check_context("SanaVideo", context, context_mask, b, self.caption_channels)
        d, p, pt = self.hidden_size, self.patch_size, self.temporal_patch_size
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        cond = dict(param_dtype=self.param_dtype, precision=self.precision)

        tokens = VideoPatchEmbed(d, p, pt, name="patch_embed", **common)(x).astype(jnp.float32)
        tokens = constrain(tokens, VIDEO_NAMES)
        temb = self.embed_time(t, guidance, b, grid[0])  # (B, T' or 1, D)
        t0 = AdaLNModulation(6, d, kernel_init=normal(0.02), name="t_block", **cond)(
            temb.reshape(-1, d)).reshape(b, temb.shape[1], 6, d)
        cos, sin = rotary_grid(grid, wan_axes_dim(d // self.num_heads))
        y = Mlp(d, d, in_axis="caption", fc1_init=normal(0.02), fc2_init=normal(0.02),
                name="caption_projection", **common)(context)
        y = RMSNorm(1e-5, self.caption_norm_init, param_dtype=self.param_dtype,
                    name="caption_norm")(y)
        shared = dict(
            hidden_size=d, num_heads=self.num_heads, cross_num_heads=self.cross_num_heads,
            cross_head_dim=self.cross_head_dim, mlp_ratio=self.mlp_ratio, grid_hw=grid[1:],
            qk_norm=self.qk_norm, qkv_bias=self.qkv_bias, linear_eps=self.linear_eps,
            temporal_kernel=self.temporal_kernel, attention_impl=self.attention_impl, **common,
        )
        h = run_blocks(SanaVideoBlock, self.per_layer(), shared, tokens, y, context_mask, t0,
                       (cos[None], sin[None]), scan=self.scan_layers, remat=self.remat_policy)
        out = VideoFinalLayer(d, pt * p * p * self.out_channels, name="final_layer", **common)(
            h, temb)
        return unpatchify_video(out.astype(jnp.float32), grid, p, pt, self.out_channels)
