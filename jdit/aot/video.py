"""Video models in ``jdit aot``: the clips a pipeline trains on, and how a mesh splits them.

A video model's example inputs are (B, T, H, W, C) latents at its preset's size; a pod report
wants the clips of the pipeline it trains in (``pipeline.frames`` at ``resolution`` ×
``width`` px), so :func:`video_latents` derives their latent shape from the pipeline facts and
lets the model refuse what it cannot take before anything compiles. :func:`frame_split` says
how the ``context`` mesh axis splits those frames (``jdit.parallel.rules``: ``time`` →
``context``): a frame count the axis does not divide is split unevenly, the last shard padded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax


def clip_latents(pipeline: Mapping[str, Any] | None) -> tuple[int, int, int] | None:
    """(T, H, W): the latent frames and size of a video pipeline's clips; None when the facts
    name no frames (an image model).

    A video VAE (``vae_time_factor``, Wan: 4) keeps the first frame alone: 81 frames are
    1 + 80 / 4 = 21 latent frames; an image VAE run frame by frame (Latte) keeps every frame."""
    p = pipeline or {}
    if not p.get("frames"):
        return None
    frames, time_factor, factor = int(p["frames"]), p.get("vae_time_factor"), int(p["vae_factor"])
    if frames < 1:
        raise ValueError(f"pipeline.frames must be >= 1, got {frames}")
    if time_factor:
        if (frames - 1) % int(time_factor):
            raise ValueError(f"pipeline.frames {frames} must be 1 + a multiple of the video VAE's "
                             f"time factor {time_factor} (e.g. 81 = 1 + 4 x 20)")
        frames = 1 + (frames - 1) // int(time_factor)
    height, width = int(p["resolution"]), int(p.get("width") or p["resolution"])
    if height % factor or width % factor:
        raise ValueError(f"pipeline resolution {height}x{width} px must be multiples of the VAE's "
                         f"factor {factor}")
    return frames, height // factor, width // factor


def video_latents(module: Any, example: jax.ShapeDtypeStruct, pipeline: Mapping[str, Any] | None
                  ) -> jax.ShapeDtypeStruct:
    """The (B, T, H, W, C) latents of ``pipeline``'s clips for a video ``module`` whose example
    latents are ``example`` (kept when the facts name no frames), checked by the model."""
    clip = clip_latents(pipeline)
    if clip is None:
        return example
    limit = getattr(module, "video_length", None)  # Latte: its temporal embedding's frames
    if limit is not None and clip[0] > limit:
        raise ValueError(
            f"the pipeline's clips have {clip[0]} latent frames but the model's temporal "
            f"position embedding covers video_length={limit} (the length it was trained on): "
            f"pass --config.model.video_length={clip[0]} to compile a model of that length "
            f"(sin-cos, no weights: the same parameters) or --config.pipeline.frames={limit}")
    out = jax.ShapeDtypeStruct((example.shape[0], *clip, example.shape[-1]), example.dtype)
    module.check_latents(out)  # the model's own errors: patches, temporal patches, rotary
    return out


def frame_split(frames: int, mesh: Mapping[str, int]) -> dict[str, Any]:
    """How the mesh's ``context`` axis splits ``frames`` latent frames: frames per shard (the
    last shard padded when the axis does not divide them) and the padded share."""
    n = int(mesh.get("context", 1))
    per = math.ceil(frames / n)
    return {"context": n, "frames_per_shard": per, "even": frames % n == 0,
            "padded_frames": per * n - frames}
