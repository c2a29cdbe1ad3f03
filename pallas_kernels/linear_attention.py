"""ReLU linear attention for TPU (Pallas Mosaic), SANA's self-attention, float32 inside.

    out = linear_attention(q, k, v, eps=1e-15, chunk_size=None, interpret=False)
    # q, k (B, L, H, D), v (B, L, H, Dv);  out = φ(q)(φ(k)ᵀv) / (φ(q)·Σφ(k) + eps), φ = ReLU
    # interpret=False: Mosaic on TPU, pallas_kernels.gpu's Triton form on GPUs, else the reference

Layout: the kernels read q, k and v where they lie, as (B, L, H·D) (a free reshape), in tiles of
``rows × W`` lanes with W = 128 (or the head dim when that is larger): one tile holds W / D whole
heads. Transposing to heads-major first would move every byte twice more, which costs more than
the kernel saves on this memory-bound operation. Within a tile the heads' D×D states sit on the
diagonal of one W×W matrix: ``φ(k)ᵀv`` is computed for the whole tile and its off-diagonal
(cross-head) blocks are zeroed, and per-head sums (the denominator) are a product with the
block-diagonal matrix of ones. On the MXU a W×W product costs what a D×D one does, since small
operands are padded to its tiles anyway. Head dims that do not divide 128 are zero-padded to the
next power of two (φ(0) = 0 adds nothing); lengths and lane counts that do not fill whole tiles
are masked in the kernels, not padded in HBM.

Non-causal: two passes, one reducing the state and the key sum over row tiles, one computing
each row tile's output with the division fused. ``chunk_size=N`` (block-causal, as SANA-Video):
one pass over the chunks in order with the state carried in VMEM; a chunk sees its own keys and
all earlier ones. Gradients (``jax.custom_vjp``): non-causal, one pass over query tiles (dQ and
the state gradients) and one over key tiles (dK, dV); block-causal, one pass over the chunks in
reverse order carrying the state gradients, from the per-chunk states saved by the forward.
With ``num = φq S``, ``den = φq·z + eps``, ``o = num / den`` and ``g = dO``: ``dnum = g / den``,
``dden = -Σ(g∘o) / den``, ``dφq = dnum Sᵀ + dden z``, ``dS = Σ φqᵀ dnum``, ``dz = Σ dden φq``,
``dφk = v dSᵀ + dz``, ``dv = φk dS``, then ReLU's mask.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array
F32 = jnp.float32
LANES = 128


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """Static facts about one call: tile sizes and which edges need masking."""
    length: int  # tokens
    lanes: int  # H · P, the lanes of one token
    head: int  # P, the (padded) head dim; a power of two, or a multiple of 128
    rows: int  # rows of a tile (the chunk size when block-causal)
    width: int  # W, lanes of a tile
    reverse: bool = False  # row tiles visited last first (the block-causal backward)

    @property
    def ragged(self) -> bool:
        return self.length % self.rows != 0 or self.lanes % self.width != 0

    @property
    def heads_per_tile(self) -> int:
        return self.width // self.head


# ----------------------------------------------------------------------------- tile math


def _mm(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               preferred_element_type=F32)


def _load(ref, t: _Tiling, *, relu: bool) -> Array:
    """A tile as float32 (ReLU'd for q and k), zero outside the array: edge tiles hold
    undefined values there, and even NaN · 0 would leak through the products."""
    x = ref[...].astype(F32)
    if relu:
        x = jnp.maximum(x, 0.0)
    if t.ragged:
        tile = pl.program_id(2)
        if t.reverse:
            tile = pl.num_programs(2) - 1 - tile
        row = tile * t.rows + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
        lane = pl.program_id(1) * t.width + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
        x = jnp.where((row < t.length) & (lane < t.lanes), x, 0.0)
    return x


def _same_head(t: _Tiling) -> Array:
    """(W, W) booleans: lanes i and j belong to one head."""
    shift = t.head.bit_length() - 1  # head is a power of two when a tile holds several
    i = jax.lax.broadcasted_iota(jnp.int32, (t.width, t.width), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (t.width, t.width), 1)
    return jax.lax.shift_right_logical(i, shift) == jax.lax.shift_right_logical(j, shift)


def _block_diagonal(x: Array, t: _Tiling) -> Array:
    return x if t.heads_per_tile == 1 else jnp.where(_same_head(t), x, 0.0)


def _head_sum(x: Array, t: _Tiling) -> Array:
    """Each lane gets the sum of its head's lanes (rows kept)."""
    if t.heads_per_tile == 1:
        return jnp.sum(x, axis=1, keepdims=True)
    return _mm(x, _same_head(t).astype(F32), (1, 0))


def _output(qf: Array, s: Array, z: Array, eps: float, t: _Tiling) -> tuple[Array, Array]:
    return _mm(qf, s, (1, 0)) / (den := _head_sum(qf * z, t) + eps), den


def _grads_q(q_ref, g_ref, s: Array, z: Array, eps: float, t: _Tiling):
    """dq of a tile, and its contributions to dS and dz."""
    qf = _load(q_ref, t, relu=True)
    g = _load(g_ref, t, relu=False)
    o, den = _output(qf, s, z, eps, t)
    dnum = g / den
    dden = -_head_sum(g * o, t) / den
    dqf = _mm(dnum, s, (1, 1)) + dden * z
    dq = jnp.where(qf > 0, dqf, 0.0)
    return dq, _block_diagonal(_mm(qf, dnum, (0, 0)), t), jnp.sum(dden * qf, axis=0, keepdims=True)


def _grads_kv(k_ref, v_ref, ds: Array, dz: Array, t: _Tiling) -> tuple[Array, Array]:
    kf = _load(k_ref, t, relu=True)
    dkf = _mm(_load(v_ref, t, relu=False), ds, (1, 1)) + dz
    return jnp.where(kf > 0, dkf, 0.0), _mm(kf, ds, (1, 0))


# ----------------------------------------------------------------------------- kernels


def _state_kernel(k_ref, v_ref, s_ref, z_ref, *, t):
    first, last = pl.program_id(2) == 0, pl.program_id(2) == pl.num_programs(2) - 1

    @pl.when(first)
    def _init():
        s_ref[...] = jnp.zeros(s_ref.shape, F32)
        z_ref[...] = jnp.zeros(z_ref.shape, F32)

    kf = _load(k_ref, t, relu=True)
    s_ref[...] += _mm(kf, _load(v_ref, t, relu=False), (0, 0))
    z_ref[...] += jnp.sum(kf, axis=0, keepdims=True)

    @pl.when(last)
    def _keep_own_heads():
        s_ref[...] = _block_diagonal(s_ref[...], t)


def _out_kernel(q_ref, s_ref, z_ref, o_ref, *, eps, t):
    o = _output(_load(q_ref, t, relu=True), s_ref[...], z_ref[...], eps, t)[0]
    o_ref[...] = o.astype(o_ref.dtype)


def _causal_kernel(q_ref, k_ref, v_ref, o_ref, *rest, eps, save, t):
    s_out, z_out, s_sc, z_sc = rest if save else (None, None, *rest)

    @pl.when(pl.program_id(2) == 0)
    def _init():
        s_sc[...] = jnp.zeros(s_sc.shape, F32)
        z_sc[...] = jnp.zeros(z_sc.shape, F32)

    kf = _load(k_ref, t, relu=True)  # the chunk sees itself
    s_sc[...] += _block_diagonal(_mm(kf, _load(v_ref, t, relu=False), (0, 0)), t)
    z_sc[...] += jnp.sum(kf, axis=0, keepdims=True)
    o = _output(_load(q_ref, t, relu=True), s_sc[...], z_sc[...], eps, t)[0]
    o_ref[...] = o.astype(o_ref.dtype)
    if save:
        s_out[...] = s_sc[...]
        z_out[...] = z_sc[...]


def _dq_kernel(q_ref, g_ref, s_ref, z_ref, dq_ref, ds_ref, dz_ref, *, eps, t):
    @pl.when(pl.program_id(2) == 0)
    def _init():
        ds_ref[...] = jnp.zeros(ds_ref.shape, F32)
        dz_ref[...] = jnp.zeros(dz_ref.shape, F32)

    dq, ds, dz = _grads_q(q_ref, g_ref, s_ref[...], z_ref[...], eps, t)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    ds_ref[...] += ds
    dz_ref[...] += dz


def _dkv_kernel(k_ref, v_ref, ds_ref, dz_ref, dk_ref, dv_ref, *, t):
    dk, dv = _grads_kv(k_ref, v_ref, ds_ref[...], dz_ref[...], t)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _causal_bwd_kernel(q_ref, k_ref, v_ref, g_ref, s_ref, z_ref, dq_ref, dk_ref, dv_ref,
                       ds_sc, dz_sc, *, eps, t):
    @pl.when(pl.program_id(2) == 0)  # the last chunk comes first
    def _init():
        ds_sc[...] = jnp.zeros(ds_sc.shape, F32)
        dz_sc[...] = jnp.zeros(dz_sc.shape, F32)

    dq, ds, dz = _grads_q(q_ref, g_ref, s_ref[...], z_ref[...], eps, t)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    ds_sc[...] += ds  # chunk c's keys feed the states of chunks c, c+1, ...
    dz_sc[...] += dz
    dk, dv = _grads_kv(k_ref, v_ref, ds_sc[...], dz_sc[...], t)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- calls


class _Specs:
    """Block specs over the grid (batch, lane tile, row tile); ``reverse`` walks rows backwards."""

    def __init__(self, t: _Tiling):
        n = pl.cdiv(t.length, t.rows)
        self.t, self.row = t, (lambda i: n - 1 - i) if t.reverse else (lambda i: i)

    def tile(self) -> pl.BlockSpec:  # a row tile of a (B, L, H·P) array
        return pl.BlockSpec((None, self.t.rows, self.t.width),
                            lambda b, g, i: (b, self.row(i), g))

    def state(self, rows: int) -> pl.BlockSpec:  # (B, lane tiles, rows, W): one per lane tile
        return pl.BlockSpec((None, None, rows, self.t.width), lambda b, g, i: (b, g, 0, 0))

    def chunk_state(self, rows: int) -> pl.BlockSpec:  # (B, lane tiles, chunks, rows, W)
        return pl.BlockSpec((None, None, None, rows, self.t.width),
                            lambda b, g, i: (b, g, self.row(i), 0, 0))


def _call(kernel, t, grid, in_specs, out_specs, out_shape, *, scratch=(), reduce, flops,
          bytes_accessed, interpret, name):
    sem = ("parallel", "parallel", "arbitrary" if reduce else "parallel")
    return pl.pallas_call(
        functools.partial(kernel, t=t), out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=0, grid=grid,
                                               in_specs=in_specs, out_specs=out_specs,
                                               scratch_shapes=list(scratch)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=sem),
        cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=0,
                                      bytes_accessed=int(bytes_accessed)),
        interpret=interpret, name=name)


