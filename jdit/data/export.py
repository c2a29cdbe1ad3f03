"""Export an embedded dataset (``shapes``, ``digits``) as a folder of PNG files with sidecars.

The folder is what :func:`jdit.data.sources.open_source` reads (and what ``jdit cache``
encodes), so the real-data path can be tried end to end on data whose training batches are
known exactly::

    shapes: 00000.png + 00000.txt (the caption)    open_source(folder)
    digits: 00000.png + 00000.cls (the label)      open_source(folder, label=True)
    jdit_export.json                               what was exported (jdit's marker)

Example ``i`` is row ``i % batch_size`` of training batch ``i // batch_size`` of the task with
``train.seed = seed``, ``train.batch_size = batch_size`` and ``data.size = size`` (the other
``data`` keys at their defaults; :mod:`jdit.train.tasks`), so an export of N examples holds the
first N examples a run with those settings trains on. Pixels are those images in [-1, 1]
written as 8 bits: ``round((x + 1) * 127.5)``; exact for shapes (rendered in 8 bits), within
1/255 for digits (upsampled bilinearly in floating point). Digits are grey PNGs; they read
back as RGB with three equal channels.

The folder is written beside its destination and renamed into place when complete; a folder
holding anything but an earlier export (or nothing) is refused (:func:`jdit.files.check_replaceable`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jdit.data.examples import require
from jdit.files import atomic_write, check_replaceable, read_json_object

MARKER = "jdit_export.json"
FORMAT = "jdit-export"
# The data defaults of the training tasks (jdit.config.DATA; a test keeps them equal): the
# embedded data must be drawn exactly as a run draws it.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {"shapes": {"size": 32, "pair_fraction": 0.5},
                                            "digits": {"size": 32}}
DEFAULT_BATCH_SIZE = 64  # the tiny recipes' train.batch_size


def is_export(path: Path) -> bool:
    """Whether ``path`` is a folder :func:`export_dataset` wrote (its marker says so)."""
    try:
        return read_json_object(Path(path) / MARKER).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _batches(name: str, seed: int, size: int, batch_size: int, pair_fraction: float
             ) -> Iterator[tuple[np.ndarray, list[str] | np.ndarray]]:
    """Training batches ``0, 1, ...``: (images float [-1, 1] (B, H, W, C), captions or labels)."""
    k = 0
    while True:
        if name == "shapes":
            from jdit.data import shapes

            b = shapes.batch(seed, k, batch_size, size=size, pair_fraction=pair_fraction)
            yield b["images"], list(b["captions"])
        else:
            from jdit.data import digits

            b = digits.batch(seed, k, batch_size, size=size)
            yield b["images"], np.asarray(b["labels"], np.int32)
        k += 1


def _png(pixels: np.ndarray) -> bytes:
    pil = require("PIL.Image", "jdit.data.export")
    buf = io.BytesIO()
    pil.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def _check_args(name: str, num_examples: int, seed: int, batch_size: int) -> None:
    if name not in TASK_DEFAULTS:
        raise ValueError(f"cannot export {name!r}: the embedded datasets are "
                         f"{sorted(TASK_DEFAULTS)}")
    for what, value, low in (("num_examples", num_examples, 1), ("seed", seed, 0),
                             ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")


def _write(folder: Path, name: str, num_examples: int, seed: int, size: int, batch_size: int,
           pair_fraction: float, progress: bool) -> None:
    from tqdm import tqdm

    width = max(5, len(str(num_examples - 1)))  # names sort in index order
    sidecar = ".txt" if name == "shapes" else ".cls"
    done = 0
    with tqdm(total=num_examples, unit="image", desc=f"export {name}", disable=not progress) as bar:
        for images, conditions in _batches(name, seed, size, batch_size, pair_fraction):
            pixels = np.round((images.astype(np.float64) + 1.0) * 127.5).clip(0, 255)
            for row in range(min(batch_size, num_examples - done)):
                stem = folder / f"{done:0{width}d}"
                # Plain writes: the folder is private until renamed into place, whole.
                stem.with_suffix(".png").write_bytes(_png(pixels[row].astype(np.uint8)))
                stem.with_suffix(sidecar).write_text(f"{conditions[row]}\n", encoding="utf-8")
                done += 1
            bar.update(done - bar.n)
            if done == num_examples:
                break
    marker = {"format": FORMAT, "version": 1, "dataset": name, "num_examples": num_examples,
              "seed": seed, "size": size, "batch_size": batch_size,
              **({"pair_fraction": pair_fraction} if name == "shapes" else {}),
              "read_with": "open_source(folder)" if name == "shapes"
              else "open_source(folder, label=True)"}
    atomic_write(folder / MARKER, json.dumps(marker, indent=1) + "\n")


def _publish(staging: Path, directory: Path) -> None:
    """Rename the complete ``staging`` folder to ``directory``, replacing an empty folder or
    an earlier export (already checked)."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    old = directory.with_name(f".{directory.name}.{secrets.token_hex(4)}.old")
    os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old)


