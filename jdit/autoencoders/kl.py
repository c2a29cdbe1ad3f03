"""AutoencoderKL: the SD / SDXL VAE that PixArt-α and PixArt-Σ generate latents for. NHWC.

    vae, params = jdit.autoencoders.from_pretrained("PixArt-Sigma-XL-2-1024-MS/vae")
    z = vae.apply({"params": params}, images, method="encode")    # [-1, 1] -> posterior mean
    x = vae.apply({"params": params}, z, method="decode")         # latents -> [-1, 1] (about)

Encoder: 3×3 conv, per level ``layers_per_block`` ResNet blocks (GroupNorm → SiLU → 3×3 conv,
twice, 1×1 shortcut when the width changes) and a stride-2 conv (padded right and bottom only)
except after the last level, a middle of ResNet → single-head self-attention over all pixels →
ResNet, then GroupNorm → SiLU → 3×3 conv to the posterior's mean and log-variance, and a 1×1
``quant_conv``. The decoder mirrors it with ``layers_per_block + 1`` blocks per level and
nearest ×2 upsampling. GroupNorm (eps 1e-6) and the attention softmax run in float32.
Latents are *unscaled*: pipelines multiply by ``scaling_factor`` (and subtract ``shift_factor``
where a VAE has one) before the transformer, and undo it before :meth:`decode`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
EPS = 1e-6
BLOCKS = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
_REPLICATED = (None, None, None, None)  # conv kernels: small enough to keep whole on every chip


def group_norm(x: Array, groups: int, scale: Array, bias: Array, eps: float = EPS) -> Array:
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    g = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return g * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class GroupNorm(nn.Module):
    groups: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)),
                           (c,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                          (c,), self.param_dtype)
        return group_norm(x, self.groups, scale, bias).astype(x.dtype)


class Conv(nn.Module):
    """A 2-D convolution, NHWC, kernel (k, k, in, out); ``padding`` as lax takes it."""

    features: int
    kernel: int = 3
    stride: int = 1
    padding: Any = "SAME"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, c = self.kernel, x.shape[-1]
        w = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), _REPLICATED), (k, k, c, self.features),
            self.param_dtype)
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                       (self.features,), self.param_dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), w.astype(self.dtype), (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + b.astype(self.dtype)


class ResnetBlock(nn.Module):
    features: int
    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, self.param_dtype, name="norm1")(x))
        h = Conv(self.features, name="conv1", **common)(h)
        h = nn.silu(GroupNorm(self.groups, self.param_dtype, name="norm2")(h))
        h = Conv(self.features, name="conv2", **common)(h)
        if x.shape[-1] != self.features:
            x = Conv(self.features, kernel=1, name="shortcut", **common)(x)
        return x + h


class PixelAttention(nn.Module):
    """Single-head self-attention over every pixel, after a GroupNorm, residual."""

    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        from jdit.nn.layers import Dense

        b, h, w, c = x.shape
        t = GroupNorm(self.groups, self.param_dtype, name="norm")(x).reshape(b, h * w, c)
        common = dict(in_axes=(None,), out_axes=(None,), dtype=self.dtype,
                      param_dtype=self.param_dtype)
        q, k, v = (Dense(c, name=n, **common)(t) for n in ("q", "k", "v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * c ** -0.5, axis=-1).astype(self.dtype)
        out = Dense(c, name="out", **common)(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x + out.reshape(b, h, w, c).astype(x.dtype)


class MidBlock(nn.Module):
    groups: int
    attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, name="resnet_0", **common)(x)
        if self.attention:
            x = PixelAttention(self.groups, name="attn", **common)(x)
        return ResnetBlock(c, self.groups, name="resnet_1", **common)(x)


class AutoencoderKL(nn.Module):
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    sample_size: int = 512
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> AutoencoderKL:
        """From a diffusers ``AutoencoderKL`` ``config.json``."""
        for key, kind in BLOCKS.items():
            bad = [b for b in cfg.get(key, ()) if b != kind]
            if bad:
                raise ValueError(f"AutoencoderKL {key} {bad}: only {kind} is supported")
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"AutoencoderKL act_fn {cfg['act_fn']!r}: only silu is supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype",
                                                              "param_dtype"}
        fields = {k: cfg[k] for k in names if k in cfg}
        fields = {k: v for k, v in fields.items() if v is not None or k == "shift_factor"}
        chans = tuple(int(c) for c in fields.get("block_out_channels", cls.block_out_channels))
        fields["block_out_channels"] = chans
        for key in BLOCKS:
            if key in cfg and len(cfg[key]) != len(chans):
                raise ValueError(f"AutoencoderKL: {key} has {len(cfg[key])} entries for "
                                 f"{len(chans)} block_out_channels")
        return cls(**fields, **overrides)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side (8 for the SD / SDXL VAEs)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def example_inputs(self, batch: int = 1) -> dict[str, Array]:
        return {"images": jnp.zeros((batch, 8, 8, self.in_channels), jnp.float32)}

    def setup(self) -> None:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g, chans, n = self.norm_num_groups, self.block_out_channels, self.layers_per_block
        self.enc_in = Conv(chans[0], **common)
        self.enc_blocks = [[ResnetBlock(c, g, **common) for _ in range(n)] for c in chans]
        self.enc_down = [Conv(c, stride=2, padding=((0, 1), (0, 1)), **common)
                         for c in chans[:-1]]
        self.enc_mid = MidBlock(g, self.mid_block_add_attention, **common)
        self.enc_norm = GroupNorm(g, self.param_dtype)
        self.enc_out = Conv(2 * self.latent_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = Conv(2 * self.latent_channels, kernel=1, **common)
        if self.use_post_quant_conv:
            self.post_quant_conv = Conv(self.latent_channels, kernel=1, **common)
        rev = chans[::-1]
        self.dec_in = Conv(rev[0], **common)
        self.dec_mid = MidBlock(g, self.mid_block_add_attention, **common)
        self.dec_blocks = [[ResnetBlock(c, g, **common) for _ in range(n + 1)] for c in rev]
        self.dec_up = [Conv(c, **common) for c in rev[:-1]]
        self.dec_norm = GroupNorm(g, self.param_dtype)
        self.dec_out = Conv(self.out_channels, **common)

    def __call__(self, images: Array) -> Array:
        """Encode then decode (the posterior mean): for initialisation and round trips."""
        return self.decode(self.encode(images))

    def encode(self, images: Array) -> Array:
        """(B, H, W, in_channels) in [-1, 1] -> the posterior mean (B, H/f, W/f, latent)."""
        x = self.enc_in(images)
        for level, blocks in enumerate(self.enc_blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.enc_down):
                x = self.enc_down[level](x)
        x = self.enc_out(nn.silu(self.enc_norm(self.enc_mid(x))))
        if self.use_quant_conv:
            x = self.quant_conv(x)
        return x[..., : self.latent_channels].astype(jnp.float32)

    def decode(self, latents: Array) -> Array:
        """Unscaled latents (B, h, w, latent) -> images (B, h·f, w·f, out_channels), float32."""
        x = latents.astype(self.dtype)
        if self.use_post_quant_conv:
            x = self.post_quant_conv(x)
        x = self.dec_mid(self.dec_in(x))
        for level, blocks in enumerate(self.dec_blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.dec_up):
                b, h, w, c = x.shape
                x = jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c))
                x = self.dec_up[level](x.reshape(b, 2 * h, 2 * w, c))
        x = self.dec_out(nn.silu(self.dec_norm(x)))
        return x.astype(jnp.float32)
