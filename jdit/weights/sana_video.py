"""SANA-Video weights: diffusers ``SanaVideoTransformer3DModel`` folders and official ``.pth``.

Name mapping (official | diffusers -> jdit), per block ``i`` (as SANA's, :mod:`jdit.weights.sana`,
plus the temporal convolution and a 3-D patch embedding):
  x_embedder.proj | patch_embedding (Conv3d (D, C, pt, p, p))   -> patch_embed (pt, p, p, C, D)
  t_embedder.mlp.0/2 | time_embed.emb.timestep_embedder.linear_1/2 -> t_embedder/linear_1/2
  t_block.1 | time_embed.linear                                   -> t_block/linear
  y_embedder.y_proj.fc1/2 | caption_projection.linear_1/2         -> caption_projection/fc1/2
  attention_y_norm | caption_norm                                 -> caption_norm
  blocks.i.attn.qkv | transformer_blocks.i.attn1.to_{q,k,v}       -> block_i/attn/qkv
  blocks.i.attn.{q,k}_norm, proj | ...attn1.norm_{q,k}, to_out.0  -> block_i/attn/{q,k}_norm, out
  blocks.i.cross_attn.q_linear, kv_linear, proj | ...attn2.to_q, to_{k,v}, to_out.0
                                                                  -> block_i/cross_attn/{q,kv,out}
  blocks.i.mlp.{inverted,depth,point}_conv.conv | ...ff.conv_{inverted,depth,point}
                                                                  -> block_i/mlp/conv_*
  blocks.i.mlp.t_conv | ...ff.conv_temp (Conv2d (D, D, 3, 1))     -> block_i/mlp/conv_temp (3, D, D)
  final_layer.linear, final_layer.scale_shift_table | proj_out, scale_shift_table
                                                                  -> final_layer/{linear, scale_shift_table}
diffusers' guidance variant (``guidance_embeds``) holds the timestep embedder at
``time_embed.timestep_embedder`` and adds ``time_embed.guidance_embedder``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from jdit.weights.sana import OFFICIAL_COMMON
from jdit.weights.state_dict import StateDict, Tree, config_float, config_int, put

# What identifies SANA-Video checkpoints (jdit.models.loading reads these for every family):
DIFFUSERS_CLASSES = ("SanaVideoTransformer3DModel",)
DIFFUSERS_LEGACY_NORM_TYPE = None
OFFICIAL_MARKERS = ("y_embedder.y_proj.fc1.weight", "blocks.0.mlp.t_conv.weight")
OFFICIAL_CONTAINS = ("sana",)  # an official SANA-Video file also carries SANA's markers
# the null caption, a stale buffer, and the training-time log-variance head
OFFICIAL_IGNORED = ("y_embedder.y_embedding", "pos_embed", "logvar_linear.weight",
                    "logvar_linear.bias")
OFFICIAL_REQUIRED_FIELDS: dict[str, str] = {}  # the one release's heads are the default

_LINEAR_HEAD_DIM = 112  # SANA-Video's linear_head_dim (configs/sana_video_config): 20 heads at 2240


def _input_frames(pt: int) -> int:
    """Latent frames of the example inputs (not recorded in checkpoints): 81 video frames are 21
    latent frames, rounded up to whole temporal patches."""
    return -(-21 // pt) * pt


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """SanaVideo fields from a diffusers ``config.json`` (defaults as diffusers applies them)."""
    def unsupported(key: str, allowed: tuple[Any, ...]) -> None:
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"diffusers SANA-Video config: {key}={cfg[key]!r} is not supported "
                             f"(expected one of {allowed})")

    unsupported("norm_elementwise_affine", (False,))
    unsupported("norm_eps", (1e-6,))
    unsupported("qk_norm", (None, "rms_norm_across_heads"))
    heads = config_int(cfg, "num_attention_heads", 20)
    hidden = heads * config_int(cfg, "attention_head_dim", 112)
    if cfg.get("cross_attention_dim", 2240) != hidden:
        raise ValueError(f"diffusers SANA-Video config: cross_attention_dim must equal the inner "
                         f"dim {hidden} (the projected caption's width), got "
                         f"{cfg.get('cross_attention_dim', 2240)!r}")
    patch = cfg.get("patch_size", (1, 2, 2))
    if not (isinstance(patch, list | tuple) and len(patch) == 3):
        raise ValueError(f"diffusers SANA-Video config: patch_size must be (t, h, w), got {patch!r}")
    pt, ph, pw = (config_int({"patch_size": v}, "patch_size") for v in patch)
    if ph != pw:
        raise ValueError(f"diffusers SANA-Video config: patch_size {tuple(patch)} has different "
                         f"height and width patches; jdit supports square patches")
    in_ch = config_int(cfg, "in_channels", 16)
    out_ch = cfg.get("out_channels", 16)
    side = config_int(cfg, "sample_size", 30) * ph  # diffusers' sample_size counts patches
    return dict(
        input_size=side,
        input_width=side,
        input_frames=_input_frames(pt),
        patch_size=ph,
        temporal_patch_size=pt,
        in_channels=in_ch,
        out_channels=in_ch if out_ch is None else int(out_ch),
        hidden_size=hidden,
        depth=config_int(cfg, "num_layers", 20),
        num_heads=heads,
        cross_num_heads=config_int(cfg, "num_cross_attention_heads", 20),
        cross_head_dim=config_int(cfg, "cross_attention_head_dim", 112),
        mlp_ratio=config_float(cfg, "mlp_ratio", 2.5),
        caption_channels=config_int(cfg, "caption_channels", 2304),
        qk_norm=cfg.get("qk_norm", "rms_norm_across_heads") is not None,
        qkv_bias=bool(cfg.get("attention_bias") or False),
        rope_max_len=config_int(cfg, "rope_max_seq_len", 1024),
        guidance_embeds=bool(cfg.get("guidance_embeds") or False),
        guidance_embeds_scale=config_float(cfg, "guidance_embeds_scale", 0.1),
    )


def config_from_official(sd: StateDict, num_heads: int | None = None) -> dict[str, Any]:
    """SanaVideo fields from an official state dict's shapes. Head counts are not recorded: the
    release's 112-channel heads are assumed for both attentions (pass num_heads,
    cross_num_heads and cross_head_dim otherwise)."""
    w = sd.shape("x_embedder.proj.weight")
    if w is None or len(w) != 5:
        raise ValueError(f"{sd.source}: no 5-D x_embedder.proj.weight; not an official "
                         f"SANA-Video checkpoint")
    hidden, in_ch, pt, patch = w[0], w[1], w[2], w[3]
    if w[3] != w[4]:
        raise ValueError(f"{sd.source}: patches {tuple(w[2:])} are not square")
    depth = 0
    while f"blocks.{depth}.scale_shift_table" in sd:
        depth += 1
    inverted = sd.shape("blocks.0.mlp.inverted_conv.conv.weight")
    final = sd.shape("final_layer.linear.weight")
    caption = sd.shape("y_embedder.y_proj.fc1.weight")
    t_conv = sd.shape("blocks.0.mlp.t_conv.weight")
    if inverted is None or final is None or caption is None or t_conv is None:
        raise ValueError(f"{sd.source}: incomplete official SANA-Video checkpoint")
    heads = num_heads if num_heads is not None else max(hidden // _LINEAR_HEAD_DIM, 1)
    return dict(
        patch_size=patch, temporal_patch_size=pt, input_frames=_input_frames(pt), in_channels=in_ch,
        out_channels=final[0] // (pt * patch * patch), hidden_size=hidden, depth=depth,
        mlp_ratio=inverted[0] / 2 / hidden, caption_channels=caption[1],
        qk_norm="blocks.0.attn.q_norm.weight" in sd, temporal_kernel=t_conv[2],
        num_heads=heads, cross_num_heads=heads, cross_head_dim=hidden // heads,
    )


def _patch_conv3d(sd: StateDict, prefix: str, m: nn.Module) -> Tree | None:
    """``Conv3d`` (D, C, pt, p, p) -> kernel (pt, p, p, C, D)."""
    p, pt = m.patch_size, m.temporal_patch_size
    w = sd.take(f"{prefix}.weight", (m.hidden_size, m.in_channels, pt, p, p))
    b = sd.take(f"{prefix}.bias", (m.hidden_size,))
    return None if w is None or b is None else {"kernel": w.transpose(2, 3, 4, 1, 0), "bias": b}


def _temporal_conv(sd: StateDict, key: str, m: nn.Module) -> Tree | None:
    """``Conv2d`` (D, D, k, 1) over (frames, tokens) -> kernel (k, D_in, D_out)."""
    d, k = m.hidden_size, m.temporal_kernel
    w = sd.take(key, (d, d, k, 1))
    return None if w is None else {"kernel": w[..., 0].transpose(2, 1, 0)}


def _common(sd: StateDict, m: nn.Module, names: Mapping[str, str]) -> Tree:
    d, out = m.hidden_size, m.patch_size ** 2 * m.temporal_patch_size * m.out_channels
    t: Tree = {}
    put(t, "patch_embed", _patch_conv3d(sd, names["patch"], m))
    put(t, "t_embedder/linear_1", sd.linear(names["t1"], (256,), (d,)))
    put(t, "t_embedder/linear_2", sd.linear(names["t2"], (d,), (d,)))
    put(t, "t_block/linear", sd.linear(names["t_block"], (d,), (6 * d,)))
    put(t, "caption_projection/fc1", sd.linear(names["y1"], (m.caption_channels,), (d,)))
    put(t, "caption_projection/fc2", sd.linear(names["y2"], (d,), (d,)))
    put(t, "caption_norm", sd.rms_norm(names["y_norm"], d))
    put(t, "final_layer/scale_shift_table", sd.take(names["final_table"], (2, d)))
    put(t, "final_layer/linear", sd.linear(names["final"], (d,), (out,)))
    return t


def _block(sd: StateDict, t: Tree, o: str, m: nn.Module, n: Mapping[str, Any]) -> None:
    """One block: ``n`` names its PyTorch tensors (diffusers or official)."""
    d, heads, cheads, chd = m.hidden_size, m.num_heads, m.cross_num_heads, m.cross_head_dim
    hd, f = d // heads, int(d * m.mlp_ratio)
    put(t, f"{o}/scale_shift_table", sd.take(n["table"], (6, d)))
    if isinstance(n["qkv"], str):
        put(t, f"{o}/attn/qkv", sd.linear(n["qkv"], (d,), (3, heads, hd), bias=m.qkv_bias))
    else:
        put(t, f"{o}/attn/qkv", sd.stacked_linears(list(n["qkv"]), d, (heads, hd),
                                                   bias=m.qkv_bias))
    put(t, f"{o}/attn/out", sd.linear(n["out"], (heads, hd), (d,)))
    put(t, f"{o}/cross_attn/q", sd.linear(n["cq"], (d,), (cheads, chd)))
    if isinstance(n["ckv"], str):
        put(t, f"{o}/cross_attn/kv", sd.linear(n["ckv"], (d,), (2, cheads, chd)))
    else:
        put(t, f"{o}/cross_attn/kv", sd.stacked_linears(list(n["ckv"]), d, (cheads, chd)))
    put(t, f"{o}/cross_attn/out", sd.linear(n["cout"], (cheads, chd), (d,)))
    if m.qk_norm:
        for a, width in (("attn", d), ("cross_attn", cheads * chd)):
            put(t, f"{o}/{a}/q_norm", sd.rms_norm(n[f"{a}_q_norm"], width))
            put(t, f"{o}/{a}/k_norm", sd.rms_norm(n[f"{a}_k_norm"], width))
    put(t, f"{o}/mlp/conv_inverted", sd.linear(n["inverted"], (d,), (2, f), conv1x1=True))
    put(t, f"{o}/mlp/conv_depth", sd.depthwise_conv(n["depth"], (2, f), 3))
    put(t, f"{o}/mlp/conv_point", sd.linear(n["point"], (f,), (d,), bias=False, conv1x1=True))
    if m.temporal_kernel:
        put(t, f"{o}/mlp/conv_temp", _temporal_conv(sd, n["temp"], m))


def convert_diffusers(sd: StateDict, m: nn.Module) -> Tree:
    emb = "time_embed.timestep_embedder" if m.guidance_embeds else "time_embed.emb.timestep_embedder"
    t = _common(sd, m, dict(patch="patch_embedding", t1=f"{emb}.linear_1", t2=f"{emb}.linear_2",
                            t_block="time_embed.linear", y1="caption_projection.linear_1",
                            y2="caption_projection.linear_2", y_norm="caption_norm",
                            final_table="scale_shift_table", final="proj_out"))
    if m.guidance_embeds:
        g, d = "time_embed.guidance_embedder", m.hidden_size
        put(t, "guidance_embedder/linear_1", sd.linear(f"{g}.linear_1", (256,), (d,)))
        put(t, "guidance_embedder/linear_2", sd.linear(f"{g}.linear_2", (d,), (d,)))
    for i in range(m.depth):
        s = f"transformer_blocks.{i}"
        _block(sd, t, f"block_{i}", m, {
            "table": f"{s}.scale_shift_table",
            "qkv": tuple(f"{s}.attn1.to_{x}" for x in "qkv"), "out": f"{s}.attn1.to_out.0",
            "cq": f"{s}.attn2.to_q", "ckv": (f"{s}.attn2.to_k", f"{s}.attn2.to_v"),
            "cout": f"{s}.attn2.to_out.0",
            "attn_q_norm": f"{s}.attn1.norm_q", "attn_k_norm": f"{s}.attn1.norm_k",
            "cross_attn_q_norm": f"{s}.attn2.norm_q", "cross_attn_k_norm": f"{s}.attn2.norm_k",
            "inverted": f"{s}.ff.conv_inverted", "depth": f"{s}.ff.conv_depth",
            "point": f"{s}.ff.conv_point", "temp": f"{s}.ff.conv_temp.weight",
        })
    return t


def convert_official(sd: StateDict, m: nn.Module) -> Tree:
    if m.guidance_embeds:
        raise ValueError(f"{sd.source}: official SANA-Video files have no guidance embedding")
    t = _common(sd, m, dict(OFFICIAL_COMMON, final_table="final_layer.scale_shift_table",
                            final="final_layer.linear"))
    for i in range(m.depth):
        s = f"blocks.{i}"
        _block(sd, t, f"block_{i}", m, {
            "table": f"{s}.scale_shift_table", "qkv": f"{s}.attn.qkv", "out": f"{s}.attn.proj",
            "cq": f"{s}.cross_attn.q_linear", "ckv": f"{s}.cross_attn.kv_linear",
            "cout": f"{s}.cross_attn.proj",
            "attn_q_norm": f"{s}.attn.q_norm", "attn_k_norm": f"{s}.attn.k_norm",
            "cross_attn_q_norm": f"{s}.cross_attn.q_norm",
            "cross_attn_k_norm": f"{s}.cross_attn.k_norm",
            "inverted": f"{s}.mlp.inverted_conv.conv", "depth": f"{s}.mlp.depth_conv.conv",
            "point": f"{s}.mlp.point_conv.conv", "temp": f"{s}.mlp.t_conv.weight",
        })
    return t
