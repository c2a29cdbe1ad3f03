"""GPU (Triton) forms of the two kernels, behind the same functions: forward kernels only.

Nothing here can run a GPU, so these are kept small: one program per (batch, head[, query
block]) walking the sequence in tiles with ``fori_loop``, the same math as the TPU kernels
(online softmax with float32 statistics; ReLU linear attention with a float32 state). Triton
tiles must have power-of-two sides, so head dims are zero-padded to one (at least 16) and lengths
to whole tiles. Gradients come from the jnp references (``jax.vjp``), which rematerialise the
forward: correct, but on a GPU the softmax backward then holds the (Lq, Lkv) scores.

Tested on CPU by the Pallas interpreter (values against the references) and by lowering for
``cuda`` (the Triton IR is produced); never run on a GPU here.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import reference

Array = jax.Array
F32 = jnp.float32
_MASKED = -1e30


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


def _heads_major(x: Array, length: int, dim: int) -> Array:
    """(B, L, H, D) -> (B, H, length, dim), zero-padded."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, dim - x.shape[3])))


def _params() -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------- softmax


def _flash_kernel(q_ref, k_ref, v_ref, m_ref, o_ref, *, scale, block_k, blocks_k):
    q = q_ref[...].astype(F32) * scale
    rows = q.shape[0]

    def step(j, carry):
        m_i, l_i, acc = carry
        keys = pl.ds(j * block_k, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        keep = m_ref[keys] != 0
        s = jnp.where(keep[None, :], pltriton.dot(q, k.astype(F32), trans_b=True), _MASKED)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        p = jnp.where(keep[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m_i - m_new)
        acc = acc * alpha[:, None] + pltriton.dot(p.astype(v.dtype), v).astype(F32)
        return m_new, l_i * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((rows,), _MASKED, F32), jnp.zeros((rows,), F32),
            jnp.zeros(q.shape, F32))
    _, l_i, acc = jax.lax.fori_loop(0, blocks_k, step, init)
    out = jnp.where(l_i[:, None] > 0, acc / jnp.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


def _flash_forward(q, k, v, mask, scale, interpret, block_q, block_k):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    dp = _pow2(d)
    bq, bk = min(block_q, _pow2(lq)), min(block_k, _pow2(lk))
    lq_p, lk_p = -(-lq // bq) * bq, -(-lk // bk) * bk
    qh, kh, vh = _heads_major(q, lq_p, dp), _heads_major(k, lk_p, dp), _heads_major(v, lk_p, dp)
    mask = jnp.pad(mask.astype(jnp.int32), ((0, 0), (0, lk_p - lk)))  # padded keys masked
    out = pl.pallas_call(
        functools.partial(_flash_kernel, scale=scale, block_k=bk, blocks_k=lk_p // bk),
        out_shape=jax.ShapeDtypeStruct((b, h, lq_p, dp), q.dtype),
        grid=(b, h, lq_p // bq),
        in_specs=[pl.BlockSpec((None, None, bq, dp), lambda b_, h_, i: (b_, h_, i, 0)),
                  pl.BlockSpec((None, None, lk_p, dp), lambda b_, h_, i: (b_, h_, 0, 0)),
                  pl.BlockSpec((None, None, lk_p, dp), lambda b_, h_, i: (b_, h_, 0, 0)),
                  pl.BlockSpec((None, lk_p), lambda b_, h_, i: (b_, 0))],
        out_specs=pl.BlockSpec((None, None, bq, dp), lambda b_, h_, i: (b_, h_, i, 0)),
        compiler_params=_params(), interpret=interpret, name="jdit_flash_attention_gpu",
    )(qh, kh, vh, mask)
    return jnp.swapaxes(out[:, :, :lq, :d], 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, mask, scale, interpret, block_q, block_k):
    return _flash_forward(q, k, v, mask, scale, interpret, block_q, block_k)


def _flash_fwd(q, k, v, mask, scale, interpret, block_q, block_k):
    return _flash_forward(q, k, v, mask, scale, interpret, block_q, block_k), (q, k, v, mask)


def _flash_bwd(scale, interpret, block_q, block_k, res, g):
    q, k, v, mask = res
    _, vjp = jax.vjp(lambda q, k, v: reference.flash_attention(q, k, v, kv_mask=mask,
                                                               sm_scale=scale), q, k, v)
    return (*vjp(g), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: Array, k: Array, v: Array, *, kv_mask: Array | None = None,
                    sm_scale: float | None = None, interpret: Any = False,
                    block_q: int = 64, block_k: int = 64) -> Array:
    """``pallas_kernels.flash_attention`` for GPUs (Triton); same arguments and semantics."""
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    mask = jnp.ones(k.shape[:2], jnp.int32) if kv_mask is None else kv_mask
    return _flash(q, k, v, mask, scale, interpret, block_q, block_k)


# ----------------------------------------------------------------------------- linear


def _linear_kernel(q_ref, k_ref, v_ref, o_ref, *, eps, rows, blocks, causal):
    d, dv = q_ref.shape[-1], v_ref.shape[-1]

    def tile(ref, i):
        return ref[pl.ds(i * rows, rows), :].astype(F32)

    def add(i, carry):  # the tile's keys join the state
        s, z = carry
        kf = jnp.maximum(tile(k_ref, i), 0.0)
        return s + pltriton.dot(kf, tile(v_ref, i), trans_a=True), z + jnp.sum(kf, axis=0)

    def emit(i, s, z):
        qf = jnp.maximum(tile(q_ref, i), 0.0)
        den = jnp.sum(qf * z[None, :], axis=1, keepdims=True) + eps
        o_ref[pl.ds(i * rows, rows), :] = (pltriton.dot(qf, s) / den).astype(o_ref.dtype)

    init = (jnp.zeros((d, dv), F32), jnp.zeros((d,), F32))
    if causal:  # chunk i sees chunks 0..i
        def step(i, carry):
            carry = add(i, carry)
            emit(i, *carry)
            return carry

        jax.lax.fori_loop(0, blocks, step, init)
    else:
        s, z = jax.lax.fori_loop(0, blocks, add, init)

        def out(i, _):
            emit(i, s, z)
            return _

        jax.lax.fori_loop(0, blocks, out, 0)


def _linear_forward(q, k, v, eps, chunk_size, interpret, block):
    b, length, h, d = q.shape
    dv = v.shape[-1]
    dp, dvp = _pow2(d), _pow2(dv)
    rows = chunk_size or min(block, _pow2(length))
    lp = -(-length // rows) * rows  # padded rows are zeros: relu(0) adds nothing
    qh, kh, vh = _heads_major(q, lp, dp), _heads_major(k, lp, dp), _heads_major(v, lp, dvp)
    whole = lambda width: pl.BlockSpec((None, None, lp, width), lambda b_, h_: (b_, h_, 0, 0))  # noqa: E731
    out = pl.pallas_call(
        functools.partial(_linear_kernel, eps=eps, rows=rows, blocks=lp // rows,
                          causal=chunk_size is not None),
        out_shape=jax.ShapeDtypeStruct((b, h, lp, dvp), q.dtype),
        grid=(b, h), in_specs=[whole(dp), whole(dp), whole(dvp)], out_specs=whole(dvp),
        compiler_params=_params(), interpret=interpret, name="jdit_linear_attention_gpu",
    )(qh, kh, vh)
    return jnp.swapaxes(out[:, :, :length, :dv], 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _linear(q, k, v, eps, chunk_size, interpret, block):
    return _linear_forward(q, k, v, eps, chunk_size, interpret, block)


def _linear_fwd(q, k, v, eps, chunk_size, interpret, block):
    return _linear_forward(q, k, v, eps, chunk_size, interpret, block), (q, k, v)


def _linear_bwd(eps, chunk_size, interpret, block, res, g):
    _, vjp = jax.vjp(functools.partial(reference.linear_attention, eps=eps,
                                       chunk_size=chunk_size), *res)
    return vjp(g)


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_attention(q: Array, k: Array, v: Array, *, eps: float = 1e-15,
                     chunk_size: int | None = None, interpret: Any = False,
                     block_size: int = 64) -> Array:
    """``pallas_kernels.linear_attention`` for GPUs (Triton); same arguments and semantics.
    Triton tiles are powers of two of at least 16 rows: other chunk sizes run the reference."""
    if chunk_size is not None and chunk_size != _pow2(chunk_size):
        return reference.linear_attention(q, k, v, eps=eps, chunk_size=chunk_size)
    return _linear(q, k, v, float(eps), chunk_size, interpret, block_size)


__all__ = ["flash_attention", "linear_attention"]
