"""Multi-head self- and cross-attention, key masks, and PixArt-Σ KV token compression.

Attention itself is dispatched by name (``attention_impl``) through :data:`ATTENTION_IMPLS`, so a
Pallas kernel can be registered later under the same signature without touching the models.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.layers import (
    AffineLayerNorm,
    Array,
    Dense,
    DType,
    Initializer,
    RMSNorm,
    constrain,
    xavier_uniform,
)

Q_NAMES = ("batch", "length", "act_heads", None)
KV_NAMES = ("batch", "kv_length", "act_heads", None)
CAPTION_KV_NAMES = ("batch", None, "act_heads", None)

# fn(q, k, v, kv_mask, precision) -> out. q (B, Lq, H, D); k, v (B, Lkv, H, D); kv_mask (B, Lkv).
AttentionFn = Callable[[Array, Array, Array, Array | None, jax.lax.Precision | None], Array]


def xla_attention(
    q: Array, k: Array, v: Array, kv_mask: Array | None = None,
    precision: jax.lax.Precision | None = None,
) -> Array:
    """Softmax attention in plain XLA; logits, softmax and the normaliser in float32.

    Works head-major (B, H, L, D) so both products are plain batched matmuls, and divides the
    (L, D) output by the softmax denominator instead of the (L, L) probabilities: several times
    faster on CPU than the textbook einsum form, identical math. Masked keys get the most negative
    float32 logit, so a row whose keys are all masked attends uniformly instead of giving NaN.
    """
    # Scaling q (L·D values) rather than the logits (L·L) keeps XLA from materialising a
    # broadcast of the scale over the whole logit tensor.
    qh = jnp.swapaxes(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), 1, 2)
    kh, vh = jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2)
    logits = jnp.matmul(qh, kh, precision=precision, preferred_element_type=jnp.float32)
    if kv_mask is not None:
        logits = jnp.where(kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits - peak)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.matmul(weights.astype(v.dtype), vh, precision=precision,
                     preferred_element_type=jnp.float32) / denom
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)


def pallas_attention(
    q: Array, k: Array, v: Array, kv_mask: Array | None = None,
    precision: jax.lax.Precision | None = None,
) -> Array:
    """``pallas_kernels.flash_attention``: Mosaic on TPU, its Triton form on GPUs, interpreted
    elsewhere (CPU tests).

    Under an active mesh and rule table (``Partitioner.activate()``) the kernel runs inside
    ``jax.shard_map`` (Mosaic kernels cannot be partitioned automatically): queries split over
    the batch, length and head axes the rules give them, keys and values over batch and heads
    only (gathered whole along their length, as the XLA path does).
    """
    del precision  # the kernel accumulates in float32 from the input dtype
    from pallas_kernels import flash_attention

    def kernel(q: Array, k: Array, v: Array, mask: Array) -> Array:
        def run(interpret: bool) -> Callable[..., Array]:
            return lambda q, k, v, m: flash_attention(q, k, v, kv_mask=m, interpret=interpret)

        return jax.lax.platform_dependent(q, k, v, mask, tpu=run(False), cuda=run(False),
                                          rocm=run(False), default=run(True))

    mask = (jnp.ones(k.shape[:2], jnp.int32) if kv_mask is None
            else kv_mask.astype(jnp.int32))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, mask)
    q_spec = fitting_spec(Q_NAMES, q.shape, mesh)
    kv_spec = fitting_spec(KV_NAMES, k.shape, mesh)
    mask_spec = jax.sharding.PartitionSpec(kv_spec[0], None)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, mask_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, mask)


def fitting_spec(names: tuple[str | None, ...], shape: tuple[int, ...],
                  mesh: jax.sharding.AbstractMesh) -> jax.sharding.PartitionSpec:
    """Mesh axes for logical ``names`` under the active rules, keeping only the axes that
    divide each dimension (shard_map needs even blocks)."""
    from flax.linen import partitioning

    axes = partitioning.logical_to_mesh_axes(names)
    out = []
    for size, entry in zip(shape, axes, strict=True):
        group = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept: list[str] = []
        for a in group:
            if a in mesh.axis_names and size % (mesh.shape[a] * _size(mesh, kept)) == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return jax.sharding.PartitionSpec(*out)


def _size(mesh: jax.sharding.AbstractMesh, axes: list[str]) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


ATTENTION_IMPLS: dict[str, AttentionFn] = {"xla": xla_attention, "pallas": pallas_attention}


def register_attention_impl(name: str, fn: AttentionFn) -> None:
    """Make ``attention_impl=name`` available to every model (e.g. a Pallas kernel)."""
    ATTENTION_IMPLS[name] = fn


def dot_product_attention(
    q: Array, k: Array, v: Array, kv_mask: Array | None = None, *,
    impl: str = "xla", precision: jax.lax.Precision | None = None,
) -> Array:
    """Scaled dot-product attention; ``kv_mask`` (B, Lkv) is True/1 for keys to keep."""
    try:
        fn = ATTENTION_IMPLS[impl]
    except KeyError:
        raise ValueError(
            f"unknown attention_impl {impl!r}; available: {sorted(ATTENTION_IMPLS)}"
        ) from None
    if kv_mask is not None:
        kv_mask = kv_mask.astype(bool)
    return fn(q, k, v, kv_mask, precision)


KV_COMPRESS_MODES = ("conv", "ave", "uniform", "uniform_every")


def compressed_length(mode: str, ratio: int, grid_hw: tuple[int, int]) -> int:
    """Number of key/value tokens left after compression; raises where the official code fails."""
    h, w = grid_hw
    if mode not in KV_COMPRESS_MODES:
        raise ValueError(f"unknown kv_compress mode {mode!r}; expected one of {KV_COMPRESS_MODES}")
    if ratio == 1:
        return h * w
    if mode == "uniform_every":
        if (h * w) % ratio:
            raise ValueError(f"kv_compress 'uniform_every' needs h*w={h * w} divisible by {ratio}")
        return h * w // ratio
    if mode == "uniform" and (h % ratio or w % ratio):
        raise ValueError(f"kv_compress 'uniform' needs the token grid {grid_hw} divisible by {ratio}")
    # 'conv' (stride = kernel) and 'ave' (nearest resize) drop a remainder row/column.
    return (h // ratio) * (w // ratio)


class KVCompress(nn.Module):
    """PixArt-Σ KV token compression, applied with the same parameters to K and to V.

    ``conv``: depthwise ``ratio×ratio`` convolution with stride ``ratio`` and bias, initialised as
    an average pool, then an affine LayerNorm (eps 1e-5). The parameter-free modes of the official
    code: ``ave`` (nearest-neighbour downsampling, despite the name), ``uniform`` (strided 2-D
    slice) and ``uniform_every`` (every ``ratio``-th token of the flattened sequence).
    """

    mode: str
    ratio: int
    grid_hw: tuple[int, int]
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, k: Array, v: Array) -> tuple[Array, Array]:
        compressed_length(self.mode, self.ratio, self.grid_hw)  # validates the grid
        if self.mode == "conv":
            d = k.shape[-1]
            r = self.ratio
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(
                    nn.initializers.constant(1.0 / r**2), (None, None, "embed")
                ),
                (r, r, d),
                self.param_dtype,
            )
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                (d,),
                self.param_dtype,
            )
            norm = AffineLayerNorm(eps=1e-5, param_dtype=self.param_dtype, name="norm")

            def compress(x: Array) -> Array:
                y = self._depthwise_conv(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)
                return norm(y)

        else:
            compress = self._subsample
        return compress(k), compress(v)

    def _grid(self, x: Array) -> Array:
        h, w = self.grid_hw
        r = self.ratio
        x = x.reshape(x.shape[0], h, w, x.shape[-1])
        return x[:, : h // r * r, : w // r * r]

    def _depthwise_conv(self, x: Array, kernel: Array) -> Array:
        b, d = x.shape[0], x.shape[-1]
        r = self.ratio
        g = self._grid(x)
        hh, ww = g.shape[1] // r, g.shape[2] // r
        g = g.reshape(b, hh, r, ww, r, d)
        return jnp.einsum("bhpwqd,pqd->bhwd", g, kernel).reshape(b, hh * ww, d)

    def _subsample(self, x: Array) -> Array:
        b, d = x.shape[0], x.shape[-1]
        r = self.ratio
        if self.mode == "uniform_every":
            return x[:, ::r]
        g = self._grid(x)[:, ::r, ::r]
        return g.reshape(b, -1, d)


class SelfAttention(nn.Module):
    """Self-attention with a fused QKV projection, optional QK-norm and KV compression.

    QK-norm (PixArt-Σ option) is an affine LayerNorm (eps 1e-5) over the full width of q and k,
    before splitting heads and before compression, as in the official ``AttentionKVCompress``.

    ``extra_kv`` (k, v), each (B, L', H, D): keys and values appended to the tokens' own (after
    compression), e.g. a control condition's (:mod:`jdit.control`); ``return_kv``: also return
    the tokens' own (k, v), before compression (so that every block's have one length).
    ``identity`` (B,) bool: rows whose attention is the identity map (each token attends only
    to itself: the output projection of its own value), perturbed-attention guidance's
    perturbed branch.
    """

    num_heads: int
    head_dim: int
    qk_norm: bool = False
    kv_compress: str | None = None
    kv_compress_ratio: int = 1
    grid_hw: tuple[int, int] | None = None
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, extra_kv: tuple[Array, Array] | None = None,
                 return_kv: bool = False, identity: Array | None = None
                 ) -> Array | tuple[Array, tuple[Array, Array]]:
        b, n, width = x.shape
        heads, hd = self.num_heads, self.head_dim
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        qkv = Dense((3, heads, hd), ("embed",), (None, "heads", "kv"), name="qkv", **common)(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_norm:
            q = AffineLayerNorm(1e-5, self.param_dtype, name="q_norm")(q.reshape(b, n, -1))
            k = AffineLayerNorm(1e-5, self.param_dtype, name="k_norm")(k.reshape(b, n, -1))
            q, k = q.reshape(b, n, heads, hd), k.reshape(b, n, heads, hd)
        own = (k, v)
        if self.kv_compress is not None and self.kv_compress_ratio > 1:
            if self.grid_hw is None:
                raise ValueError("KV compression needs the token grid (grid_hw)")
            k, v = KVCompress(
                self.kv_compress, self.kv_compress_ratio, self.grid_hw, self.param_dtype,
                name="kv_compress",
            )(k.reshape(b, n, -1), v.reshape(b, n, -1))
            k, v = k.reshape(b, -1, heads, hd), v.reshape(b, -1, heads, hd)
        if extra_kv is not None:
            k = jnp.concatenate([k, extra_kv[0].astype(k.dtype)], axis=1)
            v = jnp.concatenate([v, extra_kv[1].astype(v.dtype)], axis=1)
        # Under sequence parallelism queries stay split over `context`; keys and values are
        # gathered whole (cheaper after KV compression).
        q, k, v = constrain(q, Q_NAMES), constrain(k, KV_NAMES), constrain(v, KV_NAMES)
        o = constrain(dot_product_attention(q, k, v, impl=self.attention_impl,
                                            precision=self.precision), Q_NAMES)
        if identity is not None:  # PAG: the perturbed rows' tokens see only themselves
            o = jnp.where(identity.reshape(b, 1, 1, 1), own[1].astype(o.dtype), o)
        out = Dense(width, ("heads", "kv"), ("embed",), name="out", **common)(o)
        return (out, own) if return_kv else out


class CrossAttention(nn.Module):
    """Attention from image tokens to caption tokens, padded caption tokens masked out.

    ``qk_norm``: RMSNorm (eps 1e-5) of q and k across all heads (SANA 1.5's ``cross_norm``).
    """

    num_heads: int
    head_dim: int
    qk_norm: bool = False
    out_init: Initializer = xavier_uniform
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, context: Array, context_mask: Array | None) -> Array:
        width = x.shape[-1]
        heads, hd = self.num_heads, self.head_dim
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        q = Dense((heads, hd), ("embed",), ("heads", "kv"), name="q", **common)(x)
        kv = Dense((2, heads, hd), ("embed",), (None, "heads", "kv"), name="kv", **common)(context)
        k, v = kv[:, :, 0], kv[:, :, 1]
        if self.qk_norm:
            q = RMSNorm(1e-5, param_dtype=self.param_dtype, name="q_norm")(
                q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = RMSNorm(1e-5, param_dtype=self.param_dtype, name="k_norm")(
                k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        k, v = constrain(k, CAPTION_KV_NAMES), constrain(v, CAPTION_KV_NAMES)
        o = dot_product_attention(
            constrain(q, Q_NAMES), k, v, context_mask,
            impl=self.attention_impl, precision=self.precision,
        )
        o = constrain(o, Q_NAMES)
        return Dense(
            width, ("heads", "kv"), ("embed",), kernel_init=self.out_init, name="out", **common
        )(o)
