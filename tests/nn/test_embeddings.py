"""Embeddings against diffusers' and PyTorch's own functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

from jdit.nn import PatchEmbed, sincos_pos_embed_2d, timestep_sinusoid, unpatchify


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_timestep_sinusoid_matches_diffusers(shift):
    t = np.array([0.0, 1.0, 17.5, 500.0, 999.0], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True,
                                 downscale_freq_shift=shift).numpy()
    got = np.asarray(timestep_sinusoid(jnp.asarray(t), 256, freq_shift=shift))
    # float32 exp differs by up to 1 ulp between libraries; sin(t*f) turns that into t * 2^-24
    # of phase error. Allow two such ulps of phase on top of sin/cos rounding.
    bound = 2e-6 + 2 * t[:, None] * 2.0**-24
    assert np.all(np.abs(got - ref) <= bound)


@pytest.mark.parametrize("grid,base,scale", [((16, 16), 16, 1.0), ((8, 12), 16, 0.5),
                                             ((20, 6), 32, 2.0), ((64, 64), 64, 2.0),
                                             ((5, 7), 4, 4.0)])
def test_pos_embed_matches_diffusers(grid, base, scale):
    ref = get_2d_sincos_pos_embed(96, grid, base_size=base, interpolation_scale=scale,
                                  output_type="pt").float().numpy()
    got = np.asarray(sincos_pos_embed_2d(96, grid, base, scale))
    assert got.shape == (grid[0] * grid[1], 96)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_pos_embed_first_half_encodes_columns():
    pe = np.asarray(sincos_pos_embed_2d(8, (3, 4), 4)).reshape(3, 4, 8)
    # moving along a row (changing the column) changes only the first half of the channels
    assert np.allclose(pe[0, 0, 4:], pe[0, 3, 4:]) and not np.allclose(pe[0, 0, :4], pe[0, 3, :4])
    assert np.allclose(pe[0, 0, :4], pe[2, 0, :4]) and not np.allclose(pe[0, 0, 4:], pe[2, 0, 4:])


def test_patch_embed_equals_strided_conv_and_unpatchify_inverts_layout():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
    module = PatchEmbed(hidden_size=16, patch_size=2)
    params = module.init(jax.random.key(0), jnp.asarray(x))
    kernel = np.array(params["params"]["kernel"].unbox())
    bias = np.array(params["params"]["bias"].unbox())
    got = np.asarray(module.apply(params, jnp.asarray(x)))
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(kernel.transpose(3, 2, 0, 1)),
        torch.from_numpy(bias), stride=2)
    ref = conv.flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # the token feature order (p, q, c) of unpatchify is torch's "nhwpqc->nchpwq"
    tokens = rng.standard_normal((2, 4 * 6, 2 * 2 * 3)).astype(np.float32)
    t = torch.from_numpy(tokens).reshape(2, 4, 6, 2, 2, 3)
    ref = torch.einsum("nhwpqc->nchpwq", t).reshape(2, 3, 8, 12).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(tokens), (4, 6), 2, 3)), ref)
