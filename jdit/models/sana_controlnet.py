"""SANA's ControlNet-Transformer (diffusers ``SanaControlNetModel``).

Copies of the base's first ``depth`` blocks read the noisy latents plus the condition latents
(both through the ControlNet's own patch embedding; the condition through a zero-initialised
``input_block``), and each copy's output goes through a zero-initialised linear projection
(``controlnet_block_{i}``). The base adds projection ``i`` to the output of its block ``i + 1``
(:func:`jdit.control.controlnet.block_residuals`), so at initialisation the base is unchanged.
Weight names: ``jdit/weights/sana_controlnet.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.models.checks import check_config, check_context, check_latents, check_vector
from jdit.models.sana import SanaBlock
from jdit.nn.embeddings import PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
from jdit.nn.layers import Array, Dense, DType, Mlp, RMSNorm, normal, zeros
from jdit.nn.modulation import AdaLNModulation
from jdit.nn.stack import run_blocks


class SanaControlNet(nn.Module):
    """``apply(vars, x, t, context, context_mask, condition, scale)`` -> residuals
    (depth, B, L, hidden), already multiplied by ``scale`` (diffusers'
    ``controlnet_conditioning_scale``). ``x`` and ``condition``: (B, H, W, in_channels)."""

    input_size: int = 32
    patch_size: int = 1
    in_channels: int = 32
    hidden_size: int = 2240
    depth: int = 7
    num_heads: int = 70
    cross_num_heads: int = 20
    mlp_ratio: float = 2.5
    caption_channels: int = 2304
    pos_embed: bool = False
    pe_interpolation: float = 1.0
    qk_norm: bool = False
    linear_eps: float = 1e-15
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    residual_offset = 1  # projection i goes to the base's block i + 1

    def per_layer(self) -> list[dict[str, Any]]:
        return [{} for _ in range(self.depth)]

    def example_inputs(self, batch: int = 1, caption_length: int = 8) -> dict[str, Array]:
        s = self.input_size
        return dict(x=jnp.zeros((batch, s, s, self.in_channels)), t=jnp.zeros((batch,)),
                    context=jnp.zeros((batch, caption_length, self.caption_channels)),
                    context_mask=jnp.ones((batch, caption_length), jnp.int32),
                    condition=jnp.zeros((batch, s, s, self.in_channels)))

    def check_config(self) -> None:
        check_config("SanaControlNet", self.hidden_size, self.num_heads, self.depth,
                     self.patch_size)
        if self.cross_num_heads < 1 or self.hidden_size % self.cross_num_heads:
            raise ValueError(f"SanaControlNet: hidden_size {self.hidden_size} must be divisible "
                             f"by cross_num_heads {self.cross_num_heads}")

    @nn.compact
    def __call__(self, x: Array, t: Array, context: Array, context_mask: Array | None,
                 condition: Array, scale: float | Array = 1.0) -> Array:
        self.check_config()
        grid = check_latents("SanaControlNet", x, self.in_channels, self.patch_size)
        if tuple(condition.shape) != tuple(x.shape):
            raise ValueError(f"SanaControlNet: the condition latents must have the latents' "
                             f"shape {tuple(x.shape)}, got {tuple(condition.shape)}")
        b = x.shape[0]
        check_vector("SanaControlNet", "t", t, (b,))
        check_context("SanaControlNet", context, context_mask, b, self.caption_channels)
        d, p = self.hidden_size, self.patch_size
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        # (the zero projections' kernels are (D, D): their output dimension takes the name
        # "mlp", since a kernel cannot carry one logical name twice)
        cond = dict(param_dtype=self.param_dtype, precision=self.precision)

        embed = PatchEmbed(d, p, name="patch_embed", **common)

        def tokens_of(z: Array) -> Array:
            out = embed(z).astype(jnp.float32)
            if self.pos_embed:
                out = out + sincos_pos_embed_2d(d, grid, self.input_size // p,
                                                self.pe_interpolation)
            return out

        h = tokens_of(x) + Dense(d, ("embed",), ("mlp",), kernel_init=zeros, name="input_block",
                                 **common)(tokens_of(condition)).astype(jnp.float32)
        temb = TimestepEmbedder(d, name="t_embedder", **cond)(t)
        t0 = AdaLNModulation(6, d, kernel_init=normal(0.02), name="t_block", **cond)(temb)
        y = Mlp(d, d, in_axis="caption", fc1_init=normal(0.02), fc2_init=normal(0.02),
                name="caption_projection", **common)(context)
        y = RMSNorm(1e-5, param_dtype=self.param_dtype, name="caption_norm")(y)
        shared = dict(hidden_size=d, num_heads=self.num_heads, cross_num_heads=self.cross_num_heads,
                      mlp_ratio=self.mlp_ratio, grid_hw=grid, qk_norm=self.qk_norm,
                      linear_eps=self.linear_eps, attention_impl=self.attention_impl,
                      emit_hidden=True, **common)
        _, hidden = run_blocks(SanaBlock, self.per_layer(), shared, h, y, context_mask, t0,
                               scan=self.scan_layers, remat=self.remat_policy)
        out = jnp.stack([
            Dense(d, ("embed",), ("mlp",), kernel_init=zeros, name=f"controlnet_block_{i}",
                  **common)(hidden[i]).astype(jnp.float32) for i in range(self.depth)])
        return out * jnp.asarray(scale, jnp.float32)
