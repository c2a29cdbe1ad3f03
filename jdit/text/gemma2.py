"""The Gemma-2 decoder as a text encoder: SANA's (``google/gemma-2-2b-it``, last hidden state).

    gemma, params = jdit.text.from_pretrained("Sana_1600M_1024px_diffusers/text_encoder")
    h = gemma.apply({"params": params}, input_ids, attention_mask)   # (B, L, hidden)

Token embeddings scaled by sqrt(hidden); per layer: RMSNorm → grouped-query self-attention with
rotary positions, queries scaled by ``query_pre_attn_scalar ** -0.5``, logits soft-capped
(``cap · tanh(x / cap)``), causal (and, on alternate layers, limited to a sliding window) and
blind to padded keys → RMSNorm, residual; RMSNorm → gated tanh-GELU MLP → RMSNorm, residual; a
final RMSNorm. Gemma's RMSNorm scales by ``1 + w`` in float32. The causal mask makes position i
depend only on tokens 0..i, so right padding leaves the real positions untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.layers import Dense, constrain

Array = jax.Array


class GemmaRMSNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding of (B, L, H, D) by ``positions`` (L,), halves rotated (GPT-NeoX style)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions.astype(jnp.float32)[:, None] * inv[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = jnp.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * cos + half * sin


def grouped_query_attention(q: Array, k: Array, v: Array, allowed: Array, scale: float,
                            softcap: float | None = None) -> Array:
    """Causal decoder attention with key/value heads shared by groups of query heads: q (B, L,
    H, D), k and v (B, L, H_kv, D), ``allowed`` (B, L, L) which keys each query sees; logits
    (optionally soft-capped, ``cap · tanh(x / cap)``) and softmax in float32."""
    b, n, heads, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, n, kv_heads, heads // kv_heads, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", weights, v).reshape(b, n, heads, d)


class Gemma2Attention(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_scale: float
    softcap: float | None
    rope_theta: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, allowed: Array) -> Array:
        common = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        hd, kvd = (self.num_heads, self.head_dim), (self.num_kv_heads, self.head_dim)
        q = Dense(hd, ("embed",), ("heads", "kv"), name="q", **common)(x)
        k = Dense(kvd, ("embed",), ("heads", "kv"), name="k", **common)(x)
        v = Dense(kvd, ("embed",), ("heads", "kv"), name="v", **common)(x)
        pos = jnp.arange(x.shape[1])
        q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        out = grouped_query_attention(q, k, v, allowed, self.query_scale, self.softcap)
        return Dense(x.shape[-1], ("heads", "kv"), ("embed",), name="o", **common)(out)


class Gemma2Layer(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float
    query_scale: float
    softcap: float | None
    rope_theta: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, allowed: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(eps=self.eps, param_dtype=self.param_dtype)
        h = GemmaRMSNorm(name="input_norm", **norm)(x)
        h = Gemma2Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.query_scale,
                            self.softcap, self.rope_theta, name="attn", **common)(h, allowed)
        x = x + GemmaRMSNorm(name="post_attn_norm", **norm)(h)
        h = GemmaRMSNorm(name="pre_mlp_norm", **norm)(x)
        dense = dict(use_bias=False, **common)
        gate = Dense(self.intermediate_size, ("embed",), ("mlp",), name="gate", **dense)(h)
        up = Dense(self.intermediate_size, ("embed",), ("mlp",), name="up", **dense)(h)
        h = constrain(jax.nn.gelu(gate, approximate=True) * up, ("batch", "length", "act_mlp"))
        h = Dense(x.shape[-1], ("mlp",), ("embed",), name="down", **dense)(h)
        x = x + GemmaRMSNorm(name="post_mlp_norm", **norm)(h)
        return constrain(x, ("batch", "length", "act_embed"))


class Gemma2Encoder(nn.Module):
    """``apply(params, input_ids (B, L) int, attention_mask (B, L)) -> (B, L, hidden)`` float32,
    Gemma-2's last hidden state after the final norm (or hidden state ``hidden_layer``)."""

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = 50.0
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None  # default: sliding on even layers, full on odd
    hidden_layer: int = -1  # transformers' hidden_states index (see jdit.text.llama)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> Gemma2Encoder:
        """From a transformers ``Gemma2Config`` dict (``config.json``)."""
        if cfg.get("model_type", "gemma2") != "gemma2":
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not gemma2")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ValueError(f"Gemma-2 hidden_activation {act!r}: only the tanh GELU is supported")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"Gemma-2 rope_type {rope['rope_type']!r}: only 'default' is "
                             "supported")
        for key in ("attention_bias", "use_bidirectional_attention"):
            if cfg.get(key):
                raise ValueError(f"Gemma-2 {key}=True is not supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype",
                                                              "param_dtype", "hidden_layer"}
        fields = {k: cfg[k] for k in names if k in cfg}
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        if theta is not None:
            fields["rope_theta"] = float(theta)
        if fields.get("head_dim") is None:
            fields["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        if fields.get("layer_types") is not None:
            fields["layer_types"] = tuple(fields["layer_types"])
        return cls(**fields, **overrides)

    @property
    def layers_run(self) -> int:
        """How many layers the features need (``num_hidden_layers``: all, and the final norm)."""
        from jdit.text.llama import layer_index

        return layer_index(self.hidden_layer, self.num_hidden_layers)

    def kinds(self) -> tuple[str, ...]:
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"Gemma-2 layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
            return self.layer_types
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                     for i in range(self.num_hidden_layers))

    def example_inputs(self, batch: int = 1, length: int = 8) -> dict[str, Array]:
        return {"input_ids": jnp.ones((batch, length), jnp.int32),
                "attention_mask": jnp.ones((batch, length), jnp.int32)}

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        table = self.param("embed", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.vocab_size, self.hidden_size), self.param_dtype)
        x = jnp.take(table, input_ids, axis=0).astype(self.dtype)
        x = x * jnp.asarray(self.hidden_size ** 0.5, self.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        n = input_ids.shape[1]
        q, k = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
        causal = k <= q
        window = causal & (q - k < (self.sliding_window or n + 1))
        keys = (jnp.ones_like(input_ids) if attention_mask is None else attention_mask)
        keys = keys.astype(bool)[:, None, :]  # (B, 1, L): padded keys get no weight
        masks = {"full_attention": causal[None] & keys, "sliding_attention": window[None] & keys}
        run = self.layers_run
        for i, kind in enumerate(self.kinds()[:run]):
            if kind not in masks:
                raise ValueError(f"Gemma-2 layer type {kind!r} is not supported")
            x = Gemma2Layer(self.num_attention_heads, self.num_key_value_heads, self.head_dim,
                            self.intermediate_size, self.rms_norm_eps,
                            self.query_pre_attn_scalar ** -0.5, self.attn_logit_softcapping,
                            self.rope_theta, self.dtype, self.param_dtype,
                            name=f"layer_{i}")(x, masks[kind])
        if run == self.num_hidden_layers:
            x = GemmaRMSNorm(self.rms_norm_eps, self.param_dtype, name="final_norm")(x)
        return x.astype(jnp.float32)
