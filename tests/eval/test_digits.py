"""The digits evaluator: a classifier trained on real digits, its accuracy and Fréchet distance."""

from __future__ import annotations

import numpy as np
import pytest

from jdit.data import digits
from jdit.eval import digits as ev


@pytest.mark.parametrize("size", [8, 32])
def test_classifier_accuracy_on_real_test(size):
    x, y = digits.load("test", size=size)
    acc = ev.digit_accuracy(x, y)
    assert acc >= 0.95, acc


def test_digit_accuracy_as_generated():
    # Real 8x8 test digits presented as a generator's output: upsampled to 32, in [-1, 1].
    r, y = digits.raw("test")
    x = digits.to_model_space(r, 32)
    assert ev.digit_accuracy(x, y) >= 0.95
    assert ev.digit_accuracy(x, (y + 1) % 10) < 0.05
    assert ev.features(x).shape == (len(y), ev.FEATURE_DIM)
    with pytest.raises(ValueError, match="labels"):
        ev.digit_accuracy(x, y[:-1])
    with pytest.raises(ValueError, match="channel"):
        ev.features(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        ev.features(np.full((2, 32, 32, 1), np.nan, np.float32))
    with pytest.raises(ValueError, match="multiple of 8"):
        ev.features(np.zeros((2, 30, 30, 1), np.float32))


def fd_reference(mu1, c1, mu2, c2):
    """Float64 reference: Tr (C1 C2)^½ from the (real, non-negative) eigenvalues of C1 C2."""
    ev_ = np.linalg.eigvals(c1 @ c2)
    tr = np.sum(np.sqrt(np.clip(ev_.real, 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr)


def test_frechet_closed_form_commuting():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = ev.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, closed, rtol=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # same eigenvectors: still commuting
    got = ev.frechet_distance_from_stats(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    np.testing.assert_allclose(got, closed, rtol=1e-9)
    assert ev.frechet_distance_from_stats(mu1, np.diag(a), mu1, np.diag(a)) < 1e-10


def test_frechet_matches_reference_on_gaussian_features():
    rng = np.random.default_rng(1)
    d = 16
    l1, l2 = rng.normal(size=(d, d)), rng.normal(size=(d, d)) * 0.5
    fa = rng.normal(size=(400, d)) @ l1.T + 1.0
    fb = rng.normal(size=(300, d)) @ l2.T
    ref = fd_reference(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    np.testing.assert_allclose(ev.frechet_distance(fa, fb), ref, rtol=1e-8)
    np.testing.assert_allclose(ev.frechet_distance(fa.astype(np.float32), fb), ref, rtol=1e-5)
    # Fewer samples than dimensions: singular covariances need no regularisation.
    few = ev.frechet_distance(fa[:5], fb[:7])
    assert np.isfinite(few) and few > 0


def test_frechet_real_vs_noise():
    x, y = digits.load("test")
    xt, _ = digits.load("train")
    real = ev.frechet_distance(ev.features(xt[:297]), ev.features(x))
    noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
    fake = ev.frechet_distance(ev.features(noise), ev.features(x))
    assert real < 0.05 * fake, (real, fake)
    out = ev.evaluate(x, y)
    assert set(out) == {"digit_accuracy", "frechet_distance", "frechet_distance_real"}
    assert out["digit_accuracy"] >= 0.95
    assert out["frechet_distance"] < 1e-6  # the test split against itself
    assert 0 < out["frechet_distance_real"] < 0.05 * fake
    bad = ev.evaluate(noise, y)
    assert bad["digit_accuracy"] < 0.3 and bad["frechet_distance"] > 20 * out["frechet_distance_real"]
