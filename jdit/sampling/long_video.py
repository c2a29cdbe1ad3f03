"""Long videos, one segment at a time.

A video model trained on clips of ``T`` frames makes a longer video in segments: the first is
denoised from noise alone, every later one from noise plus the last ``k`` frames of the video so
far, given as *known frames* (:func:`condition_frames`: the frames and a mask beside the noisy
latents, channels last). Each segment is one compiled sampler (the same program for every
segment: the shapes do not change), and the ``k`` carried frames are copied into the result
exactly, so segments join without a seam. ARLON adds a plan of the whole video (coarse latents
from an autoregressive model): each segment then also receives its slice of it, through
``conditions``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# denoise(key, known (B, T, H, W, C), mask (B, T), *conditions) -> segment (B, T, H, W, C)
Denoise = Callable[..., Array]


def condition_frames(x: Array, known: Array, mask: Array) -> Array:
    """The input of a frame-conditioned video model: ``[x, known * mask, mask]`` on channels.

    ``x`` (B, T, H, W, C) noisy latents, ``known`` (B, T, H, W, C) clean frames where ``mask``
    (B, T) is 1 (anything elsewhere: it is zeroed). Returns (B, T, H, W, 2 C + 1). Training and
    sampling share this one definition of the format.
    """
    if x.ndim != 5 or known.shape != x.shape:
        raise ValueError(f"x and known must both be (B, T, H, W, C), got {x.shape} and "
                         f"{known.shape}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be (B, T) = {x.shape[:2]}, got {mask.shape}")
    m = jnp.broadcast_to(mask[:, :, None, None, None].astype(x.dtype), (*x.shape[:4], 1))
    return jnp.concatenate([x, known.astype(x.dtype) * m, m], axis=-1)


@dataclasses.dataclass(frozen=True)
class Segments:
    """Where the segments of a ``total``-frame video start: each is ``length`` frames and begins
    ``context`` frames before the previous one ends; the last may run past the end (its extra
    frames are dropped)."""

    total: int
    length: int
    context: int

    def __post_init__(self) -> None:
        if self.length < 1 or self.total < 1:
            raise ValueError(f"total ({self.total}) and segment length ({self.length}) must be "
                             f">= 1")
        if not 0 <= self.context < self.length:
            raise ValueError(f"context frames must be in [0, segment length {self.length}), got "
                             f"{self.context}")

    @property
    def starts(self) -> list[int]:
        out, start = [0], 0
        while start + self.length < self.total:
            start += self.length - self.context
            out.append(start)
        return out


def sample_long_video(
    denoise: Denoise,
    frame_shape: Sequence[int],
    *,
    batch: int,
    total_frames: int,
    segment_frames: int,
    context_frames: int,
    key: Array,
    conditions: Callable[[int, int, int], tuple[Any, ...]] | None = None,
    trained_frames: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """A ``total_frames`` video, (batch, total_frames, *frame_shape) as numpy.

    ``denoise(key, known, mask, *conditions)`` samples one segment (B, T, H, W, C) given known
    frames and their (B, T) mask; pass a jitted function (it is compiled once, for the first
    segment). ``conditions(i, start, stop)`` gives segment ``i``'s extra inputs (its prompt
    features, its slice of a coarse plan, ...); a prompt may change per segment. Segment ``i``
    draws its noise from ``fold_in(key, i)``.

    ``trained_frames``: the clip length the model was trained on; a longer segment is refused
    (its temporal positions were never seen).
    """
    if trained_frames is not None and segment_frames > trained_frames:
        raise ValueError(f"segment length {segment_frames} exceeds the {trained_frames} frames "
                         f"the model was trained on")
    plan = Segments(total_frames, segment_frames, context_frames)
    frame_shape = tuple(int(s) for s in frame_shape)
    out = np.zeros((batch, plan.starts[-1] + segment_frames, *frame_shape), np.float32)
    known = np.zeros((batch, segment_frames, *frame_shape), np.float32)
    mask = np.zeros((batch, segment_frames), np.float32)
    starts = plan.starts
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="segments", unit="segment")
    for i, start in enumerate(starts):
        stop = start + segment_frames
        known[:] = 0.0
        mask[:] = 0.0
        carried = context_frames if i else 0
        if carried:
            known[:, :carried] = out[:, start:start + carried]
            mask[:, :carried] = 1.0
        extra = conditions(i, start, stop) if conditions is not None else ()
        segment = np.asarray(denoise(jax.random.fold_in(key, i), jnp.asarray(known),
                                     jnp.asarray(mask), *extra), np.float32)
        if segment.shape != known.shape:
            raise ValueError(f"denoise returned {segment.shape}, expected {known.shape}")
        out[:, start + carried:stop] = segment[:, carried:]
    return out[:, :total_frames]
