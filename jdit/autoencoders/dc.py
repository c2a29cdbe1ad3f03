"""AutoencoderDC: the deep-compression autoencoder (DC-AE) that SANA generates latents for. NHWC.

    vae, params = jdit.autoencoders.from_pretrained("dc-ae-f32c32-sana-1.0-diffusers")
    z = vae.apply({"params": params}, images, method="encode")    # [-1, 1] -> latents (f = 32)
    x = vae.apply({"params": params}, z, method="decode")         # latents -> [-1, 1] (about)

A port of diffusers' ``AutoencoderDC``. Each stage is a run of ``ResBlock`` (3×3 conv → act →
3×3 conv → norm, residual) or ``EfficientViTBlock`` (multi-scale ReLU linear attention, then a
GLU Mix-FFN), followed (encoder) or preceded (decoder) by a ×2 resampling block whose shortcut
is the pixel-(un)shuffled input averaged over / repeated across channel groups: every stage is
a residual around a parameter-free resampling. DC-AE is deterministic: ``encode`` returns the
latents, no posterior. Latents are *unscaled*: pipelines multiply by ``scaling_factor``.
Norms (RMSNorm with bias, or BatchNorm with running statistics) and the attention
normalisation run in float32, whatever ``dtype`` the convolutions use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.layers import Dense
from jdit.nn.mix_ffn import depthwise_conv

Array = jax.Array
EPS = 1e-5  # diffusers' RMSNorm and BatchNorm2d eps throughout
ACTIVATIONS = {  # diffusers' get_activation table (its nn.GELU is the exact erf form)
    "silu": nn.silu, "swish": nn.silu, "relu": nn.relu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}
BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")  # diffusers' layer_norm would normalise over W (NCHW)
# diffusers tests ``== "interpolate"`` / ``== "pixel_unshuffle"`` and takes anything else for
# the other kind; the published configs say "conv" or "Conv". Other strings are refused.
UPSAMPLE = {"interpolate": True, "pixel_shuffle": False}
DOWNSAMPLE = {"pixel_unshuffle": True, "conv": False, "Conv": False}


def _param(module: nn.Module, name: str, init: Any, shape: tuple[int, ...], dtype: Any) -> Array:
    # conv-sized tensors: replicated on every chip, like AutoencoderKL's
    return module.param(name, nn.with_logical_partitioning(init, (None,) * len(shape)), shape,
                        dtype)


def _per_stage(value: Any, n: int) -> tuple:
    return (value,) * n if isinstance(value, str) else tuple(value)


def pixel_unshuffle(x: Array) -> Array:
    """(B, 2h, 2w, C) -> (B, h, w, 4C), channel 4c + 2i + j as ``F.pixel_unshuffle(·, 2)``."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // 2, w // 2, 4 * c)