def _shapes(x: Array, t: _Tiling) -> tuple[int, int, int, int]:
    """batch, lane tiles, row tiles, and the float32 bytes of one W×W state per lane tile."""
    b = x.shape[0]
    tiles = pl.cdiv(t.lanes, t.width)
    return b, tiles, pl.cdiv(t.length, t.rows), 4 * b * tiles * t.width * (t.width + 1)


def _noncausal_fwd(q, k, v, *, eps, t, interpret):
    b, tiles, n, state_bytes = _shapes(q, t)
    sp = _Specs(t)
    work = b * tiles * n * t.rows * t.width * t.width  # one W×W product per row tile
    s, z = _call(_state_kernel, t, (b, tiles, n), [sp.tile(), sp.tile()],
                 [sp.state(t.width), sp.state(1)],
                 [jax.ShapeDtypeStruct((b, tiles, t.width, t.width), F32),
                  jax.ShapeDtypeStruct((b, tiles, 1, t.width), F32)],
                 reduce=True, flops=2 * work, bytes_accessed=k.nbytes + v.nbytes + state_bytes,
                 interpret=interpret, name="jdit_linear_attention_state")(k, v)
    o = _call(functools.partial(_out_kernel, eps=eps), t, (b, tiles, n),
              [sp.tile(), sp.state(t.width), sp.state(1)], sp.tile(),
              jax.ShapeDtypeStruct(q.shape, q.dtype), reduce=False, flops=4 * work,
              bytes_accessed=2 * q.nbytes + state_bytes, interpret=interpret,
              name="jdit_linear_attention_out")(q, s, z)
    return o, (s, z)


