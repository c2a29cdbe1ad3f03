"""PixArt-α/Σ weights: diffusers ``PixArtTransformer2DModel`` folders and official ``.pth`` files.

Name mapping (official | diffusers -> jdit), per block ``i``:
  blocks.i.attn.qkv | transformer_blocks.i.attn1.to_{q,k,v}   -> block_i/attn/qkv (D, 3, H, Dh)
  blocks.i.attn.proj | ...attn1.to_out.0                       -> block_i/attn/out (H, Dh, D)
  blocks.i.attn.{q,k}_norm, blocks.i.attn.{sr,norm} (Σ only)   -> block_i/attn/{q,k}_norm, kv_compress
  blocks.i.cross_attn.q_linear | ...attn2.to_q                 -> block_i/cross_attn/q (D, H, Dh)
  blocks.i.cross_attn.kv_linear | ...attn2.to_{k,v}            -> block_i/cross_attn/kv (D, 2, H, Dh)
  blocks.i.cross_attn.proj | ...attn2.to_out.0                 -> block_i/cross_attn/out
  blocks.i.mlp.fc{1,2} | ...ff.net.0.proj, ff.net.2            -> block_i/mlp/fc{1,2}
  blocks.i.scale_shift_table                                   -> block_i/scale_shift_table
The stale ``pos_embed`` buffer and the ``y_embedder.y_embedding`` null caption of official files
are not model parameters (positions are recomputed; the null caption belongs to training).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import linen as nn

from jdit.weights.state_dict import StateDict, Tree, config_int, put

# What identifies PixArt checkpoints (jdit.models.loading reads these for every family):
DIFFUSERS_CLASSES = ("PixArtTransformer2DModel",)
DIFFUSERS_LEGACY_NORM_TYPE = "ada_norm_single"  # a generic "Transformer2DModel" with this norm
OFFICIAL_MARKERS = ("y_embedder.y_proj.fc1.weight", "blocks.0.mlp.fc1.weight")  # all present
# The stale pos_embed buffer and the null caption of official files are not model parameters.
OFFICIAL_IGNORED = ("pos_embed", "y_embedder.y_embedding")
OFFICIAL_REQUIRED_FIELDS = {  # fields an official file may not record, and why
    "input_size": "the training latent size (no pos_embed buffer in the file)",
    "pe_interpolation": "the position-embedding scale (α: 1, or 2 at 1024 px; Σ: px / 512)",
    "num_heads": "the number of attention heads (not stored in the weights)",
}


def _unsupported(cfg: Mapping[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    if key in cfg and cfg[key] not in allowed:
        raise ValueError(
            f"diffusers PixArt config: {key}={cfg[key]!r} is not supported (expected one of {allowed})"
        )


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """PixArt fields from a diffusers ``config.json`` (defaults as diffusers applies them)."""
    _unsupported(cfg, "norm_type", ("ada_norm_single",))
    _unsupported(cfg, "activation_fn", ("gelu-approximate",))
    _unsupported(cfg, "attention_bias", (True,))
    _unsupported(cfg, "norm_elementwise_affine", (False,))
    _unsupported(cfg, "norm_eps", (1e-6,))
    _unsupported(cfg, "attention_type", ("default", None))
    heads = config_int(cfg, "num_attention_heads", 16)
    hidden = heads * config_int(cfg, "attention_head_dim", 72)
    in_ch = config_int(cfg, "in_channels", 4)
    out_ch = cfg.get("out_channels", 8)
    out_ch = in_ch if out_ch is None else int(out_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"diffusers PixArt config: out_channels {out_ch} must be {in_ch} or {2 * in_ch}")
    if cfg.get("caption_channels") is None:
        raise ValueError("diffusers PixArt config: caption_channels is required")
    if cfg.get("cross_attention_dim", hidden) not in (hidden, None):
        raise ValueError(
            f"diffusers PixArt config: cross_attention_dim {cfg['cross_attention_dim']} must equal "
            f"the inner dim {hidden}"
        )
    sample_size = config_int(cfg, "sample_size", 128)
    interp = cfg.get("interpolation_scale")
    micro = cfg.get("use_additional_conditions")
    return dict(
        input_size=sample_size,
        patch_size=config_int(cfg, "patch_size", 2),
        in_channels=in_ch,
        hidden_size=hidden,
        depth=config_int(cfg, "num_layers", 28),
        num_heads=heads,
        caption_channels=config_int(cfg, "caption_channels"),
        learn_sigma=out_ch == 2 * in_ch,
        pe_interpolation=float(max(sample_size // 64, 1) if interp is None else interp),
        micro_condition=bool(sample_size == 128 if micro is None else micro),
    )


def config_from_official(sd: StateDict, num_heads: int | None = None) -> dict[str, Any]:
    """Infer PixArt fields from an official state dict's shapes and keys.

    The token grid comes from the ``pos_embed`` buffer; α vs Σ (hence ``pe_interpolation``) from
    the null-caption length (120 vs 300 tokens), following the official inference scripts.
    """
    w = sd.shape("x_embedder.proj.weight")
    if w is None or len(w) != 4:
        raise ValueError(f"{sd.source}: no x_embedder.proj.weight; not an official PixArt checkpoint")
    hidden, in_ch, patch = w[0], w[1], w[2]
    depth = 0
    while f"blocks.{depth}.scale_shift_table" in sd:
        depth += 1
    final = sd.shape("final_layer.linear.weight")
    fc1 = sd.shape("blocks.0.mlp.fc1.weight")
    caption = sd.shape("y_embedder.y_proj.fc1.weight")
    if final is None or fc1 is None or caption is None:
        raise ValueError(f"{sd.source}: incomplete official PixArt checkpoint (no final layer/MLP)")
    fields: dict[str, Any] = dict(
        patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        mlp_ratio=fc1[0] / hidden, caption_channels=caption[1],
        learn_sigma=final[0] == patch * patch * 2 * in_ch,
        micro_condition="csize_embedder.mlp.0.weight" in sd,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
    )
    if num_heads is not None:
        fields["num_heads"] = num_heads
    elif hidden % 72 == 0:
        fields["num_heads"] = hidden // 72  # PixArt-XL: 1152 / 72 = 16 heads
    compressed = [i for i in range(depth) if f"blocks.{i}.attn.sr.weight" in sd]
    if compressed:
        sr = sd.shape(f"blocks.{compressed[0]}.attn.sr.weight") or ()
        fields.update(kv_compress="conv", kv_compress_layers=tuple(compressed),
                      kv_compress_ratio=sr[-1])
    pos = sd.shape("pos_embed")
    if pos is not None:
        grid = int(round(np.sqrt(pos[1])))
        fields["input_size"] = grid * patch
        null = sd.shape("y_embedder.y_embedding")
        if null is not None and null[0] == 300:  # Σ: pe_interpolation = image_size / 512
            fields["pe_interpolation"] = fields["input_size"] / 64
        elif null is not None and null[0] == 120:  # α: 1 up to 512 px, 2 at 1024 px
            fields["pe_interpolation"] = float(max(fields["input_size"] // 64, 1))
    return fields


def _embedder(sd: StateDict, t: Tree, ours: str, theirs: str, l1: str, l2: str,
              out: int) -> None:
    put(t, f"{ours}/linear_1", sd.linear(f"{theirs}.{l1}", (256,), (out,)))
    put(t, f"{ours}/linear_2", sd.linear(f"{theirs}.{l2}", (out,), (out,)))


def convert_block_diffusers(sd: StateDict, t: Tree, s: str, o: str, d: int, heads: int,
                            mlp: int) -> None:
    """One diffusers ``BasicTransformerBlock`` (``s``) -> a jdit ``PixArtBlock`` (``o``)."""
    hd = d // heads
    put(t, f"{o}/scale_shift_table", sd.take(f"{s}.scale_shift_table", (6, d)))
    put(t, f"{o}/attn/qkv", sd.stacked_linears(
        [f"{s}.attn1.to_q", f"{s}.attn1.to_k", f"{s}.attn1.to_v"], d, (heads, hd)))
    put(t, f"{o}/attn/out", sd.linear(f"{s}.attn1.to_out.0", (heads, hd), (d,)))
    put(t, f"{o}/cross_attn/q", sd.linear(f"{s}.attn2.to_q", (d,), (heads, hd)))
    put(t, f"{o}/cross_attn/kv", sd.stacked_linears(
        [f"{s}.attn2.to_k", f"{s}.attn2.to_v"], d, (heads, hd)))
    put(t, f"{o}/cross_attn/out", sd.linear(f"{s}.attn2.to_out.0", (heads, hd), (d,)))
    put(t, f"{o}/mlp/fc1", sd.linear(f"{s}.ff.net.0.proj", (d,), (mlp,)))
    put(t, f"{o}/mlp/fc2", sd.linear(f"{s}.ff.net.2", (mlp,), (d,)))


def convert_block_official(sd: StateDict, t: Tree, s: str, o: str, d: int, heads: int,
                           mlp: int, qk_norm: bool = False, kv_compress: str | None = None,
                           kv_compress_ratio: int = 1) -> None:
    """One official ``PixArtBlock`` / ``PixArtMSBlock`` (``s``) -> a jdit ``PixArtBlock``."""
    hd = d // heads
    put(t, f"{o}/scale_shift_table", sd.take(f"{s}.scale_shift_table", (6, d)))
    put(t, f"{o}/attn/qkv", sd.linear(f"{s}.attn.qkv", (d,), (3, heads, hd)))
    put(t, f"{o}/attn/out", sd.linear(f"{s}.attn.proj", (heads, hd), (d,)))
    if qk_norm:
        put(t, f"{o}/attn/q_norm", sd.layer_norm(f"{s}.attn.q_norm", d))
        put(t, f"{o}/attn/k_norm", sd.layer_norm(f"{s}.attn.k_norm", d))
    if kv_compress == "conv" and kv_compress_ratio > 1:
        put(t, f"{o}/attn/kv_compress", sd.depthwise_conv(f"{s}.attn.sr", d, kv_compress_ratio))
        put(t, f"{o}/attn/kv_compress/norm", sd.layer_norm(f"{s}.attn.norm", d))
    put(t, f"{o}/cross_attn/q", sd.linear(f"{s}.cross_attn.q_linear", (d,), (heads, hd)))
    put(t, f"{o}/cross_attn/kv", sd.linear(f"{s}.cross_attn.kv_linear", (d,), (2, heads, hd)))
    put(t, f"{o}/cross_attn/out", sd.linear(f"{s}.cross_attn.proj", (heads, hd), (d,)))
    put(t, f"{o}/mlp/fc1", sd.linear(f"{s}.mlp.fc1", (d,), (mlp,)))
    put(t, f"{o}/mlp/fc2", sd.linear(f"{s}.mlp.fc2", (mlp,), (d,)))


def convert_diffusers(sd: StateDict, m: nn.Module) -> Tree:
    if m.kv_compress or m.qk_norm:
        raise ValueError("diffusers PixArt checkpoints have no KV compression or QK-norm weights")
    d, heads, p = m.hidden_size, m.num_heads, m.patch_size
    mlp = int(d * m.mlp_ratio)
    t: Tree = {}
    put(t, "patch_embed", sd.patch_conv("pos_embed.proj", m.in_channels, d, p))
    emb = "adaln_single.emb"
    _embedder(sd, t, "t_embedder", f"{emb}.timestep_embedder", "linear_1", "linear_2", d)
    if m.micro_condition:
        for name in ("resolution_embedder", "aspect_ratio_embedder"):
            _embedder(sd, t, name, f"{emb}.{name}", "linear_1", "linear_2", d // 3)
    put(t, "t_block/linear", sd.linear("adaln_single.linear", (d,), (6 * d,)))
    put(t, "caption_projection/fc1", sd.linear("caption_projection.linear_1", (m.caption_channels,), (d,)))
    put(t, "caption_projection/fc2", sd.linear("caption_projection.linear_2", (d,), (d,)))
    for i in range(m.depth):
        convert_block_diffusers(sd, t, f"transformer_blocks.{i}", f"block_{i}", d, heads, mlp)
    put(t, "final_layer/scale_shift_table", sd.take("scale_shift_table", (2, d)))
    put(t, "final_layer/linear", sd.linear("proj_out", (d,), (p * p * m.out_channels,)))
    return t


def convert_official(sd: StateDict, m: nn.Module) -> Tree:
    d, heads, p = m.hidden_size, m.num_heads, m.patch_size
    mlp = int(d * m.mlp_ratio)
    t: Tree = {}
    put(t, "patch_embed", sd.patch_conv("x_embedder.proj", m.in_channels, d, p))
    _embedder(sd, t, "t_embedder", "t_embedder", "mlp.0", "mlp.2", d)
    if m.micro_condition:
        _embedder(sd, t, "resolution_embedder", "csize_embedder", "mlp.0", "mlp.2", d // 3)
        _embedder(sd, t, "aspect_ratio_embedder", "ar_embedder", "mlp.0", "mlp.2", d // 3)
    put(t, "t_block/linear", sd.linear("t_block.1", (d,), (6 * d,)))
    put(t, "caption_projection/fc1", sd.linear("y_embedder.y_proj.fc1", (m.caption_channels,), (d,)))
    put(t, "caption_projection/fc2", sd.linear("y_embedder.y_proj.fc2", (d,), (d,)))
    for i, layer in enumerate(m.per_layer()):
        convert_block_official(sd, t, f"blocks.{i}", f"block_{i}", d, heads, mlp,
                               qk_norm=m.qk_norm, kv_compress=m.kv_compress,
                               kv_compress_ratio=layer["kv_compress_ratio"])
    put(t, "final_layer/scale_shift_table", sd.take("final_layer.scale_shift_table", (2, d)))
    put(t, "final_layer/linear", sd.linear("final_layer.linear", (d,), (p * p * m.out_channels,)))
    return t


def config_to_diffusers(m: nn.Module) -> dict[str, Any]:
    """The diffusers ``PixArtTransformer2DModel`` config of a jdit PixArt (the inverse of
    :func:`config_from_diffusers`); models diffusers cannot express are refused."""
    unsupported = {"kv_compress": m.kv_compress, "qk_norm": m.qk_norm,
                   "self_attention": m.self_attention != "softmax",
                   "text_refiner": m.text_refiner, "mlp_ratio != 4": m.mlp_ratio != 4.0}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"diffusers' PixArtTransformer2DModel cannot hold this model ({bad}); "
                         f"keep it as a jdit checkpoint")
    heads = m.num_heads
    return {"_class_name": "PixArtTransformer2DModel", "num_attention_heads": heads,
            "attention_head_dim": m.hidden_size // heads, "in_channels": m.in_channels,
            "out_channels": m.out_channels, "num_layers": m.depth, "dropout": 0.0,
            "norm_num_groups": 32, "cross_attention_dim": m.hidden_size, "attention_bias": True,
            "sample_size": m.input_size, "patch_size": m.patch_size,
            "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
            "upcast_attention": False, "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False, "norm_eps": 1e-6,
            "interpolation_scale": float(m.pe_interpolation),
            "use_additional_conditions": bool(m.micro_condition),
            "caption_channels": m.caption_channels, "attention_type": "default"}
