"""``moving_shapes``: the ``shapes`` vocabulary in motion, an embedded text-to-video dataset.

Each video shows one or two coloured shapes (:mod:`jdit.data.shapes`' colours and shapes, drawn
by its :func:`~jdit.data.shapes.shape_mask`, the same size: a box of side ``EXTENT`` x a third
of the frame) moving in straight lines at one constant speed and bouncing off the frame borders;
the caption names each object and its initial direction: ``"a red circle moving right"``,
``"a red circle moving down and a blue square moving up"``. Since every frame follows from the
caption and the start positions, :mod:`jdit.eval.moving_shapes` can measure exactly how a
generated video drifts (colour or shape changes, vanishing or extra objects, wrong motion).

Conventions
-----------
* Positions are box centres ``(x, y)`` in pixels, x rightwards, y downwards, pixel ``(i, j)``
  covering ``[j, j + 1) x [i, i + 1)``; a pixel is set when its centre lies inside the shape.
* Motion (:func:`trajectories`): every object moves ``speed(size)`` pixels per frame (``SPEED``
  = 2 at the default 32 px) along one axis and is reflected where its box touches a border,
  so it always stays fully inside the frame; between bounces it crosses the frame in
  ``(size - 2 * half) / speed`` frames (11.7 at 32 px: a 32-frame video bounces 2 or 3 times).
* The start lies at least one frame of travel away from the border ahead, so every object
  moves one frame in its named direction before it may bounce.
* Two objects differ in colour or shape and move along the same axis, horizontally in rows or
  vertically in columns whose boxes stay at least ``GAP`` pixels apart, so their paths never
  meet. (A horizontal and a vertical mover always cross; with one speed for all, timing them
  apart leaves only corner-hugging layouts, 0.07 % of random starts at 32 px, so the data has
  no such pairs; captions and the evaluator accept them.)
* Objects of a caption are listed by colour, then shape (``COLORS`` and ``SHAPES`` order).
* Videos are ``uint8`` (T, H, W, 3) when rendered and ``float32`` in [-1, 1] in batches
  (:func:`jdit.data.shapes.to_float`). Batch ``k`` of :func:`iterate` depends only on
  ``(seed, k)``; :func:`clips` and :func:`eval_set` draw from their own seed streams.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jdit.data.shapes import COLORS, EXTENT, SHAPES, shape_mask, to_float

SIZE = 32
"""Default frame side in pixels (square frames)."""
CLIP_FRAMES = 8
"""Default frames of a training clip (:func:`clips`, :func:`batch`)."""
EVAL_FRAMES = 32
"""Default frames of an evaluation video (:func:`eval_set`): four training clips."""
SPEED = 2.0
"""Pixels per frame at ``SIZE``; :func:`speed` scales it with the frame side."""
GAP = 2.0
"""Least distance in pixels at ``SIZE`` between the boxes of two objects of a video."""
DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1),
}
"""Caption word -> unit velocity (x, y), y downwards."""

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], np.uint8)
_BY_UNIT = {v: k for k, v in DIRECTIONS.items()}
_TAG = 0x30F1  # seed-stream tags: moving_shapes batches, clips(), eval_set()


def speed(size: int = SIZE) -> float:
    """The dataset's speed in pixels per frame for frames of side ``size``."""
    return SPEED * size / SIZE


def half_extent(size: int = SIZE) -> float:
    """Half the side of an object's box: ``shapes``' object size (``EXTENT`` of a third)."""
    return EXTENT * size / 6.0


def bounds(size: int = SIZE) -> tuple[float, float]:
    """Lowest and highest box centre on either axis: the box touches the border there."""
    half = half_extent(size)
    return half, size - half


def gap(size: int = SIZE) -> float:
    """``GAP`` scaled to frames of side ``size``."""
    return GAP * size / SIZE


@dataclasses.dataclass(frozen=True)
class Phrase:
    """What a caption says of one object: colour, shape and initial direction."""

    color: str
    shape: str
    direction: str


