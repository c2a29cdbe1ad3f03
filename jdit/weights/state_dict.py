"""Name-by-name conversion of PyTorch state dicts into jdit parameter trees, with one clear error.

A converter asks a :class:`StateDict` for each tensor it needs, stating the PyTorch shape it
expects. Nothing raises midway: absent keys, wrong shapes and keys nobody asked for are collected,
and :meth:`StateDict.finish` raises a single :class:`CheckpointMismatchError` listing all of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

Tree = dict[str, Any]


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 misshaped: list[str]) -> None:
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        lines = [f"checkpoint {source} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        super().__init__("\n".join(lines))


class StateDict:
    """A PyTorch-named tensor dict that records what a converter used, missed or mis-shaped."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str,
                 ignore: Iterable[str] = ()) -> None:
        self.tensors = dict(tensors)
        self.source = source
        self.used: set[str] = {k for k in self.tensors if k in set(ignore)}
        self.missing: list[str] = []
        self.misshaped: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...] | None:
        return tuple(self.tensors[key].shape) if key in self.tensors else None

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        if key not in self.tensors:
            self.missing.append(key)
            return None
        self.used.add(key)
        value = self.tensors[key]
        if tuple(value.shape) != tuple(shape):
            self.misshaped.append(f"{key}: expected {tuple(shape)}, got {tuple(value.shape)}")
            return None
        return np.asarray(value)

    def linear(self, prefix: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
               bias: bool = True, conv1x1: bool = False) -> Tree | None:
        """``nn.Linear`` (out, in) -> kernel ``in_shape + out_shape`` and bias ``out_shape``.
        ``conv1x1``: a 1×1 ``Conv2d`` (out, in, 1, 1), the same map."""
        fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
        w = self.take(f"{prefix}.weight", (fan_out, fan_in) + ((1, 1) if conv1x1 else ()))
        b = self.take(f"{prefix}.bias", (fan_out,)) if bias else None
        if w is None or (bias and b is None):
            return None
        out = {"kernel": w.reshape(fan_out, fan_in).T.reshape(in_shape + out_shape)}
        if b is not None:
            out["bias"] = b.reshape(out_shape)
        return out

    def stacked_linears(self, prefixes: list[str], in_dim: int, out_shape: tuple[int, ...],
                        bias: bool = True) -> Tree | None:
        """Several ``nn.Linear`` (e.g. to_q, to_k, to_v) fused on a new axis after the input."""
        parts = [self.linear(p, (in_dim,), out_shape, bias=bias) for p in prefixes]
        if any(p is None for p in parts):
            return None
        out = {"kernel": np.stack([p["kernel"] for p in parts], axis=1)}
        if bias:
            out["bias"] = np.stack([p["bias"] for p in parts], axis=0)
        return out

    def layer_norm(self, prefix: str, dim: int) -> Tree | None:
        scale = self.take(f"{prefix}.weight", (dim,))
        bias = self.take(f"{prefix}.bias", (dim,))
        return None if scale is None or bias is None else {"scale": scale, "bias": bias}

    def patch_conv(self, prefix: str, in_channels: int, hidden: int, patch: int) -> Tree | None:
        """``Conv2d`` (D, C, p, p) -> kernel (p, p, C, D)."""
        w = self.take(f"{prefix}.weight", (hidden, in_channels, patch, patch))
        b = self.take(f"{prefix}.bias", (hidden,))
        return None if w is None or b is None else {"kernel": w.transpose(2, 3, 1, 0), "bias": b}

    def depthwise_conv(self, prefix: str, channels: int | tuple[int, ...], k: int) -> Tree | None:
        """Depthwise ``Conv2d`` (D, 1, k, k) -> kernel (k, k, *channels), bias ``channels``
        (``channels`` a tuple splits D, e.g. (2, F) for a GLU's value and gate halves)."""
        shape = (channels,) if isinstance(channels, int) else tuple(channels)
        d = math.prod(shape)
        w = self.take(f"{prefix}.weight", (d, 1, k, k))
        b = self.take(f"{prefix}.bias", (d,))
        if w is None or b is None:
            return None
        return {"kernel": w[:, 0].transpose(1, 2, 0).reshape(k, k, *shape), "bias": b.reshape(shape)}

    def rms_norm(self, prefix: str, dim: int) -> Tree | None:
        scale = self.take(f"{prefix}.weight", (dim,))
        return None if scale is None else {"scale": scale}

    def finish(self) -> None:
        unexpected = sorted(set(self.tensors) - self.used)
        if self.missing or unexpected or self.misshaped:
            raise CheckpointMismatchError(self.source, self.missing, unexpected, self.misshaped)


def put(tree: Tree, path: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``path = "a/b/c"``; a ``None`` value is skipped."""
    if value is None:
        return
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    if isinstance(value, dict):
        tree.setdefault(leaf, {}).update(value)
    else:
        tree[leaf] = value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> Tree:
    tree: Tree = {}
    for k, v in flat.items():
        put(tree, k, v)
    return tree


def check_tree(converted: Mapping[str, Any], expected: Mapping[str, Any], source: str) -> None:
    """Compare a converted tree with the model's parameter shapes (``jax.eval_shape`` of init)."""
    got, want = flatten(converted), flatten(expected)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    misshaped = [
        f"{k}: expected {tuple(want[k].shape)}, got {tuple(got[k].shape)}"
        for k in sorted(set(got) & set(want))
        if tuple(got[k].shape) != tuple(want[k].shape)
    ]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(f"{source} (jdit parameter names)", missing, unexpected,
                                      misshaped)


_NO_DEFAULT = object()


def config_int(cfg: Mapping[str, Any], key: str, default: Any = _NO_DEFAULT) -> int:
    """``cfg[key]`` (or ``default`` when absent or null) as an int; a non-integral number, a
    bool or a string is refused naming the key (``int()`` would truncate ``72.5`` silently)."""
    value = cfg.get(key) if cfg.get(key) is not None else default
    if value is _NO_DEFAULT:
        raise ValueError(f"config key {key!r} is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
    return int(value)


def config_float(cfg: Mapping[str, Any], key: str, default: Any = _NO_DEFAULT) -> float:
    """``cfg[key]`` (or ``default``) as a finite float, refused naming the key otherwise."""
    value = cfg.get(key) if cfg.get(key) is not None else default
    if value is _NO_DEFAULT:
        raise ValueError(f"config key {key!r} is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
    return float(value)
