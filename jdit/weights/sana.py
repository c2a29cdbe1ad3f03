"""SANA weights: diffusers ``SanaTransformer2DModel`` folders and official ``.pth`` files.

Name mapping (official | diffusers -> jdit), per block ``i``:
  blocks.i.attn.qkv | transformer_blocks.i.attn1.to_{q,k,v} (no bias)  -> block_i/attn/qkv
  blocks.i.attn.{q,k}_norm | ...attn1.norm_{q,k}                       -> block_i/attn/{q,k}_norm
  blocks.i.attn.proj | ...attn1.to_out.0                               -> block_i/attn/out
  blocks.i.cross_attn.q_linear, kv_linear, proj | ...attn2.to_q, to_{k,v}, to_out.0
                                                                       -> block_i/cross_attn/{q,kv,out}
  blocks.i.mlp.inverted_conv.conv | ...ff.conv_inverted (1×1, 2F)      -> block_i/mlp/conv_inverted (C, 2, F)
  blocks.i.mlp.depth_conv.conv | ...ff.conv_depth (3×3 depthwise)      -> block_i/mlp/conv_depth (3, 3, 2, F)
  blocks.i.mlp.point_conv.conv | ...ff.conv_point (1×1, no bias)       -> block_i/mlp/conv_point
  attention_y_norm | caption_norm                                      -> caption_norm
The 2F channels of the expansion split into (value, gate) halves in that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from jdit.weights.state_dict import StateDict, Tree, config_float, config_int, put

# What identifies SANA checkpoints (jdit.models.loading reads these for every family):
DIFFUSERS_CLASSES = ("SanaTransformer2DModel",)
DIFFUSERS_LEGACY_NORM_TYPE = None
OFFICIAL_MARKERS = ("y_embedder.y_proj.fc1.weight", "blocks.0.mlp.inverted_conv.conv.weight")
OFFICIAL_IGNORED = ("pos_embed", "y_embedder.y_embedding")  # a stale buffer; the null caption
OFFICIAL_REQUIRED_FIELDS = {  # fields an official file may not record, and why
    "input_size": "the training latent size (32 at 1024 px)",
    "cross_num_heads": "the cross-attention heads (16 for SANA-600M, 20 for 1.6B)",
}


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Sana fields from a diffusers ``config.json`` (defaults as diffusers applies them)."""
    def unsupported(key: str, allowed: tuple[Any, ...]) -> None:
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"diffusers SANA config: {key}={cfg[key]!r} is not supported "
                             f"(expected one of {allowed})")

    unsupported("attention_bias", (False,))
    unsupported("norm_elementwise_affine", (False,))
    unsupported("norm_eps", (1e-6,))
    unsupported("qk_norm", (None, "rms_norm_across_heads"))
    guidance = bool(cfg.get("guidance_embeds") or False)
    heads = config_int(cfg, "num_attention_heads", 70)
    hidden = heads * config_int(cfg, "attention_head_dim", 32)
    cross_heads = config_int(cfg, "num_cross_attention_heads", 20)
    if cross_heads * config_int(cfg, "cross_attention_head_dim", 112) != hidden:
        raise ValueError("diffusers SANA config: cross-attention heads x head dim must equal the "
                         f"inner dim {hidden}")
    if cfg.get("cross_attention_dim", hidden) != hidden:
        raise ValueError(f"diffusers SANA config: cross_attention_dim must equal {hidden}")
    in_ch = config_int(cfg, "in_channels", 32)
    out_ch = cfg.get("out_channels", 32)
    interp = cfg.get("interpolation_scale")
    return dict(
        input_size=config_int(cfg, "sample_size", 32),
        patch_size=config_int(cfg, "patch_size", 1),
        in_channels=in_ch,
        out_channels=in_ch if out_ch is None else int(out_ch),
        hidden_size=hidden,
        depth=config_int(cfg, "num_layers", 20),
        num_heads=heads,
        cross_num_heads=cross_heads,
        mlp_ratio=config_float(cfg, "mlp_ratio", 2.5),
        caption_channels=config_int(cfg, "caption_channels", 2304),
        pos_embed=interp is not None,
        pe_interpolation=1.0 if interp is None else float(interp),
        qk_norm=cfg.get("qk_norm") is not None,
        guidance_embeds=guidance,
        guidance_embeds_scale=config_float(cfg, "guidance_embeds_scale", 0.1),
        # SanaPipeline hands the model t × timestep_scale; SanaSprintPipeline (the only one
        # that runs a model with guidance embeddings) hands it σ = t / 1000 (TrigFlow's
        # sin t' / (cos t' + sin t'))
        timestep_scale=1e-3 if guidance else config_float(cfg, "timestep_scale", 1.0),
    )


