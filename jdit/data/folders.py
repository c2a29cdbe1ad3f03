"""A folder of images with caption or label sidecars, read as a random-access source."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from etils import epath

from jdit.data.examples import (
    BadExample,
    caption_file,
    caption_text,
    check_index,
    for_example,
    json_sidecar,
    label_file,
    label_value,
)
from jdit.data.images import decode_image, image_size

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
MissingSidecar = Literal["error", "skip"]


def _walk(root: epath.Path, exts: set[str]) -> tuple[list[str], set[str]]:
    """(sorted relative POSIX paths of the images, relative paths of every file) under
    ``root``, hidden files and folders left out."""
    images, files = [], set()
    for dirpath, dirnames, filenames in root.walk():
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = epath.Path(dirpath).relative_to(root).as_posix()
        for f in filenames:
            if f.startswith("."):
                continue
            rel = f if rel_dir == "." else f"{rel_dir}/{f}"
            files.add(rel)
            if os.path.splitext(f)[1].lower() in exts:
                images.append(rel)
    return sorted(images), files


def _stem(rel: str) -> str:
    return os.path.splitext(rel)[0]


class ImageFolderSource:
    """Images under ``root`` (any depth), each with a caption, or with a class label.

    Images are the files whose extension (any case) is in ``extensions``; hidden files and
    folders (name starting with ``.``) are skipped. Order: sorted relative POSIX paths, so the
    same folder gives the same indices on every machine; ``id`` is that relative path.

    Captions (``label=False``, ``kind == "text"``): ``photos/cat.jpg`` pairs with the sidecar
    ``photos/cat.txt`` (UTF-8, surrounding whitespace stripped) or, when there is none,
    ``photos/cat.json`` with a ``"caption"`` field (the LoRA trainers' convention).

    Labels (``label=True``, ``kind == "class"``): an integer from ``photos/cat.cls`` or, when
    there is none, the ``"label"`` field of ``photos/cat.json``; or, ImageNet-style, the class
    folder: with ``class_folders=True`` the label of ``n01440764/x.JPEG`` is the index of
    ``n01440764`` among the sorted names of the first-level folders that hold images
    (``source.classes``). ``class_folders=None`` chooses class folders when no image has a
    ``.cls`` or ``.json`` sidecar and every image lies one folder deep.

    An image without its sidecar (or, with class folders, one directly under ``root``) is an
    error at construction naming them (``missing_sidecar="error"``), or reading it raises
    :class:`BadExample` ``"missing_caption"`` / ``"missing_label"`` (``"skip"``: for a caller
    that skips bad examples). An unreadable image, an empty or non-UTF-8 caption, a bad label
    raise :class:`BadExample` naming the file when that example is read.
    ``source[i]`` is ``{"image": uint8 (H, W, 3), "id": str}`` plus ``"caption": str`` or
    ``"label": int32``. ``root`` may be any ``etils.epath`` path (``gs://...``).
    """

    def __init__(self, root: str | os.PathLike, *, label: bool = False,
                 class_folders: bool | None = None, missing_sidecar: MissingSidecar = "error",
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, caption_extension: str = ".txt"):
        self.root = epath.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a "
                                    "directory")
        if missing_sidecar not in ("error", "skip"):
            raise ValueError(f"missing_sidecar must be 'error' or 'skip', got {missing_sidecar!r}")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        if caption_extension.lower() in exts:
            raise ValueError(f"caption_extension {caption_extension!r} is also an image extension")
        self.caption_extension = caption_extension
        self.label = bool(label)
        self.kind = "class" if self.label else "text"
        self.paths, self._files = _walk(self.root, exts)
        if not self.paths:
            raise ValueError(f"no images ({', '.join(sorted(exts))}) under {str(self.root)!r}")
        self.class_folders = self._use_class_folders(class_folders)
        self.classes: list[str] = sorted({p.split("/")[0] for p in self.paths if "/" in p}
                                         ) if self.class_folders else []
        self._class_index = {name: k for k, name in enumerate(self.classes)}
        missing = [p for p in self.paths if not self._has_sidecar(p)]
        if missing and missing_sidecar == "error":
            self._refuse_missing(missing)

    def _use_class_folders(self, class_folders: bool | None) -> bool:
        if not self.label:
            if class_folders:
                raise ValueError("class_folders=True needs label=True")
            return False
        if class_folders is not None:
            return bool(class_folders)
        has_sidecars = any(self._label_sidecar(p) is not None for p in self.paths)
        return not has_sidecars and all(p.count("/") == 1 for p in self.paths)

    def _caption_sidecar(self, rel: str) -> str | None:
        for ext in (self.caption_extension, ".json"):
            if _stem(rel) + ext in self._files:
                return _stem(rel) + ext
        return None

    def _label_sidecar(self, rel: str) -> str | None:
        for ext in (".cls", ".json"):
            if _stem(rel) + ext in self._files:
                return _stem(rel) + ext
        return None

    def _has_sidecar(self, rel: str) -> bool:
        if self.class_folders:
            return "/" in rel
        return (self._label_sidecar(rel) if self.label else self._caption_sidecar(rel)) is not None

    def _refuse_missing(self, missing: list[str]) -> None:
        shown = ", ".join(str(self.root / p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        hint = ("(pass missing_sidecar='skip' to have them raise BadExample when read, for a "
                "caller that skips bad examples)")
        if self.class_folders:
            raise FileNotFoundError(f"{len(missing)} image(s) under {str(self.root)!r} are not in "
                                    f"a class folder: {shown}{more} {hint}")
        if self.label:
            wanted = ", ".join(str(self.root / _stem(p)) + ".cls" for p in missing[:5])
            raise FileNotFoundError(f"{len(missing)} image(s) under {str(self.root)!r} have no "
                                    f"label file (.cls or .json): missing {wanted}{more} {hint}")
        wanted = ", ".join(str(self.root / _stem(p)) + self.caption_extension
                           for p in missing[:5])
        raise FileNotFoundError(f"{len(missing)} image(s) under {str(self.root)!r} have no "
                                f"caption file ({self.caption_extension} or .json): missing "
                                f"{wanted}{more} {hint}")

    def __len__(self) -> int:
        return len(self.paths)

    def example_id(self, index: int) -> str:
        return self.paths[check_index(index, len(self), str(self.root))]

    def _read(self, rel: str) -> bytes:
        path = self.root / rel
        try:
            return path.read_bytes()
        except OSError as e:  # deleted or unreadable since the folder was listed
            raise BadExample("bad_sidecar", f"{path}: cannot read sidecar ({e})") from None

    def read_image(self, index: int) -> np.ndarray:
        """The image of example ``index`` as uint8 (H, W, 3)."""
        with for_example(self.paths[index]):
            return decode_image(self.root / self.paths[index])

    def read_caption(self, index: int) -> str:
        rel = self.paths[index]
        sidecar = self._caption_sidecar(rel)
        with for_example(rel):
            if sidecar is None:
                raise BadExample("missing_caption", f"{self.root / rel}: no caption file "
                                                    f"({self.caption_extension} or .json)")
            where = str(self.root / sidecar)
            if sidecar.endswith(".json"):
                return caption_text(json_sidecar(self._read(sidecar), where).get("caption"),
                                    where)
            return caption_file(self._read(sidecar), where)

    def read_label(self, index: int) -> np.int32:
        rel = self.paths[index]
        with for_example(rel):
            if self.class_folders:
                if "/" not in rel:
                    raise BadExample("missing_label", f"{self.root / rel}: not in a class folder")
                return np.int32(self._class_index[rel.split("/")[0]])
            sidecar = self._label_sidecar(rel)
            if sidecar is None:
                raise BadExample("missing_label", f"{self.root / rel}: no label file (.cls or "
                                                  ".json)")
            where = str(self.root / sidecar)
            if sidecar.endswith(".json"):
                return label_value(json_sidecar(self._read(sidecar), where).get("label"), where)
            return label_file(self._read(sidecar), where)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, len(self), str(self.root))
        # The sidecar first: a missing caption is reported without decoding the image.
        out: dict[str, Any] = ({"label": self.read_label(index)} if self.label
                               else {"caption": self.read_caption(index)})
        return {"image": self.read_image(index), **out, "id": self.paths[index]}

    def size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of image ``index`` after EXIF orientation, from its header only."""
        rel = self.paths[check_index(index, len(self), str(self.root))]
        with for_example(rel):
            return image_size(self.root / rel)

    def sizes(self) -> np.ndarray:
        """``(N, 2)`` int array of every image's ``(height, width)``, for aspect-ratio buckets
        (a :class:`BadExample` for the first unreadable image)."""
        return np.array([self.size(i) for i in range(len(self))], dtype=np.int64).reshape(-1, 2)

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, kind={self.kind!r}, len={len(self)})"
