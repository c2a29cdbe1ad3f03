"""LI-DiT's refiners of LLM prompt features, run inside the DiT because they see the timestep.

A decoder-only LLM's features are causal (each token saw only what came before it) and trained
for next-token prediction. LI-DiT (arXiv 2406.11831) refines them before the DiT reads them:

- the **linguistic token refiner**, one per LLM: an input projection to the refiner's width, then
  ``depth`` blocks of bidirectional self-attention (padded tokens masked as keys) and an MLP,
  each residual branch gated by an adaLN modulation of ``time_proj(t_emb) +
  pool_proj(mean of the valid tokens)``; the modulation starts at zero, so at initialisation the
  blocks pass the projected features through unchanged;
- the **collaborative refiner**, for several LLMs: one block per LLM in which its tokens
  cross-attend to every other LLM's tokens (plus MLP, same gating); the LLMs' tokens are then
  concatenated along the sequence for the DiT's cross-attention.

Several encoders' features reach the model as one array (:func:`pack_contexts`): concatenated
along the sequence, each zero-padded to the widest encoder's width, with a joined key mask; the
config's ``encoders`` (width, length) splits them again. One encoder needs no length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.nn.layers import (
    MLP_NAMES,
    Array,
    Dense,
    DType,
    Mlp,
    constrain,
    layer_norm,
    modulate,
)
from jdit.nn.modulation import AdaLNModulation

# caption tokens: few, so the sequence axis is never split (unlike image tokens' "length")
CAPTION_TOKEN_NAMES = ("batch", None, "act_embed")
_CAPTION_MLP_NAMES = ("batch", None, MLP_NAMES[-1])


@dataclasses.dataclass(frozen=True)
class TextRefinerConfig:
    """A model config's ``text_refiner`` section.

    ``encoders``: ``(feature width, tokens)`` of each prompt encoder, in packing order (tokens may
    be None with one encoder); ``width``: the refiner's width (what the DiT's caption projection
    reads); ``depth`` token-refiner blocks per encoder; ``causal``: keep a causal mask in the
    refiner (LI-DiT's ablation); ``collaborative``: fuse several encoders with the collaborative
    block (else they are only concatenated)."""

    encoders: tuple[tuple[int, int | None], ...]
    width: int
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = False
    collaborative: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | TextRefinerConfig) -> TextRefinerConfig:
        if isinstance(d, TextRefinerConfig):
            return d
        d = dict(d)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"text_refiner: unknown keys {unknown}; valid keys: {valid}")
        if "encoders" not in d or "width" not in d:
            raise ValueError("text_refiner needs 'encoders' ((feature width, tokens) per prompt "
                             "encoder) and 'width'")
        encoders = []
        for e in d["encoders"]:
            e = tuple(e) if isinstance(e, Sequence) and not isinstance(e, str) else (e,)
            if len(e) == 1:
                e = (e[0], None)
            if len(e) != 2:
                raise ValueError(f"text_refiner.encoders: each entry is (feature width, tokens), "
                                 f"got {e!r}")
            encoders.append((int(e[0]), None if e[1] is None else int(e[1])))
        d["encoders"] = tuple(encoders)
        out = cls(**d)
        out.check()
        return out

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["encoders"] = [list(e) for e in self.encoders]
        return out

    @property
    def packed_width(self) -> int:
        """The width of the packed features the model takes: the widest encoder's."""
        return max(w for w, _ in self.encoders)

    def packed_length(self, default: int) -> int:
        """The packed features' token count (``default`` with one encoder of any length)."""
        lengths = [n for _, n in self.encoders]
        return default if None in lengths else sum(lengths)

    def check(self) -> None:
        if not self.encoders:
            raise ValueError("text_refiner.encoders is empty: give (feature width, tokens) per "
                             "prompt encoder")
        if any(w < 1 or (n is not None and n < 1) for w, n in self.encoders):
            raise ValueError(f"text_refiner.encoders: widths and lengths must be >= 1, got "
                             f"{self.encoders}")
        if len(self.encoders) > 1 and any(n is None for _, n in self.encoders):
            raise ValueError(f"text_refiner.encoders: with several encoders each needs its token "
                             f"count (to split the packed features), got {self.encoders}")
        if self.width < 1 or self.depth < 0 or self.num_heads < 1 or self.width % self.num_heads:
            raise ValueError(f"text_refiner: width {self.width} must be a positive multiple of "
                             f"num_heads {self.num_heads}, and depth >= 0 (got {self.depth})")


def masked_mean(x: Array, mask: Array | None) -> Array:
    """Mean over the valid tokens, (B, L, D) -> (B, D) float32; an all-masked row gives zeros."""
    x = x.astype(jnp.float32)
    if mask is None:
        return jnp.mean(x, axis=1)
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def pack_contexts(features: Sequence[Array], masks: Sequence[Array]) -> tuple[Array, Array]:
    """Several encoders' ``(B, L_i, D_i)`` features and ``(B, L_i)`` masks as the one
    ``(B, ΣL_i, max D_i)`` array (zero-padded widths) and ``(B, ΣL_i)`` mask a model with a
    ``text_refiner`` takes."""
    if len(features) != len(masks) or not features:
        raise ValueError(f"pack_contexts: one mask per feature array, got {len(features)} "
                         f"features and {len(masks)} masks")
    width = max(f.shape[-1] for f in features)
    padded = [jnp.pad(f, ((0, 0), (0, 0), (0, width - f.shape[-1]))) for f in features]
    return jnp.concatenate(padded, axis=1), jnp.concatenate([jnp.asarray(m) for m in masks], 1)


def _attend(q: Array, k: Array, v: Array, mask: Array | None, causal: bool) -> Array:
    """Softmax attention over caption tokens (B, L, H, D): keys masked by ``mask`` (B, Lk) and,
    if ``causal``, by position. Float32 logits; a query with no valid key attends uniformly."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (q.shape[-1] ** -0.5)
    keep = jnp.ones(logits.shape[-2:], bool)[None, None]
    if mask is not None:
        keep = keep & mask.astype(bool)[:, None, None, :]
    if causal:
        keep = keep & jnp.tril(jnp.ones(logits.shape[-2:], bool))[None, None]
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(v.dtype)


class RefinerCondition(nn.Module):
    """``time_proj(t_emb) + pool_proj(mean of the valid tokens)``: what a refiner block's
    modulation reads (LI-DiT: the timestep plus the prompt's own summary)."""

    width: int
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, t_emb: Array) -> Array:
        common = dict(param_dtype=self.param_dtype, precision=self.precision)
        time = Dense(self.width, (None,), ("embed",), name="time_proj", **common)
        pool = Dense(self.width, (None,), ("embed",), name="pool_proj", **common)
        return time(t_emb.astype(jnp.float32)) + pool(masked_mean(x, mask))


class RefinerBlock(nn.Module):
    """Attention then MLP over caption tokens, each branch adaLN-modulated and gated by
    ``c`` (zero-initialised: the block starts as the identity). Self-attention by default;
    with ``others`` given, the tokens cross-attend to them instead (the collaborative block)."""

    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    causal: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, c: Array,
                 others: Array | None = None, others_mask: Array | None = None) -> Array:
        d, heads = self.width, self.num_heads
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        x = constrain(x.astype(jnp.float32), CAPTION_TOKEN_NAMES)
        mod = AdaLNModulation(6, d, param_dtype=self.param_dtype, precision=self.precision,
                              name="modulation")(c)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (mod[:, i:i + 1] for i in range(6))
        h = modulate(layer_norm(x, 1e-6), shift_a, scale_a).astype(self.dtype)
        q = Dense((heads, d // heads), ("embed",), ("heads", "kv"), name="q", **common)(h)
        if others is None:  # self-attention over this encoder's tokens
            kv_in, kv_mask, causal = h, mask, self.causal
        else:  # collaborative: the other encoders' tokens, normalised (no modulation: theirs)
            kv_in, kv_mask, causal = layer_norm(others, 1e-6).astype(self.dtype), others_mask, False
        kv = Dense((2, heads, d // heads), ("embed",), (None, "heads", "kv"), name="kv",
                   **common)(kv_in)
        o = _attend(q, kv[:, :, 0], kv[:, :, 1], kv_mask, causal)
        h = Dense(d, ("heads", "kv"), ("embed",), name="out", **common)(o)
        x = x + gate_a * h.astype(jnp.float32)
        h = modulate(layer_norm(x, 1e-6), shift_m, scale_m).astype(self.dtype)
        h = Mlp(int(d * self.mlp_ratio), d, hidden_names=_CAPTION_MLP_NAMES, name="mlp",
                **common)(h)
        return constrain(x + gate_m * h.astype(jnp.float32), CAPTION_TOKEN_NAMES)


class TokenRefiner(nn.Module):
    """One encoder's linguistic token refiner: ``(B, L, D_in) -> (B, L, width)`` float32."""

    width: int
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, features: Array, mask: Array | None, t_emb: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        x = Dense(self.width, ("caption",), ("embed",), name="in_proj", **common)(features)
        x = x.astype(jnp.float32)
        c = RefinerCondition(self.width, self.param_dtype, self.precision, name="condition")(
            x, mask, t_emb)
        for i in range(self.depth):
            x = RefinerBlock(self.width, self.num_heads, self.mlp_ratio, self.causal,
                             name=f"block_{i}", **common)(x, mask, c)
        return x


class TextRefiner(nn.Module):
    """The ``text_refiner`` of a PixArt or SANA model: packed features of one or more encoders
    (:func:`pack_contexts`) -> ``(features (B, ΣL_i, width) float32, mask (B, ΣL_i))``."""

    config: TextRefinerConfig
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, context: Array, mask: Array | None, t_emb: Array
                 ) -> tuple[Array, Array | None]:
        cfg = self.config
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        parts = split_packed(cfg, context, mask)
        refined = [
            TokenRefiner(cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.causal,
                         name=f"encoder_{i}", **common)(f, m, t_emb)
            for i, (f, m) in enumerate(parts)
        ]
        masks = [m for _, m in parts]
        if len(refined) > 1 and cfg.collaborative:
            fused = []
            for i, (x, m) in enumerate(zip(refined, masks, strict=True)):
                others = jnp.concatenate([r for j, r in enumerate(refined) if j != i], axis=1)
                others_mask = (None if mask is None else jnp.concatenate(
                    [o for j, o in enumerate(masks) if j != i], axis=1))
                c = RefinerCondition(cfg.width, self.param_dtype, self.precision,
                                     name=f"collaborative_condition_{i}")(x, m, t_emb)
                fused.append(RefinerBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio,
                                          name=f"collaborative_{i}", **common)(
                    x, m, c, others, others_mask))
            refined = fused
        out = jnp.concatenate(refined, axis=1)
        return out, (None if mask is None else jnp.concatenate(masks, axis=1))


def split_packed(cfg: TextRefinerConfig, context: Array, mask: Array | None
                 ) -> list[tuple[Array, Array | None]]:
    """The per-encoder ``(features (B, L_i, D_i), mask (B, L_i))`` of a packed context, checked
    against the config (clear errors for a width or length it does not describe)."""
    if context.ndim != 3 or context.shape[-1] != cfg.packed_width:
        raise ValueError(f"text_refiner: expected packed prompt features (B, L, "
                         f"{cfg.packed_width}) for encoders of widths "
                         f"{[w for w, _ in cfg.encoders]}, got {tuple(context.shape)}")
    if len(cfg.encoders) == 1:
        width, length = cfg.encoders[0]
        if length is not None and context.shape[1] != length:
            raise ValueError(f"text_refiner: the encoder gives {length} tokens, got "
                             f"{context.shape[1]}")
        return [(context[..., :width], mask)]
    total = sum(n for _, n in cfg.encoders)
    if context.shape[1] != total:
        raise ValueError(f"text_refiner: encoders of {[n for _, n in cfg.encoders]} tokens pack "
                         f"to {total}, got {context.shape[1]} (see jdit.nn.pack_contexts)")
    out, start = [], 0
    for width, length in cfg.encoders:
        out.append((context[:, start:start + length, :width],
                    None if mask is None else mask[:, start:start + length]))
        start += length
    return out
