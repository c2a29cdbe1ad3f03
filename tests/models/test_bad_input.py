"""Bad inputs get a ValueError that says what was expected."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jdit

PIXART = jdit.models.build("pixart", input_size=8, hidden_size=48, depth=1, num_heads=4,
                           caption_channels=16)
DIT = jdit.models.build("dit", input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def pixart_params():
    return jdit.models.init_params(PIXART, jax.random.key(0))


@pytest.fixture(scope="module")
def dit_params():
    return jdit.models.init_params(DIT, jax.random.key(0))


def good_pixart():
    return dict(x=jnp.zeros((2, 8, 8, 4)), t=jnp.zeros((2,)), context=jnp.zeros((2, 5, 16)),
                context_mask=jnp.ones((2, 5)))


@pytest.mark.parametrize("change,message", [
    (dict(x=jnp.zeros((8, 8, 4))), r"x must be NHWC latents of shape \(B, H, W, 4\), got shape \(8, 8, 4\)"),
    (dict(x=jnp.zeros((2, 4, 8, 8))), r"x must have 4 channels in the last axis \(NHWC\)"),
    (dict(x=jnp.zeros((2, 9, 8, 4))), r"multiples of patch_size 2, got 9x8"),
    (dict(t=jnp.zeros(())), r"t must have shape \(2,\), got \(\)"),
    (dict(t=jnp.zeros((2, 1))), r"t must have shape \(2,\), got \(2, 1\)"),
    (dict(context=jnp.zeros((2, 5, 32))), r"context must be text features of shape \(2, L, 16\)"),
    (dict(context=jnp.zeros((1, 5, 16))), r"context must be text features of shape \(2, L, 16\)"),
    (dict(context_mask=jnp.ones((2, 6))), r"context_mask must have shape \(2, 5\), got \(2, 6\)"),
    (dict(context_mask=jnp.ones((5,))), r"context_mask must have shape \(2, 5\)"),
    (dict(resolution=jnp.ones((2, 2))), r"micro_condition is False"),
])
def test_pixart_rejects(pixart_params, change, message):
    with pytest.raises(ValueError, match=message):
        PIXART.apply({"params": pixart_params}, **{**good_pixart(), **change})


def test_pixart_micro_conditions_required():
    module = PIXART.clone(micro_condition=True)
    with pytest.raises(ValueError, match=r"needs resolution \(B, 2\) and aspect_ratio \(B, 1\)"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), **good_pixart()))
    with pytest.raises(ValueError, match=r"aspect_ratio must have shape \(2, 1\)"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), **good_pixart(),
                                           resolution=jnp.ones((2, 2)), aspect_ratio=jnp.ones((2,))))


@pytest.mark.parametrize("kwargs,message", [
    (dict(x=jnp.zeros((2, 8, 8, 3))), r"x must have 4 channels"),
    (dict(labels=jnp.zeros((2,), jnp.float32)), r"labels must be integer class ids"),
    (dict(labels=jnp.zeros((3,), jnp.int32)), r"labels must have shape \(2,\)"),
    (dict(x=jnp.zeros((2, 8, 7, 4))), r"multiples of patch_size 2, got 8x7"),
])
def test_dit_rejects(dit_params, kwargs, message):
    good = dict(x=jnp.zeros((2, 8, 8, 4)), t=jnp.zeros((2,)), labels=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=message):
        DIT.apply({"params": dit_params}, **{**good, **kwargs})


@pytest.mark.parametrize("family,fields,message", [
    ("pixart", dict(hidden_size=50, num_heads=4), "divisible by num_heads"),
    ("pixart", dict(hidden_size=40, num_heads=4, micro_condition=True), "divisible by 3"),
    ("pixart", dict(kv_compress="pool"), "kv_compress must be None or one of"),
    ("pixart", dict(kv_compress="conv", kv_compress_layers=(30,)), r"must lie in \[0, 28\)"),
    ("pixart", dict(hidden_dim=5), "unknown pixart config keys"),
    ("dit", dict(dtype="float8"), "dtype must be one of"),
    ("unet", {}, "unknown model family 'unet'"),
])
def test_bad_configs(family, fields, message):
    with pytest.raises(ValueError, match=message):
        jdit.models.build(family, **fields)
