"""The 8x8 handwritten digits (UCI optdigits, as bundled by scikit-learn), upsampled for diffusion.

1797 grayscale digits, pixel values 0..16, 10 classes; the data ship with jdit in
``assets/digits.npz`` (provenance and licenses in ``assets/DIGITS_LICENSE.txt``), so no download
and no scikit-learn are needed. ``load`` gives a fixed train/test split (1500 / 297, one seeded
permutation, the same on every machine) as float32 images of shape ``(N, size, size, 1)`` in
``[-1, 1]``, upsampled from 8x8 bilinearly. ``batch(seed, k, ...)`` is the k-th training batch of
a seeded stream and depends only on ``(seed, k)``, so a run resumed at step k sees the same data.

The arrays returned by ``load`` and ``raw`` are cached and read-only; copy them to modify them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np

NUM_CLASSES = 10
RAW_SIZE = 8
MAX_VALUE = 16  # raw pixels count "on" pixels in a 4x4 block of the original 32x32 bitmap
NUM_TEST = 297
SPLITS = ("train", "test", "all")
_SPLIT_SEED = 20240917  # fixed: changing it changes the split
_ASSET = os.path.join(os.path.dirname(__file__), "assets", "digits.npz")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.cache
def _raw_all() -> tuple[np.ndarray, np.ndarray]:
    with np.load(_ASSET) as f:
        images, labels = f["images"], f["target"]
    assert images.shape == (1797, RAW_SIZE, RAW_SIZE) and labels.shape == (1797,)
    return _readonly(images.astype(np.uint8)), _readonly(labels.astype(np.int32))


@functools.cache
def _split_indices(split: str) -> np.ndarray:
    n = _raw_all()[1].shape[0]
    if split == "all":
        return _readonly(np.arange(n))
    perm = np.random.default_rng(np.random.SeedSequence(_SPLIT_SEED)).permutation(n)
    idx = perm[:NUM_TEST] if split == "test" else perm[NUM_TEST:]
    return _readonly(np.sort(idx))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def raw(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The split's original images, uint8 ``(N, 8, 8)`` in 0..16, and int32 labels ``(N,)``."""
    _check_split(split)
    images, labels = _raw_all()
    idx = _split_indices(split)
    return _readonly(images[idx]), _readonly(labels[idx])


@functools.cache
def upsample_matrix(size: int) -> np.ndarray:
    """``(size, 8)`` float64 matrix of 1-D linear interpolation from 8 pixels to ``size``.

    Pixel centres are aligned (half-pixel convention) and the border pixels are extended, so
    rows are convex combinations: values stay within the input range, and a constant image
    stays constant. An image upsamples as ``A @ x @ A.T``.
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    src = (np.arange(size) + 0.5) * (RAW_SIZE / size) - 0.5
    src = np.clip(src, 0.0, RAW_SIZE - 1)
    lo = np.minimum(np.floor(src).astype(np.int64), RAW_SIZE - 2)
    frac = src - lo
    a = np.zeros((size, RAW_SIZE))
    a[np.arange(size), lo] = 1.0 - frac
    a[np.arange(size), lo + 1] += frac
    return _readonly(a)


def to_model_space(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Raw 0..16 images ``(N, 8, 8)`` → float32 ``(N, size, size, 1)`` in ``[-1, 1]`` (bilinear)."""
    images = np.asarray(images, np.float64)
    if images.ndim != 3 or images.shape[1:] != (RAW_SIZE, RAW_SIZE):
        raise ValueError(f"expected raw images of shape (N, 8, 8), got {images.shape}")
    a = upsample_matrix(size)
    up = np.einsum("ij,njk,lk->nil", a, images, a)
    out = up * (2.0 / MAX_VALUE) - 1.0
    return np.clip(out, -1.0, 1.0).astype(np.float32)[..., None]


@functools.cache
def _load_cached(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = raw(split)
    return _readonly(to_model_space(images, size)), labels


def load(split: str = "train", size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a split: float32 ``(N, size, size, 1)`` in ``[-1, 1]``, int32 ``(N,)``.

    ``split``: ``"train"`` (1500 images), ``"test"`` (297) or ``"all"`` (1797). The split is a
    fixed seeded permutation of the 1797 images (not the UCI train/test split: scikit-learn ships
    only the UCI test writers). Cached and read-only.
    """
    _check_split(split)
    return _load_cached(split, int(size))


def batch(seed: int, index: int, batch_size: int, size: int = 32,
          split: str = "train") -> dict[str, np.ndarray]:
    """Batch number ``index`` of the stream ``seed``: ``{"images", "labels"}`` as ``load`` gives.

    The examples are drawn without replacement within the batch (with replacement if
    ``batch_size`` exceeds the split) by a generator seeded with ``SeedSequence([seed, index])``,
    so the batch depends only on ``(seed, index)``, not on which batches came before.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got {seed}, {index}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images, labels = load(split, size)
    n = labels.shape[0]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    idx = rng.choice(n, size=batch_size, replace=batch_size > n)
    return {"images": images[idx], "labels": labels[idx]}


def iterate(seed: int, batch_size: int, size: int = 32, split: str = "train", start: int = 0,
            num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``batch(seed, k, ...)`` for ``k = start, start + 1, ...`` (forever by default)."""
    k = start
    while num_batches is None or k < start + num_batches:
        yield batch(seed, k, batch_size, size=size, split=split)
        k += 1
