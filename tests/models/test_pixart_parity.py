"""PixArt-α/Σ against diffusers' PixArtTransformer2DModel on small random models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel

import jdit
from tests.helpers import nchw_to_nhwc, randomize, rel_err

TOL = 1e-4


def make_diffusers(tmp_path, seed=0, **config):
    base = dict(num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=8,
                num_layers=3, cross_attention_dim=48, caption_channels=24, sample_size=8)
    model = randomize(PixArtTransformer2DModel(**{**base, **config}), seed)
    folder = tmp_path / f"pixart_{seed}"
    model.save_pretrained(folder)
    return model, folder


def run_both(model, folder, *, hw, caption_len, valid_lens, micro=False, **load_kwargs):
    gen = torch.Generator().manual_seed(1)
    b = len(valid_lens)
    x = torch.randn(b, 4, *hw, generator=gen)
    t = torch.tensor([3.0, 517.5, 999.0][:b])
    ctx = torch.randn(b, caption_len, model.config.caption_channels, generator=gen)
    mask = torch.zeros(b, caption_len)
    for i, n in enumerate(valid_lens):
        mask[i, :n] = 1
    added = None
    if micro:
        added = {"resolution": torch.tensor([[hw[0] * 8.0, hw[1] * 8.0]] * b),
                 "aspect_ratio": torch.tensor([[hw[0] / hw[1]]] * b)}
    with torch.no_grad():
        ref = model(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask,
                    added_cond_kwargs=added).sample
    module, params = jdit.models.from_pretrained(folder, **load_kwargs)
    kwargs = {}
    if micro:
        kwargs = dict(resolution=jnp.asarray(added["resolution"].numpy()),
                      aspect_ratio=jnp.asarray(added["aspect_ratio"].numpy()))
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
                       context=jnp.asarray(ctx.numpy()), context_mask=jnp.asarray(mask.numpy()),
                       **kwargs)
    return np.asarray(out), nchw_to_nhwc(ref), module


def test_alpha_without_micro_conditions(tmp_path):
    model, folder = make_diffusers(tmp_path, use_additional_conditions=False)
    out, ref, module = run_both(model, folder, hw=(8, 8), caption_len=7, valid_lens=[7, 4])
    assert not module.micro_condition and module.pe_interpolation == 1.0
    assert rel_err(out, ref) <= TOL


def test_alpha_with_micro_conditions(tmp_path):
    model, folder = make_diffusers(tmp_path, seed=1, use_additional_conditions=True)
    out, ref, module = run_both(model, folder, hw=(8, 8), caption_len=6, valid_lens=[6, 2],
                                micro=True)
    assert module.micro_condition
    assert rel_err(out, ref) <= TOL


def test_alpha_1024_defaults_micro_conditions_from_sample_size(tmp_path):
    # diffusers turns micro-conditions on whenever sample_size == 128 and the config says None.
    model, folder = make_diffusers(tmp_path, seed=2, sample_size=128, num_layers=1)
    out, ref, module = run_both(model, folder, hw=(16, 12), caption_len=5, valid_lens=[5, 3],
                                micro=True)
    assert module.micro_condition and module.pe_interpolation == 2.0
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("hw", [(16, 16), (12, 20), (20, 8)])
def test_sigma_non_square_and_padded_captions(tmp_path, hw):
    model, folder = make_diffusers(tmp_path, seed=3, sample_size=16, interpolation_scale=0.5,
                                   use_additional_conditions=False)
    out, ref, module = run_both(model, folder, hw=hw, caption_len=10, valid_lens=[10, 3, 1])
    assert module.pe_interpolation == 0.5 and module.input_size == 16
    assert rel_err(out, ref) <= TOL


def test_learned_sigma_off(tmp_path):
    model, folder = make_diffusers(tmp_path, seed=4, out_channels=None, num_layers=2,
                                   use_additional_conditions=False)
    out, ref, module = run_both(model, folder, hw=(8, 8), caption_len=4, valid_lens=[4, 4])
    assert out.shape[-1] == 4 and not module.learn_sigma
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("layout", [dict(scan_layers=True), dict(remat_policy="full"),
                                    dict(scan_layers=True, remat_policy="dots")])
def test_scanned_and_rematerialised_layouts_give_the_same_numbers(tmp_path, layout):
    model, folder = make_diffusers(tmp_path, seed=5, use_additional_conditions=False)
    out, ref, module = run_both(model, folder, hw=(8, 12), caption_len=5, valid_lens=[5, 2],
                                **layout)
    if layout.get("scan_layers"):
        assert module.scan_layers
    assert rel_err(out, ref) <= TOL


def test_sharded_safetensors_folder(tmp_path):
    model = randomize(PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=12, num_layers=3, cross_attention_dim=48,
        caption_channels=24, sample_size=8, use_additional_conditions=False), seed=6)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    out, ref, _ = run_both(model, folder, hw=(8, 8), caption_len=4, valid_lens=[4, 2])
    assert rel_err(out, ref) <= TOL