def pixel_shuffle(x: Array) -> Array:
    """(B, h, w, 4C) -> (B, 2h, 2w, C): the inverse of :func:`pixel_unshuffle`."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, 2 * h, 2 * w, c // 4)


class Layer(nn.Module, kw_only=True):
    """Base of every module here: the compute and parameter dtypes, keyword-only, passed down."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def kw(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class Conv(Layer):
    """k×k convolution with PyTorch's padding k // 2; kernel (k, k, in / groups, out)."""

    features: int
    kernel: int = 3
    stride: int = 1
    groups: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, c, g, f = self.kernel, x.shape[-1], self.groups, self.features
        w = _param(self, "kernel", nn.initializers.lecun_normal(), (k, k, c // g, f),
                   self.param_dtype).astype(self.dtype)
        b = (_param(self, "bias", nn.initializers.zeros, (f,), self.param_dtype)
             if self.use_bias else jnp.zeros((f,))).astype(self.dtype)
        x = x.astype(self.dtype)
        if g == c == f and self.stride == 1:  # depthwise: k² shifted multiply-adds, fused
            return depthwise_conv(x, w[:, :, 0], b)
        p = k // 2
        return b + jax.lax.conv_general_dilated(x, w, (self.stride,) * 2, ((p, p), (p, p)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                feature_group_count=g)


class Norm(Layer):
    """Over channels, in float32: diffusers' RMSNorm (weight and bias) or a BatchNorm2d in eval
    mode. The running statistics sit with the parameters: this module only does inference."""

    kind: str = "rms_norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def vector(name: str, init: Any) -> Array:
            return _param(self, name, init, (x.shape[-1],), self.param_dtype).astype(jnp.float32)

        y = x.astype(jnp.float32)
        if self.kind == "rms_norm":
            y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + EPS)
        else:
            y = ((y - vector("mean", nn.initializers.zeros))
                 * jax.lax.rsqrt(vector("var", nn.initializers.ones) + EPS))
        y = y * vector("scale", nn.initializers.ones) + vector("bias", nn.initializers.zeros)
        return y.astype(x.dtype)


class ResBlock(Layer):
    norm: str = "rms_norm"
    act: str = "silu"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = ACTIVATIONS[self.act](Conv(x.shape[-1], name="conv1", **self.kw)(x))
        h = Conv(x.shape[-1], use_bias=False, name="conv2", **self.kw)(h)
        return x + Norm(kind=self.norm, name="norm", **self.kw)(h)


class MultiscaleProjection(Layer):
    """Depthwise k×k, then 1×1 within groups of head_dim channels: q, k, v at a wider scale."""

    kernel: int
    heads: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        x = Conv(c, self.kernel, groups=c, use_bias=False, name="proj_in", **self.kw)(x)
        return Conv(c, 1, groups=3 * self.heads, use_bias=False, name="proj_out", **self.kw)(x)


def linear_attention(q: Array, k: Array, v: Array) -> Array:
    """ReLU linear attention, (B, N, G, d) each, float32. A ones channel appended to v makes the
    same two products give the normaliser Σ_n k_n · q."""
    v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
    out = jnp.einsum("bgij,bngj->bngi", jnp.einsum("bngi,bngj->bgij", v, k), q)
    return out[..., :-1] / (out[..., -1:] + 1e-15)


def quadratic_attention(q: Array, k: Array, v: Array) -> Array:
    """The same with the N×N scores formed (diffusers' choice when N <= d), normalised in f32."""
    s = jnp.einsum("bkgd,bqgd->bgkq", k, q, preferred_element_type=jnp.float32)
    s = s / (jnp.sum(s, axis=2, keepdims=True) + 1e-15)
    return jnp.einsum("bkgd,bgkq->bqgd", v, s.astype(v.dtype))


class MultiscaleLinearAttention(Layer):
    """diffusers' ``SanaMultiscaleLinearAttention`` (mult 1, residual) and its processor."""

    head_dim: int
    scales: tuple[int, ...]
    norm: str = "rms_norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        d = self.head_dim
        heads = c // d

        def dense(features: int, name: str, y: Array) -> Array:
            return Dense(features, (None,), (None,), use_bias=False, name=name, **self.kw)(y)

        qkv = jnp.concatenate([dense(heads * d, f"to_{n}", x) for n in "qkv"], axis=-1)
        branches = [qkv] + [MultiscaleProjection(kernel=k, heads=heads, **self.kw,
                                                 name=f"to_qkv_multiscale_{i}")(qkv)
                            for i, k in enumerate(self.scales)]
        # As in EfficientViT, the concatenated channels are read as groups of 3·d, each group
        # [q | k | v] (not as whole q, k, v blocks): the groups are the attention heads.
        t = jnp.concatenate(branches, axis=-1).reshape(b, h * w, -1, 3, d)
        linear = h * w > d  # diffusers' switch; only the linear form upcasts q, k, v
        if linear:
            t = t.astype(jnp.float32)
        q, k, v = nn.relu(t[..., 0, :]), nn.relu(t[..., 1, :]), t[..., 2, :]
        out = (linear_attention if linear else quadratic_attention)(q, k, v)
        out = dense(c, "to_out", out.reshape(b, h, w, -1).astype(self.dtype))
        return x + Norm(kind=self.norm, name="norm_out", **self.kw)(out)


class GLUMBConv(Layer):
    """1×1 to 2·4C → SiLU → depthwise 3×3 → value · SiLU(gate) → 1×1 → RMSNorm, residual."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        f = 4 * c
        h = nn.silu(Conv(2 * f, 1, name="conv_inverted", **self.kw)(x))
        h = Conv(2 * f, 3, groups=2 * f, name="conv_depth", **self.kw)(h)
        h = h[..., :f] * nn.silu(h[..., f:])  # PyTorch's chunk(2): value half first
        h = Conv(c, 1, use_bias=False, name="conv_point", **self.kw)(h)
        return x + Norm(kind="rms_norm", name="norm", **self.kw)(h)


class EfficientViTBlock(Layer):
    head_dim: int
    scales: tuple[int, ...]
    norm: str = "rms_norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = MultiscaleLinearAttention(head_dim=self.head_dim, scales=self.scales,
                                      norm=self.norm, name="attn", **self.kw)(x)
        return GLUMBConv(name="conv_out", **self.kw)(x)


class DownBlock(Layer):
    """×2 down: a stride-2 conv, or a conv then pixel-unshuffle; plus (``shortcut``) the
    pixel-unshuffled input averaged over consecutive channel groups."""

    features: int
    unshuffle: bool
    shortcut: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.unshuffle:
            y = pixel_unshuffle(Conv(self.features // 4, name="conv", **self.kw)(x))
        else:
            y = Conv(self.features, stride=2, name="conv", **self.kw)(x)
        if self.shortcut:
            s = pixel_unshuffle(x)
            y = y + s.reshape(*s.shape[:-1], self.features, -1).mean(axis=-1)
        return y


class UpBlock(Layer):
    """×2 up: nearest then a conv, or a conv then pixel-shuffle; plus (``shortcut``) the input
    with each channel repeated, pixel-shuffled."""

    features: int
    interpolate: bool
    shortcut: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.interpolate:
            up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            y = Conv(self.features, name="conv", **self.kw)(up)
        else:
            y = pixel_shuffle(Conv(4 * self.features, name="conv", **self.kw)(x))
        if self.shortcut:
            y = y + pixel_shuffle(jnp.repeat(x, 4 * self.features // x.shape[-1], axis=-1))
        return y


def _block(kind: str, norm: str, act: str, head_dim: int, scales: tuple[int, ...],
           **kw: Any) -> nn.Module:
    if kind == "ResBlock":
        return ResBlock(norm=norm, act=act, **kw)
    return EfficientViTBlock(head_dim=head_dim, scales=tuple(scales), norm=norm, **kw)


class AutoencoderDC(Layer):
    # diffusers' names and defaults (its config.json keys); a string stands for every stage.
    # dtype and param_dtype (keyword-only) come from Layer.
    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: str | tuple[str, ...] = "ResBlock"
    decoder_block_types: str | tuple[str, ...] = "ResBlock"
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: str | tuple[str, ...] = "rms_norm"
    decoder_act_fns: str | tuple[str, ...] = "silu"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> AutoencoderDC:
        """From a diffusers ``AutoencoderDC`` ``config.json`` (JSON lists become tuples; keys
        this port does not know are ignored, as diffusers ignores them)."""
        def freeze(v: Any) -> Any:
            return tuple(freeze(e) for e in v) if isinstance(v, list | tuple) else v

        names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype",
                                                              "param_dtype"}
        module = cls(**{k: freeze(cfg[k]) for k in names if k in cfg}, **overrides)
        module.check_config()
        return module

    def check_config(self) -> None:
        """Raise a ValueError naming the first option this port does not implement."""
        options = {"upsample_block_type": UPSAMPLE, "downsample_block_type": DOWNSAMPLE,
                   "decoder_conv_act_fn": ACTIVATIONS, "decoder_act_fns": ACTIVATIONS,
                   "encoder_block_types": BLOCK_TYPES, "decoder_block_types": BLOCK_TYPES,
                   "decoder_norm_types": NORM_TYPES}
        for key, allowed in options.items():
            bad = [v for v in _per_stage(getattr(self, key), 1) if v not in allowed]
            if bad:
                raise ValueError(f"AutoencoderDC {key}={bad[0]!r} is not supported "
                                 f"(supported: {', '.join(allowed)})")
        for side in ("encoder", "decoder"):
            n = len(getattr(self, f"{side}_block_out_channels"))
            keys = [f"{side}_{k}" for k in ("block_types", "layers_per_block", "qkv_multiscales")]
            for key in keys + (["decoder_norm_types", "decoder_act_fns"] if side == "decoder"
                               else []):
                if len(_per_stage(getattr(self, key), n)) != n:
                    raise ValueError(f"AutoencoderDC {key}: not one entry per {side} stage ({n})")
            layers = getattr(self, f"{side}_layers_per_block")
            if layers[0] < 0 or any(d < 1 for d in layers[1:]):
                raise ValueError(f"AutoencoderDC {side}_layers_per_block={layers}: only the "
                                 "first stage may have no layers")

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side (32 for the SANA DC-AE)."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    def example_inputs(self, batch: int = 1) -> dict[str, Array]:
        f = self.scale_factor  # the smallest image every stage can halve
        return {"images": jnp.zeros((batch, f, f, self.in_channels), jnp.float32)}

    def __call__(self, images: Array) -> Array:
        """Encode then decode: for initialisation and round trips."""
        return self.decode(self.encode(images))

    def encode(self, images: Array) -> Array:
        """(B, H, W, in_channels) in [-1, 1], H and W multiples of :attr:`scale_factor` ->
        unscaled latents (B, H/f, W/f, latent_channels), float32."""
        self.check_config()
        return self.encoder(images.astype(self.dtype)).astype(jnp.float32)

    def decode(self, latents: Array) -> Array:
        """Unscaled latents (B, h, w, latent) -> images (B, h·f, w·f, in_channels), float32."""
        self.check_config()
        return self.decoder(latents.astype(self.dtype)).astype(jnp.float32)

    # Parameters under "encoder/…" and "decoder/…", named as diffusers' modules with list
    # indices joined by "_" (encoder.down_blocks.1.0.conv1 -> encoder/down_blocks_1_0/conv1).
    @nn.compact_name_scope
    def encoder(self, x: Array) -> Array:
        kw = self.kw
        chans, layers = self.encoder_block_out_channels, self.encoder_layers_per_block
        unshuffle = DOWNSAMPLE[self.downsample_block_type]
        if layers[0] > 0:
            x = Conv(chans[0], name="conv_in", **kw)(x)
        else:  # the first stage is only a downsampling stem
            x = DownBlock(chans[1], unshuffle, shortcut=False, name="conv_in", **kw)(x)
        kinds = _per_stage(self.encoder_block_types, len(chans))
        for i, depth in enumerate(layers):
            for j in range(depth):  # the encoder's blocks are always RMSNorm and SiLU
                x = _block(kinds[i], "rms_norm", "silu", self.attention_head_dim,
                           self.encoder_qkv_multiscales[i], name=f"down_blocks_{i}_{j}", **kw)(x)
            if i < len(chans) - 1 and depth > 0:
                x = DownBlock(chans[i + 1], unshuffle, name=f"down_blocks_{i}_{depth}", **kw)(x)
        y = Conv(self.latent_channels, name="conv_out", **kw)(x)
        if self.encoder_out_shortcut:  # the latent is a residual on channel-group means
            y = y + x.reshape(*x.shape[:-1], self.latent_channels, -1).mean(axis=-1)
        return y

    @nn.compact_name_scope
    def decoder(self, z: Array) -> Array:
        kw = self.kw
        chans, layers = self.decoder_block_out_channels, self.decoder_layers_per_block
        n, interpolate = len(chans), UPSAMPLE[self.upsample_block_type]
        kinds, norms, acts = (_per_stage(v, n) for v in (
            self.decoder_block_types, self.decoder_norm_types, self.decoder_act_fns))
        x = Conv(chans[-1], name="conv_in", **kw)(z)
        if self.decoder_in_shortcut:  # each latent channel repeated across a channel group
            x = x + jnp.repeat(z, chans[-1] // z.shape[-1], axis=-1)
        for i in reversed(range(n)):
            first = int(i < n - 1 and layers[i] > 0)  # all but the deepest start by upsampling
            if first:
                x = UpBlock(chans[i], interpolate, name=f"up_blocks_{i}_0", **kw)(x)
            for j in range(first, first + layers[i]):
                x = _block(kinds[i], norms[i], acts[i], self.attention_head_dim,
                           self.decoder_qkv_multiscales[i], name=f"up_blocks_{i}_{j}", **kw)(x)
        x = ACTIVATIONS[self.decoder_conv_act_fn](Norm(name="norm_out", **kw)(x))
        if layers[0] > 0:
            return Conv(self.in_channels, name="conv_out", **kw)(x)
        return UpBlock(self.in_channels, interpolate, shortcut=False, name="conv_out", **kw)(x)
