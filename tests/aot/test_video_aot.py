"""``jdit aot`` for the video models (Latte, SANA-Video): the pipeline's clips as latents, clear
errors, and a real TPU compile whose frames the ``context`` mesh axis splits."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # xdist workers each load libtpu

from jdit import aot  # noqa: E402
from jdit.aot import train_step, video  # noqa: E402
from jdit.models import build  # noqa: E402

ROOT = Path(__file__).parents[2]
LATTE, SANA_VIDEO = (str(ROOT / "configs" / f"{n}.py") for n in ("latte_xl2_512",
                                                                    "sana_video_2b_480p"))
LATTE_480P_81 = ["pipeline.resolution=480", "pipeline.width=832", "pipeline.frames=81"]


def test_clip_latents_follow_the_pipeline_facts():
    wan = dict(resolution=480, width=832, frames=81, vae_factor=8, vae_time_factor=4)
    assert video.clip_latents(wan) == (21, 60, 104)  # 1 + 80 / 4 latent frames
    image_vae = dict(resolution=480, width=832, frames=81, vae_factor=8)  # Latte: per frame
    assert video.clip_latents(image_vae) == (81, 60, 104)
    assert video.clip_latents(dict(resolution=512, frames=16, vae_factor=8)) == (16, 64, 64)
    assert video.clip_latents(dict(resolution=512, vae_factor=8)) is None  # an image model
    with pytest.raises(ValueError, match="1 \\+ a multiple of the video VAE's time factor 4"):
        video.clip_latents({**wan, "frames": 80})
    with pytest.raises(ValueError, match="multiples of the VAE's factor 8"):
        video.clip_latents({**wan, "width": 830})


def test_frame_split_says_when_context_pads_the_last_shard():
    assert video.frame_split(16, {"fsdp": 8, "context": 4}) == {
        "context": 4, "frames_per_shard": 4, "even": True, "padded_frames": 0}
    assert video.frame_split(21, {"fsdp": 8, "context": 4}) == {
        "context": 4, "frames_per_shard": 6, "even": False, "padded_frames": 3}
    assert video.frame_split(81, {"fsdp": 32})["frames_per_shard"] == 81


def test_video_presets_batch_their_pipelines_clips():
    config, assumed = aot.load(SANA_VIDEO)
    assert assumed["diffusion"] == {"objective": "flow", "flow_shift": 8.0,
                                    "timestep_sampler": "logit_normal"}  # a flow model
    module = build(config["model"])
    batch = train_step.example_batch(module, 2, 300, config["pipeline"])
    assert batch["images"].shape == (2, 21, 60, 104, 16)  # 480x832 px x 81 frames, Wan VAE
    assert batch["context"].shape == (2, 300, 2304)
    assert train_step._tokens(module, batch["images"].shape) == 21 * 30 * 52

    config, assumed = aot.load(LATTE, LATTE_480P_81)
    assert assumed["diffusion"]["objective"] == "ddpm"  # Latte: DDPM with learned sigma
    latte = build(config["model"])
    with pytest.raises(ValueError, match="covers video_length=16.*model.video_length=81"):
        train_step.example_batch(latte, 2, 120, config["pipeline"])
    config, _ = aot.load(LATTE, [*LATTE_480P_81, "model.video_length=81"])
    batch = train_step.example_batch(build(config["model"]), 2, 120, config["pipeline"])
    assert batch["images"].shape == (2, 81, 60, 104, 4)  # the SD VAE frame by frame
    # the model's own checks run before any compile: a latent side the patches do not divide
    config, _ = aot.load(LATTE, ["pipeline.resolution=488"])
    with pytest.raises(ValueError, match="multiples of patch_size 2"):
        train_step.example_batch(build(config["model"]), 2, 120, config["pipeline"])


TINY = ["model.hidden_size=64", "model.depth=1", "model.num_heads=4", "model.caption_channels=32",
        "pipeline.caption_length=16", "pipeline.resolution=48", "pipeline.width=80",
        "parallel.mesh.fsdp=2", "parallel.mesh.context=4"]  # 8 chips: 2 batch shards x 4


def compiled_shapes(path: str, overrides: list[str]) -> tuple[object, set[str]]:
    config, _ = aot.load(path, TINY + overrides)
    step = train_step.compile_step(config, "v5p:2x2x2", 1)
    assert step.compiled is not None, step.error
    text = step.compiled.as_text()  # per-device shapes after SPMD partitioning
    return step, set(re.findall(r"\b(?:f32|bf16)\[([\d,]+)\]", text))


@pytest.mark.slow
def test_a_tiny_latte_splits_its_frames_over_context_on_v5p():
    """8 frames of 3x5 tokens over context=4: each chip holds 2 frames of its example."""
    step, shapes = compiled_shapes(LATTE, ["pipeline.frames=8"])
    assert step.batch["images"].shape == (2, 8, 6, 10, 4) and step.global_batch == 2
    assert dict(step.setup.partitioner.mesh.shape)["context"] == 4
    assert "1,2,15,64" in shapes  # the residual stream (B, T, N, D) per chip: 2 of 8 frames
    assert "1,8,15,64" not in shapes and "2,8,15,64" not in shapes  # never all frames


@pytest.mark.slow
def test_a_tiny_sana_video_splits_uneven_frames_without_gathering_them():
    """7 latent frames (25 px frames, Wan VAE) over context=4: shards of 2, the last padded.
    The Mix-FFN's hidden layer keeps frames and batch apart, so no chip holds a whole example's
    (or the global batch's) hidden activations."""
    step, shapes = compiled_shapes(SANA_VIDEO, ["pipeline.frames=25", "model.cross_num_heads=2",
                                                "model.cross_head_dim=32"])
    assert step.batch["images"].shape == (2, 7, 6, 10, 16)
    assert "1,2,15,64" in shapes  # (B, T, N, D) per chip: 2 frames
    hidden = 2 * 3 * 64  # the Mix-FFN's GLU width (mlp_ratio 3)
    example = 7 * 15 * hidden  # one example's hidden activations, all frames
    biggest = max(math.prod(int(d) for d in s.split(",")) for s in shapes)
    assert biggest < example, sorted(shapes, key=lambda s: -math.prod(map(int, s.split(","))))[:4]
