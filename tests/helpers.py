"""Shared test helpers: random PyTorch models and error measures."""

from __future__ import annotations

import numpy as np
import torch

torch.set_num_threads(2)


def randomize(model: "torch.nn.Module", seed: int = 0, std: float = 0.1) -> "torch.nn.Module":
    """Overwrite every trainable parameter with N(0, std) noise, zero-initialised ones included.

    Frozen parameters (DiT's fixed sin-cos ``pos_embed``) keep their values.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: error relative to the reference's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nchw_to_nhwc(x: "torch.Tensor") -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()
