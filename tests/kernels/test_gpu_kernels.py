"""The GPU (Triton) forms: values against the references in the Pallas interpreter, gradients
through the references, and lowering to Triton IR for ``cuda`` (no GPU needed to lower)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import gpu, reference
from tests.helpers import norm_rel_err


def qkv(b, lq, lk, h, d, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, lq, h, d)), jax.random.normal(ks[1], (b, lk, h, d)),
            jax.random.normal(ks[2], (b, lk, h, d)))


@pytest.mark.parametrize("lq, lk, d", [pytest.param(100, 75, 72, marks=pytest.mark.slow),
                                       (64, 130, 32)])
def test_flash_values_and_gradients(lq, lk, d):
    q, k, v = qkv(2, lq, lk, 2, d)
    keep = jnp.array([[lk], [lk // 3]]) if lq == 100 else jnp.array([[lk], [0]])  # 0: all masked
    mask = (jnp.arange(lk)[None] < keep).astype(jnp.int32)
    got = gpu.flash_attention(q, k, v, kv_mask=mask, interpret=True, block_q=32, block_k=32)
    want = reference.flash_attention(q, k, v, kv_mask=mask)
    assert norm_rel_err(got, want) <= 1e-4
    f = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), (0, 1, 2)))(q, k, v)  # noqa: E731
    for g, w in zip(f(lambda *a: gpu.flash_attention(*a, kv_mask=mask, interpret=True)),
                    f(lambda *a: reference.flash_attention(*a, kv_mask=mask)), strict=True):
        assert norm_rel_err(g, w) <= 1e-4


@pytest.mark.parametrize("chunk", [None, 16])
def test_linear_values_and_gradients(chunk):
    q, k, v = qkv(2, 75, 75, 3, 24)
    got = gpu.linear_attention(q, k, v, chunk_size=chunk, interpret=True, block_size=32)
    want = reference.linear_attention(q, k, v, chunk_size=chunk)
    assert norm_rel_err(got, want) <= 1e-4
    g = jax.jit(jax.grad(lambda q: jnp.sum(gpu.linear_attention(q, k, v, chunk_size=chunk,
                                                                interpret=True))))(q)
    w = jax.jit(jax.grad(lambda q: jnp.sum(reference.linear_attention(q, k, v, chunk_size=chunk))))(q)
    assert norm_rel_err(g, w) <= 1e-4


def test_kernels_lower_to_triton_for_cuda():
    q, k, v = (jax.ShapeDtypeStruct((1, 256, 4, 72), jnp.bfloat16) for _ in range(3))
    mask = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    for fn, args in ((lambda q, k, v, m: gpu.flash_attention(q, k, v, kv_mask=m), (q, k, v, mask)),
                     (lambda q, k, v: gpu.linear_attention(q, k, v), (q, k, v)),
                     (lambda q, k, v: gpu.linear_attention(q, k, v, chunk_size=64), (q, k, v))):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text
