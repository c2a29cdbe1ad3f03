"""The embedded ``moving_shapes`` videos: captions, bouncing motion, rendering, sampling."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from jdit.data import moving_shapes as ms
from jdit.data import shapes
from jdit.data.moving_shapes import Motion, Phrase
from jdit.text.words import tokenize

SINGLES = [(Phrase(c, s, d),) for c in shapes.COLORS for s in shapes.SHAPES for d in ms.DIRECTIONS]


def test_constants():
    assert ms.speed(32) == 2.0 and ms.speed(64) == 4.0
    lo, hi = ms.bounds(32)
    assert lo == pytest.approx(0.8 * 32 / 6) and hi == pytest.approx(32 - lo)
    crossings = ms.EVAL_FRAMES * ms.speed(32) / (hi - lo)  # walls passed in an eval video
    assert 2.5 < crossings < 3.0
    assert ms.EVAL_FRAMES >= 4 * ms.CLIP_FRAMES


# ----------------------------------------------------------------------------- captions


def test_captions_round_trip_in_canonical_order():
    a, b = Phrase("red", "circle", "right"), Phrase("blue", "square", "up")
    assert ms.caption([a]) == "a red circle moving right"
    text = "a red circle moving right and a blue square moving up"
    assert ms.caption([a, b]) == ms.caption([b, a]) == text
    assert ms.parse_caption(text) == (a, b)
    assert ms.caption([Phrase("orange", "triangle", "left")]) == "an orange triangle moving left"
    pairs = [p + q for p, q in itertools.combinations(SINGLES, 2)
             if p[0].color + p[0].shape != q[0].color + q[0].shape]
    for objs in SINGLES + pairs[::37]:
        assert ms.parse_caption(ms.caption(objs)) == ms.phrases(objs)
    m = Motion("red", "circle", (10.0, 10.0), (0.0, -2.0))
    assert m.direction == "up" and ms.caption([m]) == "a red circle moving up"
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.color = "blue"


@pytest.mark.parametrize("text", [
    "a red circle moving diagonally", "an red circle moving right", "a red circle moving  right",
    "a blue square moving up and a red circle moving right",  # not in canonical order
    "a red circle moving right and a red circle moving left",  # the same object twice
    "a red circle in the top left", "a purple circle moving right", "", "a red circle moving right ",
])
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError, match="moving_shapes caption|two objects"):
        ms.parse_caption(text)


def test_bad_objects_raise():
    with pytest.raises(ValueError, match="colour"):
        ms.caption([Phrase("pink", "circle", "up")])
    with pytest.raises(ValueError, match="direction"):
        ms.caption([Phrase("red", "circle", "sideways")])
    with pytest.raises(ValueError, match="at least one"):
        ms.caption([])
    with pytest.raises(ValueError, match="not along"):
        ms.caption([Motion("red", "circle", (10.0, 10.0), (1.0, 1.0))])
    with pytest.raises(ValueError, match="must lie in"):
        ms.trajectory(Motion("red", "circle", (2.0, 10.0), (2.0, 0.0)), 8)
    with pytest.raises(ValueError, match="frames"):
        ms.trajectory(Motion("red", "circle", (10.0, 10.0), (2.0, 0.0)), 0)
    with pytest.raises(ValueError, match="size"):
        ms.clips(2, size=16)
    with pytest.raises(ValueError, match="pair_fraction"):
        ms.clips(2, pair_fraction=1.5)


def test_vocabulary_covers_every_caption_word():
    data = ms.clips(256, frames=1, seed=4)
    words = {w for t in data["captions"] for w in tokenize(t)}
    assert words <= set(ms.vocabulary()) and len(ms.vocabulary()) == 19
    assert ms.vocabulary() == sorted(ms.vocabulary())


# ----------------------------------------------------------------------------- motion


def test_bounce_reflects_velocity():
    lo, hi = ms.bounds(32)
    m = Motion("red", "circle", (hi - 1.0, 12.0), (2.0, 0.0))
    xy = ms.trajectory(m, 4)
    np.testing.assert_allclose(xy[:, 0], [hi - 1, hi - 1, hi - 3, hi - 5])  # wall at t = 0.5
    np.testing.assert_allclose(xy[:, 1], 12.0)
    m = Motion("red", "circle", (12.0, lo + 0.5), (0.0, -2.0))
    np.testing.assert_allclose(ms.trajectory(m, 3)[:, 1], [lo + 0.5, lo + 1.5, lo + 3.5])


def test_trajectories_stay_inside_and_keep_their_speed():
    lo, hi = ms.bounds(32)
    rng = np.random.default_rng(0)
    start = rng.uniform(lo, hi, (64, 2))
    vel = rng.uniform(-3, 3, (64, 2))  # any velocity, diagonals included
    dt = 2e-3
    xy = ms.trajectories(start, vel, np.arange(0, 32, dt))
    assert xy.min() >= lo - 1e-9 and xy.max() <= hi + 1e-9
    step = np.diff(xy, axis=1) / dt  # the velocity, per axis
    wall = (np.abs(xy[:, 1:] - lo) < 0.01) | (np.abs(xy[:, 1:] - hi) < 0.01)
    np.testing.assert_allclose(np.abs(step)[~wall], np.broadcast_to(
        np.abs(vel)[:, None], step.shape)[~wall], rtol=1e-5)
    flips = np.sign(step[:, 1:]) != np.sign(step[:, :-1])
    assert flips.any() and wall[:, 1:][flips].all()  # the velocity reverses only at a wall


def test_rendered_objects_stay_whole_inside_the_frame():
    lo, hi = ms.bounds(32)
    motions = [(Motion("green", s, (x, y), (2.0, -2.0)),)
               for s in shapes.SHAPES for x in (lo, hi, 16.3) for y in (lo, hi, 9.7)]
    video = ms.render_video(motions[0], 3)
    assert video.shape == (3, 32, 32, 3) and video.dtype == np.uint8
    videos = ms.render_videos(motions, 24)
    big = np.arange(-16, 48) + 0.5  # a canvas 16 px wider on every side
    for (m,), vid in zip(motions, videos, strict=True):
        for xy, frame in zip(ms.trajectory(m, 24), vid, strict=True):
            whole = shapes.shape_mask(m.shape, big[None, :] - xy[0], big[:, None] - xy[1],
                                      ms.half_extent(32)).sum()
            drawn = frame.any(-1)
            assert drawn.sum() == whole and (frame[drawn] == shapes.COLORS["green"]).all()


# ----------------------------------------------------------------------------- sampling


def test_clips_are_deterministic_and_consistent():
    a, b = ms.clips(64, seed=3), ms.clips(64, seed=3)
    assert np.array_equal(a["videos"], b["videos"]) and a["captions"] == b["captions"]
    assert a["videos"].shape == (64, 8, 32, 32, 3) and a["videos"].dtype == np.float32
    assert a["videos"].min() == -1.0 and a["videos"].max() == 1.0
    assert ms.clips(64, seed=4)["captions"] != a["captions"]
    assert ms.eval_set(64, frames=8, seed=3)["captions"] != a["captions"]
    np.testing.assert_array_equal(a["videos"], shapes.to_float(ms.render_videos(a["motions"], 8)))
    assert a["captions"] == [ms.caption(m) for m in a["motions"]]
    long = ms.eval_set(16, seed=2)
    assert long["videos"].shape == (16, 32, 32, 32, 3)
    stream = ms.iterate(8, seed=5, frames=4, start=2)
    for k in (2, 3):
        got, want = next(stream), ms.batch(5, k, 8, frames=4)
        assert np.array_equal(got["videos"], want["videos"]) and got["captions"] == want["captions"]
    assert ms.batch(5, 0, 8)["captions"] != ms.batch(5, 1, 8)["captions"]


def test_sampled_motions_follow_the_rules():
    data = ms.clips(1024, frames=2, seed=7, pair_fraction=0.5)
    lo, hi = ms.bounds(32)
    least = 2 * ms.half_extent(32) + ms.gap(32)
    n_pairs = 0
    for objs in data["motions"]:
        for m in objs:
            assert lo <= min(m.start) and max(m.start) <= hi
            assert np.hypot(*m.velocity) == ms.speed(32) and m.direction in ms.DIRECTIONS
            np.testing.assert_allclose(ms.trajectory(m, 2)[1] - m.start, m.velocity,
                                       atol=1e-9)  # no bounce in frame 1
        if len(objs) == 2:
            n_pairs += 1
            a, b = objs
            axis = 0 if a.velocity[0] else 1
            assert b.velocity[axis] and not b.velocity[1 - axis]  # along the same axis
            assert abs(a.start[1 - axis] - b.start[1 - axis]) >= least  # in rows apart
            assert (a.color, a.shape) != (b.color, b.shape)
    assert 450 < n_pairs < 574
    assert {d.direction for objs in data["motions"] for d in objs} == set(ms.DIRECTIONS)
    assert all(len(o) == 1 for o in ms.clips(32, pair_fraction=0.0)["motions"])
    assert all(len(o) == 2 for o in ms.clips(32, pair_fraction=1.0)["motions"])
