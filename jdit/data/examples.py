"""One example of a data source: the error that marks it unusable, and the checks sources share.

A source raises :class:`BadExample` from ``source[i]`` when example ``i`` alone cannot be used (an
unreadable image, an empty caption, a broken manifest line): a caller that encodes a whole
dataset (``jdit cache``) skips that example and records ``reason`` and ``example_id``; anything
else (a missing folder, a manifest that does not exist) stays an ordinary error when the source
is built. :data:`REASONS` lists the reason codes jdit's sources use.

The public home of these names is :mod:`jdit.data.sources`; they live here so that the image
decoder and every source can raise them without importing each other.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

REASONS: dict[str, str] = {
    "unreadable_image": "not an image, truncated, or in a pixel format jdit cannot convert",
    "missing_image": "the image file (or tar member) named for this example does not exist",
    "missing_caption": "no caption: no sidecar, or no 'caption' field",
    "empty_caption": "the caption is empty or only whitespace",
    "caption_not_utf8": "the caption file is not UTF-8 text",
    "bad_caption": "the caption is not text (a number, a list, ...)",
    "missing_label": "no class label: no .cls / .json sidecar, or no 'label' field",
    "bad_label": "the label is not an integer in [0, 2**31)",
    "bad_sidecar": "a .json sidecar that is not a UTF-8 JSON object",
    "bad_manifest_line": "a manifest line that is not a JSON object with an 'image' path",
}
_REASON_RE = re.compile(r"[a-z][a-z0-9_]*")

_PIP = {"tensorflow_datasets": "tensorflow-datasets", "grain": "grain", "PIL": "Pillow"}


class BadExample(ValueError):
    """Example ``example_id`` cannot be used, for ``reason`` (a snake_case code, see
    :data:`REASONS`); the message names the file and what is wrong with it."""

    def __init__(self, reason: str, message: str, example_id: str | None = None) -> None:
        if not isinstance(reason, str) or not _REASON_RE.fullmatch(reason):
            raise ValueError(f"BadExample reason must be a snake_case code, got {reason!r}")
        # All three in args, so that the exception pickles (grain worker processes) intact.
        super().__init__(reason, message, example_id)
        self.reason, self.message, self.example_id = reason, message, example_id

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def for_example(example_id: str) -> Iterator[None]:
    """Give a :class:`BadExample` raised inside (by a helper that does not know the example)
    the id of the example being read."""
    try:
        yield
    except BadExample as e:
        if e.example_id is not None:
            raise
        raise BadExample(e.reason, e.message, example_id) from None


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency of jdit's data paths, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs the Python package {_PIP.get(module.split('.')[0], module)!r} "
            f"({e}); "
            "install jdit's data extra: pip install 'jdit[data]'"
        ) from e


def check_index(index: Any, length: int, where: str) -> int:
    """``index`` as an int, or ``IndexError`` when it is not one in ``[0, length)``."""
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) \
            or not 0 <= index < length:
        raise IndexError(f"{where}: index {index!r} out of range [0, {length})")
    return int(index)


def as_rgb(image: np.ndarray, where: str) -> np.ndarray:
    """uint8 (H, W) / (H, W, 1|2|3|4) -> uint8 (H, W, 3); alpha is composited on white."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{where}: expected an image (H, W, 1|3|4), got shape {image.shape}")
    c = image.shape[-1]
    if c in (2, 4):  # grey+alpha or RGBA
        alpha = image[..., -1:].astype(np.float32) / 255.0
        color = image[..., :-1].astype(np.float32)
        image = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        c -= 1
    if c == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image)


def caption_text(value: Any, where: str) -> str:
    """A caption value (from JSON, a manifest, TFDS) -> stripped non-empty text."""
    if value is None:
        raise BadExample("missing_caption", f"{where}: no caption")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadExample("caption_not_utf8", f"{where}: caption is not UTF-8 ({e})") from None
    if not isinstance(value, str):
        raise BadExample("bad_caption", f"{where}: expected a text caption, got "
                                        f"{type(value).__name__} {value!r:.60}")
    text = value.strip()
    if not text:
        raise BadExample("empty_caption", f"{where}: caption is empty")
    return text


def caption_file(data: bytes, where: str) -> str:
    """The bytes of a caption sidecar (UTF-8, a byte-order mark allowed) -> caption text."""
    try:
        text = data.decode("utf-8-sig")  # Windows editors start UTF-8 files with a BOM
    except UnicodeDecodeError as e:
        raise BadExample("caption_not_utf8", f"{where}: caption file is not UTF-8 ({e})") from None
    return caption_text(text, where)


def label_value(value: Any, where: str) -> np.int32:
    """A class label from JSON or a manifest: an int in ``[0, 2**31)`` (not a bool, not 3.0)."""
    if value is None:
        raise BadExample("missing_label", f"{where}: no label")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value < 2**31:
        raise BadExample("bad_label", f"{where}: expected an integer label in [0, 2**31), got "
                                      f"{value!r:.60}")
    return np.int32(value)


def label_file(data: bytes, where: str) -> np.int32:
    """The bytes of a ``.cls`` file (an integer, whitespace around it allowed) -> label."""
    try:
        text = data.decode("ascii").strip()
        value = int(text) if text.isdigit() else None
    except UnicodeDecodeError:
        value = None
    if value is None:
        raise BadExample("bad_label", f"{where}: expected a non-negative integer, got "
                                      f"{data[:40]!r}")
    return label_value(value, where)


def json_sidecar(data: bytes, where: str) -> dict[str, Any]:
    """The bytes of a ``.json`` sidecar -> its object."""
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise BadExample("bad_sidecar", f"{where}: not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise BadExample("bad_sidecar", f"{where}: not valid JSON ({e.msg} at line {e.lineno} "
                                        f"column {e.colno})") from None
    if not isinstance(value, dict):
        raise BadExample("bad_sidecar", f"{where}: expected a JSON object, got a "
                                        f"{type(value).__name__}")
    return value
