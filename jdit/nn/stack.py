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
    layer_inputs: Any = None,
    start: int = 0,
) -> Any:
    """Applies ``len(per_layer)`` blocks to ``x``; call from inside a parent's compact method.

    ``block_cls(**shared, **per_layer[i])(x, *args)`` must return ``(x, y)``. The extra
    ``args`` are the same for every block (broadcast through the scan). ``layer_inputs``, a
    pytree whose leaves have a leading axis of ``len(per_layer)``, gives block ``i`` its slice
    ``i`` as one more argument (e.g. a condition's cached keys and values).

    Returns ``x``, or ``(x, ys)`` when the blocks return a ``y`` that is not None: the ``y`` of
    every block stacked along a new leading axis. ``start``: the index of the first block in
    ``per_layer`` (its name; blocks run in stages, unscanned only).
    """
    if start and scan:
        raise ValueError("run_blocks: blocks run in stages (start > 0) need scan=False")
    policy = remat_policy(remat)
    cls = block_cls
    if policy is not None:
        cls = nn.remat(block_cls, policy=policy, prevent_cse=not scan)
    depth = len(per_layer)
    if layer_inputs is not None:
        bad = [a.shape for a in jax.tree.leaves(layer_inputs) if a.shape[:1] != (depth,)]
        if bad:
            raise ValueError(f"layer_inputs need a leading axis of {depth} (one per block), "
                             f"got shapes {bad}")

    def inputs(first: int, last: int) -> tuple[Any, ...]:
        if layer_inputs is None:
            return ()
        if not scan:
            return (jax.tree.map(lambda a: a[first], layer_inputs),)
        return (jax.tree.map(lambda a: a[first : last + 1], layer_inputs),)

    ys: list[Any] = []
    if not scan:
        for i, kwargs in enumerate(per_layer):
            x, y = cls(**shared, **kwargs, name=f"block_{start + i}")(x, *args, *inputs(i, i))
            ys.append(None if y is None else jax.tree.map(lambda a: a[None], y))
    else:
        keys = [tuple(sorted(kw.items())) for kw in per_layer]
        extra = (0,) if layer_inputs is not None else ()
        for first, last in segments(keys):
            scanned = nn.scan(
                cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "lora_dropout": True},
                in_axes=(nn.broadcast,) * len(args) + extra,
                length=last - first + 1,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, y = scanned(**shared, **per_layer[first], name=segment_name(first, last))(
                x, *args, *inputs(first, last))
            ys.append(y)
    if all(y is None for y in ys):
        return x
    return x, jax.tree.map(lambda *a: jnp.concatenate(a), *ys)


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
