"""Latte: a text-to-video DiT of PixArt-α blocks alternating spatial and temporal attention.

Each of the ``depth`` block pairs is a PixArt-α block run on every frame (self-attention over the
frame's tokens, cross-attention to the caption, MLP) followed by a temporal block (self-attention
over the frames at one spatial position, MLP; no cross-attention). Both halves are modulated by
the same adaLN-single timestep vector. A 1-D sin-cos embedding of the frame index is added to the
residual stream once, between the spatial and the temporal half of the first pair.

Frames and tokens stay separate axes: the residual stream is (B, T, N, D) between blocks, so
``("batch", "time", "length", "act_embed")`` constraints can split frames over the ``context``
mesh axis. Weight names and quirks (diffusers ``LatteTransformer3DModel``): ``docs/models.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.models.checks import check_config, check_context, check_vector
from jdit.nn.attention import CrossAttention, SelfAttention
from jdit.nn.embeddings import (
    PatchEmbed,
    TimestepEmbedder,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
    unpatchify,
)
from jdit.nn.layers import (
    MLP_NAMES,
    Array,
    DType,
    Mlp,
    constrain,
    layer_norm,
    modulate,
    normal,
    zeros,
)
from jdit.nn.modulation import AdaLNModulation, FinalLayer, block_modulations, scale_shift_table
from jdit.nn.stack import run_blocks

VIDEO_NAMES = ("batch", "time", "length", "act_embed")  # the residual stream (B, T, N, D)


def _modulations(module: nn.Module, d: int, t0: Array, param_dtype: DType) -> list[Array]:
    """The block's six adaLN-single vectors, each (B, 1, 1, D): broadcast over frames and tokens
    (diffusers repeats the timestep over frames and positions; the values are the same)."""
    return [m[:, None] for m in block_modulations(module, d, t0, param_dtype)]


class SpatialBlock(nn.Module):
    """PixArt-α's block on each frame: self-attention within the frame, cross-attention (no norm,
    no gate) to the caption, MLP. Parameter names are :class:`jdit.models.pixart.PixArtBlock`'s.

    Cross-attention runs on all of a video's tokens at once against its one caption: queries are
    independent, so this equals diffusers' per-frame copies of the caption without repeating its
    keys and values ``T`` times.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, context: Array, context_mask: Array | None, t0: Array) -> Array:
        b, f, n, d = x.shape
        dt, eps = self.dtype, self.norm_eps
        common = dict(dtype=dt, param_dtype=self.param_dtype, precision=self.precision)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulations(
            self, d, t0, self.param_dtype)
        h = modulate(layer_norm(x, eps), shift_msa, scale_msa).astype(dt)
        h = SelfAttention(self.num_heads, d // self.num_heads, attention_impl=self.attention_impl,
                          name="attn", **common)(h.reshape(b * f, n, d))
        x = constrain(x + gate_msa * h.reshape(b, f, n, d).astype(jnp.float32), VIDEO_NAMES)
        h = CrossAttention(self.num_heads, d // self.num_heads, out_init=zeros,
                           attention_impl=self.attention_impl, name="cross_attn", **common,
                           )(x.reshape(b, f * n, d).astype(dt), context, context_mask)
        x = x + h.reshape(b, f, n, d).astype(jnp.float32)
        h = modulate(layer_norm(x, eps), shift_mlp, scale_mlp).astype(dt)
        h = Mlp(int(d * self.mlp_ratio), d, hidden_names=MLP_NAMES, name="mlp", **common,
                )(h.reshape(b, f * n, d))
        return constrain(x + gate_mlp * h.reshape(b, f, n, d).astype(jnp.float32), VIDEO_NAMES)


