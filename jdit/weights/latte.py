"""Latte weights: diffusers ``LatteTransformer3DModel`` folders.

Name mapping (diffusers -> jdit), per block pair ``i``:
  transformer_blocks.i.*            -> block_i/spatial/*  (a PixArt block: attn, cross_attn, mlp,
                                       scale_shift_table; see :mod:`jdit.weights.pixart`)
  temporal_transformer_blocks.i.attn1.to_{q,k,v}, to_out.0  -> block_i/temporal/attn/{qkv,out}
  temporal_transformer_blocks.i.ff.net.0.proj, ff.net.2     -> block_i/temporal/mlp/fc{1,2}
  temporal_transformer_blocks.i.scale_shift_table           -> block_i/temporal/scale_shift_table
  pos_embed.proj, adaln_single.*, caption_projection.*, scale_shift_table, proj_out: as PixArt's.
The 2-D and temporal sin-cos position embeddings are buffers diffusers does not save; jdit
recomputes them. Official (non-diffusers) Latte files are not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from jdit.weights.pixart import convert_block_diffusers
from jdit.weights.state_dict import StateDict, Tree, config_float, config_int, put

# What identifies Latte checkpoints (jdit.models.loading reads these for every family):
DIFFUSERS_CLASSES = ("LatteTransformer3DModel",)
DIFFUSERS_LEGACY_NORM_TYPE = None
# A diffusers Latte state dict saved as a lone file: recognised only to be refused clearly.
OFFICIAL_MARKERS = ("temporal_transformer_blocks.0.attn1.to_q.weight",)
OFFICIAL_IGNORED: tuple[str, ...] = ()
OFFICIAL_REQUIRED_FIELDS: dict[str, str] = {}

# diffusers' own defaults for the keys a config.json may leave out (LatteTransformer3DModel's
# __init__), and the values jdit's Latte computes: PixArt-α blocks with adaLN-single.
_DEFAULTS = dict(activation_fn="geglu", norm_type="layer_norm", attention_bias=False,
                 norm_elementwise_affine=True)
_REQUIRED = dict(activation_fn="gelu-approximate", norm_type="ada_norm_single",
                 attention_bias=True, norm_elementwise_affine=False)


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Latte fields from a diffusers ``config.json``; keys it leaves out take diffusers' class
    defaults (e.g. ``video_length`` 16, ``sample_size`` 64, ``num_layers`` 1)."""
    for key, want in _REQUIRED.items():
        got = cfg.get(key, _DEFAULTS[key])
        if got != want:
            raise ValueError(f"diffusers Latte config: {key}={got!r} is not supported (the "
                             f"published Latte models use {want!r})")
    heads = config_int(cfg, "num_attention_heads", 16)
    hidden = heads * config_int(cfg, "attention_head_dim", 88)
    for key in ("in_channels", "patch_size", "caption_channels"):
        if cfg.get(key) is None:
            raise ValueError(f"diffusers Latte config: {key} is required")
    in_ch = config_int(cfg, "in_channels")
    out_ch = cfg.get("out_channels")
    out_ch = in_ch if out_ch is None else int(out_ch)
    if out_ch < 1:
        raise ValueError(f"diffusers Latte config: out_channels must be >= 1, got {out_ch}")
    if cfg.get("cross_attention_dim") != hidden:
        raise ValueError(f"diffusers Latte config: cross_attention_dim "
                         f"{cfg.get('cross_attention_dim')} must equal the inner dim {hidden} "
                         f"(the projected caption)")
    return dict(
        input_size=config_int(cfg, "sample_size", 64),
        patch_size=config_int(cfg, "patch_size"),
        in_channels=in_ch,
        hidden_size=hidden,
        depth=config_int(cfg, "num_layers", 1),
        num_heads=heads,
        caption_channels=config_int(cfg, "caption_channels"),
        learn_sigma=out_ch == 2 * in_ch,
        predict_channels=0 if out_ch in (in_ch, 2 * in_ch) else out_ch,
        video_length=config_int(cfg, "video_length", 16),
        norm_eps=config_float(cfg, "norm_eps", 1e-5),
    )