@dataclasses.dataclass(frozen=True)
class Motion:
    """One object and its motion: box centre ``start`` (x, y) at frame 0 in pixels and
    ``velocity`` (vx, vy) in pixels per frame (y downwards), before any bounce."""

    color: str
    shape: str
    start: tuple[float, float]
    velocity: tuple[float, float]

    @property
    def direction(self) -> str:
        """The caption's word for the velocity; ValueError if it is not along an axis."""
        unit = tuple(int(np.sign(v)) for v in self.velocity)
        if unit not in _BY_UNIT:
            raise ValueError(f"velocity {self.velocity} is not along one of {tuple(DIRECTIONS)}")
        return _BY_UNIT[unit]

    @property
    def phrase(self) -> Phrase:
        return Phrase(self.color, self.shape, self.direction)


# ----------------------------------------------------------------------------- captions


def phrases(objects: Sequence[Motion | Phrase]) -> tuple[Phrase, ...]:
    """Validated phrases of ``objects`` in caption order (colour, then shape); ValueError on an
    unknown word, no object, or two objects of the same colour and shape."""
    if not objects:
        raise ValueError("a moving_shapes caption needs at least one object")
    out = [o.phrase if isinstance(o, Motion) else o for o in objects]
    for p in out:
        if p.color not in COLORS:
            raise ValueError(f"unknown colour {p.color!r}; expected one of {_COLOR_NAMES}")
        if p.shape not in SHAPES:
            raise ValueError(f"unknown shape {p.shape!r}; expected one of {SHAPES}")
        if p.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {p.direction!r}; expected one of "
                             f"{tuple(DIRECTIONS)}")
    out.sort(key=lambda p: (_COLOR_NAMES.index(p.color), SHAPES.index(p.shape)))
    for a, b in itertools.pairwise(out):
        if (a.color, a.shape) == (b.color, b.shape):
            raise ValueError(f"two objects are both a {a.color} {a.shape}")
    return tuple(out)


def caption(objects: Sequence[Motion | Phrase]) -> str:
    """``"a red circle moving right and a blue square moving up"``; objects by colour, then
    shape, whatever their order in ``objects``; ``"an"`` before a vowel."""
    return " and ".join(f"{'an' if p.color[0] in 'aeiou' else 'a'} {p.color} {p.shape} moving "
                        f"{p.direction}" for p in phrases(objects))


_PHRASE_RE = re.compile(rf"an? ({'|'.join(_COLOR_NAMES)}) ({'|'.join(SHAPES)}) moving "
                        rf"({'|'.join(DIRECTIONS)})")
_CAPTION_RE = re.compile(rf"{_PHRASE_RE.pattern}(?: and {_PHRASE_RE.pattern})*")


def parse_caption(text: str) -> tuple[Phrase, ...]:
    """Inverse of :func:`caption`; ValueError for any text :func:`caption` cannot produce."""
    if not isinstance(text, str) or not _CAPTION_RE.fullmatch(text):
        raise ValueError(f"not a moving_shapes caption: {text!r}")
    found = tuple(Phrase(*m.groups()) for m in _PHRASE_RE.finditer(text))
    if caption(found) != text:
        raise ValueError(f"not a canonical moving_shapes caption: {text!r} (expected "
                         f"{caption(found)!r})")
    return found


def vocabulary() -> list[str]:
    """Every word of every caption, sorted (the word-level text encoder's vocabulary)."""
    return sorted({"a", "an", "and", "moving", *COLORS, *SHAPES, *DIRECTIONS})


# ----------------------------------------------------------------------------- motion


def trajectories(start: np.ndarray, velocity: np.ndarray, times: np.ndarray,
                 size: int = SIZE) -> np.ndarray:
    """Box centres (..., len(times), 2) at ``times`` (frames, any reals) of objects starting at
    ``start`` (..., 2) with ``velocity`` (..., 2), reflected at :func:`bounds`.

    Each axis is a triangle wave: the unbounded position folded into ``[lo, hi]`` with period
    ``2 (hi - lo)``, which is what bouncing elastically between two walls does.
    """
    lo, hi = bounds(size)
    span = hi - lo
    start, velocity = np.asarray(start, np.float64), np.asarray(velocity, np.float64)
    unfolded = start[..., None, :] - lo + velocity[..., None, :] * np.asarray(times)[:, None]
    return lo + span - np.abs(span - np.mod(unfolded, 2.0 * span))


def _check_size(size: int, frames: int) -> None:
    if int(size) != size or size < 24:
        raise ValueError(f"size must be an integer >= 24, got {size!r}")
    if int(frames) != frames or frames < 1:
        raise ValueError(f"frames must be an integer >= 1, got {frames!r}")


