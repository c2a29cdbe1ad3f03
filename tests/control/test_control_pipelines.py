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
    if scale == 1.0:  # a ControlNet attached to a pipeline loaded without one
        pipe.unload_controlnet()
        with pytest.raises(ValueError, match="ControlNet pipeline or condition LoRAs"):
            pipe(PROMPTS, num_steps=2, height=32, width=32, control_image=control,
                 use_resolution_binning=False)
        pipe.load_controlnet(folder / "controlnet")
        again = pipe(PROMPTS, num_steps=6, guidance_scale=4.5, height=32, width=32,
                     latents=nchw.permute(0, 2, 3, 1).numpy(), use_resolution_binning=False,
                     control_image=control, control_scale=scale)
        np.testing.assert_array_equal(again, got)
        with pytest.raises(ValueError, match="not a ControlNet for this"):
            pipe.load_controlnet(folder / "transformer")


@pytest.fixture(scope="module")
def sigma_with_control_loras(tmp_path_factory):
    """A tiny PixArt-Σ pipeline and two random condition LoRAs saved as files."""
    import jax

    from jdit import control, lora
    from jdit.lora.core import adapter_items, from_items

    folder = tmp_path_factory.mktemp("sigma")
    tiny_pipelines.text_to_image(folder, "sigma")
    pipe = TextToImage.from_pretrained(folder)
    files = []
    for seed in (1, 2):
        ad = control.init(pipe.transformer_params, 4, jax.random.PRNGKey(seed),
                          module=pipe.transformer)
        ad = from_items({p: a.replace(b=0.5 * jax.random.normal(jax.random.PRNGKey(seed + i),
                                                                 a.b.shape))
                         for i, (p, a) in enumerate(adapter_items(ad).items())})
        files.append(lora.save(folder / f"cond{seed}.safetensors", ad, module=pipe.transformer))
    return folder, files


def test_condition_loras_in_the_pipeline(sigma_with_control_loras):
    folder, (f1, f2) = sigma_with_control_loras
    pipe = TextToImage.from_pretrained(folder)
    common = dict(num_steps=3, height=64, width=64, use_resolution_binning=False, seed=3)
    base = pipe(PROMPTS, **common)
    assert pipe.load_control_lora(f1, "edges") == "edges"
    pipe.load_control_lora(f2, "mask")
    rng = np.random.default_rng(0)
    a, b = rng.random((64, 64, 3)), rng.random((2, 64, 64, 3))
    # no condition: the base, bit for bit
    np.testing.assert_array_equal(pipe(PROMPTS, **common), base)
    one = pipe(PROMPTS, control_image=a, control_adapters="edges", **common)
    assert np.abs(one - base).max() > 1e-3
    # two conditions: the same whichever order they are given in (keys side by side)
    both = pipe(PROMPTS, control_image=[a, b], control_adapters=["edges", "mask"],
                control_scale=[1.0, 0.5], **common)
    swapped = pipe(PROMPTS, control_image=[b, a], control_adapters=["mask", "edges"],
                   control_scale=[0.5, 1.0], **common)
    np.testing.assert_allclose(both, swapped, atol=1e-5)
    assert np.abs(both - one).max() > 1e-3
    # a condition at half the size (position-aware interpolation) runs as well
    half = pipe(PROMPTS, control_image=a[::2, ::2], control_adapters="edges",
                control_size=(32, 32), **common)
    assert half.shape == base.shape and np.isfinite(half).all()


def test_bad_control_input_in_the_pipeline(sigma_with_control_loras):
    folder, (f1, _) = sigma_with_control_loras
    pipe = TextToImage.from_pretrained(folder)
    common = dict(num_steps=2, height=64, width=64, use_resolution_binning=False)
    image = np.zeros((64, 64, 3), np.float32)
    with pytest.raises(ValueError, match="load_control_lora"):
        pipe(PROMPTS, control_image=image, **common)
    pipe.load_control_lora(f1, "edges")
    with pytest.raises(ValueError, match="2 control images for 1 condition LoRAs"):
        pipe(PROMPTS, control_image=[image, image], control_adapters=["edges"], **common)
    with pytest.raises(ValueError, match="2 control scales for 1 conditions"):
        pipe(PROMPTS, control_image=image, control_scale=[1.0, 2.0], **common)
    with pytest.raises(ValueError, match="no control LoRA named"):
        pipe(PROMPTS, control_image=image, control_adapters="depth", **common)
    with pytest.raises(ValueError, match="control image must be"):
        pipe(PROMPTS, control_image=np.zeros((64, 64, 4)), **common)
    with pytest.raises(ValueError, match="finite values in"):
        pipe(PROMPTS, control_image=image + 2.0, **common)
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_control_lora(f1, "edges")


def test_jdit_sample_with_a_condition_lora(sigma_with_control_loras, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    folder, (f1, _) = sigma_with_control_loras
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[16:48, 20:40] = (230, 120, 40)  # a shape whose edges become the condition
    Image.fromarray(photo).save(tmp_path / "edges.png")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    base = ["sample", "--pretrained", str(folder), "--prompt", "a red circle", "--steps", "2",
            "--height", "64", "--width", "64"]
    done = subprocess.run([sys.executable, "-m", "jdit.cli", *base, "--control",
                           str(tmp_path / "edges.png"), "--control-weights", str(f1),
                           "--control-scale", "0.8", "--canny", "100", "200",
                           "--out", str(tmp_path / "img.png")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = json.loads(done.stdout.strip().splitlines()[-1])["images"]
    assert Image.open(path).size == (64, 64)
    bad = subprocess.run([sys.executable, "-m", "jdit.cli", *base, "--control",
                          str(tmp_path / "edges.png"), "--out", str(tmp_path / "x.png")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--control-weights" in bad.stderr
