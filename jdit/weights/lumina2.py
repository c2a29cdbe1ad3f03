"""Lumina-Image 2.0 weights: diffusers ``Lumina2Transformer2DModel`` folders and the official
``consolidated.00-of-01.pth`` (or the same keys in a ``.safetensors``; ComfyUI's file carries a
``model.diffusion_model.`` prefix: pass ``state_dict_prefix="model.diffusion_model."``).

Name mapping (official | diffusers -> jdit); ``{R}`` is ``context_refiner``, ``noise_refiner``
(both -> the same name in jdit) or ``layers`` (-> jdit's top-level ``block_i``):
  x_embedder | x_embedder (Linear over (p, p, C) patches)        -> x_embedder (p, p, C, D)
  t_embedder.mlp.{0,2} | time_caption_embed.timestep_embedder.linear_{1,2}
                                                                  -> t_embedder/linear_{1,2}
  cap_embedder.{0,1} | time_caption_embed.caption_embedder.{0,1}  -> caption_norm, caption_projection
  {R}.i.attention.qkv (fused rows q | k | v) | {R}.i.attn.to_{q,k,v}  -> block_i/attn/{q,k,v}
  {R}.i.attention.out | {R}.i.attn.to_out.0                       -> block_i/attn/out
  {R}.i.attention.{q,k}_norm | {R}.i.attn.norm_{q,k}              -> block_i/attn/{q,k}_norm
  {R}.i.attention_norm1 | {R}.i.norm1.norm (context_refiner: norm1) -> block_i/norm1
  {R}.i.attention_norm2, ffn_norm1, ffn_norm2 | norm2, ffn_norm1, ffn_norm2 -> the same
  {R}.i.feed_forward.w{1,3,2} | {R}.i.feed_forward.linear_{1,3,2} -> block_i/ffn/{gate,up,down}
  {R}.i.adaLN_modulation.1 | {R}.i.norm1.linear                   -> block_i/adaln/linear
  final_layer.adaLN_modulation.1 | norm_out.linear_1              -> final_layer/adaln/linear
  final_layer.linear | norm_out.linear_2                          -> final_layer/linear
The official ``norm_final.weight`` is never used by the model and is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from jdit.weights.state_dict import StateDict, Tree, config_float, config_int, put

# What identifies Lumina-Image 2.0 checkpoints (jdit.models.loading reads these for every family):
DIFFUSERS_CLASSES = ("Lumina2Transformer2DModel",)
DIFFUSERS_LEGACY_NORM_TYPE = None
OFFICIAL_MARKERS = ("cap_embedder.1.weight", "layers.0.attention.qkv.weight")  # all present
OFFICIAL_IGNORED = ("norm_final.weight",)  # an RMSNorm the forward never applies
OFFICIAL_REQUIRED_FIELDS = {  # fields an official file may not record, and why
    "axes_dim_rope": "the rotary channels per axis, summing to the head dim (known only for "
                     "the released head dim 96: (32, 32, 32))",
    "multiple_of": "the FFN rounding (known only when the FFN width is 4·D rounded up to 256)",
}
_RELEASED_AXES = {96: (32, 32, 32)}


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Lumina2 fields from a diffusers ``config.json`` (defaults as diffusers applies them).
    ``scaling_factor`` is stored by diffusers but never used in the forward; it is ignored."""
    heads = config_int(cfg, "num_attention_heads", 24)
    kv_heads = config_int(cfg, "num_kv_heads", 8)
    hidden = config_int(cfg, "hidden_size", 2304)
    if heads < 1 or hidden % heads:
        raise ValueError(f"diffusers Lumina2 config: hidden_size {hidden} must be divisible by "
                         f"num_attention_heads {heads}")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"diffusers Lumina2 config: num_kv_heads={kv_heads} must divide "
                         f"num_attention_heads={heads}")
    axes = tuple(cfg.get("axes_dim_rope") or (32, 32, 32))
    if len(axes) != 3 or sum(axes) != hidden // heads:
        raise ValueError(f"diffusers Lumina2 config: axes_dim_rope={list(axes)} is not supported "
                         f"(expected three entries summing to the head dim {hidden // heads})")
    lens = tuple(cfg.get("axes_lens") or (300, 512, 512))
    if len(lens) != 3:
        raise ValueError(f"diffusers Lumina2 config: axes_lens={list(lens)} must have 3 entries")
    in_ch = config_int(cfg, "in_channels", 16)
    multiplier = cfg.get("ffn_dim_multiplier")
    return dict(
        input_size=config_int(cfg, "sample_size", 128),
        patch_size=config_int(cfg, "patch_size", 2),
        in_channels=in_ch,
        out_channels=config_int(cfg, "out_channels", in_ch),
        hidden_size=hidden,
        depth=config_int(cfg, "num_layers", 26),
        refiner_depth=config_int(cfg, "num_refiner_layers", 2),
        num_heads=heads,
        num_kv_heads=kv_heads,
        multiple_of=config_int(cfg, "multiple_of", 256),
        ffn_dim_multiplier=(None if multiplier is None
                            else config_float(cfg, "ffn_dim_multiplier")),
        norm_eps=config_float(cfg, "norm_eps", 1e-5),
        axes_dim_rope=tuple(int(a) for a in axes),
        axes_lens=tuple(int(a) for a in lens),
        caption_channels=config_int(cfg, "cap_feat_dim", 1024),  # diffusers' default, not 2304
    )


