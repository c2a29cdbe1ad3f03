"""grain input pipelines over random-access sources, checkpointable and sharded per host.

Two pipelines, both ``grain.IterDataset``s of batches (dicts of numpy arrays)::

    ds = make_dataset(source, batch_size=32, image_size=(256, 256), seed=0)
    sampler = BucketBatchSampler(source.sizes(), 32, table=512, seed=0,
                                 shard_index=jax.process_index(), shard_count=jax.process_count())
    ds = make_bucketed_dataset(source, sampler)      # each batch from one aspect-ratio bucket

    it = iter(ds)
    batch = next(it)
    state = it.get_state()       # JSON-serialisable; save it with the model checkpoint
    it = iter(ds); it.set_state(state)   # resumes with exactly the batches that came next

A source is anything with ``len`` and ``__getitem__`` returning dicts: :mod:`jdit.data.sources`,
:class:`jdit.data.cache.FeatureCache`, a list. Images (uint8 HWC) are resized so that they cover
the target size, center-cropped to it, and scaled to float32 in [-1, 1]; ``original_size``
(int32 ``[height, width]`` before resizing; PixArt-α's resolution micro-condition) is added.

Multi-host: every process builds the same pipeline with its own ``shard_index`` (default
``jax.process_index()``) and ``shard_count`` (default ``jax.process_count()``) and reads only
its shard; its batches are its part of the global batch (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jdit.data.buckets import BucketBatchSampler
from jdit.data.sources import require

Example = dict[str, Any]


RESAMPLE = ("bicubic", "lanczos")


def resize_center_crop(image: np.ndarray, height: int, width: int, *,
                       resample: str = "bicubic") -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (height, width, C), as PixArt's and SANA's data pipelines do it.

    The side whose scale is larger is resized to its target exactly and the other one to
    ``int(side * scale)`` (truncated), with Pillow's bicubic (PixArt-Σ uses Lanczos for its 2K
    and 2880 tables: ``resample="lanczos"``); then torchvision's ``CenterCrop``: the crop's
    offset is ``round((size - target) / 2)`` (ties to even); a side short of its target (float
    rounding; no case is known) would be zero-padded first, as torchvision does. ``tests/data/test_resize.py`` compares this with
    ``torchvision.transforms`` pixel for pixel.
    """
    pil = require("PIL.Image", "jdit.data.loader.resize_center_crop")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected a uint8 image (H, W, 1|3), got {image.dtype} {image.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got ({height}, {width})")
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {RESAMPLE}, got {resample!r}")
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    if height / h > width / w:
        nh, nw = height, int(w * height / h)
    else:
        nh, nw = int(h * width / w), width
    nh, nw = max(nh, 1), max(nw, 1)
    out = image
    if (nh, nw) != (h, w):
        im = pil.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        filt = pil.Resampling.BICUBIC if resample == "bicubic" else pil.Resampling.LANCZOS
        out = np.asarray(im.resize((nw, nh), resample=filt)).reshape(nh, nw, image.shape[-1])
    if nh < height or nw < width:  # torchvision pads (zeros) before cropping
        top, left = max(height - nh, 0) // 2, max(width - nw, 0) // 2
        out = np.pad(out, ((top, max(height - nh, 0) - top), (left, max(width - nw, 0) - left),
                           (0, 0)))
        nh, nw = out.shape[:2]
    top, left = int(round((nh - height) / 2.0)), int(round((nw - width) / 2.0))
    return np.ascontiguousarray(out[top: top + height, left: left + width])


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return np.asarray(image, np.float32) / np.float32(127.5) - np.float32(1.0)


def preprocess_image(example: Mapping[str, Any], size: tuple[int, int], *,
                     image_key: str = "image") -> Example:
    """``example`` with ``image`` resized/cropped to ``size`` in [-1, 1] and ``original_size``."""
    out = dict(example)
    image = np.asarray(out[image_key])
    out["original_size"] = np.array(image.shape[:2], np.int32)
    out[image_key] = to_unit_range(resize_center_crop(image, int(size[0]), int(size[1])))
    return out


def stack_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stack a list of example dicts into a batch dict (strings become a numpy str array)."""
    if not examples:
        raise ValueError("cannot batch zero examples")
    keys = list(examples[0])
    out: dict[str, np.ndarray] = {}
    for key in keys:
        values = []
        for ex in examples:
            if key not in ex or set(ex) != set(keys):
                raise ValueError(f"examples of one batch have different keys: {sorted(keys)} vs "
                                 f"{sorted(ex)}")
            values.append(ex[key])
        if all(isinstance(v, str) for v in values):
            out[key] = np.array(values, dtype=np.str_)
            continue
        arrays = [np.asarray(v) for v in values]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"examples of one batch have different shapes for {key!r}: "
                             f"{sorted(shapes)}; give image_size, or batch by bucket "
                             "(make_bucketed_dataset)")
        out[key] = np.stack(arrays)
    return out


def shard_bounds(num_examples: int, shard_index: int, shard_count: int, *,
                 even: bool = True) -> tuple[int, int]:
    """``[start, stop)`` of shard ``shard_index``: contiguous, balanced ranges.

    ``even=True`` gives every shard ``num_examples // shard_count`` examples (dropping at most
    ``shard_count - 1``), so that all hosts run the same number of steps per epoch; ``even=False``
    covers every example (shard sizes then differ by at most one).
    """
    if not (isinstance(shard_count, (int, np.integer)) and shard_count >= 1
            and isinstance(shard_index, (int, np.integer)) and 0 <= shard_index < shard_count):
        raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index!r}, "
                         f"shard_count={shard_count!r}")
    if even:
        per = num_examples // shard_count
        return shard_index * per, (shard_index + 1) * per
    return (shard_index * num_examples // shard_count,
            (shard_index + 1) * num_examples // shard_count)


def _shard_args(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither (then: this JAX "
                         "process's index and the process count)")
    if shard_index is None:
        import jax

        return jax.process_index(), jax.process_count()
    return int(shard_index), int(shard_count)


def _finish(ds, worker_count: int):
    grain = require("grain", "jdit.data.loader")
    if worker_count > 0:
        # grain reads absl flags when it starts workers, which fails while they are unparsed
        # (scripts not run through absl.app): google/grain issue 1355. Their defaults are fine.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


def make_dataset(source: Any, batch_size: int, *, image_size: tuple[int, int] | int | None = None,
                 transform: Callable[[Example], Example] | None = None, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 shard_index: int | None = None, shard_count: int | None = None,
                 even_shards: bool = True, drop_remainder: bool = True, image_key: str = "image",
                 num_threads: int = 4, prefetch: int = 8, worker_count: int = 0):
    """A ``grain.IterDataset`` of batches of ``batch_size`` examples of this host's shard.

    Order: this shard's examples (:func:`shard_bounds`) shuffled with ``seed`` (a new
    permutation each epoch, deterministic), repeated ``num_epochs`` times (``None``: forever),
    each example preprocessed (``image_size`` ``(height, width)`` or ``int``: resize, crop, scale
    to [-1, 1]; then ``transform``), batched (a batch may straddle two epochs;
    ``drop_remainder`` drops a short last batch of a finite pipeline). ``num_threads`` threads
    prepare ``prefetch`` batches ahead; ``worker_count > 0`` moves that work to as many processes.
    Batch ``k`` depends only on ``k`` (and the arguments above), not on threads or workers.
    ``iter(ds).get_state()`` / ``.set_state(state)`` checkpoint and resume the iteration exactly
    (resume with the same ``worker_count``: the state's layout depends on it).
    """
    grain = require("grain", "jdit.data.loader")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs!r}")
    shard_index, shard_count = _shard_args(shard_index, shard_count)
    start, stop = shard_bounds(len(source), shard_index, shard_count, even=even_shards)
    if stop - start < 1:
        raise ValueError(f"shard {shard_index} of {shard_count} of a source of {len(source)} "
                         "examples is empty")
    if isinstance(image_size, (int, np.integer)):
        image_size = (int(image_size), int(image_size))

    def prepare(example: Example) -> Example:
        if image_size is not None:
            example = preprocess_image(example, image_size, image_key=image_key)
        if transform is not None:
            example = transform(example)
        return example

    ds = grain.MapDataset.source(source).slice(slice(start, stop))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if image_size is not None or transform is not None:
        ds = ds.map(prepare)
    # Batching before to_iter_dataset makes batch k a function of k alone: the same batches for
    # any num_threads and worker_count (threads and workers each prepare whole batches).
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder, batch_fn=stack_examples)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))
    return _finish(ds, worker_count)


class _LoadBatch:
    """Read the examples of one :class:`BucketBatch` and stack them (picklable for workers)."""

    def __init__(self, source, transform, resize_images: bool, image_key: str):
        self.source, self.transform = source, transform
        self.resize_images, self.image_key = resize_images, image_key

    def __call__(self, batch) -> dict[str, np.ndarray]:
        examples = []
        for i in batch.indices.tolist():
            ex = self.source[i]
            if self.resize_images and self.image_key in ex:
                ex = preprocess_image(ex, batch.bucket, image_key=self.image_key)
            if self.transform is not None:
                ex = self.transform(ex)
            examples.append(ex)
        out = stack_examples(examples)
        out["bucket"] = np.array(batch.bucket, np.int32)
        return out


def make_bucketed_dataset(source: Any, sampler: BucketBatchSampler, *,
                          transform: Callable[[Example], Example] | None = None,
                          resize_images: bool = True, num_epochs: int | None = None,
                          image_key: str = "image", num_threads: int = 2, prefetch: int = 4,
                          worker_count: int = 0):
    """A ``grain.IterDataset`` of the batches of ``sampler``, each from one aspect-ratio bucket.

    The sampler fixes the examples of every step (and this host's shard of them); each example's
    image is resized/cropped to the batch's bucket and scaled to [-1, 1] (``resize_images``), then
    ``transform`` runs. Batches carry ``bucket`` (int32 ``[height, width]``). ``num_threads``
    threads prepare ``prefetch`` batches ahead. For a :class:`jdit.data.cache.FeatureCache` build the
    sampler from ``cache.sizes()`` with ``table=None``: latents are then batched by their shape.
    Checkpoint and resume with ``get_state`` / ``set_state`` of the iterator, as for
    :func:`make_dataset`.
    """
    grain = require("grain", "jdit.data.loader")
    if not isinstance(sampler, BucketBatchSampler):
        raise TypeError(f"sampler must be a BucketBatchSampler, got {type(sampler).__name__}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs!r}")
    if len(sampler.bucket_of) != len(source):
        raise ValueError(f"the sampler was built for {len(sampler.bucket_of)} examples, the source "
                         f"has {len(source)}")
    if num_epochs is None:
        steps = grain.MapDataset.range(len(sampler)).repeat(None)
    else:
        steps = grain.MapDataset.range(len(sampler) * num_epochs)
    ds = steps.map_with_index(_StepToBatch(sampler))
    ds = ds.map(_LoadBatch(source, transform, resize_images, image_key))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))
    return _finish(ds, worker_count)


class _StepToBatch:
    def __init__(self, sampler: BucketBatchSampler):
        self.sampler = sampler

    def __call__(self, step: int, _: Any):
        return self.sampler.batch(step)