def export_dataset(name: str, directory: str | os.PathLike, num_examples: int, *,
                   seed: int = 0, size: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, pair_fraction: float | None = None,
                   progress: bool = False) -> Path:
    """Write the first ``num_examples`` training examples of the embedded dataset ``name``
    (``"shapes"`` or ``"digits"``) for ``seed`` / ``batch_size`` / ``size`` (default: the
    task's, 32) to the folder ``directory`` as PNG files with caption or label sidecars (see
    the module's docstring); returns its path. ``pair_fraction`` (shapes: the share of
    two-object captions, ``data.pair_fraction``; default the task's) must match the run's
    config for the export to equal its examples (configs/shapes_tiny.py uses 0.6).
    ``progress`` shows a progress bar.

    ``directory`` must be absent, empty, or an earlier export (replaced); a folder of anything
    else, or a file, is refused with ``FileExistsError`` and left untouched.
    """
    _check_args(name, num_examples, seed, batch_size)
    size = TASK_DEFAULTS[name]["size"] if size is None else size
    if pair_fraction is None:
        pair_fraction = TASK_DEFAULTS["shapes"]["pair_fraction"]
    if name != "shapes" and pair_fraction != TASK_DEFAULTS["shapes"]["pair_fraction"]:
        raise ValueError("pair_fraction applies to the shapes dataset only")
    if not 0.0 <= float(pair_fraction) <= 1.0:
        raise ValueError(f"pair_fraction must lie in [0, 1], got {pair_fraction!r}")
    directory = Path(directory)
    check_replaceable(directory, ours=is_export, what="a jdit export")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.{secrets.token_hex(4)}.partial")
    staging.mkdir()
    try:
        _write(staging, name, int(num_examples), int(seed), int(size), int(batch_size),
               float(pair_fraction), progress)
        _publish(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}"
                                             ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``jdit export``."""
    parser.add_argument("dataset", choices=sorted(TASK_DEFAULTS), help="the embedded dataset")
    parser.add_argument("directory", type=Path, help="the folder to write (absent, empty, or an "
                                                     "earlier export)")
    parser.add_argument("-n", "--num-examples", type=_int_at_least(1), required=True,
                        help="how many examples (the first ones of the training stream)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, help="train.seed (default 0)")
    parser.add_argument("--size", type=_int_at_least(1), default=None,
                        help="image size, data.size (default: the task's, 32)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=DEFAULT_BATCH_SIZE,
                        help=f"train.batch_size the examples follow (default "
                             f"{DEFAULT_BATCH_SIZE})")
    parser.add_argument("--pair-fraction", type=float, default=None,
                        help="shapes: data.pair_fraction of the run to match (default 0.5; "
                             "configs/shapes_tiny.py uses 0.6)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``jdit export``: write the folder, print what was written (JSON) to stdout."""
    path = export_dataset(args.dataset, args.directory, args.num_examples, seed=args.seed,
                          size=args.size, batch_size=args.batch_size,
                          pair_fraction=args.pair_fraction, progress=not args.quiet)
    print(json.dumps({"directory": str(path), **read_json_object(path / MARKER)}, indent=2),
          file=sys.stdout)
    return 0