def trajectory(motion: Motion, frames: int, size: int = SIZE) -> np.ndarray:
    """Box centres (frames, 2) as (x, y) of ``motion`` at frames 0, 1, ...: what
    :func:`render_video` draws and what :mod:`jdit.eval.moving_shapes` predicts."""
    _check_size(size, frames)
    lo, hi = bounds(size)
    if not all(lo <= c <= hi for c in motion.start):
        raise ValueError(f"start {motion.start} must lie in [{lo:.3f}, {hi:.3f}] on both axes "
                         f"(the object fully inside a {size}x{size} frame)")
    return trajectories(np.array(motion.start), np.array(motion.velocity),
                        np.arange(frames), size)


# ----------------------------------------------------------------------------- rendering


def _render(clip: np.ndarray, slot: np.ndarray, shape: np.ndarray, color: np.ndarray,
            centres: np.ndarray, n: int, size: int) -> np.ndarray:
    """Objects (one entry each: clip index, slot within its clip, shape and colour index,
    centres (T, 2)) drawn into n black videos (n, T, size, size, 3) uint8, slot by slot (a
    clip has one object per slot, so no two writes of one pass hit the same video)."""
    frames = centres.shape[1]
    video = np.zeros((n, frames, size, size, 3), np.uint8)
    pix = np.arange(size, dtype=np.float64) + 0.5
    half = half_extent(size)
    for k in np.unique(slot):
        for s, name in enumerate(SHAPES):
            sel = np.flatnonzero((slot == k) & (shape == s))
            if not len(sel):
                continue
            cx, cy = centres[sel, :, 0, None, None], centres[sel, :, 1, None, None]
            mask = shape_mask(name, pix[None, None, None, :] - cx, pix[None, None, :, None] - cy,
                              half)
            idx = clip[sel]
            video[idx] = np.where(mask[..., None], _PALETTE[color[sel]][:, None, None, None],
                                  video[idx])
    return video


def render_videos(videos: Sequence[Sequence[Motion]], frames: int,
                  size: int = SIZE) -> np.ndarray:
    """Draw each video's motions: uint8 (N, frames, size, size, 3), black background.

    Any velocity is drawn (also none, or a diagonal one: what a test's corrupted video may
    need). Objects are not checked for overlap (the data's never meet); a later one covers an
    earlier one.
    """
    _check_size(size, frames)
    flat = [(i, k, m) for i, ms in enumerate(videos) for k, m in enumerate(ms)]
    for _, _, m in flat:
        phrases([Phrase(m.color, m.shape, "right")])  # colour and shape known
    centres = (np.stack([trajectory(m, frames, size) for _, _, m in flat]) if flat
               else np.zeros((0, frames, 2)))
    return _render(np.array([i for i, _, _ in flat], np.int64),
                   np.array([k for _, k, _ in flat], np.int64),
                   np.array([SHAPES.index(m.shape) for _, _, m in flat], np.int64),
                   np.array([_COLOR_NAMES.index(m.color) for _, _, m in flat], np.int64),
                   centres, len(videos), int(size))


def render_video(motions: Sequence[Motion], frames: int, size: int = SIZE) -> np.ndarray:
    """One video (frames, size, size, 3) uint8: :func:`render_videos` of one."""
    return render_videos([motions], frames, size)[0]


# ----------------------------------------------------------------------------- sampling


