"""Block-causal linear attention generated chunk by chunk from a constant-size cache equals the
full block-causal forward (SANA-Video's long-sequence path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit.nn.linear_attention import LinearSelfAttention, empty_cache

CHUNK, CHUNKS, WIDTH, HEADS = 16, 5, 64, 2


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_cached_chunks_equal_the_full_block_causal_forward(impl):
    x = jax.random.normal(jax.random.key(0), (2, CHUNK * CHUNKS, WIDTH))
    layer = LinearSelfAttention(HEADS, WIDTH // HEADS, chunk_size=CHUNK, attention_impl=impl)
    params = layer.init(jax.random.key(1), x)
    full = layer.apply(params, x)

    step = jax.jit(lambda c, cache: layer.apply(params, c, cache))
    cache = empty_cache(2, HEADS, WIDTH // HEADS)
    shapes = jax.tree.map(jnp.shape, cache)
    outs = []
    for i in range(CHUNKS):
        out, cache = step(x[:, i * CHUNK:(i + 1) * CHUNK], cache)
        assert jax.tree.map(jnp.shape, cache) == shapes  # constant memory
        outs.append(out)
    cached = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=1e-5, atol=1e-5)

    # and block-causality is real: a change in chunk 3 leaves chunks 0-2 alone
    changed = layer.apply(params, x.at[:, 3 * CHUNK + 2].add(5.0))
    diff = np.abs(np.asarray(changed - full)).max(axis=(0, 2))
    assert diff[: 3 * CHUNK].max() == 0.0 and diff[3 * CHUNK:].min() > 0.0