def config_from_official(sd: StateDict, num_heads: int | None = None) -> dict[str, Any]:
    raise ValueError(f"{sd.source}: a Latte state dict on its own; load the diffusers folder "
                     f"(config.json beside the weights) or the LattePipeline folder instead")


def config_to_diffusers(m: nn.Module) -> dict[str, Any]:
    """The diffusers ``LatteTransformer3DModel`` config of a jdit Latte (the inverse of
    :func:`config_from_diffusers`); models diffusers cannot express are refused."""
    if m.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' LatteTransformer3DModel has mlp_ratio 4, not "
                         f"{m.mlp_ratio}; keep this model as a jdit checkpoint")
    if m.after_temporal is not None:
        raise ValueError("diffusers' LatteTransformer3DModel has no after_temporal hook; keep "
                         "this model as a jdit checkpoint")
    heads = m.num_heads
    return {"_class_name": "LatteTransformer3DModel", "num_attention_heads": heads,
            "attention_head_dim": m.hidden_size // heads, "in_channels": m.in_channels,
            "out_channels": m.out_channels, "num_layers": m.depth, "dropout": 0.0,
            "cross_attention_dim": m.hidden_size, "attention_bias": True,
            "sample_size": m.input_size, "patch_size": m.patch_size,
            "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
            "norm_eps": float(m.norm_eps), "caption_channels": m.caption_channels,
            "video_length": m.video_length}


def convert_temporal_block(sd: StateDict, t: Tree, s: str, o: str, d: int, heads: int,
                           mlp: int) -> None:
    """One diffusers temporal ``BasicTransformerBlock`` (no cross-attention) -> ``o``."""
    hd = d // heads
    put(t, f"{o}/scale_shift_table", sd.take(f"{s}.scale_shift_table", (6, d)))
    put(t, f"{o}/attn/qkv", sd.stacked_linears(
        [f"{s}.attn1.to_q", f"{s}.attn1.to_k", f"{s}.attn1.to_v"], d, (heads, hd)))
    put(t, f"{o}/attn/out", sd.linear(f"{s}.attn1.to_out.0", (heads, hd), (d,)))
    put(t, f"{o}/mlp/fc1", sd.linear(f"{s}.ff.net.0.proj", (d,), (mlp,)))
    put(t, f"{o}/mlp/fc2", sd.linear(f"{s}.ff.net.2", (mlp,), (d,)))


def convert_diffusers(sd: StateDict, m: nn.Module) -> Tree:
    d, heads, p = m.hidden_size, m.num_heads, m.patch_size
    mlp = int(d * m.mlp_ratio)
    t: Tree = {}
    put(t, "patch_embed", sd.patch_conv("pos_embed.proj", m.in_channels, d, p))
    emb = "adaln_single.emb.timestep_embedder"
    put(t, "t_embedder/linear_1", sd.linear(f"{emb}.linear_1", (256,), (d,)))
    put(t, "t_embedder/linear_2", sd.linear(f"{emb}.linear_2", (d,), (d,)))
    put(t, "t_block/linear", sd.linear("adaln_single.linear", (d,), (6 * d,)))
    put(t, "caption_projection/fc1",
        sd.linear("caption_projection.linear_1", (m.caption_channels,), (d,)))
    put(t, "caption_projection/fc2", sd.linear("caption_projection.linear_2", (d,), (d,)))
    for i in range(m.depth):
        convert_block_diffusers(sd, t, f"transformer_blocks.{i}", f"block_{i}/spatial", d,
                                heads, mlp)
        convert_temporal_block(sd, t, f"temporal_transformer_blocks.{i}", f"block_{i}/temporal",
                               d, heads, mlp)
    put(t, "final_layer/scale_shift_table", sd.take("scale_shift_table", (2, d)))
    put(t, "final_layer/linear", sd.linear("proj_out", (d,), (p * p * m.out_channels,)))
    return t
