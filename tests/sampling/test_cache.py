"""Step caches inside the compiled sampler (jdit.sampling.cache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdit
from jdit.diffusion import DDPMSchedule
from jdit.sampling import ClassifierFreeGuidance, sample
from jdit.sampling.cache import (
    FirstBlockCache,
    GuidanceCache,
    MeasureChanges,
    StaticCache,
    calibrate,
    staged_text_model,
)

DEPTH = 4


@pytest.fixture(scope="module")
def model():
    m = jdit.models.build(dict(family="pixart", input_size=8, patch_size=2, in_channels=4,
                               hidden_size=32, depth=DEPTH, num_heads=2, caption_channels=8,
                               learn_sigma=False))
    params = jdit.nn.perturbed(jdit.models.init_params(m, jax.random.key(0)),
                               jax.random.key(1), 0.05)
    return m, params


def _inputs(b=2):
    k = jax.random.split(jax.random.key(2), 3)
    noise = jax.random.normal(k[0], (b, 8, 8, 4))
    ctx = jax.random.normal(k[1], (2 * b, 5, 8))
    mask = jnp.ones((2 * b, 5), jnp.int32)
    return noise, ctx, mask


def _run(m, params, cache=None, steps=8, guided=True):
    staged = staged_text_model(m)
    noise, ctx, mask = _inputs()
    fn = ClassifierFreeGuidance(staged) if guided else staged
    args = (4.0, params, ctx, mask) if guided else (params, ctx[2:], mask[2:])
    return sample(fn, noise, solver="dpm++2m", num_steps=steps, schedule=DDPMSchedule.linear(),
                  args=args, cache=cache)


def test_the_staged_model_is_the_model(model):
    m, params = model
    noise, ctx, mask = _inputs()
    t = jnp.asarray([10.0, 700.0])
    whole = m.apply({"params": params}, noise, t, context=ctx[2:], context_mask=mask[2:])
    staged = staged_text_model(m)(noise, t, params, ctx[2:], mask[2:])
    np.testing.assert_allclose(staged, whole, rtol=1e-5, atol=1e-6)


def test_first_block_cache_skips_only_what_changed_little(model):
    m, params = model
    plain = _run(m, params)
    never, stats = _run(m, params, FirstBlockCache(1e-9))  # nothing changes this little
    # the same products in another program (float32 rounding only)
    assert float(jnp.max(jnp.abs(never - plain)) / jnp.max(jnp.abs(plain))) < 1e-6
    assert int(stats["call"]) == 8 and int(stats["skipped"]) == 0
    assert int(stats["blocks"]) == 8 * DEPTH
    always, stats = _run(m, params, FirstBlockCache(0.999))
    assert int(stats["skipped"]) == 7  # every call after the first
    assert int(stats["blocks"]) == DEPTH + 7
    assert np.isfinite(np.asarray(always)).all()
    assert float(jnp.max(jnp.abs(always - plain))) > 1e-4  # skipping changes the result


def test_static_cache_reuses_where_told_and_calibrate_picks_small_changes(model):
    m, params = model
    reuse = (False, False, True, False, True, False, True, False)
    out, stats = _run(m, params, StaticCache(reuse))
    assert int(stats["skipped"]) == 3 and int(stats["blocks"]) == 5 * DEPTH + 3
    _, measured = _run(m, params, MeasureChanges(8))
    changes = np.asarray(measured["changes"])
    assert changes[0] == np.inf and np.all(changes[1:] > 0) and int(measured["skipped"]) == 0
    cache = calibrate(changes, float(np.median(changes[1:])))
    assert cache.reuse[0] is False and 1 <= sum(cache.reuse) <= 4
    assert not any(a and b for a, b in zip(cache.reuse, cache.reuse[1:], strict=False))
    with pytest.raises(ValueError, match="first call"):
        StaticCache((True, False))


def test_guidance_cache_computes_the_unconditional_half_on_alternate_calls(model):
    m, params = model
    plain = _run(m, params)
    out, stats = _run(m, params, GuidanceCache(every=2))
    assert int(stats["call"]) == 8
    assert int(stats["blocks"]) == 4 * DEPTH + 4 * ((DEPTH + 1) // 2)  # half-batch calls
    err = float(jnp.max(jnp.abs(out - plain))) / float(jnp.max(jnp.abs(plain)))
    assert 0 < err < 0.5  # an approximation, not another image
    with pytest.raises(ValueError, match="ClassifierFreeGuidance"):
        _run(m, params, GuidanceCache(), guided=False)
    # with a first-block cache beside it (the conditional-only calls never skip)
    both, stats = _run(m, params, GuidanceCache(2, FirstBlockCache(0.999)))
    assert int(stats["blocks"]) == DEPTH + 3 * 1 + 4 * ((DEPTH + 1) // 2)
    assert np.isfinite(np.asarray(both)).all()


def test_bad_caches_are_refused(model):
    m, params = model
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            FirstBlockCache(bad)
    with pytest.raises(ValueError, match="in stages"):
        noise, ctx, mask = _inputs()
        fn = lambda x, t, p, c, k: m.apply({"params": p}, x, t, context=c, context_mask=k)  # noqa: E731
        sample(fn, noise, solver="dpm++2m", num_steps=4, schedule=DDPMSchedule.linear(),
               args=(params, ctx[2:], mask[2:]), cache=FirstBlockCache(0.1))


def test_a_runs_generator_samples_with_a_step_cache():
    """``generate(..., step_cache=)`` of a shapes run: its counts add up per call."""
    from pathlib import Path

    from jdit.config import load_config
    from jdit.train.loop import Run

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "shapes_tiny.py", [
        "model.hidden_size=32", "model.depth=3", "model.num_heads=2",
        "model.caption_channels=16", "data.text_dim=16", "train.batch_size=8"])
    run = Run(cfg)
    params = run.init_state().params
    conds = run.task.encode(["a red circle in the top left", "a blue square in the center"])
    plain = run.generate(params, conds, seed=0, num_steps=4)
    same = run.generate(params, conds, seed=0, num_steps=4, step_cache=FirstBlockCache(1e-9))
    np.testing.assert_allclose(same, plain, atol=1e-4)
    assert run.generate.cache_stats["blocks"] == run.generate.cache_stats["blocks_uncached"] == 12
    run.generate(params, conds, seed=0, num_steps=4, step_cache=GuidanceCache(2))
    assert run.generate.cache_stats["calls"] == 8


def test_calibrate_limits_runs_of_reuse_and_follows_the_guidance_cache():
    changes = [np.inf] + [0.01] * 7
    assert calibrate(changes, 0.05).reuse == (False, True, False, True, False, True, False, True)
    assert calibrate(changes, 0.05, max_run=2).reuse == (False, True, True, False, True, True,
                                                         False, True)
    assert calibrate(changes, 0.05, every=2).reuse == (False, False, True, False, False, False,
                                                       True, False)
    assert calibrate(changes, 0.05, max_run=2, every=2).reuse == (
        False, False, True, False, True, False, False, False)
    assert not any(calibrate([np.inf, 0.5, 0.5], 0.05).reuse)
