"""The T5 encoder (v1.1, Flan-T5, and the original T5): PixArt's text encoder.

    t5, params = jdit.text.from_pretrained("PixArt-Sigma-XL-2-1024-MS/text_encoder")
    h = t5.apply({"params": params}, input_ids, attention_mask)      # (B, L, d_model)

Pre-norm blocks of self-attention and a feed-forward layer, RMSNorm without mean or bias, no
biases anywhere, no 1/sqrt(d) on the attention logits (T5 folds it into the initialisation), and
one learned relative-position bias (log-spaced buckets of key - query offsets) computed by the
first layer and added in every layer. v1.1 / Flan use a gated GELU (tanh approximation) feed-
forward; the original T5 a ReLU one. Every parameter carries logical axis names ("vocab",
"embed", "heads", "kv", "mlp"), so T5-XXL shards over a mesh with the DiT's rule table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.layers import Dense, RMSNorm, constrain

Array = jax.Array
FEED_FORWARD = ("gated-gelu", "gated-silu", "relu", "gelu")


def relative_buckets(query_len: int, key_len: int, num_buckets: int, max_distance: int
                     ) -> Array:
    """Bidirectional T5 buckets of ``key - query`` (query_len, key_len): half the buckets per
    sign, exact for offsets below a quarter of the buckets, log-spaced up to ``max_distance``."""
    offset = jnp.arange(key_len)[None, :] - jnp.arange(query_len)[:, None]
    half = num_buckets // 2
    bucket = jnp.where(offset > 0, half, 0)
    n = jnp.abs(offset)
    exact = half // 2
    far = exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact)
                   / math.log(max_distance / exact) * (half - exact)).astype(jnp.int32)
    far = jnp.minimum(far, half - 1)
    return bucket + jnp.where(n < exact, n, far)


class T5Attention(nn.Module):
    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> Array:
        common = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        hd = (self.num_heads, self.head_dim)
        q, k, v = (Dense(hd, ("embed",), ("heads", "kv"), name=n, **common)(x)
                   for n in ("q", "k", "v"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits + bias, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return Dense(x.shape[-1], ("heads", "kv"), ("embed",), name="o", **common)(out)


class T5FeedForward(nn.Module):
    d_ff: int
    kind: str = "gated-gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        common = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        # transformers maps "gated-gelu" to the tanh GELU ("gelu_new") but plain "gelu" to the
        # exact erf one
        act = {"gated-gelu": lambda h: jax.nn.gelu(h, approximate=True),
               "gelu": lambda h: jax.nn.gelu(h, approximate=False),
               "gated-silu": jax.nn.silu, "relu": jax.nn.relu}.get(self.kind)
        if act is None:
            raise ValueError(f"T5 feed_forward_proj {self.kind!r}: expected one of {FEED_FORWARD}")
        if self.kind.startswith("gated-"):
            h = act(Dense(self.d_ff, ("embed",), ("mlp",), name="wi_0", **common)(x))
            h = h * Dense(self.d_ff, ("embed",), ("mlp",), name="wi_1", **common)(x)
        else:
            h = act(Dense(self.d_ff, ("embed",), ("mlp",), name="wi", **common)(x))
        h = constrain(h, ("batch", "length", "act_mlp"))
        return Dense(x.shape[-1], ("mlp",), ("embed",), name="wo", **common)(h)


class T5Block(nn.Module):
    """Pre-norm self-attention, then a pre-norm feed-forward layer, each residual."""

    num_heads: int
    d_kv: int
    d_ff: int
    feed_forward_proj: str
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(self.eps, param_dtype=self.param_dtype, name="attn_norm")(x)
        x = x + T5Attention(self.num_heads, self.d_kv, name="attn", **common)(h, bias)
        h = RMSNorm(self.eps, param_dtype=self.param_dtype, name="ff_norm")(x)
        x = x + T5FeedForward(self.d_ff, self.feed_forward_proj, name="ff", **common)(h)
        return constrain(x, ("batch", "length", "act_embed"))


class T5Encoder(nn.Module):
    """``apply(params, input_ids (B, L) int, attention_mask (B, L)) -> (B, L, d_model)``, the
    last hidden state after the final norm (what PixArt feeds its caption projection)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> T5Encoder:
        """From a transformers ``T5Config`` dict (``config.json``); decoder fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype",
                                                              "param_dtype"}
        fields = {k: cfg[k] for k in names if k in cfg}
        kind = fields.get("feed_forward_proj", "relu")
        if kind == "gated-gelu_new":  # an alias some configs use
            kind = "gated-gelu"
        if kind not in FEED_FORWARD:
            raise ValueError(f"T5 feed_forward_proj {kind!r} is not supported; expected one of "
                             f"{FEED_FORWARD}")
        fields["feed_forward_proj"] = kind
        if cfg.get("is_gated_act") is not None and cfg["is_gated_act"] != kind.startswith("gated"):
            raise ValueError(f"T5 config: is_gated_act={cfg['is_gated_act']} contradicts "
                             f"feed_forward_proj={kind!r}")
        missing = sorted({"vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"}
                         - set(fields))
        if missing:
            raise ValueError(f"T5 config lacks {missing}")
        return cls(**fields, **overrides)

    def example_inputs(self, batch: int = 1, length: int = 8) -> dict[str, Array]:
        return {"input_ids": jnp.ones((batch, length), jnp.int32),
                "attention_mask": jnp.ones((batch, length), jnp.int32)}

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        table = self.param("shared", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.vocab_size, self.d_model), self.param_dtype)
        x = jnp.take(table, input_ids, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        length = input_ids.shape[1]
        rel = self.param("relative_attention_bias", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (None, "heads")),
            (self.relative_attention_num_buckets, self.num_heads), self.param_dtype)
        buckets = relative_buckets(length, length, self.relative_attention_num_buckets,
                                   self.relative_attention_max_distance)
        bias = jnp.transpose(jnp.take(rel.astype(jnp.float32), buckets, axis=0), (2, 0, 1))[None]
        if attention_mask is not None:  # keys outside the mask get no weight
            keep = attention_mask.astype(bool)[:, None, None, :]
            bias = jnp.where(keep, bias, jnp.finfo(jnp.float32).min)
        for i in range(self.num_layers):
            x = T5Block(self.num_heads, self.d_kv, self.d_ff, self.feed_forward_proj,
                        self.layer_norm_epsilon, self.dtype, self.param_dtype,
                        name=f"block_{i}")(x, bias)
        return RMSNorm(self.layer_norm_epsilon, param_dtype=self.param_dtype,
                       name="final_norm")(x).astype(jnp.float32)
