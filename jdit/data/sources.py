"""Random-access data sources for real datasets, and :func:`open_source` to pick one from a spec.

A source has ``len(source)``, ``source[i] -> dict`` (any ``i`` in any order, the same answer
every time), which is what :mod:`jdit.data.loader` (grain) shuffles, shards and batches,
``source.example_id(i)`` (the example's id without reading it) and ``source.kind`` (``"text"``
or ``"class"``). Examples are dicts of numpy values::

    {"image": uint8 (H, W, 3), "caption": str, "id": str}    # text-image data
    {"image": uint8 (H, W, 3), "label": int32 (), "id": str} # class-labelled data

Images keep their own size here; the loader resizes them to a fixed size or to their
aspect-ratio bucket. ``id`` names the example within its source (TFDS: ``"{split}/{index}"``,
image folder: the image's relative path, manifest: its ``id`` or image path, tar shards:
``"{shard name}/{key}"``), e.g. as the key of a :mod:`jdit.data.cache`.

One unusable example (an unreadable image, an empty caption, a broken manifest line) raises
:class:`BadExample` from ``source[i]``, with a ``reason`` code (:data:`REASONS`) and the
``example_id``, so that a caller encoding a whole dataset can skip it and say why; a missing
folder or manifest is an ordinary error when the source is built.

The sources: :class:`TfdsSource` (:func:`tfds_source`), :class:`ImageFolderSource`
(:mod:`jdit.data.folders`), :class:`ManifestSource` (:mod:`jdit.data.manifests`),
:class:`TarShardSource` (:mod:`jdit.data.tars`). TFDS, grain and Pillow are optional
(``pip install 'jdit[data]'``) and imported only when used; paths go through ``etils.epath``,
so ``gs://`` URLs work where local paths do.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from etils import epath

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
from jdit.data.manifests import ManifestSource
from jdit.data.tars import TarShardSource, shard_paths

__all__ = ["IMAGE_EXTENSIONS", "REASONS", "BadExample", "ImageFolderSource", "ManifestSource",
           "TarShardSource", "TfdsSource", "decode_image", "image_size", "open_source", "require",
           "tfds_source"]


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
    folder = epath.Path(os.path.expanduser(str(name)))  # gs:// version folders too
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


SPEC_FORMS = """a source is one of:
  FOLDER                       images with caption sidecars (name.txt, or name.json with
                               "caption"); with label=True, name.cls / name.json "label" sidecars
                               or one folder per class
  FILE.jsonl                   a manifest: one {"image": path, "caption": text} (or "label": int)
                               per line, paths relative to the manifest's folder
  FILE.tar, FOLDER of .tar     WebDataset-style tar shards (0001.jpg + 0001.txt / .json / .cls)
  PATTERN.tar                  shards named by braces and/or globs: shard-{000000..000099}.tar,
                               data/*.tar
  tfds:NAME/SPLIT              a TFDS dataset prepared as array_record (NAME may hold a config
                               and version: coco_captions/2017:1.1.0; SPLIT is what follows
                               the last '/': train, validation[:10%])
  tfds:VERSION_FOLDER/SPLIT    a prepared TFDS version folder (holding dataset_info.json)"""


def open_source(spec: str | os.PathLike, *, label: bool = False,
                data_dir: str | os.PathLike | None = None, caption_feature: str | None = None,
                **kwargs: Any) -> TfdsSource | ImageFolderSource | ManifestSource | TarShardSource:
    """The source a ``spec`` names (:data:`SPEC_FORMS`): text-image data, or class-labelled data
    with ``label=True``.

    A path that exists is taken as it is: a folder holding ``.tar`` files (and no images) is a
    :class:`TarShardSource` of them (sorted), another folder an :class:`ImageFolderSource`, a
    ``.jsonl`` file a :class:`ManifestSource`, a ``.tar`` file a one-shard
    :class:`TarShardSource`; otherwise braces and globs are expanded to tar shards
    (:func:`jdit.data.tars.shard_paths`). ``tfds:`` specs go to :func:`tfds_source` with
    ``data_dir``; a text dataset needs ``caption_feature`` (the caption's feature name), a
    class dataset ``label=True`` (feature ``"label"``, or ``label_feature=...``). Other keyword
    arguments go to the source's constructor (e.g. ``missing_sidecar="skip"`` for a folder).
    Anything else is an error listing the accepted forms.
    """
    spec = os.fspath(spec)
    if spec.startswith("tfds:"):
        return _open_tfds(spec, label=label, data_dir=data_dir, caption_feature=caption_feature,
                          **kwargs)
    if data_dir is not None or caption_feature is not None:
        raise ValueError(f"{spec}: data_dir and caption_feature apply to tfds: sources only")
    path = epath.Path(spec)
    if path.is_dir():
        tars = sorted((p for p in path.iterdir() if p.name.endswith(".tar")
                       and not p.name.startswith(".") and p.is_file()), key=str)
        if not tars:
            return ImageFolderSource(path, label=label, **kwargs)
        images = [p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        if images:
            raise ValueError(f"{spec}: holds both .tar shards and images ({images[0]}, ...); "
                             "name the shards (DIR/*.tar) or move them apart")
        return TarShardSource(tars, label=label, **kwargs)
    if path.is_file():
        if path.name.endswith(".jsonl"):
            return ManifestSource(path, label=label, **kwargs)
        if path.name.endswith(".tar"):
            return TarShardSource([path], label=label, **kwargs)
        raise ValueError(f"{spec}: not a source jdit can read; {SPEC_FORMS}")
    if any(c in spec for c in "{*?["):
        return TarShardSource(shard_paths(spec), label=label, **kwargs)
    raise FileNotFoundError(f"{spec}: no such file or folder; {SPEC_FORMS}")


def _open_tfds(spec: str, *, label: bool, data_dir: str | os.PathLike | None,
               caption_feature: str | None, **kwargs: Any) -> TfdsSource:
    name, _, split = spec.removeprefix("tfds:").rpartition("/")
    if not name or not split:
        raise ValueError(f"{spec!r}: expected tfds:NAME/SPLIT (e.g. tfds:imagenet2012/train) or "
                         "tfds:VERSION_FOLDER/SPLIT")
    if label and caption_feature is not None:
        raise ValueError(f"{spec}: give caption_feature (text-image data) or label=True (class "
                         "labels), not both")
    if not label and caption_feature is None:
        raise ValueError(f"{spec}: a text-image TFDS dataset needs caption_feature (the name of "
                         "its caption feature, 'a/b' for a nested one); for class labels pass "
                         "label=True")
    label_feature = kwargs.pop("label_feature", "label") if label else None
    source = tfds_source(name, split, data_dir, caption_feature=caption_feature,
                         label_feature=label_feature, **kwargs)
    if label and source.label_feature is None:
        raise ValueError(f"{spec}: the dataset has no {label_feature!r} feature (pass "
                         "label_feature=... to name its label)")
    return source
