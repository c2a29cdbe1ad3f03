"""PixArt-δ's ControlNet against the same design wired around diffusers' PixArt blocks
(tests/reference/pixart_delta.py), from a diffusers research-project folder and from an
official combined file (``base_model.*`` + ``controlnet.*``)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import save_file

import jdit
from jdit.control.controlnet import residuals
from tests.helpers import nchw_to_nhwc, randomize, rel_err
from tests.reference.pixart_delta import PixArtDeltaReference
from tests.weights.test_official_pixart import official_block, official_from_diffusers

COPIES, DEPTH = 2, 4


def _diffusers_names(ref: PixArtDeltaReference) -> dict[str, torch.Tensor]:
    out = {}
    for i, block in enumerate(ref.copies):
        for k, v in block.state_dict().items():
            out[f"controlnet_blocks.{i}.transformer_block.{k}"] = v
        for k, v in ref.after_proj[i].state_dict().items():
            out[f"controlnet_blocks.{i}.after_proj.{k}"] = v
    for k, v in ref.before_proj.state_dict().items():
        out[f"controlnet_blocks.0.before_proj.{k}"] = v
    return {k: v.contiguous() for k, v in out.items()}


def _official_names(ref: PixArtDeltaReference) -> dict[str, torch.Tensor]:
    """An official combined file: the base under ``base_model.``, the ControlNet under
    ``controlnet.`` (official PixArt block names in ``copied_block``)."""
    out = {f"base_model.{k}": v for k, v in
           official_from_diffusers(ref.base.state_dict(), DEPTH, False).items()}
    out.update(_block_names({f"transformer_blocks.{i}.{k}": v for i, b in enumerate(ref.copies)
                             for k, v in b.state_dict().items()}))
    for i in range(COPIES):
        for wb in ("weight", "bias"):
            out[f"controlnet.{i}.after_proj.{wb}"] = getattr(ref.after_proj[i], wb).detach()
    for wb in ("weight", "bias"):
        out[f"controlnet.0.before_proj.{wb}"] = getattr(ref.before_proj, wb).detach()
    return out


def _block_names(blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers block names -> the official ``controlnet.i.copied_block`` names."""
    out = {}
    for i in range(COPIES):
        out.update(official_block(blocks, f"transformer_blocks.{i}", f"controlnet.{i}.copied_block"))
    return out


@pytest.fixture(scope="module")
def delta(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pixart_delta")
    base = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16,
                                    num_layers=DEPTH, cross_attention_dim=32,
                                    caption_channels=24, sample_size=8, out_channels=8)
    ref = randomize(PixArtDeltaReference(base, COPIES), 0)  # the zero projections too
    base.save_pretrained(tmp / "transformer")
    (tmp / "controlnet").mkdir()
    save_file(_diffusers_names(ref), tmp / "controlnet" / "diffusion_pytorch_model.safetensors")
    (tmp / "controlnet" / "config.json").write_text(json.dumps(
        {"_class_name": "PixArtControlNetAdapterModel", "num_layers": COPIES}))
    torch.save({"state_dict": _official_names(ref)}, tmp / "official.pth")
    return ref, tmp


def _inputs(seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10.0, 800.0])
    ctx = torch.randn(2, 6, 24, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    return x, cond, t, ctx, mask


def _run(base, bparams, cn, cparams, x, cond, t, ctx, mask, scale):
    j = [jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()),
         jnp.asarray(mask.numpy())]

    @jax.jit
    def controlled(bp, cp, c):
        res = residuals(cn, cp, base, bp, *j, c, scale)
        return base.apply({"params": bp}, *j, block_residuals=res)

    return np.asarray(controlled(bparams, cparams, jnp.asarray(nchw_to_nhwc(cond))))


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_the_controlled_transformer_matches_the_reference_from_a_diffusers_folder(delta, scale):
    ref, tmp = delta
    x, cond, t, ctx, mask = _inputs()
    with torch.no_grad():
        want = nchw_to_nhwc(ref(x, t, ctx, mask, cond, scale))
        plain = nchw_to_nhwc(ref(x, t, ctx, mask))
    cn, cparams = jdit.models.from_pretrained(tmp / "controlnet", num_heads=2)
    assert type(cn).__name__ == "PixArtControlNet" and cn.depth == COPIES and cn.num_heads == 2
    base, bparams = jdit.models.from_pretrained(tmp / "transformer")
    got = _run(base, bparams, cn, cparams, x, cond, t, ctx, mask, scale)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(plain, want) > 1e-2  # the ControlNet changes the output


