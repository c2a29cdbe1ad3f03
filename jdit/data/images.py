"""Decoding image files of any common kind to uint8 RGB, or a :class:`BadExample` that says why not.

:func:`decode_image` reads a file (a local path, ``gs://...`` through ``etils.epath``, or bytes)
with Pillow, fully: a truncated file is refused, never returned with its missing rows grey. It
applies the EXIF orientation and converts every pixel format to uint8 ``(H, W, 3)``:

* grey (``L``), 1-bit (``1``) and palette (``P``) images become RGB;
* alpha (``LA``, ``RGBA``, ``PA``, a palette or grey/RGB ``transparency``) is composited on white;
* 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, and ``I``, as Pillow opens 16-bit PNGs and
  TIFFs) is scaled ``round(v * 255 / 65535)`` (not clipped at 255); 16-bit RGB(A) PNGs are
  reduced to 8 bits by Pillow itself (the high byte: at most 1 below the exact scaling);
* CMYK (JPEG, with Adobe's inverted CMYK handled by Pillow) and YCbCr become RGB.

Animated images give their first frame. Float (``F``) images and other modes are refused.
:func:`image_size` reads ``(height, width)`` after EXIF orientation from the header.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from etils import epath

from jdit.data.examples import BadExample, as_rgb, require

ImageData = bytes | str | os.PathLike
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_ORIENTATION_TAG = 0x0112
_TRUNCATION_WARNED = False


def _read(data: ImageData, name: str | None) -> tuple[bytes, str]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), name or "<image bytes>"
    path = epath.Path(data)
    name = name or str(path)
    try:
        return path.read_bytes(), name
    except FileNotFoundError:
        raise BadExample("missing_image", f"{name}: image file does not exist") from None
    except OSError as e:
        raise BadExample("unreadable_image", f"{name}: cannot read file ({e})") from None


def _pil() -> Any:
    pil = require("PIL.Image", "jdit.data.images")
    global _TRUNCATION_WARNED
    image_file = require("PIL.ImageFile", "jdit.data.images")
    if image_file.LOAD_TRUNCATED_IMAGES and not _TRUNCATION_WARNED:
        _TRUNCATION_WARNED = True
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other code): "
                      "Pillow then pads truncated images with grey, and jdit cannot tell them "
                      "apart from whole ones", RuntimeWarning, stacklevel=3)
    return pil


def _orientation(im: Any) -> int:
    """The EXIF orientation (1..8); 1 when absent or unreadable (as ``ImageOps.exif_transpose``
    ignores broken EXIF, so do we: the pixels are still good)."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - any EXIF parsing failure means "no orientation"
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF ``orientation`` to an (H, W, C) array: the image as it is meant to be seen."""
    oriented = {
        1: image,
        2: image[:, ::-1],  # mirrored left-right
        3: image[::-1, ::-1],  # rotated 180
        4: image[::-1],  # mirrored top-bottom
        5: image.swapaxes(0, 1),  # transposed
        6: np.rot90(image, -1),  # rotated 90 clockwise
        7: image[::-1, ::-1].swapaxes(0, 1),  # transversed
        8: np.rot90(image, 1),  # rotated 90 counter-clockwise
    }[orientation]
    return np.ascontiguousarray(oriented)


def _sixteen_bit_grey(im: Any, name: str) -> np.ndarray:
    values = np.asarray(im).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise BadExample("unreadable_image", f"{name}: {im.mode} image with values outside the "
                                             f"16-bit range [0, 65535] ({values.min()}.."
                                             f"{values.max()}); jdit cannot scale it to 8 bits")
    return ((values + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535), half up


def _pixels(im: Any, name: str) -> np.ndarray:
    """A loaded PIL image -> uint8 (H, W, 1|2|3|4) for :func:`as_rgb`."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        return _sixteen_bit_grey(im, name)
    if mode == "F":
        raise BadExample("unreadable_image", f"{name}: 32-bit float image (mode F): no defined "
                                             "scale to 8 bits")
    alpha = mode in _ALPHA_MODES or "transparency" in im.info
    if mode == "1":
        im = im.convert("L")
    elif alpha and mode not in ("LA", "RGBA"):
        im = im.convert("RGBA")
    elif not alpha and mode not in ("L", "RGB"):
        im = im.convert("RGB")  # P, CMYK, YCbCr, RGBX, LAB, HSV (or a ValueError)
    return np.asarray(im)


def decode_image(data: ImageData, *, name: str | None = None) -> np.ndarray:
    """The image in ``data`` (a path or the file's bytes) as uint8 ``(H, W, 3)``, as it is meant
    to be seen (EXIF orientation applied).

    ``name`` names the image in error messages (default: the path). Raises
    :class:`BadExample` with reason ``"unreadable_image"`` (not an image, truncated, an
    unsupported mode, beyond Pillow's decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS``)
    or ``"missing_image"`` (no file at that path).
    """
    raw, name = _read(data, name)
    pil = _pil()
    try:
        with pil.open(io.BytesIO(raw)) as im:
            im.load()  # decodes every row now: a truncated file fails here
            orientation = _orientation(im)
            pixels = _pixels(im, name)
    except BadExample:
        raise
    except pil.UnidentifiedImageError:
        raise BadExample("unreadable_image", f"{name}: cannot read image (not an image file "
                                             "in a format Pillow knows)") from None
    except Exception as e:  # noqa: BLE001 - decoders of untrusted bytes raise anything
        # (OSError, SyntaxError, struct.error, ...): all mean this file cannot be used.
        raise BadExample("unreadable_image",
                         f"{name}: cannot read image ({type(e).__name__}: {e})") from None
    return _orient(as_rgb(pixels, name), orientation)


def image_size(data: ImageData, *, name: str | None = None) -> tuple[int, int]:
    """``(height, width)`` of the image after EXIF orientation, read from the header (for a PNG
    without EXIF before its pixels Pillow decodes the image to look for EXIF after them).
    Raises :class:`BadExample` as :func:`decode_image` does for a file that is not an image."""
    pil = _pil()
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            name = name or "<image bytes>"
            stream: Any = io.BytesIO(bytes(data))
        else:
            name = name or str(data)
            stream = epath.Path(data).open("rb")
        with stream, pil.open(stream) as im:
            width, height = im.size
            orientation = _orientation(im)
    except FileNotFoundError:
        raise BadExample("missing_image", f"{name}: image file does not exist") from None
    except Exception as e:  # noqa: BLE001 - as in decode_image
        raise BadExample("unreadable_image",
                         f"{name}: cannot read image ({type(e).__name__}: {e})") from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)
