"""Run outputs without extra dependencies: ``metrics.jsonl``, TensorBoard event files, PNG grids.

TensorBoard events are TFRecord files of ``Event`` protocol buffers; the few fields a scalar
summary needs are encoded by hand here (wire format: varint keys, length-delimited messages),
with the masked CRC-32C framing TFRecord requires.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jdit.files import atomic_write

# --- TFRecord framing ------------------------------------------------------------------------

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", _masked_crc(header)) + data
            + struct.pack("<I", _masked_crc(data)))


# --- protocol buffer fields --------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _event(wall_time: float, step: int | None = None, file_version: str | None = None,
           summary: bytes | None = None) -> bytes:
    out = _field(1, 1, struct.pack("<d", wall_time))
    if step is not None:
        out += _field(2, 0, _varint(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if summary is not None:
        out += _bytes_field(5, summary)
    return out


def scalar_summary(tag: str, value: float) -> bytes:
    """``Summary{value: [Value{tag, simple_value}]}``."""
    val = _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(value)))
    return _bytes_field(1, val)


class MetricsWriter:
    """Appends one JSON object per call to ``metrics.jsonl`` and scalars to a TensorBoard file.

    ``resume_step``: the step a resumed run restarts from; lines of later steps (logged after
    that checkpoint by the run that died) and a line cut short by the kill are dropped first, so
    the file keeps one line per step."""

    def __init__(self, workdir: str | Path, resume_step: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
            atomic_write(path, "".join(line + "\n" for line in kept))
        self._jsonl = open(path, "a", buffering=1)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._events = open(self.workdir / name, "ab")
        self._events.write(tfrecord(_event(time.time(), file_version="brain.Event:2")))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        # JSON has no NaN or infinity: those are written as the strings "nan", "inf", "-inf"
        # (read_jsonl turns them back into floats)
        line = {k: v if math.isfinite(v) else str(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), **line}, allow_nan=False) + "\n")
        now = time.time()
        for tag, value in values.items():
            self._events.write(tfrecord(_event(now, step=int(step),
                                               summary=scalar_summary(tag, value))))
        self._events.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._events.close()


def _step_of(line: str) -> int | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("step") if isinstance(row, dict) and isinstance(row.get("step"), int) else None


# --- images ---------------------------------------------------------------------------------

def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8; grayscale (…, 1) becomes RGB."""
    x = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one image with the N tiles in rows, separated by ``pad`` pixels."""
    n, h, w, c = images.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h,
            pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return out


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) or (H, W) uint8 array as PNG (8-bit, no interlace), atomically."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"write_png needs (H, W[, 3]) uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    color = 2 if image.ndim == 3 else 0
    if image.ndim == 3 and image.shape[2] != 3:
        raise ValueError(f"write_png needs 3 channels, got {image.shape[2]}")
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    atomic_write(path, png)


def save_grid(path: str | Path, images: np.ndarray, columns: int | None = None,
              scale: int = 1) -> None:
    """Save [-1, 1] images as one PNG grid, each pixel repeated ``scale`` times. Images holding
    NaN or infinity are refused (a black tile would pass for a picture)."""
    bad = [i for i, im in enumerate(np.asarray(images)) if not np.isfinite(im).all()]
    if bad:
        raise FloatingPointError(f"{len(bad)} of {len(images)} images hold NaN or infinite values "
                                 f"(indices {bad[:10]}); {path} not written")
    tiles = to_uint8(images)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    write_png(path, grid(tiles, columns))


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a ``.jsonl`` file; ``metrics.jsonl``'s "nan" / "inf" / "-inf" strings come
    back as floats."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}
            for row in rows]
