"""A JSONL manifest of images and their captions or labels, read as a random-access source."""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from jdit.data.examples import BadExample, caption_text, check_index, for_example, label_value
from jdit.data.images import decode_image


def resolve(base: epath.Path, path: str) -> epath.Path:
    """``path`` relative to the folder ``base``, unless it is absolute or a URL (``gs://``)."""
    if path.startswith("/") or "://" in path:
        return epath.Path(path)
    return base / path


class ManifestSource:
    """The examples listed by a JSONL manifest, one JSON object per line::

        {"image": "images/0001.jpg", "caption": "a cat on a mat"}
        {"image": "/data/x.png", "caption": "...", "id": "x"}
        {"image": "n01440764/a.JPEG", "label": 0}          # label=True

    ``image`` paths are relative to the manifest's folder (absolute paths and ``gs://`` URLs are
    taken as they are); ``id`` (optional, a string) defaults to the ``image`` value as written.
    Blank lines are ignored (they take no index). The manifest is read and parsed once, at
    construction; a missing manifest is an error then. A line that is not a JSON object with
    an ``"image"`` string (or whose ``id`` is not a non-empty string) raises
    :class:`BadExample` ``"bad_manifest_line"`` naming its line number when its index is read;
    its id is then ``"<manifest name>:<line number>"``. A missing or empty caption, a bad label,
    an unreadable or missing image raise :class:`BadExample` as well. Ids are not checked for
    uniqueness: two lines with the same id are two indices with that id (a caller that keys
    examples by id keeps the first).

    ``source[i]`` is ``{"image": uint8 (H, W, 3), "id": str}`` plus ``"caption": str``
    (``kind == "text"``) or ``"label": int32`` (``label=True``, ``kind == "class"``).
    """

    def __init__(self, path: str | os.PathLike, *, label: bool = False):
        self.path = epath.Path(path)
        self.label = bool(label)
        self.kind = "class" if self.label else "text"
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest {str(self.path)!r} does not exist or is not a file")
        self._base = self.path.parent
        # One entry per non-blank line: (line number, the parsed object or what is wrong).
        self._entries: list[tuple[int, dict[str, Any] | str]] = []
        self._ids: list[str] = []
        for lineno, line in enumerate(self.path.read_bytes().split(b"\n"), start=1):
            if line.strip():
                entry = self._parse(line)
                self._entries.append((lineno, entry))
                self._ids.append(entry.get("id", entry["image"]) if isinstance(entry, dict)
                                 else f"{self.path.name}:{lineno}")
        if not self._entries:
            raise ValueError(f"manifest {str(self.path)!r} lists no examples")

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any] | str:
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            return "not UTF-8"
        except json.JSONDecodeError as e:
            return f"not JSON ({e.msg} at column {e.colno})"
        if not isinstance(obj, dict):
            return f"expected a JSON object, got a {type(obj).__name__}"
        if not isinstance(obj.get("image"), str) or not obj["image"]:
            return f"no \"image\" path (keys: {sorted(obj)})"
        if "id" in obj and (not isinstance(obj["id"], str) or not obj["id"]):
            return f"\"id\" must be a non-empty string, got {obj['id']!r:.60}"
        return obj

    def __len__(self) -> int:
        return len(self._entries)

    def example_id(self, index: int) -> str:
        return self._ids[check_index(index, len(self), str(self.path))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, len(self), str(self.path))
        lineno, entry = self._entries[index]
        where = f"{self.path}: line {lineno}"
        example_id = self._ids[index]
        with for_example(example_id):
            if isinstance(entry, str):
                raise BadExample("bad_manifest_line", f"{where}: {entry}")
            out: dict[str, Any] = ({"label": label_value(entry.get("label"), where)}
                                   if self.label else
                                   {"caption": caption_text(entry.get("caption"), where)})
            image = decode_image(resolve(self._base, entry["image"]))
        return {"image": image, **out, "id": example_id}

    def __repr__(self) -> str:
        return f"ManifestSource({str(self.path)!r}, kind={self.kind!r}, len={len(self)})"
