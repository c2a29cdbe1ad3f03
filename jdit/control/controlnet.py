"""ControlNet-Transformers (SANA's, diffusers ``SanaControlNetModel``; PixArt-δ's): a trainable
copy of the base's first blocks reads the condition and returns one residual per copied block,
which the base adds to its own blocks' outputs (``block_residuals=``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array


def block_residuals(residuals: Array, depth: int, offset: int) -> Array:
    """A ControlNet's residuals (N, B, L, D) placed on the base's ``depth`` blocks: residual
    ``i`` on block ``i + offset`` (SANA: 1, diffusers adds it after base block i + 1; PixArt-δ:
    0, before base block i + 1), zeros elsewhere."""
    n = residuals.shape[0]
    if offset < 0 or n + offset > depth:
        raise ValueError(f"{n} ControlNet residuals from block {offset} do not fit a base of "
                         f"{depth} blocks")
    return jnp.pad(residuals, ((offset, depth - n - offset),) + ((0, 0),) * (residuals.ndim - 1))


def residuals(controlnet: nn.Module, params: Any, base: nn.Module, base_params: Any, x: Array,
              t: Array, context: Array, context_mask: Array | None, condition: Array,
              scale: float | Array = 1.0, **micro: Array) -> Array:
    """A ControlNet's residuals for every block of ``base`` (``block_residuals=`` of its apply):
    SANA's reads the noisy latents and the condition latents itself; PixArt-δ's reads the
    base's block-0 output, caption features and modulation (``needs_base``). ``micro``: the
    base's micro-conditions (PixArt-α 1024's ``resolution``, ``aspect_ratio``)."""
    if getattr(controlnet, "needs_base", False):
        inputs = base.apply({"params": base_params}, x, t, context, context_mask, condition,
                            method="controlnet_inputs", **micro)
        res = controlnet.apply({"params": params}, **inputs, scale=scale)
    else:
        res = controlnet.apply({"params": params}, x, t, context, context_mask, condition, scale)
    return block_residuals(res, base.depth, controlnet.residual_offset)


def for_base(base: nn.Module, depth: int = 0) -> nn.Module:
    """A ControlNet to train for ``base``, with its widths and runtime settings: PixArt-δ's for
    a PixArt (``depth`` copies of its first blocks; 0: half of them, as PixArt-δ's 13 of 28),
    SANA's for a SANA (0: about a third, as SANA's 7 of 20)."""
    from jdit.models.pixart import PixArt
    from jdit.models.pixart_controlnet import PixArtControlNet
    from jdit.models.sana import Sana
    from jdit.models.sana_controlnet import SanaControlNet

    is_pixart = isinstance(base, PixArt) and not base.kv_compress and \
        base.self_attention == "softmax"
    if not (is_pixart or isinstance(base, Sana)):
        raise ValueError("a ControlNet is trained for a PixArt base without KV compression "
                         f"(PixArt-δ's design) or a SANA base, got {type(base).__name__}")
    if base.scan_layers:
        raise ValueError("ControlNet training copies the base's blocks one by one: set "
                         "model.scan_layers=False")
    default = max(base.depth // 2, 1) if is_pixart else max(round(base.depth * 7 / 20), 1)
    depth = int(depth) or default
    if not 0 < depth < base.depth:
        raise ValueError(f"controlnet_depth must lie in [1, {base.depth - 1}], got {depth}")
    common = dict(hidden_size=base.hidden_size, depth=depth, num_heads=base.num_heads,
                  mlp_ratio=base.mlp_ratio, qk_norm=base.qk_norm,
                  attention_impl=base.attention_impl, remat_policy=base.remat_policy,
                  dtype=base.dtype, param_dtype=base.param_dtype, precision=base.precision)
    if is_pixart:
        return PixArtControlNet(**common)
    return SanaControlNet(input_size=base.input_size, patch_size=base.patch_size,
                          in_channels=base.in_channels, cross_num_heads=base.cross_num_heads,
                          caption_channels=base.caption_channels, pos_embed=base.pos_embed,
                          pe_interpolation=base.pe_interpolation, linear_eps=base.linear_eps,
                          **common)


def from_base(controlnet_params: Any, base_params: Any) -> Any:
    """ControlNet parameters whose copies start as the base's: every module the two share by
    name (the copied blocks; SANA's also its embeddings and caption projection). The zero
    projections keep their zero initialisation, so the controlled base starts as the base."""
    out = dict(controlnet_params)
    for name in controlnet_params:
        if name in base_params:
            if jax.tree.map(jnp.shape, controlnet_params[name]) != \
                    jax.tree.map(jnp.shape, base_params[name]):
                raise ValueError(f"the ControlNet's {name} differs in shape from the base's")
            # copies: the train state is donated, the base must outlive it
            out[name] = jax.tree.map(lambda a: jnp.array(a, copy=True), base_params[name])
    return out


class Controlled:
    """A base and its ControlNet as one model, for a loss written against ``module.apply``:
    ``apply({"params": {"base": ..., "controlnet": ...}}, x, t, condition=..., **base_kwargs)``.
    Other attributes are the base's."""

    def __init__(self, base: nn.Module, controlnet: nn.Module, scale: float = 1.0) -> None:
        self.base, self.controlnet, self.scale = base, controlnet, scale

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def apply(self, variables: Any, x: Array, t: Array, *, condition: Array,
              rngs: Any = None, **kwargs: Any) -> Array:
        p = variables["params"]
        micro = {k: kwargs[k] for k in ("resolution", "aspect_ratio") if k in kwargs}
        res = residuals(self.controlnet, p["controlnet"], self.base, p["base"], x, t,
                        kwargs["context"], kwargs.get("context_mask"), condition, self.scale,
                        **micro)
        return self.base.apply({"params": p["base"]}, x, t, rngs=rngs, block_residuals=res,
                               **kwargs)
