"""transformers ``LlamaModel`` / ``Qwen2Model`` (or their ``*ForCausalLM``) weights ->
:class:`jdit.text.llama.LlamaEncoder`.

Names (transformers -> jdit), per layer ``i``:
  layers.i.self_attn.{q,k,v,o}_proj      -> layer_i/attn/{q,k,v,o}
  layers.i.mlp.{gate,up,down}_proj       -> layer_i/{gate,up,down}
  layers.i.input_layernorm               -> layer_i/input_norm
  layers.i.post_attention_layernorm      -> layer_i/post_attn_norm
  embed_tokens, norm                     -> embed, final_norm
Layers past the encoder's ``hidden_layer`` (and the final norm, unless it is asked for) are
left unread: they do not take part in the features.
"""

from __future__ import annotations

from flax import linen as nn

from jdit.weights.state_dict import StateDict, Tree, put


def convert(sd: StateDict, m: nn.Module) -> Tree:
    d, hd = m.hidden_size, m.head_size
    h, kv, ff = m.num_attention_heads, m.num_key_value_heads, m.intermediate_size
    run = m.layers_run
    qkv_bias = m.model_type == "qwen2" or m.attention_bias
    tree: Tree = {}
    put(tree, "embed", sd.take("embed_tokens.weight", (m.vocab_size, d)))
    for i in range(run):
        src, dst = f"layers.{i}", f"layer_{i}"
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            put(tree, f"{dst}/attn/{name}", sd.linear(f"{src}.self_attn.{name}_proj", (d,),
                                                      (heads, hd), bias=qkv_bias))
        put(tree, f"{dst}/attn/o", sd.linear(f"{src}.self_attn.o_proj", (h, hd), (d,),
                                             bias=m.attention_bias))
        for name in ("gate", "up"):
            put(tree, f"{dst}/{name}", sd.linear(f"{src}.mlp.{name}_proj", (d,), (ff,),
                                                 bias=m.mlp_bias))
        put(tree, f"{dst}/down", sd.linear(f"{src}.mlp.down_proj", (ff,), (d,), bias=m.mlp_bias))
        put(tree, f"{dst}/input_norm", sd.rms_norm(f"{src}.input_layernorm", d))
        put(tree, f"{dst}/post_attn_norm", sd.rms_norm(f"{src}.post_attention_layernorm", d))
    if run == m.num_hidden_layers:
        put(tree, "final_norm", sd.rms_norm("norm", d))
    # the layers the features do not reach: present in the file, deliberately not read
    kept = {f"layers.{i}." for i in range(run)}
    sd.used.update(k for k in sd.tensors if (k.startswith("layers.") and
                                             not any(k.startswith(p) for p in kept))
                   or (k.startswith("norm.") and run < m.num_hidden_layers)
                   or k.endswith("rotary_emb.inv_freq"))
    sd.finish()
    return tree
