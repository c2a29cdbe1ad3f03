"""diffusers ``AutoencoderKL`` weights -> :class:`jdit.autoencoders.AutoencoderKL`.

The mid-block attention is read under diffusers' current names (``to_q``/``to_k``/``to_v``/
``to_out.0``, linear) or the names of folders saved before diffusers 0.14 (``query``/``key``/
``value``/``proj_attn``, linear or 1×1-conv shaped).
"""

from __future__ import annotations

import numpy as np

from jdit.weights.state_dict import StateDict, Tree, put

_ATTENTION_NAMES = (("q", "to_q", "query"), ("k", "to_k", "key"), ("v", "to_v", "value"),
                    ("out", "to_out.0", "proj_attn"))


def _conv(sd: StateDict, prefix: str, cin: int, cout: int, k: int = 3) -> Tree | None:
    w = sd.take(f"{prefix}.weight", (cout, cin, k, k))
    b = sd.take(f"{prefix}.bias", (cout,))
    return None if w is None or b is None else {"kernel": w.transpose(2, 3, 1, 0), "bias": b}


def _norm(sd: StateDict, prefix: str, c: int) -> Tree | None:
    scale, bias = sd.take(f"{prefix}.weight", (c,)), sd.take(f"{prefix}.bias", (c,))
    return None if scale is None or bias is None else {"scale": scale, "bias": bias}


def _resnet(sd: StateDict, src: str, cin: int, cout: int) -> Tree:
    tree: Tree = {}
    put(tree, "norm1", _norm(sd, f"{src}.norm1", cin))
    put(tree, "conv1", _conv(sd, f"{src}.conv1", cin, cout))
    put(tree, "norm2", _norm(sd, f"{src}.norm2", cout))
    put(tree, "conv2", _conv(sd, f"{src}.conv2", cout, cout))
    if cin != cout:
        put(tree, "shortcut", _conv(sd, f"{src}.conv_shortcut", cin, cout, 1))
    return tree


def _attention(sd: StateDict, src: str, c: int) -> Tree:
    tree: Tree = {"norm": _norm(sd, f"{src}.group_norm", c)}
    for ours, current, legacy in _ATTENTION_NAMES:
        name = current if f"{src}.{current}.weight" in sd else legacy
        key = f"{src}.{name}.weight"
        shape = sd.shape(key)
        if shape is not None and len(shape) == 4:  # 1x1-conv shaped (pre-0.14 folders)
            sd.tensors[key] = np.asarray(sd.tensors[key]).reshape(shape[:2])
        put(tree, ours, sd.linear(f"{src}.{name}", (c,), (c,)))
    return tree


def _mid(sd: StateDict, src: str, c: int, attention: bool) -> Tree:
    tree = {"resnet_0": _resnet(sd, f"{src}.resnets.0", c, c),
            "resnet_1": _resnet(sd, f"{src}.resnets.1", c, c)}
    if attention:
        tree["attn"] = _attention(sd, f"{src}.attentions.0", c)
    return tree


def convert(sd: StateDict, vae: object) -> Tree:
    chans = list(vae.block_out_channels)  # type: ignore[attr-defined]
    n, lat = vae.layers_per_block, vae.latent_channels  # type: ignore[attr-defined]
    attention = vae.mid_block_add_attention  # type: ignore[attr-defined]
    tree: Tree = {}
    put(tree, "enc_in", _conv(sd, "encoder.conv_in", vae.in_channels, chans[0]))  # type: ignore[attr-defined]
    prev = chans[0]
    for i, c in enumerate(chans):
        for j in range(n):
            put(tree, f"enc_blocks_{i}_{j}",
                _resnet(sd, f"encoder.down_blocks.{i}.resnets.{j}", prev if j == 0 else c, c))
        if i < len(chans) - 1:
            put(tree, f"enc_down_{i}", _conv(sd, f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c))
        prev = c
    put(tree, "enc_mid", _mid(sd, "encoder.mid_block", chans[-1], attention))
    put(tree, "enc_norm", _norm(sd, "encoder.conv_norm_out", chans[-1]))
    put(tree, "enc_out", _conv(sd, "encoder.conv_out", chans[-1], 2 * lat))
    if vae.use_quant_conv:  # type: ignore[attr-defined]
        put(tree, "quant_conv", _conv(sd, "quant_conv", 2 * lat, 2 * lat, 1))
    if vae.use_post_quant_conv:  # type: ignore[attr-defined]
        put(tree, "post_quant_conv", _conv(sd, "post_quant_conv", lat, lat, 1))
    rev = chans[::-1]
    put(tree, "dec_in", _conv(sd, "decoder.conv_in", lat, rev[0]))
    put(tree, "dec_mid", _mid(sd, "decoder.mid_block", rev[0], attention))
    prev = rev[0]
    for i, c in enumerate(rev):
        for j in range(n + 1):
            put(tree, f"dec_blocks_{i}_{j}",
                _resnet(sd, f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else c, c))
        if i < len(rev) - 1:
            put(tree, f"dec_up_{i}", _conv(sd, f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c))
        prev = c
    put(tree, "dec_norm", _norm(sd, "decoder.conv_norm_out", chans[0]))
    put(tree, "dec_out", _conv(sd, "decoder.conv_out", chans[0], vae.out_channels))  # type: ignore[attr-defined]
    sd.finish()
    return tree
