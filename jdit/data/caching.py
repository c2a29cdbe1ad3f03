"""``jdit cache``: encode a dataset once into a feature cache that ``jdit train`` reads.

    summary = build_cache(source, "cache/", image_encoder("vae/"), text_encoder("pipeline/"),
                          table=1024)

Each example's image is resized and centre-cropped to its aspect-ratio bucket (or to ``size``)
as PixArt's and SANA's data pipelines do it (:func:`jdit.data.loader.resize_center_crop`),
encoded in batches of one bucket, and stored with its text features (or label), its original
size and its bucket's ratio key (PixArt's micro-conditions). Layout of the cache::

    index.json                   # the merged index: written last, the cache is then complete
    null_caption.safetensors     # the encoded empty caption, for condition dropout
    skipped.jsonl                # one line per example left out: id, reason, message
    summary.json                 # counts written and skipped (by reason)
    part-00000-of-00002/         # one feature cache per process, with its own skipped.jsonl
    part-00001-of-00002/

With a ``condition`` (:class:`ConditionSpec`: Canny edges of each resized image, or a folder of
condition images named like the examples), each example also holds ``condition``: the
condition image resized and cropped exactly as its image and encoded by the same VAE, what
control training (``control.method``) reads.

Resumable: a killed run leaves each part's complete shards indexed; the same command continues,
and every example ends up in the cache exactly once (ids already written or skipped are not
redone). Multi-host: process ``i`` of ``n`` encodes every ``n``-th example and writes its own
part; process 0 waits for the others' parts and merges them into one index (nothing is copied).
Bad examples never stop the run: unreadable images, empty or undecodable captions, duplicate
ids, extreme aspect ratios and images too small for their bucket are skipped and counted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jdit.data.buckets import closest_bucket, closest_key
from jdit.data.cache import FeatureCache, FeatureCacheWriter, merge_parts
from jdit.data.loader import RESAMPLE, resize_center_crop, to_unit_range
from jdit.files import atomic_write

FORMAT_VERSION = 1
NULL_CAPTION = "null_caption.safetensors"
SKIPPED = "skipped.jsonl"
SUMMARY = "summary.json"
PREVIEW = "preview.safetensors"
PREVIEW_PROMPTS = 16
DTYPES = ("float16", "bfloat16", "float32")


class Skip(Exception):
    """An example left out of the cache, with a short reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where images go: the buckets of ``table`` (a resolution of :data:`jdit.data.buckets.TABLES`)
    or one fixed ``size`` (height, width); images whose longer side is over
    ``max_aspect_ratio`` times the shorter, or that would be enlarged more than ``max_upscale``
    times, are skipped."""

    table: int | None = None
    size: tuple[int, int] | None = None
    resample: str = "bicubic"
    max_aspect_ratio: float = 4.5
    max_upscale: float = 2.0

    def __post_init__(self) -> None:
        if (self.table is None) == (self.size is None):
            raise ValueError("give exactly one of an aspect-ratio table (--buckets) and a fixed "
                             "size (--size)")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {RESAMPLE}, got {self.resample!r}")
        if not (self.max_aspect_ratio >= 1 and self.max_upscale >= 1):
            raise ValueError("max_aspect_ratio and max_upscale must be >= 1")

    def bucket(self, height: int, width: int) -> tuple[tuple[int, int], str]:
        """The target (height, width) of an image and its ratio key."""
        ratio = height / width
        if max(ratio, 1 / ratio) > self.max_aspect_ratio:
            raise Skip("extreme_aspect_ratio", f"{height}x{width} (h x w) is beyond the aspect "
                                               f"ratio limit {self.max_aspect_ratio}")
        if self.table is not None:
            target, key = closest_bucket(height, width, self.table), \
                closest_key(height, width, self.table)
        else:
            target, key = self.size, f"{self.size[0] / self.size[1]:.2f}"
        scale = max(target[0] / height, target[1] / width)
        if scale > self.max_upscale:
            raise Skip("too_small", f"{height}x{width} would be enlarged {scale:.2f}x to "
                                    f"{target[0]}x{target[1]} (limit {self.max_upscale})")
        return target, key

    def describe(self) -> dict[str, Any]:
        return {"table": self.table, "size": None if self.size is None else list(self.size),
                "resample": self.resample, "max_aspect_ratio": self.max_aspect_ratio,
                "max_upscale": self.max_upscale}


@dataclasses.dataclass(frozen=True)
class ConditionSpec:
    """Where each example's control condition comes from. ``kind="canny"``: the Canny edges of
    the example's image after it is resized to its bucket (``low``/``high`` thresholds, as
    ``jdit sample --canny`` and :func:`jdit.control.extractors.canny_condition` make them).
    ``kind="folder"``: an image in ``folder`` named like the example (its id, or its id with
    another image extension: ``photos/a/cat.jpg`` -> ``depth/a/cat.png``), of the same aspect
    ratio as the example's image (within ``ratio_tolerance``), resized and cropped as it is."""

    kind: str
    low: float = 100.0
    high: float = 200.0
    folder: str | None = None
    ratio_tolerance: float = 0.02

    def __post_init__(self) -> None:
        if self.kind not in ("canny", "folder"):
            raise ValueError(f"a condition is 'canny' or a folder of condition images, got "
                             f"{self.kind!r}")
        if self.kind == "folder" and not (self.folder and Path(self.folder).is_dir()):
            raise ValueError(f"condition folder {self.folder!r} is not a directory")
        if self.kind == "canny" and not 0 <= self.low <= self.high:
            raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high, got "
                             f"{self.low}, {self.high}")

    @classmethod
    def parse(cls, text: str, canny: tuple[float, float] = (100.0, 200.0)) -> ConditionSpec:
        """``"canny"`` or a folder path."""
        if text == "canny":
            return cls("canny", low=float(canny[0]), high=float(canny[1]))
        return cls("folder", folder=str(Path(text).resolve()))

    def describe(self) -> dict[str, Any]:
        if self.kind == "canny":
            return {"kind": "canny", "low": self.low, "high": self.high}
        return {"kind": "folder", "source": self.folder}

    def _path(self, example_id: str) -> Path:
        from jdit.data.folders import IMAGE_EXTENSIONS

        root = Path(str(self.folder))
        exact = root / example_id
        candidates = [exact, *(exact.with_suffix(e) for e in IMAGE_EXTENSIONS),
                      *(root / f"{example_id}{e}" for e in IMAGE_EXTENSIONS)]
        for path in candidates:
            # ids come from the dataset: a condition must stay inside the folder
            if path.is_file() and path.resolve().is_relative_to(root.resolve()):
                return path
        raise Skip("missing_condition", f"no condition image for {example_id!r} in {root} "
                                        f"(looked for {exact.stem} with {IMAGE_EXTENSIONS})")

    def pixels(self, example_id: str, image: np.ndarray, resized: np.ndarray,
               geometry: Geometry) -> np.ndarray:
        """The condition of one example as float32 [-1, 1] pixels of ``resized``'s size;
        ``image`` is the original, ``resized`` the uint8 image at its bucket."""
        if self.kind == "canny":
            from jdit.control.extractors import canny

            edges = canny(resized, self.low, self.high)
            return to_unit_range(np.repeat(edges[..., None], 3, axis=-1))
        from jdit.data.images import decode_image

        path = self._path(example_id)
        try:
            cond = decode_image(path)
        except ValueError as e:
            raise Skip("unreadable_condition", str(e)) from None
        (h, w), (ch, cw) = image.shape[:2], cond.shape[:2]
        if abs(np.log((ch / cw) / (h / w))) > np.log1p(self.ratio_tolerance):
            raise Skip("condition_mismatch", f"{path}: the condition is {ch}x{cw} (h x w), its "
                                             f"image {h}x{w}: not the same aspect ratio")
        return to_unit_range(resize_center_crop(cond, *resized.shape[:2],
                                                resample=geometry.resample))


