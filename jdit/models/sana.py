"""SANA: a linear-attention DiT (ReLU linear self-attention, Mix-FFN, softmax cross-attention).

Blocks as PixArt's (adaLN-single, an ungated cross-attention residual) with three changes:
linear self-attention, a Mix-FFN whose depthwise 3×3 convolution supplies position (the 512 and
1024 px models use no position embedding: ``pos_embed=False``), and an RMSNorm on the projected
caption. SANA 1.5 adds RMSNorm on q and k across heads in both attentions (``qk_norm``).
Facts and weight names: ``docs/models.md`` and ``jdit/weights/sana.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.models.checks import (
    check_config,
    check_context,
    check_control,
    check_latents,
    check_text_refiner,
    check_vector,
    layer_inputs,
)
from jdit.nn.attention import CrossAttention
from jdit.nn.embeddings import PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, unpatchify
from jdit.nn.layers import (
    TOKEN_NAMES,
    Array,
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
from jdit.nn.mix_ffn import MixFFN
from jdit.nn.modulation import AdaLNModulation, FinalLayer, block_modulations
from jdit.nn.stack import run_blocks
from jdit.nn.text_refiner import TextRefiner, TextRefinerConfig


class SanaBlock(nn.Module):
    """Linear self-attention, cross-attention (no norm, no gate) and Mix-FFN.

    ``branch="condition"`` runs a control condition's tokens (EasyControl, :mod:`jdit.control`):
    linear attention among themselves, no cross-attention; the block returns their attention
    state (Σ relu(k)ᵀv, Σ relu(k)), which the image branch adds to its own (``control``).
    """

    hidden_size: int
    num_heads: int  # linear self-attention heads
    cross_num_heads: int
    mlp_ratio: float
    grid_hw: tuple[int, int]
    qk_norm: bool = False
    linear_eps: float = 1e-15
    attention_impl: str = "xla"
    branch: str = "image"  # | "condition"
    emit_hidden: bool = False  # also return the output (a ControlNet's per-block states)
    perturbed: bool = False  # PAG: the rows layer["perturb"] marks get identity self-attention
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(
        self, x: Array, context: Array | None, context_mask: Array | None, t0: Array,
        layer: dict[str, Any] | None = None,
    ) -> tuple[Array, Any]:
        """``layer``: this block's own inputs: ``control`` (conditions' keys and values, or
        linear-attention state) and ``residual`` (a ControlNet's, added to the output)."""
        layer = layer or {}
        control = layer.get("control")
        d, dt = self.hidden_size, self.dtype
        common = dict(dtype=dt, param_dtype=self.param_dtype, precision=self.precision)
        x = constrain(x, TOKEN_NAMES)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block_modulations(
            self, d, t0, self.param_dtype)
        h = modulate(layer_norm(x, 1e-6), shift_msa, scale_msa).astype(dt)
        h = LinearSelfAttention(
            self.num_heads, d // self.num_heads, qk_norm=self.qk_norm, eps=self.linear_eps,
            attention_impl=self.attention_impl, name="attn", **common,
        )(h, extra_state=control, return_state=self.branch == "condition",
          identity=layer.get("perturb") if self.perturbed else None)
        state = None
        if self.branch == "condition":
            h, state = h
        x = x + gate_msa * h.astype(jnp.float32)
        if self.branch == "condition":  # conditions never see the text
            h = modulate(layer_norm(x, 1e-6), shift_mlp, scale_mlp).astype(dt)
            h = MixFFN(int(d * self.mlp_ratio), d, self.grid_hw, name="mlp", **common)(h)
            return constrain(x + gate_mlp * h.astype(jnp.float32), TOKEN_NAMES), state
        h = CrossAttention(
            self.cross_num_heads, d // self.cross_num_heads, qk_norm=self.qk_norm, out_init=zeros,
            attention_impl=self.attention_impl, name="cross_attn", **common,
        )(x.astype(dt), context, context_mask)
        x = x + h.astype(jnp.float32)
        h = modulate(layer_norm(x, 1e-6), shift_mlp, scale_mlp).astype(dt)
        h = MixFFN(int(d * self.mlp_ratio), d, self.grid_hw, name="mlp", **common)(h)
        x = x + gate_mlp * h.astype(jnp.float32)
        if "residual" in layer:
            x = x + layer["residual"].astype(jnp.float32)
        x = constrain(x, TOKEN_NAMES)
        return x, (x if self.emit_hidden else None)


class Sana(nn.Module):
    """SANA transformer. ``apply(vars, x, t, context=c, context_mask=m)``.

    x: (B, H, W, in_channels) NHWC latents (DC-AE: 32 channels); t: (B,) timesteps in [0, 1000]
    (flow matching: 1000·σ); context: (B, L, caption_channels) text features (Gemma-2: 2304);
    context_mask: (B, L), 1 keeps a token. Returns (B, H, W, out_channels) float32: the flow
    velocity for the published models.
    """

    input_size: int = 32  # latent side at the training resolution (base of the position grid)
    patch_size: int = 1
    in_channels: int = 32
    out_channels: int = 32
    hidden_size: int = 2240
    depth: int = 20
    num_heads: int = 70  # linear self-attention heads (head dim 32)
    cross_num_heads: int = 20  # softmax cross-attention heads (head dim 112)
    mlp_ratio: float = 2.5
    caption_channels: int = 2304
    pos_embed: bool = False  # NoPE at 512/1024 px; 2K/4K fine-tunes add sin-cos positions
    pe_interpolation: float = 1.0
    qk_norm: bool = False
    linear_eps: float = 1e-15  # diffusers; the official blocks use 1e-8
    caption_norm_init: float = 1.0  # the official training init is 0.01 (loaded weights set it)
    # SANA-Sprint: the guidance scale is a model input (embedded like t, added to its embedding)
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1  # the guidance scale is embedded times this
    timestep_scale: float = 1.0  # the time embedding sees t × this (Sprint: 1e-3, i.e. σ)
    # perturbed-attention guidance: blocks with identity self-attention for the ``perturb`` rows
    pag_layers: tuple[int, ...] = ()
    # LI-DiT's refiner of LLM prompt features (jdit.nn.text_refiner); a dict in configs
    text_refiner: TextRefinerConfig | None = None
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    def per_layer(self) -> list[dict[str, Any]]:
        return [({"perturbed": True} if i in self.pag_layers else {}) for i in range(self.depth)]

    def example_inputs(self, batch: int = 1, caption_length: int = 8) -> dict[str, Array]:
        s = self.input_size
        if self.text_refiner is not None:
            caption_length = self.text_refiner.packed_length(caption_length)
        inputs = dict(
            x=jnp.zeros((batch, s, s, self.in_channels)),
            t=jnp.zeros((batch,)),
            context=jnp.zeros((batch, caption_length, self.caption_channels)),
            context_mask=jnp.ones((batch, caption_length), jnp.int32),
        )
        if self.guidance_embeds:
            inputs["guidance"] = jnp.full((batch,), 4.5)
        return inputs

    def check_config(self) -> None:
        check_config("Sana", self.hidden_size, self.num_heads, self.depth, self.patch_size)
        check_text_refiner("Sana", self.text_refiner, self.caption_channels)
        if self.cross_num_heads < 1 or self.hidden_size % self.cross_num_heads:
            raise ValueError(
                f"Sana: hidden_size {self.hidden_size} must be divisible by cross_num_heads "
                f"{self.cross_num_heads}"
            )

    def embed_time(self, t: Array, guidance: Array | None, batch: int) -> Array:
        """The conditioning vector of the timestep (and, for SANA-Sprint, the guidance scale)."""
        cond = dict(param_dtype=self.param_dtype, precision=self.precision)
        temb = TimestepEmbedder(self.hidden_size, name="t_embedder", **cond)(
            t * self.timestep_scale if self.timestep_scale != 1.0 else t)
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("Sana: this model embeds the guidance scale (guidance_embeds, "
                                 "SANA-Sprint): pass guidance=, one scale per image")
            check_vector("Sana", "guidance", guidance, (batch,))
            temb = temb + TimestepEmbedder(self.hidden_size, name="guidance_embedder", **cond)(
                guidance.astype(jnp.float32) * self.guidance_embeds_scale)
        elif guidance is not None:
            raise ValueError("Sana: guidance= is for models with guidance_embeds (SANA-Sprint); "
                             "this one is guided by classifier-free guidance")
        return temb

    def encode_condition(self, latents: Array) -> tuple[Array, Array]:
        """A control condition's linear-attention state in every block (EasyControl's condition
        branch, :mod:`jdit.control`): ``(Σ relu(k)ᵀv (depth, B, H, D, D), Σ relu(k) (depth, B,
        H, D))``, float32. Fixed-size whatever the condition's resolution; several conditions
        combine by summing their states. Timestep 0, no cross-attention, its own tokens only:
        the same at every denoising step. Run with the condition's LoRA applied to the params.
        """
        t = jnp.zeros((latents.shape[0],), jnp.float32)
        g = jnp.zeros((latents.shape[0],), jnp.float32) if self.guidance_embeds else None
        return self(latents, t, None, None, guidance=g, _branch="condition")

    @nn.compact
    def __call__(self, x: Array, t: Array, context: Array | None,
                 context_mask: Array | None = None, control: tuple[Array, Array] | None = None,
                 block_residuals: Array | None = None, guidance: Array | None = None,
                 perturb: Array | None = None, _branch: str = "image") -> Array:
        """``control``: conditions' per-block attention states (from :meth:`encode_condition`,
        several summed) added to the image tokens' own; ``block_residuals`` (depth, B, L,
        hidden): a ControlNet's, added to each block's output. None is the plain model, bit for
        bit. ``guidance`` (B,): the guidance scale of a model with ``guidance_embeds``
        (SANA-Sprint), unscaled."""
        self.check_config()
        condition = _branch == "condition"
        grid = check_latents("Sana", x, self.in_channels, self.patch_size)
        check_vector("Sana", "t", t, (x.shape[0],))
        if not condition:
            check_context("Sana", context, context_mask, x.shape[0], self.caption_channels)
        hd = self.hidden_size // self.num_heads
        if control is not None:
            check_control("Sana", control, self.depth, x.shape[0],
                          ((self.num_heads, hd, hd), (self.num_heads, hd)))
        d, p = self.hidden_size, self.patch_size
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        cond = dict(param_dtype=self.param_dtype, precision=self.precision)

        tokens = PatchEmbed(d, p, name="patch_embed", **common)(x).astype(jnp.float32)
        if self.pos_embed:
            tokens = tokens + sincos_pos_embed_2d(d, grid, self.input_size // p,
                                                  self.pe_interpolation)
        temb = self.embed_time(t, guidance, x.shape[0])
        t0 = AdaLNModulation(6, d, kernel_init=normal(0.02), name="t_block", **cond)(temb)
        shared = dict(
            hidden_size=d, num_heads=self.num_heads, cross_num_heads=self.cross_num_heads,
            mlp_ratio=self.mlp_ratio, grid_hw=grid, qk_norm=self.qk_norm,
            linear_eps=self.linear_eps, attention_impl=self.attention_impl, branch=_branch,
            **common,
        )
        if condition:
            _, state = run_blocks(SanaBlock, self.per_layer(), shared, tokens, None, None, t0,
                                  scan=self.scan_layers, remat=self.remat_policy)
            return state
        if self.text_refiner is not None:
            context, context_mask = TextRefiner(self.text_refiner, name="text_refiner", **common)(
                context, context_mask, temb)
        y = Mlp(d, d, in_axis="caption", fc1_init=normal(0.02), fc2_init=normal(0.02),
                name="caption_projection", **common)(context)
        y = RMSNorm(1e-5, self.caption_norm_init, param_dtype=self.param_dtype,
                    name="caption_norm")(y)
        h = run_blocks(SanaBlock, self.per_layer(), shared, tokens, y, context_mask, t0,
                       scan=self.scan_layers, remat=self.remat_policy,
                       layer_inputs=layer_inputs(control, block_residuals, self.depth,
                                                 x.shape[0], d, perturb, self.pag_layers, "Sana"))
        out = FinalLayer(d, p * p * self.out_channels, "adaln_single", name="final_layer",
                         **common)(h, temb)
        return unpatchify(out.astype(jnp.float32), grid, p, self.out_channels)
