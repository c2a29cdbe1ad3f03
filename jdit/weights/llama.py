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

import json
from pathlib import Path

import numpy as np
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


def export(params: Tree, m: nn.Module) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert`: a whole :class:`LlamaEncoder`'s parameters (every layer
    and the final norm) under transformers' ``LlamaModel`` / ``Qwen2Model`` names."""
    if m.layers_run != m.num_hidden_layers:
        raise ValueError(f"export needs every layer's weights: the encoder runs "
                         f"{m.layers_run} of {m.num_hidden_layers} (hidden_layer="
                         f"{m.hidden_layer}); export the full model (hidden_layer=-1)")

    def linear(p: Tree, name: str, n_in: int) -> dict[str, np.ndarray]:
        k = np.asarray(p["kernel"], np.float32)
        fan_in = int(np.prod(k.shape[:n_in]))
        out = {f"{name}.weight": np.ascontiguousarray(k.reshape(fan_in, -1).T)}
        if "bias" in p:
            out[f"{name}.bias"] = np.asarray(p["bias"], np.float32).reshape(-1)
        return out

    out = {"embed_tokens.weight": np.asarray(params["embed"], np.float32),
           "norm.weight": np.asarray(params["final_norm"]["scale"], np.float32)}
    for i in range(m.num_hidden_layers):
        p, src = params[f"layer_{i}"], f"layers.{i}"
        for name in ("q", "k", "v"):
            out.update(linear(p["attn"][name], f"{src}.self_attn.{name}_proj", 1))
        out.update(linear(p["attn"]["o"], f"{src}.self_attn.o_proj", 2))
        for name in ("gate", "up", "down"):
            out.update(linear(p[name], f"{src}.mlp.{name}_proj", 1))
        out[f"{src}.input_layernorm.weight"] = np.asarray(p["input_norm"]["scale"], np.float32)
        out[f"{src}.post_attention_layernorm.weight"] = np.asarray(
            p["post_attn_norm"]["scale"], np.float32)
    return out


def save_pretrained(folder: str | Path, params: Tree, m: nn.Module) -> Path:
    """A transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` folder (``config.json`` and
    ``model.safetensors``, word embeddings tied to the LM head) of a whole encoder: what
    ``jdit.text.from_pretrained`` and transformers both read. Files are written atomically."""
    from jdit.files import atomic_write
    from jdit.weights.safetensors_io import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[m.model_type]
    config = {
        "architectures": [arch], "model_type": m.model_type, "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_hidden_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads,
        "rms_norm_eps": m.rms_norm_eps, "rope_theta": m.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": True, "torch_dtype": "float32",
        "max_position_embeddings": 2048,
    }
    if m.head_dim is not None:
        config["head_dim"] = m.head_dim
    if m.model_type == "llama":
        config.update(attention_bias=m.attention_bias, mlp_bias=m.mlp_bias)
    tensors = {f"model.{k}": v for k, v in export(params, m).items()}
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    atomic_write(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder
