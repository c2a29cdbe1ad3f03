"""EasyControl (arXiv 2503.07027): spatial control of a frozen DiT by condition tokens with
their own LoRA.

A condition image (edges, a mask, a depth map...) goes through the model's own patch
embedding and runs through every block as a separate token stream, the *condition branch*
(``module.encode_condition``): adaLN at timestep 0, no cross-attention, self-attention among
its own tokens only, with a LoRA of its own (:mod:`jdit.lora`, on the attention kernels) that
never touches the image or text tokens. The image tokens' self-attention sees the conditions'
keys and values beside their own:

==================  ===========  ===========  ===========
queries \\ keys      image        condition 1  condition 2
==================  ===========  ===========  ===========
image               yes          yes          yes
condition 1         no           yes          no
condition 2         no           no           yes
==================  ===========  ===========  ===========

so a condition depends on nothing but itself: its per-block keys and values (PixArt) or its
linear-attention state (SANA, where the pattern is "add the condition's state to the image's")
are computed once per image and reused by every denoising step and both halves of classifier-free
guidance (:func:`encode`, the *cache*), separately trained condition LoRAs combine zero-shot,
and with no condition the model is the base model exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit import lora

Array = jax.Array
Control = tuple[Array, Array]
"""Per-block tensors the image branch takes as ``control=``: keys and values, each (depth, B,
L_c, heads, head_dim) (softmax attention), or the state Σ relu(k)ᵀv (depth, B, heads, D, D)
and key sum Σ relu(k) (depth, B, heads, D) (linear attention)."""

TARGETS = ("attention",)
"""The condition LoRA's default targets: q, k, v and the attention output, as in the paper."""


@dataclasses.dataclass(frozen=True)
class Condition:
    """One condition: its ``latents`` (B, h, w, C) in the model's input space (VAE latents, or
    pixels for a pixel-space model), the condition LoRA ``adapters`` trained for its kind (None:
    the base weights), and ``scale``, the LoRA's weight (as ``jdit.lora.apply``)."""

    latents: Array
    adapters: Any = None
    scale: float = 1.0


def supports(module: nn.Module) -> bool:
    return hasattr(type(module), "encode_condition")


def _kind(module: nn.Module) -> str:
    if not supports(module):
        raise ValueError(f"{type(module).__name__} has no control condition branch "
                         "(EasyControl is available for PixArt and SANA)")
    return "state" if type(module).__name__ == "Sana" else "tokens"


def init(params: Any, rank: int, rng: Array, *, alpha: float | None = None,
         targets: Sequence[str] = TARGETS, module: nn.Module | None = None) -> Any:
    """A condition LoRA for ``params``: A random, B zero (so a fresh LoRA's branch runs with
    the base weights)."""
    return lora.init(params, lora.LoraConfig(rank=rank, alpha=alpha, targets=tuple(targets)),
                     rng, module=module)


def encode_one(module: nn.Module, params: Any, condition: Condition, merged: bool = False,
               peers: Control | None = None, **model_kwargs: Any) -> Control:
    """One condition's branch: its per-block keys and values (or state). ``merged``: fold the
    LoRA into the kernels first (cheaper for small models) instead of adding its products.
    ``peers``: other conditions' keys and values its queries also see (PixArt)."""
    _kind(module)
    if condition.adapters is not None:
        fold = lora.merge if merged else lora.apply
        params = fold(params, condition.adapters, condition.scale)
    if peers is not None:
        model_kwargs = {**model_kwargs, "peers": peers}
    return module.apply({"params": params}, condition.latents, **model_kwargs,
                        method=type(module).encode_condition)


def combine(module: nn.Module, controls: Sequence[Control]) -> Control:
    """Several conditions at once: keys and values side by side (softmax attention), states
    summed (linear attention)."""
    if not controls:
        raise ValueError("combine needs at least one condition")
    if _kind(module) == "state":
        return tuple(sum(parts[1:], parts[0]) for parts in zip(*controls, strict=True))
    return tuple(jnp.concatenate(parts, axis=2) for parts in zip(*controls, strict=True))


def encode(module: nn.Module, params: Any, conditions: Condition | Sequence[Condition],
           merged: bool = False, attend_each_other: bool = False,
           **model_kwargs: Any) -> Control:
    """The cache: every condition's branch, combined; pass it as ``control=`` to each
    denoising step's model call. ``model_kwargs``: PixArt-α 1024's ``resolution`` and
    ``aspect_ratio``.

    ``attend_each_other`` (PixArt; not EasyControl's pattern, for comparison): each
    condition's queries also see the other conditions' keys and values, as if they ran as one
    joint sequence. Computed in ``depth`` rounds, each condition's branch seeing the others'
    keys and values of the round before: a block's keys depend only on earlier blocks, so
    round ``r`` has blocks ``0..r`` exact and the last round all of them."""
    if isinstance(conditions, Condition):
        conditions = [conditions]
    controls = [encode_one(module, params, c, merged, **model_kwargs) for c in conditions]
    if attend_each_other and len(conditions) > 1:
        if _kind(module) != "tokens":
            raise ValueError("attend_each_other is implemented for PixArt (softmax attention)")
        for _ in range(module.depth - 1):
            controls = [encode_one(module, params, c, merged,
                                   peers=combine(module, controls[:i] + controls[i + 1:]),
                                   **model_kwargs) for i, c in enumerate(conditions)]
    return combine(module, controls)


def repeat(control: Control, times: int) -> Control:
    """The cache for a batch repeated ``times`` over (both halves of classifier-free
    guidance): computed once, tiled along the batch axis."""
    return tuple(jnp.concatenate([a] * times, axis=1) for a in control)
