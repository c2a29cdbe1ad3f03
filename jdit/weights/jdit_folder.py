"""The jdit checkpoint folder: ``config.json`` (architecture) + ``params.safetensors``.

Parameters are stored flat (``block_0/attn/qkv/kernel``) in the unscanned layout, so a checkpoint
loads into a scanned or an unscanned model alike. Folders are written atomically: into a
temporary sibling that is renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jdit.files import check_replaceable, read_json_object
from jdit.weights.safetensors_io import read_safetensors, write_safetensors
from jdit.weights.state_dict import Tree, flatten, unflatten

FORMAT = "jdit"
FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"


def is_jdit_checkpoint(folder: str | Path) -> bool:
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def check_destination(folder: str | Path, overwrite: bool = False) -> None:
    """Raise unless a checkpoint may be written at ``folder``: absent, empty, or (with
    ``overwrite``) a jdit checkpoint. Never the user's files, whatever ``overwrite`` says."""
    check_replaceable(folder, ours=is_jdit_checkpoint, what="a jdit checkpoint")
    if is_jdit_checkpoint(folder) and not overwrite:
        raise FileExistsError(f"{folder} holds a jdit checkpoint; pass overwrite=True "
                              "(--overwrite) to replace it")


def write_checkpoint(folder: str | Path, architecture: Mapping[str, Any], params: Tree,
                     *, overwrite: bool = False) -> None:
    folder = Path(folder)
    check_destination(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = folder.parent / f".{folder.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": dict(architecture)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        flat = {k: np.asarray(v) for k, v in flatten(params).items()}
        write_safetensors(tmp / PARAMS_FILE, flat, metadata={"format": FORMAT})
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{tag}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_checkpoint(folder: str | Path) -> tuple[dict[str, Any], Tree]:
    """``(architecture, params)`` of a jdit checkpoint folder."""
    folder = Path(folder)
    config = read_json_object(folder / "config.json")
    version = config.get("format_version")
    if config.get("format") != FORMAT or version != FORMAT_VERSION:
        raise ValueError(f"{folder}: not a jdit checkpoint of format version {FORMAT_VERSION} "
                         f"(format={config.get('format')!r}, version={version!r})")
    if not isinstance(config.get("model"), dict) or "family" not in config["model"]:
        raise ValueError(f"{folder}/config.json: 'model' must hold the architecture with a 'family'")
    return dict(config["model"]), unflatten(read_safetensors(folder / PARAMS_FILE))
