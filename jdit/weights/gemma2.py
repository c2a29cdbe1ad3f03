"""transformers ``Gemma2Model`` / ``Gemma2ForCausalLM`` weights -> :class:`Gemma2Encoder`.

A causal-LM checkpoint prefixes the decoder's tensors with ``model.``; its ``lm_head`` (tied to
the token table) is not read.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import linen as nn

from jdit.weights.state_dict import StateDict, Tree, put


def decoder_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoder stack's tensors, without a ``model.`` prefix, LM head dropped."""
    if any(k.startswith("model.") for k in tensors):
        return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}


def convert(sd: StateDict, gemma: nn.Module) -> Tree:
    d, hd = gemma.hidden_size, gemma.head_dim
    h, kv, ff = gemma.num_attention_heads, gemma.num_key_value_heads, gemma.intermediate_size
    tree: Tree = {}
    put(tree, "embed", sd.take("embed_tokens.weight", (gemma.vocab_size, d)))
    run = gemma.layers_run
    for i in range(run):
        src, dst = f"layers.{i}", f"layer_{i}"
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            put(tree, f"{dst}/attn/{name}",
                sd.linear(f"{src}.self_attn.{name}_proj", (d,), (heads, hd), bias=False))
        put(tree, f"{dst}/attn/o", sd.linear(f"{src}.self_attn.o_proj", (h, hd), (d,),
                                             bias=False))
        for name in ("gate", "up"):
            put(tree, f"{dst}/{name}", sd.linear(f"{src}.mlp.{name}_proj", (d,), (ff,),
                                                 bias=False))
        put(tree, f"{dst}/down", sd.linear(f"{src}.mlp.down_proj", (ff,), (d,), bias=False))
        for ours, theirs in (("input_norm", "input_layernorm"),
                             ("post_attn_norm", "post_attention_layernorm"),
                             ("pre_mlp_norm", "pre_feedforward_layernorm"),
                             ("post_mlp_norm", "post_feedforward_layernorm")):
            put(tree, f"{dst}/{ours}", sd.rms_norm(f"{src}.{theirs}", d))
    if run == gemma.num_hidden_layers:
        put(tree, "final_norm", sd.rms_norm("norm", d))
    # the layers the features do not reach (hidden_layer): present, deliberately not read
    sd.used.update(k for k in sd.tensors if (k.startswith("layers.") and
                                             int(k.split(".")[1]) >= run)
                   or (k.startswith("norm.") and run < gemma.num_hidden_layers))
    sd.finish()
    return tree
