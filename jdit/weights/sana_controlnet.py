"""SANA ControlNet weights: diffusers ``SanaControlNetModel`` folders.

Names (diffusers -> jdit): the blocks, time embedding, caption projection and norm as the base
SANA transformer's (``jdit/weights/sana.py``), plus
  input_block                 -> input_block (zero-initialised, on the condition's tokens)
  controlnet_blocks.i         -> controlnet_block_i (zero-initialised, after copy i)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from jdit.weights import sana
from jdit.weights.state_dict import StateDict, Tree, config_int, put

DIFFUSERS_CLASSES = ("SanaControlNetModel",)
DIFFUSERS_LEGACY_NORM_TYPE = None
# Official SANA ControlNet files (PixArt-δ style ``controlnet.i.copied_block``) are not read
# yet: convert them with diffusers' scripts/convert_sana_controlnet_to_diffusers.py first.
OFFICIAL_MARKERS = ("controlnet.0.copied_block.mlp.inverted_conv.conv.weight",
                    "controlnet.0.before_proj.weight")
OFFICIAL_IGNORED: tuple[str, ...] = ()
OFFICIAL_REQUIRED_FIELDS: dict[str, str] = {}


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    fields = sana.config_from_diffusers(cfg)
    for k in ("out_channels",):
        fields.pop(k)
    fields["depth"] = config_int(cfg, "num_layers", 7)
    return fields


def config_from_official(sd: StateDict, num_heads: int | None = None) -> dict[str, Any]:
    raise ValueError(f"{sd.source}: official SANA ControlNet files are not read directly; "
                     "convert it with diffusers' scripts/convert_sana_controlnet_to_diffusers.py "
                     "and load the folder")


def convert_official(sd: StateDict, m: nn.Module) -> Tree:  # pragma: no cover (refused above)
    raise NotImplementedError


def convert_diffusers(sd: StateDict, m: nn.Module) -> Tree:
    d, heads, cheads = m.hidden_size, m.num_heads, m.cross_num_heads
    hd, chd = d // heads, d // cheads
    emb = "time_embed.emb.timestep_embedder"
    t: Tree = {}
    put(t, "patch_embed", sd.patch_conv("patch_embed.proj", m.in_channels, d, m.patch_size))
    put(t, "t_embedder/linear_1", sd.linear(f"{emb}.linear_1", (256,), (d,)))
    put(t, "t_embedder/linear_2", sd.linear(f"{emb}.linear_2", (d,), (d,)))
    put(t, "t_block/linear", sd.linear("time_embed.linear", (d,), (6 * d,)))
    put(t, "caption_projection/fc1", sd.linear("caption_projection.linear_1",
                                               (m.caption_channels,), (d,)))
    put(t, "caption_projection/fc2", sd.linear("caption_projection.linear_2", (d,), (d,)))
    put(t, "caption_norm", sd.rms_norm("caption_norm", d))
    put(t, "input_block", sd.linear("input_block", (d,), (d,)))
    for i in range(m.depth):
        s, o = f"transformer_blocks.{i}", f"block_{i}"
        sana.convert_block_diffusers(sd, t, s, o, m, d, heads, hd, cheads, chd)
        put(t, f"controlnet_block_{i}", sd.linear(f"controlnet_blocks.{i}", (d,), (d,)))
    return t