def _noncausal_bwd(q, k, v, s, z, g, *, eps, t, interpret):
    b, tiles, n, state_bytes = _shapes(q, t)
    sp = _Specs(t)
    work = b * tiles * n * t.rows * t.width * t.width
    dq, ds, dz = _call(
        functools.partial(_dq_kernel, eps=eps), t, (b, tiles, n),
        [sp.tile(), sp.tile(), sp.state(t.width), sp.state(1)],
        [sp.tile(), sp.state(t.width), sp.state(1)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(s.shape, F32),
         jax.ShapeDtypeStruct(z.shape, F32)],
        reduce=True, flops=10 * work, bytes_accessed=2 * q.nbytes + g.nbytes + 2 * state_bytes,
        interpret=interpret, name="jdit_linear_attention_dq")(q, g, s, z)
    dk, dv = _call(
        _dkv_kernel, t, (b, tiles, n), [sp.tile(), sp.tile(), sp.state(t.width), sp.state(1)],
        [sp.tile(), sp.tile()],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        reduce=False, flops=4 * work, bytes_accessed=2 * (k.nbytes + v.nbytes) + state_bytes,
        interpret=interpret, name="jdit_linear_attention_dkv")(k, v, ds, dz)
    return dq, dk, dv


def _causal_fwd(q, k, v, *, eps, t, save, interpret):
    b, tiles, n, state_bytes = _shapes(q, t)
    sp = _Specs(t)
    work = b * tiles * n * t.rows * t.width * t.width
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [sp.tile()]
    if save:  # the state after each chunk, for the backward
        out_shape += [jax.ShapeDtypeStruct((b, tiles, n, t.width, t.width), F32),
                      jax.ShapeDtypeStruct((b, tiles, n, 1, t.width), F32)]
        out_specs += [sp.chunk_state(t.width), sp.chunk_state(1)]
    outs = _call(functools.partial(_causal_kernel, eps=eps, save=save), t, (b, tiles, n),
                 [sp.tile(), sp.tile(), sp.tile()], out_specs, out_shape,
                 scratch=[pltpu.VMEM((t.width, t.width), F32), pltpu.VMEM((1, t.width), F32)],
                 reduce=True, flops=6 * work,
                 bytes_accessed=4 * q.nbytes + (n * state_bytes if save else 0),
                 interpret=interpret, name="jdit_linear_attention_causal")(q, k, v)
    return (outs[0], tuple(outs[1:])) if save else (outs[0], None)


