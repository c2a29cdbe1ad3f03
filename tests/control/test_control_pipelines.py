"""Control through TextToImage: diffusers' SanaControlNetPipeline, and EasyControl condition
LoRAs (no condition = the base, several conditions, bad input)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdit.pipelines import TextToImage
from jdit.testing import tiny_pipelines

PROMPTS = ["a red circle in the top left", "a happy cactus with a small blue cup"]


@pytest.fixture(scope="module")
def sana_cn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sana_cn")
    return folder, tiny_pipelines.sana(folder, controlnet_layers=2)


@pytest.mark.slow  # the whole pipeline against diffusers; the ControlNet has a quick parity test
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_sana_controlnet_pipeline_matches_diffusers(sana_cn, scale):
    folder, reference = sana_cn
    gen = torch.Generator().manual_seed(0)
    nchw = torch.randn((2, 8, 8, 8), generator=gen)
    control = torch.rand((1, 32, 32, 3), generator=gen).numpy()  # one condition for both
    want = reference(PROMPTS, latents=nchw, control_image=torch.from_numpy(control).permute(
        0, 3, 1, 2) * 2 - 1, controlnet_conditioning_scale=scale, num_inference_steps=6,
        guidance_scale=4.5, height=32, width=32, use_resolution_binning=False,
        clean_caption=False, output_type="np").images
    pipe = TextToImage.from_pretrained(folder)
    assert type(pipe.controlnet).__name__ == "SanaControlNet"
    got = pipe(PROMPTS, num_steps=6, guidance_scale=4.5, height=32, width=32,
               latents=nchw.permute(0, 2, 3, 1).numpy(), use_resolution_binning=False,
               control_image=control, control_scale=scale)
    assert 0.02 < float(want.std())
    assert np.abs(got - want).max() <= 1e-3
    plain = pipe(PROMPTS, num_steps=6, guidance_scale=4.5, height=32, width=32,
                 latents=nchw.permute(0, 2, 3, 1).numpy(), use_resolution_binning=False)
    assert np.abs(plain - want).max() > 1e-2  # the ControlNet changed the images