class TemporalBlock(nn.Module):
    """Self-attention over the frames at each spatial position, then an MLP (adaLN-single).

    The two residual steps are separate methods (:meth:`attention`, :meth:`feed_forward`) and
    ``after_temporal`` — a factory of a module called as ``hook(x, layer)`` on the (B, T, N, D)
    stream — runs between them: the place where ARLON injects its coarse latent "after temporal
    attention". None (the published model) runs nothing there.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    norm_eps: float = 1e-6
    after_temporal: Callable[[], nn.Module] | None = None
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    def setup(self) -> None:
        d = self.hidden_size
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.scale_shift_table = scale_shift_table(self, 6, d, self.param_dtype)
        self.attn = SelfAttention(self.num_heads, d // self.num_heads,
                                  attention_impl=self.attention_impl, **common)
        self.mlp = Mlp(int(d * self.mlp_ratio), d, hidden_names=MLP_NAMES, **common)
        self.hook = None if self.after_temporal is None else self.after_temporal()

    def modulations(self, t0: Array) -> list[Array]:
        mods = self.scale_shift_table[None].astype(jnp.float32) + t0
        return [mods[:, i : i + 1, None] for i in range(6)]  # each (B, 1, 1, D)

    def attention(self, x: Array, mods: list[Array]) -> Array:
        """``x + gate * attn(modulate(LN(x)))`` with attention along the time axis."""
        b, f, n, d = x.shape
        shift, scale, gate = mods[:3]
        h = modulate(layer_norm(x, self.norm_eps), shift, scale).astype(self.dtype)
        h = jnp.swapaxes(h, 1, 2).reshape(b * n, f, d)  # (B·N, T, D): one sequence per position
        h = jnp.swapaxes(self.attn(h).reshape(b, n, f, d), 1, 2)
        return constrain(x + gate * h.astype(jnp.float32), VIDEO_NAMES)

    def feed_forward(self, x: Array, mods: list[Array]) -> Array:
        b, f, n, d = x.shape
        shift, scale, gate = mods[3:]
        h = modulate(layer_norm(x, self.norm_eps), shift, scale).astype(self.dtype)
        h = self.mlp(h.reshape(b, f * n, d)).reshape(b, f, n, d)
        return constrain(x + gate * h.astype(jnp.float32), VIDEO_NAMES)

    def __call__(self, x: Array, t0: Array, layer: Any = None) -> Array:
        mods = self.modulations(t0)
        x = self.attention(x, mods)
        if self.hook is not None:
            x = self.hook(x, layer)
        return self.feed_forward(x, mods)


class LatteBlock(nn.Module):
    """One spatial + temporal pair. ``temporal_pos``: this pair adds the frame embedding before
    its temporal half (the first pair only; with one frame diffusers adds nothing)."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    norm_eps: float = 1e-6
    temporal: bool = True  # False: diffusers' enable_temporal_attentions=False (images)
    temporal_pos: bool = False
    after_temporal: Callable[[], nn.Module] | None = None
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, context: Array, context_mask: Array | None, t0: Array,
                 temp_pos: Array, layer: Any = None) -> tuple[Array, None]:
        common = dict(hidden_size=self.hidden_size, num_heads=self.num_heads,
                      mlp_ratio=self.mlp_ratio, norm_eps=self.norm_eps,
                      attention_impl=self.attention_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype, precision=self.precision)
        x = SpatialBlock(name="spatial", **common)(x, context, context_mask, t0)
        temporal = TemporalBlock(after_temporal=self.after_temporal, name="temporal", **common)
        if not self.temporal:
            return x, None
        if self.temporal_pos and x.shape[1] > 1:
            x = x + temp_pos[None, :, None, :]
        return temporal(x, t0, layer), None


