"""Read PyTorch ``torch.save`` checkpoints without torch and without running pickled code.

A ``.pth``/``.pt`` file is a zip archive: ``<name>/data.pkl`` (a pickle describing the object
tree) and ``<name>/data/<key>`` (raw tensor storages). The pickle is read with an unpickler that
resolves only the handful of globals a tensor state dict needs (tensor rebuild functions, storage
types, ``OrderedDict``). Every other global becomes an inert :class:`Opaque` record that is never
called, so objects such as ``argparse.Namespace`` in training checkpoints are skipped safely.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class Opaque:
    """Stand-in for a pickled object of a class we refuse to import; records its arguments."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}>"


def _opaque(module: str, name: str) -> type:
    return type("Opaque", (Opaque,), {"qualname": f"{module}.{name}"})


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, STORAGE_DTYPES[name]


def _check_bounds(numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise pickle.UnpicklingError(f"invalid tensor geometry {size} / {stride} / {offset}")
    if 0 in size:
        return
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= numel:
        raise pickle.UnpicklingError(
            f"tensor view {size} stride {stride} offset {offset} exceeds storage of {numel}"
        )


class UnsupportedStorage:
    """Stands for a tensor whose storage type jdit does not read (complex, float8, quantized):
    kept until the tensor's name is known, then reported by :func:`extract_state_dict`."""

    def __init__(self, type_name: str, key: str, path: str) -> None:
        self.type_name, self.key, self.path = type_name, key, path


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> Any:
    if isinstance(storage, UnsupportedStorage):
        return storage
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    _check_bounds(storage.size, int(offset), size, stride)
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[int(offset):], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view, copy=True)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Only reached for tensor subclasses (nn.Parameter); the rebuilt payload is the array.
    return func(*args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): _opaque("torch.nn.parameter", "Parameter"),
    ("torch", "Tensor"): _opaque("torch", "Tensor"),
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        return _opaque(module, name)

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if isinstance(storage_type, type) and issubclass(storage_type, Opaque):
            return UnsupportedStorage(storage_type.qualname, key, str(self._archive.filename))
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            name = f"{self._prefix}/data/{key}"
            try:
                info = self._archive.getinfo(name)
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            # sizes are checked against the archive's bytes before anything is read or allocated
            if info.compress_type != zipfile.ZIP_STORED:
                raise pickle.UnpicklingError(f"storage {key} is compressed; torch.save stores "
                                             "storages uncompressed, so this file was not made by it")
            if not isinstance(numel, int) or numel < 0 or numel * dtype.itemsize > info.file_size:
                raise pickle.UnpicklingError(
                    f"storage {key} declares {numel} x {dtype.itemsize} bytes but the file holds "
                    f"{info.file_size} bytes for it (truncated or forged)")
            raw = self._archive.read(name)
            arr = np.frombuffer(raw, dtype=dtype, count=int(numel))
            self._storages[key] = arr.astype(storage_type.dtype, copy=False)
        return self._storages[key]


def load_torch_checkpoint(path: str | Path) -> Any:
    """Load a ``torch.save`` zip archive into plain Python containers of numpy arrays."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a zip-format torch checkpoint. Files from torch < 1.6 (legacy format) "
            "are not read; re-save them with a recent torch, or convert to safetensors."
        )
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pkls}")
        prefix = pkls[0][: -len("/data.pkl")]
        byteorder = "little"
        if f"{prefix}/byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
        try:
            return _Unpickler(archive.read(pkls[0]), archive, prefix, byteorder).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path}: {e}") from None


def extract_state_dict(obj: Any, key: str | None = None) -> dict[str, np.ndarray]:
    """The tensor dict inside a loaded checkpoint.

    With ``key`` given, ``obj[key]``. Otherwise ``obj`` itself when it maps names to arrays, else
    the first of ``state_dict`` (PixArt), ``ema`` (DiT training checkpoints), ``model``,
    ``module`` that holds one. Entries that are not arrays are dropped.
    """
    def is_tensor_dict(d: Any) -> bool:
        return isinstance(d, dict) and any(isinstance(v, np.ndarray) for v in d.values())

    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"checkpoint has no entry {key!r}; top-level entries: {keys}")
        found = obj[key]
    elif is_tensor_dict(obj):
        found = obj
    else:
        found = next(
            (obj[k] for k in ("state_dict", "ema", "model", "module")
             if isinstance(obj, dict) and is_tensor_dict(obj.get(k))),
            None,
        )
        if found is None:
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"no tensor state dict found in checkpoint; top-level entries: {keys}")
    for name, value in found.items():
        if isinstance(value, UnsupportedStorage):
            raise ValueError(f"{value.path}: tensor {str(name)!r} is stored as {value.type_name} "
                             f"(storage {value.key}), which jdit does not read; supported: "
                             f"{', '.join(sorted(STORAGE_DTYPES))}")
    return {str(k): v for k, v in found.items() if isinstance(v, np.ndarray)}
