"""Pure-jnp references with the kernels' signatures: the ground truth of the kernel tests and
the fallback wherever a kernel cannot run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def flash_attention(q: Array, k: Array, v: Array, *, kv_mask: Array | None = None,
                    sm_scale: float | None = None, interpret: object = False) -> Array:
    """Softmax attention, float32 statistics. q (B, Lq, H, D); k, v (B, Lkv, H, D); kv_mask
    (B, Lkv), nonzero keeps a key. A query whose keys are all masked returns zeros.
    ``interpret`` is accepted for signature parity and ignored."""
    del interpret
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_mask is not None:
        keep = (kv_mask != 0)[:, None, None, :]
        s = jnp.where(keep, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    denom = jnp.swapaxes(denom, 1, 2)  # (B, Lq, H, 1)
    out = jnp.where(denom > 0, out / jnp.where(denom > 0, denom, 1.0), 0.0)
    return out.astype(q.dtype)


def linear_attention(q: Array, k: Array, v: Array, *, eps: float = 1e-15,
                     chunk_size: int | None = None, interpret: object = False) -> Array:
    """ReLU linear attention, float32 inside: ``relu(q)(relu(k)ᵀv) / (relu(q)·Σ relu(k) + eps)``.

    q, k (B, L, H, D), v (B, L, H, Dv). ``chunk_size=N``: block-causal, tokens of chunk c see the
    keys of chunks 0..c (all of their own chunk). ``interpret`` is ignored (signature parity).
    """
    del interpret
    qf = jnp.maximum(q.astype(jnp.float32), 0.0)
    kf = jnp.maximum(k.astype(jnp.float32), 0.0)
    vf = v.astype(jnp.float32)
    if chunk_size is None:
        # heads-major: each head's products are plain (L, D) matmuls. On a CPU this is 2x faster
        # than contracting the (B, L, H, D) arrays in place, and its time stays linear in L past
        # the caches (BENCHMARKS.md, issue 6).
        qf, kf, vf = (jnp.swapaxes(x, 1, 2) for x in (qf, kf, vf))  # (B, H, L, D)
        state = jnp.einsum("bhld,bhle->bhde", kf, vf)
        ksum = jnp.sum(kf, axis=2)  # (B, H, D)
        num = jnp.einsum("bhld,bhde->bhle", qf, state)
        den = jnp.einsum("bhld,bhd->bhl", qf, ksum)[..., None] + eps
        return jnp.swapaxes(num / den, 1, 2).astype(q.dtype)
    b, length, h, d = q.shape
    n = -(-length // chunk_size)
    pad = n * chunk_size - length

    def chunks(x: Array) -> Array:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(b, n, chunk_size, h, x.shape[-1])

    qc, kc, vc = chunks(qf), chunks(kf), chunks(vf)
    state = jnp.cumsum(jnp.einsum("bnlhd,bnlhe->bnhde", kc, vc), axis=1)
    ksum = jnp.cumsum(jnp.sum(kc, axis=2), axis=1)  # (B, n, H, D)
    num = jnp.einsum("bnlhd,bnhde->bnlhe", qc, state)
    den = jnp.einsum("bnlhd,bnhd->bnlh", qc, ksum)[..., None] + eps
    out = (num / den).reshape(b, n * chunk_size, h, -1)[:, :length]
    return out.astype(q.dtype)
