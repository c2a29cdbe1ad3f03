"""PixArt aspect-ratio buckets and a sampler whose batches each come from one bucket.

Multi-aspect training (PixArt-α/Σ) resizes every image to the bucket of a fixed table whose
aspect ratio ``h / w`` is nearest to the image's, and builds each batch from one bucket, so that
a batch is one static shape. The tables below are the published ones.

Tables: ``{ratio: (height, width)}`` with the ratio key a string, as in diffusers. The numbers are
those of PixArt-α/Σ as diffusers ships them (``ASPECT_RATIO_256_BIN``, ``ASPECT_RATIO_512_BIN``,
``ASPECT_RATIO_1024_BIN`` in ``diffusers/pipelines/pixart_alpha/pipeline_pixart_alpha.py`` and
``ASPECT_RATIO_2048_BIN`` in ``.../pipeline_pixart_sigma.py``, diffusers 0.42.1; originally from
PixArt-alpha's ``diffusion/data/datasets/utils.py``), stored here as integers.
``tests/data/test_buckets.py`` compares them with the installed diffusers.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

ASPECT_RATIO_256: dict[str, tuple[int, int]] = {
    "0.25": (128, 512), "0.28": (128, 464), "0.32": (144, 448), "0.33": (144, 432),
    "0.35": (144, 416), "0.4": (160, 400), "0.42": (160, 384), "0.48": (176, 368),
    "0.5": (176, 352), "0.52": (176, 336), "0.57": (192, 336), "0.6": (192, 320),
    "0.68": (208, 304), "0.72": (208, 288), "0.78": (224, 288), "0.82": (224, 272),
    "0.88": (240, 272), "0.94": (240, 256), "1.0": (256, 256), "1.07": (256, 240),
    "1.13": (272, 240), "1.21": (272, 224), "1.29": (288, 224), "1.38": (288, 208),
    "1.46": (304, 208), "1.67": (320, 192), "1.75": (336, 192), "2.0": (352, 176),
    "2.09": (368, 176), "2.4": (384, 160), "2.5": (400, 160), "3.0": (432, 144),
    "4.0": (512, 128),
}

ASPECT_RATIO_512: dict[str, tuple[int, int]] = {
    "0.25": (256, 1024), "0.28": (256, 928), "0.32": (288, 896), "0.33": (288, 864),
    "0.35": (288, 832), "0.4": (320, 800), "0.42": (320, 768), "0.48": (352, 736),
    "0.5": (352, 704), "0.52": (352, 672), "0.57": (384, 672), "0.6": (384, 640),
    "0.68": (416, 608), "0.72": (416, 576), "0.78": (448, 576), "0.82": (448, 544),
    "0.88": (480, 544), "0.94": (480, 512), "1.0": (512, 512), "1.07": (512, 480),
    "1.13": (544, 480), "1.21": (544, 448), "1.29": (576, 448), "1.38": (576, 416),
    "1.46": (608, 416), "1.67": (640, 384), "1.75": (672, 384), "2.0": (704, 352),
    "2.09": (736, 352), "2.4": (768, 320), "2.5": (800, 320), "3.0": (864, 288),
    "4.0": (1024, 256),
}

ASPECT_RATIO_1024: dict[str, tuple[int, int]] = {
    "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728),
    "0.35": (576, 1664), "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472),
    "0.5": (704, 1408), "0.52": (704, 1344), "0.57": (768, 1344), "0.6": (768, 1280),
    "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152), "0.82": (896, 1088),
    "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
    "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832),
    "1.46": (1216, 832), "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704),
    "2.09": (1472, 704), "2.4": (1536, 640), "2.5": (1600, 640), "3.0": (1728, 576),
    "4.0": (2048, 512),
}

ASPECT_RATIO_2048: dict[str, tuple[int, int]] = {
    "0.25": (1024, 4096), "0.26": (1024, 3968), "0.27": (1024, 3840), "0.28": (1024, 3712),
    "0.32": (1152, 3584), "0.33": (1152, 3456), "0.35": (1152, 3328), "0.4": (1280, 3200),
    "0.42": (1280, 3072), "0.48": (1408, 2944), "0.5": (1408, 2816), "0.52": (1408, 2688),
    "0.57": (1536, 2688), "0.6": (1536, 2560), "0.68": (1664, 2432), "0.72": (1664, 2304),
    "0.78": (1792, 2304), "0.82": (1792, 2176), "0.88": (1920, 2176), "0.94": (1920, 2048),
    "1.0": (2048, 2048), "1.07": (2048, 1920), "1.13": (2176, 1920), "1.21": (2176, 1792),
    "1.29": (2304, 1792), "1.38": (2304, 1664), "1.46": (2432, 1664), "1.67": (2560, 1536),
    "1.75": (2688, 1536), "2.0": (2816, 1408), "2.09": (2944, 1408), "2.4": (3072, 1280),
    "2.5": (3200, 1280), "2.89": (3328, 1152), "3.0": (3456, 1152), "3.11": (3584, 1152),
    "3.62": (3712, 1024), "3.75": (3840, 1024), "3.88": (3968, 1024), "4.0": (4096, 1024),
}

# SANA's 4K table (diffusers' ``ASPECT_RATIO_4096_BIN`` in ``pipeline_sana.py``): the 2K table
# with both sides doubled.
ASPECT_RATIO_4096: dict[str, tuple[int, int]] = {
    k: (2 * h, 2 * w) for k, (h, w) in ASPECT_RATIO_2048.items()}

TABLES: dict[int, dict[str, tuple[int, int]]] = {
    256: ASPECT_RATIO_256, 512: ASPECT_RATIO_512, 1024: ASPECT_RATIO_1024, 2048: ASPECT_RATIO_2048,
    4096: ASPECT_RATIO_4096,
}
"""The tables by base resolution (the side of their square bucket)."""

Table = Mapping[str, Sequence[float]]


def table_for(resolution: int) -> dict[str, tuple[int, int]]:
    """The table whose square bucket is ``resolution`` x ``resolution`` (PixArt's 256 ... 2048,
    SANA's 4096; SANA's 512 ... 2048 tables are PixArt's)."""
    if resolution not in TABLES:
        raise ValueError(f"no aspect-ratio table for resolution {resolution!r}; "
                         f"expected one of {sorted(TABLES)}")
    return TABLES[resolution]


def _as_table(table: Table | int) -> Mapping[str, Sequence[float]]:
    if isinstance(table, (int, np.integer)) and not isinstance(table, bool):
        return table_for(int(table))
    if not isinstance(table, Mapping) or not table:
        raise ValueError("an aspect-ratio table must be a non-empty mapping "
                         "{ratio: (height, width)} or a resolution in " f"{sorted(TABLES)}")
    return table


def closest_key(height: int, width: int, table: Table | int = 1024) -> str:
    """The ratio key of the bucket nearest to ``height / width`` (see :func:`closest_bucket`);
    PixArt trains with ``float(key)`` as the aspect-ratio micro-condition."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    ar = float(height / width)
    return min(_as_table(table), key=lambda key: abs(float(key) - ar))  # first wins a tie


def closest_bucket(height: int, width: int, table: Table | int = 1024) -> tuple[int, int]:
    """The ``(height, width)`` of the bucket whose ratio key is nearest to ``height / width``.

    Same rule as diffusers' ``PixArtImageProcessor.classify_height_width_bin``: distance
    ``abs(float(key) - height / width)``, the first key in table order wins a tie. ``table`` is a
    table (diffusers' float lists are accepted) or a resolution of :data:`TABLES`.
    """
    table = _as_table(table)
    h, w = table[closest_key(height, width, table)]
    return int(h), int(w)


def assign_buckets(sizes: Sequence[tuple[int, int]] | np.ndarray,
                   table: Table | int | None = 1024) -> np.ndarray:
    """``(N, 2)`` int array: the bucket ``(height, width)`` of each ``(height, width)`` in ``sizes``.

    ``table=None`` keeps each size as its own bucket (for latents already cut to a bucket, e.g.
    read from a :class:`jdit.data.cache.FeatureCache`).
    """
    sizes = np.asarray(sizes)
    if sizes.ndim != 2 or sizes.shape[1] != 2 or len(sizes) == 0:
        raise ValueError(f"sizes must be a non-empty list of (height, width), got shape {sizes.shape}")
    if not np.issubdtype(sizes.dtype, np.integer) or (sizes <= 0).any():
        raise ValueError("sizes must be positive integers (height, width)")
    if table is None:
        return sizes.astype(np.int64)
    table = _as_table(table)
    memo: dict[tuple[int, int], tuple[int, int]] = {}
    out = np.empty(sizes.shape, np.int64)
    for i, (h, w) in enumerate(sizes.tolist()):
        hw = memo.get((h, w))
        if hw is None:
            hw = memo[(h, w)] = closest_bucket(h, w, table)
        out[i] = hw
    return out


@dataclasses.dataclass(frozen=True)
class BucketBatch:
    """One batch of a :class:`BucketBatchSampler`: this shard's example indices, all of one bucket."""

    bucket: tuple[int, int]
    indices: np.ndarray


class BucketBatchSampler:
    """Batches of example indices, each batch drawn from a single aspect-ratio bucket.

    Every example is assigned to the bucket nearest to its aspect ratio (:func:`assign_buckets`).
    An epoch is planned from ``(seed, epoch)`` alone: the members of each bucket are shuffled and
    cut into *global* batches of ``batch_size * shard_count`` examples, and the order of all batches
    is shuffled. Shard ``k`` of ``shard_count`` (a host) takes the ``k``-th ``batch_size`` slice of
    every global batch, so at each step all hosts hold the same bucket (one global array shape),
    disjoint examples, and read only their own. ``shard_index`` / ``shard_count`` default to
    ``jax.process_index()`` / ``jax.process_count()``.

    ``drop_last=True`` (default): each bucket's incomplete last global batch is left out of that
    epoch, so up to ``batch_size * shard_count - 1`` examples per bucket are skipped per epoch (a
    different random subset each epoch; with ``shuffle=False`` always the same, the bucket's last
    examples), and a bucket with fewer examples than one global batch is never used. Every batch
    has ``batch_size`` examples. ``drop_last=False`` keeps those incomplete batches (one shape more
    per bucket to compile); it needs ``shard_count == 1``, since hosts must agree on a shape.

    Random access: :meth:`batch` gives the batch at any step, ``step // len(self)`` being the epoch;
    iteration goes on forever (epoch after epoch) and resumes exactly from :meth:`get_state`
    (``{"position": next step}``) through :meth:`set_state`.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]] | np.ndarray, batch_size: int, *,
                 table: Table | int | None = 1024, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, shard_index: int | None = None,
                 shard_count: int | None = None):
        if (shard_index is None) != (shard_count is None):
            raise ValueError("give both shard_index and shard_count, or neither (then: this JAX "
                             "process's index and the process count)")
        if shard_index is None:
            import jax

            shard_index, shard_count = jax.process_index(), jax.process_count()
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not (isinstance(shard_count, (int, np.integer)) and shard_count >= 1
                and isinstance(shard_index, (int, np.integer)) and 0 <= shard_index < shard_count):
            raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index!r},"
                             f" shard_count={shard_count!r}")
        if not drop_last and shard_count > 1:
            raise ValueError("drop_last=False needs shard_count == 1: with several shards every "
                             "host must get a batch of the same shape at each step")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.shard_index = int(shard_index)
        self.shard_count = int(shard_count)
        self.global_batch_size = self.batch_size * self.shard_count
        self.bucket_of = assign_buckets(sizes, table)
        keys, inverse = np.unique(self.bucket_of, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        self.buckets: list[tuple[int, int]] = [(int(h), int(w)) for h, w in keys]
        self.members: list[np.ndarray] = [np.flatnonzero(inverse == b) for b in range(len(keys))]
        gb = self.global_batch_size
        per_bucket = [len(m) // gb if self.drop_last else -(-len(m) // gb) for m in self.members]
        self.batches_per_bucket = dict(zip(self.buckets, per_bucket, strict=False))
        self._len = sum(per_bucket)
        if self._len == 0:
            counts = {b: len(m) for b, m in zip(self.buckets, self.members, strict=False)}
            raise ValueError(f"no bucket holds a full global batch of {gb} examples "
                             f"(batch_size {self.batch_size} x {self.shard_count} shards); "
                             f"examples per bucket: {counts}")
        self._position = 0
        self._lock = threading.Lock()
        self._plans: dict[int, list[tuple[int, np.ndarray]]] = {}

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._len

    @property
    def examples_per_epoch(self) -> int:
        """Examples this shard sees per epoch."""
        if not self.drop_last:  # shard_count == 1: every example, once
            return sum(len(m) for m in self.members)
        return self._len * self.batch_size

    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        with self._lock:
            plan = self._plans.get(epoch)
        if plan is not None:
            return plan
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        gb = self.global_batch_size
        plan = []
        for b, members in enumerate(self.members):
            order = rng.permutation(members) if self.shuffle else members
            for start in range(0, len(order), gb):
                chunk = order[start:start + gb]
                if len(chunk) == gb or not self.drop_last:
                    plan.append((b, chunk))
        if self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        with self._lock:
            if len(self._plans) >= 4:  # a few epochs: threads may straddle an epoch boundary
                self._plans.pop(min(self._plans))
            self._plans[epoch] = plan
        return plan

    def batch(self, step: int) -> BucketBatch:
        """The batch at ``step`` (epoch ``step // len(self)``), this shard's slice of it."""
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}")
        epoch, j = divmod(int(step), self._len)
        b, chunk = self._plan(epoch)[j]
        if self.shard_count > 1:
            chunk = chunk[self.shard_index * self.batch_size:(self.shard_index + 1) * self.batch_size]
        return BucketBatch(self.buckets[b], chunk.copy())

    def __getitem__(self, step: int) -> BucketBatch:
        return self.batch(step)

    def __iter__(self) -> Iterator[BucketBatch]:
        while True:
            step = self._position
            self._position += 1
            yield self.batch(step)

    def get_state(self) -> dict[str, int]:
        """``{"position": the step the next iteration yields}`` (JSON-serialisable)."""
        return {"position": self._position}

    def set_state(self, state: Mapping[str, int]) -> None:
        position = state.get("position") if isinstance(state, Mapping) else None
        if not isinstance(position, (int, np.integer)) or position < 0:
            raise ValueError(f"expected a state {{'position': int >= 0}}, got {state!r}")
        self._position = int(position)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_plans"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