def test_an_official_file_gives_the_base_and_the_controlnet(delta):
    ref, tmp = delta
    x, cond, t, ctx, mask = _inputs(5)
    with torch.no_grad():
        want = nchw_to_nhwc(ref(x, t, ctx, mask, cond))
    cn, cparams = jdit.models.from_pretrained(tmp / "official.pth", num_heads=2)
    assert type(cn).__name__ == "PixArtControlNet" and cn.depth == COPIES
    base, bparams = jdit.models.from_pretrained(tmp / "official.pth", num_heads=2,
                                                state_dict_prefix="base_model.", input_size=8,
                                                pe_interpolation=1.0)
    assert type(base).__name__ == "PixArt" and base.depth == DEPTH
    got = _run(base, bparams, cn, cparams, x, cond, t, ctx, mask, 1.0)
    assert rel_err(got, want) <= 1e-4
    with pytest.raises(ValueError, match="no weights under the prefix"):
        jdit.models.from_pretrained(tmp / "official.pth", state_dict_prefix="nothing.")
    with pytest.raises(ValueError, match="72 per head"):
        jdit.models.from_pretrained(tmp / "official.pth")  # 32 wide: heads are not inferable


def test_bad_input_names_what_was_expected(delta):
    _, tmp = delta
    cn, cparams = jdit.models.from_pretrained(tmp / "controlnet", num_heads=2)
    base, bparams = jdit.models.from_pretrained(tmp / "transformer")
    x, cond, t, ctx, mask = (jnp.asarray(nchw_to_nhwc(a)) if a.ndim == 4 else
                             jnp.asarray(a.numpy()) for a in _inputs())
    with pytest.raises(ValueError, match="condition latents must have the latents' shape"):
        residuals(cn, cparams, base, bparams, x, t, ctx, mask, cond[:, :4])
    scanned, sparams = jdit.models.from_pretrained(tmp / "transformer", scan_layers=True)
    with pytest.raises(ValueError, match="scan_layers=False"):
        residuals(cn, cparams, scanned, sparams, x, t, ctx, mask, cond)


@pytest.mark.slow  # the whole pipeline; the ControlNet has quick parity tests above
def test_pixart_delta_pipeline_matches_diffusers_with_the_controlnet_wired_in(tmp_path):
    from jdit.pipelines import TextToImage
    from jdit.testing import tiny_pipelines

    reference, sd = tiny_pipelines.text_to_image(tmp_path, "alpha", controlnet_layers=2)
    wired = PixArtDeltaReference(reference.transformer, 2)
    wired.load_diffusers(sd)
    prompts = ["a red circle in the top left", "a happy cactus with a small blue cup"]
    gen = torch.Generator().manual_seed(0)
    nchw = torch.randn((2, 4, 32, 32), generator=gen)
    control = torch.rand((1, 256, 256, 3), generator=gen)
    with torch.no_grad():  # the condition's latents as jdit encodes them: the posterior mean
        image = control.permute(0, 3, 1, 2) * 2 - 1
        z = reference.vae.encode(image).latent_dist.mode() * reference.vae.config.scaling_factor
    wired.condition, wired.scale = torch.cat([z] * 4), 0.7  # two prompts, both guidance halves
    common = dict(num_inference_steps=5, guidance_scale=4.5, height=256, width=256,
                  use_resolution_binning=False, clean_caption=False, output_type="np")
    want = reference(prompts, latents=nchw, **common).images
    wired.condition = None
    plain_want = reference(prompts, latents=nchw, **common).images
    pipe = TextToImage.from_pretrained(tmp_path)
    assert type(pipe.controlnet).__name__ == "PixArtControlNet"
    run = dict(num_steps=5, guidance_scale=4.5, height=256, width=256,
               latents=nchw.permute(0, 2, 3, 1).numpy(), use_resolution_binning=False)
    got = pipe(prompts, control_image=control.numpy()[0], control_scale=0.7, **run)
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(plain_want - want).max() > 1e-2  # the ControlNet changed the images
    np.testing.assert_allclose(pipe(prompts, **run), plain_want, atol=1e-3)
