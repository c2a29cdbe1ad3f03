"""pallas_kernels.flash_attention against its reference (interpret mode) and compiled for TPUs."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import flash_attention, reference
from tests.helpers import norm_rel_err

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def inputs(b, lq, lk, h, d, masked, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = (jax.random.normal(kk, (b, n, h, d)).astype(dtype)
               for kk, n in zip(ks[:3], (lq, lk, lk), strict=True))
    mask = None
    if masked:
        mask = (jax.random.uniform(ks[3], (b, lk)) > 0.3).astype(jnp.int32)
        mask = mask.at[-1].set(0)  # the last example masks every key: its rows are zeros
    return q, k, v, mask


# the quick loop keeps one case (keys masked, lengths off the block)
CASES = [(2, 300, 75, 2, 72, True), pytest.param(1, 75, 300, 3, 64, False, marks=pytest.mark.slow),
         pytest.param(2, 130, 129, 1, 128, True, marks=pytest.mark.slow)]


@pytest.mark.parametrize("b, lq, lk, h, d, masked", CASES)
def test_values_and_gradients_match_the_reference(b, lq, lk, h, d, masked):
    q, k, v, mask = inputs(b, lq, lk, h, d, masked)
    # compiled: the interpreted kernel runs op by op otherwise, several times slower
    attend = jax.jit(lambda *a: flash_attention(*a, kv_mask=mask, interpret=True, block_q=128,
                                                block_k=128))
    out = attend(q, k, v)
    want = reference.flash_attention(q, k, v, kv_mask=mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert norm_rel_err(out, want) <= 1e-4
    if masked:
        assert float(jnp.max(jnp.abs(out[-1]))) == 0.0
    w = jax.random.normal(jax.random.PRNGKey(9), out.shape)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(attend(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    wants = jax.jit(jax.grad(lambda *a: jnp.sum(reference.flash_attention(*a, kv_mask=mask) * w),
                             argnums=(0, 1, 2)))(q, k, v)
    for g, gw in zip(grads, wants, strict=True):
        assert norm_rel_err(g, gw) <= 1e-4


def test_bfloat16_within_bfloat16_rounding():
    q, k, v, mask = inputs(1, 200, 90, 2, 72, True, jnp.bfloat16)
    out = flash_attention(q, k, v, kv_mask=mask, interpret=True, block_q=128, block_k=128)
    want = reference.flash_attention(*(x.astype(jnp.float32) for x in (q, k, v)), kv_mask=mask)
    assert out.dtype == jnp.bfloat16
    assert norm_rel_err(out, want) <= 2e-2  # bf16 has an 8-bit mantissa: ~4e-3 per rounding


def test_default_blocks_and_tpu_semantics_interpreter():
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, mask = inputs(1, 40, 24, 1, 64, True, seed=3)
    mask = mask.at[0, 0].set(1)
    want = reference.flash_attention(q, k, v, kv_mask=mask)
    assert norm_rel_err(flash_attention(q, k, v, kv_mask=mask, interpret=True), want) <= 1e-4
    params = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
    assert norm_rel_err(flash_attention(q, k, v, kv_mask=mask, interpret=params), want) <= 1e-4


def test_clear_errors():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="expected q"):
        flash_attention(q, q[:, :, :1], q, interpret=True)
    with pytest.raises(ValueError, match="kv_mask must be"):
        flash_attention(q, q, q, kv_mask=jnp.ones((1, 9)), interpret=True)
    with pytest.raises(ValueError, match="block_k of 128"):
        flash_attention(q, q, q, interpret=True, block_k=64)


def _compile_sharded(topology, b, lq, lk, h, d, dtype, fn):
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    n = len(devices)
    mesh = jax.make_mesh((n,), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    spec = P("data")

    def sds(shape, dt=dtype):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

    args = (sds((b * n, lq, h, d)), sds((b * n, lk, h, d)), sds((b * n, lk, h, d)),
            sds((b * n, lk), jnp.int32))
    attend = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)

    def loss(q, k, v, m):
        return jnp.sum(attend(q, k, v, m).astype(jnp.float32))

    return (jax.jit(attend).lower(*args).compile(),
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile())


def _xla(q, k, v, m):
    return reference.flash_attention(q, k, v, kv_mask=m)


def _pallas(q, k, v, m):
    return flash_attention(q, k, v, kv_mask=m)


@pytest.mark.parametrize("topology, shape", [
    ("v5e:2x2", (1, 4096, 1024, 16, 72)),   # PixArt-XL 1024 self-attention, KV compressed 2x2
    ("v5p:2x2x1", (1, 4096, 1024, 16, 72)),
    ("v5e:2x2", (1, 4096, 300, 70, 32)),    # SANA-1.6B cross-attention to a 300-token caption
    ("v5p:2x2x1", (1, 4096, 300, 70, 32)),
])
@pytest.mark.slow
def test_mosaic_compiles_for_tpu_and_moves_fewer_bytes_than_xla(topology, shape):
    pytest.importorskip("libtpu")
    fwd, bwd = _compile_sharded(topology, *shape, jnp.bfloat16, _pallas)
    assert "tpu_custom_call" in fwd.as_text() and "tpu_custom_call" in bwd.as_text()
    xfwd, xbwd = _compile_sharded(topology, *shape, jnp.bfloat16, _xla)
    bytes_ = {name: c.cost_analysis()["bytes accessed"]
              for name, c in (("fwd", fwd), ("bwd", bwd), ("xfwd", xfwd), ("xbwd", xbwd))}
    # The XLA program writes and re-reads the (H, Lq, Lkv) scores; the kernel keeps them in VMEM.
    assert bytes_["fwd"] * 2 < bytes_["xfwd"], bytes_
    assert bytes_["bwd"] * 2 < bytes_["xbwd"], bytes_
    # and the forward without gradients keeps no log-sum-exp residual
    assert fwd.memory_analysis().temp_size_in_bytes < xfwd.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_model_with_pallas_attention_matches_xla():
    """PixArt-Σ-style block set: KV-compressed self-attention and masked cross-attention."""
    from jdit.models import build, init_params
    from jdit.nn import perturbed

    cfg = dict(family="pixart", input_size=8, patch_size=2, in_channels=4, hidden_size=32,
               depth=2, num_heads=2, caption_channels=16, learn_sigma=True, kv_compress="conv",
               kv_compress_layers=(1,), kv_compress_ratio=2)
    xla, pallas = build(cfg), build({**cfg, "attention_impl": "pallas"})
    key = jax.random.PRNGKey(1)
    inp = xla.example_inputs(batch=2, caption_length=7)
    inp.update(x=jax.random.normal(key, inp["x"].shape), t=jnp.array([10.0, 500.0]),
               context=jax.random.normal(key, inp["context"].shape),
               context_mask=jnp.array([[1] * 7, [1] * 3 + [0] * 4]))
    params = {"params": perturbed(init_params(xla, key, inp), key)}
    assert norm_rel_err(jax.jit(pallas.apply)(params, **inp), xla.apply(params, **inp)) <= 1e-4

    def grads(m):
        return jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, **inp) ** 2)))(params)

    assert norm_rel_err(jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads(pallas))]),
               jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads(xla))])) <= 1e-4
