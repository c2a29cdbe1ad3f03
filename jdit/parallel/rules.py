"""Logical axis names -> mesh axes: one rule table per parallelism strategy.

Parameters carry the names of :data:`jdit.nn.layers.LOGICAL_AXES`; activations carry
:data:`ACTIVATION_AXES` (through :func:`jdit.nn.layers.constrain`). A table maps each name to
mesh axes, or leaves it out (replicated). Choosing a table is a config change
(``parallel.rules``); the models never change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
from jax.sharding import Mesh, PartitionSpec

ACTIVATION_AXES: dict[str, str] = {
    "batch": "the example axis",
    "length": "image tokens (query length); sharded over `context` for sequence parallelism",
    "time": "video frames (latent time); sharded over `context` when `length` is not",
    "kv_length": "keys/values of self-attention (after KV compression): gathered whole",
    "act_embed": "the residual stream width",
    "act_heads": "attention heads of q, k, v and the attention output",
    "act_mlp": "the hidden width inside MLPs",
}

Rules = tuple[tuple[str, Any], ...]

# A video activation names both `time` and `length`: flax gives `context` to the first of them in
# the rule order, so frames are split across `context` and each frame's tokens stay whole.
_COMMON: Rules = (("batch", ("data", "fsdp")), ("time", "context"), ("length", "context"))

RULE_TABLES: dict[str, Rules] = {
    # Parameters replicated; the batch split over every data-like axis.
    "dp": _COMMON,
    # ZeRO-3 style: each weight split along its model-width (or caption-width) dimension.
    "fsdp": _COMMON + (("embed", "fsdp"), ("caption", "fsdp")),
    # FSDP plus Megatron-style tensor parallelism over attention heads and MLP width.
    "fsdp_tp": _COMMON + (
        ("embed", "fsdp"), ("caption", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
        ("act_heads", "tensor"), ("act_mlp", "tensor"),
    ),
}


def rules_for(table: str | Rules, mesh: Mesh) -> Rules:
    """The named table with mesh axes this mesh does not have removed (a mesh without a
    ``context`` axis simply leaves ``length`` unsharded)."""
    if isinstance(table, str):
        try:
            table = RULE_TABLES[table]
        except KeyError:
            raise ValueError(f"parallel.rules: unknown table {table!r}; available: "
                             f"{sorted(RULE_TABLES)}") from None
    present = set(mesh.axis_names)
    out = []
    for name, axes in table:
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))
                     if a in present)
        out.append((name, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(out)


def spec_for(names: PartitionSpec | Sequence[Any] | None, shape: Sequence[int], rules: Rules,
             mesh: Mesh) -> PartitionSpec:
    """Mesh ``PartitionSpec`` for an array of ``shape`` with logical ``names``.

    A dimension whose size the mapped mesh axes do not divide (e.g. 1001 class rows over 8
    devices) stays replicated rather than padded.
    """
    if names is None or len(tuple(names)) == 0:
        return PartitionSpec()
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match an array of shape {tuple(shape)}")
    mesh_axes = nn.logical_to_mesh_axes(names, rules)
    out = []
    for size, axes in zip(shape, mesh_axes, strict=True):
        group = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept: list[str] = []
        for a in group:
            n = mesh.shape[a] * _product(mesh, kept)
            if size % n == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def _product(mesh: Mesh, axes: Sequence[str]) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n
