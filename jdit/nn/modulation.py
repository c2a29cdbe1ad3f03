"""adaLN modulation: DiT's adaLN-Zero, PixArt's adaLN-single, and the final output layer.

adaLN-Zero (DiT): every block maps the conditioning vector ``c`` through ``SiLU -> Dense(6D)``.
adaLN-single (PixArt): one shared ``SiLU -> Dense(6D)`` (``t_block``) for all blocks, plus a
learned ``(6, D)`` table per block. Either way a block receives six ``(B, 1, D)`` vectors in the
order ``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.layers import (
    Array,
    Dense,
    DType,
    Initializer,
    layer_norm,
    modulate,
    scaled_randn,
    zeros,
)


class AdaLNModulation(nn.Module):
    """``SiLU -> Dense(num_chunks * D)``, returned as ``(B, num_chunks, D)`` float32."""

    num_chunks: int
    hidden_size: int
    kernel_init: Initializer = zeros
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, c: Array) -> Array:
        y = Dense(
            self.num_chunks * self.hidden_size, ("embed",), ("modulation",),
            kernel_init=self.kernel_init, param_dtype=self.param_dtype,
            precision=self.precision, name="linear",
        )(nn.silu(c.astype(jnp.float32)))
        return y.reshape(c.shape[0], self.num_chunks, self.hidden_size)


def scale_shift_table(module: nn.Module, num_chunks: int, hidden_size: int,
                      param_dtype: DType = jnp.float32) -> Array:
    """A learned ``(num_chunks, D)`` table initialised as ``randn / sqrt(D)`` (adaLN-single)."""
    return module.param(
        "scale_shift_table",
        nn.with_logical_partitioning(scaled_randn(hidden_size**-0.5), (None, "embed")),
        (num_chunks, hidden_size),
        param_dtype,
    )


def block_modulations(module: nn.Module, hidden_size: int, t0: Array,
                      param_dtype: DType = jnp.float32) -> tuple[Array, ...]:
    """adaLN-single inside a block (PixArt, SANA): the block's ``(6, D)`` table plus the shared
    ``t0`` (B, 6, D), as shift, scale, gate for attention then for the MLP, each (B, 1, D)."""
    mods = scale_shift_table(module, 6, hidden_size, param_dtype)[None] + t0
    return tuple(mods[:, i : i + 1] for i in range(6))


class FinalLayer(nn.Module):
    """``LN -> modulate(shift, scale) -> Dense(p*p*C_out)`` with zero-initialised output.

    ``modulation="adaln_zero"`` (DiT): shift/scale from ``SiLU -> Dense(2D)`` of ``c``.
    ``modulation="adaln_single"`` (PixArt): a ``(2, D)`` table plus ``c``, where ``c`` is the
    timestep embedding *before* ``t_block``.
    """

    hidden_size: int
    out_features: int
    modulation: str = "adaln_single"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        d = self.hidden_size
        if self.modulation == "adaln_single":
            mods = scale_shift_table(self, 2, d, self.param_dtype)[None] + c[:, None, :]
        elif self.modulation == "adaln_zero":
            mods = AdaLNModulation(2, d, param_dtype=self.param_dtype, precision=self.precision,
                                   name="adaln")(c)
        else:
            raise ValueError(f"unknown modulation {self.modulation!r}")
        shift, scale = mods[:, 0:1], mods[:, 1:2]
        h = modulate(layer_norm(x, 1e-6), shift, scale)
        return Dense(
            self.out_features, ("embed",), (None,), kernel_init=zeros, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, name="linear",
        )(h)
