"""The embedded digits data and its deterministic batches."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from jdit.data import digits

SIZES = {"train": 1500, "test": 297, "all": 1797}


@pytest.mark.parametrize("split", list(SIZES))
def test_load_shapes_dtypes_range(split):
    x, y = digits.load(split)
    n = SIZES[split]
    assert x.shape == (n, 32, 32, 1) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() == 1.0  # blank background and fully-on pixels exist
    assert set(np.unique(y)) == set(range(digits.NUM_CLASSES))
    r, ry = digits.raw(split)
    assert r.shape == (n, 8, 8) and r.dtype == np.uint8 and r.max() == 16
    np.testing.assert_array_equal(ry, y)
    assert not x.flags.writeable  # cached: callers must not be able to corrupt it


def test_split_is_a_fixed_partition():
    (tr, ytr), (te, yte), (al, yal) = digits.raw("train"), digits.raw("test"), digits.raw("all")

    def rows(images, labels):
        r = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
        return r[np.lexsort(r.T[::-1])]

    np.testing.assert_array_equal(rows(np.concatenate([tr, te]), np.concatenate([ytr, yte])),
                                  rows(al, yal))
    # Pinned: a change here changes every reported number.
    assert hashlib.sha256(te.tobytes()).hexdigest().startswith("5f4055aa1e04898d")
    np.testing.assert_array_equal(np.bincount(yte), [39, 37, 26, 33, 24, 34, 25, 28, 26, 25])
    with pytest.raises(ValueError, match="split"):
        digits.load("val")


def test_upsampling():
    r, _ = digits.raw("test")
    x8, _ = digits.load("test", size=8)
    np.testing.assert_array_equal(x8[..., 0], r.astype(np.float32) / 8 - 1)  # size 8: identity
    a = digits.upsample_matrix(32)
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-12)
    assert a.min() >= 0
    const = digits.to_model_space(np.full((1, 8, 8), 16), size=32)
    np.testing.assert_array_equal(const, 1.0)
    # Pooling the 32x32 version back to 8x8 is a mild blur: per axis, 3/4 of each pixel and 1/8
    # of each neighbour (the border pixel replicated).
    x32, _ = digits.load("test", size=32)
    back = x32[..., 0].reshape(-1, 8, 4, 8, 4).mean((2, 4))
    blur = np.eye(8) * 0.75 + np.eye(8, k=1) * 0.125 + np.eye(8, k=-1) * 0.125
    blur[0, 0] = blur[-1, -1] = 0.875
    np.testing.assert_allclose(back, np.einsum("ij,njk,lk->nil", blur, x8[..., 0], blur),
                               atol=1e-6)


def test_batch_deterministic():
    b = digits.batch(3, 7, 16)
    assert b["images"].shape == (16, 32, 32, 1) and b["images"].dtype == np.float32
    assert b["labels"].shape == (16,) and b["labels"].dtype == np.int32
    b2 = digits.batch(3, 7, 16)
    np.testing.assert_array_equal(b["images"], b2["images"])
    np.testing.assert_array_equal(b["labels"], b2["labels"])
    assert not np.array_equal(b["images"], digits.batch(3, 8, 16)["images"])
    assert not np.array_equal(b["images"], digits.batch(4, 7, 16)["images"])
    # The k-th batch of iterate is batch(seed, k), whatever came before.
    it = list(digits.iterate(3, 16, start=6, num_batches=2))
    assert len(it) == 2
    np.testing.assert_array_equal(it[1]["images"], b["images"])
    # Within a batch, examples are drawn without replacement; beyond the split's size, with.
    x = digits.load("test", size=8)[0].reshape(297, -1)
    assert len(np.unique(x, axis=0)) == 297  # the test images are all distinct
    small = digits.batch(0, 0, 50, size=8, split="test")["images"].reshape(50, -1)
    assert len(np.unique(small, axis=0)) == 50
    assert (small[:, None] == x[None]).all(-1).any(1).all()  # they are test images
    assert digits.batch(0, 0, 400, size=8, split="test")["images"].shape == (400, 8, 8, 1)
    with pytest.raises(ValueError):
        digits.batch(-1, 0, 4)
