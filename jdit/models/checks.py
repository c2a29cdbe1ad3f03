"""Input and config validation shared by the models: clear errors at trace time, never at run time."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def check_config(name: str, hidden_size: int, num_heads: int, depth: int, patch_size: int) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"{name}: hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if depth < 1 or patch_size < 1:
        raise ValueError(f"{name}: depth and patch_size must be >= 1, got {depth} and {patch_size}")
    if hidden_size % 4:
        raise ValueError(f"{name}: hidden_size must be divisible by 4 (2-D sin-cos positions)")


def check_latents(name: str, x: Any, in_channels: int, patch_size: int) -> tuple[int, int]:
    """Latents must be NHWC with ``in_channels`` channels and a side the patch size divides."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 4:
        raise ValueError(
            f"{name}: x must be NHWC latents of shape (B, H, W, {in_channels}), got shape {shape}"
        )
    _, h, w, c = shape
    if c != in_channels:
        raise ValueError(
            f"{name}: x must have {in_channels} channels in the last axis (NHWC), got shape {shape}"
        )
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"{name}: latent height and width must be multiples of patch_size {patch_size}, "
            f"got {h}x{w}"
        )
    return h // patch_size, w // patch_size


def check_vector(name: str, arg: str, v: Any, shape: tuple[int, ...], integer: bool = False) -> None:
    got = tuple(getattr(v, "shape", ()))
    if got != shape:
        raise ValueError(f"{name}: {arg} must have shape {shape}, got {got}")
    if integer and not jnp.issubdtype(v.dtype, jnp.integer):
        raise ValueError(f"{name}: {arg} must be integer class ids, got dtype {v.dtype}")


def check_context(
    name: str, context: Any, mask: Any, batch: int, caption_channels: int
) -> None:
    shape = tuple(getattr(context, "shape", ()))
    if len(shape) != 3 or shape[0] != batch or shape[2] != caption_channels:
        raise ValueError(
            f"{name}: context must be text features of shape ({batch}, L, {caption_channels}), "
            f"got {shape}"
        )
    if mask is not None:
        check_vector(name, "context_mask", mask, (batch, shape[1]))



def check_text_refiner(name: str, refiner: Any, caption_channels: int) -> None:
    """A ``text_refiner`` section: a :class:`jdit.nn.text_refiner.TextRefinerConfig` whose
    encoders pack to ``caption_channels`` (the widest encoder's width)."""
    if refiner is None:
        return
    from jdit.nn.text_refiner import TextRefinerConfig

    if not isinstance(refiner, TextRefinerConfig):
        raise ValueError(f"{name}: text_refiner must be a TextRefinerConfig (a dict in configs, "
                         f"built by jdit.models.build), got {type(refiner).__name__}")
    refiner.check()
    if refiner.packed_width != caption_channels:
        raise ValueError(
            f"{name}: the text_refiner's encoders have feature widths "
            f"{[w for w, _ in refiner.encoders]}, which pack to {refiner.packed_width}, but "
            f"caption_channels is {caption_channels}; set caption_channels to the widest "
            f"encoder's width")


def check_control(name: str, control: Any, depth: int, batch: int,
                  tails: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    """Control conditions' per-block tensors: a pair, each (depth, batch, ...) ending in its
    ``tails`` entry (softmax attention: keys and values (L_c, heads, head_dim), any L_c; linear
    attention: the state (heads, D, D) and key sum (heads, D))."""
    if not (isinstance(control, tuple | list) and len(control) == 2):
        raise ValueError(f"{name}: control must be a pair of per-block arrays (from "
                         f"encode_condition), got {type(control).__name__}")
    for part, tail in zip(control, tails, strict=True):
        shape = tuple(getattr(part, "shape", ()))
        if shape[:2] != (depth, batch) or shape[len(shape) - len(tail):] != tail:
            raise ValueError(f"{name}: control arrays must have shape ({depth}, {batch}, ..., "
                             f"{', '.join(map(str, tail))}), got {shape}")


def layer_inputs(control: Any, block_residuals: Any, depth: int, batch: int, hidden: int,
                 perturb: Any = None, pag_layers: tuple[int, ...] = (), name: str = "model"
                 ) -> dict[str, Any] | None:
    """The per-block inputs of a model's blocks (``jdit.nn.stack.run_blocks``' layer_inputs):
    control conditions' tensors, ControlNet residuals and perturbed-attention guidance's rows
    (``perturb`` (B,), read by the ``pag_layers`` blocks); None when there are none."""
    out = {}
    if perturb is not None:
        if not pag_layers:
            raise ValueError(f"{name}: perturb= needs pag_layers (the blocks to perturb)")
        if any(not 0 <= i < depth for i in pag_layers):
            raise ValueError(f"{name}: pag_layers {pag_layers} outside the model's {depth} blocks")
        check_vector(name, "perturb", perturb, (batch,))
        out["perturb"] = jnp.broadcast_to(jnp.asarray(perturb).astype(bool), (depth, batch))
    if control is not None:
        out["control"] = control
    if block_residuals is not None:
        shape = tuple(getattr(block_residuals, "shape", ()))
        if len(shape) != 4 or shape[:2] != (depth, batch) or shape[3] != hidden:
            raise ValueError(f"block_residuals must have shape ({depth}, {batch}, L, {hidden}) "
                             f"(one per block), got {shape}")
        out["residual"] = block_residuals
    return out or None
