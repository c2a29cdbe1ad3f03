"""TextToVideo against diffusers' LattePipeline on a small random one.

Same folder, prompts, latents and scheduler on both sides; the frames (in [0, 1]) must agree
within 1e-3 (max abs), the pipelines' bar.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdit.pipelines.text_to_video import TextToVideo, caption_inputs
from jdit.testing import tiny_pipelines

TOL = 1e-3
FRAMES, SIDE = 3, 64  # 3 frames of 8x8 latents (the VAE is 8x like SD's)


def latte_pipeline(folder, seed=0):
    """A LattePipeline of random tiny parts: T5 v1.1, Latte (learned sigma, 3 frames), an 8x
    AutoencoderKL and DDIM without clipping, saved at ``folder``."""
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    tiny_pipelines.train_tokenizer(folder / "_spm", seed=seed)
    tokenizer = T5Tokenizer.from_pretrained(str(folder / "_spm"))
    encoder = tiny_pipelines._perturb(T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=16)), seed)
    transformer = tiny_pipelines._perturb(LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=16, attention_bias=True, sample_size=SIDE // 8,
        patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=32, video_length=FRAMES), seed + 1, std=0.1)
    pipe = LattePipeline(tokenizer=tokenizer, text_encoder=encoder,
                         vae=tiny_pipelines.vae(seed + 2, levels=4), transformer=transformer,
                         scheduler=DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(folder)
    return pipe


@pytest.fixture(scope="module")
def latte(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latte_pipe")
    return folder, latte_pipeline(folder)


def _latents(b, seed=0):
    ncthw = torch.randn(b, 4, FRAMES, SIDE // 8, SIDE // 8,
                        generator=torch.Generator().manual_seed(seed))
    return ncthw, ncthw.permute(0, 2, 3, 4, 1).numpy()


def _diffusers(pipe, prompts, latents, **kwargs):
    out = pipe(prompts, latents=latents, video_length=FRAMES, height=SIDE, width=SIDE,
               clean_caption=False, output_type="np", **kwargs)
    return np.asarray(out.frames)


@pytest.mark.slow  # two pipelines end to end, several compiles
@pytest.mark.parametrize("prompts", [["A red Circle moving right "],
                                     ["a happy cat in the snowy forest", "a big blue moon"]])
def test_latte_pipeline_matches_diffusers(latte, prompts):
    """One prompt: diffusers cuts the captions to its length; several: padding zeroed."""
    folder, reference = latte
    pipe = TextToVideo.from_pretrained(folder)
    nctwh, bthwc = _latents(len(prompts))
    for steps, g, neg in ((4, 7.5, ""), (3, 1.0, ""), (3, 4.0, "blurry photo of a dog")):
        want = _diffusers(reference, prompts, nctwh, num_inference_steps=steps,
                          guidance_scale=g, negative_prompt=neg)
        got = pipe(prompts, num_steps=steps, guidance_scale=g, latents=bthwc,
                   negative_prompt=neg, height=SIDE, width=SIDE)
        assert got.shape == want.shape == (len(prompts), FRAMES, SIDE, SIDE, 3)
        assert 0.02 < float(want.std()), "a degenerate reference video proves nothing"
        assert np.abs(got - want).max() <= TOL, (steps, g, neg)


def test_caption_masks_follow_the_diffusers_pipeline():
    mask = np.array([[1, 1, 1, 0, 0]])
    neg = np.array([[1, 0, 0, 0, 0]])
    zero, keep, neg_keep = caption_inputs(mask, neg, True)  # one video: both cut to 3
    assert zero.tolist() == [[1] * 5] and keep.tolist() == neg_keep.tolist() == [[1, 1, 1, 0, 0]]
    two = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    zero, keep, neg_keep = caption_inputs(two, np.repeat(neg, 2, 0), True)  # several: zeroed
    assert zero.tolist() == two.tolist() and keep.all() and neg_keep.all()
    zero, keep, neg_keep = caption_inputs(two, np.repeat(neg, 2, 0), False)
    assert zero.all() and keep.all() and neg_keep.all()


def test_bad_calls_are_refused_before_anything_runs(latte):
    folder, _ = latte
    pipe = TextToVideo.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"num_frames must be an integer from 1 to the "
                                         r"transformer's video_length 3, got 4"):
        pipe("a cat", num_frames=4)
    with pytest.raises(ValueError, match=r"latents of shape \(1, 2, 8, 8, 4\); expected "
                                         r"\(1, 3, 8, 8, 4\)"):
        pipe("a cat", latents=np.zeros((1, 2, 8, 8, 4), np.float32))
    with pytest.raises(ValueError, match="height=60 is not a multiple of 16"):
        pipe("a cat", height=60)
    with pytest.raises(ValueError, match="output_type must be"):
        pipe("a cat", output_type="gif")
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        pipe("a cat", negative_prompt=["a", "b"])


def test_a_pipeline_folder_of_another_kind_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline"}')
    with pytest.raises(ValueError, match="not a text-to-video pipeline jdit loads"):
        TextToVideo.from_pretrained(tmp_path)


def test_latte1_scheduler_config_samples_with_ddim():
    """Latte-1's published scheduler: DDIM with variance_type "learned_range" (which makes
    diffusers' pipeline hand DDIM the variance channels too); jdit drops them and runs DDIM."""
    from jdit.pipelines.schedulers import from_diffusers_config

    spec = from_diffusers_config({
        "_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
        "beta_start": 0.0001, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "thresholding": False,
        "timestep_spacing": "leading", "trained_betas": None, "variance_type": "learned_range",
        "clip_sample": False})
    assert (spec.solver, spec.prediction, spec.variance) == ("ddim", "epsilon", "fixed_small")
