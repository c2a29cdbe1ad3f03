"""A feature cache: per-example VAE latents and text features stored once, read back by index.

Training PixArt-style models from pre-computed features skips the VAE encoder and T5 at every
step. :class:`FeatureCacheWriter` stores named arrays per example (``latent`` of any shape,
``text`` and ``text_mask``, ...; float16/bfloat16/float32/int...) in safetensors shards, and
:class:`FeatureCache` reads them back by position or by example id, as a random-access source
for :mod:`jdit.data.loader`.

Layout of a cache directory::

    index.json                  # written by close(), last; lists everything below
    shard-00000.safetensors     # tensors "<offset>/<field>" of the examples of that shard
    shard-00001.safetensors
    ...

``index.json`` holds, columnar: the example ids in the order they were added, each example's shard
and offset in it, the shape of each of its arrays, its string fields; each field's dtype; each
shard's byte size and sha256. Every file is written to a temporary name and renamed (atomic on
POSIX). While the writer runs, each shard is followed by its own small index ``shard-NNNNN.json``
(merged into ``index.json`` and removed by ``close()``): a killed writer leaves only complete,
indexed shards, an *incomplete* cache that ``FeatureCacheWriter(..., resume=True)`` continues.
Readers refuse an incomplete cache unless told otherwise.

Conventions: latents are NHWC per example, ``(h, w, c)``; :meth:`FeatureCache.sizes` gives their
``(h, w)`` for :class:`jdit.data.buckets.BucketBatchSampler` (``table=None``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import numpy as np

from jdit.files import atomic_write
from jdit.weights.safetensors_io import DTYPES, SafetensorsFile, write_safetensors

_SAFETENSORS_DTYPES = frozenset(DTYPES.values())
INDEX = "index.json"
FORMAT = "jdit-feature-cache"
VERSION = 1


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _part_name(i: int) -> str:
    return f"shard-{i:05d}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, separators=(",", ":")))


def _dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).name  # "float16", "bfloat16" (ml_dtypes), "float32", "int32", ...


def _dtype_from_name(name: str) -> np.dtype:
    for dt in _SAFETENSORS_DTYPES:
        if dt.name == name:
            return dt
    raise ValueError(f"unsupported dtype {name!r} in cache index")


class FeatureCacheWriter:
    """Write a feature cache; use as a context manager (or call :meth:`close`).

    ``writer.add(example_id, latent=z, text=h, text_mask=m, caption="...")``: array values go to
    the shards, ``str`` values to the index. The first example fixes the fields and each array
    field's dtype; later examples must have the same fields and dtypes (shapes may differ: one
    latent per bucket size). A shard is written when it holds ``examples_per_shard`` examples or
    ``max_shard_bytes`` bytes of arrays.

    ``overwrite=True`` replaces an existing cache; ``resume=True`` continues an incomplete one
    (or starts one; ``example_id in writer`` tells what it already holds). Otherwise an existing
    cache is an error.
    Leaving the ``with`` block by an exception still writes the examples added so far (the cache
    stays incomplete, ready to resume).
    """

    def __init__(self, directory: str | os.PathLike, *, examples_per_shard: int = 1024,
                 max_shard_bytes: int = 256 << 20, overwrite: bool = False, resume: bool = False,
                 metadata: Mapping[str, Any] | None = None):
        if examples_per_shard < 1 or max_shard_bytes < 1:
            raise ValueError("examples_per_shard and max_shard_bytes must be positive")
        self.directory = Path(directory)
        self.examples_per_shard = int(examples_per_shard)
        self.max_shard_bytes = int(max_shard_bytes)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fields: dict[str, dict[str, str]] | None = None
        self._shards: list[dict[str, Any]] = []
        self._ids: list[str] = []
        self._shard: list[int] = []
        self._offset: list[int] = []
        self._shapes: dict[str, list[list[int]]] = {}
        self._strings: dict[str, list[str]] = {}
        self.metadata: dict[str, Any] = json.loads(json.dumps(dict(metadata or {})))
        complete = (self.directory / INDEX).exists()
        if complete or any(self.directory.glob("shard-*.json")):
            kind = "a complete" if complete else "an incomplete"
            if overwrite:
                (self.directory / INDEX).unlink(missing_ok=True)
                for pattern in ("shard-*.safetensors", "shard-*.json"):
                    for path in self.directory.glob(pattern):
                        path.unlink()
            elif resume:
                if complete:
                    raise FileExistsError(f"{self.directory}: the feature cache is complete; "
                                          "nothing to resume (pass overwrite=True to rebuild it)")
                index = _load_index(self.directory)
                if index["metadata"] != self.metadata:
                    raise ValueError(
                        f"{self.directory}: the incomplete cache was started with other metadata "
                        f"(encoders, buckets); resume it with the same settings or rebuild it "
                        f"(overwrite). It has {_describe(index['metadata'])}, this run "
                        f"{_describe(self.metadata)}")
                self._fields = index["fields"] or None
                self._shards = index["shards"]
                self._ids = index["ids"]
                self._shard, self._offset = index["shard"], index["offset"]
                self._shapes, self._strings = index["shapes"], index["strings"]
            else:
                raise FileExistsError(f"{self.directory} already holds {kind} feature cache; "
                                      "pass overwrite=True or resume=True")
        self._seen = set(self._ids)
        self._pending: list[tuple[str, dict[str, np.ndarray], dict[str, str]]] = []
        self._pending_bytes = 0
        self._closed = False

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._seen

    def __len__(self) -> int:
        return len(self._ids) + len(self._pending)

    def add(self, example_id: str, **fields: Any) -> None:
        """Add one example: array fields (numpy or array-like) and ``str`` fields."""
        if self._closed:
            raise ValueError(f"{self.directory}: the cache writer is closed")
        if not isinstance(example_id, str) or not example_id:
            raise ValueError(f"example_id must be a non-empty str, got {example_id!r}")
        if example_id in self._seen:
            raise ValueError(f"{self.directory}: duplicate example id {example_id!r}")
        if not fields:
            raise ValueError(f"example {example_id!r}: no fields to cache")
        arrays: dict[str, np.ndarray] = {}
        strings: dict[str, str] = {}
        for name, value in fields.items():
            if "/" in name:
                raise ValueError(f"field name {name!r} must not contain '/'")
            if isinstance(value, str):
                strings[name] = value
                continue
            arr = np.asarray(value)
            if arr.dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(f"example {example_id!r}: field {name!r} has dtype {arr.dtype}, "
                                 f"which the cache cannot store (use one of "
                                 f"{sorted({d.name for d in _SAFETENSORS_DTYPES})})")
            arrays[name] = arr
        spec = {**{k: {"kind": "array", "dtype": _dtype_name(v.dtype)} for k, v in arrays.items()},
                **{k: {"kind": "str"} for k in strings}}
        if self._fields is None:
            self._fields = spec
            self._shapes = {k: [] for k in arrays}
            self._strings = {k: [] for k in strings}
        elif spec != self._fields:
            raise ValueError(f"example {example_id!r}: fields {spec} differ from the cache's "
                             f"fields {self._fields} (names, kinds and dtypes must match)")
        self._seen.add(example_id)
        self._pending.append((example_id, arrays, strings))
        self._pending_bytes += sum(a.nbytes for a in arrays.values())
        if (len(self._pending) >= self.examples_per_shard
                or self._pending_bytes >= self.max_shard_bytes):
            self.flush()

    def flush(self) -> None:
        """Write the pending examples as one shard, then its own index ``shard-NNNNN.json``."""
        if not self._pending:
            return
        s = len(self._shards)
        name = _shard_name(s)
        tensors = {f"{o}/{k}": v for o, (_, arrays, _) in enumerate(self._pending)
                   for k, v in arrays.items()}
        path = self.directory / name
        write_safetensors(path, tensors, metadata={"format": FORMAT, "shard": str(s)})
        shard = {"file": name, "num_examples": len(self._pending),
                 "bytes": path.stat().st_size, "sha256": _sha256(path)}
        part = {"format": FORMAT, "version": VERSION, "shard": s, "fields": self._fields,
                "metadata": self.metadata,
                **shard, "ids": [e[0] for e in self._pending],
                "shapes": {k: [list(e[1][k].shape) for e in self._pending] for k in self._shapes},
                "strings": {k: [e[2][k] for e in self._pending] for k in self._strings}}
        _write_json_atomic(self.directory / _part_name(s), part)
        self._shards.append(shard)
        self._ids.extend(part["ids"])
        self._shard.extend([s] * len(self._pending))
        self._offset.extend(range(len(self._pending)))
        for k, v in part["shapes"].items():
            self._shapes[k].extend(v)
        for k, v in part["strings"].items():
            self._strings[k].extend(v)
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        """Write the last shard, then ``index.json``: the cache is complete."""
        if self._closed:
            return
        self.flush()
        _write_json_atomic(self.directory / INDEX, {
            "format": FORMAT, "version": VERSION, "complete": True, "metadata": self.metadata,
            "fields": self._fields or {}, "shards": self._shards, "ids": self._ids,
            "shard": self._shard, "offset": self._offset, "shapes": self._shapes,
            "strings": self._strings,
        })
        for s in range(len(self._shards)):
            (self.directory / _part_name(s)).unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was added, leave the cache incomplete (resumable)
            try:
                self.flush()
            finally:
                self._closed = True


def write_cache(directory: str | os.PathLike, examples: Iterator[Mapping[str, Any]], *,
                id_key: str = "id", **writer_kwargs: Any) -> FeatureCache:
    """Write ``examples`` (dicts with an ``id_key`` str and the fields) and open the result."""
    with FeatureCacheWriter(directory, **writer_kwargs) as writer:
        for ex in examples:
            fields = dict(ex)
            if id_key not in fields:
                raise ValueError(f"example has no {id_key!r} key (has {sorted(fields)})")
            writer.add(str(fields.pop(id_key)), **fields)
    return FeatureCache(directory)


def _describe(metadata: Mapping[str, Any]) -> str:
    return json.dumps(metadata, sort_keys=True)[:400]


def merge_parts(directory: str | os.PathLike, parts: list[str],
                metadata: Mapping[str, Any] | None = None,
                order: list[str] | None = None) -> FeatureCache:
    """Join complete caches in subfolders ``parts`` of ``directory`` (one per process of a
    multi-host writer) into one cache at ``directory``: its ``index.json`` lists every part's
    shards (``<part>/shard-NNNNN.safetensors``), nothing is copied. Examples follow ``order``
    (example ids; those not in it come last, in part order). The parts' fields and metadata
    must agree (and equal ``metadata`` when given)."""
    directory = Path(directory)
    if (directory / INDEX).exists():
        raise FileExistsError(f"{directory}: already holds a complete feature cache")
    merged: dict[str, Any] | None = None
    rows: list[tuple[str, int, int, dict[str, list[int]], dict[str, str]]] = []
    shards: list[dict[str, Any]] = []
    for part in parts:
        index = _load_index(directory / part)
        if not index["complete"]:
            raise ValueError(f"{directory / part}: this part of the cache is incomplete")
        if merged is None:
            merged = {"fields": index["fields"], "metadata": index["metadata"]}
            if metadata is not None and index["metadata"] != json.loads(json.dumps(metadata)):
                raise ValueError(f"{directory / part}: metadata {_describe(index['metadata'])} "
                                 f"differs from {_describe(metadata)}")
        # a part that holds no example (a process whose examples were all skipped) has no fields
        same_fields = not index["fields"] or not merged["fields"] or \
            index["fields"] == merged["fields"]
        if index["metadata"] != merged["metadata"] or not same_fields:
            raise ValueError(f"{directory / part}: fields or metadata differ from those of "
                             f"{directory / parts[0]}")
        merged["fields"] = merged["fields"] or index["fields"]
        first = len(shards)
        shards += [{**sh, "file": f"{part}/{sh['file']}"} for sh in index["shards"]]
        for i, example_id in enumerate(index["ids"]):
            rows.append((example_id, first + index["shard"][i], index["offset"][i],
                         {k: v[i] for k, v in index["shapes"].items()},
                         {k: v[i] for k, v in index["strings"].items()}))
    if merged is None:
        raise ValueError(f"{directory}: no parts to merge")
    seen: set[str] = set()
    for example_id, *_ in rows:
        if example_id in seen:
            raise ValueError(f"{directory}: example id {example_id!r} is in two parts")
        seen.add(example_id)
    if order is not None:
        rank = {k: i for i, k in enumerate(order)}
        rows.sort(key=lambda r: rank.get(r[0], len(rank)))
    fields = merged["fields"] or {}
    array_fields = [k for k, v in fields.items() if v["kind"] == "array"]
    string_fields = [k for k, v in fields.items() if v["kind"] == "str"]
    _write_json_atomic(directory / INDEX, {
        "format": FORMAT, "version": VERSION, "complete": True, "metadata": merged["metadata"],
        "fields": fields, "shards": shards, "ids": [r[0] for r in rows],
        "shard": [r[1] for r in rows], "offset": [r[2] for r in rows],
        "shapes": {k: [r[3][k] for r in rows] for k in array_fields},
        "strings": {k: [r[4][k] for r in rows] for k in string_fields},
    })
    return FeatureCache(directory)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt feature-cache index ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not a jdit feature-cache index")
    if obj.get("version") != VERSION:
        raise ValueError(f"{path}: feature-cache version {obj.get('version')!r}, this jdit "
                         f"reads version {VERSION}")
    return obj


def _load_index(directory: Path) -> dict[str, Any]:
    """``index.json`` of a complete cache, or the index merged from the shard indices of an
    incomplete one (``"complete": False``)."""
    path = directory / INDEX
    if path.is_file():
        index = _read_json(path)
    else:
        parts = sorted(directory.glob("shard-*.json"))
        if not parts:
            raise FileNotFoundError(f"{directory}: not a feature cache (no {INDEX}); a cache is "
                                    "written by jdit.data.cache.FeatureCacheWriter")
        index = {"complete": False, "fields": {}, "shards": [], "ids": [], "shard": [],
                 "offset": [], "shapes": {}, "strings": {}, "metadata": {}}
        for s, part_path in enumerate(parts):
            if part_path.name != _part_name(s):
                raise ValueError(f"{directory}: shard index {_part_name(s)} is missing "
                                 f"(found {part_path.name})")
            part = _read_json(part_path)
            if s == 0:
                index["fields"] = part["fields"]
                index["metadata"] = part.get("metadata", {})
                index["shapes"] = {k: [] for k in part["shapes"]}
                index["strings"] = {k: [] for k in part["strings"]}
            elif part["fields"] != index["fields"]:
                raise ValueError(f"{part_path}: fields differ from those of shard 0")
            n = len(part["ids"])
            index["shards"].append({k: part[k] for k in ("file", "num_examples", "bytes",
                                                          "sha256")})
            index["ids"].extend(part["ids"])
            index["shard"].extend([s] * n)
            index["offset"].extend(range(n))
            for k, v in part["shapes"].items():
                index["shapes"][k].extend(v)
            for k, v in part["strings"].items():
                index["strings"][k].extend(v)
    index.setdefault("metadata", {})
    n = len(index["ids"])
    if not (len(index["shard"]) == len(index["offset"]) == n
            and all(len(v) == n for v in index["shapes"].values())
            and all(len(v) == n for v in index["strings"].values())):
        raise ValueError(f"{directory}: inconsistent feature-cache index (column lengths differ)")
    return index


class FeatureCache:
    """Read a feature cache: ``len(cache)``, ``cache[i]`` (in the order examples were added),
    ``cache.get(example_id)``; a random-access source for :mod:`jdit.data.loader`.

    ``cache[i]`` is ``{"id": str, <array fields>: np.ndarray (a copy, dtype as written),
    <str fields>: str}``. Shards are memory-mapped on first use and their headers parsed once
    (at most ``max_open_shards`` kept open: random batches over a cache touch a shard per
    example, and reopening one costs its header's parse, ~10 ms for 1,000 tensors). Each shard's byte size is checked when it is opened and :meth:`verify` checks every
    shard's sha256; a missing, truncated or corrupt shard raises an error naming the file.
    ``allow_incomplete=True`` reads the complete shards of a cache still being written.
    """

    def __init__(self, directory: str | os.PathLike, *, allow_incomplete: bool = False,
                 max_open_shards: int = 512):
        self.directory = Path(directory)
        index = _load_index(self.directory)
        if not index["complete"] and not allow_incomplete:
            raise ValueError(f"{self.directory}: the feature cache is incomplete (its writer did "
                             "not finish); resume it with FeatureCacheWriter(..., resume=True) or "
                             "read it with allow_incomplete=True")
        self.complete = bool(index["complete"])
        self.metadata: dict[str, Any] = index["metadata"]
        self.fields: dict[str, dict[str, str]] = index["fields"]
        self.shards: list[dict[str, Any]] = index["shards"]
        self.ids: list[str] = index["ids"]
        self._shard = np.asarray(index["shard"], np.int64)
        self._offset = np.asarray(index["offset"], np.int64)
        self._shapes = index["shapes"]
        self._strings = index["strings"]
        self._position = {k: i for i, k in enumerate(self.ids)}
        self._dtypes = {k: _dtype_from_name(v["dtype"]) for k, v in self.fields.items()
                        if v["kind"] == "array"}
        self.max_open_shards = max(1, int(max_open_shards))
        self._open: OrderedDict[int, SafetensorsFile] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, example_id: str) -> int:
        try:
            return self._position[example_id]
        except KeyError:
            raise KeyError(f"{self.directory}: no example with id {example_id!r}") from None

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._position

    def get(self, example_id: str) -> dict[str, Any]:
        return self[self.index_of(example_id)]

    def shape(self, index: int, field: str) -> tuple[int, ...]:
        """Shape of array ``field`` of example ``index``, from the index (no shard read)."""
        if field not in self._shapes:
            raise KeyError(f"{self.directory}: no array field {field!r} (has {sorted(self._shapes)})")
        return tuple(self._shapes[field][index])

    def sizes(self, field: str = "latent") -> np.ndarray:
        """``(N, 2)`` ``(h, w)`` of each example's ``(h, w, c)`` array ``field``, for buckets."""
        if field not in self._shapes:
            raise KeyError(f"{self.directory}: no array field {field!r} (has {sorted(self._shapes)})")
        shapes = self._shapes[field]
        if any(len(s) < 2 for s in shapes):
            raise ValueError(f"{self.directory}: field {field!r} is not (h, w, ...) per example")
        return np.array([s[:2] for s in shapes], dtype=np.int64).reshape(-1, 2)

    def _shard_tensors(self, s: int) -> SafetensorsFile:
        with self._lock:
            tensors = self._open.get(s)
            if tensors is not None:
                self._open.move_to_end(s)
                return tensors
        info = self.shards[s]
        path = self.directory / info["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard {s} of the feature cache is missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise ValueError(f"{path}: shard {s} of the feature cache is truncated or corrupt "
                             f"({size} bytes, the index says {info['bytes']})")
        try:
            tensors = SafetensorsFile(path)
        except ValueError as e:
            raise ValueError(f"{path}: shard {s} of the feature cache is corrupt ({e})") from None
        with self._lock:
            self._open[s] = tensors
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        return tensors

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise IndexError(f"{self.directory}: index {index!r} out of range [0, {n})")
        index = int(index)
        s, o = int(self._shard[index]), int(self._offset[index])
        tensors = self._shard_tensors(s)
        out: dict[str, Any] = {"id": self.ids[index]}
        for k, dtype in self._dtypes.items():
            arr = tensors.get(f"{o}/{k}")
            shape = tuple(self._shapes[k][index])
            if arr is not None and shape == () and arr.shape == (1,):
                arr = arr.reshape(())  # write_safetensors stores a 0-d array as shape [1]
            if arr is None or arr.dtype != dtype or arr.shape != shape:
                raise ValueError(f"{self.directory / self.shards[s]['file']}: shard {s} is corrupt:"
                                 f" tensor {o}/{k} is missing or is not {dtype.name} {shape}")
            out[k] = np.array(arr)
        for k, values in self._strings.items():
            out[k] = values[index]
        return out

    def verify(self) -> None:
        """Check every shard's presence, size and sha256 against the index (reads everything)."""
        for s, info in enumerate(self.shards):
            path = self.directory / info["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard {s} of the feature cache is missing")
            digest = _sha256(path)
            if digest != info["sha256"]:
                raise ValueError(f"{path}: shard {s} of the feature cache is corrupt "
                                 f"(sha256 {digest[:12]}..., the index says "
                                 f"{info['sha256'][:12]}...)")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_open"] = OrderedDict()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"FeatureCache({str(self.directory)!r}, len={len(self)}, "
                f"shards={len(self.shards)}, fields={sorted(self.fields)})")
