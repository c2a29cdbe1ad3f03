"""TextToImage / ClassToImage against the diffusers pipelines on small random ones.

Same folder, prompts, latents and scheduler on both sides; the images (in [0, 1]) must agree
within 1e-3 (max abs). Resolution binning is off in those comparisons (DESIGN.md); its
resize-and-crop is checked against torch separately.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jdit.pipelines import ClassToImage, TextToImage
from jdit.pipelines.output import resize_and_crop, to_output
from jdit.testing import tiny_pipelines

PROMPTS = ["A Red Circle in the top left ", "a happy cactus in the desert with a small blue cup"]
TOL = 1e-3


def _latents(shape, seed=0):
    nchw = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return nchw, nchw.permute(0, 2, 3, 1).numpy()


def _diffusers(pipe, latents, **kwargs):
    out = pipe(PROMPTS, latents=latents, use_resolution_binning=False, clean_caption=False,
               output_type="np", **kwargs)
    return out.images


@pytest.fixture(scope="module")
def sigma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sigma")
    return folder, tiny_pipelines.text_to_image(folder, "sigma")


@pytest.mark.slow  # the whole pipeline against diffusers; its parts have quick parity tests
def test_pixart_sigma_pipeline_matches_diffusers(sigma):
    folder, reference = sigma
    nchw, nhwc = _latents((2, 4, 8, 8))
    args = dict(num_inference_steps=20, guidance_scale=4.5, max_sequence_length=12,
                negative_prompt="", height=64, width=64)
    want = _diffusers(reference, nchw, **args)
    pipe = TextToImage.from_pretrained(folder)
    got = pipe(PROMPTS, num_steps=20, guidance_scale=4.5, latents=nhwc, max_sequence_length=12,
               height=64, width=64, use_resolution_binning=False)
    assert got.shape == want.shape == (2, 64, 64, 3)
    assert 0.02 < float(want.std()), "a degenerate reference image proves nothing"
    assert np.abs(got - want).max() <= TOL
    # without guidance (g <= 1: one pass, no negative prompt) and with a negative prompt
    small = dict(height=64, width=64, max_sequence_length=12)
    want = _diffusers(reference, nchw, num_inference_steps=8, guidance_scale=1.0, **small)
    got = pipe(PROMPTS, num_steps=8, guidance_scale=1.0, latents=nhwc,
               use_resolution_binning=False, **small)
    assert np.abs(got - want).max() <= TOL
    want = _diffusers(reference, nchw, num_inference_steps=8, guidance_scale=3.0,
                      negative_prompt="blurry photo of a dog", **small)
    got = pipe(PROMPTS, num_steps=8, guidance_scale=3.0, latents=nhwc,
               negative_prompt="blurry photo of a dog", use_resolution_binning=False, **small)
    assert np.abs(got - want).max() <= TOL


@pytest.mark.slow  # the whole pipeline against diffusers; the solver has quick parity tests
def test_pixart_lcm_pipeline_matches_diffusers_given_the_same_draws(sigma, tmp_path, monkeypatch):
    """A PixArt folder with PixArt-LCM's scheduler (LCMScheduler, linear betas) samples with
    jdit's ``lcm`` solver; the noise LCM injects between steps is handed to both sides."""
    import shutil

    from diffusers import LCMScheduler
    from diffusers.schedulers import scheduling_lcm

    folder, reference = sigma
    lcm_folder = tmp_path / "lcm"
    shutil.copytree(folder, lcm_folder)
    scheduler = LCMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    scheduler.save_pretrained(lcm_folder / "scheduler")
    reference.scheduler = scheduler
    pipe = TextToImage.from_pretrained(lcm_folder)
    assert pipe.scheduler.solver == "lcm"
    nchw, nhwc = _latents((2, 4, 8, 8))
    small = dict(height=64, width=64, max_sequence_length=12)
    try:
        for steps, scale in ((4, 0.0), (2, 3.0)):
            draws = np.random.default_rng(steps).standard_normal((steps, 2, 8, 8, 4)).astype(
                np.float32)
            noises = iter([torch.from_numpy(d.transpose(0, 3, 1, 2).copy()) for d in draws])
            monkeypatch.setattr(scheduling_lcm, "randn_tensor",
                                lambda *a, it=noises, **k: next(it))
            want = _diffusers(reference, nchw, num_inference_steps=steps, guidance_scale=scale,
                              **small)
            got = pipe(PROMPTS, num_steps=steps, guidance_scale=scale, latents=nhwc,
                       step_noise=draws, use_resolution_binning=False, **small)
            assert 0.02 < float(want.std()), "a degenerate reference image proves nothing"
            assert np.abs(got - want).max() <= TOL, (steps, scale)
            other = pipe(PROMPTS, num_steps=steps, guidance_scale=scale, latents=nhwc,
                         step_noise=-draws, use_resolution_binning=False, **small)
            assert np.abs(other - got).max() > 10 * TOL  # the draws are used
        with pytest.raises(ValueError, match="step_noise of shape"):
            pipe(PROMPTS, num_steps=3, step_noise=draws, **small)
        with pytest.raises(ValueError, match="draws no noise"):
            pipe(PROMPTS, num_steps=2, solver="dpm++2m", step_noise=draws, **small)
    finally:
        from diffusers import DPMSolverMultistepScheduler
        reference.scheduler = DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler")


