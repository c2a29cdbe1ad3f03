"""ARLON's AR prior: causal masking, the text prefix and its mask, KV-cached generation equal to
the full forward, sampling options, a tiny model that learns prompt-dependent token sequences,
logical axes and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jdit.models.ar_prior import ARPrior, ar_loss, sample_logits, token_positions
from jdit.nn import LOGICAL_AXES, abstract_params, init_params, perturbed

K, TEXT, B, L, N = 32, 12, 2, 5, 14
PRIOR = ARPrior(codebook_size=K, text_dim=TEXT, grid_hw=(2, 3), width=32, num_layers=2,
                num_heads=2)
MASK = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)


@pytest.fixture(scope="module")
def params():
    return perturbed(init_params(PRIOR, jax.random.key(0)), jax.random.key(1), 0.3)


@pytest.fixture(scope="module")
def forward():
    return jax.jit(lambda p, prefix, mask, tokens: PRIOR.apply({"params": p}, prefix, mask,
                                                               tokens))


def inputs(seed: int = 0):
    prefix = jax.random.normal(jax.random.key(seed), (B, L, TEXT))
    tokens = jax.random.randint(jax.random.key(seed + 1), (B, N), 0, K, jnp.int32)
    return prefix, tokens


def test_logits_at_a_position_never_see_that_token_or_later_ones(params, forward):
    prefix, tokens = inputs()
    base = np.asarray(forward(params, prefix, MASK, tokens))
    assert base.shape == (B, N, K)
    for j in (0, 5, N - 1):
        changed = np.asarray(forward(params, prefix, MASK, tokens.at[:, j].set(
            (tokens[:, j] + 7) % K)))
        np.testing.assert_array_equal(changed[:, : j + 1], base[:, : j + 1])
        if j + 1 < N:  # the change reaches the next prediction (the test can fail)
            assert np.abs(changed[:, j + 1] - base[:, j + 1]).max() > 1e-4


def test_masked_prefix_tokens_change_nothing_and_real_ones_do(params, forward):
    prefix, tokens = inputs()
    base = np.asarray(forward(params, prefix, MASK, tokens))
    masked = prefix.at[0, 3:].set(100.0)  # example 0's padding
    np.testing.assert_array_equal(np.asarray(forward(params, masked, MASK, tokens)), base)
    real = prefix.at[0, 1].add(1.0)
    out = np.asarray(forward(params, real, MASK, tokens))
    assert np.abs(out[0] - base[0]).max() > 1e-4
    np.testing.assert_array_equal(out[1], base[1])  # examples stay independent


def test_kv_cached_generation_equals_the_full_forward(params, forward):
    prefix, _ = inputs(3)
    tokens, logits = PRIOR.generate(params, prefix, MASK, N, jax.random.key(0),
                                    temperature=0.0, return_logits=True)
    assert tokens.shape == (B, N) and tokens.dtype == jnp.int32
    full = np.asarray(forward(params, prefix, MASK, tokens))
    err = np.abs(np.asarray(logits) - full).max()
    assert err <= 1e-5, err
    # greedy: every token is the argmax of the full forward's logits at its position
    np.testing.assert_array_equal(np.asarray(tokens), full.argmax(-1))
    assert len(np.unique(np.asarray(tokens))) > 2  # not a degenerate constant sequence

    # sampled tokens: the cached logits still match the full forward on the drawn sequence
    drawn, logits = PRIOR.generate(params, prefix, MASK, N, jax.random.key(1),
                                   temperature=1.0, return_logits=True)
    full = np.asarray(forward(params, prefix, MASK, drawn))
    assert np.abs(np.asarray(logits) - full).max() <= 1e-5
    one = PRIOR.generate(params, prefix, MASK, 1, jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(tokens[:, :1]))


def test_sampling_temperature_and_top_k():
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]] * 4000))
    keys = jax.random.key(0)
    greedy = sample_logits(keys, logits, jnp.float32(0.0))
    assert (np.asarray(greedy) == 3).all()
    drawn = np.asarray(sample_logits(keys, logits, jnp.float32(1.0)))
    np.testing.assert_allclose(np.bincount(drawn, minlength=4) / len(drawn), [.1, .2, .3, .4],
                               atol=0.03)
    top2 = np.asarray(sample_logits(keys, logits, jnp.float32(1.0), top_k=2))
    assert set(np.unique(top2)) == {2, 3}


def test_positions_follow_the_token_grid():
    pos = np.asarray(token_positions(jnp.arange(L + 1 + 7), L, (2, 3)))
    np.testing.assert_array_equal(pos[:L + 1], np.stack([np.arange(L + 1), 0 * pos[:L + 1, 0],
                                                         0 * pos[:L + 1, 0]], -1))
    # slot L + 1 + j carries video token j at (time, row, col) of a 2 x 3 grid
    expected = [(L + 1 + j // 6, (j // 3) % 2, j % 3) for j in range(6)]
    np.testing.assert_array_equal(pos[L + 1:L + 7], expected)


def test_a_tiny_prior_learns_a_token_sequence_per_prompt():
    prior = ARPrior(codebook_size=16, text_dim=8, grid_hw=(2, 2), width=32, num_layers=2,
                    num_heads=2)
    prefix = jax.random.normal(jax.random.key(0), (2, 3, 8))
    mask = jnp.ones((2, 3), jnp.int32)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 16, jnp.int32)
    params = init_params(prior, jax.random.key(2))
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        (_, m), g = jax.value_and_grad(
            lambda p: ar_loss(prior, p, prefix, mask, tokens), has_aux=True)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, m

    losses = []
    for _ in range(60):
        params, state, metrics = step(params, state)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.05 * losses[0], losses[::10]
    out = prior.generate(params, prefix, mask, 8, jax.random.key(3), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(tokens))


def test_every_parameter_has_logical_axes():
    boxed = abstract_params(PRIOR, boxed=True)
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
        assert set(leaf.names) - {None} <= set(LOGICAL_AXES), (path, leaf.names)


def test_bad_input_gets_clear_errors(params):
    prefix, tokens = inputs()
    apply = PRIOR.apply
    v = {"params": params}
    with pytest.raises(ValueError, match=r"token 32 is outside the codebook \[0, 32\).*another"):
        apply(v, prefix, MASK, tokens.at[1, 2].set(K))
    with pytest.raises(ValueError, match="integer codes"):
        apply(v, prefix, MASK, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"\(B, L, 12\)"):
        apply(v, prefix[..., :6], MASK, tokens)
    with pytest.raises(ValueError, match="prefix_mask"):
        apply(v, prefix, MASK[:, :4], tokens)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        apply(v, prefix, MASK, tokens[:, :0])
    with pytest.raises(ValueError, match="num_tokens"):
        PRIOR.generate(params, prefix, MASK, 0, jax.random.key(0))
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 32\]"):
        PRIOR.generate(params, prefix, MASK, 3, jax.random.key(0), top_k=33)
    with pytest.raises(ValueError, match="rope_axes"):
        init_params(ARPrior(codebook_size=K, text_dim=TEXT, width=32, num_heads=2,
                            rope_axes=(8, 4, 2)), jax.random.key(0))
    # traced tokens from another codebook cannot raise: they give NaN logits, never a real code
    out = jax.jit(lambda t: apply(v, prefix, MASK, t))(tokens.at[0, 3].set(K + 5))
    assert np.isnan(np.asarray(out[0, 4])).all() and np.isfinite(np.asarray(out[1])).all()
