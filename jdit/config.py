"""Config files: Python modules with ``get_config() -> ml_collections.ConfigDict``.

``load_config("configs/pixart_sigma_xl2_1024.py", ["model.depth=2"])`` imports the file and
applies ``--config.key=value``-style overrides (values parsed as Python literals, else strings).
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections


def parse_value(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key.subkey=value")
        *parents, leaf = key.strip().split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise ValueError(f"unknown config key {'.'.join(parents[: i + 1])!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"unknown config key {key!r}; keys here: {sorted(node.keys())}")
        value = parse_value(raw)
        current = node[leaf]
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        node[leaf] = value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"jdit_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    config = module.get_config()
    apply_overrides(config, overrides)
    return config
