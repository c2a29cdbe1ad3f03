"""AutoencoderKL against diffusers on small random VAEs; tiled decoding (blended and exact) and
exact tiled encoding."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE

import jdit
from jdit.autoencoders import (
    AutoencoderDC,
    AutoencoderKL,
    decode_tiled,
    decode_tiled_exact,
    encode_tiled_exact,
)
from jdit.nn.init import abstract_params
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


def _scan_lengths(jaxpr) -> list[int]:
    """The length of every scan (``lax.map`` included) in a jaxpr, nested ones too."""
    lengths = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            lengths.append(eqn.params["length"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    lengths += _scan_lengths(inner)
    return lengths


def test_exact_tiled_encode_equals_the_untiled_encode(tmp_path):
    """Whole-image GroupNorm statistics and exact cores, windows aligned to the stride-2
    downsampling: the tiled encode of a 3-level VAE (f = 4) on non-square images that the tile
    does not divide equals the untiled encode to float32 rounding. Tolerance 1e-5 of the
    latents' scale: the two differ by about 1e-6, as much as the untiled encode differs from
    diffusers' (the exact decode is held to 1e-4 against diffusers, a cross-framework
    comparison); tiles encoded on their own, a halo 4 px short or one tile's statistics for all
    are off by 0.1 to 1."""
    random_vae(tmp_path, block_out_channels=(16, 32, 32),
               down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3)
    vae, params = jdit.autoencoders.from_pretrained(tmp_path)
    x = jax.random.uniform(jax.random.key(0), (2, 40, 56, 3), minval=-1.0, maxval=1.0)
    full = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(params, x)
    assert full.shape == (2, 10, 14, 4)
    cases = [  # (arguments, the lengths of the scans: tiles per pass, attention chunks)
        (dict(tile=16), {12}),  # a segment per level, 3 x 4 tiles each
        (dict(tile=12, store_levels=(2,), attention_chunk=64), {20, 3}),  # one segment, 4 x 5
    ]
    for kwargs, scans in cases:
        def tiled_encode(p, x, kw=kwargs):
            return encode_tiled_exact(vae, p, x, **kw)

        assert set(_scan_lengths(jax.make_jaxpr(tiled_encode)(params, x).jaxpr)) == scans
        tiled = jax.jit(tiled_encode)(params, x)
        assert tiled.dtype == jnp.float32 and tiled.shape == full.shape
        assert rel_err(tiled, full) <= 1e-5, kwargs
    # every 8 x 8 tile encoded on its own (its own statistics, no margin): far off
    tiles = x.reshape(2, 5, 8, 7, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(70, 8, 8, 3)
    alone = jax.jit(lambda p, t: vae.apply({"params": p}, t, method="encode"))(params, tiles)
    alone = alone.reshape(2, 5, 7, 2, 2, 4).transpose(0, 1, 3, 2, 4, 5).reshape(full.shape)
    assert rel_err(alone, full) > 1e-1


@pytest.mark.parametrize("overrides", [
    dict(block_out_channels=(8,), layers_per_block=2, mid_block_add_attention=False),  # f = 1
    dict(block_out_channels=(8, 16), use_quant_conv=False),
])
def test_exact_tiled_encode_of_other_layouts(tmp_path, overrides):
    """A one-level VAE (only its input conv is tiled), two ResNets per level, no attention, no
    quant conv: still the untiled encode (tolerance as above)."""
    n = len(overrides["block_out_channels"])
    random_vae(tmp_path, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * n,
               up_block_types=("UpDecoderBlock2D",) * n, **overrides)
    vae, params = jdit.autoencoders.from_pretrained(tmp_path)
    x = jax.random.uniform(jax.random.key(0), (1, 12, 20, 3), minval=-1.0, maxval=1.0)
    full = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(params, x)
    tiled = jax.jit(lambda p, x: encode_tiled_exact(vae, p, x, tile=8))(params, x)
    assert rel_err(tiled, full) <= 1e-5


def test_exact_tiled_encode_refuses_bad_arguments():
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), norm_num_groups=4)  # f = 4
    params = abstract_params(vae)  # shapes only: every check comes before any compute
    x = jnp.zeros((1, 16, 24, 3))
    for tile in (6, 2, 0):
        with pytest.raises(ValueError, match="tile must be a positive multiple of the VAE's "
                                             "downsampling factor 4"):
            encode_tiled_exact(vae, params, x, tile=tile)
    for shape in ((1, 16, 24, 4), (16, 24, 3)):
        with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\)"):
            encode_tiled_exact(vae, params, jnp.zeros(shape), tile=8)
    with pytest.raises(ValueError, match="multiples of the VAE's downsampling factor 4, got 18 x 24"):
        encode_tiled_exact(vae, params, jnp.zeros((1, 18, 24, 3)), tile=8)
    with pytest.raises(ValueError, match="store_levels"):
        encode_tiled_exact(vae, params, x, tile=8, store_levels=(3,))
    for tiled in (encode_tiled_exact, decode_tiled_exact):
        with pytest.raises(TypeError, match="AutoencoderKL only.*got AutoencoderDC"):
            tiled(AutoencoderDC(), {}, x)


def test_exact_tiled_encode_holds_less_memory():
    """XLA's temporaries on CPU, compiled only: a (1, 256, 256, 3) image through a 3-level VAE
    16 / 32 / 32 wide takes 12.0 MiB untiled, 2.5 MiB in 64-px tiles."""
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)
    params = abstract_params(vae)
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)

    def temporaries(fn):
        return jax.jit(fn).lower(params, x).compile().memory_analysis().temp_size_in_bytes

    untiled = temporaries(lambda p, x: vae.apply({"params": p}, x, method="encode"))
    tiled = temporaries(lambda p, x: encode_tiled_exact(vae, p, x, tile=64))
    assert tiled < untiled / 3, (tiled, untiled)
