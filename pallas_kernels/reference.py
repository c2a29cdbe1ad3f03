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
