"""Read and write safetensors files (single or sharded) as numpy arrays, bfloat16 included.

The format is an 8-byte little-endian header length, a JSON header mapping names to
``{dtype, shape, data_offsets}``, then the raw little-endian data. Reading memory-maps the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from jdit.files import atomic_file

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}


def _valid_entry(info: object) -> bool:
    def ints(x: object, n: int | None = None) -> bool:
        return isinstance(x, list) and (n is None or len(x) == n) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)

    return isinstance(info, dict) and isinstance(info.get("dtype"), str) and \
        ints(info.get("shape")) and ints(info.get("data_offsets"), 2)


class SafetensorsFile:
    """One ``.safetensors`` file, memory-mapped, its header parsed once; ``file[name]`` checks
    that tensor's entry and returns a read-only view. Opening costs the header's JSON only, so a
    reader that needs a few tensors of a file of thousands (a feature-cache shard) pays for those.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = path = Path(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError(f"{path}: not a safetensors file (too short)")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        n = int.from_bytes(self._buf[:8], "little")
        if n > size - 8:
            raise ValueError(f"{path}: corrupt safetensors header length {n}")
        try:
            header = json.loads(bytes(self._buf[8 : 8 + n]))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header (a JSON object mapping tensor "
                             f"names to entries was expected, got a {type(header).__name__})")
        meta = header.pop("__metadata__", None)
        # the file's string-to-string metadata (e.g. a LoRA's alpha); anything else is ignored
        self.metadata: dict[str, str] = {str(k): v for k, v in meta.items() if isinstance(v, str)
                                         } if isinstance(meta, dict) else {}
        self._header: dict[str, object] = header
        self._data_start, self._data_len = 8 + n, size - 8 - n

    def names(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def get(self, name: str) -> np.ndarray | None:
        return self[name] if name in self._header else None

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._header[name]
        if not _valid_entry(info):
            raise ValueError(f"{self.path}: tensor {name!r} has a malformed header entry "
                             "(expected dtype, shape: [non-negative ints], data_offsets: "
                             f"[begin, end]); got {str(info)[:200]}")
        assert isinstance(info, dict)
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype "
                             f"{info.get('dtype')!r}")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= self._data_len or \
                end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{self.path}: tensor {name!r} has inconsistent data offsets")
        return np.frombuffer(self._buf, dtype=dtype, count=math.prod(shape),
                             offset=self._data_start + begin).reshape(shape)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file (read-only views of a memory map)."""
    file = SafetensorsFile(path)
    return {name: file[name] for name in file.names()}


def read_safetensors_folder(folder: str | Path, stem: str) -> dict[str, np.ndarray]:
    """``{stem}.safetensors`` or the shards listed in ``{stem}.safetensors.index.json``."""
    folder = Path(folder)
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if not index.exists():
        raise FileNotFoundError(f"{folder}: neither {single.name} nor {index.name} exists")
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_safetensors(folder / shard)
        out.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise ValueError(f"{index}: tensors listed in the index but absent from shards: {missing}")
    return out


def write_safetensors(
    path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write atomically: a temporary file in the same folder, then an atomic rename."""
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        arr = np.require(tensors[name], requirements="C")  # keeps 0-d arrays 0-d
        if arr.dtype not in _NAMES:
            little = arr.dtype.newbyteorder("<")
            if little not in _NAMES:
                raise ValueError(f"cannot store {name!r} of dtype {arr.dtype} in safetensors")
            arr = arr.astype(little)
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        arrays.append(arr)
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    with atomic_file(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