def config_from_official(sd: StateDict, num_heads: int | None = None) -> dict[str, Any]:
    """Lumina2 fields from an official state dict's shapes. The head dim is the q-norm's width;
    patch size 2 (every release) splits the patch width into channels."""
    x_emb, q_norm = sd.shape("x_embedder.weight"), sd.shape("layers.0.attention.q_norm.weight")
    qkv, w1 = sd.shape("layers.0.attention.qkv.weight"), sd.shape("layers.0.feed_forward.w1.weight")
    cap, final = sd.shape("cap_embedder.0.weight"), sd.shape("final_layer.linear.weight")
    if None in (x_emb, q_norm, qkv, w1, cap, final):
        raise ValueError(f"{sd.source}: incomplete official Lumina2 checkpoint")
    hidden, hd = x_emb[0], q_norm[0]
    heads = num_heads if num_heads is not None else hidden // hd

    def count(prefix: str) -> int:
        n = 0
        while f"{prefix}.{n}.attention.qkv.weight" in sd:
            n += 1
        return n

    fields: dict[str, Any] = dict(
        patch_size=2, in_channels=x_emb[1] // 4, out_channels=final[0] // 4, hidden_size=hidden,
        depth=count("layers"), refiner_depth=count("noise_refiner"), num_heads=heads,
        num_kv_heads=(qkv[0] - heads * hd) // (2 * hd), caption_channels=cap[0],
    )
    if w1[0] == 256 * -(-4 * hidden // 256):
        fields["multiple_of"] = 256
    if hd in _RELEASED_AXES:
        fields["axes_dim_rope"] = _RELEASED_AXES[hd]
    return fields


def _common(sd: StateDict, m: nn.Module, names: Mapping[str, str]) -> Tree:
    d, p, dt = m.hidden_size, m.patch_size, m.conditioning_size
    t: Tree = {}
    put(t, "x_embedder", sd.linear(names["x"], (p, p, m.in_channels), (d,)))
    put(t, "t_embedder/linear_1", sd.linear(names["t1"], (256,), (dt,)))
    put(t, "t_embedder/linear_2", sd.linear(names["t2"], (dt,), (dt,)))
    put(t, "caption_norm", sd.rms_norm(names["cap"] + ".0", m.caption_channels))
    put(t, "caption_projection", sd.linear(names["cap"] + ".1", (m.caption_channels,), (d,)))
    put(t, "final_layer/adaln/linear", sd.linear(names["final_scale"], (dt,), (d,)))
    put(t, "final_layer/linear", sd.linear(names["final"], (d,), (p * p * m.out_channels,)))
    return t


def _stacks(m: nn.Module) -> list[tuple[str, str, int, bool]]:
    """(reference prefix, jdit parent, depth, modulated) of the three block stacks."""
    return [("context_refiner", "context_refiner/", m.refiner_depth, False),
            ("noise_refiner", "noise_refiner/", m.refiner_depth, True),
            ("layers", "", m.depth, True)]


def _block_rest(sd: StateDict, t: Tree, o: str, m: nn.Module, names: Mapping[str, str],
                modulated: bool) -> None:
    """Everything of one block but q, k, v: ``names`` gives the reference's names."""
    d, hd, f = m.hidden_size, m.hidden_size // m.num_heads, m.ffn_hidden
    put(t, f"{o}/attn/out", sd.linear(names["out"], (m.num_heads, hd), (d,), bias=False))
    put(t, f"{o}/attn/q_norm", sd.rms_norm(names["q_norm"], hd))
    put(t, f"{o}/attn/k_norm", sd.rms_norm(names["k_norm"], hd))
    for ours in ("norm1", "norm2", "ffn_norm1", "ffn_norm2"):
        put(t, f"{o}/{ours}", sd.rms_norm(names[ours], d))
    put(t, f"{o}/ffn/gate", sd.linear(names["gate"], (d,), (f,), bias=False))
    put(t, f"{o}/ffn/up", sd.linear(names["up"], (d,), (f,), bias=False))
    put(t, f"{o}/ffn/down", sd.linear(names["down"], (f,), (d,), bias=False))
    if modulated:
        put(t, f"{o}/adaln/linear", sd.linear(names["adaln"], (m.conditioning_size,), (4 * d,)))


def convert_diffusers(sd: StateDict, m: nn.Module) -> Tree:
    emb = "time_caption_embed"
    t = _common(sd, m, dict(x="x_embedder", t1=f"{emb}.timestep_embedder.linear_1",
                            t2=f"{emb}.timestep_embedder.linear_2", cap=f"{emb}.caption_embedder",
                            final_scale="norm_out.linear_1", final="norm_out.linear_2"))
    d, hd = m.hidden_size, m.hidden_size // m.num_heads
    for stack, parent, depth, modulated in _stacks(m):
        for i in range(depth):
            s, o = f"{stack}.{i}", f"{parent}block_{i}"
            put(t, f"{o}/attn/q", sd.linear(f"{s}.attn.to_q", (d,), (m.num_heads, hd), bias=False))
            for n in "kv":
                put(t, f"{o}/attn/{n}", sd.linear(f"{s}.attn.to_{n}", (d,), (m.num_kv_heads, hd),
                                                  bias=False))
            _block_rest(sd, t, o, m, dict(
                out=f"{s}.attn.to_out.0", q_norm=f"{s}.attn.norm_q", k_norm=f"{s}.attn.norm_k",
                norm1=f"{s}.norm1.norm" if modulated else f"{s}.norm1", norm2=f"{s}.norm2",
                ffn_norm1=f"{s}.ffn_norm1", ffn_norm2=f"{s}.ffn_norm2",
                gate=f"{s}.feed_forward.linear_1", up=f"{s}.feed_forward.linear_3",
                down=f"{s}.feed_forward.linear_2", adaln=f"{s}.norm1.linear"), modulated)
    return t


def convert_official(sd: StateDict, m: nn.Module) -> Tree:
    t = _common(sd, m, dict(x="x_embedder", t1="t_embedder.mlp.0", t2="t_embedder.mlp.2",
                            cap="cap_embedder", final_scale="final_layer.adaLN_modulation.1",
                            final="final_layer.linear"))
    d, hd = m.hidden_size, m.hidden_size // m.num_heads
    q_heads, kv_heads = m.num_heads, m.num_kv_heads
    for stack, parent, depth, modulated in _stacks(m):
        for i in range(depth):
            s, o = f"{stack}.{i}", f"{parent}block_{i}"
            qkv = sd.linear(f"{s}.attention.qkv", (d,), ((q_heads + 2 * kv_heads) * hd,),
                            bias=False)
            if qkv is not None:  # rows q | k | v, each head's channels contiguous
                k = qkv["kernel"].reshape(d, q_heads + 2 * kv_heads, hd)
                parts = (k[:, :q_heads], k[:, q_heads:q_heads + kv_heads],
                         k[:, q_heads + kv_heads:])
                for n, kernel in zip("qkv", parts, strict=True):
                    put(t, f"{o}/attn/{n}", {"kernel": kernel})
            _block_rest(sd, t, o, m, dict(
                out=f"{s}.attention.out", q_norm=f"{s}.attention.q_norm",
                k_norm=f"{s}.attention.k_norm", norm1=f"{s}.attention_norm1",
                norm2=f"{s}.attention_norm2", ffn_norm1=f"{s}.ffn_norm1",
                ffn_norm2=f"{s}.ffn_norm2", gate=f"{s}.feed_forward.w1",
                up=f"{s}.feed_forward.w3", down=f"{s}.feed_forward.w2",
                adaln=f"{s}.adaLN_modulation.1"), modulated)
    return t
