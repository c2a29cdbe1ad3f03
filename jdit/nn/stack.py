"""Stacks of transformer blocks: a Python loop or ``nn.scan``, with named remat policies.

Unscanned parameters live under ``block_{i}``. Scanned, each maximal run of identically configured
blocks ``a..b`` (e.g. PixArt-Σ blocks 14-27 with KV compression) becomes one ``nn.scan`` whose
parameters live under ``blocks_{a}_{b}`` with a leading ``layers`` axis. :func:`stack_params` and
:func:`unstack_params` convert between the two layouts.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections
}


def remat_policy(name: str) -> Callable[..., Any] | None:
    try:
        return REMAT_POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown remat_policy {name!r}; available: {sorted(REMAT_POLICIES)}"
        ) from None


def segments(layer_keys: Sequence[Hashable]) -> list[tuple[int, int]]:
    """Maximal runs ``(first, last)`` (inclusive) of equal consecutive keys."""
    runs: list[tuple[int, int]] = []
    for i, key in enumerate(layer_keys):
        if runs and layer_keys[runs[-1][0]] == key:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def segment_name(first: int, last: int) -> str:
    return f"blocks_{first}_{last}"


def run_blocks(
    block_cls: type[nn.Module],
    per_layer: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any],
    x: Any,
    *args: Any,
    scan: bool = False,
    remat: str = "none",
) -> Any:
    """Applies ``len(per_layer)`` blocks to ``x``; call from inside a parent's compact method.

    ``block_cls(**shared, **per_layer[i])(x, *args)`` must return ``(x, None)``. The extra
    ``args`` are the same for every block (broadcast through the scan).
    """
    policy = remat_policy(remat)
    cls = block_cls
    if policy is not None:
        cls = nn.remat(block_cls, policy=policy, prevent_cse=not scan)
    if not scan:
        for i, kwargs in enumerate(per_layer):
            x, _ = cls(**shared, **kwargs, name=f"block_{i}")(x, *args)
        return x
    keys = [tuple(sorted(kw.items())) for kw in per_layer]
    for first, last in segments(keys):
        scanned = nn.scan(
            cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "lora_dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=last - first + 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(**shared, **per_layer[first], name=segment_name(first, last))(x, *args)
    return x


def stack_params(
    params: Mapping[str, Any], per_layer: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Unscanned ``block_{i}`` subtrees -> scanned ``blocks_{a}_{b}`` (stacked on axis 0)."""
    out = {k: v for k, v in params.items() if not k.startswith("block_")}
    keys = [tuple(sorted(kw.items())) for kw in per_layer]
    for first, last in segments(keys):
        layers = [params[f"block_{i}"] for i in range(first, last + 1)]
        out[segment_name(first, last)] = jax.tree.map(_stack, *layers)
    return out


def _stack(*xs: Any) -> Any:
    return (jnp if isinstance(xs[0], jax.Array) else np).stack(xs)


def unstack_params(
    params: Mapping[str, Any], per_layer: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Scanned ``blocks_{a}_{b}`` subtrees -> unscanned ``block_{i}``."""
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    keys = [tuple(sorted(kw.items())) for kw in per_layer]
    for first, last in segments(keys):
        stacked = params[segment_name(first, last)]
        for j, i in enumerate(range(first, last + 1)):
            out[f"block_{i}"] = jax.tree.map(lambda a, j=j: a[j], stacked)
    return out
