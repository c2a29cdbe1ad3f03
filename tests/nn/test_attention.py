"""Attention and KV compression against torch and against independent formulations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from jdit.nn import SelfAttention, compressed_length, dot_product_attention
from tests.helpers import rel_err


def test_xla_attention_matches_torch_sdpa_with_key_mask():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 37, 4, 16)).astype(np.float32)
    k = rng.standard_normal((3, 11, 4, 16)).astype(np.float32)
    v = rng.standard_normal((3, 11, 4, 16)).astype(np.float32)
    mask = np.ones((3, 11), bool)
    mask[1, 5:] = False
    mask[2, 1:] = False
    got = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                           jnp.asarray(mask.astype(np.int32))))
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.from_numpy(mask)[:, None, None, :]).transpose(1, 2).numpy()
    assert rel_err(got, ref) <= 1e-5


def test_fully_masked_row_stays_finite():
    q = jnp.ones((1, 2, 1, 4))
    kv = jnp.arange(12.0).reshape(1, 3, 1, 4)
    out = dot_product_attention(q, kv, kv, jnp.zeros((1, 3)))
    assert bool(jnp.all(jnp.isfinite(out)))


def test_unknown_attention_impl_lists_choices():
    x = jnp.ones((1, 2, 1, 4))
    with pytest.raises(ValueError, match=r"unknown attention_impl 'flash'.*\['pallas', 'xla'\]"):
        dot_product_attention(x, x, x, impl="flash")


def _layer_norm(x, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (5, 7)])
def test_conv_kv_compression_at_init_is_attention_over_average_pooled_keys(grid):
    """At initialisation the depthwise conv is a 2x2 average pool (then LayerNorm)."""
    heads, hd = 2, 8
    d = heads * hd
    module = SelfAttention(heads, hd, kv_compress="conv", kv_compress_ratio=2, grid_hw=grid)
    x = np.random.default_rng(1).standard_normal((2, grid[0] * grid[1], d)).astype(np.float32)
    params = nn.meta.unbox(module.init(jax.random.key(0), jnp.asarray(x)))["params"]
    got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))

    # Independent formulation in numpy: project, pool 2x2 windows (floor), normalise, attend.
    wq = np.asarray(params["qkv"]["kernel"]).reshape(d, 3 * d)
    bq = np.asarray(params["qkv"]["bias"]).reshape(3 * d)
    q, k, v = np.split(x @ wq + bq, 3, axis=-1)
    h, w = grid

    def pool(z):
        g = z.reshape(2, h, w, d)[:, : h // 2 * 2, : w // 2 * 2]
        g = g.reshape(2, h // 2, 2, w // 2, 2, d).mean(axis=(2, 4))
        return _layer_norm(g.reshape(2, -1, d))

    k, v = pool(k), pool(v)
    split = lambda z: z.reshape(2, z.shape[1], heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
    logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(hd)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = (probs @ split(v)).transpose(0, 2, 1, 3).reshape(2, -1, d)
    ref = o @ np.asarray(params["out"]["kernel"]).reshape(d, d) + np.asarray(params["out"]["bias"])
    assert rel_err(got, ref) <= 1e-5


def test_compressed_lengths_and_refusals():
    assert compressed_length("conv", 2, (5, 7)) == 2 * 3
    assert compressed_length("ave", 2, (64, 64)) == 32 * 32
    assert compressed_length("uniform_every", 2, (4, 5)) == 10
    assert compressed_length("conv", 1, (5, 7)) == 35
    with pytest.raises(ValueError, match="'uniform' needs the token grid"):
        compressed_length("uniform", 2, (5, 8))
    with pytest.raises(ValueError, match="unknown kv_compress mode"):
        compressed_length("pool", 2, (4, 4))


def test_bfloat16_compute_stays_close_to_float32():
    module = SelfAttention(4, 8, qk_norm=True)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 32)), jnp.float32)
    params = module.init(jax.random.key(0), x)
    ref = module.apply(params, x)
    out = module.clone(dtype=jnp.bfloat16).apply(params, x)
    assert out.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out.astype(jnp.float32)), np.asarray(ref)) <= 3e-2
