"""ARLON's training stages: the optimisation loop, the known-frames loss, the segment denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit.models import build
from jdit.models.arlon import ArlonDiT, arlon_params, trainable_mask, with_injection
from jdit.nn.init import init_params, perturbed
from jdit.sampling.long_video import sample_long_video
from jdit.train.arlon import fit, known_frames, segment_denoiser, video_flow_loss

NULL = (np.zeros((1, 4, 8), np.float32), np.array([[1, 0, 0, 0]], np.int32))


def test_fit_trains_only_the_trainable_leaves():
    params = {"a": jnp.ones((3,)), "b": jnp.ones((2,))}
    loss = lambda p, batch, rng: jnp.sum((p["a"] - batch["y"]) ** 2) + jnp.sum(p["b"] ** 2)  # noqa: E731
    out = fit(loss, params, lambda i: {"y": np.full((3,), 3.0, np.float32)}, steps=60, lr=0.1,
              warmup=1, trainable={"a": True, "b": False}, progress=False)
    np.testing.assert_array_equal(out.params["b"], params["b"])
    assert out.losses[-1] < out.losses[0] - 1.0
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fit(loss, params, lambda i: {}, steps=0, lr=0.1)


def test_known_frames_are_the_first_frames_of_some_rows():
    m = np.asarray(known_frames(jax.random.key(0), 256, 8, 2, 0.7))
    assert m.shape == (256, 8)
    np.testing.assert_array_equal(m[:, 2:], 0.0)
    np.testing.assert_array_equal(m[:, 0], m[:, 1])
    assert 0.6 < m[:, 0].mean() < 0.8


def test_flow_loss_ignores_the_known_frames():
    """What the model says about frames it was given does not count."""
    batch = {"videos": jax.random.normal(jax.random.key(0), (3, 4, 8, 8, 3)),
             "context": jnp.zeros((3, 4, 8)), "context_mask": jnp.ones((3, 4), jnp.int32)}

    def apply(offset, x_in, t, ctx, mask, coarse):
        known = x_in[..., -1:]  # the mask channel of condition_frames
        assert x_in.shape[-1] == 7
        return jnp.zeros(x_in.shape[:-1] + (3,)) + offset * known

    loss = video_flow_loss(apply, shift=3.0, context_frames=2, p_context=1.0, cond_dropout=0.0,
                           null=NULL)
    key = jax.random.key(1)
    np.testing.assert_allclose(loss(0.0, batch, key), loss(50.0, batch, key), rtol=1e-6)
    free = video_flow_loss(apply, shift=3.0, context_frames=2, p_context=0.0, cond_dropout=0.0,
                           null=NULL)
    assert float(free(50.0, batch, key)) == float(free(0.0, batch, key))  # no mask: no offset


@pytest.fixture(scope="module")
def tiny_dit():
    dit = build("latte", input_size=8, patch_size=2, in_channels=7, predict_channels=3,
                hidden_size=32, depth=2, num_heads=2, caption_channels=8, learn_sigma=False,
                video_length=4)
    return dit, perturbed(init_params(dit, jax.random.key(0)), jax.random.key(1), 0.05)


def test_segment_denoiser_keeps_the_known_frames_and_joins_long_videos(tiny_dit):
    dit, params = tiny_dit
    arlon = ArlonDiT(dit=with_injection(dit), adapter_width=16, patch_size=2)
    a_params = arlon_params(init_params(arlon, jax.random.key(2)), params)
    a_params = jax.tree.map(lambda p, m: p + 0.05 if m else p, a_params, trainable_mask(a_params))
    ctx = jax.random.normal(jax.random.key(3), (2, 4, 8))
    cmask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    coarse = jax.random.normal(jax.random.key(4), (2, 10, 8, 8, 3))
    common = dict(num_steps=2, shift=3.0)
    plain = segment_denoiser(lambda p, x, t, c, m, z: dit.apply(
        {"params": p}, x, t, context=c, context_mask=m), **common)
    injected = segment_denoiser(lambda p, x, t, c, m, z: arlon.apply(
        {"params": p}, x, t, context=c, context_mask=m, coarse=z), **common)
    null = tuple(jnp.asarray(a) for a in NULL)
    scale = jnp.full((2,), 3.0)
    videos = {}
    for name, denoise, p in (("plain", plain, params), ("arlon", injected, a_params)):
        def conditions(i, start, stop, p=p, name=name):
            plan = coarse[:, start:stop] if name == "arlon" else jnp.zeros((0,))
            return (p, scale, ctx, cmask, *null, plan)
        videos[name] = sample_long_video(denoise, (8, 8, 3), batch=2, total_frames=10,
                                         segment_frames=4, context_frames=1,
                                         key=jax.random.key(5), conditions=conditions,
                                         trained_frames=4)
        assert videos[name].shape == (2, 10, 8, 8, 3) and np.isfinite(videos[name]).all()
    assert np.abs(videos["plain"] - videos["arlon"]).max() > 1e-4  # the plan is used
    known = jnp.asarray(videos["plain"][:, :4])
    mask = jnp.zeros((2, 4)).at[:, :2].set(1.0)
    seg = plain(jax.random.key(6), known, mask, params, scale, ctx, cmask, *null, jnp.zeros((0,)))
    np.testing.assert_array_equal(np.asarray(seg[:, :2]), np.asarray(known[:, :2]))
