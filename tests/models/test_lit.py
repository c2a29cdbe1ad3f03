"""LiT: a linear-attention student inherits a PixArt teacher's weights and is distilled from it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdit
from jdit.models import lit
from jdit.nn import perturbed
from jdit.train.step import make_loss_fn
from jdit.weights.state_dict import flatten

TEACHER = dict(family="pixart", input_size=8, patch_size=2, in_channels=4, hidden_size=64,
               depth=2, num_heads=4, caption_channels=16, learn_sigma=True)


def noisy(params, seed):
    """Random weights everywhere (the zero-initialised output layers included)."""
    return perturbed(params, jax.random.key(seed), 0.1)


def teacher_and_student(learn_sigma=True):
    teacher = jdit.models.build({**TEACHER, "learn_sigma": learn_sigma})
    t_params = noisy(jdit.models.init_params(teacher, jax.random.key(0)), 10)
    student = jdit.models.build(lit.student_config(TEACHER, linear_heads=2, linear_v_conv=5))
    return teacher, t_params, student


def test_student_inherits_everything_but_the_self_attention():
    teacher, t_params, student = teacher_and_student()
    assert student.self_attention == "linear" and student.linear_heads == 2
    params, report = lit.inherit(t_params, student, jax.random.key(1))
    flat_t, flat_s = flatten(t_params), flatten(params)
    assert report["initialised"] and all(p.split("/")[1] == "attn" for p in report["initialised"])
    assert {p.split("/")[1] for p in report["inherited"]} >= {"mlp", "cross_attn"}
    for path in report["inherited"]:
        np.testing.assert_array_equal(flat_s[path], flat_t[path])
    # the teacher's softmax attention (4 heads) found no home: reported, not silently dropped
    assert "block_0/attn/qkv/kernel" in report["initialised"]
    assert set(report["inherited"]) | set(report["initialised"]) == set(flat_s)
    out = jax.jit(student.apply)({"params": params}, **student.example_inputs(2))
    assert out.shape == (2, 8, 8, 8) and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match="PixArt teachers"):
        lit.student_config({"family": "dit"})


def _batch(rng):
    k1, k2 = jax.random.split(rng)
    return {"images": jax.random.normal(k1, (2, 8, 8, 4)),
            "context": jax.random.normal(k2, (2, 5, 16)),
            "context_mask": jnp.ones((2, 5), jnp.int32)}


@pytest.mark.parametrize("objective", [pytest.param("ddpm", marks=pytest.mark.slow), "flow"])
def test_distillation_adds_the_teacher_terms(objective):
    teacher, t_params, _ = teacher_and_student(learn_sigma=objective == "ddpm")
    diffusion = {"objective": objective, "flow_shift": 3.0}
    batch, rng = _batch(jax.random.key(2)), jax.random.key(3)
    plain = make_loss_fn(teacher, diffusion, 0.0, None)
    taught = make_loss_fn(teacher, diffusion, 0.0, None, (teacher, t_params),
                          {"output_weight": 0.5, "variance_weight": 0.05})
    double = make_loss_fn(teacher, diffusion, 0.0, None, (teacher, t_params),
                          {"output_weight": 1.0, "variance_weight": 0.1})
    # the three losses in one program: the student and teacher forwards are computed once
    losses = jax.jit(lambda p: tuple(f(p, batch, rng) for f in (plain, taught, double)))
    # the teacher distilling into itself adds nothing
    base, with_teacher, _ = (float(x) for x in losses(t_params))
    assert with_teacher == pytest.approx(base, rel=1e-6)
    base, with_teacher, doubled = (float(x) for x in losses(noisy(t_params, 9)))
    gap = with_teacher - base
    assert gap > 0
    # the weights are what the config says: doubling both doubles the gap
    assert doubled - base == pytest.approx(2 * gap, rel=1e-4)
