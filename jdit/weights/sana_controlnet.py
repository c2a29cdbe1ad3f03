"""SANA ControlNet weights: diffusers ``SanaControlNetModel`` folders and the official files.

Names -> jdit: the blocks, time embedding, caption projection and norm as the base SANA
transformer's (``jdit/weights/sana.py``), plus
  diffusers input_block                        -> input_block (zero-initialised, condition tokens)
            controlnet_blocks.i                -> controlnet_block_i (zero-initialised, after copy i)
  official  controlnet.i.copied_block.*        -> block_i/* (official SANA block names)
            controlnet.0.before_proj           -> input_block
            controlnet.i.after_proj            -> controlnet_block_i
An official file (``SanaMSControlNet``) holds the whole model: the base's blocks and final layer,
the embeddings the ControlNet shares with the base (``x_embedder``, ``t_embedder``, ``t_block``,
``y_embedder``, ``attention_y_norm``: read as the ControlNet's, as diffusers' conversion does) and
``controlnet.*``. ``from_pretrained(path)`` reads the ControlNet; the base is the released SANA
model's (``from_pretrained`` of that model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from jdit.weights import sana
from jdit.weights.state_dict import StateDict, Tree, config_int, put

DIFFUSERS_CLASSES = ("SanaControlNetModel",)
DIFFUSERS_LEGACY_NORM_TYPE = None
OFFICIAL_MARKERS = ("controlnet.0.copied_block.mlp.inverted_conv.conv.weight",
                    "controlnet.0.before_proj.weight")
OFFICIAL_CONTAINS = ("sana",)  # an official file also matches the base's markers
OFFICIAL_IGNORED: tuple[str, ...] = sana.OFFICIAL_IGNORED
OFFICIAL_REQUIRED_FIELDS = sana.OFFICIAL_REQUIRED_FIELDS
_BASE_ONLY = ("blocks.", "final_layer.")  # the base's own weights in an official file


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    fields = sana.config_from_diffusers(cfg)
    if fields["guidance_embeds"]:
        raise ValueError("diffusers SANA ControlNet config: guidance_embeds (SANA-Sprint's "
                         "ControlNet) is not supported")
    if fields["timestep_scale"] != 1.0:
        raise ValueError(f"diffusers SANA ControlNet config: timestep_scale "
                         f"{fields['timestep_scale']} is not supported (expected 1.0)")
    for k in ("out_channels", "guidance_embeds", "guidance_embeds_scale", "timestep_scale"):
        fields.pop(k)
    fields["depth"] = config_int(cfg, "num_layers", 7)
    return fields


def config_from_official(sd: StateDict, num_heads: int | None = None) -> dict[str, Any]:
    """Fields from the shapes (linear heads of 32 channels, as every release)."""
    w = sd.shape("x_embedder.proj.weight")
    inverted = sd.shape("controlnet.0.copied_block.mlp.inverted_conv.conv.weight")
    caption = sd.shape("y_embedder.y_proj.fc1.weight")
    if w is None or len(w) != 4 or inverted is None or caption is None:
        raise ValueError(f"{sd.source}: incomplete official SANA ControlNet checkpoint "
                         "(x_embedder, y_embedder and controlnet.0.copied_block are needed)")
    hidden = w[0]
    depth = 0
    while f"controlnet.{depth}.after_proj.weight" in sd:
        depth += 1
    return dict(patch_size=w[2], in_channels=w[1], hidden_size=hidden, depth=depth,
                mlp_ratio=inverted[0] / 2 / hidden, caption_channels=caption[1],
                qk_norm="controlnet.0.copied_block.attn.q_norm.weight" in sd,
                num_heads=num_heads if num_heads is not None else hidden // 32)


def convert_official(sd: StateDict, m: nn.Module) -> Tree:
    d, heads, cheads = m.hidden_size, m.num_heads, m.cross_num_heads
    t = sana._common(sd, m, sana.OFFICIAL_COMMON)
    put(t, "input_block", sd.linear("controlnet.0.before_proj", (d,), (d,)))
    for i in range(m.depth):
        sana.convert_block_official(sd, t, f"controlnet.{i}.copied_block", f"block_{i}", m, d,
                                    heads, d // heads, cheads, d // cheads)
        put(t, f"controlnet_block_{i}", sd.linear(f"controlnet.{i}.after_proj", (d,), (d,)))
    sd.used.update(k for k in sd.tensors if k.startswith(_BASE_ONLY))  # the base's
    return t


def convert_diffusers(sd: StateDict, m: nn.Module) -> Tree:
    d, heads, cheads = m.hidden_size, m.num_heads, m.cross_num_heads
    emb = "time_embed.emb.timestep_embedder"
    t = sana._common(sd, m, dict(patch="patch_embed.proj", t1=f"{emb}.linear_1",
                                 t2=f"{emb}.linear_2", t_block="time_embed.linear",
                                 y1="caption_projection.linear_1",
                                 y2="caption_projection.linear_2", y_norm="caption_norm"))
    put(t, "input_block", sd.linear("input_block", (d,), (d,)))
    for i in range(m.depth):
        s, o = f"transformer_blocks.{i}", f"block_{i}"
        sana.convert_block_diffusers(sd, t, s, o, m, d, heads, d // heads, cheads, d // cheads)
        put(t, f"controlnet_block_{i}", sd.linear(f"controlnet_blocks.{i}", (d,), (d,)))
    return t