def config_from_official(sd: StateDict, num_heads: int | None = None) -> dict[str, Any]:
    """Sana fields from an official state dict's shapes: linear heads have 32 channels (all
    released models), cross-attention heads are not recorded (pass ``cross_num_heads``)."""
    w = sd.shape("x_embedder.proj.weight")
    if w is None or len(w) != 4:
        raise ValueError(f"{sd.source}: no x_embedder.proj.weight; not an official SANA checkpoint")
    hidden, in_ch, patch = w[0], w[1], w[2]
    depth = 0
    while f"blocks.{depth}.scale_shift_table" in sd:
        depth += 1
    inverted = sd.shape("blocks.0.mlp.inverted_conv.conv.weight")
    final = sd.shape("final_layer.linear.weight")
    caption = sd.shape("y_embedder.y_proj.fc1.weight")
    if inverted is None or final is None or caption is None:
        raise ValueError(f"{sd.source}: incomplete official SANA checkpoint")
    fields: dict[str, Any] = dict(
        patch_size=patch, in_channels=in_ch, out_channels=final[0] // (patch * patch),
        hidden_size=hidden, depth=depth, mlp_ratio=inverted[0] / 2 / hidden,
        caption_channels=caption[1], qk_norm="blocks.0.attn.q_norm.weight" in sd,
        num_heads=num_heads if num_heads is not None else hidden // 32,
    )
    return fields


def _common(sd: StateDict, m: nn.Module, names: Mapping[str, str]) -> Tree:
    d, p = m.hidden_size, m.patch_size
    t: Tree = {}
    put(t, "patch_embed", sd.patch_conv(names["patch"], m.in_channels, d, p))
    put(t, "t_embedder/linear_1", sd.linear(names["t1"], (256,), (d,)))
    put(t, "t_embedder/linear_2", sd.linear(names["t2"], (d,), (d,)))
    put(t, "t_block/linear", sd.linear(names["t_block"], (d,), (6 * d,)))
    put(t, "caption_projection/fc1", sd.linear(names["y1"], (m.caption_channels,), (d,)))
    put(t, "caption_projection/fc2", sd.linear(names["y2"], (d,), (d,)))
    put(t, "caption_norm", sd.rms_norm(names["y_norm"], d))
    if "final" in names:  # (a ControlNet has none)
        put(t, "final_layer/scale_shift_table", sd.take(names["final_table"], (2, d)))
        put(t, "final_layer/linear", sd.linear(names["final"], (d,), (p * p * m.out_channels,)))
    return t


def _mix_ffn(sd: StateDict, t: Tree, o: str, names: tuple[str, str, str], m: nn.Module) -> None:
    """The three convolutions (inverted 1×1, depthwise 3×3, point 1×1) of a Mix-FFN."""
    d, f = m.hidden_size, int(m.hidden_size * m.mlp_ratio)
    inverted, depth, point = names
    put(t, f"{o}/mlp/conv_inverted", sd.linear(inverted, (d,), (2, f), conv1x1=True))
    put(t, f"{o}/mlp/conv_depth", sd.depthwise_conv(depth, (2, f), 3))
    put(t, f"{o}/mlp/conv_point", sd.linear(point, (f,), (d,), bias=False, conv1x1=True))


def convert_diffusers(sd: StateDict, m: nn.Module) -> Tree:
    d, heads, cheads = m.hidden_size, m.num_heads, m.cross_num_heads
    hd, chd = d // heads, d // cheads
    # AdaLayerNormSingle nests the timestep embedder under .emb; SANA-Sprint's combined
    # timestep + guidance embedding does not
    emb = "time_embed.timestep_embedder" if m.guidance_embeds else "time_embed.emb.timestep_embedder"
    t = _common(sd, m, dict(patch="patch_embed.proj", t1=f"{emb}.linear_1", t2=f"{emb}.linear_2",
                            t_block="time_embed.linear", y1="caption_projection.linear_1",
                            y2="caption_projection.linear_2", y_norm="caption_norm",
                            final_table="scale_shift_table", final="proj_out"))
    if m.guidance_embeds:
        g = "time_embed.guidance_embedder"
        put(t, "guidance_embedder/linear_1", sd.linear(f"{g}.linear_1", (256,), (d,)))
        put(t, "guidance_embedder/linear_2", sd.linear(f"{g}.linear_2", (d,), (d,)))
    for i in range(m.depth):
        convert_block_diffusers(sd, t, f"transformer_blocks.{i}", f"block_{i}", m, d, heads, hd,
                                cheads, chd)
    return t