class Latte(nn.Module):
    """Latte transformer. ``apply(vars, x, t, context=c, context_mask=m)``.

    x: (B, T, H, W, in_channels) latents, frames then NHWC; t: (B,) DDPM timesteps; context:
    (B, L, caption_channels) text features; context_mask: (B, L), 1 keeps a token. Returns
    (B, T, H, W, out_channels) float32; with ``learn_sigma`` the first ``in_channels`` channels
    are ε and the rest the variance interpolation v.

    T may be anything from 1 to ``video_length``: frame ``i`` gets the sin-cos embedding of
    position ``i`` (diffusers accepts only T = ``video_length``; a shorter clip here equals a
    diffusers model built with ``video_length=T``, whose embedding is a prefix of this one).
    ``temporal=False`` skips the temporal halves (diffusers' ``enable_temporal_attentions``).
    ``block_inputs``: a pytree with a leading ``depth`` axis, block ``i``'s slice passed to its
    ``after_temporal`` hook.
    """

    input_size: int = 64  # latent side at the training resolution (diffusers' sample_size)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    learn_sigma: bool = True
    # channels of the prediction when they differ from the input's (0: in_channels): a model
    # given known frames reads [x, known, mask] (2 C + 1 channels) and predicts C
    predict_channels: int = 0
    video_length: int = 16  # frames the temporal position embedding covers
    norm_eps: float = 1e-6
    # a factory of the module run right after each temporal attention (ARLON's injection)
    after_temporal: Callable[[], nn.Module] | None = None
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    dtype: DType = jnp.float32  # compute dtype; softmax, norms and conditioning stay float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @property
    def out_channels(self) -> int:
        c = self.predict_channels or self.in_channels
        return c * 2 if self.learn_sigma else c

    @property
    def pe_interpolation(self) -> float:
        """The 2-D position scale diffusers derives from ``sample_size``: max(size // 64, 1)."""
        return float(max(self.input_size // 64, 1))

    def per_layer(self) -> list[dict[str, Any]]:
        """Block settings that vary with depth: the first pair adds the frame embedding."""
        return [{"temporal_pos": i == 0} for i in range(self.depth)]

    def example_inputs(self, batch: int = 1, caption_length: int = 8,
                       frames: int | None = None) -> dict[str, Array]:
        """Zero inputs of the training shape (``video_length`` frames), for ``init`` and
        ``jax.eval_shape``."""
        s, f = self.input_size, self.video_length if frames is None else frames
        return dict(
            x=jnp.zeros((batch, f, s, s, self.in_channels)),
            t=jnp.zeros((batch,)),
            context=jnp.zeros((batch, caption_length, self.caption_channels)),
            context_mask=jnp.ones((batch, caption_length), jnp.int32),
        )

    def check_config(self) -> None:
        check_config("Latte", self.hidden_size, self.num_heads, self.depth, self.patch_size)
        if self.predict_channels < 0:
            raise ValueError(f"Latte: predict_channels must be >= 0 (0: in_channels), got "
                             f"{self.predict_channels}")
        if self.video_length < 1:
            raise ValueError(f"Latte: video_length must be >= 1, got {self.video_length}")
        if self.norm_eps <= 0:
            raise ValueError(f"Latte: norm_eps must be > 0, got {self.norm_eps}")

    def check_latents(self, x: Any) -> tuple[int, int, int]:
        """(T, h, w): frames and token grid of (B, T, H, W, C) latents, or a clear error."""
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 5:
            raise ValueError(f"Latte: x must be video latents of shape (B, T, H, W, "
                             f"{self.in_channels}) (frames, then channels last), got {shape}")
        _, f, h, w, c = shape
        if c != self.in_channels:
            raise ValueError(f"Latte: x must have {self.in_channels} channels in the last axis, "
                             f"got shape {shape}")
        if not 1 <= f <= self.video_length:
            raise ValueError(f"Latte: x has {f} frames; this model's temporal position "
                             f"embedding covers 1 to video_length={self.video_length} frames")
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"Latte: latent height and width must be multiples of patch_size "
                             f"{p}, got {h}x{w}")
        return f, h // p, w // p

    @nn.compact
    def __call__(self, x: Array, t: Array, context: Array, context_mask: Array | None = None,
                 temporal: bool = True, block_inputs: Any = None) -> Array:
        self.check_config()
        f, gh, gw = self.check_latents(x)
        b = x.shape[0]
        check_vector("Latte", "t", t, (b,))
        check_context("Latte", context, context_mask, b, self.caption_channels)
        if not isinstance(temporal, bool):
            raise ValueError(f"Latte: temporal must be a Python bool (a static argument under "
                             f"jit), got {type(temporal).__name__}")
        d, p = self.hidden_size, self.patch_size
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        cond = dict(param_dtype=self.param_dtype, precision=self.precision)

        frames = x.reshape(b * f, *x.shape[2:])
        pos = sincos_pos_embed_2d(d, (gh, gw), self.input_size // p, self.pe_interpolation)
        tokens = PatchEmbed(d, p, name="patch_embed", **common)(frames).astype(jnp.float32) + pos
        tokens = constrain(tokens.reshape(b, f, gh * gw, d), VIDEO_NAMES)

        temb = TimestepEmbedder(d, name="t_embedder", **cond)(t)
        t0 = AdaLNModulation(6, d, kernel_init=normal(0.02), name="t_block", **cond)(temb)
        y = Mlp(d, d, in_axis="caption", fc1_init=normal(0.02), fc2_init=normal(0.02),
                name="caption_projection", **common)(context)
        temp_pos = jnp.asarray(sincos_pos_embed_1d(d, f))

        shared = dict(hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                      norm_eps=self.norm_eps, temporal=temporal,
                      after_temporal=self.after_temporal, attention_impl=self.attention_impl,
                      **common)
        h = run_blocks(LatteBlock, self.per_layer(), shared, tokens, y, context_mask, t0,
                       temp_pos, scan=self.scan_layers, remat=self.remat_policy,
                       layer_inputs=block_inputs)
        out = FinalLayer(d, p * p * self.out_channels, "adaln_single", name="final_layer",
                         **common)(h.reshape(b, f * gh * gw, d), temb)
        out = unpatchify(out.reshape(b * f, gh * gw, -1).astype(jnp.float32), (gh, gw), p,
                         self.out_channels)
        return out.reshape(b, f, *out.shape[1:])
