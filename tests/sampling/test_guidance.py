"""Guidance wrappers: perturbed-attention guidance's combination and adaptive scale."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jdit.sampling import PerturbedAttentionGuidance


def test_pag_combines_three_branches_and_lowers_its_scale_adaptively():
    def model(x, t):  # the branches differ by a constant per row: 1 (uncond), 3 (cond), 2 (ptb)
        b = x.shape[0] // 3
        return x + jnp.repeat(jnp.asarray([1.0, 3.0, 2.0]), b)[:, None]

    x, t = jnp.zeros((2, 4)), jnp.asarray([900.0, 200.0])
    out = PerturbedAttentionGuidance(model)(x, t, 4.0, 1.5)
    np.testing.assert_allclose(out, 1 + 4 * (3 - 1) + 1.5 * (3 - 2))
    adaptive = PerturbedAttentionGuidance(model, adaptive=0.002)(x, t, 4.0, 1.5)
    s = np.maximum(1.5 - 0.002 * (1000 - np.asarray([900.0, 200.0])), 0)  # [1.3, 0]
    np.testing.assert_allclose(adaptive, (9 + s * 1.0)[:, None] * np.ones((2, 4)))

    def two(x, t):  # without CFG: [cond; perturbed]
        b = x.shape[0] // 2
        return x + jnp.repeat(jnp.asarray([3.0, 2.0]), b)[:, None]

    np.testing.assert_allclose(PerturbedAttentionGuidance(two, cfg=False)(x, t, 1.0, 2.0),
                               3 + 2 * (3 - 2))