@pytest.mark.slow  # the whole pipeline against diffusers; the guidance has a quick test
def test_pixart_sigma_pag_pipeline_matches_diffusers(sigma, tmp_path):
    """Perturbed-attention guidance (diffusers' PixArtSigmaPAGPipeline): a third branch with
    identity self-attention in the chosen blocks, with and without CFG, adaptive scale too;
    a PAG folder loads with its defaults."""
    from diffusers import PixArtSigmaPAGPipeline

    folder, reference = sigma
    pag = PixArtSigmaPAGPipeline(**reference.components, pag_applied_layers=["blocks.1"])
    pag.save_pretrained(tmp_path / "pag")
    pipe = TextToImage.from_pretrained(tmp_path / "pag")
    assert pipe.default_pag == (3.0, (1,))
    plain = TextToImage.from_pretrained(folder)
    nchw, nhwc = _latents((2, 4, 8, 8))
    small = dict(height=64, width=64, max_sequence_length=12)
    for layers, kwargs in ((["blocks.1"], dict(guidance_scale=4.5)),
                           (["blocks.1"], dict(guidance_scale=1.0, pag_scale=2.0)),
                           (["blocks.0", "blocks.1"], dict(guidance_scale=3.0, pag_scale=1.5))):
        # (diffusers' adaptive scale fails in this pipeline: its timestep is a batch there;
        # tests/sampling/test_guidance.py checks jdit's against the formula)
        pag.set_pag_applied_layers(layers)
        want = _diffusers(pag, nchw, num_inference_steps=6, **kwargs, **small)
        got = plain(PROMPTS, num_steps=6, latents=nhwc, use_resolution_binning=False,
                    pag_applied_layers=layers, **{"pag_scale": 3.0, **kwargs}, **small)
        assert 0.02 < float(want.std()), "a degenerate reference image proves nothing"
        assert np.abs(got - want).max() <= TOL, (layers, kwargs)
    # the folder's defaults: PAG 3.0 at block 1
    pag.set_pag_applied_layers(["blocks.1"])
    want = _diffusers(pag, nchw, num_inference_steps=4, guidance_scale=4.5, **small)
    got = pipe(PROMPTS, num_steps=4, latents=nhwc, use_resolution_binning=False, **small)
    assert np.abs(got - want).max() <= TOL
    off = pipe(PROMPTS, num_steps=4, latents=nhwc, use_resolution_binning=False, pag_scale=0.0,
               **small)
    assert np.abs(off - got).max() > 10 * TOL
    for bad in (dict(pag_applied_layers=["blocks.9"]), dict(pag_applied_layers=["attn"]),
                dict(pag_scale=-1.0)):
        with pytest.raises(ValueError, match="pag"):
            pipe(PROMPTS, num_steps=2, **bad, **small)


