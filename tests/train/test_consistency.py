"""Latent consistency distillation (jdit.train.consistency): the loss, and a run end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jdit.train.consistency import (
    ddim_grid,
    flow_grid,
    make_consistency_loss,
    make_scm_loss,
    pseudo_huber,
    trigflow_velocity,
)

C = 3


class Oracle(nn.Module):
    """The exact velocity of a flow whose data is the single image ``center``: the ODE from
    any noise ends there, so its consistency function is ``center`` everywhere."""

    center: float = 0.7
    offset_init: float = 0.0  # a learnable error added to the velocity

    @nn.compact
    def __call__(self, x, t, context=None, context_mask=None):
        offset = self.param("offset", nn.initializers.constant(self.offset_init), (C,))
        sigma = (t / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
        scale = 1.0 + 0.0 * jnp.sum(context)  # conditions reach the model, unused
        return scale * (x - self.center) / sigma + offset


def _batch(b=4):
    return {"images": jnp.full((b, 4, 4, C), 0.7), "context": jnp.ones((b, 3, 2)),
            "context_mask": jnp.ones((b, 3), jnp.int32)}


NULL = (jnp.zeros((1, 3, 2)), jnp.ones((1, 3), jnp.int32))
DISTILL = {"method": "consistency", "guidance_scale": 3.0, "grid_steps": 10, "huber_c": 1e-3}


def test_the_exact_consistency_function_has_zero_loss_and_errors_do_not():
    """With the exact teacher and student, one teacher step along the ODE lands where the
    student's target says: the loss is 0 (up to rounding); an error in the student's velocity
    makes it positive and gives it a gradient that points back."""
    module = Oracle()
    params = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, C)), jnp.ones((1,)) * 500.0,
                         jnp.zeros((1, 3, 2)))["params"]
    loss = make_consistency_loss(module, (module, params), {"objective": "flow", "flow_shift": 3.0},
                                 DISTILL, NULL)
    exact = float(loss(params, _batch(), jax.random.key(1), params))
    assert exact < 1e-6
    wrong = {"offset": jnp.full((C,), 0.3)}
    value, grads = jax.value_and_grad(loss)(wrong, _batch(), jax.random.key(1), params)
    assert float(value) > 1e-2
    assert bool(jnp.all(grads["offset"] > 0))  # descending moves the offset back toward 0


SCM = {"method": "scm", "guidance_scale": 3.0, "sigma_data": 0.5, "p_mean": -0.8, "p_std": 1.6,
       "tangent_warmup": 0}


@pytest.mark.parametrize("warmup", [0, 10])
def test_scm_the_exact_consistency_function_has_zero_loss_and_errors_do_not(warmup):
    """sCD: along the exact ODE the consistency function is constant, so its TrigFlow
    derivative (from jax.jvp) and with it the whole tangent g vanish; a wrong student has a
    loss and a gradient."""
    module = Oracle()
    params = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, C)), jnp.ones((1,)) * 500.0,
                         jnp.zeros((1, 3, 2)))["params"]
    loss = make_scm_loss(module, (module, params), {"objective": "flow"},
                         {**SCM, "tangent_warmup": warmup}, NULL)
    exact = float(loss(params, _batch(), jax.random.key(1), params, jnp.int32(3)))
    assert exact < 1e-8
    wrong = {"offset": jnp.full((C,), 0.3)}
    value, grads = jax.value_and_grad(loss)(wrong, _batch(), jax.random.key(1), params,
                                            jnp.int32(3))
    assert float(value) > 1e-3 and float(jnp.max(jnp.abs(grads["offset"]))) > 0
    with pytest.raises(ValueError, match="flow teachers"):
        make_scm_loss(module, (module, params), {"objective": "ddpm"}, SCM, NULL)


def test_trigflow_velocity_of_a_flow_velocity():
    """F = −sin τ x0 + cos τ ε from v = ε − x0 at the flow state of s = sin τ/(cos τ + sin τ)."""
    x0, eps = np.random.default_rng(0).standard_normal((2, 5))
    tau = 0.9
    s = np.sin(tau) / (np.sin(tau) + np.cos(tau))
    y = (1 - s) * x0 + s * eps
    got = trigflow_velocity(jnp.asarray(eps - x0), jnp.asarray(y), s)
    np.testing.assert_allclose(got, -np.sin(tau) * x0 + np.cos(tau) * eps, rtol=1e-5, atol=1e-6)


def test_grids_and_distance():
    from jdit.diffusion import DDPMSchedule, FlowSchedule

    g = flow_grid(FlowSchedule(3.0), 4)
    assert g[0] == 0.0 and g[-1] == 1.0 and np.all(np.diff(g) > 0)
    np.testing.assert_allclose(g[1], 3 * 0.25 / (1 + 2 * 0.25))
    np.testing.assert_array_equal(ddim_grid(DDPMSchedule.linear(), 50)[:4], [-1, 19, 39, 59])
    a = jnp.zeros((2, 3)), jnp.stack([jnp.zeros(3), jnp.full(3, 2.0)])
    np.testing.assert_allclose(pseudo_huber(*a, 0.5), [0.0, np.sqrt(4.25) - 0.5], rtol=1e-6)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_the_loss_runs_for_both_teachers_and_needs_what_it_needs(objective):
    import jdit

    m = jdit.models.build(dict(family="pixart", input_size=8, patch_size=2, in_channels=C,
                               hidden_size=32, depth=1, num_heads=2, caption_channels=2,
                               learn_sigma=objective == "ddpm"))
    p = jdit.models.init_params(m, jax.random.key(0))
    p = jdit.nn.perturbed(p, jax.random.key(1), 0.05)
    batch = {**_batch(2), "images": jax.random.normal(jax.random.key(2), (2, 8, 8, C))}
    loss = make_consistency_loss(m, (m, p), {"objective": objective}, DISTILL, NULL)
    value, grads = jax.jit(jax.value_and_grad(loss))(p, batch, jax.random.key(3), p)
    assert np.isfinite(float(value)) and float(value) > 0
    assert float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))) > 0
    with pytest.raises(ValueError, match="null caption"):
        make_consistency_loss(m, (m, p), {"objective": objective}, DISTILL, None)(
            p, batch, jax.random.key(3), p)
    with pytest.raises(ValueError, match="grid_steps"):
        make_consistency_loss(m, (m, p), {"objective": objective}, {**DISTILL, "grid_steps": 0},
                              NULL)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lcm", "scm"])
def test_a_student_run_starts_from_its_teacher_and_samples_with_its_solver(tmp_path, method):
    """configs/shapes_tiny_lcm.py / _scm.py at toy size: the student starts as the teacher,
    trains, and its run samples with its few-step solver, unguided (eval reads the run's
    config)."""
    from pathlib import Path

    from jdit.config import load_config
    from jdit.train.loop import evaluate, load_trained, train

    root = Path(__file__).resolve().parents[2]
    small = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2",
             "model.caption_channels=16", "data.text_dim=16", "train.batch_size=8",
             "train.log_every=1", "train.sample_every=0"]
    teacher = tmp_path / "teacher"
    train(load_config(root / "configs" / "shapes_tiny.py", small + ["train.steps=4"]), teacher,
          quiet=True)
    extra = ["distill.grid_steps=10"] if method == "lcm" else ["distill.tangent_warmup=2"]
    cfg = load_config(f"{root / 'configs' / f'shapes_tiny_{method}.py'}:{teacher}",
                      small + ["train.steps=3"] + extra)
    assert cfg.sample.solver == method and cfg.sample.guidance_scale == 1.0
    metrics = train(cfg, tmp_path / "student", quiet=True)
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    _, t_params, _ = load_trained(teacher)
    run, s_params, step = load_trained(tmp_path / "student", use_ema=False)
    assert step == 3 and run.config["distill"]["method"] == {"lcm": "consistency"}.get(method,
                                                                                    method)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(s_params), jax.tree.leaves(t_params), strict=True))
    assert 0 < moved < 0.1  # started from the teacher, then trained
    result = evaluate(tmp_path / "student", num_pairs=4, single_repeats=1)
    assert 0.0 <= result["adherence_single"] <= 1.0
