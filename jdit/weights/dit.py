"""DiT weights: diffusers ``DiTTransformer2DModel`` folders and the official ``DiT-XL-2-*.pt`` files.

Two differences between the sources are kept as model fields so each reproduces its own numbers:
diffusers embeds timesteps with ``downscale_freq_shift=1`` (official: 0) and normalises before the
MLP with eps ``norm_eps`` (default 1e-5; official: 1e-6). diffusers also stores a copy of the
timestep and class embedders in every block; converted checkpoints hold identical copies, which
are checked and merged into jdit's single shared embedder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import linen as nn

from jdit.weights.state_dict import StateDict, Tree, config_float, config_int, put

# What identifies DiT checkpoints (jdit.models.loading reads these for every family):
DIFFUSERS_CLASSES = ("DiTTransformer2DModel",)
DIFFUSERS_LEGACY_NORM_TYPE = "ada_norm_zero"  # a generic "Transformer2DModel" with this norm
OFFICIAL_MARKERS = ("y_embedder.embedding_table.weight",)  # all present
OFFICIAL_IGNORED = ("pos_embed",)  # fixed sin-cos positions, recomputed
OFFICIAL_REQUIRED_FIELDS = {  # fields an official file may not record, and why
    "input_size": "the training latent size (no pos_embed in the file)",
    "num_heads": "the number of attention heads (not stored in the weights)",
}
# Heads of the published DiT sizes, by width (S, B, L, XL); head_dim is not stored in weights.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    for key, allowed in (("norm_type", ("ada_norm_zero",)), ("activation_fn", ("gelu-approximate",)),
                         ("attention_bias", (True,)), ("norm_elementwise_affine", (False,))):
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"diffusers DiT config: {key}={cfg[key]!r} is not supported ({allowed})")
    heads = config_int(cfg, "num_attention_heads", 16)
    in_ch = config_int(cfg, "in_channels", 4)
    out_ch = cfg.get("out_channels")
    out_ch = in_ch if out_ch is None else int(out_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"diffusers DiT config: out_channels {out_ch} must be {in_ch} or {2 * in_ch}")
    return dict(
        input_size=config_int(cfg, "sample_size", 32),
        patch_size=config_int(cfg, "patch_size", 2),
        in_channels=in_ch,
        hidden_size=heads * config_int(cfg, "attention_head_dim", 72),
        depth=config_int(cfg, "num_layers", 28),
        num_heads=heads,
        num_classes=config_int(cfg, "num_embeds_ada_norm", 1000),
        learn_sigma=out_ch == 2 * in_ch,
        timestep_freq_shift=1.0,
        mlp_norm_eps=config_float(cfg, "norm_eps", 1e-5),
    )


def config_from_official(sd: StateDict, num_heads: int | None = None) -> dict[str, Any]:
    w = sd.shape("x_embedder.proj.weight")
    table = sd.shape("y_embedder.embedding_table.weight")
    final = sd.shape("final_layer.linear.weight")
    fc1 = sd.shape("blocks.0.mlp.fc1.weight")
    if w is None or table is None or final is None or fc1 is None:
        raise ValueError(f"{sd.source}: not an official DiT checkpoint (x_embedder, y_embedder, "
                         "final_layer or blocks.0.mlp missing)")
    hidden, in_ch, patch = w[0], w[1], w[2]
    depth = 0
    while f"blocks.{depth}.adaLN_modulation.1.weight" in sd:
        depth += 1
    fields: dict[str, Any] = dict(
        patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        mlp_ratio=fc1[0] / hidden, num_classes=table[0] - 1,
        learn_sigma=final[0] == patch * patch * 2 * in_ch,
        timestep_freq_shift=0.0, mlp_norm_eps=1e-6,
    )
    heads = num_heads if num_heads is not None else HEADS_BY_WIDTH.get(hidden)
    if heads is not None:
        fields["num_heads"] = heads
    pos = sd.shape("pos_embed")
    if pos is not None:
        fields["input_size"] = int(round(np.sqrt(pos[1]))) * patch
    return fields


def _blocks(sd: StateDict, t: Tree, m: nn.Module, names: Mapping[str, str], qkv_fused: bool) -> None:
    d, heads = m.hidden_size, m.num_heads
    hd, mlp = d // heads, int(d * m.mlp_ratio)
    for i in range(m.depth):
        s, o = names["block"].format(i), f"block_{i}"
        put(t, f"{o}/adaln/linear", sd.linear(f"{s}.{names['adaln']}", (d,), (6 * d,)))
        if qkv_fused:
            put(t, f"{o}/attn/qkv", sd.linear(f"{s}.attn.qkv", (d,), (3, heads, hd)))
        else:
            put(t, f"{o}/attn/qkv", sd.stacked_linears(
                [f"{s}.attn1.to_q", f"{s}.attn1.to_k", f"{s}.attn1.to_v"], d, (heads, hd)))
        put(t, f"{o}/attn/out", sd.linear(f"{s}.{names['out']}", (heads, hd), (d,)))
        put(t, f"{o}/mlp/fc1", sd.linear(f"{s}.{names['fc1']}", (d,), (mlp,)))
        put(t, f"{o}/mlp/fc2", sd.linear(f"{s}.{names['fc2']}", (mlp,), (d,)))


def convert_official(sd: StateDict, m: nn.Module) -> Tree:
    d, p = m.hidden_size, m.patch_size
    t: Tree = {}
    put(t, "patch_embed", sd.patch_conv("x_embedder.proj", m.in_channels, d, p))
    put(t, "t_embedder/linear_1", sd.linear("t_embedder.mlp.0", (256,), (d,)))
    put(t, "t_embedder/linear_2", sd.linear("t_embedder.mlp.2", (d,), (d,)))
    put(t, "y_embedder/embedding", sd.take("y_embedder.embedding_table.weight", (m.num_classes + 1, d)))
    _blocks(sd, t, m, dict(block="blocks.{}", adaln="adaLN_modulation.1", out="attn.proj",
                           fc1="mlp.fc1", fc2="mlp.fc2"), qkv_fused=True)
    put(t, "final_layer/adaln/linear", sd.linear("final_layer.adaLN_modulation.1", (d,), (2 * d,)))
    put(t, "final_layer/linear", sd.linear("final_layer.linear", (d,), (p * p * m.out_channels,)))
    return t


def convert_diffusers(sd: StateDict, m: nn.Module) -> Tree:
    d, p = m.hidden_size, m.patch_size
    t: Tree = {}
    put(t, "patch_embed", sd.patch_conv("pos_embed.proj", m.in_channels, d, p))
    emb = "transformer_blocks.{}.norm1.emb"
    shapes = {
        "timestep_embedder.linear_1.weight": (d, 256), "timestep_embedder.linear_1.bias": (d,),
        "timestep_embedder.linear_2.weight": (d, d), "timestep_embedder.linear_2.bias": (d,),
        "class_embedder.embedding_table.weight": (m.num_classes + 1, d),
    }
    first = {k: sd.take(f"{emb.format(0)}.{k}", s) for k, s in shapes.items()}
    for i in range(1, m.depth):
        for k, s in shapes.items():
            other = sd.take(f"{emb.format(i)}.{k}", s)
            if other is not None and first[k] is not None and not np.array_equal(other, first[k]):
                raise ValueError(
                    f"{sd.source}: block {i} has its own {k} that differs from block 0's. jdit's "
                    "DiT shares one timestep/class embedder, as the original model does; converted "
                    "DiT checkpoints hold identical copies."
                )
    put(t, "t_embedder/linear_1", sd.linear(f"{emb.format(0)}.timestep_embedder.linear_1", (256,), (d,)))
    put(t, "t_embedder/linear_2", sd.linear(f"{emb.format(0)}.timestep_embedder.linear_2", (d,), (d,)))
    put(t, "y_embedder/embedding", first["class_embedder.embedding_table.weight"])
    _blocks(sd, t, m, dict(block="transformer_blocks.{}", adaln="norm1.linear", out="attn1.to_out.0",
                           fc1="ff.net.0.proj", fc2="ff.net.2"), qkv_fused=False)
    put(t, "final_layer/adaln/linear", sd.linear("proj_out_1", (d,), (2 * d,)))
    put(t, "final_layer/linear", sd.linear("proj_out_2", (d,), (p * p * m.out_channels,)))
    return t
