"""DiT: the class-conditional diffusion transformer with adaLN-Zero (Peebles & Xie, 2023)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.models.checks import check_config, check_latents, check_vector
from jdit.nn.attention import SelfAttention
from jdit.nn.embeddings import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    sincos_pos_embed_2d,
    unpatchify,
)
from jdit.nn.layers import (
    MLP_NAMES,
    TOKEN_NAMES,
    Array,
    DType,
    Mlp,
    constrain,
    layer_norm,
    modulate,
)
from jdit.nn.modulation import AdaLNModulation, FinalLayer
from jdit.nn.stack import run_blocks


class DiTBlock(nn.Module):
    """Self-attention and MLP, each modulated and gated by the block's own adaLN-Zero layer."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    mlp_norm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, c: Array) -> tuple[Array, None]:
        d, dt = self.hidden_size, self.dtype
        common = dict(dtype=dt, param_dtype=self.param_dtype, precision=self.precision)
        x = constrain(x, TOKEN_NAMES)
        mods = AdaLNModulation(6, d, param_dtype=self.param_dtype, precision=self.precision,
                               name="adaln")(c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            mods[:, i : i + 1] for i in range(6)
        )
        h = modulate(layer_norm(x, 1e-6), shift_msa, scale_msa).astype(dt)
        h = SelfAttention(self.num_heads, d // self.num_heads,
                          attention_impl=self.attention_impl, name="attn", **common)(h)
        x = x + gate_msa * h.astype(jnp.float32)
        h = modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp).astype(dt)
        h = Mlp(int(d * self.mlp_ratio), d, hidden_names=MLP_NAMES, name="mlp", **common)(h)
        return constrain(x + gate_mlp * h.astype(jnp.float32), TOKEN_NAMES), None


class DiT(nn.Module):
    """Class-conditional DiT. ``apply(vars, x, t, labels=k)``.

    x: (B, H, W, in_channels) NHWC latents; t: (B,) timesteps 0..999; labels: (B,) int class ids,
    ``num_classes`` selects the null class used for classifier-free guidance. Returns
    (B, H, W, out_channels) float32 (ε, then the variance interpolation with ``learn_sigma``).

    ``timestep_freq_shift`` and ``mlp_norm_eps`` exist because diffusers' DiT port differs from the
    official model in both (1 vs 0, 1e-5 vs 1e-6); loaders set them to match the checkpoint's
    source so that outputs reproduce it.
    """

    input_size: int = 32  # latent side at the training resolution
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    timestep_freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def per_layer(self) -> list[dict[str, Any]]:
        return [{} for _ in range(self.depth)]

    def example_inputs(self, batch: int = 1) -> dict[str, Array]:
        """Zero inputs of the training shape, for ``init`` and ``jax.eval_shape``."""
        s = self.input_size
        return dict(
            x=jnp.zeros((batch, s, s, self.in_channels)),
            t=jnp.zeros((batch,)),
            labels=jnp.zeros((batch,), jnp.int32),
        )

    def check_config(self) -> None:
        check_config("DiT", self.hidden_size, self.num_heads, self.depth, self.patch_size)

    @nn.compact
    def __call__(self, x: Array, t: Array, labels: Array) -> Array:
        self.check_config()
        grid = check_latents("DiT", x, self.in_channels, self.patch_size)
        b = x.shape[0]
        check_vector("DiT", "t", t, (b,))
        check_vector("DiT", "labels", labels, (b,), integer=True)

        d, p = self.hidden_size, self.patch_size
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        cond = dict(param_dtype=self.param_dtype, precision=self.precision)

        tokens = PatchEmbed(d, p, name="patch_embed", **common)(x).astype(jnp.float32)
        tokens = tokens + sincos_pos_embed_2d(d, grid, self.input_size // p)
        c = TimestepEmbedder(d, freq_shift=self.timestep_freq_shift, name="t_embedder", **cond)(t)
        c = c + LabelEmbedder(self.num_classes, d, self.param_dtype, name="y_embedder")(labels)

        shared = dict(
            hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
            mlp_norm_eps=self.mlp_norm_eps, attention_impl=self.attention_impl, **common,
        )
        h = run_blocks(DiTBlock, self.per_layer(), shared, tokens, c,
                       scan=self.scan_layers, remat=self.remat_policy)
        out = FinalLayer(d, p * p * self.out_channels, "adaln_zero", name="final_layer",
                         **common)(h, c)
        return unpatchify(out.astype(jnp.float32), grid, p, self.out_channels)