@dataclasses.dataclass
class Summary:
    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    already: int = 0  # examples a previous run of this command had written or skipped
    seconds: float = 0.0

    def line(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common()) or "none"
        rate = self.written / self.seconds if self.seconds else 0.0
        return (f"wrote {self.written} examples, skipped {sum(self.skipped.values())} ({why}), "
                f"{self.already} from an earlier run; {rate:.1f} images/s")


def _example_id(source: Any, index: int) -> str:
    if hasattr(source, "example_id"):
        return str(source.example_id(index))
    return str(source[index]["id"])


def _read_skipped(path: Path) -> dict[str, dict[str, Any]]:
    """id -> record of a part's skipped.jsonl (a line cut by a kill is ignored)."""
    out: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                out[str(record["id"])] = {"reason": str(record["reason"]),
                                          "message": str(record.get("message", ""))}
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return out


def _prepare(source: Any, index: int, example_id: str, kind: str, geometry: Geometry,
             condition: ConditionSpec | None = None) -> dict[str, Any]:
    """Read, check and resize one example (runs in a worker thread)."""
    try:
        ex = source[index]
    except (ValueError, OSError) as e:  # BadExample is a ValueError: its reason is kept
        raise Skip(getattr(e, "reason", "unreadable"), str(e)) from None
    image = np.asarray(ex.get("image"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise Skip("unreadable_image", f"expected a uint8 RGB image, got {image.dtype} "
                                       f"{image.shape}")
    out: dict[str, Any] = {"id": example_id}
    if kind == "text":
        caption = ex.get("caption")
        if not isinstance(caption, str):
            raise Skip("missing_caption", "the example has no caption")
        if not caption.strip():
            raise Skip("empty_caption", "the caption is empty")
        out["caption"] = caption.strip()
    else:
        label = ex.get("label")
        try:
            out["label"] = np.int32(label)
            if np.asarray(label).ndim != 0 or out["label"] < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise Skip("bad_label", f"expected a class id >= 0, got {label!r}") from None
    h, w = image.shape[:2]
    target, key = geometry.bucket(h, w)
    resized = resize_center_crop(image, *target, resample=geometry.resample)
    out["pixels"] = to_unit_range(resized)
    if condition is not None:
        out["condition_pixels"] = condition.pixels(example_id, image, resized, geometry)
    out["original_size"] = np.array([h, w], np.int32)
    out["aspect_ratio"] = key
    return out


def _prepared(source: Any, todo: Sequence[tuple[int, str]], kind: str, geometry: Geometry,
              threads: int, condition: ConditionSpec | None = None
              ) -> Iterator[tuple[str, dict[str, Any] | Skip]]:
    """Examples of ``todo`` prepared by ``threads`` threads, in order, a bounded window ahead
    (decoding and resizing overlap the encoders, which run on the caller's thread)."""
    window = max(4 * threads, 16)
    with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
        pending: collections.deque = collections.deque()
        it = iter(todo)
        for index, example_id in it:
            pending.append((example_id, pool.submit(_prepare, source, index, example_id, kind,
                                                    geometry, condition)))
            if len(pending) >= window:
                break
        while pending:
            example_id, future = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[1], pool.submit(_prepare, source, nxt[0], nxt[1], kind,
                                                    geometry, condition)))
            try:
                yield example_id, future.result()
            except Skip as e:
                yield example_id, e


