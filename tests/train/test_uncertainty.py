"""ARLON's uncertainty sampling: token corruption replaces the requested fraction with other
codes in range, feature noise has a per-example scale in [0, max_std], both jit, and the
training default is feature-level only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit.train.uncertainty import UncertaintySampling, corrupt_tokens, perturb_features

K = 16


def tokens(b: int = 4, grid=(8, 4, 4), seed: int = 0):
    return jax.random.randint(jax.random.key(seed), (b, *grid), 0, K, jnp.int32)


def test_exact_corruption_replaces_that_many_tokens_with_other_codes_in_range():
    x = tokens()
    out = np.asarray(jax.jit(corrupt_tokens, static_argnums=2)(jax.random.key(1), x, K, 0.2))
    assert out.shape == x.shape and out.dtype == np.int32
    assert out.min() >= 0 and out.max() < K
    changed = (out != np.asarray(x)).reshape(4, -1)
    np.testing.assert_array_equal(changed.sum(1), [round(0.2 * 128)] * 4)  # 26 of 128 each
    # different examples (and different keys) corrupt different positions
    assert not (changed[0] == changed[1]).all()
    again = np.asarray(corrupt_tokens(jax.random.key(2), x, K, 0.2))
    assert not ((again != np.asarray(x)) == (out != np.asarray(x))).all()
    np.testing.assert_array_equal(np.asarray(corrupt_tokens(jax.random.key(1), x, K, 0.0)), x)
    assert (np.asarray(corrupt_tokens(jax.random.key(1), x, K, 1.0)) != np.asarray(x)).all()


def test_per_example_fractions_and_bernoulli_mode():
    x = tokens(b=3)
    out = np.asarray(corrupt_tokens(jax.random.key(0), x, K, jnp.array([0.0, 0.5, 1.0])))
    np.testing.assert_array_equal((out != np.asarray(x)).reshape(3, -1).sum(1), [0, 64, 128])
    big = jnp.zeros((8, 4096), jnp.int32)
    out = np.asarray(corrupt_tokens(jax.random.key(3), big, K, 0.2, exact=False))
    frac = (out != 0).mean(1)
    assert np.all(np.abs(frac - 0.2) < 0.03), frac


def test_replacements_are_uniform_over_the_other_codes_and_positions():
    x = jnp.zeros((2000, 10), jnp.int32)
    out = np.asarray(corrupt_tokens(jax.random.key(0), x, 8, 0.3))
    new = out[out != 0]
    counts = np.bincount(new, minlength=8)
    assert counts[0] == 0 and len(new) == 2000 * 3
    np.testing.assert_allclose(counts[1:] / len(new), 1 / 7, atol=0.015)
    np.testing.assert_allclose((out != 0).mean(0), 0.3, atol=0.04)  # every position alike


def test_feature_noise_has_a_per_example_scale_up_to_max_std():
    x = jnp.ones((64, 2, 8, 8, 4), jnp.bfloat16)
    out = jax.jit(perturb_features)(jax.random.key(0), x, 0.5)
    assert out.shape == x.shape and out.dtype == jnp.bfloat16
    std = np.asarray((out.astype(jnp.float32) - 1.0).reshape(64, -1).std(1))
    assert std.max() <= 0.5 * 1.1 and std.min() < 0.1 and std.max() > 0.4, std
    assert np.corrcoef(np.sort(std), np.linspace(0, 0.5, 64))[0, 1] > 0.95  # about uniform
    np.testing.assert_array_equal(np.asarray(perturb_features(jax.random.key(0), x, 0.0)),
                                  np.asarray(x))


def test_the_training_default_perturbs_features_only():
    u = UncertaintySampling()
    assert u.token_fraction == 0.0 and u.feature_max_std == 0.5
    x = tokens()
    assert u.tokens(jax.random.key(0), x, K) is x
    coarse = jnp.zeros((4, 8, 8, 8, 3))
    assert float(jnp.abs(u.features(jax.random.key(0), coarse)).max()) > 0

    both = UncertaintySampling(feature_max_std=0.0, token_fraction=0.3)
    out = np.asarray(jax.jit(lambda k, t: both.tokens(k, t, K))(jax.random.key(1), x))
    frac = (out != np.asarray(x)).reshape(4, -1).mean(1)
    assert np.all(frac <= 0.3 + 1 / 128) and frac.max() > 0, frac
    assert both.features(jax.random.key(0), coarse) is coarse


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        corrupt_tokens(jax.random.key(0), tokens(), K, 1.5)
    with pytest.raises(ValueError, match="at least 2 codes"):
        corrupt_tokens(jax.random.key(0), tokens(), 1, 0.2)
    with pytest.raises(ValueError, match="integer tokens"):
        corrupt_tokens(jax.random.key(0), tokens().astype(jnp.float32), K, 0.2)
    with pytest.raises(ValueError, match=r"scalar or \(4,\)"):
        corrupt_tokens(jax.random.key(0), tokens(), K, jnp.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="token_fraction"):
        UncertaintySampling(token_fraction=2.0)
    with pytest.raises(ValueError, match="feature_max_std"):
        UncertaintySampling(feature_max_std=-1.0)