def _causal_bwd(q, k, v, s, z, g, *, eps, t, interpret):
    t = dataclasses.replace(t, reverse=True)
    b, tiles, n, state_bytes = _shapes(q, t)
    sp = _Specs(t)
    work = b * tiles * n * t.rows * t.width * t.width
    return _call(
        functools.partial(_causal_bwd_kernel, eps=eps), t, (b, tiles, n),
        [sp.tile(), sp.tile(), sp.tile(), sp.tile(), sp.chunk_state(t.width),
         sp.chunk_state(1)],
        [sp.tile(), sp.tile(), sp.tile()],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
         jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch=[pltpu.VMEM((t.width, t.width), F32), pltpu.VMEM((1, t.width), F32)],
        reduce=True, flops=14 * work, bytes_accessed=7 * q.nbytes + n * state_bytes,
        interpret=interpret, name="jdit_linear_attention_causal_bwd")(q, k, v, g, s, z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _linear(q, k, v, eps, t, causal, interpret):
    if causal:
        return _causal_fwd(q, k, v, eps=eps, t=t, save=False, interpret=interpret)[0]
    return _noncausal_fwd(q, k, v, eps=eps, t=t, interpret=interpret)[0]


def _linear_fwd(q, k, v, eps, t, causal, interpret):
    if causal:
        o, (s, z) = _causal_fwd(q, k, v, eps=eps, t=t, save=True, interpret=interpret)
    else:
        o, (s, z) = _noncausal_fwd(q, k, v, eps=eps, t=t, interpret=interpret)
    return o, (q, k, v, s, z)


def _linear_bwd(eps, t, causal, interpret, res, g):
    q, k, v, s, z = res
    bwd = _causal_bwd if causal else _noncausal_bwd
    return bwd(q, k, v, s, z, g, eps=eps, t=t, interpret=interpret)


_linear.defvjp(_linear_fwd, _linear_bwd)


def _padded_head(d: int) -> int:
    """The head dim the kernels use: a power of two up to 128 (so a tile holds whole heads),
    a multiple of 128 above."""
    return 1 << (d - 1).bit_length() if d <= LANES else -(-d // LANES) * LANES


def linear_attention(q: Array, k: Array, v: Array, *, eps: float = 1e-15,
                     chunk_size: int | None = None, interpret: Any = False,
                     block_size: int = 512) -> Array:
    """See the module docstring. ``block_size``: rows per tile (non-causal), a multiple of 8."""
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k (B, L, H, D) of one shape and v (B, L, H, Dv), got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if chunk_size is not None and (chunk_size < 8 or chunk_size % 8):
        raise ValueError(f"chunk_size must be a positive multiple of 8 (TPU sublanes), got "
                         f"{chunk_size}")
    if block_size < 8 or block_size % 8:
        raise ValueError(f"block_size must be a positive multiple of 8, got {block_size}")
    b, length, h, dv = v.shape
    head = _padded_head(max(q.shape[-1], dv))

    def flat(x: Array) -> Array:  # (B, L, H, D) -> (B, L, H·P): free unless D needs padding
        if x.shape[-1] != head:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, head - x.shape[-1])))
        return x.reshape(b, length, h * head)

    rows = chunk_size if chunk_size is not None else min(block_size, -(-length // 8) * 8)
    t = _Tiling(length=length, lanes=h * head, head=head, rows=rows,
                width=max(head, min(LANES, h * head)))
    def tpu(q: Array, k: Array, v: Array) -> Array:
        out = _linear(flat(q), flat(k), flat(v), float(eps), t, chunk_size is not None, interpret)
        return out.reshape(b, length, h, head)[..., :dv]

    if interpret:
        return tpu(q, k, v)
    from pallas_kernels import gpu, reference

    def triton(q: Array, k: Array, v: Array) -> Array:
        return gpu.linear_attention(q, k, v, eps=eps, chunk_size=chunk_size)

    def fallback(q: Array, k: Array, v: Array) -> Array:
        return reference.linear_attention(q, k, v, eps=eps, chunk_size=chunk_size)

    return jax.lax.platform_dependent(q, k, v, tpu=tpu, cuda=triton, rocm=triton,
                                      default=fallback)


__all__ = ["linear_attention"]