def _write_null_caption(directory: Path, text: Any) -> None:
    from jdit.weights.safetensors_io import write_safetensors

    path = directory / NULL_CAPTION
    if path.exists():
        return
    features, mask = text.encode([""])
    write_safetensors(path, {"text": features.astype(np.float32),
                             "text_mask": mask.astype(np.int32)},
                      metadata={"format": "jdit-null-caption"})


def _write_preview(directory: Path, cache: FeatureCache, text: Any) -> None:
    """The first distinct captions of the cache, encoded: sample grids during training need no
    text encoder."""
    from jdit.weights.safetensors_io import write_safetensors

    prompts: list[str] = []
    for i in range(len(cache)):
        caption = cache._strings["caption"][i]
        if caption not in prompts:
            prompts.append(caption)
        if len(prompts) == PREVIEW_PROMPTS:
            break
    features, mask = text.encode(prompts)
    atomic_write(directory / PREVIEW.replace(".safetensors", ".json"), json.dumps(prompts))
    write_safetensors(directory / PREVIEW, {"text": features.astype(np.float32),
                                            "text_mask": mask.astype(np.int32)},
                      metadata={"format": "jdit-preview"})


def read_preview(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(prompts, text (P, L, D), text_mask (P, L))`` of a cache's ``preview.safetensors``."""
    from jdit.weights.safetensors_io import read_safetensors

    tensors = read_safetensors(path)
    prompts = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return prompts, np.asarray(tensors["text"], np.float32), \
        np.asarray(tensors["text_mask"], np.int32)


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def build_cache(source: Any, directory: str | Path, image: Any, text: Any | None, *,
                geometry: Geometry, metadata: dict[str, Any] | None = None,
                batch_size: int = 8, dtype: str = "float16", threads: int = 4,
                process_index: int = 0, process_count: int = 1, resume: bool = True,
                examples_per_shard: int = 256, wait_timeout: float | None = None,
                progress: bool = True, log: Callable[[str], None] | None = None,
                condition: ConditionSpec | None = None) -> Summary:
    """Encode ``source`` into a feature cache at ``directory``; returns this process's counts.

    ``source``: ``len`` and ``__getitem__`` giving ``{"image": uint8 (H, W, 3), "caption": str}``
    (or ``"label"``: class-labelled data, then ``text`` is None), and ideally a cheap
    ``example_id(i)``. ``image`` / ``text``: :mod:`jdit.pipelines.encoders`. ``dtype``: how latents
    and text features are stored (identity pixels stay float32). ``metadata``: extra facts to
    record (e.g. the source). ``condition``: also store each example's control condition
    (:class:`ConditionSpec`), encoded by ``image``. Every process of a multi-host run calls this with its
    ``process_index``; process 0 merges the parts once all are complete.
    """
    from jdit.data.sources import require  # noqa: F401 (Pillow is needed to resize)

    directory = Path(directory)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} must lie in [0, {process_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kind = "class" if text is None else "text"
    log = log or (lambda message: None)
    stored = np.float32 if image.identity["kind"] == "identity" else np.dtype(dtype)
    if dtype == "bfloat16" and stored != np.float32:
        import ml_dtypes

        stored = np.dtype(ml_dtypes.bfloat16)
    meta = {"jdit_cache": FORMAT_VERSION, "kind": kind, "autoencoder": image.identity,
            "text_encoder": None if text is None else text.identity,
            "geometry": geometry.describe(), "dtype": np.dtype(stored).name,
            "null_caption": None if text is None else NULL_CAPTION,
            "condition": None if condition is None else condition.describe(), **(metadata or {})}
    meta = json.loads(json.dumps(meta))
    if (directory / "index.json").exists():
        raise FileExistsError(f"{directory} already holds a complete feature cache; pass "
                              "--overwrite to rebuild it")
    directory.mkdir(parents=True, exist_ok=True)
    if process_index == 0 and text is not None:
        _write_null_caption(directory, text)

    # plan: every process lists every id (cheap), so duplicates resolve the same way everywhere
    ids = [_example_id(source, i) for i in range(len(source))]
    first: dict[str, int] = {}
    for i, example_id in enumerate(ids):
        first.setdefault(example_id, i)
    unique = [i for i in range(len(ids)) if first[ids[i]] == i]
    mine = unique[process_index::process_count]
    # process 0 records the repeated ids (their first example is encoded like any other)
    duplicates = [i for i in range(len(ids)) if first[ids[i]] != i] if process_index == 0 else []

    part = directory / part_name(process_index, process_count)
    summary = Summary()
    start = time.perf_counter()
    if not (part / "index.json").exists():
        summary = _encode_part(source, part, ids, mine, duplicates, kind, image, text, geometry,
                               meta, batch_size, stored, threads, resume, examples_per_shard,
                               progress, condition)
    summary.seconds = time.perf_counter() - start
    log(f"{part.name}: {summary.line()}")
    if process_index == 0:
        parts = [part_name(i, process_count) for i in range(process_count)]
        _wait_for(directory, parts, wait_timeout, log)
        merged = merge_parts(directory, parts, meta, order=ids)
        _merge_skipped(directory, parts, merged)
        if text is not None and len(merged):
            _write_preview(directory, merged, text)
    return summary


def _encode_part(source: Any, part: Path, ids: list[str], mine: list[int],
                 duplicates: list[int], kind: str, image: Any, text: Any, geometry: Geometry,
                 meta: dict[str, Any], batch_size: int, stored: np.dtype, threads: int,
                 resume: bool, examples_per_shard: int, progress: bool,
                 condition: ConditionSpec | None = None) -> Summary:
    summary = Summary()
    skipped_path = part / SKIPPED
    writer = FeatureCacheWriter(part, metadata=meta, resume=resume,
                                examples_per_shard=examples_per_shard)
    done_skipped = _read_skipped(skipped_path)
    todo = [(i, ids[i]) for i in mine if ids[i] not in writer and ids[i] not in done_skipped]
    summary.already = len(mine) - len(todo)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="img", desc=f"jdit cache {part.name}",
                   dynamic_ncols=True)
    pending: dict[tuple[int, int], list[dict[str, Any]]] = collections.defaultdict(list)
    with open(skipped_path, "a", encoding="utf-8") as skipped_file, writer:

        def skip(example_id: str, reason: str, message: str) -> None:
            skipped_file.write(json.dumps({"id": example_id, "reason": reason,
                                           "message": message}) + "\n")
            skipped_file.flush()
            summary.skipped[reason] += 1

        # a repeated id is recorded once (under its id) however often it repeats
        for example_id in sorted({ids[i] for i in duplicates}):
            if example_id not in done_skipped:
                skip(example_id, "duplicate_id", "an id already taken by an earlier example")

        def encode(examples: list[dict[str, Any]]) -> None:
            n = len(examples)
            if kind == "text":  # first: a caption the encoder refuses drops its example
                features, mask, examples = _encode_text(text, examples, batch_size, skip)
            if examples:
                m = len(examples)

                def encoded(name: str) -> np.ndarray:
                    pixels = np.stack([e[name] for e in examples])
                    if m < batch_size:  # one compiled shape per bucket: pad the last batch
                        pixels = np.concatenate(
                            [pixels, np.zeros((batch_size - m, *pixels.shape[1:]), pixels.dtype)])
                    return image.encode(pixels)[:m]

                latents = encoded("pixels")
                conditions = encoded("condition_pixels") if condition is not None else None
                for j, e in enumerate(examples):
                    fields: dict[str, Any] = {"latent": latents[j].astype(stored),
                                              "original_size": e["original_size"],
                                              "aspect_ratio": e["aspect_ratio"]}
                    if conditions is not None:
                        fields["condition"] = conditions[j].astype(stored)
                    if kind == "text":
                        fields.update(text=features[j].astype(stored), text_mask=mask[j],
                                      caption=e["caption"])
                    else:
                        fields["label"] = e["label"]
                    if not all(np.isfinite(fields[k]).all() for k in ("latent", "text",
                                                                     "condition")
                               if k in fields):  # float16 overflow, a broken encoder
                        skip(e["id"], "non_finite", "the encoders gave non-finite values")
                        continue
                    writer.add(e["id"], **fields)
                    summary.written += 1
            if bar is not None:
                bar.update(n)

        for example_id, prepared in _prepared(source, todo, kind, geometry, threads, condition):
            if isinstance(prepared, Skip):
                skip(example_id, prepared.reason, str(prepared))
                if bar is not None:
                    bar.update(1)
                continue
            bucket = prepared["pixels"].shape[:2]
            pending[bucket].append(prepared)
            if len(pending[bucket]) == batch_size:
                encode(pending.pop(bucket))
        for bucket in sorted(pending):
            encode(pending[bucket])
    if bar is not None:
        bar.close()
    return summary


def _encode_text(text: Any, examples: list[dict[str, Any]], batch_size: int,
                 skip: Callable[[str, str, str], None]
                 ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Text features of a batch; a caption the encoder refuses (a word-level encoder's unknown
    word, ...) is skipped alone rather than failing the batch."""
    captions = [e["caption"] for e in examples]
    pad = [""] * (batch_size - len(captions))
    try:
        features, mask = text.encode(captions + pad)
        return features[:len(captions)], mask[:len(captions)], examples
    except ValueError:
        kept = []
        for e in examples:
            try:
                text.encode([e["caption"]])
                kept.append(e)
            except ValueError as err:
                skip(e["id"], "caption_not_encodable", str(err)[:300])
        if not kept:
            return np.zeros(0), np.zeros(0), []
        features, mask = text.encode([e["caption"] for e in kept] +
                                     [""] * (batch_size - len(kept)))
        return features[:len(kept)], mask[:len(kept)], kept


def _wait_for(directory: Path, parts: list[str], timeout: float | None,
              log: Callable[[str], None]) -> None:
    """Until every part is complete (other processes may still be encoding theirs)."""
    start, said = time.monotonic(), False
    while True:
        missing = [p for p in parts if not (directory / p / "index.json").exists()]
        if not missing:
            return
        if not said:
            log(f"waiting for {len(missing)} other part(s) of {directory}: {missing[:3]} ...")
            said = True
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"{directory}: parts {missing} did not complete within "
                               f"{timeout:.0f} s; run the same command again once they have")
        time.sleep(1.0)


def _merge_skipped(directory: Path, parts: list[str], cache: FeatureCache) -> None:
    lines, reasons = [], collections.Counter()
    for p in parts:
        for example_id, record in _read_skipped(directory / p / SKIPPED).items():
            if record["reason"] != "duplicate_id" and example_id in cache:
                continue  # cannot happen: an id is written or skipped, never both
            reasons[record["reason"]] += 1
            lines.append(json.dumps({"id": example_id, **record, "part": p}))
    atomic_write(directory / SKIPPED, "".join(line + "\n" for line in lines))
    atomic_write(directory / SUMMARY, json.dumps(
        {"examples": len(cache), "skipped": sum(reasons.values()),
         "skipped_by_reason": dict(reasons.most_common())}, indent=2))


def summary_of(directory: str | Path) -> dict[str, Any]:
    """The counts of a complete cache (``summary.json``)."""
    path = Path(directory) / SUMMARY
    return json.loads(path.read_text(encoding="utf-8"))
