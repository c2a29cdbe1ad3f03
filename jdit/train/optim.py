"""Optimizers and learning-rate schedules from a config section.

``optim`` config keys: ``name`` (adamw | came), ``lr``, ``warmup_steps``, ``schedule``
(constant | cosine), ``end_lr_factor`` (cosine floor, fraction of ``lr``), ``weight_decay``,
``b1``, ``b2`` (adamw), ``eps``, ``grad_clip`` (global norm, 0 disables). CAME's betas and eps
default to PixArt-Σ's (0.9, 0.999, 0.9999) and (1e-30, 1e-16).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

OPTIMIZERS = ("adamw", "came")
SCHEDULES = ("constant", "cosine")


def learning_rate(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then constant or cosine decay to ``end_lr_factor * lr``."""
    lr, warmup = float(cfg["lr"]), int(cfg.get("warmup_steps", 0))
    kind = cfg.get("schedule", "constant")
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    else:
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1),
                                            alpha=float(cfg.get("end_lr_factor", 0.0)))
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


_INPUT_AXES = {"qkv": 1, "q": 1, "kv": 1, "out": 2}  # attention kernels: (D, ...) / (H, Dh, D)


def pytorch_factor_axes(params: Any) -> Any:
    """CAME factor axes that give jdit's parameters the statistics PyTorch's layouts get.

    PyTorch stores a fused QKV weight as one (3·H·Dh, D) matrix, a conv weight as
    (D, C, kh, kw) (factored over the kernel window) and every bias as 1-D; jdit keeps heads and
    windows as separate axes. Leaves inside a scanned stack (``blocks_a_b``) have a leading
    layer axis, which stays a batch axis.
    """
    def spec(path: tuple[Any, ...], leaf: Any) -> Any:
        names = [getattr(p, "key", str(p)) for p in path]
        lead = 1 if any(str(n).startswith("blocks_") for n in names) else 0
        module, name = names[-2] if len(names) > 1 else "", names[-1]
        ndim = len(leaf.shape) - lead
        if name != "kernel":
            return False if ndim > 1 and name == "bias" else None
        if module in ("patch_embed", "kv_compress"):  # conv windows: (p, p, ...) axes
            return ((lead,), (lead + 1,))
        if module in _INPUT_AXES and ndim > 2:
            k = _INPUT_AXES[module]
            return (tuple(range(lead, lead + k)), tuple(range(lead + k, lead + ndim)))
        return None

    return jax.tree_util.tree_map_with_path(spec, params)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
    name = cfg.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
    schedule = learning_rate(cfg, total_steps)
    wd = float(cfg.get("weight_decay", 0.0))
    if name == "adamw":
        opt = optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                          eps=float(cfg.get("eps", 1e-8)), weight_decay=wd)
    else:
        from jdit.train.came import came

        opt = came(schedule, weight_decay=wd, factor_axes=pytorch_factor_axes)
    clip = float(cfg.get("grad_clip", 0.0))
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt
