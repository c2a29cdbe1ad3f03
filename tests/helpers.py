"""Shared test helpers: the two error measures, and random PyTorch models for parity tests.

- :func:`rel_err`: the largest error relative to the reference's largest value, the measure of
  the parity bars (models ≤ 1e-4, sampler trajectories ≤ 1e-5).
- :func:`norm_rel_err`: ``‖a − b‖ / ‖b‖`` over all numbers (arrays or whole pytrees), for
  kernels and sharded runs, where a per-element maximum over values near zero says little.
"""

from __future__ import annotations

import jax
import numpy as np


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: error relative to the reference's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def norm_rel_err(a, b) -> float:
    """‖a - b‖ / ‖b‖ over all the numbers of ``a`` and ``b`` (arrays, or pytrees of the same
    structure)."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    num = den = 0.0
    for x, y in pairs:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, (x.shape, y.shape)
        num += float(np.sum((x - y) ** 2))
        den += float(np.sum(y ** 2))
    return (num / (den + 1e-60)) ** 0.5


def _torch():
    import torch

    torch.set_num_threads(2)
    return torch


def randomize(model, seed: int = 0, std: float = 0.1):
    """Overwrite every trainable parameter of a torch module with N(0, std) noise,
    zero-initialised ones included. Frozen parameters (DiT's fixed sin-cos ``pos_embed``) keep
    their values."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def nchw_to_nhwc(x) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()
