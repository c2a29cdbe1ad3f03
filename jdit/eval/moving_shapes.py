"""The exact evaluator of ``moving_shapes`` videos (:mod:`jdit.data.moving_shapes`).

Every frame is read with the ``shapes`` detector (:func:`jdit.eval.shapes.locate_batch`, with
no split along the 3x3 cell borders, since a moving object straddles them); each caption object
is then followed through the video and compared with where the caption says it must be. What
a long generated video gets wrong shows in one figure each:

* **identity** (per video): the fraction of frames in which every caption object is found,
  i.e. some detected object has its colour and shape (extra objects do not count against it);
  ``identity_all``: 1 if that holds in every frame, else 0 (the strict per-video rate).
* **count**: the fraction of frames with exactly as many detected objects as the caption names
  (any object, known or not, of at least the detector's minimum size); ``count_all`` likewise.
* **trajectory_error**: the mean distance in pixels, over the frames where an object is found,
  between its detected centre and the centre predicted from the caption's direction, the
  dataset's speed and the bounce rule (:func:`jdit.data.moving_shapes.trajectories`), anchored
  at the object's detected centre in frame 0. Missing detections are not part of the mean but
  are counted: ``missing`` is the fraction of (object, frame) pairs without the object, and an
  object not found in frame 0 has no anchor, hence no predicted path: ``unanchored`` is the
  fraction of caption objects in that case, and they take no part in the trajectory and speed
  figures (a video without any anchored object has NaN for both).
* **speed_ratio**: the path length measured between consecutive frames where an object is found
  in both, over the predicted path length between the same frames (the dataset speed, shortened
  only by the bounces falling between two frames): 1 for the right speed, 0 for a frozen object,
  whatever the direction (the trajectory error tells the direction).

When several detected objects have a caption object's colour and shape (a duplicate), the one
nearest the predicted centre is followed (in frame 0: the largest). Centres are those of the
box, as the data moves them: the centroid of a triangle's pixels lies ``half / 3`` below its
box centre (:func:`jdit.data.shapes.shape_mask`), so the centroid of a detected triangle is
moved up by that much. Ground-truth videos score identity and count 1, a trajectory error of
a few tenths of a pixel (pixel quantisation of the centroid) and a speed ratio within 1 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jdit.data import moving_shapes as data
from jdit.eval.shapes import Located, locate_batch

Expected = str | Sequence[data.Motion | data.Phrase]
PER_VIDEO = ("identity", "identity_all", "count", "count_all", "trajectory_error", "missing",
             "unanchored", "speed_ratio")


def _phrases(item: Expected) -> tuple[data.Phrase, ...]:
    return data.parse_caption(item) if isinstance(item, str) else data.phrases(item)


def detections(videos: np.ndarray, **kwargs: Any) -> list[list[list[Located]]]:
    """The objects of every frame of ``videos`` (N, T, H, W, 3): ``[video][frame]`` lists of
    :class:`jdit.eval.shapes.Located`, detected 512 frames at a time. ``kwargs`` go to
    :func:`jdit.eval.shapes.locate_batch` (``split_cells`` is always False)."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be (N, T, H, W, 3), got shape {videos.shape}")
    n, t = videos.shape[:2]
    flat = videos.reshape(n * t, *videos.shape[2:])
    found: list[list[Located]] = []
    for s in range(0, n * t, 512):
        found += locate_batch(flat[s : s + 512], split_cells=False, **kwargs)
    return [found[i * t : (i + 1) * t] for i in range(n)]


def _centre(loc: Located, half: float) -> np.ndarray:
    return np.array([loc.x, loc.y - (half / 3.0 if loc.obj.shape == "triangle" else 0.0)])


