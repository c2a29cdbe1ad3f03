"""ReLU linear attention for TPU (Pallas Mosaic), SANA's self-attention, float32 inside.

    out = linear_attention(q, k, v, eps=1e-15, chunk_size=None, interpret=False)
    # q, k (B, L, H, D), v (B, L, H, Dv);  out = φ(q)(φ(k)ᵀv) / (φ(q)·Σφ(k) + eps), φ = ReLU

Non-causal: two passes, one reducing the D×Dv state and the key sum over key blocks, one
computing each query block's output with the division fused. ``chunk_size=N`` (block-causal, as
SANA-Video): one pass over the chunks in order with the state carried in VMEM; a chunk sees its
own keys and all earlier ones. Gradients (``jax.custom_vjp``): non-causal, one pass over query
blocks (dQ, and the state gradients) and one over key blocks (dK, dV); block-causal, one pass over
the chunks in reverse order carrying the state gradients, from the per-chunk states saved by the
forward. With ``num = φq S``, ``den = φq·z + eps``, ``o = num / den`` and ``g = dO``:
``dnum = g / den``, ``dden = -Σ(g∘o) / den``, ``dφq = dnum Sᵀ + dden z``, ``dS = Σ φqᵀ dnum``,
``dz = Σ dden φq``, ``dφk = v dSᵀ + dz``, ``dv = φk dS``, then ReLU's mask.

Padding rows (lengths are padded to whole blocks) are zeros: φ(0) = 0 adds nothing to the state.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array
F32 = jnp.float32


def _phi(x: Array) -> Array:
    return jnp.maximum(x.astype(F32), 0.0)


def _mm(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    return jax.lax.dot_general(a, b, ((((contract[0],)), (contract[1],)), ((), ())),
                               preferred_element_type=F32)


def _output(qf: Array, s: Array, z: Array, eps: float) -> tuple[Array, Array]:
    num = _mm(qf, s, (1, 0))  # (bq, Dv)
    den = jnp.sum(qf * z, axis=-1, keepdims=True) + eps  # (bq, 1)
    return num / den, den


def _grads_q(q: Array, g: Array, s: Array, z: Array, eps: float) -> tuple[Array, Array, Array]:
    """dq of a block, and its contributions to dS and dz."""
    qf = _phi(q)
    o, den = _output(qf, s, z, eps)
    dnum = g / den
    dden = -jnp.sum(g * o, axis=-1, keepdims=True) / den
    dqf = _mm(dnum, s, (1, 1)) + dden * z
    return jnp.where(q > 0, dqf, 0.0), _mm(qf, dnum, (0, 0)), jnp.sum(dden * qf, axis=0,
                                                                     keepdims=True)


def _grads_kv(k: Array, v: Array, ds: Array, dz: Array) -> tuple[Array, Array]:
    kf = _phi(k)
    dkf = _mm(v.astype(F32), ds, (1, 1)) + dz
    return jnp.where(k > 0, dkf, 0.0), _mm(kf, ds, (1, 0))


# ----------------------------------------------------------------------------- kernels


def _state_kernel(k_ref, v_ref, s_ref, z_ref):
    @pl.when(pl.program_id(2) == 0)
    def _init():
        s_ref[...] = jnp.zeros(s_ref.shape, F32)
        z_ref[...] = jnp.zeros(z_ref.shape, F32)

    kf = _phi(k_ref[...])
    s_ref[...] += _mm(kf, v_ref[...].astype(F32), (0, 0))
    z_ref[...] += jnp.sum(kf, axis=0, keepdims=True)


def _out_kernel(q_ref, s_ref, z_ref, o_ref, *, eps):
    o_ref[...] = _output(_phi(q_ref[...]), s_ref[...], z_ref[...], eps)[0].astype(o_ref.dtype)


def _causal_kernel(q_ref, k_ref, v_ref, o_ref, *rest, eps, save):
    if save:
        s_out, z_out, s_sc, z_sc = rest
    else:
        s_sc, z_sc = rest

    @pl.when(pl.program_id(2) == 0)
    def _init():
        s_sc[...] = jnp.zeros(s_sc.shape, F32)
        z_sc[...] = jnp.zeros(z_sc.shape, F32)

    kf = _phi(k_ref[...])
    s_sc[...] += _mm(kf, v_ref[...].astype(F32), (0, 0))  # the chunk sees itself
    z_sc[...] += jnp.sum(kf, axis=0, keepdims=True)
    o_ref[...] = _output(_phi(q_ref[...]), s_sc[...], z_sc[...], eps)[0].astype(o_ref.dtype)
    if save:
        s_out[...] = s_sc[...]
        z_out[...] = z_sc[...]


def _dq_kernel(q_ref, g_ref, s_ref, z_ref, dq_ref, ds_ref, dz_ref, *, eps):
    @pl.when(pl.program_id(2) == 0)
    def _init():
        ds_ref[...] = jnp.zeros(ds_ref.shape, F32)
        dz_ref[...] = jnp.zeros(dz_ref.shape, F32)

    dq, ds, dz = _grads_q(q_ref[...], g_ref[...].astype(F32), s_ref[...], z_ref[...], eps)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    ds_ref[...] += ds
    dz_ref[...] += dz


def _dkv_kernel(k_ref, v_ref, ds_ref, dz_ref, dk_ref, dv_ref):
    dk, dv = _grads_kv(k_ref[...], v_ref[...], ds_ref[...], dz_ref[...])
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _causal_bwd_kernel(q_ref, k_ref, v_ref, g_ref, s_ref, z_ref, dq_ref, dk_ref, dv_ref,
                       ds_sc, dz_sc, *, eps):
    @pl.when(pl.program_id(2) == 0)  # the last chunk comes first
    def _init():
        ds_sc[...] = jnp.zeros(ds_sc.shape, F32)
        dz_sc[...] = jnp.zeros(dz_sc.shape, F32)

    dq, ds, dz = _grads_q(q_ref[...], g_ref[...].astype(F32), s_ref[...], z_ref[...], eps)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    ds_sc[...] += ds  # chunk c's keys feed the states of chunks c, c+1, ...
    dz_sc[...] += dz
    dk, dv = _grads_kv(k_ref[...], v_ref[...], ds_sc[...], dz_sc[...])
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- calls


def _spec(block: int, width: int, reverse: int = 0) -> pl.BlockSpec:
    """Blocks of ``block`` rows of a (B, H, L, width) array along grid axis 2 (reversed when
    ``reverse`` is the number of blocks)."""
    if reverse:
        return pl.BlockSpec((None, None, block, width),
                            lambda b, h, i: (b, h, reverse - 1 - i, 0))
    return pl.BlockSpec((None, None, block, width), lambda b, h, i: (b, h, i, 0))


def _whole(rows: int, width: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, rows, width), lambda b, h, i: (b, h, 0, 0))


def _per_chunk(rows: int, width: int, reverse: int = 0) -> pl.BlockSpec:
    if reverse:
        return pl.BlockSpec((None, None, None, rows, width),
                            lambda b, h, i: (b, h, reverse - 1 - i, 0, 0))
    return pl.BlockSpec((None, None, None, rows, width), lambda b, h, i: (b, h, i, 0, 0))


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch=(), *, reduce, interpret, name):
    sem = ("parallel", "parallel", "arbitrary" if reduce else "parallel")
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=0, grid=grid,
                                               in_specs=in_specs, out_specs=out_specs,
                                               scratch_shapes=list(scratch)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=sem),
        interpret=interpret, name=name)


def _noncausal_fwd(q, k, v, *, eps, block, interpret):
    b, h, length, d = q.shape
    dv = v.shape[-1]
    n = length // block
    s, z = _call(_state_kernel, (b, h, n), [_spec(block, d), _spec(block, dv)],
                 [_whole(d, dv), _whole(1, d)],
                 [jax.ShapeDtypeStruct((b, h, d, dv), F32), jax.ShapeDtypeStruct((b, h, 1, d), F32)],
                 reduce=True, interpret=interpret, name="jdit_linear_attention_state")(k, v)
    o = _call(functools.partial(_out_kernel, eps=eps), (b, h, n),
              [_spec(block, d), _whole(d, dv), _whole(1, d)], _spec(block, dv),
              jax.ShapeDtypeStruct((b, h, length, dv), q.dtype), reduce=False,
              interpret=interpret, name="jdit_linear_attention_out")(q, s, z)
    return o, (s, z)


def _noncausal_bwd(q, k, v, s, z, g, *, eps, block, interpret):
    b, h, length, d = q.shape
    dv = v.shape[-1]
    n = length // block
    dq, ds, dz = _call(
        functools.partial(_dq_kernel, eps=eps), (b, h, n),
        [_spec(block, d), _spec(block, dv), _whole(d, dv), _whole(1, d)],
        [_spec(block, d), _whole(d, dv), _whole(1, d)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, d, dv), F32),
         jax.ShapeDtypeStruct((b, h, 1, d), F32)],
        reduce=True, interpret=interpret, name="jdit_linear_attention_dq")(q, g, s, z)
    dk, dvv = _call(
        _dkv_kernel, (b, h, n), [_spec(block, d), _spec(block, dv), _whole(d, dv), _whole(1, d)],
        [_spec(block, d), _spec(block, dv)],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        reduce=False, interpret=interpret, name="jdit_linear_attention_dkv")(k, v, ds, dz)
    return dq, dk, dvv


def _causal_fwd(q, k, v, *, eps, block, save, interpret):
    b, h, length, d = q.shape
    dv = v.shape[-1]
    n = length // block
    out_shape = [jax.ShapeDtypeStruct((b, h, length, dv), q.dtype)]
    out_specs = [_spec(block, dv)]
    if save:  # the state after each chunk, for the backward
        out_shape += [jax.ShapeDtypeStruct((b, h, n, d, dv), F32),
                      jax.ShapeDtypeStruct((b, h, n, 1, d), F32)]
        out_specs += [_per_chunk(d, dv), _per_chunk(1, d)]
    outs = _call(functools.partial(_causal_kernel, eps=eps, save=save), (b, h, n),
                 [_spec(block, d), _spec(block, d), _spec(block, dv)], out_specs, out_shape,
                 [pltpu.VMEM((d, dv), F32), pltpu.VMEM((1, d), F32)], reduce=True,
                 interpret=interpret, name="jdit_linear_attention_causal")(q, k, v)
    return (outs[0], tuple(outs[1:])) if save else (outs[0], None)


def _causal_bwd(q, k, v, s, z, g, *, eps, block, interpret):
    b, h, length, d = q.shape
    dv = v.shape[-1]
    n = length // block
    return _call(
        functools.partial(_causal_bwd_kernel, eps=eps), (b, h, n),
        [_spec(block, d, n), _spec(block, d, n), _spec(block, dv, n), _spec(block, dv, n),
         _per_chunk(d, dv, n), _per_chunk(1, d, n)],
        [_spec(block, d, n), _spec(block, d, n), _spec(block, dv, n)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
         jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [pltpu.VMEM((d, dv), F32), pltpu.VMEM((1, d), F32)], reduce=True,
        interpret=interpret, name="jdit_linear_attention_causal_bwd")(q, k, v, g, s, z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _linear(q, k, v, eps, block, causal, interpret):
    if causal:
        return _causal_fwd(q, k, v, eps=eps, block=block, save=False, interpret=interpret)[0]
    return _noncausal_fwd(q, k, v, eps=eps, block=block, interpret=interpret)[0]


def _linear_fwd(q, k, v, eps, block, causal, interpret):
    if causal:
        o, (s, z) = _causal_fwd(q, k, v, eps=eps, block=block, save=True, interpret=interpret)
    else:
        o, (s, z) = _noncausal_fwd(q, k, v, eps=eps, block=block, interpret=interpret)
    return o, (q, k, v, s, z)


def _linear_bwd(eps, block, causal, interpret, res, g):
    q, k, v, s, z = res
    bwd = _causal_bwd if causal else _noncausal_bwd
    return bwd(q, k, v, s, z, g, eps=eps, block=block, interpret=interpret)


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_attention(q: Array, k: Array, v: Array, *, eps: float = 1e-15,
                     chunk_size: int | None = None, interpret: Any = False,
                     block_size: int = 512) -> Array:
    """See the module docstring. ``block_size`` (non-causal) rows per block, a multiple of 8."""
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k (B, L, H, D) of one shape and v (B, L, H, Dv), got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if chunk_size is not None and (chunk_size < 8 or chunk_size % 8):
        raise ValueError(f"chunk_size must be a positive multiple of 8 (TPU sublanes), got "
                         f"{chunk_size}")
    if block_size % 8:
        raise ValueError(f"block_size must be a multiple of 8, got {block_size}")
    length = q.shape[1]
    if chunk_size is None:
        block = min(block_size, -(-length // 8) * 8)
    else:
        block = chunk_size
    padded = -(-length // block) * block

    def heads_major(x: Array) -> Array:
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded - length), (0, 0)))

    out = _linear(heads_major(q), heads_major(k), heads_major(v), float(eps), block,
                  chunk_size is not None, interpret)
    return jnp.swapaxes(out[:, :, :length], 1, 2)


__all__ = ["linear_attention"]
