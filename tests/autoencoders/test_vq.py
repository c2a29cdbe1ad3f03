"""ARLON's latent VQ-VAE: straight-through gradients, a tiny model that overfits smooth videos,
the round trip encode → decode, logical axes, and clear errors for bad latents and tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jdit.autoencoders.vq import (
    LatentVQVAE,
    check_tokens,
    l2_normalize,
    restart_dead_codes,
    tokens_to_grid,
    vector_quantize,
    vq_loss,
)
from jdit.nn import LOGICAL_AXES, abstract_params, init_params

TINY = dict(channels=3, codebook_size=64, code_dim=8, width=32, num_blocks=1,
            temporal_factor=4, spatial_factor=8)


def smooth_videos(n: int, frames: int, size: int, channels: int, seed: int = 0) -> jax.Array:
    """Sums of slowly drifting low-frequency plane waves, in about [-1, 1]."""
    rng = np.random.default_rng(seed)
    tt, yy, xx = np.meshgrid(np.arange(frames), np.arange(size), np.arange(size), indexing="ij")
    out = np.zeros((n, frames, size, size, channels), np.float32)
    for i in range(n):
        for c in range(channels):
            for _ in range(3):
                fy, fx = rng.uniform(0.5, 2.0, 2) * 2 * np.pi / size
                vy, vx = rng.uniform(-0.5, 0.5, 2)
                out[i, ..., c] += np.sin(fy * (yy - vy * tt) + fx * (xx - vx * tt)
                                         + rng.uniform(0, 2 * np.pi)) / 3
    return jnp.asarray(out)


def test_vector_quantize_passes_the_gradient_straight_through():
    z = l2_normalize(jax.random.normal(jax.random.key(0), (5, 7, 8)))
    codebook = l2_normalize(jax.random.normal(jax.random.key(1), (16, 8)))
    w = jax.random.normal(jax.random.key(2), z.shape)

    z_st, idx, z_q = vector_quantize(z, codebook)
    cos = np.asarray(jnp.einsum("abd,kd->abk", z, codebook))
    np.testing.assert_array_equal(np.asarray(idx), cos.argmax(-1))  # nearest = highest cosine
    np.testing.assert_allclose(np.asarray(z_st), np.asarray(codebook[idx]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(z_q), np.asarray(codebook[idx]))
    g_z, g_e = jax.grad(lambda z, e: jnp.sum(w * vector_quantize(z, e)[0]), (0, 1))(z, codebook)
    np.testing.assert_array_equal(np.asarray(g_z), np.asarray(w))  # identity through the argmin
    assert not np.any(np.asarray(g_e))  # the codebook learns only from its own loss


def test_encoder_gets_the_decoders_gradient_and_the_codebook_only_its_loss():
    vq = LatentVQVAE(**TINY)
    params = init_params(vq, jax.random.key(0))
    x = smooth_videos(2, 8, 16, 3)
    target = jax.random.normal(jax.random.key(1), x.shape)

    def recon_loss_of_codes(codes):  # decoder alone, fed the quantised vectors
        out = vq.apply({"params": params}, codes, method=lambda m, c: m._decode_codes(c))
        return jnp.sum(out * target)

    def recon_loss_of_encoder_output(z):  # the same, with quantisation in between
        def run(m, z):
            return m._decode_codes(vector_quantize(z, l2_normalize(m.codebook))[0])
        return jnp.sum(vq.apply({"params": params}, z, method=run) * target)

    z, _, idx = vq.apply({"params": params}, x, method=lambda m, x: m._encode(x))
    z_st, idx2, codes = vector_quantize(z, l2_normalize(params["codebook"]))
    np.testing.assert_array_equal(np.asarray(idx2), np.asarray(idx))
    np.testing.assert_allclose(np.asarray(z_st), np.asarray(codes), atol=1e-6)
    # The decoder's gradient at its input (the quantised vectors, as the forward computes them)
    # is exactly what the encoder output receives.
    g_codes = jax.jit(jax.grad(recon_loss_of_codes))(z_st)
    g_z = jax.jit(jax.grad(recon_loss_of_encoder_output))(z)
    assert float(jnp.abs(g_codes).max()) > 0
    scale = float(jnp.abs(g_codes).max())  # equal up to float32 rounding of two programs
    np.testing.assert_allclose(np.asarray(g_z), np.asarray(g_codes), rtol=0, atol=1e-6 * scale)

    # Through the whole model: reconstruction alone moves the encoder, never the codebook;
    # the codebook term does move the codebook.
    def mse(p):
        return jnp.mean(jnp.square(vq.apply({"params": p}, x)[0] - x))

    g = jax.jit(jax.grad(mse))(params)
    assert not np.any(np.asarray(g["codebook"]))
    assert float(jnp.abs(g["encoder"]["proj_in"]["kernel"]).max()) > 0
    g_full = jax.jit(jax.grad(lambda p: vq_loss(vq, p, x)[0]))(params)
    assert float(jnp.abs(g_full["codebook"]).max()) > 0


def test_tiny_vqvae_overfits_a_few_smooth_videos():
    vq = LatentVQVAE(**TINY)
    x = smooth_videos(4, 8, 32, 3)
    params = init_params(vq, jax.random.key(0))
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        (_, m), g = jax.value_and_grad(lambda p: vq_loss(vq, p, x), has_aux=True)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, m

    first = None
    for _ in range(120):
        params, state, metrics = step(params, state)
        first = first or {k: float(v) for k, v in metrics.items()}
    last = {k: float(v) for k, v in metrics.items()}
    assert last["loss"] < 0.1 * first["loss"], (first, last)
    assert last["recon_mse"] < 0.1 * first["recon_mse"], (first, last)
    assert last["perplexity"] > 4 and 0 < last["usage"] <= 1, last


def test_encode_decode_round_trip_and_shapes():
    vq = LatentVQVAE(**TINY)
    params = init_params(vq, jax.random.key(0))
    x = smooth_videos(2, 8, 16, 3)
    recon, idx, aux = vq.apply({"params": params}, x)
    assert recon.shape == x.shape and idx.shape == (2, 2, 2, 2) and idx.dtype == jnp.int32
    assert vq.token_grid(x.shape) == (2, 2, 2)
    enc = vq.apply({"params": params}, x, method="encode")
    np.testing.assert_array_equal(np.asarray(enc), np.asarray(idx))
    coarse = vq.apply({"params": params}, enc, method="decode")
    np.testing.assert_allclose(np.asarray(coarse), np.asarray(recon), atol=1e-5)
    flat = enc.reshape(2, -1)
    np.testing.assert_array_equal(np.asarray(tokens_to_grid(flat, (2, 2, 2))), np.asarray(enc))
    assert set(aux) == {"codebook_loss", "commitment_loss", "perplexity", "usage"}


def test_every_parameter_has_logical_axes():
    boxed = abstract_params(LatentVQVAE(**TINY), boxed=True)
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
        assert set(leaf.names) - {None} <= set(LOGICAL_AXES), (path, leaf.names)


def test_bad_latents_and_tokens_get_clear_errors():
    vq = LatentVQVAE(**TINY)
    params = init_params(vq, jax.random.key(0))
    apply = vq.apply
    with pytest.raises(ValueError, match="10 latent frames .* multiple of 4"):
        apply({"params": params}, jnp.zeros((1, 10, 16, 16, 3)))
    with pytest.raises(ValueError, match="12x16 .* multiples of 8"):
        apply({"params": params}, jnp.zeros((1, 8, 12, 16, 3)), method="encode")
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        apply({"params": params}, jnp.zeros((1, 8, 16, 16, 4)))
    with pytest.raises(ValueError, match="multiple of 4"):
        vq.token_grid((1, 6, 16, 16, 3))

    good = jnp.zeros((1, 2, 2, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"token 64 .* \[0, 64\).*another codebook size"):
        apply({"params": params}, good.at[0, 1, 0, 1].set(64), method="decode")
    with pytest.raises(ValueError, match="outside the codebook"):
        apply({"params": params}, good.at[0, 0, 0, 0].set(-1), method="decode")
    with pytest.raises(ValueError, match="token grid"):
        apply({"params": params}, good.reshape(1, 8), method="decode")
    with pytest.raises(ValueError, match="integer codes"):
        apply({"params": params}, good.astype(jnp.float32), method="decode")
    # Traced: no exception is possible, and a foreign code decodes to NaN, never to a real code.
    decode = jax.jit(lambda i: apply({"params": params}, i, method="decode"))
    assert np.isnan(np.asarray(decode(good.at[0, 1, 0, 1].set(100)))[0, 4:8, 0:8, 8:16]).all()
    assert np.isfinite(np.asarray(decode(good))).all()

    check_tokens(np.zeros((2, 8), np.int32), 64, grid=(2, 2, 2))  # flat or grid both fit
    check_tokens(np.zeros((2, 2, 2, 2), np.int32), 64, grid=(2, 2, 2))
    with pytest.raises(ValueError, match=r"grid \(2, 2, 2\).*\(B, 8\)"):
        check_tokens(np.zeros((2, 12), np.int32), 64, grid=(2, 2, 2))
    with pytest.raises(ValueError, match="another codebook size"):
        check_tokens(np.full((2, 8), 70), 64)
    with pytest.raises(ValueError, match=r"expected \(B, 8\)"):
        tokens_to_grid(jnp.zeros((2, 7), jnp.int32), (2, 2, 2))


def test_dead_codes_restart_on_the_worst_served_vectors():
    vq = LatentVQVAE(**TINY)
    params = init_params(vq, jax.random.key(0))
    # a collapsed codebook: codes 2.. copies of code 0, never chosen (ties go to the first)
    params = {**params, "codebook": params["codebook"].at[2:].set(params["codebook"][0])}
    x = smooth_videos(2, 4, 16, 3)
    apply = {"params": params}
    before = np.asarray(vq.apply(apply, x, method="encode"))
    assert len(np.unique(before)) <= 2
    revived = jax.jit(lambda p, v, r: restart_dead_codes(vq, p, v, r))(params, x, jax.random.key(1))
    np.testing.assert_array_equal(revived["codebook"][:2], params["codebook"][:2])  # used: kept
    after = np.asarray(vq.apply({"params": revived}, x, method="encode"))
    n_vectors = after.size
    assert len(np.unique(after)) >= min(n_vectors, TINY["codebook_size"]) // 2  # spread out
    z = np.asarray(vq.apply(apply, x, method=lambda m, v: m._encode(v))[0]).reshape(-1, 8)
    moved = np.asarray(revived["codebook"][2:])
    # every revived code is one of the encoder's outputs
    assert np.min(np.abs(moved[:, None, :] - z[None]).max(-1), axis=1).max() < 1e-6
