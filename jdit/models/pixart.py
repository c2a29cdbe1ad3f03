"""PixArt-α and PixArt-Σ: text-conditioned DiTs with adaLN-single and cross-attention.

One module covers both: α-1024 adds micro-conditions (image size and aspect ratio); Σ uses
300-token captions and optionally compresses self-attention keys/values in chosen blocks
(``kv_compress``), with optional QK-norm. Weight names and quirks: ``docs/models.md``.
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
from jdit.nn.attention import KV_COMPRESS_MODES, CrossAttention, SelfAttention
from jdit.nn.embeddings import PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, unpatchify
from jdit.nn.layers import (
    MLP_NAMES,
    TOKEN_NAMES,
    Array,
    DType,
    Mlp,
    constrain,
    layer_norm,
    modulate,
    normal,
    zeros,
)
from jdit.nn.linear_attention import LinearSelfAttention
from jdit.nn.modulation import AdaLNModulation, FinalLayer, block_modulations
from jdit.nn.stack import run_blocks
from jdit.nn.text_refiner import TextRefiner, TextRefinerConfig


class PixArtBlock(nn.Module):
    """Self-attention, cross-attention (no norm, no gate: a PixArt quirk) and MLP.

    ``branch="condition"`` runs a control condition's tokens (EasyControl, :mod:`jdit.control`):
    self-attention among themselves only, no cross-attention, and the block returns their keys
    and values. The image branch's self-attention also sees ``control``, the conditions' (k, v).
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    grid_hw: tuple[int, int] | None  # the token grid (KV compression, LiT's V conv need it)
    kv_compress: str | None = None
    kv_compress_ratio: int = 1
    qk_norm: bool = False
    self_attention: str = "softmax"
    linear_heads: int | None = None
    linear_v_conv: int = 0
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
        linear-attention state), ``residual`` (a ControlNet's, added to the output) and
        ``perturb`` (B,) (perturbed-attention guidance's rows, in ``perturbed`` blocks)."""
        layer = layer or {}
        control = layer.get("control")
        d, dt = self.hidden_size, self.dtype
        common = dict(dtype=dt, param_dtype=self.param_dtype, precision=self.precision)
        x = constrain(x, TOKEN_NAMES)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block_modulations(
            self, d, t0, self.param_dtype)
        h = modulate(layer_norm(x, 1e-6), shift_msa, scale_msa).astype(dt)
        if self.self_attention == "linear":  # LiT
            heads = self.linear_heads or self.num_heads
            h = LinearSelfAttention(
                heads, d // heads, qkv_bias=True, qk_norm=False, v_conv=self.linear_v_conv,
                grid_hw=self.grid_hw, attention_impl=self.attention_impl, name="attn", **common,
            )(h)
        else:
            h = SelfAttention(
                self.num_heads, d // self.num_heads, qk_norm=self.qk_norm,
                kv_compress=self.kv_compress, kv_compress_ratio=self.kv_compress_ratio,
                grid_hw=self.grid_hw, attention_impl=self.attention_impl, name="attn", **common,
            )(h, extra_kv=control, return_kv=self.branch == "condition",
              identity=layer.get("perturb") if self.perturbed else None)
        kv = None
        if self.branch == "condition":
            h, kv = h
        x = x + gate_msa * h.astype(jnp.float32)
        if self.branch == "condition":  # conditions never see the text
            h = modulate(layer_norm(x, 1e-6), shift_mlp, scale_mlp).astype(dt)
            h = Mlp(int(d * self.mlp_ratio), d, hidden_names=MLP_NAMES, name="mlp", **common)(h)
            return constrain(x + gate_mlp * h.astype(jnp.float32), TOKEN_NAMES), kv
        h = CrossAttention(
            self.num_heads, d // self.num_heads, out_init=zeros,
            attention_impl=self.attention_impl, name="cross_attn", **common,
        )(x.astype(dt), context, context_mask)
        x = x + h.astype(jnp.float32)
        h = modulate(layer_norm(x, 1e-6), shift_mlp, scale_mlp).astype(dt)
        h = Mlp(int(d * self.mlp_ratio), d, hidden_names=MLP_NAMES, name="mlp", **common)(h)
        x = x + gate_mlp * h.astype(jnp.float32)
        if "residual" in layer:
            x = x + layer["residual"].astype(jnp.float32)
        x = constrain(x, TOKEN_NAMES)
        return x, (x if self.emit_hidden else None)


class PixArt(nn.Module):
    """PixArt-α / Σ transformer. ``apply(vars, x, t, context=c, context_mask=m)``.

    x: (B, H, W, in_channels) NHWC latents; t: (B,) DDPM timesteps (may be fractional);
    context: (B, L, caption_channels) text features; context_mask: (B, L), 1 keeps a token.
    With ``micro_condition``: resolution (B, 2) as [height, width] in pixels and
    aspect_ratio (B, 1). Returns (B, H, W, out_channels) float32; with ``learn_sigma`` the
    first ``in_channels`` channels are ε and the rest the variance interpolation v.
    """

    input_size: int = 128  # latent side at the training resolution: base_size = input_size // p
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    learn_sigma: bool = True
    pe_interpolation: float = 1.0
    micro_condition: bool = False
    kv_compress: str | None = None  # "conv" | "ave" | "uniform" | "uniform_every"
    kv_compress_ratio: int = 2
    kv_compress_layers: tuple[int, ...] = ()
    qk_norm: bool = False
    # LiT: ReLU linear self-attention instead of softmax, with its own (few) heads and a
    # depthwise conv on V; every other weight is PixArt's (jdit.models.lit.inherit)
    self_attention: str = "softmax"  # "softmax" | "linear"
    # perturbed-attention guidance (PAG): blocks whose self-attention is the identity for the
    # rows ``perturb`` marks (a sampling setting: the pipeline clones the model with it)
    pag_layers: tuple[int, ...] = ()
    linear_heads: int | None = None
    linear_v_conv: int = 0
    # LI-DiT's refiner of LLM prompt features (jdit.nn.text_refiner); a dict in configs
    text_refiner: TextRefinerConfig | None = None
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    dtype: DType = jnp.float32  # compute dtype; softmax, norms and conditioning stay float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def per_layer(self) -> list[dict[str, Any]]:
        """Block settings that vary with depth (the KV-compression ratio, PAG's layers)."""
        layers = set(self.kv_compress_layers) if self.kv_compress else set()
        return [
            {"kv_compress_ratio": self.kv_compress_ratio if i in layers else 1,
             **({"perturbed": True} if i in self.pag_layers else {})}
            for i in range(self.depth)
        ]

    def example_inputs(self, batch: int = 1, caption_length: int = 8) -> dict[str, Array]:
        """Zero inputs of the training shape, for ``init`` and ``jax.eval_shape``."""
        s = self.input_size
        if self.text_refiner is not None:
            caption_length = self.text_refiner.packed_length(caption_length)
        inputs = dict(
            x=jnp.zeros((batch, s, s, self.in_channels)),
            t=jnp.zeros((batch,)),
            context=jnp.zeros((batch, caption_length, self.caption_channels)),
            context_mask=jnp.ones((batch, caption_length), jnp.int32),
        )
        if self.micro_condition:
            inputs["resolution"] = jnp.full((batch, 2), 8.0 * s)
            inputs["aspect_ratio"] = jnp.ones((batch, 1))
        return inputs

    def check_config(self) -> None:
        check_config("PixArt", self.hidden_size, self.num_heads, self.depth, self.patch_size)
        check_text_refiner("PixArt", self.text_refiner, self.caption_channels)
        if self.micro_condition and self.hidden_size % 3:
            raise ValueError("PixArt: micro_condition needs hidden_size divisible by 3")
        if self.self_attention not in ("softmax", "linear"):
            raise ValueError(f"PixArt: self_attention must be 'softmax' or 'linear', got "
                             f"{self.self_attention!r}")
        if self.self_attention == "linear":
            heads = self.linear_heads or self.num_heads
            if self.hidden_size % heads or self.kv_compress is not None or self.qk_norm:
                raise ValueError(
                    f"PixArt with linear self-attention: hidden_size {self.hidden_size} must be "
                    f"divisible by linear_heads {heads}, and KV compression and QK-norm are "
                    "softmax-only")
        if self.kv_compress is not None:
            if self.kv_compress not in KV_COMPRESS_MODES:
                raise ValueError(
                    f"PixArt: kv_compress must be None or one of {KV_COMPRESS_MODES}, "
                    f"got {self.kv_compress!r}"
                )
            bad = [i for i in self.kv_compress_layers if not 0 <= i < self.depth]
            if bad or self.kv_compress_ratio < 1:
                raise ValueError(
                    f"PixArt: kv_compress_layers must lie in [0, {self.depth}) and the ratio be "
                    f">= 1, got layers {bad} and ratio {self.kv_compress_ratio}"
                )

    def encode_condition(self, latents: Array, resolution: Array | None = None,
                         aspect_ratio: Array | None = None,
                         peers: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
        """A control condition's keys and values in every block (EasyControl's condition branch,
        :mod:`jdit.control`): ``(k, v)``, each (depth, B, L_c, heads, head_dim).

        ``latents`` (B, h, w, in_channels) go through the same patch embedding; their sin-cos
        positions span the same [0, base) square as any target's (PixArt normalises positions
        to ``base_size``), which is EasyControl's position-aware interpolation: a condition of any
        size or aspect ratio lands on the target grid it depicts. The adaLN modulation uses
        timestep 0, there is no cross-attention, and the tokens attend only to each other, so the
        result is the same at every denoising step. Run with the condition's LoRA applied to the
        parameters. Keys and values are those before PixArt-Σ's KV compression.

        ``peers``: other conditions' per-block keys and values that this condition's queries
        also see (the variant in which conditions attend to each other,
        :func:`jdit.control.encode` with ``attend_each_other``); None is EasyControl's pattern.
        """
        t = jnp.zeros((latents.shape[0],), jnp.float32)
        return self(latents, t, None, None, resolution, aspect_ratio, control=peers,
                    _branch="condition")

    def controlnet_inputs(self, x: Array, t: Array, context: Array, context_mask: Array | None,
                          condition: Array, resolution: Array | None = None,
                          aspect_ratio: Array | None = None) -> dict[str, Any]:
        """What PixArt-δ's ControlNet (:class:`jdit.models.pixart_controlnet.PixArtControlNet`)
        reads from the base: the output of block 0 (``hidden``), the condition latents
        (``condition``, shaped as ``x``) through the same patch embedding and positions, the
        projected caption (``context``, ``context_mask``) and the modulation ``t0``. Needs the
        unscanned layout (``scan_layers=False``)."""
        return self(x, t, context, context_mask, resolution, aspect_ratio,
                    _branch="controlnet_inputs", _condition=condition)

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        context: Array | None,
        context_mask: Array | None = None,
        resolution: Array | None = None,
        aspect_ratio: Array | None = None,
        control: tuple[Array, Array] | None = None,
        block_residuals: Array | None = None,
        _branch: str = "image",
        _condition: Array | None = None,
        _state: dict[str, Array] | None = None,
        perturb: Array | None = None,
    ) -> Array:
        """``control``: conditions' keys and values ((depth, B, L_c, heads, head_dim) each, from
        :meth:`encode_condition`, several concatenated along L_c) that the image tokens'
        self-attention sees beside their own; ``block_residuals`` (depth, B, L, hidden): a
        ControlNet's, added to each block's output. None is the plain model, bit for bit.
        ``perturb`` (B,) bool: the rows whose self-attention in the ``pag_layers`` blocks is the
        identity (perturbed-attention guidance's perturbed branch)."""
        self.check_config()
        condition = _branch == "condition"
        grid = check_latents("PixArt", x, self.in_channels, self.patch_size)
        b = x.shape[0]
        check_vector("PixArt", "t", t, (b,))
        if not condition:
            check_context("PixArt", context, context_mask, b, self.caption_channels)
        if self.micro_condition:
            if resolution is None or aspect_ratio is None:
                raise ValueError("PixArt: this model needs resolution (B, 2) and aspect_ratio (B, 1)")
            check_vector("PixArt", "resolution", resolution, (b, 2))
            check_vector("PixArt", "aspect_ratio", aspect_ratio, (b, 1))
        elif resolution is not None or aspect_ratio is not None:
            raise ValueError("PixArt: resolution/aspect_ratio given but micro_condition is False")
        if (condition or control is not None) and self.self_attention != "softmax":
            raise ValueError("PixArt: control conditions need softmax self-attention")
        if control is not None:
            tail = (self.num_heads, self.hidden_size // self.num_heads)
            check_control("PixArt", control, self.depth, b, (tail, tail))

        d, p = self.hidden_size, self.patch_size
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        cond = dict(param_dtype=self.param_dtype, precision=self.precision)

        staged = _branch in ("rest", "final")  # a step cache's later stages: the front's state
        if staged and _state is None:
            raise ValueError(f"PixArt: _branch={_branch!r} needs the front's _state")
        if not staged:
            embed = PatchEmbed(d, p, name="patch_embed", **common)
            pos = sincos_pos_embed_2d(d, grid, self.input_size // p, self.pe_interpolation)
            tokens = embed(x).astype(jnp.float32) + pos

            temb = TimestepEmbedder(d, name="t_embedder", **cond)(t)
            if resolution is not None and aspect_ratio is not None:  # micro-conditions (checked)
                size = TimestepEmbedder(d // 3, out_axis=None, name="resolution_embedder", **cond)
                ratio = TimestepEmbedder(d // 3, out_axis=None, name="aspect_ratio_embedder",
                                         **cond)
                temb = temb + jnp.concatenate([size(resolution), ratio(aspect_ratio)], axis=-1)
            t0 = AdaLNModulation(6, d, kernel_init=normal(0.02), name="t_block", **cond)(temb)
        else:
            temb, t0 = _state["temb"], _state["t0"]

        shared = dict(
            hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, grid_hw=grid,
            kv_compress=self.kv_compress, qk_norm=self.qk_norm,
            self_attention=self.self_attention, linear_heads=self.linear_heads,
            linear_v_conv=self.linear_v_conv, attention_impl=self.attention_impl,
            branch="condition" if condition else "image", **common,
        )
        if condition:  # (control: the peers' keys and values, see encode_condition)
            _, kv = run_blocks(PixArtBlock, self.per_layer(), shared, tokens, None, None, t0,
                               scan=self.scan_layers, remat=self.remat_policy,
                               layer_inputs=layer_inputs(control, None, self.depth, b, d))
            return kv

        if staged:
            y, context_mask = _state["y"], _state["mask"]
        else:
            if self.text_refiner is not None:
                context, context_mask = TextRefiner(self.text_refiner, name="text_refiner",
                                                    **common)(context, context_mask, temb)
            y = Mlp(
                d, d, in_axis="caption", fc1_init=normal(0.02), fc2_init=normal(0.02),
                name="caption_projection", **common,
            )(context)
        if _branch == "controlnet_inputs":
            if self.scan_layers:
                raise ValueError("PixArt: a PixArt-δ ControlNet reads the output of block 0 "
                                 "alone; load the base with scan_layers=False")
            if _condition is None or tuple(_condition.shape) != tuple(x.shape):
                raise ValueError(f"PixArt: the ControlNet's condition latents must have the "
                                 f"latents' shape {tuple(x.shape)}, got "
                                 f"{None if _condition is None else tuple(_condition.shape)}")
            first = run_blocks(PixArtBlock, self.per_layer()[:1], shared, tokens, y,
                               context_mask, t0)
            return {"hidden": first, "condition": embed(_condition).astype(jnp.float32) + pos,
                    "context": y, "context_mask": context_mask, "t0": t0}
        if _branch in ("front", "rest", "final"):  # a step cache (jdit.sampling.cache)
            if self.scan_layers or control is not None or block_residuals is not None:
                raise ValueError("PixArt: a step cache runs the blocks in stages: load the "
                                 "model with scan_layers=False, without control inputs")
            layers = self.per_layer()
            if _branch == "front":
                h = run_blocks(PixArtBlock, layers[:1], shared, tokens, y, context_mask, t0)
                return {"h": h, "r": h - tokens, "y": y, "mask": context_mask, "t0": t0,
                        "temb": temb}
            if _branch == "rest":
                return run_blocks(PixArtBlock, layers[1:], shared, _state["h"], y, context_mask,
                                  t0, start=1)
            h = _state["h"]
        else:
            h = run_blocks(
                PixArtBlock, self.per_layer(), shared, tokens, y, context_mask, t0,
                scan=self.scan_layers, remat=self.remat_policy,
                layer_inputs=layer_inputs(control, block_residuals, self.depth, b, d, perturb,
                                          self.pag_layers, "PixArt"),
            )
        out = FinalLayer(d, p * p * self.out_channels, "adaln_single", name="final_layer",
                         **common)(h, temb)
        return unpatchify(out.astype(jnp.float32), grid, p, self.out_channels)