@pytest.mark.slow  # two more compiles of the whole pipeline
def test_a_step_cache_in_the_pipeline(sigma):
    """``TextToImage(step_cache=)``: a cache that never skips gives the uncached images, one
    that always skips others; with PAG it is refused."""
    from jdit.sampling.cache import FirstBlockCache

    folder, _ = sigma
    pipe = TextToImage.from_pretrained(folder)
    _, nhwc = _latents((2, 4, 8, 8))
    small = dict(height=64, width=64, max_sequence_length=12, use_resolution_binning=False)
    plain = pipe(PROMPTS, num_steps=6, latents=nhwc, **small)
    never = pipe(PROMPTS, num_steps=6, latents=nhwc, step_cache=FirstBlockCache(1e-9), **small)
    assert np.abs(never - plain).max() <= 1e-5
    always = pipe(PROMPTS, num_steps=6, latents=nhwc, step_cache=FirstBlockCache(0.999),
                  **small)
    assert np.abs(always - plain).max() > 1e-3
    with pytest.raises(ValueError, match="PAG"):
        pipe(PROMPTS, num_steps=2, step_cache=FirstBlockCache(0.1), pag_scale=2.0,
             pag_applied_layers=[1], **small)


@pytest.fixture(scope="module")
def sana(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sana")
    return folder, tiny_pipelines.sana(folder)


@pytest.mark.slow  # the whole pipeline against diffusers; its parts have quick parity tests
def test_sana_pipeline_matches_diffusers(sana):
    """Gemma-2 features of the instruction-prefixed prompt (first + last 299 kept), flow
    DPM-Solver++, DC-AE decode: as diffusers' SanaPipeline."""
    folder, reference = sana
    nchw, nhwc = _latents((2, 8, 8, 8))
    pipe = TextToImage.from_pretrained(folder)
    assert pipe.vae_scale_factor == 4 and pipe.instruction is not None
    for kwargs in (dict(guidance_scale=4.5), dict(guidance_scale=1.0),
                   dict(guidance_scale=3.0, negative_prompt="blurry photo of a dog")):
        want = _diffusers(reference, nchw, num_inference_steps=10, height=32, width=32, **kwargs)
        got = pipe(PROMPTS, num_steps=10, latents=nhwc, height=32, width=32,
                   use_resolution_binning=False, **kwargs)
        assert got.shape == want.shape == (2, 32, 32, 3)
        assert 0.02 < float(want.std()), "a degenerate reference image proves nothing"
        assert np.abs(got - want).max() <= TOL, kwargs


@pytest.mark.slow  # the whole pipeline against diffusers; the solver has quick parity tests
def test_sana_sprint_pipeline_matches_diffusers_given_the_same_draws(tmp_path, monkeypatch):
    """SANA-Sprint: SANA's prompt features, the guidance scale embedded by the transformer,
    TrigFlow consistency steps (SCMScheduler) with their noise handed to both sides."""
    from diffusers.schedulers import scheduling_scm

    reference = tiny_pipelines.sana(tmp_path, sprint=True)
    pipe = TextToImage.from_pretrained(tmp_path)
    assert pipe.embeds_guidance and pipe.scheduler.solver == "scm" and pipe.default_steps == 2
    nchw, nhwc = _latents((2, 8, 8, 8))
    for steps, scale, extra in ((2, 4.5, {}), (1, 3.0, dict(intermediate_timesteps=None)),
                                (4, 4.5, dict(intermediate_timesteps=None)),
                                (2, 4.5, dict(max_timesteps=1.4, intermediate_timesteps=0.9))):
        draws = np.random.default_rng(steps).standard_normal((steps, 2, 8, 8, 8)).astype(np.float32)
        noises = iter([torch.from_numpy(d.transpose(0, 3, 1, 2).copy()) for d in draws])
        monkeypatch.setattr(scheduling_scm, "randn_tensor", lambda *a, it=noises, **k: next(it))
        want = reference(PROMPTS, latents=nchw, use_resolution_binning=False, output_type="np",
                         num_inference_steps=steps, guidance_scale=scale, height=32, width=32,
                         **extra).images
        options = None
        if "max_timesteps" in extra:
            options = {"max_timestep": extra["max_timesteps"],
                       "intermediate_timestep": extra["intermediate_timesteps"]}
        got = pipe(PROMPTS, num_steps=steps if steps != 2 else None, guidance_scale=scale,
                   latents=nhwc, step_noise=draws, height=32, width=32,
                   use_resolution_binning=False, solver_options=options)
        assert got.shape == want.shape == (2, 32, 32, 3)
        assert 0.02 < float(want.std()), "a degenerate reference image proves nothing"
        assert np.abs(got - want).max() <= TOL, (steps, scale, extra)
    other = pipe(PROMPTS, guidance_scale=7.0, latents=nhwc, step_noise=draws, height=32,
                 width=32, use_resolution_binning=False, solver_options=options)
    assert np.abs(other - got).max() > 10 * TOL  # the embedded guidance scale matters
    with pytest.raises(ValueError, match="not guided by a negative prompt"):
        pipe(PROMPTS, negative_prompt="blurry", height=32, width=32)
    # a Sprint folder whose transformer lacks the guidance embedding: refused at load
    index = json.loads((tmp_path / "model_index.json").read_text())
    plain = tmp_path.parent / "plain_sana"
    tiny_pipelines.sana(plain)
    (plain / "model_index.json").write_text(json.dumps({**json.loads(
        (plain / "model_index.json").read_text()), "_class_name": index["_class_name"]}))
    with pytest.raises(ValueError, match="embeds the guidance scale"):
        TextToImage.from_pretrained(plain)


@pytest.mark.slow  # the whole pipeline against diffusers; the guidance has a quick test
def test_sana_pag_pipeline_matches_diffusers(sana, tmp_path):
    """SANA's perturbed-attention guidance: identity linear attention (each token's value) in
    the chosen blocks, with and without CFG; a SanaPAGPipeline folder loads with its defaults."""
    from diffusers import SanaPAGPipeline

    folder, reference = sana
    pag = SanaPAGPipeline(**reference.components, pag_applied_layers=["transformer_blocks.0"])
    pag.save_pretrained(tmp_path / "pag")
    pipe = TextToImage.from_pretrained(tmp_path / "pag")
    assert pipe.default_pag == (3.0, (0,))
    nchw, nhwc = _latents((2, 8, 8, 8))
    for layers, kwargs in ((["transformer_blocks.0"], dict(guidance_scale=4.5)),
                           (["transformer_blocks.1"], dict(guidance_scale=1.0, pag_scale=2.0))):
        # a new pipeline per setting: set_pag_applied_layers would install the softmax PAG
        # processors in place of SANA's linear ones
        pag = SanaPAGPipeline(**reference.components, pag_applied_layers=layers)
        want = _diffusers(pag, nchw, num_inference_steps=6, height=32, width=32, **kwargs)
        got = pipe(PROMPTS, num_steps=6, latents=nhwc, height=32, width=32,
                   use_resolution_binning=False, pag_applied_layers=layers, **kwargs)
        assert 0.02 < float(want.std()), "a degenerate reference image proves nothing"
        assert np.abs(got - want).max() <= TOL, (layers, kwargs)


def test_pixart_alpha_1024_layout_with_micro_conditions(tmp_path):
    """sample_size 128 (PixArt-α 1024): resolution and aspect ratio condition the model."""
    # width 24: diffusers splits the micro-condition embedding in thirds of the width
    reference = tiny_pipelines.text_to_image(tmp_path, "alpha", sample_size=128, width=24)
    nchw, nhwc = _latents((2, 4, 8, 12))
    want = _diffusers(reference, nchw, num_inference_steps=3, guidance_scale=4.5, height=64,
                      width=96, max_sequence_length=10)
    pipe = TextToImage.from_pretrained(tmp_path)
    assert pipe.transformer.micro_condition and pipe.max_sequence_length == 120
    got = pipe(PROMPTS, num_steps=3, guidance_scale=4.5, height=64, width=96, latents=nhwc,
               max_sequence_length=10, use_resolution_binning=False)
    assert np.abs(got - want).max() <= TOL


@pytest.mark.slow
def test_outputs_binning_solvers_and_tiling(sigma):
    folder, _ = sigma
    pipe = TextToImage.from_pretrained(folder)
    images = pipe("a red circle", num_steps=4, output_type="pil", num_images_per_prompt=2,
                  height=64, width=64, use_resolution_binning=False)
    assert len(images) == 2 and images[0].size == (64, 64)
    latent = pipe(PROMPTS, num_steps=4, output_type="latent", height=64, width=64,
                  use_resolution_binning=False)
    assert latent.shape == (2, 8, 8, 4)
    # binning: generated at the nearest 256-table bucket of the requested ratio (here 320 x 192),
    # then resized and cropped back to what was asked for
    assert pipe("a cat", num_steps=2, height=300, width=180).shape == (1, 300, 180, 3)
    assert pipe("a cat", num_steps=4, solver="sa-solver", height=64, width=64,
                use_resolution_binning=False).shape == (1, 64, 64, 3)
    # tiled VAE decoding: exact equals the whole decode; blended is an approximation
    common = dict(num_steps=2, height=64, width=64, use_resolution_binning=False)
    whole = pipe("a cat", **common)
    exact = pipe("a cat", vae_tiling="exact", vae_tile=3, **common)
    np.testing.assert_allclose(exact, whole, atol=1e-5)
    assert pipe("a cat", vae_tiling="blended", vae_tile=4, **common).shape == whole.shape


def test_bad_arguments_are_refused_before_anything_runs(sigma):
    folder, _ = sigma
    pipe = TextToImage.from_pretrained(folder)
    with pytest.raises(ValueError, match="vae_tiling"):
        pipe("a cat", vae_tiling="tiles")
    with pytest.raises(ValueError, match="output_type"):
        pipe("a cat", output_type="tensor")
    with pytest.raises(ValueError, match="latents of shape"):
        pipe("a cat", latents=np.zeros((1, 4, 8, 8), np.float32), height=64, width=64,
             use_resolution_binning=False)
    with pytest.raises(ValueError, match="prompts"):
        pipe([])
    f = pipe.vae_scale_factor * pipe.transformer.patch_size
    refused = [
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(num_steps=2.5), "num_steps must be an integer >= 1, got 2.5"),
        (dict(num_steps=0), "num_steps must be an integer >= 1"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1"),
        (dict(seed=2 ** 64), "seed must be an integer that fits in 64 bits"),
        (dict(height=0), "height must be a positive integer, got 0"),
        (dict(width=-64), "width must be a positive integer, got -64"),
        (dict(height=f * 4 + 1, use_resolution_binning=False), f"is not a multiple of {f}"),
        (dict(latents=np.zeros((1, 8, 8, 4), np.int32), height=64, width=64,
              use_resolution_binning=False), "latents must be floating point"),
        (dict(latents=np.full((1, 8, 8, 4), np.nan, np.float32), height=64, width=64,
              use_resolution_binning=False), "latents hold 256 NaN or infinite values"),
    ]
    for kwargs, message in refused:
        with pytest.raises(ValueError, match=re.escape(message)):
            pipe("a cat", **kwargs)


def test_non_finite_images_are_never_passed_off_as_pictures():
    images = np.full((3, 4, 4, 3), 0.5, np.float32)
    images[1, 0, 0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match=re.escape("1 of 3 generated images hold NaN")):
        assert np.isnan(to_output(images, "np")).any()
    with pytest.raises(FloatingPointError, match=re.escape("(indices [1])")):
        to_output(images, "pil")


def test_resize_and_crop_matches_torch():
    x = np.random.default_rng(0).random((2, 40, 56, 3)).astype(np.float32)
    for height, width in [(30, 30), (64, 48), (40, 20), (100, 90)]:
        ratio = max(height / 40, width / 56)
        rh, rw = int(40 * ratio), int(56 * ratio)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                              size=(rh, rw), mode="bilinear",
                                              align_corners=False)
        top, left = (rh - height) // 2, (rw - width) // 2
        ref = ref[:, :, top: top + height, left: left + width].permute(0, 2, 3, 1).numpy()
        got = np.asarray(resize_and_crop(jnp.asarray(x), height, width))
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_dit_pipeline_matches_diffusers(tmp_path):
    reference = tiny_pipelines.class_to_image(tmp_path)
    _, nhwc = _latents((3, 4, 8, 8), seed=1)  # what DiTPipeline draws from this generator
    labels = [3, 999, 0]
    want = reference(labels, guidance_scale=4.0, num_inference_steps=12, output_type="np",
                     generator=torch.Generator().manual_seed(1)).images
    pipe = ClassToImage.from_pretrained(tmp_path)
    got = pipe(labels, guidance_scale=4.0, num_steps=12, latents=nhwc)
    assert got.shape == want.shape == (3, 16, 16, 3)
    assert np.abs(got - want).max() <= TOL
    with pytest.raises(ValueError, match="class_labels"):
        pipe([1000])


