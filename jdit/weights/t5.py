"""transformers ``T5EncoderModel`` / ``T5ForConditionalGeneration`` weights -> :class:`T5Encoder`.

Only the encoder is read: ``decoder.*`` and ``lm_head.*`` of a full T5 checkpoint are skipped.
The token table is ``shared.weight`` (``encoder.embed_tokens.weight`` is the same tied tensor
and may be stored instead, or as well).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import linen as nn

from jdit.weights.state_dict import StateDict, Tree, put


def encoder_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The encoder's tensors of a T5 state dict (decoder and LM head dropped)."""
    return {k: v for k, v in tensors.items()
            if not k.startswith(("decoder.", "lm_head."))}


def convert(sd: StateDict, t5: nn.Module) -> Tree:
    d, h, kv, ff = t5.d_model, t5.num_heads, t5.d_kv, t5.d_ff
    tree: Tree = {}
    table = "shared.weight" if "shared.weight" in sd else "encoder.embed_tokens.weight"
    put(tree, "shared", sd.take(table, (t5.vocab_size, d)))
    if table == "shared.weight" and "encoder.embed_tokens.weight" in sd:
        tied = sd.take("encoder.embed_tokens.weight", (t5.vocab_size, d))
        if tied is not None and not np.array_equal(tied, sd.tensors["shared.weight"]):
            raise ValueError(f"{sd.source}: encoder.embed_tokens.weight differs from "
                             f"shared.weight (T5 ties them)")
    put(tree, "relative_attention_bias", sd.take(
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        (t5.relative_attention_num_buckets, h)))
    gated = t5.feed_forward_proj.startswith("gated-")
    for i in range(t5.num_layers):
        src, dst = f"encoder.block.{i}.layer", f"block_{i}"
        for name in ("q", "k", "v"):
            put(tree, f"{dst}/attn/{name}",
                sd.linear(f"{src}.0.SelfAttention.{name}", (d,), (h, kv), bias=False))
        put(tree, f"{dst}/attn/o", sd.linear(f"{src}.0.SelfAttention.o", (h, kv), (d,),
                                             bias=False))
        put(tree, f"{dst}/attn_norm", sd.rms_norm(f"{src}.0.layer_norm", d))
        put(tree, f"{dst}/ff_norm", sd.rms_norm(f"{src}.1.layer_norm", d))
        for name in (("wi_0", "wi_1") if gated else ("wi",)):
            put(tree, f"{dst}/ff/{name}",
                sd.linear(f"{src}.1.DenseReluDense.{name}", (d,), (ff,), bias=False))
        put(tree, f"{dst}/ff/wo", sd.linear(f"{src}.1.DenseReluDense.wo", (ff,), (d,),
                                            bias=False))
    put(tree, "final_norm", sd.rms_norm("encoder.final_layer_norm", d))
    sd.finish()
    return tree
