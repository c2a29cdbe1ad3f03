"""Optimizers and learning-rate schedules from the ``optim`` config section.

Keys and defaults: :data:`jdit.config.SECTIONS` (``name`` adamw | came, ``lr``, warm-up,
constant or cosine schedule, weight decay, AdamW's betas and eps, global-norm clipping). CAME's
betas and eps are PixArt-Σ's (0.9, 0.999, 0.9999) and (1e-30, 1e-16).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from jdit.config import required, section

OPTIMIZERS = ("adamw", "came")
SCHEDULES = ("constant", "cosine")


def _optim(cfg: Mapping[str, Any]) -> dict[str, Any]:
    cfg = section("optim", cfg)
    required({"optim": cfg}, ["optim.lr"])
    return cfg


def learning_rate(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then constant or cosine decay to ``end_lr_factor * lr``."""
    cfg = _optim(cfg)
    lr, warmup, kind = float(cfg["lr"]), int(cfg["warmup_steps"]), cfg["schedule"]
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    else:
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1),
                                            alpha=float(cfg["end_lr_factor"]))
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
    cfg = _optim(cfg)
    name = cfg["name"]
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
    schedule = learning_rate(cfg, total_steps)
    wd = float(cfg["weight_decay"])
    if name == "adamw":
        opt = optax.adamw(schedule, b1=float(cfg["b1"]), b2=float(cfg["b2"]),
                          eps=float(cfg["eps"]), weight_decay=wd)
    else:
        from jdit.train.came import came

        opt = came(schedule, weight_decay=wd, factor_axes=pytorch_factor_axes)
    clip = float(cfg["grad_clip"])
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt


def scale_lora_b(ratio: float) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024): the ``b`` factors of :mod:`jdit.lora` adapters learn
    ``ratio`` times faster than the ``a`` factors (their updates scaled after the optimizer)."""
    def is_b(path: tuple[Any, ...]) -> bool:
        return bool(path) and isinstance(path[-1], jax.tree_util.GetAttrKey) and \
            path[-1].name == "b"

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u * ratio if is_b(path) else u, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
