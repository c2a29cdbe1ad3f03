"""AutoencoderKL against diffusers on small random VAEs; tiled decoding (blended and exact)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE

import jdit
from jdit.autoencoders import decode_tiled, decode_tiled_exact
from jdit.weights.state_dict import CheckpointMismatchError
from tests.helpers import rel_err


def random_vae(tmp_path, seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    config.update(overrides)
    model = DiffusersVAE(**config).eval()
    with torch.no_grad():
        for p in model.parameters():  # no layer left at its zero / identity initialisation
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("overrides", [{}, {"use_quant_conv": False, "use_post_quant_conv": False,
                                            "scaling_factor": 0.13025},
                                       {"mid_block_add_attention": False}])
def test_encode_and_decode_match_diffusers(tmp_path, overrides):
    reference = random_vae(tmp_path, **overrides)
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean = reference.encode(x).latent_dist.mean
        images = reference.decode(mean).sample
    vae, params = jdit.autoencoders.from_pretrained(tmp_path)
    assert vae.scaling_factor == reference.config.scaling_factor and vae.scale_factor == 2
    z = jax.jit(vae.apply, static_argnames="method")({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
                  method="encode")
    want_z = mean.permute(0, 2, 3, 1).numpy()
    assert z.shape == (2, 16, 24, 4) and rel_err(z, want_z) <= 1e-4
    out = jax.jit(vae.apply, static_argnames="method")({"params": params}, jnp.asarray(want_z), method="decode")
    assert rel_err(out, images.permute(0, 2, 3, 1).numpy()) <= 1e-4
    # bfloat16 compute (GroupNorm and softmax stay float32)
    vae16, params16 = jdit.autoencoders.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    out16 = jax.jit(vae16.apply, static_argnames="method")({"params": params16}, jnp.asarray(want_z), method="decode")
    assert out16.dtype == jnp.float32 and rel_err(out16, images.permute(0, 2, 3, 1).numpy()) < 5e-2


def test_a_pipeline_folder_and_bad_folders(tmp_path):
    random_vae(tmp_path / "pipe" / "vae")
    vae, _ = jdit.autoencoders.from_pretrained(tmp_path / "pipe")
    assert vae.block_out_channels == (32, 64)
    with pytest.raises(FileNotFoundError, match="config.json"):
        jdit.autoencoders.from_pretrained(tmp_path / "nothing")
    cfg = json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps(
        {**cfg, "down_block_types": ["AttnDownEncoderBlock2D"] * 2}))
    with pytest.raises(ValueError, match="only DownEncoderBlock2D"):
        jdit.autoencoders.from_pretrained(tmp_path / "odd")
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "config.json").write_text(json.dumps({**cfg, "layers_per_block": 2}))
    (tmp_path / "wide" / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointMismatchError, match="missing"):
        jdit.autoencoders.from_pretrained(tmp_path / "wide")


class _LocalDecoder:
    """A decoder with no cross-pixel interaction: tiling must then be exact."""

    def apply(self, variables, z, method=None):
        up = jnp.repeat(jnp.repeat(jnp.tanh(z), 4, axis=1), 4, axis=2)
        return up[..., :3] * 2.0


def test_tiled_blending_is_exact_for_a_local_decoder():
    z = jax.random.normal(jax.random.key(0), (2, 70, 100, 4))
    full = _LocalDecoder().apply(None, z)
    tiled = jax.jit(lambda z: decode_tiled(_LocalDecoder(), None, z, tile=32, overlap=8))(z)
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(full), atol=1e-5)


def test_tiled_decode_of_a_vae(tmp_path):
    random_vae(tmp_path)
    vae, params = jdit.autoencoders.from_pretrained(tmp_path)
    z = jax.random.normal(jax.random.key(0), (1, 40, 56, 4))
    full = np.asarray(vae.apply({"params": params}, z, method="decode"))
    one_tile = decode_tiled(vae, params, z, tile=64, overlap=16)  # fits one tile: untiled
    np.testing.assert_array_equal(np.asarray(one_tile), full)
    tiled = np.asarray(jax.jit(lambda p, z: decode_tiled(vae, p, z, tile=24, overlap=8))(params, z))
    assert tiled.shape == full.shape and np.isfinite(tiled).all()
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(vae, params, z, tile=16, overlap=16)


def test_exact_tiled_decode_equals_the_untiled_diffusers_decode(tmp_path):
    """Whole-image GroupNorm statistics and exact cores: the tiled decode of a 3-level VAE
    (two tiled segments), on non-square latents that no tile size divides, equals diffusers'
    untiled decode, where blended tiles (per-tile statistics) are far off."""
    reference = random_vae(tmp_path, block_out_channels=(16, 32, 32),
                           down_block_types=("DownEncoderBlock2D",) * 3,
                           up_block_types=("UpDecoderBlock2D",) * 3)
    vae, params = jdit.autoencoders.from_pretrained(tmp_path)
    z = 1.5 * jax.random.normal(jax.random.key(3), (2, 19, 26, 4)) + 0.5
    with torch.no_grad():
        want = reference.decode(torch.from_numpy(np.asarray(z)).permute(0, 3, 1, 2)).sample
    want = want.permute(0, 2, 3, 1).numpy()
    for kwargs in (dict(tile=6), dict(tile=5, store_levels=(1,), attention_chunk=64)):
        tiled = jax.jit(lambda p, z, kw=kwargs: decode_tiled_exact(vae, p, z, **kw))(params, z)
        assert tiled.shape == want.shape
        assert rel_err(tiled, want) <= 1e-4, kwargs
    blended = decode_tiled(vae, params, z, tile=8, overlap=2)
    assert rel_err(blended, want) > 1e-2  # what the exact path is for
    with pytest.raises(ValueError, match="store_levels"):
        decode_tiled_exact(vae, params, z, store_levels=(3,))
