"""Evaluating generated digits: class accuracy and a Fréchet distance in a small classifier's features.

Generated images ``(N, size, size, 1)`` in ``[-1, 1]`` (``size`` a multiple of 8) are clipped,
average-pooled back to 8x8 and mapped to the data's 0..16 scale, the resolution the digits were
recorded at. A small MLP trained on the real train split of ``jdit.data.digits`` (the same
round trip applied: upsampled to 32, pooled back) classifies them. Training is minibatch AdamW
with a fixed seed and step count (a few seconds on CPU, mostly compilation, once per process:
the trained classifier is cached). Its accuracy on the real test split is 0.976.

``evaluate`` reports the accuracy of the classifier against the labels the images were
generated for, and the Fréchet distance between the penultimate-layer features of the
generated images and of the real test split ("FID" with this classifier in place of
Inception). ``frechet_distance_real`` is the same distance between the same number of real
train images and the real test split: the floor a perfect generator would reach at that sample
size (the estimate is biased upwards for small samples).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdit.data import digits as data

HIDDEN = (256, 64)  # the last hidden layer gives the features
FEATURE_DIM = HIDDEN[-1]
TRAIN_SEED = 0
TRAIN_STEPS = 600
BATCH_SIZE = 100
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-4
_TRAIN_SIZE = 32  # the round trip the training images go through, as generated ones do


class DigitMLP(nn.Module):
    """8x8 digit (0..16 scale) → logits; ``features=True`` returns the last hidden layer."""

    hidden: tuple[int, ...] = HIDDEN
    num_classes: int = data.NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array, features: bool = False) -> jax.Array:
        h = x.reshape(x.shape[0], -1) / data.MAX_VALUE
        for width in self.hidden:
            h = nn.gelu(nn.Dense(width)(h))
        if features:
            return h
        return nn.Dense(self.num_classes)(h)


def to_raw_scale(images) -> np.ndarray:
    """``(N, size, size[, 1])`` in ``[-1, 1]`` → float32 ``(N, 8, 8)`` on the 0..16 scale.

    Values are clipped to ``[-1, 1]`` and ``size x size`` is average-pooled to 8x8. Non-finite
    values raise ``ValueError``.
    """
    x = np.asarray(images, np.float32)
    if x.ndim == 4:
        if x.shape[-1] != 1:
            raise ValueError(f"expected one channel, got images of shape {x.shape}")
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1] != x.shape[2] or x.shape[1] % data.RAW_SIZE:
        raise ValueError(
            f"expected images (N, size, size, 1) with size a multiple of 8, got {np.shape(images)}")
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    f = x.shape[1] // data.RAW_SIZE
    x = np.clip(x, -1.0, 1.0).reshape(x.shape[0], data.RAW_SIZE, f, data.RAW_SIZE, f)
    return ((x.mean(axis=(2, 4)) + 1.0) * (data.MAX_VALUE / 2)).astype(np.float32)


@functools.cache
def _real_raw_scale(split: str, size: int) -> np.ndarray:
    images, _ = data.load(split, size)
    out = to_raw_scale(images)
    out.setflags(write=False)
    return out


@functools.partial(jax.jit, static_argnames=("features",))
def _apply(params, x, features=False):
    return DigitMLP().apply({"params": params}, x, features=features)


def _batch_indices(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` example indices: epochs of seeded permutations, remainders dropped."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    idx = [rng.permutation(n)[:per_epoch * batch_size].reshape(per_epoch, batch_size)
           for _ in range(epochs)]
    return np.concatenate(idx)[:steps].astype(np.int32)


@functools.lru_cache(maxsize=1)
def classifier_params():
    """The trained classifier's parameters (trained once per process, deterministically).

    AdamW with a cosine-decayed learning rate, ``TRAIN_STEPS`` minibatches of ``BATCH_SIZE``
    drawn as seeded permutations of the real train split, initialised from ``TRAIN_SEED``.
    """
    x = jnp.asarray(_real_raw_scale("train", _TRAIN_SIZE))
    y = jnp.asarray(data.raw("train")[1])
    idx = _batch_indices(x.shape[0], TRAIN_STEPS, BATCH_SIZE, TRAIN_SEED)
    model = DigitMLP()
    params = model.init(jax.random.PRNGKey(TRAIN_SEED), x[:1])["params"]
    opt = optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, TRAIN_STEPS),
                      weight_decay=WEIGHT_DECAY)

    def loss_fn(p, xb, yb):
        logits = model.apply({"params": p}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def step(carry, i):
        p, s = carry
        g = jax.grad(loss_fn)(p, x[i], y[i])
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    @jax.jit
    def train(p, idx):
        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), idx)
        return p

    return jax.device_get(train(params, jnp.asarray(idx)))


def _batched(fn, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    outs = [np.asarray(fn(jnp.asarray(x[i:i + chunk]))) for i in range(0, x.shape[0], chunk)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def _logits_raw(x: np.ndarray) -> np.ndarray:
    params = classifier_params()
    return _batched(lambda b: _apply(params, b), x)


def _features_raw(x: np.ndarray) -> np.ndarray:
    params = classifier_params()
    return _batched(lambda b: _apply(params, b, features=True), x).astype(np.float64)


def predict(images) -> np.ndarray:
    """Predicted classes (int32 ``(N,)``) of images ``(N, size, size, 1)`` in ``[-1, 1]``."""
    return np.argmax(_logits_raw(to_raw_scale(images)), axis=-1).astype(np.int32)


def digit_accuracy(images, labels) -> float:
    """Fraction of images ``(N, size, size, 1)`` in ``[-1, 1]`` classified as their label."""
    labels = np.asarray(labels).reshape(-1)
    pred = predict(images)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.shape[0]} images but {labels.shape[0]} labels")
    return float(np.mean(pred == labels))


def features(images) -> np.ndarray:
    """Penultimate-layer features, float64 ``(N, FEATURE_DIM)``, of images in ``[-1, 1]``."""
    return _features_raw(to_raw_scale(images))


_REFERENCE_SEED = 1


@functools.cache
def _real_features(split: str, size: int) -> np.ndarray:
    """Real features; the train split's come in a fixed random order (prefixes are subsets)."""
    out = _features_raw(_real_raw_scale(split, size))
    if split == "train":
        rng = np.random.default_rng(np.random.SeedSequence(_REFERENCE_SEED))
        out = out[rng.permutation(out.shape[0])]
    out.setflags(write=False)
    return out


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
    """``|mu1 - mu2|² + Tr(C1 + C2 - 2 (C1 C2)^½)``, the Fréchet distance of two Gaussians.

    ``Tr (C1 C2)^½`` is the sum of the square roots of the eigenvalues of ``C1^½ C2 C1^½``
    (symmetric PSD, the same eigenvalues as ``C1 C2``), computed with ``eigh`` in float64, so
    singular covariances (fewer samples than dimensions) need no regularisation.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    c1, c2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or c1.shape != c2.shape or c1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: {mu1.shape}, {c1.shape}, {mu2.shape}, {c2.shape}")
    s1 = _sqrt_psd(c1)
    m = s1 @ c2 @ s1
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)))
    d = mu1 - mu2
    fd = d @ d + np.trace(c1) + np.trace(c2) - 2.0 * tr_sqrt
    return float(max(fd, 0.0))


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` (ddof=1 cov)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"expected two (N >= 2, D) feature sets, got {a.shape} and {b.shape}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False),
                                       b.mean(0), np.cov(b, rowvar=False))


def evaluate(images, labels) -> dict[str, float]:
    """``digit_accuracy``, ``frechet_distance`` (to the real test split) and its real reference.

    ``images``: generated ``(N, size, size, 1)`` in ``[-1, 1]``, ``labels``: the classes they
    were generated for. ``frechet_distance_real`` compares a fixed random subset of
    ``min(N, 1500)`` real train images with the real test split, at the same ``size``: the
    reference a generator matching the data would reach with N samples.
    """
    size = int(np.shape(images)[1])
    feats = features(images)
    if feats.shape[0] < 2:
        raise ValueError("need at least 2 images")
    test = _real_features("test", size)
    train = _real_features("train", size)
    n = min(feats.shape[0], train.shape[0])
    return {
        "digit_accuracy": digit_accuracy(images, labels),
        "frechet_distance": frechet_distance(feats, test),
        "frechet_distance_real": frechet_distance(train[:n], test),
    }
