"""Random-access data sources for real datasets: TFDS ``data_source`` and image folders.

A source has ``len(source)``, ``source[i] -> dict`` (any ``i`` in any order, the same answer
every time), which is what :mod:`jdit.data.loader` (grain) shuffles, shards and batches,
``source.example_id(i)`` (the example's id without reading it) and ``source.kind`` (``"text"``
or ``"class"``). Examples are dicts of numpy values::

    {"image": uint8 (H, W, 3), "caption": str, "id": str}    # text-image data
    {"image": uint8 (H, W, 3), "label": int32 (), "id": str} # class-labelled data

Images keep their own size here; the loader resizes them to a fixed size or to their
aspect-ratio bucket. ``id`` names the example within its source (TFDS: ``"{split}/{index}"``,
image folder: the image's relative path), e.g. as the key of a :mod:`jdit.data.cache`.

One unusable example (an unreadable image, an empty caption, a broken manifest line) raises
:class:`BadExample` from ``source[i]``, with a ``reason`` code (:data:`REASONS`) and the
``example_id``, so that a caller encoding a whole dataset can skip it and say why; a missing
folder or manifest is an ordinary error when the source is built.

The sources: :class:`TfdsSource` (:func:`tfds_source`), :class:`ImageFolderSource`
(:mod:`jdit.data.folders`). TFDS, grain and Pillow are optional
(``pip install 'jdit[data]'``) and imported only when used; paths go through ``etils.epath``,
so ``gs://`` URLs work where local paths do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jdit.data.examples import (
    REASONS,
    BadExample,
    as_rgb,
    caption_text,
    check_index,
    for_example,
    require,
)
from jdit.data.folders import IMAGE_EXTENSIONS, ImageFolderSource
from jdit.data.images import decode_image, image_size

__all__ = ["IMAGE_EXTENSIONS", "REASONS", "BadExample", "ImageFolderSource", "TfdsSource",
           "decode_image", "image_size", "require", "tfds_source"]


def _tfds_caption(value: Any, where: str) -> str:
    """A TFDS caption: a str or bytes, or a sequence of them (the first one is used)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            raise BadExample("missing_caption", f"{where}: empty list of captions")
        value = value[0]
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
    return caption_text(value, where)


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
    (when ``caption_feature`` is set; ``kind == "text"``) or ``"label"`` (when the dataset has
    ``label_feature``; ``kind == "class"``); with neither, ``kind`` is None. A caption that is
    empty, not UTF-8 or not text raises :class:`BadExample`.
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

    @property
    def kind(self) -> str | None:
        if self.caption_feature is not None:
            return "text"
        return "class" if self.label_feature is not None else None

    def __len__(self) -> int:
        return len(self.data_source)

    def example_id(self, index: int) -> str:
        return f"{self.split}/{check_index(index, len(self), f'{self.name}/{self.split}')}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, len(self), f"{self.name}/{self.split}")
        raw = self.data_source[index]
        where = f"{self.name}/{self.split}[{index}]"
        example_id = self.example_id(index)
        image = np.asarray(_get_path(raw, self.image_feature, where))
        out: dict[str, Any] = {"image": as_rgb(image, where) if self.rgb else image,
                               "id": example_id}
        with for_example(example_id):
            if self.caption_feature is not None:
                out["caption"] = _tfds_caption(_get_path(raw, self.caption_feature, where), where)
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

