"""The long-video sampler: segments join without a seam, one compile, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit.sampling.long_video import Segments, condition_frames, sample_long_video


def test_segments_cover_the_video_with_overlaps():
    assert Segments(8, 8, 2).starts == [0]
    assert Segments(20, 8, 2).starts == [0, 6, 12]  # 12 + 8 = 20
    assert Segments(21, 8, 2).starts == [0, 6, 12, 18]  # the last runs 5 frames past the end
    assert Segments(16, 8, 0).starts == [0, 8]
    with pytest.raises(ValueError, match="context frames"):
        Segments(16, 8, 8)


def test_condition_frames_layout_and_errors():
    x = jnp.ones((2, 3, 4, 4, 3))
    known = jnp.full_like(x, 5.0)
    mask = jnp.array([[1, 0, 0], [1, 1, 0]], jnp.float32)
    y = condition_frames(x, known, mask)
    assert y.shape == (2, 3, 4, 4, 7)
    np.testing.assert_array_equal(y[..., :3], 1.0)
    np.testing.assert_array_equal(y[0, 0, ..., 3:6], 5.0)
    np.testing.assert_array_equal(y[0, 1, ..., 3:6], 0.0)  # unknown frames carry nothing
    np.testing.assert_array_equal(y[1, :, 0, 0, 6], [1, 1, 0])
    with pytest.raises(ValueError, match=r"mask must be \(B, T\)"):
        condition_frames(x, known, mask[:, :2])
    with pytest.raises(ValueError, match="known must both be"):
        condition_frames(x, known[:, :2], mask)


def test_segments_join_without_a_seam_and_compile_once():
    """The known frames each segment receives are exactly the video's last frames so far, and
    those frames are kept exactly in the result (whatever the model returns for them)."""
    traces, seen = [], []

    @jax.jit
    def denoise(key, known, mask, offset):
        traces.append(1)
        noise = jax.random.normal(key, known.shape)
        # a model that ignores its known frames on output (the sampler must not trust it)
        return noise + offset[:, None, None, None, None]

    def conditions(i, start, stop):
        seen.append((i, start, stop))
        return (jnp.full((2,), float(i)),)

    received = []
    inner = denoise

    def spy(key, known, mask, offset):
        received.append((np.asarray(known), np.asarray(mask)))
        return inner(key, known, mask, offset)

    video = sample_long_video(spy, (4, 4, 3), batch=2, total_frames=21, segment_frames=8,
                              context_frames=2, key=jax.random.key(0), conditions=conditions,
                              trained_frames=8)
    assert video.shape == (2, 21, 4, 4, 3)
    assert seen == [(0, 0, 8), (1, 6, 14), (2, 12, 20), (3, 18, 26)]
    assert len(traces) == 1  # one program for every segment
    np.testing.assert_array_equal(received[0][1], 0.0)
    for (known, mask), start in zip(received[1:], (6, 12, 18), strict=True):
        np.testing.assert_array_equal(mask[:, :2], 1.0)
        np.testing.assert_array_equal(mask[:, 2:], 0.0)
        np.testing.assert_array_equal(known[:, :2], video[:, start:start + 2])  # bit-exact
        np.testing.assert_array_equal(known[:, 2:], 0.0)
    # new frames of segment 1 are its own output, shifted by its offset (1.0)
    assert abs(float(np.mean(video[:, 8:14])) - 1.0) < 0.5
    assert abs(float(np.mean(video[:, :6])) - 0.0) < 0.5


def test_long_video_refuses_segments_longer_than_training():
    with pytest.raises(ValueError, match="exceeds the 8 frames"):
        sample_long_video(lambda *a: None, (4, 4, 3), batch=1, total_frames=32,
                          segment_frames=12, context_frames=2, key=jax.random.key(0),
                          trained_frames=8)
