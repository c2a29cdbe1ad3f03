"""Random-access data sources for real datasets: TFDS ``data_source`` and image folders.

A source has ``len(source)`` and ``source[i] -> dict`` (any ``i`` in any order, the same answer
every time), which is what :mod:`jdit.data.loader` (grain) shuffles, shards and batches. Examples
are dicts of numpy values::

    {"image": uint8 (H, W, 3), "caption": str, "id": str}    # text-image data
    {"image": uint8 (H, W, 3), "label": int32 (), "id": str} # class-labelled data

Images keep their own size here; the loader resizes them to a fixed size or to their
aspect-ratio bucket. ``id`` names the example within its source (TFDS: ``"{split}/{index}"``,
image folder: the image's relative path), e.g. as the key of a :mod:`jdit.data.cache`.

TFDS, grain and Pillow are optional (``pip install 'jdit[data]'``) and imported only when used.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")

_PIP = {"tensorflow_datasets": "tensorflow-datasets", "grain": "grain", "PIL": "Pillow"}


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


def _as_rgb(image: np.ndarray, where: str) -> np.ndarray:
    """uint8 (H, W) / (H, W, 1|3|4) -> uint8 (H, W, 3); alpha is composited on white."""
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


def _as_text(value: Any, where: str) -> str:
    """A caption from a str, bytes, or a sequence of them (the first one)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            raise ValueError(f"{where}: empty list of captions")
        value = value[0]
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: caption is not UTF-8 ({e})") from None
    if not isinstance(value, str):
        raise TypeError(f"{where}: expected a text caption, got {type(value).__name__}")
    return value


def _get_path(example: dict, path: str, where: str) -> Any:
    value: Any = example
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise KeyError(f"{where}: no feature {path!r} (has {have})")
        value = value[part]
    return value


class TfdsSource:
    """A TFDS ``data_source`` (ArrayRecord files, read without TensorFlow) decoded to jdit examples.

    Build it with :func:`tfds_source`. ``source[i]`` is ``{"image", "id"}`` plus ``"caption"``
    (when ``caption_feature`` is set) or ``"label"`` (when the dataset has ``label_feature``).
    """

    def __init__(self, data_source: Any, name: str, split: str, *, image_feature: str = "image",
                 caption_feature: str | None = None, label_feature: str | None = "label",
                 rgb: bool = True):
        self.data_source = data_source
        self.name, self.split = name, split
        self.image_feature = image_feature
        self.caption_feature = caption_feature
        self.label_feature = label_feature
        self.rgb = rgb

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise IndexError(f"{self.name}/{self.split}: index {index!r} out of range [0, {n})")
        index = int(index)
        raw = self.data_source[index]
        where = f"{self.name}/{self.split}[{index}]"
        image = np.asarray(_get_path(raw, self.image_feature, where))
        out: dict[str, Any] = {"image": _as_rgb(image, where) if self.rgb else image,
                               "id": f"{self.split}/{index}"}
        if self.caption_feature is not None:
            out["caption"] = _as_text(_get_path(raw, self.caption_feature, where), where).strip()
        elif self.label_feature is not None:
            out["label"] = np.int32(np.asarray(_get_path(raw, self.label_feature, where)))
        return out

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, len={len(self)})"


def tfds_source(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                image_feature: str = "image", caption_feature: str | None = None,
                label_feature: str | None = "label", rgb: bool = True, download: bool = False,
                **data_source_kwargs: Any) -> TfdsSource:
    """A random-access source over ``tfds.data_source(name, split=split, data_dir=data_dir)``.

    The dataset must have been prepared in the ArrayRecord format (``tfds build
    --file_format=array_record``, or a data_dir that holds ``*.array_record-*`` files); TFDS then
    reads it without TensorFlow and decodes images with Pillow (or OpenCV when installed).
    ``download=False`` (unlike TFDS's default) never downloads nor prepares: a dataset missing
    from ``data_dir`` is an error; ``download=True`` lets TFDS do both (most builders then need
    TensorFlow). ``name`` may also be the folder of one prepared dataset version (the one holding
    ``dataset_info.json``, e.g. ``~/tensorflow_datasets/coco_captions/2017/1.1.0``): it is then
    read from its files alone (``tfds.builder_from_directory``), without the dataset's TFDS code,
    some of which imports TensorFlow.

    ``caption_feature`` names the caption of a text-image dataset (``"a/b"`` for a nested
    feature; of a list of captions the first is used); without it the example carries
    ``label_feature`` when the dataset has one (``"label"`` for imagenet2012, cifar10, mnist...),
    or neither. Images become uint8 RGB (grey repeated, alpha composited on white) unless
    ``rgb=False``. Extra keyword arguments go to ``tfds.data_source`` (e.g. ``decoders``).
    """
    tfds = require("tensorflow_datasets", "jdit.data.tfds_source")
    folder = Path(os.path.expanduser(str(name)))
    try:
        if (folder / "dataset_info.json").is_file():
            builder = tfds.builder_from_directory(str(folder))
            name = builder.name
            data_source = builder.as_data_source(split=split, **data_source_kwargs)
        else:
            data_source = tfds.data_source(name, split=split, data_dir=data_dir,
                                           download=download, **data_source_kwargs)
    except ModuleNotFoundError as e:
        if not _missing_tensorflow(e):
            raise
        raise ImportError(
            f"TFDS's code for {name!r} imports TensorFlow, which jdit does not install; read the "
            "prepared files without that code: tfds_source('<data_dir>/<name>/<version>', split)"
        ) from e
    except (NotImplementedError, AssertionError, FileNotFoundError) as e:
        raise ValueError(
            f"tfds.data_source({name!r}, split={split!r}, data_dir={data_dir!r}) failed: the "
            "dataset must be prepared in the array_record format in data_dir (tfds build "
            f"--file_format=array_record). TFDS said: {e}") from e
    features = None
    info = getattr(data_source, "dataset_info", None)
    if info is not None:
        try:
            features = list(info.features.keys())
        except Exception:  # noqa: BLE001 - features unknown: checked per example instead
            features = None
    if features is not None:
        for role, feature in (("image_feature", image_feature),
                              ("caption_feature", caption_feature)):
            if feature is not None and feature.split("/")[0] not in features:
                raise ValueError(f"{name}: {role}={feature!r} is not a feature of the dataset "
                                 f"(features: {sorted(features)})")
        if caption_feature is None and label_feature is not None and label_feature not in features:
            label_feature = None
    return TfdsSource(data_source, name, split, image_feature=image_feature,
                      caption_feature=caption_feature, label_feature=label_feature, rgb=rgb)


