"""ARLON's semantic injection: the identity at initialisation (the pretrained DiT unchanged), a
gate that learns from the first step, the formulas against a plain jnp transcription, the
DiT's patch order, logical axes and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jdit.nn import LOGICAL_AXES, abstract_params, init_params, perturbed
from jdit.nn.injection import LatentAdapter, SemanticInjection, latent_tokens

B, T, N, D, DC = 2, 3, 4, 16, 12


def rand(seed: int, shape, scale: float = 1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


def gelu(x):
    return jax.nn.gelu(x, approximate=True)


def norm(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6)


def test_injection_is_the_identity_at_initialisation():
    inj = SemanticInjection()
    h, a = rand(0, (B, T, N, D), 3.0) + 1.0, rand(1, (B, T, N, D))
    params = init_params(inj, jax.random.key(0), {"h": h, "a": a})
    out = jax.jit(inj.apply)({"params": params}, h, a)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(h))
    hb = h.astype(jnp.bfloat16)
    out = inj.apply({"params": params}, hb, a)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(hb, np.float32))


def test_the_gate_gets_a_gradient_at_initialisation_and_then_opens():
    inj = SemanticInjection()
    h, a = rand(0, (B, T, N, D)), rand(1, (B, T, N, D))
    target = rand(2, (B, T, N, D))
    params = init_params(inj, jax.random.key(0), {"h": h, "a": a})

    def loss(p):
        return jnp.mean(jnp.square(inj.apply({"params": p}, h, a) - target))

    loss = jax.jit(loss)
    g = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(g["gate"]["kernel"]).max()) > 1e-3
    assert float(jnp.abs(g["gate"]["bias"]).max()) > 1e-3
    assert not np.any(np.asarray(g["modulation"]["kernel"]))  # behind the closed gate
    stepped = jax.tree.map(lambda p, d: p - 0.5 * d, params, g)
    assert float(loss(stepped)) < float(loss(params))
    assert float(jnp.abs(inj.apply({"params": stepped}, h, a) - h).max()) > 1e-4


def test_injection_and_adapter_follow_their_formulas():
    inj, adapter = SemanticInjection(), LatentAdapter(width=D, num_blocks=2, mlp_ratio=2.0)
    c = rand(0, (B, T, N, DC))
    h = rand(1, (B, T, N, D))
    pa = perturbed(init_params(adapter, jax.random.key(0), {"c": c}), jax.random.key(1), 0.2)
    a = jax.jit(adapter.apply)({"params": pa}, c)
    assert a.shape == (B, T, N, D) and a.dtype == jnp.float32

    ref = c @ pa["proj"]["kernel"] + pa["proj"]["bias"]
    for i in range(2):
        blk = pa[f"block_{i}"]
        hid = gelu(ref @ blk["fc1"]["kernel"] + blk["fc1"]["bias"])
        ref = ref + hid @ blk["fc2"]["kernel"] + blk["fc2"]["bias"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(ref), rtol=1e-5, atol=1e-5)

    pi = perturbed(init_params(inj, jax.random.key(2), {"h": h, "a": a}), jax.random.key(3), 0.2)
    out = jax.jit(inj.apply)({"params": pi}, h, a)
    m = jnp.einsum("...c,ckd->...kd", a, pi["modulation"]["kernel"]) + pi["modulation"]["bias"]
    gate = a @ pi["gate"]["kernel"] + pi["gate"]["bias"]
    ref = h + gate * (norm(h) * (1 + m[..., 1, :]) + m[..., 0, :])
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_latent_tokens_cut_the_dits_patches_in_row_major_order():
    x = rand(0, (B, 4, 8, 6, 3))
    tok = latent_tokens(x, patch_size=2, temporal_patch_size=2)
    assert tok.shape == (B, 2, 4 * 3, 2 * 2 * 2 * 3)
    for t, i, j in [(0, 0, 0), (1, 2, 1), (1, 3, 2)]:
        patch = x[:, 2 * t:2 * t + 2, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :]
        np.testing.assert_array_equal(np.asarray(tok[:, t, i * 3 + j]),
                                      np.asarray(patch.reshape(B, -1)))  # (pt, row, col, C)
    assert latent_tokens(x, 2).shape == (B, 4, 12, 12)


@pytest.mark.parametrize("module", [SemanticInjection(), LatentAdapter(width=D)],
                         ids=["injection", "adapter"])
def test_every_parameter_has_logical_axes(module):
    boxed = abstract_params(module, boxed=True)
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    assert leaves
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
        assert set(leaf.names) - {None} <= set(LOGICAL_AXES), (path, leaf.names)


def test_bad_input_gets_clear_errors():
    inj = SemanticInjection()
    h = jnp.zeros((B, T, N, D))
    with pytest.raises(ValueError, match="share every axis but the last"):
        inj.init(jax.random.key(0), h, jnp.zeros((B, T, N + 1, D)))
    with pytest.raises(ValueError, match=r"5x8x8 .* patches 2x2x2"):
        latent_tokens(jnp.zeros((1, 5, 8, 8, 4)), 2, 2)
    with pytest.raises(ValueError, match=r"\(B, T, H, W, C\)"):
        latent_tokens(jnp.zeros((1, 8, 8, 4)), 2)
