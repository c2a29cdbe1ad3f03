"""Llama- and Qwen2-family decoders as text encoders (LI-DiT's LLM prompt encoders).

    llm, params = jdit.text.from_pretrained("Qwen2.5-0.5B-Instruct/")       # or a Llama folder
    h = llm.apply({"params": params}, input_ids, attention_mask)             # (B, L, hidden)

Per layer: RMSNorm → grouped-query causal self-attention with rotary positions (halves rotated,
as transformers' ``rotate_half``), blind to padded keys → residual; RMSNorm → SwiGLU MLP
(``down(silu(gate(x)) · up(x))``) → residual; a final RMSNorm. Qwen2 adds biases to q, k and v;
Llama has them only when ``attention_bias`` (and MLP biases when ``mlp_bias``). RMSNorm scales
by ``w`` after normalising in float32 (Gemma's scales by ``1 + w``).

``hidden_layer`` picks the features as transformers' ``hidden_states[hidden_layer]`` does: index
0 is the token embeddings, ``i`` the output of layer ``i`` (1-based), the last (-1) the final
norm's output. LI-DiT takes the third from last (``hidden_layer=-3``); layers past the one asked
for are not run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.layers import Dense, constrain
from jdit.text.gemma2 import grouped_query_attention, rotary

Array = jax.Array
FAMILIES = ("llama", "qwen2")


class RMSNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return w.astype(x.dtype) * y.astype(x.dtype)


def layer_index(hidden_layer: int, num_layers: int) -> int:
    """``hidden_layer`` (transformers' ``hidden_states`` index, negative from the end) as the
    count of layers to run; ``num_layers`` means all of them and the final norm (the tuple's
    last entry is the normed output, not the last layer's)."""
    n = num_layers + 1
    if not -n <= hidden_layer < n:
        raise ValueError(f"hidden_layer {hidden_layer} is outside a model of {num_layers} layers "
                         f"(hidden states -{n}..{n - 1}: the embeddings, each layer's output, the "
                         "final norm's)")
    return hidden_layer % n


class LlamaAttention(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    qkv_bias: bool
    out_bias: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, allowed: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hd, kvd = (self.num_heads, self.head_dim), (self.num_kv_heads, self.head_dim)
        q = Dense(hd, ("embed",), ("heads", "kv"), use_bias=self.qkv_bias, name="q", **common)(x)
        k = Dense(kvd, ("embed",), ("heads", "kv"), use_bias=self.qkv_bias, name="k", **common)(x)
        v = Dense(kvd, ("embed",), ("heads", "kv"), use_bias=self.qkv_bias, name="v", **common)(x)
        pos = jnp.arange(x.shape[1])
        q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        out = grouped_query_attention(q, k, v, allowed, self.head_dim ** -0.5)
        return Dense(x.shape[-1], ("heads", "kv"), ("embed",), use_bias=self.out_bias, name="o",
                     **common)(out)


class LlamaLayer(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float
    rope_theta: float
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, allowed: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(eps=self.eps, param_dtype=self.param_dtype)
        h = RMSNorm(name="input_norm", **norm)(x)
        x = x + LlamaAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta,
                               self.qkv_bias, self.out_bias, name="attn", **common)(h, allowed)
        h = RMSNorm(name="post_attn_norm", **norm)(x)
        dense = dict(use_bias=self.mlp_bias, **common)
        gate = Dense(self.intermediate_size, ("embed",), ("mlp",), name="gate", **dense)(h)
        up = Dense(self.intermediate_size, ("embed",), ("mlp",), name="up", **dense)(h)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        x = x + Dense(x.shape[-1], ("mlp",), ("embed",), name="down", **dense)(h)
        return constrain(x, ("batch", "length", "act_embed"))


class LlamaEncoder(nn.Module):
    """``apply(params, input_ids (B, L) int, attention_mask (B, L)) -> (B, L, hidden)`` float32:
    the hidden state ``hidden_layer`` (default: the final norm's output)."""

    model_type: str = "llama"  # "llama" or "qwen2" (q, k, v biases)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False  # Llama: biases on q, k, v and o
    mlp_bias: bool = False
    hidden_layer: int = -1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> LlamaEncoder:
        """From a transformers ``LlamaConfig`` or ``Qwen2Config`` dict (``config.json``)."""
        kind = cfg.get("model_type")
        if kind not in FAMILIES:
            raise ValueError(f"model_type {kind!r} is not one of {FAMILIES}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{kind} hidden_act {cfg['hidden_act']!r}: only SiLU is supported")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{kind} rope_type {rope.get('rope_type', rope.get('type'))!r}: "
                             "only 'default' rotary positions are supported")
        if cfg.get("use_sliding_window"):
            raise ValueError(f"{kind} use_sliding_window=True is not supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype",
                                                              "param_dtype", "hidden_layer"}
        fields = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        if theta is not None:
            fields["rope_theta"] = float(theta)
        return cls(**fields, **overrides)

    @property
    def layers_run(self) -> int:
        """How many layers the features need (``num_hidden_layers``: all, and the final norm)."""
        return layer_index(self.hidden_layer, self.num_hidden_layers)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def example_inputs(self, batch: int = 1, length: int = 8) -> dict[str, Array]:
        return {"input_ids": jnp.ones((batch, length), jnp.int32),
                "attention_mask": jnp.ones((batch, length), jnp.int32)}

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} query heads do not share "
                             f"{self.num_key_value_heads} key/value heads evenly")
        run = self.layers_run
        table = self.param("embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.vocab_size, self.hidden_size), self.param_dtype)
        x = constrain(jnp.take(table, input_ids, axis=0).astype(self.dtype),
                      ("batch", "length", "act_embed"))
        n = input_ids.shape[1]
        causal = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
        keys = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        allowed = causal[None] & keys.astype(bool)[:, None, :]  # padded keys get no weight
        qwen = self.model_type == "qwen2"
        for i in range(run):
            x = LlamaLayer(self.num_attention_heads, self.num_key_value_heads, self.head_size,
                           self.intermediate_size, self.rms_norm_eps, self.rope_theta,
                           qkv_bias=qwen or self.attention_bias, out_bias=self.attention_bias,
                           mlp_bias=self.mlp_bias, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=f"layer_{i}")(x, allowed)
        if run == self.num_hidden_layers:
            x = RMSNorm(self.rms_norm_eps, self.param_dtype, name="final_norm")(x)
        return x.astype(jnp.float32)


def lm_logits(params: Any, hidden: Array) -> Array:
    """Next-token logits of a decoder whose LM head is tied to its embeddings (the final
    norm's output (B, L, hidden) against ``embed``): float32 (B, L, vocab)."""
    table = params["embed"]
    return jnp.einsum("bld,vd->blv", hidden.astype(jnp.float32), table.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
