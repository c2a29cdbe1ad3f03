"""PixArt-δ ControlNet weights: the official files and diffusers' research-project folders.

Names -> jdit, per copy ``i`` (the copied blocks are PixArt blocks: ``jdit/weights/pixart.py``):
  official  controlnet.i.copied_block.*            -> block_i/*
            controlnet.0.before_proj                -> before_proj
            controlnet.i.after_proj                 -> after_proj_i
  diffusers controlnet_blocks.i.transformer_block.* -> block_i/*
  (PixArtControlNetAdapterModel) controlnet_blocks.0.before_proj, controlnet_blocks.i.after_proj
An official file holds the base too (``base_model.*``, official PixArt names): this family reads
the ControlNet and leaves those keys to the base,
``from_pretrained(path, state_dict_prefix="base_model.", ...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from jdit.weights import pixart
from jdit.weights.state_dict import StateDict, Tree, put

DIFFUSERS_CLASSES = ("PixArtControlNetAdapterModel",)
DIFFUSERS_LEGACY_NORM_TYPE = None
OFFICIAL_MARKERS = ("controlnet.0.before_proj.weight", "controlnet.0.copied_block.mlp.fc1.weight")
OFFICIAL_IGNORED: tuple[str, ...] = ()
OFFICIAL_REQUIRED_FIELDS: dict[str, str] = {}
BASE_PREFIX = "base_model."


def _fields(sd: StateDict, blocks: str, fc1: str, num_heads: int | None) -> dict[str, Any]:
    """Dimensions from the weights (neither format records them; heads as PixArt's, 72 wide)."""
    proj = sd.shape(f"{blocks}.0.before_proj.weight")
    if proj is None:
        raise ValueError(f"{sd.source}: no {blocks}.0.before_proj.weight; not a PixArt-δ "
                         "ControlNet")
    hidden = proj[0]
    depth = 0
    while f"{blocks}.{depth}.after_proj.weight" in sd:
        depth += 1
    mlp = sd.shape(f"{blocks}.0.{fc1}.weight")
    if mlp is None:
        raise ValueError(f"{sd.source}: no {blocks}.0.{fc1}.weight")
    if num_heads is None:
        if hidden % 72:
            raise ValueError(f"{sd.source}: hidden size {hidden} is not PixArt-XL's 72 per head;"
                             " pass num_heads=...")
        num_heads = hidden // 72
    return dict(hidden_size=hidden, depth=depth, num_heads=num_heads,
                mlp_ratio=mlp[0] / hidden)


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    # the research project's config records only num_layers; the rest comes from the weights
    return {k: cfg[k] for k in ("num_attention_heads",) if k in cfg}


def fields_from_diffusers_weights(sd: StateDict, fields: Mapping[str, Any]) -> dict[str, Any]:
    heads = fields.get("num_heads", fields.get("num_attention_heads"))
    return _fields(sd, "controlnet_blocks", "transformer_block.ff.net.0.proj", heads)


def config_from_official(sd: StateDict, num_heads: int | None = None) -> dict[str, Any]:
    return _fields(sd, "controlnet", "copied_block.mlp.fc1", num_heads)


def _projections(sd: StateDict, t: Tree, blocks: str, m: nn.Module) -> None:
    d = m.hidden_size
    put(t, "before_proj", sd.linear(f"{blocks}.0.before_proj", (d,), (d,)))
    for i in range(m.depth):
        put(t, f"after_proj_{i}", sd.linear(f"{blocks}.{i}.after_proj", (d,), (d,)))


def convert_diffusers(sd: StateDict, m: nn.Module) -> Tree:
    t: Tree = {}
    mlp = int(m.hidden_size * m.mlp_ratio)
    for i in range(m.depth):
        pixart.convert_block_diffusers(sd, t, f"controlnet_blocks.{i}.transformer_block",
                                       f"block_{i}", m.hidden_size, m.num_heads, mlp)
    _projections(sd, t, "controlnet_blocks", m)
    return t


def convert_official(sd: StateDict, m: nn.Module) -> Tree:
    t: Tree = {}
    mlp = int(m.hidden_size * m.mlp_ratio)
    for i in range(m.depth):
        pixart.convert_block_official(sd, t, f"controlnet.{i}.copied_block", f"block_{i}",
                                      m.hidden_size, m.num_heads, mlp, qk_norm=m.qk_norm)
    _projections(sd, t, "controlnet", m)
    sd.used.update(k for k in sd.tensors if k.startswith(BASE_PREFIX))  # the base's
    return t