def convert_block_diffusers(sd: StateDict, t: Tree, s: str, o: str, m: nn.Module, d: int,
                            heads: int, hd: int, cheads: int, chd: int) -> None:
    """One ``SanaTransformerBlock`` (diffusers prefix ``s``) into jdit's block ``o``."""
    put(t, f"{o}/scale_shift_table", sd.take(f"{s}.scale_shift_table", (6, d)))
    put(t, f"{o}/attn/qkv", sd.stacked_linears(
        [f"{s}.attn1.to_q", f"{s}.attn1.to_k", f"{s}.attn1.to_v"], d, (heads, hd), bias=False))
    put(t, f"{o}/attn/out", sd.linear(f"{s}.attn1.to_out.0", (heads, hd), (d,)))
    put(t, f"{o}/cross_attn/q", sd.linear(f"{s}.attn2.to_q", (d,), (cheads, chd)))
    put(t, f"{o}/cross_attn/kv", sd.stacked_linears(
        [f"{s}.attn2.to_k", f"{s}.attn2.to_v"], d, (cheads, chd)))
    put(t, f"{o}/cross_attn/out", sd.linear(f"{s}.attn2.to_out.0", (cheads, chd), (d,)))
    if m.qk_norm:
        for a in ("attn", "cross_attn"):
            theirs = "attn1" if a == "attn" else "attn2"
            put(t, f"{o}/{a}/q_norm", sd.rms_norm(f"{s}.{theirs}.norm_q", d))
            put(t, f"{o}/{a}/k_norm", sd.rms_norm(f"{s}.{theirs}.norm_k", d))
    _mix_ffn(sd, t, o, (f"{s}.ff.conv_inverted", f"{s}.ff.conv_depth", f"{s}.ff.conv_point"), m)


OFFICIAL_COMMON = dict(patch="x_embedder.proj", t1="t_embedder.mlp.0", t2="t_embedder.mlp.2",
                       t_block="t_block.1", y1="y_embedder.y_proj.fc1", y2="y_embedder.y_proj.fc2",
                       y_norm="attention_y_norm")


def convert_official(sd: StateDict, m: nn.Module) -> Tree:
    d, heads, cheads = m.hidden_size, m.num_heads, m.cross_num_heads
    hd, chd = d // heads, d // cheads
    t = _common(sd, m, dict(OFFICIAL_COMMON, final_table="final_layer.scale_shift_table",
                            final="final_layer.linear"))
    for i in range(m.depth):
        convert_block_official(sd, t, f"blocks.{i}", f"block_{i}", m, d, heads, hd, cheads, chd)
    return t


def convert_block_official(sd: StateDict, t: Tree, s: str, o: str, m: nn.Module, d: int,
                           heads: int, hd: int, cheads: int, chd: int) -> None:
    """One official ``SanaMSBlock`` (prefix ``s``) into jdit's block ``o``."""
    put(t, f"{o}/scale_shift_table", sd.take(f"{s}.scale_shift_table", (6, d)))
    put(t, f"{o}/attn/qkv", sd.linear(f"{s}.attn.qkv", (d,), (3, heads, hd), bias=False))
    put(t, f"{o}/attn/out", sd.linear(f"{s}.attn.proj", (heads, hd), (d,)))
    put(t, f"{o}/cross_attn/q", sd.linear(f"{s}.cross_attn.q_linear", (d,), (cheads, chd)))
    put(t, f"{o}/cross_attn/kv", sd.linear(f"{s}.cross_attn.kv_linear", (d,), (2, cheads, chd)))
    put(t, f"{o}/cross_attn/out", sd.linear(f"{s}.cross_attn.proj", (cheads, chd), (d,)))
    if m.qk_norm:
        for a in ("attn", "cross_attn"):
            put(t, f"{o}/{a}/q_norm", sd.rms_norm(f"{s}.{a}.q_norm", d))
            put(t, f"{o}/{a}/k_norm", sd.rms_norm(f"{s}.{a}.k_norm", d))
    _mix_ffn(sd, t, o, tuple(f"{s}.mlp.{n}_conv.conv" for n in ("inverted", "depth", "point")), m)