def test_folders_that_are_not_supported(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline"):
        TextToImage.from_pretrained(other)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        TextToImage.from_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Offline"):
        TextToImage.from_pretrained("nobody-here/no-such-pipeline")


def test_jdit_sample_pretrained_writes_pngs(sigma, tmp_path):
    folder, _ = sigma
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "jdit.cli", "sample", "--pretrained",
                           str(folder), "--prompt", "a red circle", "--prompt", "a blue square",
                           "--steps", "4", "--height", "64", "--width", "64",
                           "--out", str(tmp_path / "img.png")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    paths = json.loads(done.stdout.strip().splitlines()[-1])["images"]
    assert [Path(p).name for p in paths] == ["img_0.png", "img_1.png"]
    from PIL import Image

    assert Image.open(paths[0]).size == (64, 64)


@pytest.mark.slow
def test_batch_split_over_a_data_mesh_gives_the_same_images(sigma):
    folder, _ = sigma
    script = Path(__file__).with_name("eight_devices.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(script), str(folder)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("max_abs_difference")][-1]
    assert float(line.split()[1]) <= 1e-5


@pytest.mark.slow  # the whole pipeline against diffusers; its parts have quick parity tests
def test_lumina2_pipeline_matches_diffusers(tmp_path):
    """Lumina-Image 2.0: the system prompt before the prompt (not the negative prompt), Gemma-2's
    second-to-last hidden state, guidance rescaled to the conditional norm and truncated,
    σ = linspace(1, 1/N, N) shifted by 6, the VAE's scale and shift."""
    reference = tiny_pipelines.lumina2(tmp_path)
    pipe = TextToImage.from_pretrained(tmp_path)
    assert pipe.text_encoders is not None and pipe.cfg_normalization and pipe.bins is None
    nchw, nhwc = _latents((2, 4, 16, 16))
    for kwargs in (dict(guidance_scale=4.0), dict(guidance_scale=1.0),
                   dict(guidance_scale=3.0, negative_prompt="blurry photo of a dog",
                        cfg_trunc_ratio=0.5),
                   dict(guidance_scale=4.0, cfg_normalization=False)):
        want = reference(PROMPTS, latents=nchw, num_inference_steps=6, height=32, width=32,
                         output_type="np", **kwargs).images
        got = pipe(PROMPTS, num_steps=6, latents=nhwc, height=32, width=32, solver=None,
                   **kwargs)
        assert got.shape == want.shape == (2, 32, 32, 3)
        assert 0.02 < float(want.std()), "a degenerate reference image proves nothing"
        assert np.abs(got - want).max() <= TOL, kwargs
