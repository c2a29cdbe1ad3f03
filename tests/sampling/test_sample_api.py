"""sample(): one compile per configuration, guidance, and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdit
from jdit.diffusion import DDPMSchedule, FlowSchedule
from jdit.sampling import ClassifierFreeGuidance, sample

VP = DDPMSchedule.linear()
TRACES: list[str] = []


def counted_model(x, t, w):
    TRACES.append("trace")  # runs only while tracing
    return jnp.tanh(x * w) * (t / 1000.0)[:, None, None, None]


@pytest.mark.parametrize("solver", ["dpm++2m", "heun", "ddpm"])
def test_second_call_with_new_values_does_not_retrace(solver):
    TRACES.clear()
    key = jax.random.key(0)
    noise = jax.random.normal(key, (2, 4, 4, 3))
    kwargs = dict(solver=solver, num_steps=6, schedule=VP, key=jax.random.key(1))
    first = sample(counted_model, noise, args=(jnp.float32(0.5),), **kwargs)
    traced = len(TRACES)
    assert traced > 0
    second = sample(counted_model, noise + 1.0, args=(jnp.float32(0.7),), **kwargs)
    assert len(TRACES) == traced
    assert not np.allclose(np.asarray(first), np.asarray(second))
    sample(counted_model, noise, args=(jnp.float32(0.5),), **{**kwargs, "num_steps": 7})
    assert len(TRACES) > traced  # a new step count is a new program


def cond_uncond_model(x2, t2, labels2):
    """A toy conditional model: the label shifts the output."""
    return jnp.tanh(x2) + labels2[:, None, None, None] * 0.5 + (t2 / 1000.0)[:, None, None, None]


def test_classifier_free_guidance_batches_both_passes():
    x = jax.random.normal(jax.random.key(2), (3, 4, 4, 2))
    t = jnp.array([100.0, 500.0, 900.0])
    cond, uncond = jnp.array([1.0, 2.0, -1.0]), jnp.zeros(3)
    guided = ClassifierFreeGuidance(cond_uncond_model)
    scale = jnp.array([1.0, 4.5, 7.0])
    out = guided(x, t, scale, jnp.concatenate([uncond, cond]))
    e_c, e_u = cond_uncond_model(x, t, cond), cond_uncond_model(x, t, uncond)
    want = e_u + scale[:, None, None, None] * (e_c - e_u)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(e_c[0]), rtol=1e-6, atol=1e-6)


def test_guidance_interval_and_learned_sigma_channels():
    def model(x2, t2):  # learned sigma: 2C channels, the variance half differs per pass
        b = x2.shape[0] // 2
        sign = jnp.concatenate([-jnp.ones(b), jnp.ones(b)])[:, None, None, None]
        return jnp.concatenate([x2 * sign, x2 * 0 + sign], axis=-1)

    x = jnp.ones((2, 2, 2, 3))
    t = jnp.array([100.0, 800.0])
    out = ClassifierFreeGuidance(model, interval=(0.0, 500.0))(x, t, 3.0)
    assert out.shape == (2, 2, 2, 6)
    np.testing.assert_allclose(np.asarray(out[0, ..., :3]), -1 + 3 * 2)  # guided: uncond -1, cond 1
    np.testing.assert_allclose(np.asarray(out[1, ..., :3]), 1.0)  # outside the interval: cond
    np.testing.assert_allclose(np.asarray(out[..., 3:]), 1.0)  # variance from the cond pass


def test_guided_sampling_end_to_end_matches_manual_guidance():
    labels = jnp.array([1.0, -2.0])
    scale = jnp.array([2.0, 5.0])
    guided = ClassifierFreeGuidance(cond_uncond_model)
    noise = jax.random.normal(jax.random.key(4), (2, 3, 3, 2))
    out = sample(guided, noise, solver="dpm++2m", num_steps=8, schedule=VP,
                 args=(scale, jnp.concatenate([jnp.zeros(2), labels])))

    def manual(x, t):
        c, u = cond_uncond_model(x, t, labels), cond_uncond_model(x, t, jnp.zeros(2))
        return u + scale[:, None, None, None] * (c - u)

    ref = sample(manual, noise, solver="dpm++2m", num_steps=8, schedule=VP)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(solver="plms"), r"unknown solver 'plms' for a DDPMSchedule; valid: ddpm, ddim, dpm\+\+1s"),
    (dict(solver="ddpm", schedule=FlowSchedule(3.0), prediction="flow"),
     r"unknown solver 'ddpm' for a FlowSchedule; valid: dpm\+\+1s"),
    (dict(num_steps=0), r"num_steps must be an integer >= 1, got 0"),
    (dict(num_steps=2.5), r"num_steps must be an integer >= 1"),
    (dict(num_steps=1001), r"num_steps 1001 exceeds the schedule's 1000 training timesteps"),
    (dict(prediction="flow"), r"a DDPMSchedule serves predictions \('epsilon', 'v', 'sample'\), not 'flow'"),
    (dict(schedule=FlowSchedule(2.0), prediction="epsilon"),
     r"a FlowSchedule serves predictions \('flow',\), not 'epsilon'"),
    (dict(solver="ddpm"), r"solver 'ddpm' draws noise: pass key="),
    (dict(solver="ddim", eta=0.5), r"solver 'ddim' draws noise"),
    (dict(solver="ddpm", key=jax.random.key(0), variance="learned"), r"variance must be one of"),
    (dict(schedule="linear"), r"schedule must be a DDPMSchedule or a FlowSchedule"),
])
def test_bad_arguments(kwargs, message):
    base = dict(solver="dpm++2m", num_steps=4, schedule=VP, prediction="epsilon")
    with pytest.raises(ValueError, match=message):
        sample(lambda x, t: x, jnp.zeros((1, 2, 2, 1)), **{**base, **kwargs})


def test_model_with_wrong_output_shape():
    with pytest.raises(ValueError, match=r"model_fn returned shape \(1, 2, 2, 3\)"):
        sample(lambda x, t: jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 1)), num_steps=2,
               schedule=VP)


def test_learned_range_needs_two_c_channels():
    with pytest.raises(ValueError, match="learned_range"):
        sample(lambda x, t: x, jnp.zeros((1, 2, 2, 1)), solver="ddpm", num_steps=2, schedule=VP,
               key=jax.random.key(0), variance="learned_range")


def test_schedules_helpers():
    sched = DDPMSchedule.linear()
    t = jnp.array([0, 999])
    np.testing.assert_allclose(np.asarray(sched.alpha(t) ** 2 + sched.sigma(t) ** 2), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jnp.log(sched.snr(t))), sched.log_snr[[0, 999]], rtol=1e-5)
    assert hash(DDPMSchedule.linear()) == hash(sched) and DDPMSchedule.linear() == sched
    flow = FlowSchedule.for_resolution(1024 * 1024, 256 * 256)
    assert flow.shift == pytest.approx(4.0)
    assert float(flow.shift_sigma(0.5)) == pytest.approx(0.8)
    assert FlowSchedule.dynamic_from_tokens(4096).shift == pytest.approx(np.exp(1.15))
    with pytest.raises(ValueError):
        FlowSchedule(0.0)
    with pytest.raises(ValueError):
        DDPMSchedule((0.5,))
    assert jdit.diffusion.DDPMSchedule is DDPMSchedule
