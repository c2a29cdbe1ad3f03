"""WebDataset-style tar shards read by index: a table of member offsets, bytes read on demand."""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any

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
from jdit.data.folders import IMAGE_EXTENSIONS
from jdit.data.images import decode_image

Members = dict[str, tuple[int, int]]  # extension -> (offset of the data in the shard, size)


def _index_shard(path: epath.Path) -> list[tuple[str, Members]]:
    """The examples of one shard, in the order their first member appears: ``(key, members)``.

    A member's key is its path up to the first dot of its file name, its extension the rest
    (``a/0001.seg.png``: key ``a/0001``, extension ``seg.png``). A key whose extension comes a
    second time starts a new example with the same key (a duplicate). Directories, links,
    hidden files and names without an extension are skipped.
    """
    examples: list[tuple[str, Members]] = []
    latest: dict[str, int] = {}  # key -> its latest example
    try:
        with path.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:  # reads the headers only, seeking over the data
                if not info.isfile():
                    continue
                name = info.name
                while name.startswith("./"):  # as `tar cf x.tar ./...` writes them
                    name = name[2:]
                folder, _, base = name.rpartition("/")
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = f"{folder}/{stem}" if folder else stem
                ext = ext.lower()
                k = latest.get(key)
                if k is None or ext in examples[k][1]:
                    k = latest[key] = len(examples)
                    examples.append((key, {}))
                examples[k][1][ext] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{path}: not a readable uncompressed tar file ({e}); shards must be "
                         "plain .tar (compressed ones cannot be read by index)") from None
    return examples


