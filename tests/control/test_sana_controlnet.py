"""SANA's ControlNet against diffusers' SanaControlNetModel + SanaTransformer2DModel."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SanaControlNetModel, SanaTransformer2DModel

import jdit
from jdit.control.controlnet import block_residuals
from tests.helpers import nchw_to_nhwc, randomize, rel_err

CONFIG = dict(num_attention_heads=4, attention_head_dim=8, num_cross_attention_heads=2,
              cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
              in_channels=4, sample_size=8, mlp_ratio=2.5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sana_cn")
    base = randomize(SanaTransformer2DModel(num_layers=4, out_channels=4, **CONFIG), 0)
    cn = randomize(SanaControlNetModel(num_layers=2, out_channels=4, **CONFIG), 1)
    base.save_pretrained(tmp / "transformer")
    cn.save_pretrained(tmp / "controlnet")
    return base, cn, tmp


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_controlnet_residuals_and_the_controlled_transformer_match_diffusers(models, scale):
    base, cn, tmp = models
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10.0, 800.0])
    ctx = torch.randn(2, 6, 24, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        res = cn(x, encoder_hidden_states=ctx, timestep=t, controlnet_cond=cond,
                 conditioning_scale=scale, encoder_attention_mask=mask).controlnet_block_samples
        want = base(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask,
                    controlnet_block_samples=tuple(res)).sample
    module, params = jdit.models.from_pretrained(tmp / "controlnet")
    assert type(module).__name__ == "SanaControlNet" and module.depth == 2
    bmod, bparams = jdit.models.from_pretrained(tmp / "transformer")
    j = dict(x=jnp.asarray(nchw_to_nhwc(x)), t=jnp.asarray(t.numpy()),
             context=jnp.asarray(ctx.numpy()), context_mask=jnp.asarray(mask.numpy()))
    got_res = module.apply({"params": params}, **j, condition=jnp.asarray(nchw_to_nhwc(cond)),
                           scale=scale)
    for i in range(2):  # tokens row-major over the grid, as diffusers' sequence
        assert rel_err(np.asarray(got_res[i]), res[i].numpy()) <= 1e-4
    got = bmod.apply({"params": bparams}, **j,
                     block_residuals=block_residuals(got_res, bmod.depth, module.residual_offset))
    assert rel_err(np.asarray(got), nchw_to_nhwc(want)) <= 1e-4
    # and the residuals change the image (the test is not passing on a zero ControlNet)
    plain = bmod.apply({"params": bparams}, **j)
    assert rel_err(np.asarray(plain), nchw_to_nhwc(want)) > 1e-2


def test_residuals_that_do_not_fit_the_base_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        block_residuals(jnp.zeros((4, 1, 3, 8)), depth=4, offset=1)