def _sample(rng: np.random.Generator, n: int, frames: int, size: int,
            pair_fraction: float) -> dict[str, Any]:
    if int(n) != n or n < 0:
        raise ValueError(f"the number of videos must be an integer >= 0, got {n!r}")
    if not 0.0 <= pair_fraction <= 1.0:
        raise ValueError(f"pair_fraction must lie in [0, 1], got {pair_fraction}")
    _check_size(size, frames)
    n, size = int(n), int(size)
    lo, hi = bounds(size)
    v = speed(size)
    kinds = len(COLORS) * len(SHAPES)
    is_pair = rng.random(n) < pair_fraction
    first = rng.integers(0, kinds, n)
    second = rng.integers(0, kinds - 1, n)
    kind = np.stack([first, second + (second >= first)], 1)  # two different colour-shape kinds
    axis = rng.integers(0, 2, n)  # 0: horizontal, 1: vertical (both objects of a pair)
    sign = rng.choice(np.array([-1.0, 1.0]), (n, 2))
    along = rng.uniform(lo, hi - v, (n, 2))  # one frame of travel ahead before the wall
    along = np.where(sign > 0, along, lo + hi - along)
    # Across the motion: a single anywhere; a pair uniformly over the rows (columns) whose
    # boxes keep GAP apart: sorted uniforms on [0, span - D] are uniform on that triangle.
    d = 2.0 * half_extent(size) + gap(size)
    u = np.sort(rng.uniform(0.0, hi - lo - d, (n, 2)), 1)
    apart = np.stack([lo + u[:, 0], lo + d + u[:, 1]], 1)
    apart = np.where(rng.random(n)[:, None] < 0.5, apart, apart[:, ::-1])
    across = np.where(is_pair[:, None], apart, rng.uniform(lo, hi, (n, 2)))
    xy = np.where((axis == 0)[:, None, None], np.stack([along, across], -1),
                  np.stack([across, along], -1))
    vel = np.zeros((n, 2, 2))
    vel[np.arange(n), :, axis] = sign * v

    objects = []
    for i in range(n):
        ms = [Motion(_COLOR_NAMES[kind[i, k] // len(SHAPES)], SHAPES[kind[i, k] % len(SHAPES)],
                     (float(xy[i, k, 0]), float(xy[i, k, 1])),
                     (float(vel[i, k, 0]), float(vel[i, k, 1])))
              for k in range(2 if is_pair[i] else 1)]
        ms.sort(key=lambda m: (_COLOR_NAMES.index(m.color), SHAPES.index(m.shape)))
        objects.append(tuple(ms))
    keep = np.concatenate([[True] * n, is_pair])  # slot 0 of every clip, slot 1 of pairs
    clip, slot = np.tile(np.arange(n), 2)[keep], np.repeat([0, 1], n)[keep]
    centres = trajectories(xy.transpose(1, 0, 2), vel.transpose(1, 0, 2), np.arange(frames),
                           size).reshape(2 * n, frames, 2)[keep]
    k = kind.T.reshape(-1)[keep]
    video = _render(clip, slot, k % len(SHAPES), k // len(SHAPES), centres, n, size)
    lut = to_float(np.arange(256, dtype=np.uint8))  # to_float's values, in one pass
    return {"videos": lut[video], "captions": [caption(o) for o in objects],
            "motions": objects}


def clips(n: int, frames: int = CLIP_FRAMES, size: int = SIZE, seed: int = 0,
          pair_fraction: float = 0.5) -> dict[str, Any]:
    """``n`` random videos of ``frames`` frames, a ``pair_fraction`` of them with two objects.

    Returns ``videos`` float32 (n, frames, size, size, 3) in [-1, 1], ``captions`` list[str]
    and ``motions`` list[tuple[Motion, ...]] (in caption order). Deterministic in ``seed``,
    from a stream apart from :func:`batch`'s and :func:`eval_set`'s.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG, 0xC11B]))
    return _sample(rng, n, frames, size, pair_fraction)


def eval_set(n: int, frames: int = EVAL_FRAMES, size: int = SIZE, seed: int = 0,
             pair_fraction: float = 0.5) -> dict[str, Any]:
    """``n`` long evaluation videos (keys as :func:`clips`), from a held-out seed stream that
    no training batch or :func:`clips` call draws from."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG, 0xE7A1]))
    return _sample(rng, n, frames, size, pair_fraction)


def batch(seed: int, index: int, batch_size: int, frames: int = CLIP_FRAMES, size: int = SIZE,
          pair_fraction: float = 0.5) -> dict[str, Any]:
    """Batch ``index`` of :func:`iterate` (keys as :func:`clips`): a function of
    ``(seed, index)`` only, so a run resumes exactly."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, _TAG]))
    return _sample(rng, batch_size, frames, size, pair_fraction)


def iterate(batch_size: int, seed: int, frames: int = CLIP_FRAMES, size: int = SIZE,
            pair_fraction: float = 0.5, start: int = 0) -> Iterator[dict[str, Any]]:
    """Infinite stream of batches ``batch(seed, k, ...)`` for k = start, start + 1, ..."""
    for k in itertools.count(start):
        yield batch(seed, k, batch_size, frames, size, pair_fraction)
