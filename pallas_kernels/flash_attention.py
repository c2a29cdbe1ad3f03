"""Flash attention for TPU (Pallas Mosaic): online softmax over key blocks, float32 statistics,
key masks, any query and key lengths (PixArt-Σ's compressed keys are 4× fewer than queries).

    out = flash_attention(q, k, v, kv_mask=None, sm_scale=None, interpret=False)
    # q (B, Lq, H, D); k, v (B, Lkv, H, D); kv_mask (B, Lkv), nonzero keeps a key.

The L×L scores never leave VMEM. Lengths are padded to whole blocks and the padding is masked;
a query whose keys are all masked returns zeros (``reference.flash_attention`` has the same
semantics). Gradients come from ``jax.custom_vjp`` with two backward kernels (FlashAttention-2):
one accumulates dK and dV over query blocks, one accumulates dQ over key blocks; both recompute
the probabilities from the saved log-sum-exp.

``interpret``: ``False`` (compiled for the platform: Mosaic on TPU, the Triton form of
``pallas_kernels.gpu`` on GPUs, the jnp reference elsewhere), ``True`` (run the TPU kernel with
XLA on any backend, for tests), or a ``pltpu.InterpretParams`` (TPU semantics, slower).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array
LANES = 128  # per-row statistics are kept lane-replicated, (rows, 128), as TPU layouts want
_MASKED = -1e30  # finite: a block whose keys are all masked must not produce inf - inf


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _blocks(length: int, preferred: int) -> tuple[int, int]:
    """(block, padded length): blocks are multiples of 128 (the mask's lane dimension)."""
    block = min(preferred, _round_up(length, LANES))
    return block, _round_up(length, block)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, *rest, scale: float, save_lse: bool):
    lse_ref, (m_sc, l_sc, acc_sc) = (rest[0], rest[1:]) if save_lse else (None, rest)
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _MASKED, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale  # (bq, bk)
    keep = mask_ref[...] != 0  # (1, bk)
    s = jnp.where(keep, s, _MASKED)
    m_prev = m_sc[...][:, :1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(keep, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_sc[...][:, :1] + jnp.sum(p, axis=-1, keepdims=True)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    acc_sc[...] = acc_sc[...] * alpha + pv
    m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
    l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        denom = l_sc[...][:, :1]
        safe = jnp.where(denom > 0, denom, 1.0)
        o_ref[...] = jnp.where(denom > 0, acc_sc[...] / safe, 0.0).astype(o_ref.dtype)
        if save_lse:
            lse = jnp.where(denom > 0, m_sc[...][:, :1] + jnp.log(safe), jnp.inf)
            lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _forward(q, k, v, mask, *, scale, bq, bk, save_lse, interpret):
    """q (B, H, Lq, D), k/v (B, H, Lk, D), mask (B, 1, Lk) int32; lengths already padded."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    grid = (b, h, lq // bq, lk // bk)
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_, j, 0))
    mask_spec = pl.BlockSpec((None, 1, bk), lambda b_, h_, i, j: (b_, 0, j))
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_spec]
    if save_lse:
        out_shape.append(jax.ShapeDtypeStruct((b, h, lq, LANES), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, bq, LANES), lambda b_, h_, i, j: (b_, h_, i, 0)))
    itemsize = q.dtype.itemsize
    cost = pl.CostEstimate(flops=4 * b * h * lq * lk * d, transcendentals=b * h * lq * lk,
                           bytes_accessed=itemsize * (2 * q.size + (lq // bq) * (k.size + v.size)))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, save_lse=save_lse),
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=grid, in_specs=[q_spec, kv_spec, kv_spec, mask_spec],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=interpret, name="jdit_flash_attention_fwd",
    )(q, k, v, mask)
    return outs if save_lse else (outs[0], None)


# ----------------------------------------------------------------------------- backward


def _probs(q, k, mask_ref, lse_ref, scale):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale
    keep = mask_ref[...] != 0
    return jnp.where(keep, jnp.exp(s - lse_ref[...][:, :1]), 0.0)  # lse inf -> 0 (all masked)


def _dkv_kernel(q_ref, k_ref, v_ref, mask_ref, lse_ref, do_ref, delta_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, scale: float):
    i = pl.program_id(3)  # query blocks are the reduction axis here

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    p = _probs(q, k, mask_ref, lse_ref, scale)  # (bq, bk)
    dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...][:, :1])
    dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32) * scale

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, mask_ref, lse_ref, do_ref, delta_ref, dq_ref, dq_sc, *,
               scale: float):
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    p = _probs(q, k, mask_ref, lse_ref, scale)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...][:, :1])
    dq_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32) * scale

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _backward(q, k, v, mask, lse, do, delta, *, scale, bq, bk, interpret):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
    # dK, dV: grid over key blocks, reducing over query blocks (last grid axis)
    q_by_i = pl.BlockSpec((None, None, bq, d), lambda b_, h_, j, i: (b_, h_, i, 0))
    kv_by_j = pl.BlockSpec((None, None, bk, d), lambda b_, h_, j, i: (b_, h_, j, 0))
    mask_by_j = pl.BlockSpec((None, 1, bk), lambda b_, h_, j, i: (b_, 0, j))
    row_by_i = pl.BlockSpec((None, None, bq, LANES), lambda b_, h_, j, i: (b_, h_, i, 0))
    work = b * h * lq * lk
    size = q.dtype.itemsize
    dkv_cost = pl.CostEstimate(  # four matmuls per block pair; q, dO re-read per key block
        flops=8 * work * d, transcendentals=work,
        bytes_accessed=size * ((lk // bk) * 2 * q.size + 4 * k.size) + 4 * (lk // bk) * lse.size)
    dq_cost = pl.CostEstimate(  # three matmuls; k, v re-read per query block
        flops=6 * work * d, transcendentals=work,
        bytes_accessed=size * (3 * q.size + (lq // bq) * 2 * k.size) + 4 * lse.size)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, h, lk // bk, lq // bq),
            in_specs=[q_by_i, kv_by_j, kv_by_j, mask_by_j, row_by_i, q_by_i, row_by_i],
            out_specs=[kv_by_j, kv_by_j],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        compiler_params=params, cost_estimate=dkv_cost, interpret=interpret,
        name="jdit_flash_attention_dkv",
    )(q, k, v, mask, lse, do, delta)
    # dQ: grid over query blocks, reducing over key blocks
    q_by_i2 = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
    kv_by_j2 = pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_, j, 0))
    mask_by_j2 = pl.BlockSpec((None, 1, bk), lambda b_, h_, i, j: (b_, 0, j))
    row_by_i2 = pl.BlockSpec((None, None, bq, LANES), lambda b_, h_, i, j: (b_, h_, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, h, lq // bq, lk // bk),
            in_specs=[q_by_i2, kv_by_j2, kv_by_j2, mask_by_j2, row_by_i2, q_by_i2, row_by_i2],
            out_specs=q_by_i2,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        compiler_params=params, cost_estimate=dq_cost, interpret=interpret,
        name="jdit_flash_attention_dq",
    )(q, k, v, mask, lse, do, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------- public function


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, mask, scale, bq, bk, interpret):
    return _forward(q, k, v, mask, scale=scale, bq=bq, bk=bk, save_lse=False,
                    interpret=interpret)[0]


def _attention_fwd(q, k, v, mask, scale, bq, bk, interpret):
    out, lse = _forward(q, k, v, mask, scale=scale, bq=bq, bk=bk, save_lse=True,
                        interpret=interpret)
    return out, (q, k, v, mask, out, lse)


def _attention_bwd(scale, bq, bk, interpret, res, do):
    q, k, v, mask, out, lse = res
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    delta = jnp.broadcast_to(delta, (*delta.shape[:-1], LANES))
    dq, dk, dv = _backward(q, k, v, mask, lse, do, delta, scale=scale, bq=bq, bk=bk,
                           interpret=interpret)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q: Array, k: Array, v: Array, *, kv_mask: Array | None = None,
                    sm_scale: float | None = None, interpret: Any = False,
                    block_q: int = 512, block_k: int = 512) -> Array:
    """Softmax attention without materialising the scores; see the module docstring."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, Lq, H, D) and k, v (B, Lkv, H, D) of one shape, got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    b, lq, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, heads or head dim")
    lk = k.shape[1]
    if kv_mask is not None and kv_mask.shape != (b, lk):
        raise ValueError(f"kv_mask must be (B, Lkv) = {(b, lk)}, got {kv_mask.shape}")
    if block_q % 8 or block_k % LANES:
        raise ValueError(f"block_q must be a multiple of 8 and block_k of {LANES}, got "
                         f"{block_q}, {block_k}")
    scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    bq, lq_pad = _blocks(lq, block_q)
    bk, lk_pad = _blocks(lk, block_k)
    mask = jnp.ones((b, lk), jnp.int32) if kv_mask is None else (kv_mask != 0).astype(jnp.int32)
    mask = jnp.pad(mask, ((0, 0), (0, lk_pad - lk)))[:, None, :]  # padded keys are masked

    def heads_major(x: Array, length: int) -> Array:
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))

    def tpu(q: Array, k: Array, v: Array, mask: Array) -> Array:
        out = _attention(heads_major(q, lq_pad), heads_major(k, lk_pad), heads_major(v, lk_pad),
                         mask, scale, bq, bk, interpret)
        return jnp.swapaxes(out[:, :, :lq], 1, 2)

    if interpret:
        return tpu(q, k, v, mask)
    from pallas_kernels import gpu, reference

    def triton(q: Array, k: Array, v: Array, mask: Array) -> Array:
        return gpu.flash_attention(q, k, v, kv_mask=mask[:, 0, :lk], sm_scale=scale)

    def fallback(q: Array, k: Array, v: Array, mask: Array) -> Array:
        return reference.flash_attention(q, k, v, kv_mask=mask[:, 0, :lk], sm_scale=scale)

    return jax.lax.platform_dependent(q, k, v, mask, tpu=tpu, cuda=triton, rocm=triton,
                                      default=fallback)


__all__ = ["flash_attention"]
