"""Config files: Python modules with ``get_config() -> ml_collections.ConfigDict``.

``load_config("configs/pixart_sigma_xl2_1024.py", ["model.depth=2"])`` imports the file and
applies ``--config.key=value``-style overrides (values parsed as Python literals, else strings).
As in big_vision, ``path.py:arg`` passes ``arg`` to ``get_config(arg)``: one file holds the stages
of a recipe (``configs/recipes/pixart_sigma.py:1024``).
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
    arg = None
    text = str(path)
    if not Path(text).is_file() and ":" in Path(text).name:
        text, _, arg = text.rpartition(":")
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"jdit_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    if arg is None:
        config = module.get_config()
    else:
        try:
            config = module.get_config(arg)
        except TypeError as e:
            if "positional argument" not in str(e):
                raise
            raise ValueError(f"{path}: get_config() takes no argument, but {arg!r} was given "
                             f"after ':'") from None
    apply_overrides(config, overrides)
    return config