class TarShardSource:
    """The examples of WebDataset-style tar shards (``shard-000000.tar``, ...).

    Members are grouped into examples by key (the member path up to the first dot of its file
    name): ``0001.jpg`` with ``0001.txt`` (the caption), or ``0001.json`` (its ``"caption"``
    field; ``.txt`` wins when both exist), or, with ``label=True``, ``0001.cls`` (an integer) or
    the ``"label"`` field of ``0001.json``. Members of one example need not be adjacent. The
    image is the example's first member with an extension in ``extensions``. An example's id is
    ``"<shard file name>/<key>"``; shards must have distinct file names.

    Construction reads every shard's headers (not their data) into a table of member offsets;
    ``source[i]`` then reads the example's members from its shard, which may be a local path or
    a ``gs://`` URL (``etils.epath``). A shard that is not a plain tar file, or is cut short, is
    an error at construction naming it. A key that appears twice in a shard with the same
    extension (two ``0001.jpg``) gives two indices with the same id, in shard order: a caller
    that keys examples by id keeps the first and skips the duplicate. A missing image or
    caption, an unreadable image, an empty caption, a bad label raise :class:`BadExample`.

    ``source[i]`` is ``{"image": uint8 (H, W, 3), "id": str}`` plus ``"caption": str``
    (``kind == "text"``) or ``"label": int32`` (``kind == "class"``).
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], *,
                 label: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        if isinstance(shards, (str, os.PathLike)):
            shards = [shards]
        self.shards = [epath.Path(s) for s in shards]
        if not self.shards:
            raise ValueError("TarShardSource needs at least one shard")
        names = [s.name for s in self.shards]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"shards must have distinct file names (they prefix the example "
                             f"ids); repeated: {repeated}")
        for s in self.shards:
            if not s.is_file():
                raise FileNotFoundError(f"tar shard {str(s)!r} does not exist or is not a file")
        self.label = bool(label)
        self.kind = "class" if self.label else "text"
        self.image_extensions = tuple(e.lower().lstrip(".") for e in extensions)
        self._examples: list[tuple[int, str, Members]] = [
            (i, key, members) for i, shard in enumerate(self.shards)
            for key, members in _index_shard(shard)]
        if not self._examples:
            raise ValueError(f"no members in the tar shards {[str(s) for s in self.shards]}")

    def __len__(self) -> int:
        return len(self._examples)

    def example_id(self, index: int) -> str:
        shard, key, _ = self._examples[check_index(index, len(self), self._where())]
        return f"{self.shards[shard].name}/{key}"

    def _where(self) -> str:
        return str(self.shards[0]) if len(self.shards) == 1 else f"{len(self.shards)} tar shards"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, len(self), self._where())
        shard, key, members = self._examples[index]
        path = self.shards[shard]
        with for_example(self.example_id(index)):
            image_ext = next((e for e in members if e.rsplit(".", 1)[-1] in
                              self.image_extensions), None)
            if image_ext is None:
                raise BadExample("missing_image", f"{path}: {key} has no image member (has "
                                                  f"{sorted(members)})")
            wanted = ("cls", "json") if self.label else ("txt", "json")
            sidecar = next((e for e in wanted if e in members), None)
            if sidecar is None:
                what = "label" if self.label else "caption"
                raise BadExample(f"missing_{what}", f"{path}: {key} has no {what} member "
                                                    f"({key}.{wanted[0]} or {key}.json)")
            # One open per example: no file handle is shared between reader threads or kept
            # across the fork of grain's worker processes.
            with path.open("rb") as f:
                data = {e: self._member(f, path, key, e, members[e]) for e in (sidecar, image_ext)}
            out = self._condition(data[sidecar], f"{path}:{key}.{sidecar}", sidecar)
            image = decode_image(data[image_ext], name=f"{path}:{key}.{image_ext}")
        return {"image": image, **out, "id": self.example_id(index)}

    @staticmethod
    def _member(f: Any, path: epath.Path, key: str, ext: str, span: tuple[int, int]) -> bytes:
        offset, size = span
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise BadExample("unreadable_image" if ext not in ("txt", "json", "cls")
                             else "bad_sidecar",
                             f"{path}:{key}.{ext}: cut short ({len(data)} of {size} bytes)")
        return data

    def _condition(self, data: bytes, where: str, ext: str) -> dict[str, Any]:
        if ext == "json":
            obj = json_sidecar(data, where)
            if self.label:
                return {"label": label_value(obj.get("label"), where)}
            return {"caption": caption_text(obj.get("caption"), where)}
        if ext == "cls":
            return {"label": label_file(data, where)}
        return {"caption": caption_file(data, where)}

    def __repr__(self) -> str:
        return f"TarShardSource({self._where()}, kind={self.kind!r}, len={len(self)})"


_GLOB = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``shard-{000..002}.tar`` -> ``shard-000.tar``, ``shard-001.tar``, ``shard-002.tar``;
    ``{a,b}`` -> both. A numeric range keeps the zero padding of its first bound."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        first, last = bounds.groups()
        if int(first) > int(last):
            raise ValueError(f"{pattern}: the range {{{body}}} goes down; write it upwards")
        width = len(first) if first.startswith("0") else 0
        choices = [str(k).zfill(width) for k in range(int(first), int(last) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"{pattern}: cannot expand {{{body}}}: expected {{first..last}} (numbers) "
                         "or {a,b,...}")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [p for choice in choices for p in expand_braces(head + choice + tail)]


def _glob(pattern: str) -> list[epath.Path]:
    """Sorted matches of a glob pattern (``*``, ``?``, ``[...]`` in any path component)."""
    parts = pattern.split("/")
    first = next(k for k, part in enumerate(parts) if _GLOB.search(part))
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    return sorted(epath.Path(base).glob("/".join(parts[first:])), key=str)


def shard_paths(pattern: str) -> list[epath.Path]:
    """The ``.tar`` files a brace and/or glob pattern names, in order (braces in the order
    written, glob matches sorted); a glob without matches or a match that is not ``.tar`` is an
    error."""
    paths: list[epath.Path] = []
    for p in expand_braces(pattern):
        if _GLOB.search(p):
            matches = _glob(p)
            if not matches:
                raise FileNotFoundError(f"no files match {p!r}")
            paths.extend(matches)
        else:
            paths.append(epath.Path(p))
    paths = list(dict.fromkeys(paths))  # a file named by two alternatives is one shard
    other = [str(p) for p in paths if not p.name.endswith(".tar")]
    if other:
        raise ValueError(f"{pattern!r} names files that are not .tar shards: {other[:5]}")
    return paths
