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


def test_an_official_file_reads_as_the_controlnet_diffusers_converts_it_to(models, tmp_path):
    """SANA's official ControlNet file holds the whole model: the base's blocks, the embeddings
    the ControlNet shares with it, and ``controlnet.*``. Built here from the diffusers models in
    the official names (the ControlNet's embeddings being the base's, as in such a file)."""
    from tests.models.test_sana_parity import official_from_diffusers

    base, cn, _ = models
    shared = ("patch_embed.", "time_embed.", "caption_projection.", "caption_norm.")
    cn_sd = {k: (base.state_dict()[k] if k.startswith(shared) else v)
             for k, v in cn.state_dict().items()}
    tied = SanaControlNetModel(num_layers=2, out_channels=4, **CONFIG)
    tied.load_state_dict(cn_sd)
    state = official_from_diffusers(base.state_dict(), 4, False)
    copies = official_from_diffusers({**cn_sd, "scale_shift_table": torch.zeros(2, 32),
                                      "proj_out.weight": torch.zeros(4, 32),
                                      "proj_out.bias": torch.zeros(4)}, 2, False)
    for k, v in copies.items():
        if k.startswith("blocks."):
            i, rest = k[len("blocks."):].split(".", 1)
            state[f"controlnet.{i}.copied_block.{rest}"] = v
    state["controlnet.0.before_proj.weight"] = cn_sd["input_block.weight"]
    state["controlnet.0.before_proj.bias"] = cn_sd["input_block.bias"]
    for i in range(2):
        for wb in ("weight", "bias"):
            state[f"controlnet.{i}.after_proj.{wb}"] = cn_sd[f"controlnet_blocks.{i}.{wb}"]
    torch.save({"state_dict": state}, tmp_path / "sana_controlnet.pth")

    gen = torch.Generator().manual_seed(5)
    x, cond = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    t, ctx = torch.tensor([500.0]), torch.randn(1, 6, 24, generator=gen)
    mask = torch.ones(1, 6)
    with torch.no_grad():
        want = tied(x, encoder_hidden_states=ctx, timestep=t, controlnet_cond=cond,
                    encoder_attention_mask=mask).controlnet_block_samples
    with pytest.raises(ValueError, match="cross_num_heads"):
        jdit.models.from_pretrained(tmp_path / "sana_controlnet.pth", input_size=8)
    module, params = jdit.models.from_pretrained(tmp_path / "sana_controlnet.pth", input_size=8,
                                                 cross_num_heads=2, num_heads=4)
    assert type(module).__name__ == "SanaControlNet" and module.depth == 2
    got = module.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
                       jnp.asarray(ctx.numpy()), jnp.asarray(mask.numpy()),
                       jnp.asarray(nchw_to_nhwc(cond)))
    for i in range(2):
        assert rel_err(np.asarray(got[i]), want[i].numpy()) <= 1e-4
    # without its ControlNet markers the file reads as a SANA base, whose loader lists the
    # keys it does not know rather than dropping them
    del state["controlnet.0.before_proj.weight"]
    torch.save({"state_dict": state}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="unexpected.*controlnet"):
        jdit.models.from_pretrained(tmp_path / "broken.pth", input_size=8, cross_num_heads=2,
                                    num_heads=4)
