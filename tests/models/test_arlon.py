"""ARLON's video DiT: the injected model starts as the frozen DiT and trains only its new parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jdit.models import build
from jdit.models.arlon import ArlonDiT, arlon_params, trainable_mask, with_injection
from jdit.nn.init import init_params, perturbed

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
            caption_channels=8, learn_sigma=False, video_length=4)


@pytest.fixture(scope="module")
def models():
    dit = build("latte", **TINY)
    # random everywhere (a trained DiT's zero-initialised output layers are no longer zero)
    dit_params = perturbed(init_params(dit, jax.random.key(0)), jax.random.key(3), 0.05)
    arlon = ArlonDiT(dit=with_injection(dit), adapter_width=16, patch_size=2)
    fresh = init_params(arlon, jax.random.key(1))
    return dit, dit_params, arlon, arlon_params(fresh, dit_params)


def _inputs(seed):
    k = jax.random.split(jax.random.key(seed), 4)
    return dict(x=jax.random.normal(k[0], (2, 4, 8, 8, 3)), t=jnp.array([100.0, 900.0]),
                context=jax.random.normal(k[1], (2, 5, 8)),
                context_mask=jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))


def test_injected_dit_equals_the_dit_at_init(models):
    dit, dit_params, arlon, params = models
    inp = _inputs(0)
    base = dit.apply({"params": dit_params}, **inp)
    coarse = jax.random.normal(jax.random.key(9), (2, 4, 8, 8, 3))
    out = arlon.apply({"params": params}, **inp, coarse=coarse)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_only_adapter_and_hooks_train_and_they_change_the_output(models):
    dit, dit_params, arlon, params = models
    mask = traverse_util.flatten_dict(trainable_mask(params))
    trained = {"/".join(k) for k, v in mask.items() if v}
    assert any(k.startswith("adapter/") for k in trained)
    assert sum("hook" in k for k in trained) >= 2 * 2  # every block's gate and modulation
    assert all(k.startswith("adapter/") or "/hook/" in k for k in trained)
    inp = _inputs(1)
    coarse = jax.random.normal(jax.random.key(2), (2, 4, 8, 8, 3))

    def loss(p):
        return jnp.mean(arlon.apply({"params": p}, **inp, coarse=coarse) ** 2)

    grads = traverse_util.flatten_dict(jax.grad(loss)(params))
    gate_grads = [np.abs(np.asarray(g)).max() for k, g in grads.items() if "hook" in k]
    assert max(gate_grads) > 0  # the zero gates learn from the first step
    step = jax.tree.map(lambda p, g, m: p - 0.5 * g * m, params, jax.grad(loss)(params),
                        trainable_mask(params))
    moved = arlon.apply({"params": step}, **inp, coarse=coarse)
    moved2 = arlon.apply({"params": step}, **inp, coarse=-coarse)
    assert float(jnp.max(jnp.abs(moved - moved2))) > 1e-6  # the plan now steers the DiT


def test_bad_inputs_are_refused(models):
    dit, dit_params, arlon, params = models
    inp = _inputs(0)
    with pytest.raises(ValueError, match="needs the coarse latent"):
        arlon.apply({"params": params}, **inp)
    with pytest.raises(ValueError, match="same frames"):
        arlon.apply({"params": params}, **inp, coarse=jnp.zeros((2, 2, 8, 8, 3)))
    with pytest.raises(ValueError, match="injection hooks"):
        ArlonDiT(dit=dit).apply({"params": params}, **inp, coarse=jnp.zeros((2, 4, 8, 8, 3)))
    with pytest.raises(ValueError, match="do not fit"):
        arlon_params(params, {"other": dit_params})
