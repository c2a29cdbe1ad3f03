"""pallas_kernels.linear_attention against its reference (interpret mode) and compiled for TPUs."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_attention, reference
from tests.helpers import norm_rel_err

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def inputs(b, length, h, d, dv, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, length, h, d)).astype(dtype),
            jax.random.normal(ks[1], (b, length, h, d)).astype(dtype),
            jax.random.normal(ks[2], (b, length, h, dv)).astype(dtype))


SLOW = pytest.mark.slow  # the quick loop keeps one non-causal and one block-causal case


@pytest.mark.parametrize("b, length, h, d, dv, chunk", [
    pytest.param(2, 300, 2, 32, 32, None, marks=SLOW), (1, 75, 3, 16, 24, None),  # lengths off the block
    pytest.param(2, 300, 2, 32, 32, 64, marks=SLOW), (1, 75, 1, 16, 16, 8),  # block-causal, last chunk partial
    # 160 lanes: the second lane tile ragged
    pytest.param(1, 200, 5, 32, 32, None, marks=SLOW), pytest.param(1, 75, 5, 32, 32, 16, marks=SLOW),
    # head dims padded to 128 in the wrapper
    pytest.param(1, 100, 2, 72, 72, None, marks=SLOW), pytest.param(1, 40, 3, 72, 40, 8, marks=SLOW),
])
def test_values_and_gradients_match_the_reference(b, length, h, d, dv, chunk):
    q, k, v = inputs(b, length, h, d, dv)
    kw = dict(chunk_size=chunk)
    # compiled: the interpreted kernel runs op by op otherwise, several times slower
    attend = jax.jit(lambda *a: linear_attention(*a, interpret=True, block_size=128, **kw))
    out = attend(q, k, v)
    assert out.shape == v.shape and norm_rel_err(out, reference.linear_attention(q, k, v, **kw)) <= 1e-4
    w = jax.random.normal(jax.random.PRNGKey(5), out.shape)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(attend(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(lambda *a: jnp.sum(reference.linear_attention(*a, **kw) * w),
                            argnums=(0, 1, 2)))(q, k, v)
    for g, gw in zip(got, want, strict=True):
        assert norm_rel_err(g, gw) <= 1e-4


def test_block_causal_is_causal_across_chunks_and_bidirectional_within():
    q, k, v = inputs(1, 32, 1, 8, 8)
    out = linear_attention(q, k, v, chunk_size=8, interpret=True)
    changed = v.at[:, 20].add(10.0)  # a token of chunk 2 (tokens 16..23)
    out2 = linear_attention(q, k, changed, chunk_size=8, interpret=True)
    diff = np.abs(np.asarray(out2 - out)).max(axis=(0, 2, 3))
    assert diff[:16].max() == 0.0  # earlier chunks do not see it
    assert (diff[16:] > 0).all()  # its own chunk (before and after it) and later chunks do
    full = reference.linear_attention(q, k, v)  # one chunk covering everything = non-causal
    assert norm_rel_err(linear_attention(q, k, v, chunk_size=32, interpret=True), full) <= 1e-5


def test_bfloat16_and_tpu_semantics_interpreter():
    from jax.experimental.pallas import tpu as pltpu

    q, k, v = inputs(1, 40, 2, 16, 16, jnp.bfloat16)
    want = reference.linear_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    out = jax.jit(lambda *a: linear_attention(*a, interpret=True))(q, k, v)
    assert out.dtype == jnp.bfloat16 and norm_rel_err(out, want) <= 2e-2
    params = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
    out = jax.jit(lambda *a: linear_attention(*a, chunk_size=16, interpret=params))(q, k, v)
    assert norm_rel_err(out, reference.linear_attention(q, k, v, chunk_size=16)) <= 2e-2
    # ragged in rows and lanes: edge tiles hold undefined values (NaN here), which must not leak
    q, k, v = inputs(1, 44, 5, 32, 32)
    for chunk in (None, 16):
        kw = dict(chunk_size=chunk)
        out = jax.jit(lambda *a, kw=kw: linear_attention(*a, interpret=params, block_size=16,
                                                         **kw))(q, k, v)
        assert norm_rel_err(out, reference.linear_attention(q, k, v, **kw)) <= 1e-4


def test_clear_errors():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="expected q, k"):
        linear_attention(q, q[:, :4], q, interpret=True)
    with pytest.raises(ValueError, match="chunk_size must be a positive multiple of 8"):
        linear_attention(q, q, q, chunk_size=5, interpret=True)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
@pytest.mark.parametrize("chunk", [None, 256])
def test_mosaic_compiles_for_tpu_at_sana_shapes(topology, chunk):
    """SANA-1.6B: 70 heads of 32; 4096 tokens (a 2048-px image through the 32x autoencoder)."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    n = len(devices)
    mesh = jax.make_mesh((n,), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    spec = P("data")
    arg = jax.ShapeDtypeStruct((n, 4096, 70, 32), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    attend = jax.shard_map(lambda q, k, v: linear_attention(q, k, v, chunk_size=chunk),
                           mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    fwd = jax.jit(attend).lower(arg, arg, arg).compile()
    bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)),
                           argnums=(0, 1, 2))).lower(arg, arg, arg).compile()
    assert "tpu_custom_call" in fwd.as_text() and "tpu_custom_call" in bwd.as_text()


@pytest.mark.slow
def test_kernels_move_fewer_hbm_bytes_than_xla_on_tpu():
    """`jdit bench kernels` on one linear and one flash case: the compiled TPU programs' HBM bytes
    (forward + backward, model layout) are below the XLA attention they replace."""
    pytest.importorskip("libtpu")
    from jdit.benchmarks import kernels

    rows = {r["case"]: r for r in kernels.run("v5e:2x2", cases=("sana_linear",
                                                                 "pixart_kv_compressed"))["rows"]}
    assert rows["sana_linear"]["fwd_bwd_bytes_ratio_xla_over_pallas"] > 1.5
    assert rows["sana_linear"]["fwd_bwd_bytes_auto_ratio_xla_over_pallas"] > 1.0
    assert rows["pixart_kv_compressed"]["fwd_bwd_bytes_ratio_xla_over_pallas"] > 3.0
    assert rows["sana_linear"]["pallas_fwd_flops"] > 0  # the kernels' cost estimates are counted