def _score_one(frames: list[list[Located]], expected: tuple[data.Phrase, ...], size: int,
               speed: float) -> dict[str, Any]:
    """One video's figures (see the module docstring) and its per-frame arrays."""
    t, k = len(frames), len(expected)
    half = data.half_extent(size)
    lo, hi = data.bounds(size)
    found = np.zeros((k, t), bool)
    error = np.full((k, t), np.nan)
    measured, predicted_len = 0.0, 0.0
    anchored = 0
    for j, p in enumerate(expected):
        cands = [[loc for loc in objs if (loc.obj.color, loc.obj.shape) == (p.color, p.shape)]
                 for objs in frames]
        found[j] = [bool(c) for c in cands]
        if not cands[0]:
            continue
        anchored += 1
        start = np.clip(_centre(max(cands[0], key=lambda loc: loc.area), half), lo, hi)
        velocity = speed * np.array(data.DIRECTIONS[p.direction], np.float64)
        pred = data.trajectories(start, velocity, np.arange(t), size)
        centres = np.full((t, 2), np.nan)
        for f, cs in enumerate(cands):
            if cs:
                centres[f] = min((_centre(c, half) for c in cs),
                                 key=lambda c: float(np.sum((c - pred[f]) ** 2)))
        error[j] = np.linalg.norm(centres - pred, axis=-1)
        both = found[j, 1:] & found[j, :-1]
        measured += np.linalg.norm(np.diff(centres, axis=0), axis=-1)[both].sum()
        predicted_len += np.linalg.norm(np.diff(pred, axis=0), axis=-1)[both].sum()
    identity = found.all(0)
    count = np.array([len(objs) == k for objs in frames])
    seen = ~np.isnan(error)
    return {
        "identity": identity.mean(), "identity_all": float(identity.all()),
        "count": count.mean(), "count_all": float(count.all()),
        "trajectory_error": error[seen].mean() if seen.any() else np.nan,
        "missing": 1.0 - found.mean(), "unanchored": 1.0 - anchored / k,
        "speed_ratio": measured / predicted_len if predicted_len > 0 else np.nan,
        "identity_frames": identity, "count_frames": count,
        "error_frames": np.array([e[s].mean() if s.any() else np.nan
                                  for e, s in zip(error.T, seen.T, strict=True)]),
    }


def score_videos(videos: np.ndarray, expected: Sequence[Expected], speed: float | None = None,
                 **kwargs: Any) -> dict[str, np.ndarray]:
    """Per-video figures of ``videos`` (N, T, H, W, 3) against ``expected`` (per video a
    caption or its motions/phrases): float (N,) arrays under the names of ``PER_VIDEO`` (NaN
    where undefined, see the module docstring), and per frame ``identity_frames``,
    ``count_frames`` (bool (N, T)) and ``error_frames`` (float (N, T): the mean distance over
    the anchored objects found in that frame, NaN if none): how a video drifts over time.

    Videos are ``uint8`` [0, 255] or float [-1, 1] (the detector's convention), square frames.
    ``speed``: pixels per frame of the predicted motion (default: the dataset's,
    :func:`jdit.data.moving_shapes.speed`). ``kwargs`` go to the detector.
    """
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[2] != videos.shape[3] or videos.shape[-1] != 3:
        raise ValueError(f"videos must be (N, T, H, W, 3) with square frames, got shape "
                         f"{videos.shape}")
    if len(expected) != len(videos) or not len(videos):
        raise ValueError(f"expected one caption (or motions) per video, got {len(expected)} "
                         f"for {len(videos)} videos")
    phrases = [_phrases(e) for e in expected]
    size = int(videos.shape[2])
    speed = data.speed(size) if speed is None else float(speed)
    rows = [_score_one(f, p, size, speed)
            for f, p in zip(detections(videos, **kwargs), phrases, strict=True)]
    return {key: np.array([r[key] for r in rows]) for key in rows[0]}


def evaluate(videos: np.ndarray, expected: Sequence[Expected], speed: float | None = None,
             **kwargs: Any) -> dict[str, float]:
    """The means over the videos of :func:`score_videos`' figures (JSON-friendly floats):
    ``identity``, ``identity_all``, ``count``, ``count_all``, ``missing``, ``unanchored``, and
    ``trajectory_error``, ``speed_ratio`` over the videos where they are defined (NaN if
    none), with ``videos`` and ``frames``."""
    per = score_videos(videos, expected, speed, **kwargs)
    out = {}
    for key in PER_VIDEO:
        vals = per[key]
        ok = ~np.isnan(vals)
        out[key] = float(vals[ok].mean()) if ok.any() else float("nan")
    out["videos"] = float(len(per["identity"]))
    out["frames"] = float(per["identity_frames"].shape[1])
    return out
