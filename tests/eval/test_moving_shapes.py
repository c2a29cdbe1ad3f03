"""The exact moving_shapes evaluator: ground truth scores perfectly, each kind of drift shows."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from jdit.data import moving_shapes as ms
from jdit.data import shapes
from jdit.data.moving_shapes import Motion
from jdit.eval import moving_shapes as ev

T = 32


@pytest.fixture(scope="module")
def long_set() -> dict:
    return ms.eval_set(48, frames=T, seed=1)


def _singles(data: dict) -> tuple[np.ndarray, list]:
    keep = [i for i, m in enumerate(data["motions"]) if len(m) == 1]
    return data["videos"][keep], [data["motions"][i] for i in keep]


def test_ground_truth_scores_perfectly(long_set):
    got = ev.evaluate(long_set["videos"], long_set["captions"])
    assert got["identity"] == got["identity_all"] == got["count"] == got["count_all"] == 1.0
    assert got["missing"] == got["unanchored"] == 0.0
    assert got["trajectory_error"] < 0.5 and abs(got["speed_ratio"] - 1.0) < 0.05
    assert got["videos"] == 48 and got["frames"] == T
    json.dumps(got)
    per = ev.score_videos(long_set["videos"], long_set["motions"])  # motions as expected
    assert per["trajectory_error"].max() < 1.0 and np.abs(per["speed_ratio"] - 1).max() < 0.05
    assert per["identity_frames"].shape == (48, T) and per["identity_frames"].all()
    # uint8 videos, other sizes, training clips.
    u8 = ms.render_videos(long_set["motions"][:8], T)
    assert ev.evaluate(u8, long_set["captions"][:8])["identity_all"] == 1.0
    for size in (48, 64):
        data = ms.eval_set(8, frames=16, size=size, seed=2)
        got = ev.evaluate(data["videos"], data["captions"])
        assert got["count_all"] == got["identity_all"] == 1.0 and got["trajectory_error"] < 1.0
    clips = ms.clips(32, seed=5)
    got = ev.evaluate(clips["videos"], clips["captions"])
    assert got["identity_all"] == 1.0 and got["trajectory_error"] < 1.0


def test_colour_swapped_halfway_drops_identity(long_set):
    videos, motions = _singles(long_set)
    videos = videos.copy()
    for v, (m,) in zip(videos, motions, strict=True):
        other = "green" if m.color != "green" else "red"
        late = v[T // 2 :]
        late[(late > -1).any(-1)] = shapes.to_float(np.array(shapes.COLORS[other], np.uint8))
    got = ev.evaluate(videos, motions)
    assert got["identity"] == pytest.approx(0.5) and got["identity_all"] == 0.0
    assert got["missing"] == pytest.approx(0.5) and got["count_all"] == 1.0


def _reframe(motions: list, velocity: tuple[float, float] | None, scale: float) -> list:
    return [(dataclasses.replace(m, velocity=velocity if velocity is not None else
                                 tuple(scale * v for v in m.velocity)),) for (m,) in motions]


def test_frozen_object_has_no_speed(long_set):
    _, motions = _singles(long_set)
    frozen = ms.render_videos(_reframe(motions, (0.0, 0.0), 1.0), T)
    got = ev.evaluate(frozen, motions)
    assert got["speed_ratio"] < 0.05 and got["trajectory_error"] > 5.0
    assert got["identity_all"] == got["count_all"] == 1.0  # still there, still itself


def test_reversed_direction_raises_trajectory_error(long_set):
    _, motions = _singles(long_set)
    lo, hi = ms.bounds(32)
    away = [(m,) for (m,) in motions  # a start at a wall makes reversing a bounce
            if all(lo + 2 < c < hi - 2 for c in m.start)]
    reversed_ = ms.render_videos(_reframe(away, None, -1.0), T)
    got = ev.evaluate(reversed_, away)
    assert got["trajectory_error"] > 5.0 and abs(got["speed_ratio"] - 1.0) < 0.05
    half_speed = ms.render_videos(_reframe(away, None, 0.5), T)
    got = ev.evaluate(half_speed, away)
    assert abs(got["speed_ratio"] - 0.5) < 0.05 and got["trajectory_error"] > 3.0


def test_extra_object_drops_count(long_set):
    pairs = [i for i, m in enumerate(long_set["motions"]) if len(m) == 2]
    videos = long_set["videos"][pairs]
    first_only = [long_set["motions"][i][:1] for i in pairs]  # the second is extra
    got = ev.evaluate(videos, first_only)
    assert got["count"] == got["count_all"] == 0.0 and got["identity_all"] == 1.0
    # A duplicate of the object, standing still elsewhere: the moving one is followed.
    m = Motion("red", "circle", (8.0, 8.0), (2.0, 0.0))
    dup = Motion("red", "circle", (16.0, 24.0), (0.0, 0.0))
    per = ev.score_videos(ms.render_videos([(m, dup)], T), ["a red circle moving right"])
    assert per["count"][0] == 0.0 and per["identity"][0] == 1.0
    assert per["trajectory_error"][0] < 0.5 and abs(per["speed_ratio"][0] - 1) < 0.05


def test_object_removed_in_some_frames_drops_identity_and_count(long_set):
    pairs = [i for i, m in enumerate(long_set["motions"]) if len(m) == 2]
    motions = [long_set["motions"][i] for i in pairs]
    videos = long_set["videos"][pairs].copy()
    videos[:, T // 4 : T // 2] = shapes.to_float(
        ms.render_videos([m[:1] for m in motions], T))[:, T // 4 : T // 2]
    per = ev.score_videos(videos, motions)
    np.testing.assert_allclose(per["identity"], 0.75)
    np.testing.assert_allclose(per["count"], 0.75)
    np.testing.assert_allclose(per["missing"], 0.125)
    assert (per["identity_all"] == 0).all() and (per["trajectory_error"] < 1.0).all()
    assert not per["identity_frames"][:, T // 4 : T // 2].any()
    # Missing from frame 0: no anchor, counted, no trajectory figures for that object.
    videos[:, :1] = -1.0
    per = ev.score_videos(videos[:, :, :, :, :], motions)
    np.testing.assert_allclose(per["unanchored"], 1.0)
    assert np.isnan(per["trajectory_error"]).all() and np.isnan(per["speed_ratio"]).all()
    assert np.isnan(ev.evaluate(videos, motions)["trajectory_error"])


def test_bad_input_raises(long_set):
    v = long_set["videos"]
    with pytest.raises(ValueError, match=r"\(N, T, H, W, 3\)"):
        ev.evaluate(v[0], long_set["captions"][:1])
    with pytest.raises(ValueError, match="square"):
        ev.evaluate(v[:2, :, :, :24], long_set["captions"][:2])
    with pytest.raises(ValueError, match="one caption"):
        ev.evaluate(v[:2], long_set["captions"][:3])
    with pytest.raises(ValueError, match="moving_shapes caption"):
        ev.evaluate(v[:1], ["a red circle in the top left"])