def _missing_tensorflow(error: BaseException | None) -> bool:
    """Whether ``error`` (or one it was raised from) is TensorFlow's absence; TFDS re-raises
    import errors with a new message."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and (
                error.name == "tensorflow" or "No module named 'tensorflow'" in str(error)):
            return True
        error = error.__cause__
    return False


class ImageFolderSource:
    """Images under ``root`` (any depth), each with a caption sidecar ``<name>.txt`` beside it.

    ``photos/cat.jpg`` pairs with ``photos/cat.txt`` (UTF-8, surrounding whitespace stripped).
    Images are the files whose extension (any case) is in ``extensions``; hidden files and
    folders (name starting with ``.``) are skipped. Order: sorted relative POSIX paths, so the
    same folder gives the same indices on every machine. A missing sidecar is an error at
    construction (all missing ones are named); an unreadable image or caption raises a
    ``ValueError`` naming the file when that example is read. EXIF orientation is applied.

    ``source[i]`` is ``{"image": uint8 (H, W, 3), "caption": str, "id": relative path}``.
    """

    def __init__(self, root: str | os.PathLike, *,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, caption_extension: str = ".txt"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a "
                                    "directory")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        if caption_extension.lower() in exts:
            raise ValueError(f"caption_extension {caption_extension!r} is also an image extension")
        self.caption_extension = caption_extension
        paths = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts:
                    paths.append(Path(dirpath, f).relative_to(self.root).as_posix())
        self.paths: list[str] = sorted(paths)
        if not self.paths:
            raise ValueError(f"no images ({', '.join(sorted(exts))}) under {str(self.root)!r}")
        missing = [p for p in self.paths if not self._caption_path(p).is_file()]
        if missing:
            shown = ", ".join(str(self._caption_path(p)) for p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{len(missing)} image(s) under {str(self.root)!r} have no "
                                    f"caption file: missing {shown}{more}")

    def _caption_path(self, rel: str) -> Path:
        return (self.root / rel).with_suffix(self.caption_extension)

    def __len__(self) -> int:
        return len(self.paths)

    def _open(self, path: Path):
        pil = require("PIL.Image", "jdit.data.ImageFolderSource")
        try:
            return pil.open(path)
        except (OSError, ValueError, pil.DecompressionBombError) as e:
            raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None

    def read_image(self, index: int) -> np.ndarray:
        """The image of example ``index`` as uint8 (H, W, 3)."""
        require("PIL.Image", "jdit.data.ImageFolderSource")
        ops = importlib.import_module("PIL.ImageOps")
        path = self.root / self.paths[index]
        with self._open(path) as im:
            try:
                im = ops.exif_transpose(im)
                if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                    im = im.convert("RGBA")
                elif im.mode != "RGB":
                    im = im.convert("RGB")
                arr = np.asarray(im)
            except (OSError, ValueError, SyntaxError) as e:
                raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
        return _as_rgb(arr, str(path))

    def read_caption(self, index: int) -> str:
        path = self._caption_path(self.paths[index])
        try:
            return path.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: caption file is not UTF-8 ({e})") from None
        except OSError as e:
            raise ValueError(f"{path}: cannot read caption file ({e})") from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise IndexError(f"{self.root}: index {index!r} out of range [0, {n})")
        index = int(index)
        return {"image": self.read_image(index), "caption": self.read_caption(index),
                "id": self.paths[index]}

    def size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of image ``index`` after EXIF orientation, from its header only."""
        path = self.root / self.paths[index]
        with self._open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:  # noqa: BLE001 - unreadable EXIF: as exif_transpose, ignore it
                orientation = 1
        return (w, h) if orientation in (5, 6, 7, 8) else (h, w)

    def sizes(self) -> np.ndarray:
        """``(N, 2)`` int array of every image's ``(height, width)``, for aspect-ratio buckets."""
        return np.array([self.size(i) for i in range(len(self))], dtype=np.int64).reshape(-1, 2)

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, len={len(self)})"
