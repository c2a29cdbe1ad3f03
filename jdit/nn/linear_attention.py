"""ReLU linear self-attention (SANA's LiteLA): O(N) in the number of tokens.

``out = relu(q)(relu(k)ᵀv) / (relu(q)·Σ relu(k) + eps)`` per head, with float32 states and
division whatever the compute dtype. ``attention_impl="pallas"`` runs
``pallas_kernels.linear_attention`` (Mosaic on TPU, Triton on GPUs, interpreted on CPU; inside
``shard_map`` under a mesh); anything else runs its jnp reference, which XLA compiles well on
every backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.attention import Q_NAMES, fitting_spec
from jdit.nn.layers import Array, Dense, DType, RMSNorm, constrain
from jdit.nn.mix_ffn import DepthwiseConv
from jdit.nn.rotary import apply_rotary_interleaved

FP16_MAX = 65504.0


def linear_attention(q: Array, k: Array, v: Array, *, eps: float = 1e-15,
                     chunk_size: int | None = None, impl: str = "xla") -> Array:
    """q, k, v (B, L, H, D) -> (B, L, H, D) in q's dtype. ``chunk_size``: block-causal."""
    from pallas_kernels import linear_attention as kernel
    from pallas_kernels import reference

    if impl != "pallas":
        return reference.linear_attention(q, k, v, eps=eps, chunk_size=chunk_size)

    def run(q: Array, k: Array, v: Array) -> Array:
        def on(interpret: bool):
            return functools.partial(kernel, eps=eps, chunk_size=chunk_size, interpret=interpret)

        return jax.lax.platform_dependent(q, k, v, tpu=on(False), cuda=on(False),
                                          rocm=on(False), default=on(True))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q, k, v)
    # Every token's output needs the whole sequence's state: split over batch and heads only.
    spec = fitting_spec(("batch", None, "act_heads", None), q.shape, mesh)
    return jax.shard_map(run, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


Cache = tuple[Array, Array]  # (state Σ relu(k)ᵀv (B, H, D, Dv), key sum Σ relu(k) (B, H, D)), float32


def empty_cache(batch: int, heads: int, head_dim: int, value_dim: int | None = None) -> Cache:
    """The state before the first chunk: zeros, whose size does not grow with the sequence."""
    dv = head_dim if value_dim is None else value_dim
    return (jnp.zeros((batch, heads, head_dim, dv), jnp.float32),
            jnp.zeros((batch, heads, head_dim), jnp.float32))


def linear_attention_chunk(q: Array, k: Array, v: Array, cache: Cache, *,
                           eps: float = 1e-15, rotary: tuple[Array, Array] | None = None
                           ) -> tuple[Array, Cache]:
    """One chunk of block-causal linear attention from a cache of all earlier chunks: the chunk's
    tokens see each other and everything before. q, k, v (B, C, H, D); returns the chunk's
    output and the cache after it. Chunk by chunk this equals ``linear_attention(...,
    chunk_size=C)`` over the whole sequence, in constant memory.

    ``rotary``: (cos, sin), each (B or 1, C, D/2), the chunk's rotary angles (SANA-Video): the
    numerator uses rotated relu(q), relu(k) (interleaved pairs), the denominator the un-rotated
    ones, so it stays positive. The cache then holds Σ rot(relu(k))ᵀv and Σ relu(k)."""
    qf, kf = (jnp.maximum(t.astype(jnp.float32), 0.0) for t in (q, k))
    qn, kn = qf, kf
    if rotary is not None:
        qn, kn = (apply_rotary_interleaved(t, *rotary) for t in (qf, kf))
    state = cache[0] + jnp.einsum("bchd,bche->bhde", kn, v.astype(jnp.float32))
    ksum = cache[1] + jnp.sum(kf, axis=1)
    num = jnp.einsum("bchd,bhde->bche", qn, state)
    den = jnp.einsum("bchd,bhd->bch", qf, ksum)[..., None] + eps
    return (num / den).astype(q.dtype), (state, ksum)


class LinearSelfAttention(nn.Module):
    """SANA's linear self-attention: fused q/k/v projection (no bias by default), optional
    RMSNorm of q and k across all heads (SANA 1.5), linear attention, output projection.

    With a float16 compute dtype the output is clipped to ±65504, as SANA and diffusers do: the
    fp16-trained SANA 1.0 checkpoints overflow there otherwise. ``v_conv=k`` (LiT): a depthwise
    k×k convolution of V over the token grid (``grid_hw``) is added to the attention output,
    restoring the local detail linear attention blurs.
    """

    num_heads: int
    head_dim: int
    qkv_bias: bool = False
    qk_norm: bool = False
    v_conv: int = 0
    grid_hw: tuple[int, int] | None = None
    eps: float = 1e-15
    chunk_size: int | None = None
    attention_impl: str = "xla"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, cache: Cache | None = None, extra_state: Cache | None = None,
                 return_state: bool = False, identity: Array | None = None,
                 rotary: tuple[Array, Array] | None = None) -> Array | tuple[Array, Cache]:
        """x (B, L, D) -> (B, L, D). With a ``cache`` (``empty_cache`` to start), x is the next
        chunk of a block-causal sequence: returns its output and the updated cache.

        ``extra_state``: other tokens' state (Σ relu(k)ᵀv, Σ relu(k)) added to these tokens'
        own, as if they were attended to too (a control condition's, :mod:`jdit.control`);
        ``return_state``: also return these tokens' own state. ``identity`` (B,) bool: rows
        whose attention is the identity map (each token's own value; perturbed-attention
        guidance's perturbed branch). ``rotary``: (cos, sin) (1, L, D/2) rotary angles of these
        tokens applied after the ReLU (SANA-Video, :func:`linear_attention_chunk`); this form
        has no kernel yet and runs as jnp whatever ``attention_impl`` says."""
        b, n, width = x.shape
        heads, hd = self.num_heads, self.head_dim
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        qkv = Dense((3, heads, hd), ("embed",), (None, "heads", "kv"), use_bias=self.qkv_bias,
                    name="qkv", **common)(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_norm:
            q = RMSNorm(1e-5, param_dtype=self.param_dtype, name="q_norm")(q.reshape(b, n, -1))
            k = RMSNorm(1e-5, param_dtype=self.param_dtype, name="k_norm")(k.reshape(b, n, -1))
            q, k = q.reshape(b, n, heads, hd), k.reshape(b, n, heads, hd)
        q, k, v = (constrain(t, Q_NAMES) for t in (q, k, v))
        if return_state:
            if rotary is not None:
                raise ValueError("LinearSelfAttention: return_state with rotary positions is "
                                 "not supported")
            own = linear_attention_chunk(q[:, :0], k, v, empty_cache(b, heads, hd))[1]
        if extra_state is not None:
            # the extra state enters as the cache of everything "before" these tokens
            if cache is not None:
                raise ValueError("LinearSelfAttention: extra_state and cache are exclusive")
            o, _ = linear_attention_chunk(q, k, v, extra_state, eps=self.eps, rotary=rotary)
        elif cache is not None:
            o, cache = linear_attention_chunk(q, k, v, cache, eps=self.eps, rotary=rotary)
        elif rotary is not None:
            if self.chunk_size is not None:
                raise ValueError("LinearSelfAttention: rotary positions with chunk_size: run "
                                 "the chunks one by one with a cache")
            o, _ = linear_attention_chunk(q, k, v, empty_cache(b, heads, hd), eps=self.eps,
                                          rotary=rotary)
        else:
            o = linear_attention(q, k, v, eps=self.eps, chunk_size=self.chunk_size,
                                 impl=self.attention_impl)
        if self.v_conv:
            if self.grid_hw is None or cache is not None:
                raise ValueError("LinearSelfAttention: v_conv needs grid_hw and no cache")
            local = DepthwiseConv(("heads", "kv"), self.v_conv, self.param_dtype, self.dtype,
                                  name="v_conv")(v.reshape(b, *self.grid_hw, heads, hd))
            o = o + local.reshape(o.shape).astype(o.dtype)
        if identity is not None:  # PAG: the perturbed rows' tokens see only themselves
            o = jnp.where(identity.reshape(b, 1, 1, 1), v.astype(o.dtype), o)
        out = Dense(width, ("heads", "kv"), ("embed",), name="out", **common)(constrain(o, Q_NAMES))
        if jnp.dtype(self.dtype) == jnp.float16:
            out = jnp.clip(out, -FP16_MAX, FP16_MAX)
        if return_state:
            return out, own
        return out if cache is None else (out, cache)
