"""PixArt-δ's ControlNet-Transformer (the PixArt-α repository's ``ControlPixArtHalf``; diffusers'
research project ``PixArtControlNetAdapterModel``).

Trainable copies of the base's first ``depth`` blocks (13 of 28 in the paper). The condition's
latents go through the base's own patch embedding and positions; copy 0 reads the base's
block-0 output plus a zero-initialised projection of them (``before_proj``), copy ``i > 0`` the
output of copy ``i - 1``. Each copy's output goes through a zero-initialised projection
(``after_proj_{i}``) that the base adds to the output of its block ``i`` (before block
``i + 1``), so at initialisation the base is unchanged. The copies share the base's caption
features and timestep modulation (the base computes them: :meth:`PixArt.controlnet_inputs`).
Weight names: ``jdit/weights/pixart_controlnet.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.models.checks import check_config
from jdit.models.pixart import PixArtBlock
from jdit.nn.layers import Array, Dense, DType, zeros
from jdit.nn.stack import run_blocks


class PixArtControlNet(nn.Module):
    """``apply(vars, hidden, condition, context, context_mask, t0, scale)`` -> residuals
    (depth, B, L, hidden_size), already multiplied by ``scale``; the inputs are what the base's
    :meth:`PixArt.controlnet_inputs` returns. :func:`jdit.control.controlnet.residuals` runs
    both."""

    hidden_size: int = 1152
    depth: int = 13
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    residual_offset = 0  # residual i goes on the output of the base's block i
    needs_base = True  # reads the base's block-0 output, caption features and modulation

    def per_layer(self) -> list[dict[str, Any]]:
        return [{} for _ in range(self.depth)]

    def example_inputs(self, batch: int = 1, caption_length: int = 8, tokens: int = 16
                       ) -> dict[str, Array]:
        d = self.hidden_size
        return dict(hidden=jnp.zeros((batch, tokens, d)), condition=jnp.zeros((batch, tokens, d)),
                    context=jnp.zeros((batch, caption_length, d)),
                    context_mask=jnp.ones((batch, caption_length), jnp.int32),
                    t0=jnp.zeros((batch, 6, d)))

    def check_config(self) -> None:
        check_config("PixArtControlNet", self.hidden_size, self.num_heads, self.depth, 1)

    @nn.compact
    def __call__(self, hidden: Array, condition: Array, context: Array,
                 context_mask: Array | None, t0: Array, scale: float | Array = 1.0) -> Array:
        self.check_config()
        cond = condition
        if hidden.shape != cond.shape or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"PixArtControlNet: the base's block-0 output {hidden.shape} and the "
                             f"condition tokens {cond.shape} must agree, with {self.hidden_size} "
                             "channels")
        d = self.hidden_size
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        # (the zero projections' kernels are (D, D): their output dimension takes the name
        # "mlp", since a kernel cannot carry one logical name twice)
        h = hidden + Dense(d, ("embed",), ("mlp",), kernel_init=zeros, name="before_proj",
                           **common)(cond.astype(self.dtype)).astype(jnp.float32)
        shared = dict(hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                      grid_hw=None, qk_norm=self.qk_norm,  # (no KV compression here)
                      attention_impl=self.attention_impl, emit_hidden=True, **common)
        _, states = run_blocks(PixArtBlock, self.per_layer(), shared, h, context, context_mask,
                               t0, scan=self.scan_layers, remat=self.remat_policy)
        out = jnp.stack([
            Dense(d, ("embed",), ("mlp",), kernel_init=zeros, name=f"after_proj_{i}",
                  **common)(states[i].astype(self.dtype)).astype(jnp.float32)
            for i in range(self.depth)])
        return out * jnp.asarray(scale, jnp.float32)
